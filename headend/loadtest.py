"""`lipari loadtest`: a simulated fleet against the real head-end, measured end to end.

    lipari loadtest --meters 10000 --fleet 2000000 --duration 60 --out var/loadtest

starts Mosquitto (the repo's configuration, one password per meter), the ingest workers
(`lipari headend`) into SQLite or a throwaway PostgreSQL (--pg), and --meters simulated
meters (headend/loadtest_meter.py): each one real MQTT connection that speaks exactly what
the firmware speaks. It prints a progress line, then a table, and writes report.json and
report.png (throughput and latency over time, injected outages shaded) to --out.

Fleet size and connections. The protocol lets no two meters share a connection: the
client id, the user name the broker's ACL checks and the last will are the meter's own.
So every simulated meter is one connection, and a fleet larger than the connections
(--fleet) runs the meters' clocks faster: --fleet N with --meters C runs at speed N/C,
which makes the messages of N meters (intervals every 15 min, live readings every 10 s
for --rt-share of them). The report calls them meter-equivalents.

Latency is measured per record from the meter's own timestamp (t_end of an interval, t of
an event or reading, mapped to the wall clock through the meter's speed and skew) to the
commit of the database transaction that holds it (each worker's --commit-log).
"""
import argparse
import asyncio
import collections
import gc
import os
import random
import signal
import sys
import tempfile
import time

from headend.ingest import new_loop
from headend.loadtest_infra import Broker, InfraError, Postgres, Sampler, Workers, raise_fd_limit
from headend.loadtest_meter import (AckTimeouts, FleetTimers, Meter,  # noqa: F401
                                    SESSION_DEFAULTS)

FAULT_KINDS = ("broker", "net", "ingest", "burst", "brokerkill_ingest")


def parse_fault(text):
    """KIND@AT[:DUR] -> (at_s, kind, dur_s). Kinds: broker (SIGKILL, restart after DUR),
    net (every meter's link cut, no connection possible for DUR: a reconnect storm
    follows), ingest (workers stopped for DUR), burst (every meter raises a sag event, one
    in ten also power_fail + power_restore), brokerkill_ingest (workers stopped, the
    broker SIGKILLed DUR/3 later and restarted, workers back after DUR)."""
    try:
        kind, rest = text.split("@", 1)
        at, _, dur = rest.partition(":")
        kind = kind.strip()
        if kind not in FAULT_KINDS:
            raise ValueError
        return (float(at), kind, float(dur or 0))
    except ValueError:
        raise argparse.ArgumentTypeError("fault %r: use KIND@AT_S[:DUR_S] with KIND one of %s"
                                         % (text, ", ".join(FAULT_KINDS)))


