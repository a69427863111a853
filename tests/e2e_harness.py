"""End-to-end chaos run: virtual meters (the real firmware on micropython) on a real
Mosquitto over every transport, the head-end ingest into SQLite, and faults on the way.

    from e2e_harness import chaos_run
    res = chaos_run(workdir, hours=4, speed=240, interval_s=60)
    res["records_lost"], res["records_duplicated"], res["meters"]["m-wifi"]["stall"]

Each meter is `micropython tests/e2e_meter.py` (= firmware/main.py plus a stall probe)
with --broker/--transport/--id/--creds and its own credentials file; Mosquitto runs the
repo's conf/mosquitto files (tests/conftest_broker.py) with one password per meter.
  wifi   connects through TcpProxy (this file), which can reset or black-hole the path;
  nbiot  through the BG95 emulator (sim/modem.py) in this process;
  plc    through the PLC concentrator bridge (sim/plc.py) in this process.
The fault plan (FAULTS) is a list of (fraction of the metering time, action, argument).

`res["failures"]` (run_failures) lists what makes the run itself invalid: a meter that
exited early, made fewer records than expected or left records unsent; a loss count of 0
means nothing then. The check compares what each meter printed (its own interval/event records, in mV and
Wh) with what the head-end stored: every seq once, 1..N without gaps, in time order,
every energy field equal, cumulative ai_wh never decreasing, and the last stored ai_wh
equal to the meter's final total (main.py stops metering right after an interval closes).
"""
import json
import os
import queue
import socket
import sqlite3
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from conftest_broker import Mosquitto  # noqa: E402
from headend import meter_net  # noqa: E402
from headend.codec import decode  # noqa: E402

MP = os.path.join(ROOT, ".venv", "bin", "micropython")
MPPATH = ":".join([os.path.join(ROOT, "firmware"), os.path.join(ROOT, "boards"), ROOT,
                   os.path.join(ROOT, "tests"), ".frozen"])
START_EPOCH = 1767225600          # 2026-01-01 00:00 UTC: interval boundaries line up
METERS = (("m-wifi", "wifi", "household"), ("m-nbiot", "nbiot", "pv"),
          ("m-plc", "plc", "motor"))
ENERGY_FIELDS = ("seq", "t_end", "dur_s", "flags", "tariff", "ai_wh", "ae_wh", "rq_varh",
                 "ap_vah", "ai_ph_wh", "ae_ph_wh", "pmax_w", "tariff_wh")

# Timeouts chosen for wall-clock speed: a dead link is noticed within seconds.
FAST_MQTT = {"keepalive_s": 4, "backoff_min_ms": 200, "backoff_max_ms": 2000,
             "ack_timeout_ms": 4000, "connect_timeout_ms": 12000}
FAST_SESSION = {"backlog_per_s": 50, "ack_timeout_ms": 5000, "rt_s": 2}
FAST_SELECTOR = {"check_s": 2, "probe_s": 10, "fail_hold_s": 1, "up_ms": 10000}
FAST_NBIOT = {"cmd_ms": 1000, "reg_poll_ms": 200, "open_ms": 8000, "state_poll_ms": 1000,
              "rd_poll_ms": 200}

# (fraction of the metering time, action, argument)
FAULTS = (
    (0.06, "proxy", "reset"),             # Wi-Fi: every TCP connection reset
    (0.10, "modem", "cme QIOPEN 566 2"),  # NB-IoT: next two socket opens fail
    (0.10, "modem", "lose_urc recv 4"),   # ... and four "recv" URCs are lost
    (0.12, "modem", "detach"),            # ... network drops the modem
    (0.14, "plc", "cut"),                 # PLC line dead
    (0.17, "broker", "kill 2"),           # broker SIGKILL, 2 s down, restart
    (0.22, "modem", "attach"),
    (0.24, "plc", "uncut"),
    (0.30, "proxy", "blackhole 5"),       # Wi-Fi: packets vanish for 5 s (keepalive)
    (0.34, "modem", "slow_ms 300"),       # slow modem
    (0.40, "broker", "term 1"),           # clean broker restart
    (0.46, "modem", "slow_ms 0"),
    (0.48, "plc", "loss 0.15"),           # noisy power line
    (0.48, "plc", "corrupt 0.05"),
    (0.52, "modem", "hang"),              # modem answers nothing ...
    (0.57, "modem", "unhang"),            # ... for a while
    (0.60, "proxy", "refuse 3"),          # Wi-Fi: connections refused for 3 s
    (0.62, "broker", "kill 3"),
    (0.66, "ingest", "stop"),             # head-end down: the broker keeps the records
    (0.715, "broker", "kill 1"),          # ... and crashes meanwhile: what it acknowledged
                                          # since its last save comes again from the meters
    (0.70, "plc", "loss 0"),
    (0.70, "plc", "corrupt 0"),
    (0.72, "modem", "lose_urc closed 2"),
    (0.76, "ingest", "start"),
    (0.78, "broker", "term 0"),
    (0.84, "modem", "clear"),
)


