"""A full metering cycle (cycle + poll) in steady state allocates nothing: it runs with
the heap locked on the micropython binary, the real driver talking to simulated chips.
Guards against regressions such as a generator capturing `self` (a heap cell on every
call) or a tuple returned on the tariff lookup."""
import json
import os
import subprocess

from headend import ROOT
from headend.meter import firmware_env, micropython_path

SCRIPT = r"""
import gc, json, micropython
import unix_sim_3ph as board
from metering.engine import boot
hw = board.build({"step": True, "profile": "household", "seed": 5})
m = boot(hw, board, None, {"rt_s": 0, "interval_s": 3600})
c = hw.clock
for _ in range(5):
    c.advance(1000000); m.cycle(); m.poll()
locked = 0
errors = []
for i in range(600):                 # 10 simulated minutes, inside one interval
    c.advance(1000000)               # the simulated chips integrate (allocating) here
    micropython.heap_lock()
    try:
        m.cycle()
        m.poll()
        locked += 1
    except MemoryError as e:
        errors.append(i)
    finally:
        micropython.heap_unlock()
print(json.dumps({"locked": locked, "errors": errors[:5], "valid": m.valid}))
"""


def test_cycle_and_poll_run_with_the_heap_locked(tmp_path):
    p = tmp_path / "steady.py"
    p.write_text(SCRIPT)
    r = subprocess.run([micropython_path(), "-X", "heapsize=1m", str(p)], env=firmware_env(),
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["valid"] == 0b111
    assert out["errors"] == [] and out["locked"] == 600, out
