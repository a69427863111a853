"""Run one script on the micropython binary and on CPython, for tests that compare the
two interpreters (sim/ must behave the same on both). The script prints a JSON object
as its last line."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPY = os.path.join(REPO, ".venv", "bin", "micropython")


def run_script(script, name, tmp, micropython=True):
    path = tmp / name
    path.write_text(script)
    if micropython:
        exe, env = MPY, dict(os.environ, MICROPYPATH=REPO + ":.frozen")
    else:
        exe, env = sys.executable, dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([exe, str(path)], capture_output=True, text=True, env=env,
                       timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr + p.stdout
    return json.loads(p.stdout.strip().splitlines()[-1])
