"""`lipari system` (what `make run` starts): broker + head-end (ingest + web) + virtual meters.

    lipari system                      # Mosquitto (plain + TLS listener on 127.0.0.1)
    lipari system --meters 2 --speed 600 --web-port 8080

Composed of small parts, each starting one thing under a Supervisor (headend/supervisor.py:
process groups, logs in <workdir>/logs/<name>.log, nothing left behind):
  start_broker   Mosquitto with a throwaway config (127.0.0.1 only, anonymous, in memory)
                 with a plain listener and a TLS listener whose CA and certificate are made
                 at the first run into var/tls (conf/mosquitto/make-certs.sh); or none with
                 --broker HOST:PORT;
  start_ingest   `lipari headend` (over TLS to the broker we started);
  first_admin    on a fresh database, an admin user whose password is printed once;
  start_web      `lipari web` (commands over TLS), printing the dashboard URL;
  start_fleet    five virtual meters by default (single- and three-phase, different load
                 profiles, every transport), each `lipari meter ...`;
  watch          until Ctrl-C / SIGTERM / SIGHUP / --duration: a status line now and then,
                 and a needed part (broker, ingest, web) that exits stops everything.
Then every process it started is stopped: SIGTERM to each process group, a wave at a time
(the meters together first, so that they say goodbye to a running broker; then web,
ingest, the broker last, so that ingest can take what is in flight), SIGKILL to what of a
wave is left after --grace-s.

Every command line is a template (--broker-cmd, --ingest-cmd, --web-cmd, --meter-cmd) with
the fields {python} {broker} (HOST:PORT for the meters) {mqtt_host} {port} {tls_port}
{client_port} (the port ingest and web use) {tls_args} (--tls-ca=PATH or nothing) {ca}
{host} {db} {web_port} {id} {board} {profile} {transport} {speed} {workdir}, so that any
part can be replaced (tests use stubs). A token that formats to nothing is dropped.
"""
import argparse
import atexit
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from headend import ROOT
from headend.supervisor import (SystemError_, Supervisor, pick_port, reaper,  # noqa: F401
                                wait_port)

DEFAULT_FLEET = (
    # id, board, profile, transport
    {"id": "meter-1", "board": "unix_sim_1ph", "profile": "household", "transport": "wifi"},
    {"id": "meter-2", "board": "unix_sim_1ph", "profile": "pv", "transport": "nbiot"},
    {"id": "meter-3", "board": "unix_sim_3ph", "profile": "motor", "transport": "plc"},
    {"id": "meter-4", "board": "unix_sim_3ph", "profile": "household", "transport": "wifi"},
    {"id": "meter-5", "board": "unix_sim_1ph", "profile": "constant", "transport": "nbiot"},
)

INGEST_CMD = ("{python} -m headend.cli headend --host {mqtt_host} --port {client_port} --db {db} "
              "{tls_args}")
WEB_CMD = ("{python} -m headend.cli web --db {db} --host {host} --port {web_port} "
           "--broker {mqtt_host}:{client_port} {tls_args}")
# The meter's heap is lipari meter's default (the firmware and its MQTT session: the
# simulated chips run in the meter's host process, docs/decisions/0007).
METER_CMD = ("{python} -m headend.cli meter --broker {broker} --transport {transport} --id {id} "
             "--board {board} --profile {profile} --speed {speed} --state {workdir}/{id}.flash")
MOSQUITTO_CMD = "mosquitto -c {workdir}/mosquitto.conf"
MAKE_CERTS = os.path.join(ROOT, "conf", "mosquitto", "make-certs.sh")
TLS_DIR = os.path.join(ROOT, "var", "tls")


def make_tls(tls_dir=TLS_DIR):
    """The demo broker's CA and certificate for 127.0.0.1 / localhost, made once (the CA is
    kept across runs, so a client that trusts var/tls/ca.crt keeps working). -> CA path."""
    if not shutil.which("openssl"):
        raise SystemError_("openssl is needed for the broker's TLS listener "
                           "(apt-get install openssl; make setup does it)")
    ca = os.path.join(tls_dir, "ca.crt")
    steps = [("ca", tls_dir)]
    if not os.path.exists(os.path.join(tls_dir, "server.crt")):
        steps.append(("server", tls_dir, "127.0.0.1", "localhost"))
    for step in steps:
        r = subprocess.run([MAKE_CERTS] + list(step), capture_output=True, text=True)
        if r.returncode:
            raise SystemError_("make-certs.sh %s failed: %s" % (step[0], r.stderr.strip()))
    return ca


