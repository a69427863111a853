"""`make bench`: measure what the issues name and write bench/results.json.

Every figure is measured in this run; a measurement that fails is written as null with
the error next to it, never as a typed-in number. Counts (frames, bytes, allocations)
are preferred over times: this machine is shared and noisy.
"""
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

from headend.meter import firmware_env, micropython_path  # noqa: E402

MP_SCRIPTS = os.path.join(HERE, "mp")


def run_mp(script, *args, heap="1m", timeout=900, env=None):
    """Run a bench script on the micropython binary; it prints one JSON object last."""
    argv = [micropython_path(), "-X", "heapsize=%s" % heap, os.path.join(MP_SCRIPTS, script)]
    argv += [str(a) for a in args]
    if env is None:
        env = firmware_env()
        env["MICROPYPATH"] += ":" + os.path.join(ROOT, "tests")
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        raise RuntimeError("%s failed (exit %d): %s" % (script, r.returncode, (r.stderr or r.stdout)[-800:]))
    return json.loads(lines[-1])


def core_figures():
    """Issue 2: driver frames, heap-locked acquire, allocation per cycle."""
    out = run_mp("acquire.py")
    return {k: out[k] for k in ("spi_frames_per_snapshot", "snapshot_rows", "acquire_heap_locked",
                                "cycle_alloc_bytes")}


def compiled_tree():
    from headend.meter import compiled_tree as tree
    return tree(os.path.join(HERE, "out"))


def min_heap_kib():
    """Smallest -X heapsize (KiB, 8 KiB steps) at which the virtual meter runs one
    simulated day: main.py must finish the day and print its closing summary; a
    MemoryError (or any other exit, or no end within 20 minutes: a heap so tight that
    the GC thrashes) fails the size.

    The firmware runs compiled (.mpy) as on a board; the simulated hardware shares the
    heap (docs/decisions/0002), its own share is sim_heap_kib. Halve from 512 KiB until
    a size fails, then bisect."""
    main_py, env = compiled_tree()

    def runs(kib):
        argv = [micropython_path(), "-X", "heapsize=%dk" % kib, main_py,
                "--board", "unix_sim_3ph", "--profile", "household", "--step", "--days", "1",
                "--print", "summary"]
        try:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return False
        ok = r.returncode == 0 and '"type": "summary"' in r.stdout
        print("  heap %4d KiB: %s" % (kib, "runs a day" if ok else "fails"), flush=True)
        return ok
    hi = 512
    if not runs(hi):
        raise RuntimeError("the virtual meter does not run a day even with %d KiB" % hi)
    lo = hi // 2
    while runs(lo):
        hi, lo = lo, lo // 2
        if lo < 8:
            return hi
    while hi - lo > 8:
        mid = (lo + hi) // 2 // 8 * 8
        if runs(mid):
            hi = mid
        else:
            lo = mid
    return hi


def energy_error_ppm():
    out = run_mp("energy.py", heap="2m", timeout=1800)
    return out


def sim_heap_kib():
    return run_mp("simheap.py", env=compiled_tree()[1])["sim_heap_kib"]


def ingest():
    """Issue 4: interval records into SQLite through the real broker vs the broker alone."""
    from headend_harness import bench_ingest
    # Five rounds, each measuring the broker alone and then the ingest through the same
    # broker; the round with the median ratio is reported (a shared machine moves single
    # rounds by +-0.07), with the spread. Losses count over every round.
    rounds = [bench_ingest(n=20000, meters=50, broker="auto") for _ in range(5)]
    rounds.sort(key=lambda r: r["ingest_vs_broker_ratio"])
    r = rounds[len(rounds) // 2]
    out = {k: r[k] for k in ("ingest_records_per_s", "broker_records_per_s", "ingest_vs_broker_ratio")}
    out["ingest_lost"] = sum(x["ingest_lost"] for x in rounds)
    out["ingest_vs_broker_ratio_range"] = [rounds[0]["ingest_vs_broker_ratio"],
                                           rounds[-1]["ingest_vs_broker_ratio"]]
    out["ingest_broker"] = r["broker"]
    return out


MEASUREMENTS = [
    ("core", core_figures),
    ("sim_heap_kib", sim_heap_kib),
    ("min_heap_kib", min_heap_kib),
    ("energy", energy_error_ppm),
    ("ingest", ingest),
]
try:  # issue 3's figures: record sizes, metering stall under faults, the chaos run
    from comm_bench import MEASUREMENTS as _COMM
    MEASUREMENTS += _COMM
except ImportError as _e:  # reported as a failed measurement, not skipped silently
    MEASUREMENTS.append(("comm", lambda: (_ for _ in ()).throw(_e)))


def main(argv=None):
    only = set((argv if argv is not None else sys.argv[1:]))
    path = os.path.join(HERE, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    errors = results.get("errors", {})
    for name, fn in MEASUREMENTS:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        try:
            value = fn()
            errors.pop(name, None)
        except Exception as e:  # a failed measurement is reported, not invented
            traceback.print_exc()
            value, errors[name] = None, "%s: %s" % (type(e).__name__, e)
        if isinstance(value, dict):
            results.update(value)
        else:
            results[name] = value
        print("%-16s %6.1f s  %s" % (name, time.monotonic() - t0, value if not isinstance(value, dict) else
                                     json.dumps(value)), flush=True)
    results["errors"] = errors
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    print("wrote", path)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
