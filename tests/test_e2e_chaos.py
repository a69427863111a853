"""Issue 3 end to end: three virtual meters (the real firmware on micropython, one per
transport: Wi-Fi, NB-IoT through the BG95 emulator, PLC through the concentrator bridge)
on a real Mosquitto with the repo's config and per-meter credentials, the head-end ingest
into SQLite, and a simulated 3 hours (60 s intervals, 240x real time) during which the
broker is killed and restarted, links drop and the modem misbehaves (tests/e2e_harness.py
has the fault plan). The database must hold every interval and event exactly once, in
order, with the meter's own energy figures."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import e2e_harness as h

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto"), reason="mosquitto not installed")


def test_chaos_three_transports_exactly_once(tmp_path):
    res = h.chaos_run(tmp_path, hours=3, speed=240, interval_s=60, log=lambda *a: None)
    report = json.dumps(res, indent=1, default=str)
    assert len(res["faults"]) == len(h.FAULTS), report
    assert res["failures"] == [], report
    # the broker was SIGKILLed while the ingest was stopped
    kinds = [(f[1], f[2].split()[0]) for f in res["faults"]]
    stop, start = kinds.index(("ingest", "stop")), kinds.index(("ingest", "start"))
    assert ("broker", "kill") in kinds[stop:start], report
    for mid, r in res["meters"].items():
        assert r["exit"] == 0, (mid, report)
        # 3 h of 60 s intervals (the first one partial): the meter really ran the day
        assert 170 <= r["produced"] <= 185, (mid, report)
        assert r["produced_contiguous"], (mid, report)
        assert r["lost"] == 0 and r["duplicated"] == 0, (mid, report)
        assert r["stored"] == r["produced"], (mid, report)
        assert r["seq_contiguous"] and r["time_ordered"], (mid, report)
        assert r["n_field_mismatches"] == 0, (mid, report)
        assert r["ai_monotonic"] and r["ai_wh_equal"] and r["ai_wh_meter"] > 0, (mid, report)
        assert r["events_produced"] >= 1 and r["events_lost"] == 0 and r["events_extra"] == 0, \
            (mid, report)
        assert r["unsent"] == 0, (mid, report)
        # the faults reached every meter. Not one drop per broker restart: a meter whose
        # link was already down (modem detached, PLC line cut) when the broker went
        # sees two outages as one, and on a loaded machine they overlap (CI saw 3)
        assert r["comm"]["connects"] >= 3 and r["comm"]["drops"] >= 2, (mid, report)
    assert res["records_lost"] == 0 and res["records_duplicated"] == 0, report
    assert res["proxy"]["resets"] >= 1 and res["proxy"]["refused"] >= 1, report


def test_run_failures_catch_early_exit_short_runs_and_unsent_records():
    """A run in which a meter died, stopped early or kept records is invalid, whatever its
    loss count says (the chaos bench raises on it too)."""
    ok = {"exit": 0, "produced": 179, "produced_contiguous": True, "unsent": 0, "other": []}
    res = {"meters": {"a": dict(ok), "b": dict(ok, exit=1), "c": dict(ok, produced=90),
                      "d": dict(ok, unsent=4), "e": dict(ok, unsent=None)}}
    bad = h.run_failures(res, hours=3, interval_s=60)
    assert len(bad) == 4 and not any(x.startswith("a ") for x in bad), bad
    assert h.run_failures({"meters": {"a": ok}}, 3, 60) == []


def test_checker_finds_loss_duplicates_and_wrong_energy(tmp_path):
    """check_meter itself: a missing row, a record re-sent under a new seq and a wrong
    energy figure are all reported (so the chaos test above can fail)."""
    from headend.store import Store

    class M:
        summary = {"ai_wh": 30, "unsent": 0}
        events = [{"seq": 1}]
        intervals = [{"seq": i, "t_end": 60 * i, "dur_s": 60, "flags": 0, "tariff": 1,
                      "ai_wh": 10 * i, "ae_wh": 0, "rq_varh": [0, 0, 0, 0], "ap_vah": 0,
                      "ai_ph_wh": [10 * i, 0, 0], "ae_ph_wh": [0, 0, 0], "pmax_w": 1,
                      "tariff_wh": [10 * i]} for i in (1, 2, 3)]
    db = str(tmp_path / "c.db")
    st = Store("sqlite:///" + db)
    st.add_interval("x", 1, M.intervals[0])
    st.add_interval("x", 3, dict(M.intervals[2], ai_wh=31))
    st.add_interval("x", 4, dict(M.intervals[2], seq=4))
    st.add_event("x", 1, {"seq": 1, "t": 0, "kind": "boot", "phase": 0, "value": 0})
    st.commit()
    st.close()
    r = h.check_meter(db, "x", M)
    assert r["lost"] == 1 and r["duplicated"] == 2 and not r["seq_contiguous"]
    assert r["n_field_mismatches"] == 1 and not r["ai_monotonic"]
    assert r["events_lost"] == 0
