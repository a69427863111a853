"""The paths that keep energy: the checkpoint and the interval record work with the rest
of the heap exhausted and with the heap locked (buffers and open files taken at boot),
and a failing save is never silent: counted, an event, retried with a bounded rate, the
interval record held until its totals are on flash. On the micropython binary."""
from metering_run import run_harness  # noqa: E402



def run_mp(code, heap="8M", timeout=400):
    return run_harness(code, heap, timeout)[-1]


def test_checkpoint_and_interval_close_need_no_heap():
    r = run_mp("h.dump(h.persist_under_pressure(saves=5))", heap="2M")
    assert r["exhausted"] == [True] * 5, r
    assert r["locked"] == [True] * 5, r
    # every interval closed under pressure reached the sink (10 closes)
    assert r["closed_exhausted"] == 5 and r["closed_locked"] == 5, r
    assert r["errors"] == 0 and r["sink_errors"] == 0
    # the last save holds the meter's registers and the last interval's sequence
    assert r["ckpt_iv_seq"] == r["iv_seq"]
    assert r["ai_sink"] <= r["ckpt_ai"] + 3 and r["ckpt_ai"] <= r["ai_meter"]


def test_failing_saves_are_counted_reported_retried_and_hold_the_record():
    r = run_mp("h.dump(h.ckpt_failure_run(broken_s=200, after_s=100))")
    evs = r["events"]
    errs = [[v, broken] for k, v, broken in evs if k == "ckpt_error"]
    assert errs == [[1, True], [0, False]], evs          # once when it stops, once back
    d = r["diag_during"]
    assert d["ckpt_errors"] >= 3 and d["ckpt_streak"] == d["ckpt_errors"]
    assert "ENOSPC" in d["ckpt_last_error"] or "28" in d["ckpt_last_error"]
    # bounded retries: 1, 2, 4, 8, 16, 30, 30, ... s apart over 200 s, not one per read
    assert 5 <= r["attempts"] <= 15, r["attempts"]
    assert r["diag_after"]["ckpt_streak"] == 0
    # a record waits at most 60 s for its checkpoint, then goes out anyway: every
    # interval was published once, in order
    seqs = [seq for seq, ai, broken in r["intervals"]]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 4, r["intervals"]
    assert r["saved_ai"] is not None
    assert sum(r["saved_ai"]) <= sum(r["ai_ph"])


def test_interval_record_waits_for_its_checkpoint():
    # saves fail for 50 s across an interval close: the record goes out only after a
    # save holds its totals (published totals never run ahead of the flash)
    r = run_mp("h.dump(h.ckpt_failure_run(broken_s=50, after_s=60))")
    ivs = r["intervals"]
    assert ivs and all(not broken for seq, ai, broken in ivs), ivs
    assert [k for k, v, b in r["events"] if k == "ckpt_error"] == ["ckpt_error"] * 2


def test_a_live_reading_without_memory_is_skipped_not_the_end_of_metering():
    """rt_record builds a new dict (live readings keep no energy); at an 80 KiB heap its
    MemoryError ended the metering task. With the heap locked it is skipped and counted
    (diag rt_skipped), and every cycle still runs."""
    r = run_mp(CODE_RT_SKIP, heap="2M")
    assert r["err"] is None, r
    assert r["cycles"] == 6 and r["skipped"] == 5 and r["diag"] == 5, r
    assert r["after"] == r["before"] + 1, r        # the first unlocked read sends again


CODE_RT_SKIP = """
import micropython
b = h._board("stm32_stpm34_33_ct")
m, g, c = h.fake_meter(b, cfg={"rt_s": 1})
h.fake_start(m)
for p in range(m.nph):
    g.set_load(p, 300, 60, 25 + 60 * p)
got = []
m.events.sinks.append(lambda k, r: got.append(k))
for _ in range(3):
    g.step(1000); m.cycle(); m.poll()
before = got.count("rt")
err = None
cycles0 = m.cycles
for _ in range(5):
    g.step(1000)
    micropython.heap_lock()
    try:
        m.cycle()
        m.poll()
    except Exception as e:
        err = e
    micropython.heap_unlock()
g.step(1000); m.cycle(); m.poll()
h.dump({"before": before, "after": got.count("rt"), "err": None if err is None else repr(err), "cycles": m.cycles - cycles0,
        "skipped": m.intervals.rt_skipped, "diag": m.counters()["diag"]["rt_skipped"]})
"""
