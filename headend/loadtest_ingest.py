"""Ingest figures for `make bench` (bench/headend_bench.py), on the same test bed as
`lipari loadtest` (headend/loadtest_infra.py: Mosquitto on the repo's configuration, real
`lipari headend` worker processes, SQLite or a throwaway PostgreSQL):

    ingest_vs_broker(n, meters)   ONE publish pass of n interval records, queued by the
                                  broker for both a plain subscriber and the ingest (both
                                  persistent sessions), then taken by both at once: the
                                  plain subscriber's receive rate, the ingest's commit rate
    workers_scaling(n, workers)   the same recorded stream of n records replayed to 1 and
                                  to `workers` ingest workers on the shared subscription:
                                  queued in the broker while the workers are away, then
                                  drained; commit rate of each

Records are binary v1 interval records made by the firmware's codec (the load
generator's RecordModel), published QoS 1 by each meter's own account (the ACL holds).
A time-out is a failure (RuntimeError), never a rate.
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from headend import ROOT
from headend.loadtest_infra import Broker, Postgres, Workers
from headend.loadtest import read_commits


def stream(n, meters, seed=5):
    """The recorded stream: [(meter id, payload)] of n interval records, round robin over
    the meters, each meter's seq counting from 1."""
    from headend.loadtest_meter import CODEC, RecordModel
    rng = random.Random(seed)
    models = [RecordModel(random.Random(rng.random()), 3 if k % 4 == 0 else 1)
              for k in range(meters)]
    out = []
    t0 = 1767225600
    for i in range(n):
        k = i % meters
        seq = i // meters + 1
        out.append(("bm%03d" % k, CODEC.encode("interval", models[k].interval(seq, t0 + 900 * seq,
                                                                              900), "bin")))
    return out


def _publish(port, path, passwords):
    """Publish the stream in `path` (in a process of its own, as meters are elsewhere);
    returns the wall time at which publishing started."""
    code = ("import sys; sys.path.insert(0, %r); from headend.loadtest_ingest import "
            "publish_main; publish_main()" % ROOT)
    p = subprocess.run([sys.executable, "-c", code, str(port), path, json.dumps(passwords)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise RuntimeError("publisher failed (exit %d): %s" % (p.returncode, p.stderr[-800:]))
    return float(p.stdout.split("T0")[-1].split()[0])


def publish_main():
    """Subprocess body: one paho client per meter (its own user: the ACL holds), QoS 1,
    up to 100 in flight each, all PUBACKs awaited (60 s at most, else exit 1)."""
    import paho.mqtt.client as paho
    port, path, pw = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    items = [(m, bytes.fromhex(h)) for m, h in (ln.split() for ln in open(path))]
    clients = {}
    for mid in sorted({m for m, _ in items}):
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=mid, clean_session=False)
        c.username_pw_set(mid, pw[mid])
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port, 60)
        c.loop_start()
        clients[mid] = c
    time.sleep(0.5)
    t0 = time.time()
    last = {}
    for mid, payload in items:
        last[mid] = clients[mid].publish("lipari/v1/%s/interval" % mid, payload, 1)
    for mid, info in last.items():
        info.wait_for_publish(60)
        if not info.is_published():
            print("no PUBACK for the last record of %s within 60 s" % mid, file=sys.stderr)
            sys.exit(1)
    for c in clients.values():
        c.disconnect()
        c.loop_stop()
    print("T0 %.6f" % t0)


def plain_main():
    """Subprocess body of the plain subscriber: argv port password n out mode timeout_s
    client. One persistent QoS 1 session on lipari/v1/+/interval that acknowledges each
    record on receipt. mode "prepare": subscribe, write out.ready, leave (the broker keeps
    the queue); "measure": write `<t first> <t n-th> <n> <cpu first> <cpu n-th>` (wall and
    process CPU seconds) when the n-th record arrived, `timeout <got>` if it did not."""
    port, pw, n, out, mode = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4],
                              sys.argv[5])
    timeout_s, client = float(sys.argv[6]), sys.argv[7]
    got = [0, None, None]

    def on_record():
        got[0] += 1
        if got[0] == 1:
            got[1], got[2] = time.time(), time.process_time()
        if got[0] == n:
            open(out, "w").write("%.6f %.6f %d %.4f %.4f\n" % (
                got[1], time.time(), n, got[2], time.process_time()))
            return True
        return False

    def ready():
        open(out + ".ready", "w").write("ready")
        return mode == "prepare"

    if client == "paho":
        import threading
        import paho.mqtt.client as paho
        done = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-plain",
                        clean_session=False)
        c.username_pw_set("headend", pw)
        c.on_message = lambda *a: on_record() and done.set()
        c.on_subscribe = lambda *a: ready() and done.set()
        c.connect("127.0.0.1", port, 60)
        c.subscribe("lipari/v1/+/interval", 1)
        c.loop_start()
        done.wait(timeout_s)
        time.sleep(0.3)
        if not done.is_set():
            open(out, "w").write("timeout %d\n" % got[0])
        c.disconnect()
        c.loop_stop()
        return
    import asyncio
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv311

    async def run():
        done = asyncio.Event()
        # MQTT 3.1.1: gmqtt acknowledges a QoS 1 PUBLISH as it arrives (its handler forces
        # optimistic acknowledgement below MQTT 5), as this subscriber should
        c = gmqtt.Client("bench-plain", clean_session=False)
        c.set_auth_credentials("headend", pw)
        c.on_message = lambda *a: (on_record() and done.set()) or 0
        c.on_subscribe = lambda *a: ready() and done.set()
        await c.connect("127.0.0.1", port, keepalive=60, version=MQTTv311)
        c.subscribe("lipari/v1/+/interval", 1)
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except asyncio.TimeoutError:
            open(out, "w").write("timeout %d\n" % got[0])
        await asyncio.sleep(0.3)
        await c.disconnect()

    asyncio.run(run())