class TcpProxy:
    """127.0.0.1:port -> target port, with faults: reset() closes every connection
    (RST), blackhole(s) stops moving bytes for s seconds (connections stay open),
    refuse(s) closes new connections at once for s seconds."""

    def __init__(self, target_port):
        self.target = target_port
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        self.pairs = []
        self.hold_until = 0.0
        self.refuse_until = 0.0
        self.stats = {"accepted": 0, "refused": 0, "resets": 0}
        self._stop = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                self.stats["refused"] += 1
                self._rst(c)
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target), 2)
                u.settimeout(None)        # the connect timeout must not become a read timeout
            except OSError:
                self.stats["refused"] += 1
                self._rst(c)
                continue
            self.stats["accepted"] += 1
            with self._lock:
                self.pairs.append((c, u))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _rst(s):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass

    def _pipe(self, a, b):
        try:
            while True:
                d = a.recv(4096)
                if not d:
                    break
                while time.monotonic() < self.hold_until:
                    time.sleep(0.05)
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self):
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for c, u in pairs:
            self.stats["resets"] += 1
            self._rst(c)
            self._rst(u)

    def blackhole(self, s):
        self.hold_until = time.monotonic() + s

    def refuse(self, s):
        self.refuse_until = time.monotonic() + s
        self.reset()

    def stop(self):
        self._stop = True
        try:
            self.ls.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ls.close()
        self.reset()


class MeterProc:
    """One virtual meter process; its JSON lines are collected by kind."""

    def __init__(self, argv, log_path):
        self.argv = argv
        self.log = open(log_path, "w")
        self.p = subprocess.Popen([MP, "-X", "heapsize=1M", os.path.join(HERE, "e2e_meter.py")]
                                  + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=dict(os.environ, MICROPYPATH=MPPATH), cwd=ROOT)
        self.intervals, self.events, self.stalls, self.other = [], [], [], []
        self.summary = None
        self.lines = queue.Queue()
        self._th = threading.Thread(target=self._read, daemon=True)
        self._th.start()

    def _read(self):
        for line in self.p.stdout:
            self.log.write(line)
            s = line.strip()
            if not s.startswith("{"):
                self.other.append(s)
                continue
            try:
                d = json.loads(s)
            except ValueError:
                self.other.append(s)
                continue
            k = d.get("type")
            if k == "interval":
                self.intervals.append(d)
            elif k == "event":
                self.events.append(d)
            elif k == "stall":
                self.stalls.append(d)
            elif k == "summary":
                self.summary = d
            else:
                self.other.append(s)
        self.log.flush()

    def wait(self, timeout):
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)
            self.other.append("[killed after %s s]" % timeout)
        self._th.join(5)
        self.log.close()
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


def _ingest(store, port, cid="e2e-ingest"):
    from headend.ingest import Ingest
    ing = Ingest(store, port=port, user="headend", password="headend-pw", client_id=cid,
                 anchor=True, reconnect_s=(0.2, 1))   # quick back after each broker restart
    return ing.start()