def mosquitto_conf(path, port, logdir, tls_port=None, tls_dir=TLS_DIR):
    """A throwaway Mosquitto config for a local demo: loopback only, anonymous, in memory;
    with tls_port also the TLS listener (certificates in tls_dir, make_tls()). The
    production config (passwords, ACL, persistence, TLS) is conf/mosquitto/."""
    lines = ["# written by lipari system; loopback only, for the local demo",
             "per_listener_settings false", "listener %d 127.0.0.1" % port]
    if tls_port:
        lines += ["listener %d 127.0.0.1" % tls_port,
                  "cafile %s" % os.path.join(tls_dir, "ca.crt"),
                  "certfile %s" % os.path.join(tls_dir, "server.crt"),
                  "keyfile %s" % os.path.join(tls_dir, "server.key"),
                  "tls_version tlsv1.2"]
    lines += ["allow_anonymous true", "persistence false", "max_queued_messages 0",
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
    """A command template -> argv; a token that formats to nothing is dropped."""
    try:
        return [x for x in (t.format(**fields) for t in shlex.split(template)) if x]
    except (KeyError, IndexError, ValueError) as e:
        raise SystemError_("bad command template %r: %s (fields: %s)"
                           % (template, e, ", ".join(sorted(fields))))


# -- the parts ---------------------------------------------------------------------------
def start_broker(sup, a, fields):
    """Mosquitto on free loopback ports (plain for the meters, TLS for the head-end), or
    the running broker a.broker names. Fills the broker fields of the templates."""
    kind = a.broker
    if kind == "embedded":
        raise SystemError_("the embedded Python broker was removed: Lipari runs on Mosquitto "
                           "(apt-get install mosquitto; docs/decisions/0004-broker-mosquitto-only.md)")
    if kind in ("auto", "mosquitto"):
        if not shutil.which("mosquitto") and not a.broker_cmd:
            raise SystemError_("Mosquitto is not installed: apt-get install mosquitto (make "
                               "setup does it as root), or give --broker HOST:PORT")
        port = pick_port("127.0.0.1", a.mqtt_port)
        if a.mqtt_port and port != a.mqtt_port:
            sup.say("lipari system: port %d is taken (another broker?); MQTT on %d instead"
                    % (a.mqtt_port, port))
        tls_port = pick_port("127.0.0.1", 0 if a.mqtt_port == 0 else a.mqtt_tls_port)
        ca = make_tls(a.tls_dir)
        fields.update(port=port, tls_port=tls_port, client_port=tls_port, ca=ca,
                      tls_args="--tls-ca=%s" % ca, mqtt_host="127.0.0.1",
                      broker="127.0.0.1:%d" % port)
        mosquitto_conf(os.path.join(fields["workdir"], "mosquitto.conf"), port, sup.logdir,
                       tls_port, a.tls_dir)
        b = sup.spawn("broker", fmt(a.broker_cmd or MOSQUITTO_CMD, fields))
        for p in (port, tls_port):
            if not wait_port("127.0.0.1", p, b.proc, 10, "the broker"):
                raise SystemError_("the broker exited at start:\n%s" % b.tail())
        sup.say("lipari system: broker (mosquitto) on 127.0.0.1:%d, TLS on 127.0.0.1:%d (CA %s)"
                % (port, tls_port, ca))
        return
    host, _, p = kind.rpartition(":")
    if not host or not p.isdigit():
        raise SystemError_("--broker must be auto, mosquitto or HOST:PORT")
    fields.update(port=int(p), tls_port="", client_port=int(p), ca="", tls_args="",
                  mqtt_host=host, broker=kind)
    sup.say("lipari system: using the broker at %s" % kind)


def first_admin(db):
    """On a fresh database: create the first admin; -> its password (None when the
    database already has users, or is not ours to prepare)."""
    from headend.store import StoreError
    from headend.users import Users
    try:
        return Users(db).ensure_first_admin()
    except StoreError as e:
        raise SystemError_("cannot prepare the users in %s: %s" % (db, e))


def start_ingest(sup, a, fields):
    if not a.no_ingest:
        sup.spawn("ingest", fmt(a.ingest_cmd or INGEST_CMD, fields))


def start_web(sup, a, fields):
    """The web server on a.web_port (or a free one); -> its URL once it listens."""
    web_port = pick_port(a.host, a.web_port)
    if a.web_port and web_port != a.web_port:
        sup.say("lipari system: port %d is taken; the dashboard uses %d instead"
                % (a.web_port, web_port))
    fields["web_port"] = web_port
    w = sup.spawn("web", fmt(a.web_cmd or WEB_CMD, fields))
    if not wait_port(a.host, web_port, w.proc, 20, "the web server"):
        raise SystemError_("the web server exited at start:\n%s" % w.tail())
    return "http://%s:%d" % (a.host, web_port)


def start_fleet(sup, a, fields):
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
    return fleet


def watch(sup, a, status):
    """Until --duration (or a signal): status() printed every --status-s; returns 1 when a
    needed part exited, 0 at the end of --duration."""
    deadline = time.monotonic() + a.duration if a.duration else None
    next_status = time.monotonic() + a.status_s if a.status_s else None
    while deadline is None or time.monotonic() < deadline:
        if next_status is not None and time.monotonic() >= next_status:
            next_status = time.monotonic() + a.status_s
            sup.say(status())
        dead = sup.check()
        if dead is not None:
            sup.say("lipari system: %s is needed and stopped; stopping everything" % dead.name)
            return 1
        time.sleep(0.2)
    return 0


def interrupt_on_signals():
    """SIGTERM, SIGHUP and SIGINT raise KeyboardInterrupt from now on. -> the old handlers."""
    def on_signal(signum, frame):
        raise KeyboardInterrupt
    old = {}
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        try:
            old[s] = signal.signal(s, on_signal)
        except (ValueError, OSError):      # not the main thread
            pass
    return old


def run(a, out=sys.stdout):
    workdir = os.path.abspath(a.workdir)
    os.makedirs(workdir, exist_ok=True)
    sup = Supervisor(os.path.join(workdir, "logs"), out, a.grace_s)
    atexit.register(sup.stop_all)
    fields = {"python": sys.executable, "host": a.host, "db": a.db, "workdir": workdir,
              "speed": a.speed}
    old = interrupt_on_signals()
    rc = 0
    try:
        start_broker(sup, a, fields)
        start_ingest(sup, a, fields)
        password = first_admin(a.db)
        url = start_web(sup, a, fields)
        start_fleet(sup, a, fields)
        sup.say("lipari system: logs in %s" % sup.logdir)
        sup.say("")
        sup.say("    Dashboard: %s/" % url)
        if password:
            sup.say("    Log in as admin with password %s" % password)
            sup.say("    (shown this once; `lipari user passwd admin` sets a new one,")
            sup.say("     `lipari user add NAME --role viewer|operator|admin` adds users)")
        sup.say("")
        sup.say("lipari system: running; Ctrl-C stops everything")
        rc = watch(sup, a, FleetStatus(a.db))
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


class FleetStatus:
    """One line about the fleet (what `make run` prints now and then), read from the
    database ingest writes (the web API needs a login)."""

    def __init__(self, db):
        self.db = db
        self.store = None

    def __call__(self):
        try:
            if self.store is None:
                from headend.queries import Queries
                from headend.store_pg import open_store
                self.store = open_store(self.db)
                self.q = Queries(self.store)     # reads only what is new each time
            meters = self.q.meters()
            newest = {}
            for m in meters:
                last = self.q.last_interval(m["id"])
                newest[m["id"]] = last["t_end"] if last else 0
        except Exception as e:
            return "lipari system: cannot read the fleet from %s (%s)" % (self.db, e)
        return fleet_line(meters, max(newest.values() or [0]))


def fleet_line(meters, newest):
    online = [m for m in meters if m.get("online")]
    p_w = sum(m.get("p_w") or 0 for m in online)
    return "lipari system: %d/%d meters online, fleet %.2f kW, newest interval %s" % (
        len(online), len(meters), p_w / 1000.0,
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(newest)) if newest else "none yet")


def parser():
    p = argparse.ArgumentParser(prog="lipari system", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="auto",
                   help="auto or mosquitto (start Mosquitto), or HOST:PORT of a running broker")
    p.add_argument("--mqtt-port", type=int, default=1883, help="port for the broker we start "
                   "(0: free ports for both listeners)")
    p.add_argument("--mqtt-tls-port", type=int, default=8883, help="its TLS listener")
    p.add_argument("--tls-dir", default=TLS_DIR, help="CA and broker certificate, made at the "
                   "first run (default var/tls)")
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
    if a.reaper:                          # older name of `python -m headend.supervisor`
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
