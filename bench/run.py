"""`make bench`: measure what the issues name and write bench/results.json.

Every figure is measured in this run; nothing is typed in and nothing is carried over
from an earlier run: results.json is written fresh by a full run. A measurement that
fails writes null to every key it produces, with its error under `errors`, and the run
exits non-zero. Counts (frames, bytes, allocations) are preferred over times: this
machine is shared and noisy.

Each area keeps its measurements in its own module (bench/*_bench.py), as a list
MEASUREMENTS of (name, function, keys): the function returns a dict with those keys.

    python bench/run.py                 every measurement -> bench/results.json
    python bench/run.py NAME ...        only those -> bench/out/partial.json (results.json
                                        is left alone: it is always one whole run)
    python bench/run.py --list          the measurement names
    python bench/run.py --jobs 2        every measurement, in two lanes at once ->
                                        bench/results.json (`make bench JOBS=2`)

Two lanes: the measurements whose figures are rates or timings (ALONE_FIRST: records/s,
requests/s, stalls) run first, one after another with nothing beside them; then the long
simulations whose figures are counts (SIDE_LANE: a heap size, ppm of energy) run in one
process while the rest run one after another in the other; last, alone again, the
wall-time figures of whole simulated days (ALONE_LAST). One run, one results.json, with
the order recorded under `alone_first`, `lanes` and `alone_last`.
"""
import importlib
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402,F401  (sys.path for the modules below)

# One module per area; each is imported here, an import failure is a failed measurement.
MODULES = [
    "core_bench",       # issue 2: driver frames, allocation, heap, energy error
    "comm_bench",       # issue 3: record sizes, metering stall, chaos run
    "headend_bench",    # issues 4, 11: ingest vs broker, ingest workers scaling
    "fleet_bench",      # issue 11: the fleet load test (lipari loadtest)
    "web_bench",        # issue 10: web requests per second
    "ota_bench",        # issue 9: OTA verify time and work, heap, download stall, wire overhead
    "runner_bench",     # issue 7: bridge client heap, a simulated day in-process vs bridged
    "fw_bench",         # issue 7: the firmware's RAM and flash on the 32-bit frozen build
    "fuzz_bench",       # issue 10: fuzz cases over decoder, commands, MQTT parser, driver, API
]


def measurements():
    out, broken = [], {}
    for mod in MODULES:
        try:
            out += importlib.import_module(mod).MEASUREMENTS
        except Exception as e:  # reported as a failed measurement, not skipped silently
            traceback.print_exc()
            broken[mod] = "%s: %s" % (type(e).__name__, e)
    return out, broken


def run(only=()):
    ms, errors = measurements()
    names = [m[0] for m in ms]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SystemExit("unknown measurement(s): %s; known: %s" % (", ".join(unknown), ", ".join(names)))
    results = {}
    for name, fn, keys in ms:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        try:
            value = fn()
            missing = [k for k in keys if k not in value]
            if missing:
                raise RuntimeError("measurement returned no %s" % ", ".join(missing))
        except Exception as e:  # a failed measurement is reported, not invented
            traceback.print_exc()
            errors[name] = "%s: %s" % (type(e).__name__, e)
            value = dict.fromkeys(keys)
        results.update(value)
        print("%-24s %7.1f s  %s" % (name, time.monotonic() - t0, json.dumps(value)), flush=True)
    results["errors"] = errors
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


# The long count-based measurements (tens of minutes of one micropython process each).
SIDE_LANE = ("min_heap_kib", "energy")
# Rates and timings (records/s, requests/s, a stall, a time-out-driven resend): measured
# first, alone on the machine, before the two lanes start.
ALONE_FIRST = ("max_metering_stall_ms", "ingest", "workers", "fleet", "fleet_aligned",
               "web_requests", "ota_download")
# Wall-time figures of whole simulated days (a ratio of wall times, a boot's milliseconds):
# run last, alone, once both lanes are done: a timing must not share the machine.
ALONE_LAST = ("day_wall", "boot_to_first_record_ms")


def _start_lane(lane, i, d):
    import subprocess
    out = os.path.join(d, "lane%d.json" % i)
    env = dict(os.environ, BENCH_OUT=os.path.join(HERE, "out", "lane%d" % min(i, 1)))
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--out", out] + lane,
                            env=env), out, lane


def _finish_lane(started):
    """Wait for a lane and read its results; a lane that died leaves null under every key
    of its measurements and says so in errors."""
    p, out, lane = started
    p.wait()
    try:
        with open(out) as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        r = {k: None for name, _, keys in measurements()[0] if name in lane for k in keys}
        r["errors"] = {"lane %s" % ",".join(lane): "%s: %s" % (type(e).__name__, e)}
    r.pop("measured_at", None)
    return r


def run_lanes(names=None, side=SIDE_LANE, alone=ALONE_FIRST, alone_last=ALONE_LAST):
    """Every measurement (or `names`): the `alone` ones first, one after another with
    nothing beside them (their figures are rates); then the `side` ones in a second
    process at the same time as the rest; then the `alone_last` ones, alone again."""
    import tempfile
    names = names or [m[0] for m in measurements()[0]]
    first = [n for n in names if n in alone]
    last = [n for n in names if n in alone_last and n not in alone]
    lanes = [[n for n in names if n not in side and n not in alone and n not in last],
             [n for n in names if n in side]]
    parts = []
    with tempfile.TemporaryDirectory() as d:
        if first:
            parts.append(_finish_lane(_start_lane(first, 2, d)))
        started = [_start_lane(lane, i, d) for i, lane in enumerate(lanes) if lane]
        parts += [_finish_lane(s) for s in started]
        if last:
            parts.append(_finish_lane(_start_lane(last, 3, d)))
    results, errors = {}, {}
    for r in parts:
        errors.update(r.pop("errors", {}))
        results.update(r)
    results["errors"] = errors
    results["alone_first"] = first
    results["lanes"] = lanes
    results["alone_last"] = last
    results["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--list"]:
        print("\n".join(m[0] for m in measurements()[0]))
        return 0
    out = None
    if argv[:1] == ["--out"]:               # a lane of run_lanes (or a partial run)
        out, argv = argv[1], argv[2:]
    if argv[:1] == ["--jobs"]:
        jobs, argv = argv[1], argv[2:]
        if jobs not in ("1", "2") or argv:
            raise SystemExit("--jobs takes 1 or 2 and no measurement names")
        results = run_lanes() if jobs == "2" else run(set())
    else:
        results = run(set(argv))
    if out:
        path = out
    elif argv:
        os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
        path = os.path.join(HERE, "out", "partial.json")
    else:
        path = os.path.join(HERE, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    print("wrote", path)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    import signal
    # SIGTERM / SIGHUP stop the bench like Ctrl-C: a measurement's subprocess.run kills
    # its child, its finally blocks stop what it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    sys.exit(main())