def check_meter(db_path, mid, m):
    """Compare one meter's own records (stdout) with the database rows."""
    con = sqlite3.connect(db_path)
    try:
        rows = con.execute("SELECT seq, t_end, rec, raw FROM intervals WHERE meter_id = ? "
                           "ORDER BY seq", (mid,)).fetchall()
        ev_rows = con.execute("SELECT seq FROM events WHERE meter_id = ? ORDER BY seq",
                              (mid,)).fetchall()
    finally:
        con.close()
    made = {r["seq"]: r for r in m.intervals}
    # ingest keeps the payload and no JSON copy (rec NULL): decode it as Store.intervals does
    stored = [json.loads(r[2]) if r[2] is not None else decode(r[3])[1] for r in rows]
    seqs = [r[0] for r in rows]
    t_ends = [r[1] for r in rows]
    res = {"produced": len(made), "stored": len(rows)}
    res["lost"] = len(set(made) - set(seqs))
    # duplicates: a seq twice (impossible with the UNIQUE key), a record nobody made, or
    # the same interval end stored twice (a record re-sent under a new seq)
    res["duplicated"] = (len(seqs) - len(set(seqs))) + len(set(seqs) - set(made)) + \
        (len(t_ends) - len(set(t_ends)))
    res["seq_contiguous"] = seqs == list(range(1, len(seqs) + 1))
    res["produced_contiguous"] = sorted(made) == list(range(1, len(made) + 1))
    res["time_ordered"] = all(a < b for a, b in zip(t_ends, t_ends[1:]))
    mism = []
    for rec in stored:
        src = made.get(rec["seq"])
        if src is None:
            continue
        for k in ENERGY_FIELDS:
            a, b = src.get(k), rec.get(k)
            if isinstance(a, list) and isinstance(b, list) and len(a) > len(b):
                a = a[:len(b)]
            if a != b:
                mism.append((rec["seq"], k, a, b))
        for k in ("v_avg_mv", "v_min_mv", "v_max_mv"):
            for x, y in zip(src.get(k) or [], rec.get(k) or []):
                if abs(x - y) > 50:      # the wire carries 0.1 V
                    mism.append((rec["seq"], k, x, y))
    res["field_mismatches"] = mism[:10]
    res["n_field_mismatches"] = len(mism)
    ai = [r["ai_wh"] for r in stored]
    res["ai_monotonic"] = all(a <= b for a, b in zip(ai, ai[1:]))
    res["ai_wh_last_stored"] = ai[-1] if ai else None
    res["ai_wh_meter"] = m.summary.get("ai_wh") if m.summary else None
    res["ai_wh_equal"] = res["ai_wh_meter"] is not None and res["ai_wh_last_stored"] == \
        res["ai_wh_meter"]
    ev_made = sorted(e["seq"] for e in m.events)
    ev_seqs = [r[0] for r in ev_rows]
    res["events_produced"] = len(ev_made)
    res["events_lost"] = len(set(ev_made) - set(ev_seqs))
    res["events_extra"] = len(set(ev_seqs) - set(ev_made)) + len(ev_seqs) - len(set(ev_seqs))
    res["unsent"] = m.summary.get("unsent") if m.summary else None
    res["stall"] = m.summary.get("stall") if m.summary else None
    res["comm"] = m.summary.get("comm") if m.summary else None
    res["flags_or"] = 0
    for r in stored:
        res["flags_or"] |= r.get("flags", 0)
    return res


