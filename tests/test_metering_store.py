# Checkpoint store on littlefs over sim/flash.py, on the real micropython binary: power is
# cut at every program/erase operation of 20 consecutive checkpoints in turn.
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP = os.path.join(ROOT, ".venv", "bin", "micropython")
sys.path[:0] = [os.path.join(ROOT, "firmware"), ROOT, os.path.join(ROOT, "tests")]


def run_mp(code, timeout=60):
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join([".frozen", os.path.join(ROOT, "firmware"), os.path.join(ROOT, "boards"),
                                   ROOT, os.path.join(ROOT, "tests")])
    r = subprocess.run([MP, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=ROOT)
    out = [l[7:] for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and out, r.stdout[-2000:] + r.stderr[-2000:]
    return [json.loads(o) for o in out]


@pytest.mark.parametrize("prepared", [True, False])
@pytest.mark.parametrize("tear", ["half", "none"])
def test_powercut_at_every_write(tear, prepared):
    (res,) = run_mp("import metering_harness as h\n"
                    "h.dump(h.store_powercut(saves=30, tear=%r, prepared=%r))"
                    % (tear, prepared))
    assert res["bad"] == []
    # every program and every erase of the store's life, from its first file creation
    # on, was cut once, in order (op k is cut in run k: nothing is skipped)
    assert res["cuts"] == res["ops"] and res["cut_ops"] == list(range(1, res["ops"] + 1))
    assert res["ops"] >= 60                            # 30 saves were exercised
    assert res["cut_kinds"]["program"] > 0 and res["cut_kinds"]["erase"] > 0
    # a cut never leaves an older record than the last completed save
    assert set(res["outcomes"]) <= {"0", "1"}


def test_wear_per_save():
    (res,) = run_mp("import metering_harness as h\nh.dump(h.store_wear(saves=100))")
    assert res["erases_per_save"] <= 2
    assert res["programs_per_save"] <= 10


def test_store_roundtrip_and_corruption(tmp_path):
    from metering.store import Store
    st = Store(str(tmp_path))
    assert st.load() is None
    st.save(b"one")
    st.save(b"two")
    assert Store(str(tmp_path)).load() == b"two"
    # corrupt the newest slot: the older one must win, never garbage
    newest = Store(str(tmp_path))
    newest.load()
    path = newest.paths[newest._good]
    raw = bytearray(open(path, "rb").read())
    raw[14] ^= 0x40
    open(path, "wb").write(raw)
    st2 = Store(str(tmp_path))
    assert st2.load() == b"one"
    st2.save(b"three")           # must overwrite the corrupt slot, not the good one
    assert Store(str(tmp_path)).load() == b"three"
    os.remove(st2.paths[st2._good])
    assert Store(str(tmp_path)).load() == b"one"
