"""The meter on the 32-bit MicroPython build with its code frozen in, at a board's heap
(tests/test_fw_fit.py, bench/fw_bench.py).

    from fw32_harness import fw32_binary, run_fw32, fit_run
    fw32_binary()                       # path of the 32-bit frozen build (built if stale)
    run_fw32("import gc; print(gc.mem_free())", heap_kib=100)   # -> stdout
    res = fit_run(workdir, hours=1.6, speed=240, interval_s=60, heap_kib=100)

fit_run is the whole meter of issue 7: the virtual three-phase board (unix_sim_3ph) over
the board bridge (sim/boardhost.py: the simulated chips in this process, so the heap
holds the firmware and its link objects alone), metering, the MQTT session over NB-IoT
through the BG95 emulator (sim/modem.py), the flash queue on littlefs, commands answered
(plain and signed), and Mosquitto restarted half-way; the head-end ingest stores what
arrives in SQLite and the check is the chaos run's (tests/e2e_harness.py: every record
once, the meter's own figures). The firmware runs under tests/fw32/fw32_probe.py (frozen),
which adds the heap figures to the summary.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tools import mpbuild  # noqa: E402

START_EPOCH = 1767225600          # 2026-01-01 00:00 UTC: interval boundaries line up
BOARD_HEAP_KIB = 100              # STM32F405 (stm32_stpm34_33_ct): MicroPython's heap
_MAXFREE = re.compile(r"max free sz: (\d+)")
GC_BLOCK = 16                     # bytes per GC block on a 32-bit port


def fw32_binary():
    """The 32-bit unix MicroPython with the firmware, the unix_sim_3ph board, the
    simulator and the heap probe frozen in (tools/mpbuild.py; cached, rebuilt when an
    input changed). For other areas' benchmarks: run scripts with run_fw32()."""
    return mpbuild.unix_binary(mpbuild.TEST_BUILD)


def fw32_cmd(heap_kib, *args):
    return [fw32_binary(), "-X", "heapsize=%dk" % heap_kib] + [str(a) for a in args]


def run_fw32(code, heap_kib=BOARD_HEAP_KIB, args=(), timeout=120, extra_path=()):
    """Run `code` (a script's text) on the 32-bit frozen build; only frozen modules (and
    extra_path) are importable, as on a board. Returns stdout; raises AssertionError
    with the output when it fails."""
    with tempfile.TemporaryDirectory(prefix="fw32-") as d:
        path = os.path.join(d, "fw32_script.py")
        with open(path, "w") as f:
            f.write(code)
        cwd = os.path.join(d, "cwd")
        os.mkdir(cwd)
        p = subprocess.run(fw32_cmd(heap_kib, path, *args), capture_output=True, text=True,
                           timeout=timeout, cwd=cwd, env=mpbuild.frozen_env(extra_path))
    if p.returncode:
        raise AssertionError("32-bit micropython failed (%d):\n%s\n%s" % (p.returncode, p.stdout,
                                                                         p.stderr))
    return p.stdout


class BridgedMeter:
    """The firmware command line `cmd` against the simulated unix_sim_3ph board in this
    process (sim/boardhost.BoardHost: restarts on a watchdog expiry or a reset, counted in
    .resets), its console lines sorted like e2e_harness.MeterProc's: .intervals, .events,
    .summary, .heap (the probe's periodic lines), .other; .largest_free (bytes, from each
    mem_info) and .first_record_s (real seconds from start to the first record)."""

    def __init__(self, cmd, env, cwd, log_path, profile="household", seed=3):
        sys.path.insert(0, os.path.join(ROOT, "boards"))
        import unix_sim_3ph
        from sim.boardhost import BoardHost
        self.host = BoardHost(unix_sim_3ph, cmd, env=env, profile=profile, seed=seed, cwd=cwd)
        self.intervals, self.events, self.heap, self.other = [], [], [], []
        self.largest_free = []
        self.summary = None
        self.rc = None
        self.first_record_s = None
        self.log = open(log_path, "w")
        self.t0 = time.monotonic()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self):
        try:
            self.rc = self.host.run(self._line)
        finally:
            self.log.close()

    def _line(self, s):
        self.log.write(s + "\n")
        m = _MAXFREE.search(s)
        if m:
            self.largest_free.append(int(m.group(1)) * GC_BLOCK)
        if not s.startswith("{"):
            self.other.append(s)
            return
        try:
            d = json.loads(s)
        except ValueError:
            self.other.append(s)
            return
        k = d.get("type")
        if k in ("interval", "event") and self.first_record_s is None:
            self.first_record_s = time.monotonic() - self.t0
        if k == "interval":
            self.intervals.append(d)
        elif k == "event":
            self.events.append(d)
        elif k == "heap":
            self.heap.append(d)
        elif k == "summary":
            self.summary = d
        else:
            self.other.append(s)

    def running(self):
        return self._th.is_alive()

    def wait(self, timeout):
        self._th.join(timeout)
        if self._th.is_alive():
            self.other.append("[stopped after %s s]" % timeout)
            self.kill()
        return self.rc

    def kill(self):
        if self._th.is_alive():
            self.host.request_stop()
            self.host.request_stop()         # no grace
            self._th.join(20)


# (fraction of the run, command, args, signed)
COMMANDS = ((0.15, "ping", {}, False),
            (0.30, "get", {"what": "readings"}, False),
            (0.62, "get", {"what": "counters"}, True),
            (0.80, "set", {"rt_s": 5}, False))
RESTART_AT = 0.5                  # Mosquitto stopped (SIGTERM), 1 s down, started again