def run_failures(res, hours, interval_s):
    """What makes a chaos run invalid, whatever the loss count says: a meter that exited
    early or with an error, made fewer interval records than its simulated time holds (the
    first one may be partial), left records in its flash queue, printed no summary, or a
    fault that was not applied. [] = a valid run."""
    want = int(hours * 3600 // interval_s) - 1
    bad = []
    for mid, r in sorted(res["meters"].items()):
        if r["exit"] != 0:
            bad.append("%s exited with %s: %s" % (mid, r["exit"], r["other"][-2:]))
        if r["produced"] < want:
            bad.append("%s produced %d interval records, expected at least %d"
                       % (mid, r["produced"], want))
        if not r["produced_contiguous"]:
            bad.append("%s printed interval seqs with gaps" % mid)
        if r["unsent"] is None:
            bad.append("%s printed no summary (no unsent count)" % mid)
        elif r["unsent"]:
            bad.append("%s left %d records unsent in its flash queue" % (mid, r["unsent"]))
    return bad


def chaos_run(workdir, hours=4.0, speed=240.0, interval_s=60, faults=FAULTS, meters=METERS,
              log=print, read_ms=None):
    """Run the meters through `faults` and return the check results (see top)."""
    from headend.store import Store
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    users = {"headend": "headend-pw"}
    for mid, _, _ in meters:
        users[mid] = mid + "-secret"
    broker = Mosquitto(os.path.join(workdir, "broker"), users=users).start()
    db_path = os.path.join(workdir, "headend.db")
    store = Store("sqlite:///" + db_path)
    ing = [_ingest(store, broker.port)]
    proxy = TcpProxy(broker.port)
    helpers = {}
    procs = {}
    fault_log = []
    try:
        if not ing[0].connected.wait(10):
            raise RuntimeError("ingest did not connect to the broker")
        dur_s = hours * 3600.0 / speed
        for mid, transport, profile in meters:
            creds = meter_net.write_creds(
                os.path.join(workdir, mid + ".creds"), mid, users[mid], os.urandom(32),
                mqtt=FAST_MQTT, session=FAST_SESSION, selector=FAST_SELECTOR,
                nbiot=FAST_NBIOT if transport == "nbiot" else None)
            argv = ["--board", "unix_sim_3ph", "--profile", profile, "--speed", str(speed),
                    "--start", str(START_EPOCH), "--days", repr(hours / 24.0),
                    "--interval", str(interval_s), "--id", mid, "--creds", creds,
                    "--transport", transport, "--print", "json", "--seed", "3"]
            if read_ms:
                argv += ["--read_ms", str(read_ms)]
            if transport == "wifi":
                argv += ["--broker", "127.0.0.1:%d" % proxy.port]
            else:
                argv += ["--broker", "127.0.0.1:%d" % broker.port]
            if transport == "nbiot":
                helpers["modem"] = h = meter_net.start_modem()
                argv += ["--modem", h.path]
            elif transport == "plc":
                helpers["plc"] = h = meter_net.start_plc(seed=5)
                argv += ["--plc", h.path]
            procs[mid] = MeterProc(argv, os.path.join(workdir, mid + ".log"))
        t0 = time.monotonic()
        for frac, what, arg in sorted(faults, key=lambda f: f[0]):
            delay = t0 + frac * dur_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            fault_log.append((round(time.monotonic() - t0, 2), what, arg))
            log("  t=%5.1fs %s %s" % (time.monotonic() - t0, what, arg))
            if what == "broker":
                how, down = arg.split()
                broker.stop(kill=(how == "kill"))
                time.sleep(float(down))
                broker.start()
            elif what == "proxy":
                p = arg.split()
                getattr(proxy, p[0])(*(float(x) for x in p[1:]))
            elif what == "ingest":
                if arg == "stop":
                    ing[-1].stop()
                else:
                    ing.append(_ingest(store, broker.port))
            elif what in helpers:
                helpers[what].control(arg)
        for mid, p in procs.items():
            left = max(30.0, dur_s * 1.5 + 90 - (time.monotonic() - t0))
            p.wait(left)
        # the head-end has everything the meters got a PUBACK for; let ingest take it
        want = sum(len(p.intervals) for p in procs.values())
        con = sqlite3.connect(db_path)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 20:
            n = con.execute("SELECT COUNT(*) FROM intervals").fetchone()[0]
            if n >= want:
                break
            time.sleep(0.2)
        con.close()
        time.sleep(0.5)
        res = {"meters": {}, "faults": fault_log, "hours": hours, "speed": speed,
               "interval_s": interval_s, "wall_s": round(time.monotonic() - t0, 1),
               "ingest": [dict(i.counts) for i in ing], "proxy": dict(proxy.stats)}
        for mid, p in procs.items():
            r = check_meter(db_path, mid, p)
            r["exit"] = p.p.returncode
            r["other"] = p.other[-5:]
            res["meters"][mid] = r
        res["records_lost"] = sum(r["lost"] + r["events_lost"] for r in res["meters"].values())
        res["records_duplicated"] = sum(r["duplicated"] + r["events_extra"]
                                        for r in res["meters"].values())
        res["redeliveries_absorbed"] = sum(c["duplicate"] for c in res["ingest"])
        st = [r["stall"] for r in res["meters"].values() if r["stall"]]
        res["max_metering_stall_ms"] = max(s["max_late_ms"] for s in st) if st else None
        res["failures"] = run_failures(res, hours, interval_s)
        return res
    finally:
        for p in procs.values():
            p.kill()
        for i in ing:
            try:
                i.stop()
            except Exception:
                pass
        for h in helpers.values():
            h.stop()
        proxy.stop()
        broker.stop()
        store.close()


if __name__ == "__main__":
    import signal
    import tempfile
    # SIGTERM / SIGHUP end the run like Ctrl-C: chaos_run's clean-up stops what it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    hours = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    speed = float(sys.argv[2]) if len(sys.argv) > 2 else 240.0
    out = chaos_run(tempfile.mkdtemp(prefix="lipari-e2e-"), hours, speed)
    print(json.dumps(out, indent=1, default=str))
