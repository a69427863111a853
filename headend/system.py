"""`lipari system` (what `make run` starts): broker + head-end (ingest + web) + virtual meters.

    lipari system                      # Mosquitto if installed, else the embedded broker
    lipari system --meters 2 --speed 600 --web-port 8080

Starts, in this order, each in its own process group with its output in
<workdir>/logs/<name>.log:
  1. the broker: Mosquitto (a throwaway config: 127.0.0.1 only, anonymous, no persistence)
     when it is installed, otherwise headend/broker.py; or none with --broker HOST:PORT;
  2. ingest (`lipari headend`), 3. the web server (`lipari web`), printing the dashboard URL;
  4. five virtual meters by default (single- and three-phase, different load profiles,
     every transport), each `lipari meter ...`.
Runs until Ctrl-C / SIGTERM / --duration, then stops every process it started: SIGTERM to
each process group (meters first, broker last, so that ingest can take what is in flight),
SIGKILL to groups still alive after --grace-s. If `lipari system` itself is killed with
SIGKILL, the kernel sends SIGTERM to its children (PR_SET_PDEATHSIG) so that nothing is
left behind.

Every command line is a template (--broker-cmd, --ingest-cmd, --web-cmd, --meter-cmd) with
the fields {python} {broker} (HOST:PORT) {mqtt_host} {port} {host} {db} {web_port} {id} {board} {profile} {transport}
{speed} {workdir}, so that any part can be replaced (tests use stubs).
"""
import argparse
import atexit
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from headend import ROOT

DEFAULT_FLEET = (
    # id, board, profile, transport
    {"id": "meter-1", "board": "unix_sim_1ph", "profile": "household", "transport": "wifi"},
    {"id": "meter-2", "board": "unix_sim_1ph", "profile": "pv", "transport": "nbiot"},
    {"id": "meter-3", "board": "unix_sim_3ph", "profile": "motor", "transport": "plc"},
    {"id": "meter-4", "board": "unix_sim_3ph", "profile": "household", "transport": "wifi"},
    {"id": "meter-5", "board": "unix_sim_1ph", "profile": "constant", "transport": "nbiot"},
)

INGEST_CMD = "{python} -m headend.cli headend --host {mqtt_host} --port {port} --db {db}"
WEB_CMD = "{python} -m headend.cli web --db {db} --host {host} --port {web_port} --broker {broker}"
# --heap 2m: on the unix port the simulated chips live in the same MicroPython heap as the
# firmware with its MQTT session; at 256k (a board's RAM, the runner's default) meter +
# simulator + session ran out of memory at start (MemoryError in comm/wiring.py).
METER_CMD = ("{python} -m headend.cli meter --broker {broker} --transport {transport} --id {id} "
             "--board {board} --profile {profile} --speed {speed} --state {workdir}/{id}.flash "
             "--heap 2m")
EMBEDDED_CMD = "{python} -m headend.broker --host 127.0.0.1 --port {port}"
MOSQUITTO_CMD = "mosquitto -c {workdir}/mosquitto.conf"


class SystemError_(Exception):
    """Something `lipari system` needs is missing or failed; the message says what to do."""


def _pdeathsig():
    """In the child, before exec: die with SIGTERM when the parent dies (Linux only)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG
    except Exception:
        pass


def port_free(host, port):
    s = socket.socket()
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_port(host, want):
    """want if it is free, else (or with want 0) a free port chosen by the kernel."""
    if want and port_free(host, want):
        return want
    s = socket.socket()
    s.bind((host, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(host, port, proc, timeout_s, name):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection((host, port), 0.3).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise SystemError_("%s did not listen on %s:%d within %s s" % (name, host, port, timeout_s))


class Child:
    def __init__(self, name, argv, proc, log, critical):
        self.name = name
        self.argv = argv
        self.proc = proc
        self.log = log
        self.critical = critical
        self.reported = False

    def tail(self, n=8):
        try:
            with open(self.log, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 4000))
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join("    " + x for x in lines[-n:])
        except OSError:
            return "    (no log)"


def reaper(grace_s):
    """`python -m headend.system --reaper`: reads process group ids from stdin, one a line,
    until EOF, which comes when `lipari system` is gone however it ended (even SIGKILL);
    then terminates every group it was told about that is still alive."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is for the supervisor
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups = []
    for line in sys.stdin:
        if line.strip().isdigit():
            groups.append(int(line))
    live = [g for g in groups if _group_alive(g)]
    for g in live:
        _killpg(g, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_group_alive(g) for g in live):
        time.sleep(0.1)
    for g in live:
        _killpg(g, signal.SIGKILL)
    return 0