def _plain_subscriber(port, password, n, out_path, mode="measure", timeout_s=300,
                      client="gmqtt"):
    """The plain QoS 1 subscriber (plain_main) in its own process, on `client` (gmqtt:
    the ingest's own MQTT library, so the ratio compares the ingest's work with bare
    receipt on the same client; paho: the earlier reference)."""
    code = ("import sys; sys.path.insert(0, %r); from headend.loadtest_ingest import "
            "plain_main; plain_main()" % ROOT)
    return subprocess.Popen([sys.executable, "-c", code, str(port), password, str(n),
                             out_path, mode, str(timeout_s), client],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_file(path, timeout_s):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError("%s did not appear within %s s" % (path, timeout_s))
        time.sleep(0.05)


def _write_stream(items, path):
    with open(path, "w") as f:
        for mid, payload in items:
            f.write("%s %s\n" % (mid, payload.hex()))


def _bed(workdir, prefix, n, meters):
    """The run directory, the recorded stream (in memory and as a file for the publisher)
    and the broker accounts: -> (dir, items, path, meter passwords, all users)."""
    wd = workdir or tempfile.mkdtemp(prefix=prefix)
    items = stream(n, meters)
    path = os.path.join(wd, "stream.txt")
    _write_stream(items, path)
    pw = {m: "pw-" + m for m, _ in items}
    return wd, items, path, pw, dict(pw, headend="bench-headend-pw")


def _commits_until(workers, n, timeout_s, what):
    """Commit-log lines of the workers until n records are stored; RuntimeError on time-out."""
    offsets, commits = {}, []
    paths = [workers.log_path(k) for k in workers.procs]
    deadline = time.time() + timeout_s
    while True:
        commits += read_commits(paths, offsets)
        stored = sum(c[2] for c in commits)
        if stored >= n:
            return commits
        workers.check()
        if time.time() > deadline:
            raise RuntimeError("%s: %d of %d records committed after %s s (a time-out is a "
                               "failure, not a rate)" % (what, stored, n, timeout_s))
        time.sleep(0.05)


def ingest_vs_broker(n=20000, meters=50, workdir=None, timeout_s=300, workers=1,
                     plain="gmqtt"):
    """One publish pass, two consumers. Both hold a persistent session on the broker (a
    plain QoS 1 subscriber, and the ingest's anchor worker into SQLite); the stream is
    published once while both are away, so the broker queues every record for both; then
    both start together and take the same messages from the broker as fast as each can.
    Each rate: records after the first / (last - first), the plain subscriber's receive
    times, the ingest's commit times (a publisher never limits either).
    -> ingest_records_per_s, broker_records_per_s, ingest_vs_broker_ratio, ingest_lost,
    duplicates, stored_equals_stream. workers > 1: that many workers without anchor on
    the shared subscription (the scale-out configuration, docs/scaling.md) instead of the
    default single anchor worker. plain: the plain subscriber's client (_plain_subscriber).
    Also the CPU each consumer spent per record of the stream (us; process CPU time from
    its first record, or commit, to its last): ingest_cpu_us_per_record,
    plain_cpu_us_per_record."""
    wd, items, path, pw, users = _bed(workdir, "lipari-ratio-", n, meters)
    broker = Broker(wd, users).start()
    db = "sqlite:///" + os.path.join(wd, "ratio.db")
    nw = workers
    workers = Workers(wd, nw, broker.port, db, users["headend"], anchor=nw == 1)
    plain_out = os.path.join(wd, "plain.txt")
    sub = None
    try:
        # 1. both consumers subscribe once and go away (persistent sessions)
        prep = _plain_subscriber(broker.port, users["headend"], n, plain_out, "prepare",
                                 client=plain)
        workers.start()
        _wait_file(plain_out + ".ready", 30)
        prep.wait(30)
        time.sleep(1.5)
        workers.check()
        workers.stop()
        os.remove(plain_out + ".ready")
        # 2. one publish pass: the broker queues every record for both
        _publish(broker.port, path, pw)
        # 3. both come back at once
        sub = _plain_subscriber(broker.port, users["headend"], n, plain_out, "measure",
                                timeout_s, client=plain)
        workers.start()
        commits = _commits_until(workers, n, timeout_s, "ingest")
        _wait_file(plain_out, timeout_s)
        sub.wait(60)
        line = open(plain_out).read().split()
        if line[0] == "timeout":
            raise RuntimeError("plain subscriber got %s of %d records: a time-out" % (line[1], n))
        plain_rate = (n - 1) / (float(line[1]) - float(line[0]))
        plain_cpu = (float(line[4]) - float(line[3])) / (n - 1) * 1e6
        ingest = _drain_rate(commits, n)
        time.sleep(0.5)
        workers.stop()
        logs = [read_commits([workers.log_path(k)], {}) for k in range(1, nw + 1)]
        commits = [c for log in logs for c in log]
        ingest_cpu = _cpu_per_record(logs)
        from headend.store import Store
        s = Store(db)
        rows = s._rows("SELECT meter_id, raw FROM intervals ORDER BY meter_id, seq")
        s.close()
        stored = len(rows)
        # the ingest stored exactly the published stream, byte for byte
        want = sorted(items, key=lambda x: x[0])     # stable: each meter's seq order
        same = [(r["meter_id"], bytes(r["raw"])) for r in rows] == want
        return {"ingest_records_per_s": round(ingest, 1), "broker_records_per_s": round(plain_rate, 1),
                "ingest_vs_broker_ratio": round(ingest / plain_rate, 3), "ingest_lost": n - stored,
                "duplicates": sum(c[3] for c in commits), "n": n, "meters": meters,
                "stored_equals_stream": same, "plain_client": plain,
                "ingest_cpu_us_per_record": ingest_cpu,
                "plain_cpu_us_per_record": round(plain_cpu, 1),
                "payload": "binary v1 interval (firmware codec)"}
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
        workers.stop()
        broker.stop()


def _cpu_per_record(logs):
    """Worker CPU (us) per record stored, over each worker's commits after its first:
    logs = one list of commit-log tuples per worker."""
    cpu = recs = 0
    for log in logs:
        log = sorted(log, key=lambda c: c[1])
        if len(log) > 1:
            cpu += log[-1][6] - log[0][6]
            recs += sum(c[2] for c in log[1:])
    return round(cpu / recs * 1e6, 1) if recs else None


def _drain_rate(commits, n):
    """Commit rate of a drain: records committed after the first commit over the time
    from the first commit to the last (worker start-up is not part of it)."""
    commits = sorted(commits, key=lambda c: c[1])
    first, last = commits[0][1], commits[-1][1]
    if last <= first:
        raise RuntimeError("the drain finished in one commit: use a longer stream")
    return (sum(c[2] for c in commits) - commits[0][2]) / (last - first)


def workers_scaling(n=60000, meters=200, workers=2, pg=True, workdir=None, timeout_s=600):
    """The same recorded stream drained by 1 worker and by `workers` workers (no anchor:
    one shared subscription) into PostgreSQL (pg=True) or SQLite.
    -> {"rate_1", "rate_<workers>", "scaling", "lost_<k>", "stored_by_worker_<k>"}."""
    wd, items, path, pw, users = _bed(workdir, "lipari-scale-", n, meters)
    pgs = Postgres(wd).start() if pg else None
    out = {"n": n, "db": "postgresql" if pg else "sqlite"}
    try:
        for k in (1, workers):
            run_dir = os.path.join(wd, "w%d" % k)
            os.makedirs(run_dir, exist_ok=True)
            if pgs:
                import psycopg
                base = pgs.url.rsplit("/", 1)[0]
                with psycopg.connect(base + "/postgres", autocommit=True) as c:
                    c.execute("DROP DATABASE IF EXISTS lipari_w%d" % k)
                    c.execute("CREATE DATABASE lipari_w%d" % k)
                db = base + "/lipari_w%d" % k
            else:
                db = "sqlite:///" + os.path.join(run_dir, "scale.db")
            broker = Broker(run_dir, users).start()
            w = Workers(run_dir, k, broker.port, db, users["headend"], anchor=False)
            try:
                w.start()                      # their sessions and shared subscriptions ...
                time.sleep(2.0)
                w.check()
                w.stop()                       # ... stay while they are away
                _publish(broker.port, path, pw)   # the broker queues the stream for them
                w.start()
                commits = _commits_until(w, n, timeout_s, "%d worker(s)" % k)
                out["rate_%d" % k] = round(_drain_rate(commits, n), 1)
                out["commits_%d" % k] = len(commits)
                # each worker's own share (the broker spread the queue over the sessions)
                out["stored_by_worker_%d" % k] = [
                    sum(c[2] for c in read_commits([w.log_path(j)], {})) for j in w.procs]
                w.stop()
                out["lost_%d" % k] = n - sum(c[2] for c in commits)
            finally:
                w.stop()
                broker.stop()
        out["scaling"] = round(out["rate_%d" % workers] / out["rate_1"], 3)
        return out
    finally:
        if pgs:
            pgs.stop()
