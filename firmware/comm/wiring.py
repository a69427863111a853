# Wires the meter's MQTT session to its uplinks (issue 3): called by main.py when a
# broker is configured.
#
#   from comm.wiring import start_session, EarlySink, finish, comm_stats
#   early = EarlySink()                     # in the sinks given to boot(): keeps the
#   meter = boot(..., sinks + [early])      # boot events until the session exists
#   session = start_session(opts, hw, board, meter, early)
#   asyncio.create_task(session.run())
#   ...
#   unsent = await finish(session, meter, clock, meter_task)   # end of a --days run
#
# Options used (command line on the unix port, /config.json on a board):
#   broker     "HOST:PORT" (port 1883 when left out)
#   id         meter id = MQTT client id = broker user name (the ACL checks it)
#   transport  "wifi", "nbiot", "plc" or a comma list in priority order; default: the
#              board's TRANSPORTS
#   creds      credentials file (below); without one the meter logs in as its id with
#              no password (only an anonymous test broker accepts that)
#   modem/plc  (unix simulation boards) tty of the NB-IoT / PLC emulator: the board opens
#              it and hands it over as hw.modem_uart / hw.plc_uart, as a board hands
#              over its UARTs
#   payload    bin | json;  rt  live reading period in s
#
# Credentials file: JSON, or the lines conf/mosquitto/add-meter.sh prints
# (mqtt_user = "...", mqtt_password = "...", cmd_key = "<64 hex>"). JSON keys:
#   user, password, cmd_key (64 hex digits), ca (CA file: TLS with server check),
#   cert/key (client certificate), and optional overrides per layer:
#   "mqtt" (comm.mqtt.DEFAULTS), "session" (comm.session.DEFAULTS),
#   "wifi" / "nbiot" / "plc" (each transport's config), "selector" (comm.transport).
try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio

import json
import binascii

from comm.transport import Selector
from comm.session import Session, SessionError
from comm.fqueue import FlashQueue
from util import (ticks_ms as _ticks, ticks_diff as _diff, sleep_ms as _sleep_ms,
                  wait_ms as _deadline)
from version import VERSION

_KNOWN = ("wifi", "nbiot", "plc")
_CREDS_KEYS = ("user", "password", "cmd_key", "ca", "cert", "key", "mqtt", "session", "wifi",
               "nbiot", "plc", "selector")


class WiringError(Exception):
    """The meter's network settings are incomplete or contradictory; the message says
    which option or file to fix."""


def parse_broker(s):
    """"host:port" -> (host, port); port 1883 when absent."""
    if not isinstance(s, str) or not s:
        raise WiringError("broker must be HOST:PORT, e.g. --broker 127.0.0.1:1883")
    host, sep, port = s.rpartition(":")
    if not sep:
        return s, 1883
    try:
        p = int(port)
    except ValueError:
        raise WiringError("broker %r: the port %r is not a number" % (s, port))
    if not host or not 0 < p < 65536:
        raise WiringError("broker %r: use HOST:PORT with a port 1..65535" % s)
    return host, p


def _parse_lines(text):
    # add-meter.sh output: `name = "value"    # comment`
    out = {}
    for line in text.split("\n"):
        line = line.strip()
        if not line or line[0] == "#" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        v = v.strip()
        if v.startswith('"'):
            end = v.find('"', 1)
            v = v[1:end] if end > 0 else v[1:]
        else:
            v = v.split("#", 1)[0].strip()
        out[k.strip()] = v
    ren = {"mqtt_user": "user", "mqtt_password": "password"}
    return {ren.get(k, k): v for k, v in out.items()}


def load_creds(path):
    """The credentials file as a dict (see the top of this file). {} for None."""
    if not path:
        return {}
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise WiringError("cannot read the credentials file %s (%s): create it with "
                          "conf/mosquitto/add-meter.sh or fix --creds" % (path, e))
    if text.lstrip().startswith("{"):
        try:
            c = json.loads(text)
        except ValueError as e:
            raise WiringError("credentials file %s is not valid JSON (%s)" % (path, e))
    else:
        c = _parse_lines(text)
    if not isinstance(c, dict):
        raise WiringError("credentials file %s must hold a JSON object" % path)
    for k in c:
        if k not in _CREDS_KEYS:
            raise WiringError("credentials file %s: unknown key %r (known: %s)"
                              % (path, k, ", ".join(_CREDS_KEYS)))
    key = c.get("cmd_key")
    if key is not None:
        try:
            kb = binascii.unhexlify(key)
        except (ValueError, TypeError):
            kb = b""
        if len(kb) != 32:
            raise WiringError("credentials file %s: cmd_key must be 64 hex digits (32 bytes)"
                              % path)
        c["cmd_key"] = kb
    return c


