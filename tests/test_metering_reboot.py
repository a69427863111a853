"""The `reboot` command's meter side: checkpoint first, then reset. On the unix port the
process exits with status 3; the totals saved before it are what the next boot finds."""
import json
import subprocess

from headend import ROOT
from headend.meter import firmware_env, micropython_path

SCRIPT = r"""
import sys
import unix_sim_3ph as board
from metering.engine import boot
from metering.store import Store
hw = board.build({"step": True, "profile": "fullscale", "seed": 2, "state": sys.argv[1]})
m = boot(hw, board, Store(hw.fs), {"rt_s": 0})
for _ in range(120):
    hw.clock.advance(1000000); m.cycle(); m.poll()
print("WH", m.wh(0))
m.reboot()
print("not reached")
"""
AFTER = r"""
import sys
import unix_sim_3ph as board
from metering.engine import boot
from metering.store import Store
hw = board.build({"step": True, "profile": "fullscale", "seed": 2, "state": sys.argv[1]})
m = boot(hw, board, Store(hw.fs), {"rt_s": 0})
print("WH", m.wh(0))
"""


def run(tmp_path, name, code, *args):
    p = tmp_path / name
    p.write_text(code)
    return subprocess.run([micropython_path(), "-X", "heapsize=1m", str(p), *args],
                          env=firmware_env(), capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_reboot_checkpoints_then_exits(tmp_path):
    img = str(tmp_path / "flash.img")
    r = run(tmp_path, "a.py", SCRIPT, img)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "not reached" not in r.stdout
    before = int(r.stdout.split("WH")[1].split()[0])
    assert before > 0
    # a new process (the chips are simulated in-process, so they restart from zero: the
    # meter books on from the checkpoint, which must hold everything counted so far)
    r = run(tmp_path, "b.py", AFTER, img)
    assert r.returncode == 0, r.stderr
    after = int(r.stdout.split("WH")[1].split()[0])
    assert after == before