def fit_run(workdir, hours=1.6, speed=240.0, interval_s=60, heap_kib=BOARD_HEAP_KIB,
            probe_ms=1000, report_s=0, commands=COMMANDS, restart_at=RESTART_AT,
            log=lambda *a: None, timeout_s=None):
    """Run the whole meter (see the top) and return the checks:
    {"exit", "resets" (watchdog/reset restarts: none expected), "memory_errors" (lines
     naming MemoryError), "produced", "stored", "lost", "duplicated", "events_lost",
     "unsent", "commands": [(cmd, signed, reply)], "heap": the probe's figures +
     "largest_free_b" after the run, "reports": the probe's lines every report_s of
     virtual time (+ largest_free_b), "first_record_s", "summary", "other"}."""
    import e2e_harness as h
    from conftest_broker import Mosquitto
    from headend import meter_net
    from headend.mqttcmd import send_command, CmdError
    from headend.store import Store
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    mid = "fw32-nbiot"
    users = {"headend": "headend-pw", mid: "fw32-secret", "operator": "op-pw"}
    broker = Mosquitto(os.path.join(workdir, "broker"), users=users).start()
    db = os.path.join(workdir, "headend.db")
    store = Store("sqlite:///" + db)
    ing = [h._ingest(store, broker.port, cid="fw32-ingest")]
    modem = meter_net.start_modem()
    key = os.urandom(32)
    replies = []
    proc = None
    try:
        if not ing[0].connected.wait(10):
            raise RuntimeError("ingest did not connect to the broker")
        creds = meter_net.write_creds(os.path.join(workdir, mid + ".creds"), mid, users[mid], key,
                                      mqtt=h.FAST_MQTT, session=h.FAST_SESSION,
                                      selector=h.FAST_SELECTOR, nbiot=h.FAST_NBIOT)
        argv = ["--probe_ms", probe_ms, "--probe_report_s", report_s, "--board", "unix_sim_3ph",
                "--speed", speed, "--start", START_EPOCH, "--days", repr(hours / 24.0),
                "--interval", interval_s, "--id", mid, "--creds", creds, "--transport", "nbiot",
                "--broker", "127.0.0.1:%d" % broker.port, "--modem", modem.path,
                "--print", "json"]
        cwd = os.path.join(workdir, "cwd")
        os.makedirs(cwd, exist_ok=True)
        proc = BridgedMeter(fw32_cmd(heap_kib, "-m", "fw32_probe", *argv), mpbuild.frozen_env(),
                            cwd, os.path.join(workdir, mid + ".log"))
        dur_s = hours * 3600.0 / speed
        t0 = time.monotonic()
        threads = []

        def command(cmd, args, signed):
            try:
                rep = send_command(mid, cmd, args, port=broker.port, user="headend",
                                   password="headend-pw", key=key if signed else None,
                                   timeout_s=max(30.0, dur_s / 2))
            except CmdError as e:
                rep = {"ok": False, "error": "harness", "msg": str(e)}
            replies.append((cmd, signed, rep))

        plan = [(f, "cmd", c) for f, *c in commands]
        if restart_at is not None:
            plan.append((restart_at, "restart", None))
        for frac, what, arg in sorted(plan, key=lambda p: p[0]):
            delay = t0 + frac * dur_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not proc.running():
                break
            log("  t=%5.1fs %s %s" % (time.monotonic() - t0, what, arg or ""))
            if what == "restart":
                broker.stop()
                time.sleep(1.0)
                broker.start()
            else:
                th = threading.Thread(target=command, args=arg, daemon=True)
                th.start()
                threads.append(th)
        proc.wait(timeout_s or max(60.0, dur_s * 2 + 120 - (time.monotonic() - t0)))
        for th in threads:
            th.join(5)
        want = len(proc.intervals)
        import sqlite3
        con = sqlite3.connect(db)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 20:
            if con.execute("SELECT COUNT(*) FROM intervals").fetchone()[0] >= want:
                break
            time.sleep(0.2)
        con.close()
        time.sleep(0.3)
        res = h.check_meter(db, mid, proc)
        lines = list(proc.other)
        res["exit"] = proc.rc
        res["resets"] = [r[0] for r in proc.host.resets]
        res["memory_errors"] = [ln for ln in lines if "MemoryError" in ln]
        res["commands"] = replies
        res["summary"] = proc.summary
        heap = dict((proc.summary or {}).get("heap") or {})
        heap["largest_free_b"] = proc.largest_free[-1] if proc.largest_free else None
        res["heap"] = heap
        res["reports"] = [dict(r, largest_free_b=lf) for r, lf in
                          zip(proc.heap, proc.largest_free)]
        res["first_record_s"] = proc.first_record_s
        res["other"] = lines[-8:]
        res["wall_s"] = round(time.monotonic() - t0, 1)
        res["heap_kib"] = heap_kib
        return res
    finally:
        if proc is not None:
            proc.kill()
        for i in ing:
            try:
                i.stop()
            except Exception:
                pass
        modem.stop()
        broker.stop()
        store.close()


if __name__ == "__main__":
    hours = float(sys.argv[1]) if len(sys.argv) > 1 else 1.6
    heap = int(sys.argv[2]) if len(sys.argv) > 2 else BOARD_HEAP_KIB
    speed = float(sys.argv[3]) if len(sys.argv) > 3 else 240.0
    out = fit_run(tempfile.mkdtemp(prefix="lipari-fw32-"), hours=hours, heap_kib=heap,
                  speed=speed, log=print)
    print(json.dumps(out, indent=1, default=str))