def transport_names(opts, board):
    """Priority list from --transport (comma list) or the board's TRANSPORTS."""
    t = opts.get("transport")
    if t:
        names = t if isinstance(t, (list, tuple)) else [n.strip() for n in t.split(",")]
    else:
        names = list(getattr(board, "TRANSPORTS", ("wifi",)))
    seen = []
    for n in names:
        if n not in _KNOWN:
            raise WiringError("transport %r: use wifi, nbiot or plc" % (n,))
        if n in seen:
            raise WiringError("transport %r is listed twice" % n)
        seen.append(n)
    if not seen:
        raise WiringError("no transport: pass --transport wifi|nbiot|plc")
    return seen, bool(t)


def build_transports(opts, hw, creds, meter_id, board=None):
    """[transport objects], [names in priority order]. A transport named explicitly
    that cannot be built is an error; one only listed by the board is skipped."""
    names, explicit = transport_names(opts, board)
    out = []
    used = []
    for n in names:
        cfg = creds.get(n)
        if n == "wifi":
            from comm.wifi import WifiTransport
            out.append(WifiTransport(cfg, wlan=getattr(hw, "wlan", None)))
        elif n == "nbiot":
            u = getattr(hw, "modem_uart", None)   # hardware: the board hands it over
            if u is None:
                if explicit:
                    raise WiringError("transport nbiot needs the modem: this board has no "
                                      "modem UART; on the unix port pass --modem <pty>")
                continue
            from comm.nbiot import NbiotTransport
            # the modem's PWRKEY, when the board wires it: power-cycles a hung modem
            out.append(NbiotTransport(u, cfg, pwrkey=getattr(hw, "modem_pwrkey", None)))
        else:
            u = getattr(hw, "plc_uart", None)
            if u is None:
                if explicit:
                    raise WiringError("transport plc needs the PLC modem: this board has no "
                                      "PLC UART; on the unix port pass --plc <pty>")
                continue
            from comm.plc import PlcTransport
            c = dict(cfg or {})
            c.setdefault("meter_id", meter_id)
            out.append(PlcTransport(u, c))
        used.append(n)
    if not out:
        raise WiringError("none of the transports %s is fitted on this board"
                          % ", ".join(names))
    return out, used


class EarlySink:
    """Keeps the interval/event records the meter emits while it boots (the "boot" and
    "power_restore" events), before the session exists; start_session() hands them to
    the session in order and removes this sink. At most `limit` records are kept."""

    def __init__(self, limit=16):
        self.buf = []
        self.limit = limit
        self.dropped = 0

    def __call__(self, kind, rec):
        if kind == "rt":
            return
        if len(self.buf) >= self.limit:
            self.dropped += 1
            return
        self.buf.append((kind, rec))


class WiredSession(Session):
    """Session plus the transport Selector's supervision task."""

    selector = None

    async def run(self):
        sup = asyncio.create_task(self.selector.run()) if self.selector else None
        ts = asyncio.create_task(self._time_sync()) if self.selector else None
        try:
            await Session.run(self)
        finally:
            for t in (sup, ts):
                if t is not None:
                    t.cancel()

    def sync_time(self):
        """A meter whose clock was never set (no RTC backup, first boot) takes the
        network's time (modem AT+QLTS / +CCLK, PLC concentrator, ...) from the active
        transport. A clock that is already synced is left alone: jumping a running
        clock is a command's job (`time`), which is signed and logged."""
        meter = self.meter
        if meter is None or self.selector is None or meter.clock.synced:
            return False
        for t in self.selector.order:
            if t.name == self.selector.active:
                net = t.time()
                if net is not None:
                    meter.set_time(net)
                    return True
        return False

    async def _time_sync(self):
        while True:
            try:
                if self.sync_time():
                    return
            except Exception:       # a transport's time() must not end the session
                pass
            await _sleep_ms(5000)

    def set_transport(self, names):
        """The `transport` setting (a command): a new priority order among the fitted
        transports, applied at once. Lasts until the next restart, like the other
        settings; the boot order comes from --transport / config.json."""
        if self.selector is None:
            raise ValueError("this meter's uplink is fixed")
        self.selector.set_priority(names)

    def transport(self):
        return [t.name for t in self.selector.order] if self.selector else []

    def signal(self):
        sel = self.selector
        if sel is None or sel.active is None:
            return None
        for t in sel.order:
            if t.name == sel.active:
                return t.health().get("signal")
        return None