class Fleet:
    def __init__(self, a, host, port, passwords):
        self.a = a
        self.host, self.port = host, port
        self.interval_s = a.interval_s
        self.speed = a.speed
        self.t0_wall = None                   # set when the clock starts
        self.t0_sim = int(time.time())
        self._net_down_until = 0.0
        self.up = 0
        self.stop_at = float("inf")
        self.ack_timeouts = AckTimeouts()   # every meter's PUBACK deadlines, one timer
        self.timers = FleetTimers()         # every meter's backlog pauses, one timer
        rng = random.Random(a.seed)
        n_rt = int(round(a.meters * a.rt_share))
        rt_set = set(rng.sample(range(a.meters), n_rt)) if n_rt else set()
        self.meters = []
        for i in range(a.meters):
            mid = meter_id(a.id_prefix, i)
            skew = rng.uniform(-a.skew_s, a.skew_s) if a.skew_s else 0.0
            self.meters.append(Meter(self, i, mid, passwords[mid], 3 if i % 4 == 0 else 1,
                                     i in rt_set, skew, a.seed * 1000003 + i))
        self.by_id = {m.id: m for m in self.meters}

    # -- clocks -------------------------------------------------------------------
    # The simulated clock is piecewise linear: a segment (wall start, sim start, speed)
    # per speed (one, or one per --ramp step).
    def start_clock(self, wall):
        self.t0_wall = wall
        self.segments = [(wall, float(self.t0_sim), self.speed)]
        self.clock_version = 0

    def set_speed(self, speed, wall=None):
        wall = time.time() if wall is None else wall
        sim = self.sim_at(wall)
        self.speed = speed
        self.segments.append((wall, sim, speed))
        self.clock_version += 1

    def sim_at(self, wall):
        w0, s0, sp = self.segments[-1]
        for seg in reversed(self.segments):
            if seg[0] <= wall:
                w0, s0, sp = seg
                break
        return s0 + (wall - w0) * sp

    def sim_now(self):
        if self.t0_wall is None:
            return self.t0_sim
        return self.sim_at(time.time())

    def wall_of(self, meter_t, skew):
        """Wall time at which a meter with this skew showed meter_t on its clock."""
        sim = meter_t - skew
        w0, s0, sp = self.segments[0]
        for seg in reversed(self.segments):
            if seg[1] <= sim:
                w0, s0, sp = seg
                break
        return w0 + (sim - s0) / sp

    def net_down(self):
        return time.monotonic() < self._net_down_until

    def connected(self, m):
        self.up += 1

    def disconnected(self, m):
        self.up -= 1

    # -- records ------------------------------------------------------------------
    async def schedule(self):
        """Close intervals and send live readings at the meters' (simulated) times, as
        each meter's metering would; stops making records at wall time stop_at.

        Every meter's next interval (and live reading, and status) recurs after the same
        period of meter time, so each kind's due times, kept as simulated time (meter
        time - skew), stay in order in a deque: the earliest is popped and comes back at
        the end one period later. No heap and no wall-clock conversion per record (they
        were ~15 % of the load generator's CPU), and a change of speed changes nothing:
        the order of simulated times does not depend on it."""
        iv, rt_s, st_s = self.interval_s, self.a.rt_s, self.a.status_s
        now_sim = self.sim_now()
        kinds = []                                  # [deque of (sim due, i, t), period, k]
        first = ([], [], [])
        for m in self.meters:
            c = m.clock(now_sim)
            nxt = (int(c) // iv + 1) * iv
            first[0].append((nxt - m.skew_s, m.i, nxt))
            if m.rt_on:
                r = (int(c) // rt_s + 1) * rt_s
                first[1].append((r - m.skew_s, m.i, r))
            if st_s:                     # first status after a meter-specific share
                st = int(c) + st_s * (m.i % 97 + 1) / 97
                first[2].append((st - m.skew_s, m.i, st))
        for k, period in ((0, iv), (1, rt_s), (2, st_s)):
            if first[k]:
                kinds.append((collections.deque(sorted(first[k])), period, k))
        meters = self.meters
        while kinds:
            now = time.time()
            stop_at = self.stop_at
            now_sim = self.sim_at(min(now, stop_at))  # nothing due after stop_at is made
            n = 0
            for dq, period, k in kinds:
                while dq[0][0] <= now_sim:
                    sim, i, t = dq.popleft()
                    dq.append((sim + period, i, t + period))
                    m = meters[i]
                    if k == 0:
                        if time.monotonic() >= m.offline_until:    # a rebooting meter is off
                            m.close_interval(t, now)
                    elif k == 1:
                        m.send_rt(t)
                    else:
                        m.status_tick()
                    n += 1
                    if n % 2000 == 0:
                        await asyncio.sleep(0)      # let the meters publish meanwhile
            if now >= stop_at:
                return
            if n:
                await asyncio.sleep(0)
                continue
            due = min(dq[0][0] for dq, _, _ in kinds)
            delay = (due - now_sim) / self.speed
            await asyncio.sleep(min(max(delay, 0.0), 0.05, max(0.0, stop_at - now)))

    # -- faults -------------------------------------------------------------------
    def burst(self):
        t_sim = self.sim_now()
        for m in self.meters:
            t = m.clock(t_sim)
            m.event("sag", t, 1, 183000)
            if m.i % 10 == 0:
                m.event("power_fail", t, 0)
                m.event("power_restore", t + 1, 0)

    def net_outage(self, dur_s):
        self._net_down_until = time.monotonic() + dur_s
        for m in self.meters:
            m.cut(0)

    def churn(self, rng, n, down_s=(2.0, 10.0)):
        for m in rng.sample(self.meters, min(n, len(self.meters))):
            if m.up:
                m.cut(rng.uniform(*down_s), reboot=True)
                m.event("boot", m.clock(self.sim_now()), 0, None)

    def totals(self):
        t = {}
        for m in self.meters:
            for k, v in m.stats.items():
                t[k] = t.get(k, 0) + v
        t["queued"] = sum(len(m.queue) + len(m.resend) for m in self.meters)
        return t


def meter_id(prefix, i):
    return "%s%05d" % (prefix, i)


def read_commits(paths, offsets):
    """New lines of the workers' commit logs -> [(stamp, t_commit, stored, dup, rt, other,
    cpu_s)] (cpu_s: the worker's CPU time at that commit)."""
    out = []
    for p in paths:
        try:
            with open(p) as f:
                f.seek(offsets.get(p, 0))
                data = f.read()
                end = data.rfind("\n") + 1
                offsets[p] = offsets.get(p, 0) + len(data[:end].encode())
        except OSError:
            continue
        for line in data[:end].splitlines():
            x = line.split()
            if len(x) == 7:
                out.append((float(x[0]), float(x[1])) + tuple(int(v) for v in x[2:6]) +
                           (float(x[6]),))
    return out


class Run:
    """One load test: infrastructure, fleet, faults, sampling; run() returns the report."""

    def __init__(self, a, log=None):
        self.a = a
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.dir = a.out
        os.makedirs(self.dir, exist_ok=True)
        self.series = []
        self.faults_done = []
        self.commits = []
        self._offsets = {}
        self.on_ready = None             # called with the Run once broker and workers run
        self.steps = None                # --ramp: [{fleet, speed, t0}]

    def _progress(self, t, total, tot, committed, rate, cpu):
        if self.a.quiet:
            return
        w = 24
        k = int(w * min(1.0, t / total)) if total else w
        line = ("\r[%s%s] %4.0f/%-4.0f s  conns %6d  made %8d  acked %8d  committed %8d  "
                "%7.0f rec/s  cpu %s" % ("#" * k, "." * (w - k), t, total, self.fleet.up,
                                         tot.get("made_interval", 0) + tot.get("made_event", 0),
                                         tot.get("sent_interval", 0) + tot.get("sent_event", 0),
                                         committed, rate,
                                         " ".join("%s %.0f%%" % (n, v["cpu_pct"])
                                                  for n, v in cpu.items())))
        sys.stderr.write(line[:200])
        sys.stderr.flush()

    async def _sample_loop(self, stop, t_total):
        last = time.time()
        committed = 0
        sampler = Sampler()
        prev_tot = {}
        while not stop.is_set():
            await asyncio.sleep(1.0)
            now = time.time()
            new = read_commits([self.workers.log_path(k) for k in range(1, self.a.workers + 1)],
                               self._offsets)
            self.commits += new
            n_new = sum(c[2] + c[4] for c in new)
            committed += sum(c[2] for c in new)
            groups = {"broker": [self.broker.pid()] if self.broker and self.broker.pid() else [],
                      "ingest": self.workers.pids(), "loadgen": [os.getpid()]}
            if self.pg:
                groups["postgres"] = self.pg.pids()
            cpu = sampler.sample(groups)
            tot = self.fleet.totals()
            t = now - self.t_start
            dt = max(1e-3, now - last)           # a sample is ~1 s apart, not exactly
            self.series.append({
                "t": round(t, 2), "conns": self.fleet.up,
                "made": {k: round((tot.get(k, 0) - prev_tot.get(k, 0)) / dt, 1)
                         for k in ("made_interval", "made_event", "rt_sent")},
                "acked": round(sum(tot.get(k, 0) - prev_tot.get(k, 0)
                                   for k in ("sent_interval", "sent_event", "resent")) / dt, 1),
                "committed": round(n_new / dt, 1), "queued": tot["queued"], "proc": cpu})
            prev_tot = tot
            self._progress(t, t_total, tot, committed, n_new / max(1e-3, now - last), cpu)
            last = now
            if self.workers:
                self.workers.check()

    async def _faults(self, stop_at):
        a = self.a
        rng = random.Random(a.seed + 7)
        plan = sorted(a.fault)
        churn_next = time.time() + 1
        while time.time() < stop_at:
            now = time.time() - self.t_clock
            while plan and plan[0][0] <= now:
                at, kind, dur = plan.pop(0)
                self.faults_done.append({"kind": kind, "at_s": round(time.time() - self.t_start, 2),
                                         "dur_s": dur})
                self.log("\n  fault %s at %.1f s for %.1f s" % (kind, now, dur))
                if kind == "burst":
                    self.fleet.burst()
                elif kind == "net":
                    self.fleet.net_outage(dur)
                elif kind in ("broker", "ingest", "brokerkill_ingest"):
                    asyncio.ensure_future(self._outage(kind, dur))
            if a.churn_pct and time.time() >= churn_next and now < a.churn_until_s:
                churn_next += 1
                n = int(a.meters * a.churn_pct / 100 / 60 + rng.random())
                self.fleet.churn(rng, n)
            await asyncio.sleep(0.1)

    async def _outage(self, kind, dur):
        loop = asyncio.get_running_loop()
        if kind == "broker":
            if not self.broker:
                self.log("  (broker fault skipped: --broker names an outside broker)")
                return
            await loop.run_in_executor(None, lambda: self.broker.stop(kill=True))
            await asyncio.sleep(dur)
            await loop.run_in_executor(None, self.broker.start)
        elif kind == "ingest":
            await loop.run_in_executor(None, self.workers.stop)
            await asyncio.sleep(dur)
            await loop.run_in_executor(None, self.workers.start)
        else:
            await loop.run_in_executor(None, self.workers.stop)
            await asyncio.sleep(dur / 3)
            if self.broker:
                await loop.run_in_executor(None, lambda: self.broker.stop(kill=True))
                await asyncio.sleep(1.0)
                await loop.run_in_executor(None, self.broker.start)
            await asyncio.sleep(max(0.0, dur * 2 / 3 - 1.0))
            await loop.run_in_executor(None, self.workers.start)

    def _behind_s(self):
        """How many seconds of the offered load are due but not yet committed. Due, not
        made: a load generator that falls behind making records is behind too."""
        a = self.a
        sim = self.fleet.sim_now() - self.fleet.t0_sim
        due = (a.meters * sim / a.interval_s + round(a.meters * a.rt_share) * sim / a.rt_s)
        done = sum(c[2] + c[4] for c in self.commits)
        rate = (a.meters * self.fleet.speed / a.interval_s +
                round(a.meters * a.rt_share) * self.fleet.speed / a.rt_s)
        return (due - done) / max(rate, 1e-9)

    async def _ramp(self):
        """--ramp: the fleet grows step by step (the meters' clocks speed up). A step that
        ends more than --ramp-stop-s of load behind ends the ramp: the steps after it
        could only fail, and their backlog would take minutes to drain."""
        a = self.a
        self.steps = [{"fleet": a.ramp[0], "speed": a.speed, "t0": self.t_clock}]
        for k, fleet in enumerate(a.ramp[1:], 1):
            due = self.t_clock + k * a.step_s
            await asyncio.sleep(max(0.0, due - time.time()))
            behind = self._behind_s()
            if behind > a.ramp_stop_s:
                self.log("\n  step %d ended %.1f s of load behind: ramp stopped" % (k, behind))
                self.fleet.stop_at = due
                return
            speed = fleet / a.meters
            self.fleet.set_speed(speed, due)
            self.steps.append({"fleet": fleet, "speed": speed, "t0": due})
            self.log("\n  step %d: %d meter-equivalents (speed %.1f)" % (k + 1, fleet, speed))

    async def _connect_all(self):
        """Start the meters at --connect-rate per second; wait until all are up."""
        a = self.a
        gap = 1.0 / a.connect_rate
        t0 = time.monotonic()
        for k, m in enumerate(self.fleet.meters):
            m.task = asyncio.ensure_future(m.run())
            due = t0 + (k + 1) * gap
            if due - time.monotonic() > 0.005:
                await asyncio.sleep(due - time.monotonic())
        deadline = time.monotonic() + a.connect_timeout_s
        while self.fleet.up < a.meters and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return time.monotonic() - t0

    async def _drain(self):
        """Wait until every meter's queue is empty and the database holds every record
        the meters made (or --drain-s passed)."""
        deadline = time.time() + self.a.drain_s
        want = None
        while time.time() < deadline:
            tot = self.fleet.totals()
            want = tot.get("made_interval", 0) + tot.get("made_event", 0)
            new = read_commits([self.workers.log_path(k) for k in range(1, self.a.workers + 1)],
                               self._offsets)
            self.commits += new
            have = sum(c[2] for c in self.commits)
            if tot["queued"] == 0 and have >= want:
                return True
            await asyncio.sleep(0.25)
        return False

    async def main(self):
        a = self.a
        self.t_start = time.time()
        users = {"headend": "lt-headend-%d" % random.randrange(1 << 30)}
        passwords = {meter_id(a.id_prefix, i): "pw-%08x" % random.randrange(1 << 32)
                     for i in range(a.meters)}
        users.update(passwords)
        self.pg = None
        self.broker = None
        if a.broker:
            host, port = a.broker.rsplit(":", 1)
            port = int(port)
            headend_pw = os.environ.get("LIPARI_MQTT_PASSWORD", "")
        else:
            self.broker = Broker(self.dir, users).start()
            host, port, headend_pw = "127.0.0.1", self.broker.port, users["headend"]
        if a.pg:
            self.pg = Postgres(self.dir).start()
            db = self.pg.url
        else:
            db = a.db or "sqlite:///" + os.path.join(self.dir, "lipari.db")
        self.db = db
        self.workers = Workers(self.dir, a.workers, port, db, headend_pw,
                               anchor=not a.no_anchor)
        self.fleet = Fleet(a, host, port, passwords)
        self.headend_password = headend_pw
        self.workers.start()
        stop = asyncio.Event()
        gc_was = None
        try:
            await asyncio.sleep(1.0)            # workers subscribed before meters publish
            self.workers.check()
            if self.on_ready:
                self.on_ready(self)
            t_conn = await self._connect_all()
            self.log("%d of %d meters connected in %.1f s" % (self.fleet.up, a.meters, t_conn))
            # 10,000 meters with their clients and transports are millions of long-lived
            # objects that every full collection walked; frozen, collections see only
            # what the load makes. The records in flight (queues, resend lists: tens of
            # thousands of short-lived containers) still set off a collection every 700
            # allocations with the default thresholds (25 % of the load generator's CPU
            # at 3.8M meter-equivalents): collect less often, the garbage is the same
            gc_was = gc.get_threshold()
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 50, 100)
            self.t_clock = time.time()
            self.fleet.t0_sim = int(self.fleet.t0_sim)
            self.fleet.start_clock(self.t_clock)
            if a.ramp:
                asyncio.ensure_future(self._ramp())
            stop_at = self.t_clock + a.duration
            sampler = asyncio.ensure_future(self._sample_loop(stop, a.duration + t_conn))
            faults = asyncio.ensure_future(self._faults(stop_at))
            self.fleet.stop_at = stop_at
            await self.fleet.schedule()
            faults.cancel()
            drained = await self._drain()
            t_end = time.time()
            stop.set()
            await sampler
            if not a.quiet:
                sys.stderr.write("\n")
            for m in self.fleet.meters:
                await m.close()
            await asyncio.sleep(1.0)
            for m in self.fleet.meters:
                if m.task:
                    m.task.cancel()
        finally:
            stop.set()
            if gc_was:                      # as it was for whatever runs after (tests)
                gc.set_threshold(*gc_was)
                gc.unfreeze()
            self.workers.stop()
            self.commits += read_commits(
                [self.workers.log_path(k) for k in range(1, a.workers + 1)], self._offsets)
        from headend.loadtest_report import analyse
        report = analyse(self, drained, t_end)
        return report

    def cleanup(self):
        if self.broker:
            self.broker.stop()
        if self.pg:
            self.pg.stop()


def prepare(a):
    """Derived settings: speed from --fleet, the ramp's first step and total duration."""
    if a.ramp:
        a.fleet = a.ramp[0]
        a.duration = a.step_s * len(a.ramp)
    if a.fleet:
        a.speed = a.fleet / a.meters
    return a


def _fleets(text):
    try:
        v = [float(x) for x in text.split(",") if x.strip()]
        if not v or min(v) <= 0:
            raise ValueError
        return v
    except ValueError:
        raise argparse.ArgumentTypeError("--ramp takes meter-equivalents, e.g. 1e6,2e6,4e6")


def run_main(r):
    """Run a Run's main() on uvloop (ingest.new_loop). The fleet's per-message work is
    mostly the event loop's: a socket write per PUBLISH and timers on 10,000 connections,
    which the default loop does in Python (its timer heap alone took ~20 % of the load
    generator's CPU at 3.8M meter-equivalents). Returns the report."""
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(r.main())


def run(a, log=None):
    """Run one load test from parsed arguments; returns the report dict."""
    raise_fd_limit(a.meters + 1000)
    prepare(a)
    r = Run(a, log)
    try:
        return run_main(r)
    finally:
        r.cleanup()


def parser():
    p = argparse.ArgumentParser(prog="lipari loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--meters", type=int, default=1000,
                   help="simulated meters = real MQTT connections (default 1000)")
    p.add_argument("--fleet", type=float, default=None,
                   help="meter-equivalents to simulate: the meters run N/meters times faster "
                        "(default: --meters, speed 1)")
    p.add_argument("--speed", type=float, default=1.0, help="clock speed (instead of --fleet)")
    p.add_argument("--interval-s", type=int, default=900, help="billing interval, meter time")
    p.add_argument("--rt-share", type=float, default=0.01,
                   help="share of meters that stream live readings (default 0.01)")
    p.add_argument("--rt-s", type=int, default=10, help="live reading period, meter time")
    p.add_argument("--status-s", type=int, default=3600,
                   help="retained status period, meter time (the firmware's status_s; 0 off)")
    p.add_argument("--skew-s", type=float, default=0.0,
                   help="meter clocks are off by up to +-this many seconds (uniform)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (wall)")
    p.add_argument("--ramp", type=_fleets, default=None,
                   help="meter-equivalents per step, e.g. 1e6,2e6,4e6: the fleet grows every "
                        "--step-s (replaces --fleet and --duration); the report judges each step")
    p.add_argument("--step-s", type=float, default=30.0, help="seconds per --ramp step")
    p.add_argument("--ramp-stop-s", type=float, default=4.0,
                   help="end the ramp after a step that ends this many seconds of load behind")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds at the start left out of the latency figures")
    p.add_argument("--drain-s", type=float, default=120.0,
                   help="at most this long to wait for the last records after the load")
    p.add_argument("--fault", type=parse_fault, action="append", default=[],
                   help="KIND@AT_S[:DUR_S], repeatable; KIND: %s" % ", ".join(FAULT_KINDS))
    p.add_argument("--churn-pct", type=float, default=0.0,
                   help="percent of the meters that reboot per minute (each off 2..10 s)")
    p.add_argument("--churn-until-s", type=float, default=float("inf"),
                   help="no more reboots after this many seconds")
    p.add_argument("--workers", type=int, default=1, help="ingest workers (processes)")
    p.add_argument("--no-anchor", action="store_true",
                   help="every worker only on the shared subscription (no anchor)")
    p.add_argument("--db", default=None, help="database URL (default SQLite in --out)")
    p.add_argument("--pg", action="store_true", help="start a throwaway PostgreSQL for --db")
    p.add_argument("--broker", default=None,
                   help="HOST:PORT of a running broker (default: start Mosquitto); the "
                        "meters then need accounts there (lt-NNNNN)")
    p.add_argument("--connect-rate", type=float, default=1000.0,
                   help="new connections per second at the start")
    p.add_argument("--connect-timeout-s", type=float, default=120.0)
    p.add_argument("--id-prefix", default="lt-", help="meter ids are PREFIX00000...")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-p99-ms", type=float, default=2000.0,
                   help="the run passes only with zero loss and p99 latency below this")
    p.add_argument("--out", default=None, help="directory for report.json, report.png, logs")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p


def _interrupt(*_):
    raise KeyboardInterrupt()


def main(argv=None):
    a = parser().parse_args(argv)
    if a.meters < 1:
        print("lipari loadtest: --meters must be at least 1", file=sys.stderr)
        return 2
    a.out = a.out or tempfile.mkdtemp(prefix="lipari-loadtest-")
    signal.signal(signal.SIGTERM, _interrupt)       # stop as on Ctrl-C: clean up everything
    try:
        rep = run(a)
    except InfraError as e:
        print("lipari loadtest: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlipari loadtest: interrupted; broker, workers and meters stopped", file=sys.stderr)
        return 130
    from headend.loadtest_report import table
    print(table(rep))
    print("report: %s" % os.path.join(a.out, "report.json"))
    if rep.get("plot"):
        print("plot:   %s" % rep["plot"])
    return 0 if rep["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
