"""The suite's own rules (issue 8, "Figures and tests you can trust"): under CI a skipped
test is a failure (tests/conftest.py), and a bench measurement that fails writes null to
every key it produces and makes the run fail (bench/run.py). Both in a few seconds."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SKIPPING = '''
import pytest

def test_runs():
    assert 1 + 1 == 2

def test_skips():
    pytest.skip("no such tool here")
'''
COLLECT_SKIP = '''
import pytest
pytest.importorskip("no_such_module_lipari")

def test_never():
    pass
'''


def _pytest(d, ci):
    env = dict(os.environ)
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--continue-on-collection-errors", "test_a.py", "test_b.py"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=str(d))
    return p.returncode, p.stdout + p.stderr


def test_a_skip_fails_under_ci_and_only_there(tmp_path):
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_a.py").write_text(SKIPPING)       # a skip inside a test
    (tmp_path / "test_b.py").write_text(COLLECT_SKIP)   # a skip of a whole module
    rc, out = _pytest(tmp_path, "0")                    # CI=0 means no CI
    assert rc == 0 and "1 passed, 2 skipped" in out, out
    rc, out = _pytest(tmp_path, "true")
    assert rc != 0 and out.count("skipped under CI") >= 2, out
    assert "no such tool here" in out and "no_such_module_lipari" in out, out
    assert "1 failed, 1 passed" in out and "1 error" in out, out


def test_a_failed_bench_measurement_nulls_every_key(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.pop(0)

    def good():
        return {"a_count": 3}

    def bad():
        raise RuntimeError("broker did not start")

    def short():
        return {"c_one": 1}                            # forgot c_two: also a failure

    monkeypatch.setattr(bench_run, "measurements", lambda: (
        [("good", good, ["a_count"]), ("bad", bad, ["b_x", "b_y"]),
         ("short", short, ["c_one", "c_two"])], {}))
    r = bench_run.run()
    assert r["a_count"] == 3
    assert r["b_x"] is None and r["b_y"] is None
    assert r["c_one"] is None and r["c_two"] is None  # nothing half-measured survives
    assert "broker did not start" in r["errors"]["bad"] and "c_two" in r["errors"]["short"]
    assert set(r) == {"a_count", "b_x", "b_y", "c_one", "c_two", "errors", "measured_at"}


def test_a_bench_lane_that_dies_nulls_its_keys(monkeypatch):
    """`make bench JOBS=2`: a lane process that ends without its results (killed, crashed)
    leaves null under every key of its measurements and says so in errors."""
    import subprocess
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.pop(0)
    real = subprocess.Popen

    def popen(argv, **kw):
        if "interval_record_bytes" in argv:              # this lane dies at once
            argv = [sys.executable, "-c", "raise SystemExit(1)"]
        return real(argv, **kw)
    monkeypatch.setattr(subprocess, "Popen", popen)
    r = bench_run.run_lanes(["interval_record_bytes", "json_interval_record_bytes"],
                            side=("interval_record_bytes",))
    assert r["json_interval_record_bytes"] > 0               # the other lane measured
    assert "interval_record_bytes" in r and r["interval_record_bytes"] is None
    assert list(r["errors"]) == ["lane interval_record_bytes"], r["errors"]
    assert r["lanes"] == [["json_interval_record_bytes"], ["interval_record_bytes"]]


def test_bench_rates_are_measured_alone_before_the_lanes(monkeypatch):
    """`make bench JOBS=2`: the rate measurements (ALONE_FIRST) run first, and finish,
    before the two lanes start; the wall-time ones (ALONE_LAST) run after both lanes
    ended; every figure reaches results.json once."""
    import subprocess
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.pop(0)
    real = subprocess.Popen
    started = []        # (measurement names, whether every earlier lane had ended)

    def popen(argv, **kw):
        ended = all(p.poll() is not None for _, _, p in started)
        p = real(argv, **kw)
        started.append((list(argv[4:]), ended, p))
        return p
    monkeypatch.setattr(subprocess, "Popen", popen)
    names = ["interval_record_bytes", "json_interval_record_bytes", "interval_record_bytes_usual",
             "interval_record_wire_bytes"]
    r = bench_run.run_lanes(names, side=("interval_record_bytes",),
                            alone=("interval_record_bytes_usual",),
                            alone_last=("interval_record_wire_bytes",))
    assert [a for a, _, _ in started] == [["interval_record_bytes_usual"],
                                          ["json_interval_record_bytes"],
                                          ["interval_record_bytes"],
                                          ["interval_record_wire_bytes"]]
    assert started[1][1]                # the first had ended before the lanes began
    assert not started[2][1]            # the two lanes run at once
    assert started[3][1]                # the wall-time ones last, after both lanes ended
    assert r["alone_first"] == ["interval_record_bytes_usual"]
    assert r["lanes"] == [["json_interval_record_bytes"], ["interval_record_bytes"]]
    assert r["alone_last"] == ["interval_record_wire_bytes"]
    assert r["errors"] == {}
    assert r["interval_record_bytes"] > 0 and r["json_interval_record_bytes"] > 0
    assert r["interval_record_bytes_usual"] > 0 and r["interval_record_wire_bytes"] > 0


def test_the_smallest_heap_search_finds_the_threshold_from_any_guess():
    """bench/benchlib.smallest_passing (min_heap_kib starts at the last run's figure): the
    answer is the smallest passing multiple of the step, whatever the guess; a right guess
    costs two tries; nothing that runs at the cap is an error."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from benchlib import smallest_passing
    finally:
        sys.path.pop(0)
    for threshold in (8, 9, 16, 100, 264, 265, 1000, 1024):
        for guess in (0, 8, 100, 256, 264, 272, 512, 1024, 5000):
            tries = []

            def runs(kib):
                tries.append(kib)
                return kib >= threshold
            want = -(-threshold // 8) * 8
            assert smallest_passing(runs, guess, 8, 1024) == want, (threshold, guess, tries)
            assert len(set(tries)) == len(tries), tries       # no size tried twice
    tries = []
    assert smallest_passing(lambda k: tries.append(k) or k >= 264, 264, 8, 1024) == 264
    assert tries == [264, 256]
    with pytest.raises(RuntimeError):
        smallest_passing(lambda k: False, 256, 8, 1024)
