"""Host side of tests/metering_harness.py: run a snippet on the micropython binary with
the harness imported as `h` (firmware, boards, repo and tests importable, as the metering
tests need) and return what it printed with h.dump() ("RESULT <json>" lines), in order."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP = os.path.join(ROOT, ".venv", "bin", "micropython")


def run_harness(code, heap="8M", timeout=400):
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join([".frozen", os.path.join(ROOT, "firmware"),
                                   os.path.join(ROOT, "boards"), ROOT,
                                   os.path.join(ROOT, "tests")])
    r = subprocess.run([MP, "-X", "heapsize=" + heap, "-c",
                        "import metering_harness as h\n" + code],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    out = [l[7:] for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and out, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(o) for o in out]