def start_session(opts, hw, board, meter, early=None):
    """Session for `meter` over the transports named by the options (see the top), on
    the board's hardware `hw` (its UARTs, PWRKEY, Wi-Fi, clock, filesystem). Returns it
    attached (sinks + commands); the caller runs session.run() as a task. `early`: the
    EarlySink given to boot(), whose records are handed over and which is removed."""
    o = opts
    host, port = parse_broker(o.get("broker"))
    mid = o.get("id")
    if not mid:
        raise WiringError("--id is needed with --broker: the meter id is the MQTT client id, "
                          "user name and topic")
    creds = load_creds(o.get("creds"))
    user = creds.get("user", mid)
    if user != mid:
        raise WiringError("credentials file %s is for meter %r, not %r: pass that meter's "
                          "file or fix --id" % (o.get("creds"), user, mid))
    transports, names = build_transports(o, hw, creds, mid, board)
    try:
        sel = Selector(transports, names, creds.get("selector"))
    except ValueError as e:
        raise WiringError(str(e))
    mq = {"host": host, "port": port, "user": user, "password": creds.get("password")}
    if creds.get("ca"):
        tls = {"ca": creds["ca"]}
        for k in ("cert", "key"):
            if creds.get(k):
                tls[k] = creds[k]
        mq["tls"] = tls
    for k, v in (creds.get("mqtt") or {}).items():
        mq[k] = v
    scfg = {}
    if o.get("payload"):
        scfg["payload"] = o["payload"]
    if o.get("rt"):
        scfg["rt_s"] = o["rt"]
    for k, v in (creds.get("session") or {}).items():
        scfg[k] = v
    fs = getattr(hw, "fs", "/") or "/"
    fs = fs.rstrip("/")
    q = FlashQueue(fs + "/q")
    try:
        s = WiredSession(mid, mq, sel.connect, q, scfg,
                         {"fw": VERSION, "board": getattr(board, "NAME", None)},
                         clock=getattr(hw, "clock", None))
    except (ValueError, SessionError) as e:   # / MQTT config errors say what to fix
        raise WiringError(str(e))
    s.selector = sel
    s.info["signal"] = s.signal
    s.attach(meter, key=creds.get("cmd_key"), state_path=fs + "/cmdctr")
    if early is not None:
        try:
            meter.sinks.remove(early)
        except ValueError:
            pass
        for kind, rec in early.buf:
            s.sink(kind, rec)
        early.buf = []
    return s


async def finish(s, m, clock, meter_task, drain_ms=60000, close_interval=True,
                 close_ms=5000):
    """End of a run with --days: let metering (meter m, on its clock) go on until the
    next interval closes (so that the meter's totals equal its last interval record),
    stop it, wait (at most drain_ms of real time) until session s's flash queue is
    empty, say offline and disconnect (at most close_ms). A shutdown request
    (close_interval=False) stops metering at once. Returns the number of records left
    unsent (kept on flash for the next start); comm_stats(s) has the session's counters."""
    closed = []

    def _sink(kind, rec):
        if kind == "interval":
            closed.append(rec["seq"])
    m.sinks.append(_sink)
    limit_ms = int(m.cfg["interval_s"]) * 1000 + 3 * int(m.read_ms)
    waited = 0
    while close_interval and not closed and waited < limit_ms:
        await clock.sleep_ms(50)          # virtual time: the meter's own timeline
        waited += 50
    meter_task.cancel()
    m.sinks.remove(_sink)
    t0 = _ticks()
    while len(s.queue) and _diff(_ticks(), t0) < drain_ms:
        await _sleep_ms(50)
    left = len(s.queue)
    try:
        await _deadline(s.close(), close_ms)
    except (asyncio.TimeoutError, OSError):
        pass
    return left


def comm_stats(s):
    """Counters of a session for a summary line: MQTT connects / drops / retransmits,
    records sent, queue state, transport switches."""
    c = s.client.stats
    q = s.queue.stats()
    out = {"connects": c["connects"], "drops": c["drops"], "retransmits": c["retransmits"],
           "sent": s.stats["sent"], "queued": q["queued"], "dropped": q["dropped"],
           "q_errors": s.stats["queue_errors"], "held": len(s._held),
           "last_error": c["last_error"]}
    if s.selector is not None:
        out["switches"] = s.selector.switches
        out["errors"] = dict(s.selector.errors)
    return out
