"""Energy against the load's own integral (sim/loads.energy_wh: no chip model, no
conversion shared with the firmware), on sensor-error-free simulated chips: every
register exact when the load switches between import and export and through all four
reactive quadrants at instants that fall inside reads (the firmware splits such a read
at the step, firmware/metering/energy.py _split)."""
import json
import subprocess

from headend import ROOT
from headend.meter import firmware_env, micropython_path

SCRIPT = r"""
import json
from metering_harness import run_reference
from sim.loads import Quadrants
out = {}
# steps of 3..40 s at random power and angle: at most one change per 1 s read
out["slow"] = run_reference(1500, profile="quadrants", seed=11)["per_phase"]
# steps of 0.3..5 s read every 250 ms: the same holds at a faster read
out["fast"] = run_reference(600, profile=Quadrants(min_s=0.3, max_s=5.0, seed=12),
                            seed=12, read_ms=250)["per_phase"]
print(json.dumps(out))
"""

KINDS = ("ai", "ae", "rq1", "rq2", "rq3", "rq4", "ap")


def test_every_register_against_the_loads_own_integral(tmp_path):
    p = tmp_path / "quad.py"
    p.write_text(SCRIPT)
    env = firmware_env()
    env["MICROPYPATH"] += ":" + ROOT + "/tests"
    r = subprocess.run([micropython_path(), "-X", "heapsize=16m", str(p)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for run in ("slow", "fast"):
        for ph in out[run]:
            for k in KINDS:
                f, e = ph["regs"][k]
                # export and every quadrant carry energy on every phase: a real test
                assert e > 5.0, (run, ph["phase"], k, e)
                assert abs(f - e) / e < 1e-6, (run, ph["phase"], k, f, e)
