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

from comm.session import Session
from util import sleep_ms as _sleep_ms   # finish() imports what only it needs: three
#                                          globals fewer keep the module's table at 12 slots


# The meter's network settings are incomplete or contradictory; the message says which
# option or file to fix. A ValueError, no class of its own (~100 bytes of heap for the
# meter's lifetime; docs/ram.md): main.py turns it into a ConfigError at boot.
WiringError = ValueError


class EarlySink:
    """Keeps the interval/event records the meter emits while it boots (the "boot" and
    "power_restore" events), before the session exists; start_session() hands them to
    the session in order and removes this sink. At most `limit` records are kept."""

    def __init__(self, limit):
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
    EarlySink given to boot(), whose records are handed over and which is removed.
    The work is comm/wiring_boot.py, imported for this call and dropped after it: it
    runs once, and its code would otherwise hold heap for the meter's life."""
    from comm.wiring_boot import build_session
    try:
        return build_session(opts, hw, board, meter, early)
    finally:
        build_session = None
        from util import unload
        unload("comm.wiring_boot")


async def finish(s, m, clock, meter_task, drain_ms, close_interval, close_ms):
    """End of a run with --days: let metering (meter m, on its clock) go on until the
    next interval closes (so that the meter's totals equal its last interval record),
    stop it, wait (at most drain_ms of real time) until session s's flash queue is
    empty, say offline and disconnect (at most close_ms). A shutdown request
    (close_interval=False) stops metering at once. Returns the number of records left
    unsent (kept on flash for the next start); comm_stats(s) has the session's counters."""
    from util import ticks_ms as _ticks, ticks_diff as _diff, wait_ms as _deadline
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
           "task_errors": s.stats["task_errors"], "last_error": c["last_error"]}
    if s.selector is not None:
        out["switches"] = s.selector.switches
        out["errors"] = dict(s.selector.errors)
    return out
