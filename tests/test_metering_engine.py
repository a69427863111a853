# Engine on synthetic snapshot bytes (tests/metering_harness.FakeGroup), run on the real
# micropython binary: allocation, counter wraps, MCU reset reconciliation, faults, events.
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP = os.path.join(ROOT, ".venv", "bin", "micropython")
for _p in (os.path.join(ROOT, "firmware"), os.path.join(ROOT, "boards"), ROOT,
           os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def run_mp(code, timeout=60):
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join([".frozen", os.path.join(ROOT, "firmware"), os.path.join(ROOT, "boards"),
                                   ROOT, os.path.join(ROOT, "tests")])
    r = subprocess.run([MP, "-c", "import metering_harness as h\n" + code], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=ROOT)
    out = [l[7:] for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and out, r.stdout[-2000:] + r.stderr[-2000:]
    return [json.loads(o) for o in out]


def test_cycle_allocates_nothing():
    (r,) = run_mp("h.dump(h.alloc_cycle(n=60))")
    assert r["locked_ok"] == 30          # cycle() ran under heap_lock 30 times
    assert r["worst_bytes"] == 0


@pytest.mark.parametrize("board", ["stm32_stpm34_33_ct", "pico_stpm32_shunt"])
def test_wraps_exact(board):
    (r,) = run_mp("h.dump(h.wrap_run(%r, seconds=3600))" % board)
    assert r["wraps"] >= 30
    for ph in r["err"]:
        for e in ph:
            assert abs(e) < 1e-6, r["err"]     # firmware share of the error: < 0.0001 %


def test_wrap_long_read_interval():
    # read every 1.9 s with counters moving ~0.8e9 counts per read: still exact
    (r,) = run_mp("h.dump(h.wrap_run(seconds=600, read_ms=1000, v=1000.0, i=250.0))")
    for ph in r["err"]:
        for e in ph:
            assert abs(e) < 1e-6


def test_chip_fault_marks_phase_invalid_and_events():
    (r,) = run_mp("h.dump(h.fault_run())")
    assert r["valid_during"] == 0b011    # phase 3's chip silent: invalid, not zero+valid
    assert r["v_during"][2] == 0
    assert 3 in r["rt_valid"] and r["rt_valid"][-1] == 7
    assert r["iv_flags"][0] & 4 and r["iv_invalid"][0] == 4
    assert ["chip_error", 3, 1] in r["events"] and ["chip_error", 3, 0] in r["events"]
    # energy during the gap is recovered from the counters
    for ph in r["err"]:
        assert abs(ph[0]) < 1e-6
    assert ["sag", 1, 149992] in r["events"]
    assert any(e[0] == "swell" and e[1] == 1 for e in r["events"])
    assert r["sags"][1] == [1, 0, 0] and r["swells"][1] == [1, 0, 0]
    assert r["vmin"][1][0] == 149992


def test_cycle_under_cpython_matches():
    # the same engine under CPython gives the same registers (portability check)
    import metering_harness as h
    r = h.wrap_run(seconds=300)
    (m,) = run_mp("h.dump(h.wrap_run(seconds=300))")
    for a, b in zip(r["fw"], m["fw"]):
        assert a == pytest.approx(b, rel=1e-12)


def test_tariff_rules_and_unsynced():
    from metering.tariff import Tariff, eu_dst
    from util import days_from_civil
    t = Tariff({"registers": 3, "default": 0, "unsynced": 2, "tz_s": 3600, "dst": "eu",
                "holidays": ["12-25"], "rules": [["mon-fri", 7, 22, 1], ["sat", 22, 6, 1]]})
    thu10 = days_from_civil(2026, 11, 26) * 86400 + 10 * 3600
    assert t.index(thu10) == 1 and t.index(thu10, synced=False) == 2
    assert t.index(days_from_civil(2026, 12, 25) * 86400 + 10 * 3600) == 0   # holiday
    wed = days_from_civil(2026, 7, 1) * 86400 + 5 * 3600 + 1800   # 07:30 CEST
    assert eu_dst(wed) and t.index(wed) == 1 and t.index(wed - 3600) == 0
    assert not eu_dst(days_from_civil(2026, 3, 29) * 86400 + 3599)
    assert eu_dst(days_from_civil(2026, 3, 29) * 86400 + 3600)
    (r,) = run_mp("from metering.tariff import Tariff\n"
                  "t = Tariff({'registers': 3, 'default': 0, 'unsynced': 2, 'tz_s': 3600,"
                  " 'dst': 'eu', 'holidays': ['12-25'], 'rules': [['mon-fri', 7, 22, 1],"
                  " ['sat', 22, 6, 1]]})\nh.dump(list(t.table))")
    assert r == list(t.table)


def test_tariff_bad_config_says_what_to_do():
    from metering.tariff import Tariff, TariffError
    with pytest.raises(TariffError, match="mon-fri"):
        Tariff({"registers": 2, "rules": [["weekdays", 7, 22, 1]]})
    with pytest.raises(TariffError, match="register"):
        Tariff({"registers": 2, "rules": [["mon", 7, 22, 5]]})


def test_unsynced_clock_then_sync_books_tariffs_and_flags():
    (r,) = run_mp("h.dump(h.tariff_run())")
    # 20 min at 6.9 kW before the sync: all of it in the 'unsynced' register
    assert 2290 <= r["unsynced_wh"] <= 2310
    t = r["tariff_wh"]
    assert 0 <= t[2] - r["unsynced_wh"] <= 3     # + the read in flight at the sync (1.9 Wh)
    assert 1150 - 5 <= t[0] <= 1150 + 5            # 06:50..07:00 local: off-peak, 10 min
    assert 2300 - 5 <= t[1] <= 2300 + 5            # 07:00..07:20: peak, 20 min
    assert abs(sum(t) - r["ai_wh"]) <= 3
    unsynced = [f for f, te in zip(r["flags"], r["t_end"]) if te < 1700000000]
    synced = [f for f, te in zip(r["flags"], r["t_end"]) if te >= 1700000000]
    assert unsynced and all(f & 1 for f in unsynced)
    assert synced[0] & 2 and not synced[0] & 1    # partial after the clock was set
    assert all(f == 0 for f in synced[1:-1])
    assert all(te % 300 == 0 for te in r["t_end"][1:-1])
    assert any(k == "clock_set" for k, v in r["events"])
