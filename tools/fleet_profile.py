"""Profile one step of the fleet bench: where the load generator's, the ingest's and the
broker's CPU goes per message (docs/benchmarks.md, fleet).

    flock /work/team/heavy.lock .venv/bin/python tools/fleet_profile.py 3800000 var/prof

runs `lipari loadtest` with the fleet bench's options (10,000 meters, --skew-s 450, 1 %
live every 10 s) at one fleet size for 45 s; 10 s after the clock starts it samples the
load generator and each ingest worker with py-spy for 20 s (raw stacks in OUT/<name>.txt,
`python tools/fleet_profile.py --top OUT/loadgen.txt` sums them) and writes OUT/prof.json:
CPU seconds of each process over those 20 s divided by the messages sent (records, live
readings, status) and committed, the load generator's garbage-collection time, and its
event loop's lag (how late a 10 ms sleep wakes up).
"""
import asyncio
import collections
import gc
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PYSPY = os.path.join(os.path.dirname(sys.executable), "py-spy")
SAMPLE_AFTER_S, SAMPLE_S = 10.0, 20


def _cpu_s(pid):
    x = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK")


class GcClock:
    """CPU time the main thread spends in garbage collection, per generation."""

    def __init__(self):
        self.s = [0.0, 0.0, 0.0]
        self.n = [0, 0, 0]
        self._t = None
        gc.callbacks.append(self._cb)

    def _cb(self, phase, info):
        if threading.current_thread() is not threading.main_thread():
            return
        if phase == "start":
            self._t = time.process_time()
        elif self._t is not None:
            g = info["generation"]
            self.s[g] += time.process_time() - self._t
            self.n[g] += 1


def profile(fleet, out, duration_s=45.0):
    from headend import loadtest
    os.makedirs(out, exist_ok=True)
    a = loadtest.parser().parse_args([
        "--meters", "10000", "--fleet", str(fleet), "--duration", str(duration_s),
        "--skew-s", "450", "--rt-share", "0.01", "--rt-s", "10", "--interval-s", "900",
        "--drain-s", "60", "--connect-timeout-s", "300", "--out", out, "-q", "--no-plot"])
    loadtest.raise_fd_limit(a.meters + 1000)
    loadtest.prepare(a)
    r = loadtest.Run(a, log=lambda s: print(s, file=sys.stderr))
    gcc = GcClock()
    lags = []
    res = {}

    async def lag_monitor():
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - t - 0.01)

    def counts():
        tot = r.fleet.totals()
        com = loadtest.read_commits([r.workers.log_path(k) for k in range(1, a.workers + 1)], {})
        return tot, [sum(c[i] for c in com) for i in range(2, 6)]

    def sample():
        while not hasattr(r, "t_clock"):
            time.sleep(0.2)
        time.sleep(SAMPLE_AFTER_S)
        pids = {"loadgen": os.getpid(), "broker": r.broker.pid()}
        for k, p in enumerate(r.workers.pids(), 1):
            pids["ingest%d" % k] = p
        c0, g0, (tot0, com0), t0 = ({k: _cpu_s(p) for k, p in pids.items()}, sum(gcc.s),
                                     counts(), time.time())
        spies = [subprocess.Popen([PYSPY, "record", "--pid", str(p), "-d", str(SAMPLE_S),
                                   "-r", "200", "--nonblocking", "-f", "raw",
                                   "-o", os.path.join(out, k + ".txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for k, p in pids.items() if k != "broker"]
        for s in spies:
            s.wait()
        c1, g1, (tot1, com1), t1 = ({k: _cpu_s(p) for k, p in pids.items()}, sum(gcc.s),
                                     counts(), time.time())
        sent = sum(tot1.get(k, 0) - tot0.get(k, 0)
                   for k in ("sent_interval", "sent_event", "rt_sent", "status_sent"))
        got = [b - x for b, x in zip(com1, com0)]
        ingest_s = sum(c1[k] - c0[k] for k in c0 if k.startswith("ingest"))
        dt = t1 - t0
        res.update({
            "window_s": round(dt, 1),
            "cpu_pct": {k: round((c1[k] - c0[k]) / dt * 100, 1) for k in c0},
            "messages_sent_per_s": round(sent / dt, 1),
            "messages_ingested_per_s": round(sum(got) / dt, 1),
            "committed_stored_dup_rt_other": got,
            "loadgen_us_per_msg": round((c1["loadgen"] - c0["loadgen"]) / max(1, sent) * 1e6, 1),
            "ingest_us_per_msg": round(ingest_s / max(1, sum(got)) * 1e6, 1),
            "broker_us_per_msg": round((c1["broker"] - c0["broker"]) / max(1, sent) * 1e6, 1),
            "loadgen_gc_s": round(g1 - g0, 2)})

    r.on_ready = lambda run: asyncio.ensure_future(lag_monitor())
    threading.Thread(target=sample, daemon=True).start()
    try:
        rep = loadtest.run_main(r)
    finally:
        r.cleanup()
    lg = sorted(lags) or [0.0]
    res.update({"loop_lag_ms": {"p50": round(lg[len(lg) // 2] * 1000, 1),
                                "p99": round(lg[int(len(lg) * 0.99)] * 1000, 1),
                                "max": round(lg[-1] * 1000, 1)},
                "loadgen_gc_s_by_generation": [round(x, 2) for x in gcc.s],
                "offered_records_per_s": rep["offered_records_per_s"],
                "committed_records_per_s": rep["committed_records_per_s"],
                "p99_ms": rep["latency_ms"]["p99"], "records_lost": rep["records_lost"]})
    with open(os.path.join(out, "prof.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def top(path, n=30):
    """Self and inclusive shares of the frames in a py-spy raw file."""
    own, incl, total = collections.Counter(), collections.Counter(), 0
    for line in open(path):
        stack, _, k = line.rstrip().rpartition(" ")
        k = int(k)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    lines = ["samples %d" % total, "-- self"]
    lines += ["%5.1f%% %s" % (100 * c / total, f) for f, c in own.most_common(n)]
    lines += ["-- inclusive"] + ["%5.1f%% %s" % (100 * c / total, f)
                                 for f, c in incl.most_common(n)]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--top"]:
        print(top(sys.argv[2]))
    else:
        print(json.dumps(profile(float(sys.argv[1]), sys.argv[2]), indent=1))
