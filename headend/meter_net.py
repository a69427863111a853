"""Host side of a virtual meter's uplink, for `lipari meter --broker ... --transport ...`.

The firmware on the unix port reaches the broker through
  wifi   the host's own network (nothing to start here);
  nbiot  a BG95 modem emulator (sim/modem.py) on a pty: the firmware opens the pty as
         its modem UART (--modem PATH) and the emulator opens the TCP connection;
  plc    a PLC concentrator bridge (sim/plc.py) on a pty (--plc PATH).

attach_transport(args) starts what the transport needs in this process (threads), puts
the pty path in args.modem / args.plc and returns helper objects with .stop() (and
.control("hang"), .control("slow_ms 300"), ... to inject faults: the emulators' control
words). write_creds() writes the per-meter credentials file the firmware reads (--creds).
"""
import json
import os


class NetError(Exception):
    """The virtual meter's network helper could not start; the message says why."""


class Helper:
    """One running emulator: .kind ("nbiot" | "plc"), .path (pty), .emu, .control(line)."""

    def __init__(self, kind, emu):
        self.kind = kind
        self.emu = emu
        self.path = emu.path

    def control(self, line):
        """A control line as the emulators read on stdin: "detach", "cme QIOPEN 566 2",
        "lose_urc recv 3", "slow_ms 300", "hang", "unhang", "clear" (modem);
        "loss 0.2", "corrupt 0.1", "cut", "uncut" (PLC)."""
        parts = line.split()
        if not parts:
            return
        if self.kind == "nbiot":
            self.emu.set_fault(parts[0], *parts[1:])
        else:
            self.emu.set(parts[0], *parts[1:])

    def stop(self):
        self.emu.stop()


def start_modem(faults=None, **kw):
    """BG95 emulator thread; faults: "slow_ms=300,cme=QIOPEN:566:1" (sim/modem.py)."""
    from sim.modem import ModemEmu
    try:
        emu = ModemEmu(**kw)
    except OSError as e:
        raise NetError("cannot create the modem emulator's pty (%s)" % e)
    if faults:
        emu.faults(faults)
    return Helper("nbiot", emu.start())


def start_plc(loss=0.0, corrupt=0.0, seed=None, **kw):
    """PLC concentrator bridge thread (sim/plc.py)."""
    from sim.plc import Concentrator
    try:
        c = Concentrator(loss, corrupt, seed, **kw)
    except OSError as e:
        raise NetError("cannot create the PLC bridge's pty (%s)" % e)
    return Helper("plc", c.start())


def attach_transport(args):
    """Start the emulator args.transport needs; sets args.modem / args.plc. Returns the
    helpers to stop when the meter ends ([] for wifi or no transport)."""
    t = getattr(args, "transport", None)
    if t == "nbiot" and not getattr(args, "modem", None):
        h = start_modem()
        args.modem = h.path
        return [h]
    if t == "plc" and not getattr(args, "plc", None):
        # a meter that talks TLS (its credentials name a CA) over PLC: the concentrator
        # makes the TLS connection to the broker and verifies it against that CA
        # (docs/transports.md "PLC: trust boundary")
        h = start_plc(upstream_ca=_creds_ca(getattr(args, "creds", None)))
        args.plc = h.path
        return [h]
    return []


def _creds_ca(path):
    try:
        with open(path) as f:
            c = json.load(f)
    except (TypeError, OSError, ValueError):
        return None                   # no file, or the add-meter.sh lines: no TLS
    return c.get("ca") if isinstance(c, dict) else None


def write_creds(path, meter_id, password=None, cmd_key=None, ca=None, **layers):
    """The meter's credentials file (JSON, read by firmware/comm/wiring.py).
    cmd_key: 32 bytes or 64 hex digits. layers: optional overrides "mqtt", "session",
    "wifi", "nbiot", "plc", "selector" (dicts)."""
    c = {"user": meter_id}
    if password is not None:
        c["password"] = password
    if cmd_key is not None:
        c["cmd_key"] = cmd_key.hex() if isinstance(cmd_key, (bytes, bytearray)) else cmd_key
    if ca:
        c["ca"] = ca
    for k, v in layers.items():
        if v is not None:
            c[k] = v
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(c, f, indent=1)
    return path