class Supervisor:
    """Starts processes in their own process groups and stops every one of them.

    Three layers, so that nothing outlives `lipari system`: stop_all() (normal exit, atexit,
    SIGTERM/SIGINT/SIGHUP), PR_SET_PDEATHSIG on each child, and a reaper process that
    terminates every group once the supervisor's pipe to it closes (SIGKILL, crash)."""

    def __init__(self, logdir, out=sys.stdout, grace_s=5.0, use_reaper=True):
        self.logdir = logdir
        self.out = out
        self.grace_s = grace_s
        self.children = []
        self._stopped = False
        os.makedirs(logdir, exist_ok=True)
        self.reaper = None
        if use_reaper:
            self.reaper = subprocess.Popen(
                [sys.executable, "-m", "headend.system", "--reaper", "--grace-s", str(grace_s)],
                stdin=subprocess.PIPE, cwd=ROOT, start_new_session=True,
                env=dict(os.environ, PYTHONPATH=ROOT), text=True)

    def say(self, msg):
        print(msg, file=self.out, flush=True)

    def spawn(self, name, argv, critical=True, env=None):
        log = os.path.join(self.logdir, name + ".log")
        e = dict(os.environ)
        e["PYTHONUNBUFFERED"] = "1"
        e.update(env or {})
        pp = e.get("PYTHONPATH")
        e["PYTHONPATH"] = ROOT + (os.pathsep + pp if pp else "")
        try:
            with open(log, "ab") as f:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                        stderr=subprocess.STDOUT, cwd=ROOT, env=e,
                                        start_new_session=True, preexec_fn=_pdeathsig)
        except OSError as ex:
            raise SystemError_("cannot start %s (%s): %s" % (name, argv[0], ex))
        c = Child(name, argv, proc, log, critical)
        self.children.append(c)
        self._write_pids()
        if self.reaper is not None:
            try:
                self.reaper.stdin.write("%d\n" % proc.pid)
                self.reaper.stdin.flush()
            except (OSError, ValueError):
                pass
        return c

    def _write_pids(self):
        """<workdir>/pids.json: name -> pid (= process group id) of what is running."""
        pids = {c.name: c.proc.pid for c in self.children}
        if self.reaper is not None:
            pids["reaper"] = self.reaper.pid
        try:
            with open(os.path.join(os.path.dirname(self.logdir), "pids.json"), "w") as f:
                json.dump(pids, f)
        except OSError:
            pass

    def check(self):
        """Report children that exited; returns the first critical one that did."""
        dead = None
        for c in self.children:
            rc = c.proc.poll()
            if rc is not None and not c.reported:
                c.reported = True
                self.say("lipari system: %s exited with code %s; last lines of %s:\n%s"
                         % (c.name, rc, c.log, c.tail()))
                if c.critical and dead is None:
                    dead = c
        return dead

    def stop_all(self):
        """SIGTERM every process group (newest first), SIGKILL what is left after grace_s."""
        if self._stopped:
            return
        self._stopped = True
        live = []
        for c in reversed(self.children):
            if _group_alive(c.proc.pid) or c.proc.poll() is None:
                _killpg(c.proc.pid, signal.SIGTERM)
                live.append(c)
        deadline = time.monotonic() + self.grace_s
        for c in live:
            left = max(0.0, deadline - time.monotonic())
            try:
                c.proc.wait(left)
            except subprocess.TimeoutExpired:
                pass
            while _group_alive(c.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for c in live:
            if c.proc.poll() is None or _group_alive(c.proc.pid):
                self.say("lipari system: %s did not stop within %s s: killed" % (c.name,
                                                                                 self.grace_s))
                _killpg(c.proc.pid, signal.SIGKILL)
                try:
                    c.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if self.reaper is not None:              # everything is stopped: let it go
            try:
                self.reaper.stdin.close()
                self.reaper.wait(self.grace_s + 2)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def mosquitto_conf(path, port, logdir):
    """A throwaway Mosquitto config for a local demo: loopback only, anonymous, in memory.
    The production config (passwords, ACL, persistence) is conf/mosquitto/."""
    lines = ["# written by lipari system; loopback only, for the local demo",
             "per_listener_settings false", "listener %d 127.0.0.1" % port,
             "allow_anonymous true", "persistence false", "max_queued_messages 0",
             "max_inflight_messages 20", "log_dest stderr", "log_type error",
             "log_type warning", "log_type notice"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")       # else it drops to user mosquitto
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_fleet(a):
    if a.fleet:
        try:
            with open(a.fleet) as f:
                fleet = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemError_("cannot read --fleet %s: %s (a JSON list of {id, board, profile, "
                               "transport})" % (a.fleet, e))
    else:
        fleet = [dict(m) for m in DEFAULT_FLEET]
    if a.meters is not None:
        if a.meters > len(fleet):
            base = list(fleet)
            for k in range(len(fleet), a.meters):
                m = dict(base[k % len(base)])
                m["id"] = "meter-%d" % (k + 1)
                fleet.append(m)
        fleet = fleet[:a.meters]
    for m in fleet:
        for key in ("id", "board", "profile", "transport"):
            if not isinstance(m, dict) or not m.get(key):
                raise SystemError_("fleet entry %r needs id, board, profile and transport" % (m,))
    return fleet


def fmt(template, fields):
    try:
        return [x.format(**fields) for x in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as e:
        raise SystemError_("bad command template %r: %s (fields: %s)"
                           % (template, e, ", ".join(sorted(fields))))


def run(a, out=sys.stdout):
    workdir = os.path.abspath(a.workdir)
    os.makedirs(workdir, exist_ok=True)
    sup = Supervisor(os.path.join(workdir, "logs"), out, a.grace_s)
    atexit.register(sup.stop_all)
    fields = {"python": sys.executable, "host": a.host, "db": a.db, "workdir": workdir,
              "speed": a.speed}

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    old = {}
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            old[s] = signal.signal(s, on_signal)
        except (ValueError, OSError):      # not the main thread
            pass

    rc = 0
    try:
        # 1. broker
        kind = a.broker
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") else "embedded"
        if kind in ("mosquitto", "embedded"):
            port = pick_port("127.0.0.1", a.mqtt_port)
            if a.mqtt_port and port != a.mqtt_port:
                sup.say("lipari system: port %d is taken (another broker?); MQTT on %d instead"
                        % (a.mqtt_port, port))
            fields.update(port=port, mqtt_host="127.0.0.1", broker="127.0.0.1:%d" % port)
            if kind == "mosquitto":
                if not shutil.which("mosquitto"):
                    raise SystemError_("--broker mosquitto: mosquitto is not installed "
                                       "(apt-get install mosquitto) ; or use --broker embedded")
                mosquitto_conf(os.path.join(workdir, "mosquitto.conf"), port, sup.logdir)
                tmpl = a.broker_cmd or MOSQUITTO_CMD
            else:
                tmpl = a.broker_cmd or EMBEDDED_CMD
            b = sup.spawn("broker", fmt(tmpl, fields))
            if not wait_port("127.0.0.1", port, b.proc, 10, "the broker"):
                raise SystemError_("the broker (%s) exited at start:\n%s" % (kind, b.tail()))
            sup.say("lipari system: broker (%s) on 127.0.0.1:%d" % (kind, port))
        else:
            host, _, p = kind.rpartition(":")
            if not host or not p.isdigit():
                raise SystemError_("--broker must be auto, mosquitto, embedded or HOST:PORT")
            fields.update(port=int(p), mqtt_host=host, broker=kind)
            sup.say("lipari system: using the broker at %s" % kind)

        # 2. ingest, 3. web
        if not a.no_ingest:
            sup.spawn("ingest", fmt(a.ingest_cmd or INGEST_CMD, fields))
        web_port = pick_port(a.host, a.web_port)
        if a.web_port and web_port != a.web_port:
            sup.say("lipari system: port %d is taken; the dashboard uses %d instead"
                    % (a.web_port, web_port))
        fields["web_port"] = web_port
        w = sup.spawn("web", fmt(a.web_cmd or WEB_CMD, fields))
        url = "http://%s:%d" % (a.host, web_port)
        if not wait_port(a.host, web_port, w.proc, 20, "the web server"):
            raise SystemError_("the web server exited at start:\n%s" % w.tail())

        # 4. meters
        fleet = load_fleet(a)
        for m in fleet:
            f = dict(fields)
            f.update(m)
            sup.spawn(m["id"] if m["id"].startswith("meter") else "meter-" + m["id"],
                      fmt(a.meter_cmd or METER_CMD, f), critical=False)
        sup.say("lipari system: %d virtual meter%s (%s)" % (
            len(fleet), "" if len(fleet) == 1 else "s",
            ", ".join("%s %s/%s/%s" % (m["id"], m["board"], m["profile"], m["transport"])
                      for m in fleet)))
        sup.say("lipari system: logs in %s" % sup.logdir)
        sup.say("")
        sup.say("    Dashboard: %s/" % url)
        sup.say("")
        sup.say("lipari system: running; Ctrl-C stops everything")
        deadline = time.monotonic() + a.duration if a.duration else None
        next_status = time.monotonic() + a.status_s if a.status_s else None
        while deadline is None or time.monotonic() < deadline:
            if next_status is not None and time.monotonic() >= next_status:
                next_status = time.monotonic() + a.status_s
                sup.say(fleet_line(url))
            dead = sup.check()
            if dead is not None:
                sup.say("lipari system: %s is needed and stopped; stopping everything" % dead.name)
                rc = 1
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        sup.say("\nlipari system: stopping")
    except SystemError_ as e:
        sup.say("lipari system: %s" % e)
        rc = 1
    finally:
        for s in old:                        # a second Ctrl-C must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        sup.stop_all()
        for s, h in old.items():
            signal.signal(s, h)
        sup.say("lipari system: stopped %d process%s" % (len(sup.children),
                                                          "" if len(sup.children) == 1 else "es"))
    return rc


def fleet_line(url):
    """One line about the fleet from the web API (what `make run` prints now and then)."""
    try:
        with urllib.request.urlopen(url + "/api/v1/meters", timeout=5) as r:
            meters = json.loads(r.read())
    except Exception as e:
        return "lipari system: the dashboard does not answer (%s)" % e
    online = [m for m in meters if m.get("online")]
    p_w = sum(m.get("p_w") or 0 for m in online)
    newest = max([m.get("last_interval_t") or 0 for m in meters] or [0])
    return "lipari system: %d/%d meters online, fleet %.2f kW, newest interval %s" % (
        len(online), len(meters), p_w / 1000.0,
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(newest)) if newest else "none yet")


def parser():
    p = argparse.ArgumentParser(prog="lipari system", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="auto",
                   help="auto (Mosquitto if installed, else embedded), mosquitto, embedded, or "
                        "HOST:PORT of a running broker")
    p.add_argument("--mqtt-port", type=int, default=1883, help="port for the broker we start")
    p.add_argument("--host", default="127.0.0.1", help="dashboard address (default 127.0.0.1)")
    p.add_argument("--web-port", type=int, default=8000, help="dashboard port (default 8000)")
    p.add_argument("--db", default="sqlite:///var/lipari.db", help="database URL")
    p.add_argument("--workdir", default=os.path.join(ROOT, "var", "system"),
                   help="logs, meter flash images, broker config (default var/system)")
    p.add_argument("--meters", type=int, help="number of virtual meters (default 5)")
    p.add_argument("--fleet", help="JSON list of meters [{id, board, profile, transport}]")
    p.add_argument("--speed", type=float, default=60.0,
                   help="simulated seconds per real second for the meters (default 60)")
    p.add_argument("--duration", type=float, help="stop by itself after this many seconds")
    p.add_argument("--grace-s", type=float, default=5.0,
                   help="how long processes get to stop before SIGKILL (default 5)")
    p.add_argument("--no-ingest", action="store_true", help="do not start ingest")
    p.add_argument("--status-s", type=float, default=30.0,
                   help="print a line about the fleet this often (default 30 s, 0 = never)")
    p.add_argument("--broker-cmd", help="command template for the broker we start")
    p.add_argument("--ingest-cmd", help="command template for ingest (default: %s)" % INGEST_CMD)
    p.add_argument("--web-cmd", help="command template for the web server")
    p.add_argument("--meter-cmd", help="command template for one meter")
    p.add_argument("--reaper", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    if a.reaper:
        return reaper(a.grace_s)
    if a.meters is not None and a.meters < 0:
        parser().error("--meters must be 0 or more")
    try:
        a.fleet_list = load_fleet(a)
    except SystemError_ as e:
        print("lipari system: %s" % e, file=sys.stderr)
        return 2
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
