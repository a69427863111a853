# The part of comm/wiring.py that runs once, at boot: options and credentials read,
# transports built, the session created and attached. comm.wiring.start_session() imports
# this module, runs build_session() and drops the module again, so that its code holds no
# heap for the meter's life (docs/ram.md). Errors are comm.wiring.WiringError.
import json
import binascii

from comm import wiring
from comm.wiring import WiringError
from comm.transport import Selector
from comm.session import SessionError
from comm.fqueue import FlashQueue
from version import VERSION

_KNOWN = ("wifi", "nbiot", "plc")
_CREDS_KEYS = ("user", "password", "cmd_key", "ca", "cert", "key", "mqtt", "session", "wifi",
               "nbiot", "plc", "selector")



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


def build_session(opts, hw, board, meter, early=None):
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
        s = wiring.WiredSession(mid, mq, sel.connect, q, scfg,
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
