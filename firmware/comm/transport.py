# Transport selection and failover for the meter's uplink (issue 3, part B).
#
# Every transport (comm/wifi.py, comm/nbiot.py, comm/plc.py) offers the same small
# interface, so that the MQTT client never knows which link carries its bytes:
#
#   t.name                       "wifi" | "nbiot" | "plc"
#   await t.up(deadline_ms)      bring the link up within deadline_ms (a budget in ms,
#                                not an absolute tick); True when usable
#   await t.check()              refresh the health figures (signal, registration)
#   t.health()                   dict(ok=bool, signal=dBm or None, detail=str)
#   await t.connect(host, port, tls=None) -> Conn
#   await t.down()
#   t.time()                     network time (epoch s) or None
#
#   Conn: await send(buf); await recv_into(buf, timeout_ms) -> n (0 = nothing yet);
#         close(); name.  Failures raise OSError (TransportError is one).
#
# Selector picks the first healthy transport of a priority list, fails over to the
# next when it breaks, and goes back to a better one once a periodic probe finds it
# healthy again. Nothing here blocks the loop: all waits are asyncio sleeps with a
# deadline, because the metering task shares the core (see docs/transports.md).

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio

try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

_DEBUG = const(False)
del const       # folded at compile time: the name would be an 18th global (23 slots, not 17)

# ticks, sleeping, deadlines, civil dates: util.py (re-exported for plc / nbiot / wifi)
from util import (ticks_ms, ticks_diff, ticks_add, sleep_ms, remaining_ms,  # noqa: F401
                  days_from_civil, epoch_s, merge)


class TransportError(OSError):
    """A link could not carry data. The message says what to check."""


class NetTime:
    """Network time remembered as (epoch_s, tick) so that time() costs no I/O. The tick
    is moved forward at every read: ticks_diff() is right only within half the ticks
    period (2**29 ms, 6.2 days on a 30-bit port), and a meter can go days between reads.
    Unread for longer than that, the time is no longer known (None until set again)."""

    def __init__(self):
        self._epoch = None
        self._tick = 0

    def set(self, epoch):
        # Before 2023 is not a network time: a modem that never synced reports 1980/2000.
        if epoch is None or epoch < 1672531200:
            return False
        self._epoch = epoch
        self._tick = ticks_ms()
        return True

    def get(self):
        if self._epoch is None:
            return None
        el = ticks_diff(ticks_ms(), self._tick) // 1000
        if el < 0:                     # the ticks went round unread: unknown
            self._epoch = None
            return None
        self._epoch += el              # whole seconds only: the remainder stays in _tick
        self._tick = ticks_add(self._tick, el * 1000)
        return self._epoch


_DEFAULTS = (
    ("up_ms", 60000),      # budget for one transport's up()
    ("probe_s", 300),      # how often a better, currently unused transport is probed
    ("check_s", 60),       # how often the active transport's health is refreshed
    ("fail_hold_s", 30),   # after a failure a transport is not retried for this long
)


class Selector:
    """Chooses the transport that carries MQTT.

    `active` is the name of the transport in use (or None): the MQTT client reports it
    in its status topic. `connect()` returns a Conn on the best transport that works.
    `run()` (a task) refreshes health and, when a higher-priority transport is healthy
    again, closes the current Conn so that the client reconnects through `connect()`
    and lands on the better link.
    """

    def __init__(self, transports, priority=None, cfg=None):
        self.cfg = merge("transport config", _DEFAULTS, cfg)
        by_name = {}
        for t in transports:
            by_name[t.name] = t
        if priority is None:
            priority = [t.name for t in transports]
        for n in priority:
            if n not in by_name:
                raise ValueError("transport priority names %r but no such transport is "
                                 "configured (have: %s)" % (n, ", ".join(by_name)))
        if not priority:
            raise ValueError("transport priority is empty: configure at least one of "
                             "wifi, nbiot, plc")
        self.order = [by_name[n] for n in priority]
        self.all = list(transports)     # fitted, whether in the priority list or not
        self.active = None          # name of the transport carrying the current Conn
        self.conn = None            # the Conn handed out last
        self.switches = 0           # how often the active transport changed
        self.errors = {}            # name -> last failure text
        self._failed_at = {}        # name -> tick of last failure
        self._up = {}               # name -> True once up() succeeded
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def set_priority(self, names):
        """A new priority order (the `transport` setting). Every name must be a fitted
        transport; fitted ones left out are no longer used. When the active link is no
        longer first its Conn is closed: the client reconnects through connect() and
        lands on the first link that works."""
        by_name = {}
        for t in self.all:
            by_name[t.name] = t
        if not names:
            raise ValueError("transport: give at least one of %s" % ", ".join(by_name))
        for n in names:
            if n not in by_name:
                raise ValueError("transport %s is not fitted on this meter (fitted: %s)"
                                 % (n, ", ".join(by_name)))
        self.order = [by_name[n] for n in names]
        if self.active is not None and self.active != names[0]:
            self._drop_conn("transport priority changed")
        return names

    def _rank(self, name):
        for i, t in enumerate(self.order):
            if t.name == name:
                return i
        return len(self.order)

    def _held(self, t):
        at = self._failed_at.get(t.name)
        return at is not None and ticks_diff(ticks_ms(), at) < self.cfg["fail_hold_s"] * 1000

    def _fail(self, t, why):
        self.errors[t.name] = str(why)
        self._failed_at[t.name] = ticks_ms()
        self._up[t.name] = False

    async def _bring_up(self, t, budget_ms):
        if self._up.get(t.name) and t.health().get("ok"):
            return True
        try:
            ok = await t.up(budget_ms)
        except OSError as e:
            ok = False
            self.errors[t.name] = str(e)
        if not ok:
            self._fail(t, self.errors.get(t.name) or t.health().get("detail") or "link down")
            return False
        self._up[t.name] = True
        return True

    async def connect(self, host, port, tls=None):
        """Conn to host:port over the best working transport.

        Tries each transport in priority order (skipping ones that failed less than
        fail_hold_s ago, unless all did); raises TransportError listing why each failed.
        """
        async with self._lock:
            held_all = all(self._held(t) for t in self.order)
            for t in self.order:
                if self._held(t) and not held_all:
                    continue
                if not await self._bring_up(t, self.cfg["up_ms"]):
                    continue
                try:
                    conn = await t.connect(host, port, tls)
                except OSError as e:
                    self._fail(t, e)
                    continue
                if self.active != t.name:
                    if self.active is not None:
                        self.switches += 1
                    self.active = t.name
                self.conn = conn
                self._failed_at.pop(t.name, None)
                return conn
            self.active = None
            self.conn = None
            raise TransportError(
                "no transport reached %s:%d (%s); check antenna / Wi-Fi credentials / "
                "PLC line and the broker address" % (host, port, "; ".join(
                    "%s: %s" % (t.name, self.errors.get(t.name, "not tried")) for t in self.order)))

    def better_available(self):
        """True when a transport ranked above the active one is up and healthy."""
        r = self._rank(self.active)
        for t in self.order[:r]:
            if self._up.get(t.name) and t.health().get("ok"):
                return True
        return False

    def _drop_conn(self, why):
        c = self.conn
        self.conn = None
        if c is not None:
            if _DEBUG:
                print("selector: closing conn on", self.active, "-", why)
            try:
                c.close()
            except OSError:
                pass

    async def step(self):
        """One supervision round: refresh the active link, probe better ones.

        Returns what it did: "ok", "failover" (active transport unhealthy: its Conn
        was closed) or "return" (a better transport is healthy again: Conn closed so
        the client reconnects onto it)."""
        cur = None
        for t in self.order:
            if t.name == self.active:
                cur = t
        if cur is not None:
            try:
                await cur.check()
            except OSError as e:
                self.errors[cur.name] = str(e)
            if not cur.health().get("ok"):
                self._fail(cur, cur.health().get("detail") or "unhealthy")
                self._drop_conn("unhealthy")
                return "failover"
        for t in self.order[:self._rank(self.active)]:
            if self._held(t):
                continue
            if not self._up.get(t.name):
                if not await self._bring_up(t, self.cfg["up_ms"]):
                    continue
            try:
                await t.check()
            except OSError as e:
                self._fail(t, e)
                continue
            if t.health().get("ok") and self.conn is not None:
                self._drop_conn("better transport %s is back" % t.name)
                return "return"
        return "ok"

    async def run(self):
        """Supervision task: health of the active link every check_s, probe of better
        links every probe_s. Start it next to the MQTT task."""
        last_probe = ticks_ms()
        while True:
            await sleep_ms(self.cfg["check_s"] * 1000)
            if self.active is None:
                continue
            probe = ticks_diff(ticks_ms(), last_probe) >= self.cfg["probe_s"] * 1000
            if probe:
                last_probe = ticks_ms()
                await self.step()
            else:
                cur = self.order[self._rank(self.active)]
                try:
                    await cur.check()
                except OSError:
                    pass
                if not cur.health().get("ok"):
                    self._fail(cur, cur.health().get("detail") or "unhealthy")
                    self._drop_conn("unhealthy")

    def status(self):
        """For the status topic: active transport and every transport's health."""
        return {"active": self.active, "switches": self.switches,
                "links": {t.name: t.health() for t in self.order}}


def _uart(u, opt):
    # A machine.UART the board handed over (on the unix port: sim.ptyuart.PtyUart).
    if isinstance(u, str):
        raise ValueError("%s: give the UART object the board built, not a tty path %r"
                         % (opt, u))
    return u


def from_options(opts):
    """Selector from main.py options / config.json:
    transport: "wifi,nbiot,plc" (priority order, default "wifi"); modem / plc: the UART
    objects the board handed over; wifi / nbiot / plc_cfg / selector: config dicts."""
    names = [n.strip() for n in (opts.get("transport") or "wifi").split(",") if n.strip()]
    ts = []
    for n in names:
        if n == "wifi":
            from comm.wifi import WifiTransport
            ts.append(WifiTransport(opts.get("wifi")))
        elif n == "nbiot":
            if not opts.get("modem"):
                raise ValueError("transport nbiot needs the modem UART (--modem PATH)")
            from comm.nbiot import NbiotTransport
            ts.append(NbiotTransport(_uart(opts["modem"], "modem"), opts.get("nbiot")))
        elif n == "plc":
            if not opts.get("plc"):
                raise ValueError("transport plc needs the PLC modem UART (--plc PATH)")
            from comm.plc import PlcTransport
            ts.append(PlcTransport(_uart(opts["plc"], "plc"), opts.get("plc_cfg")))
        else:
            raise ValueError("unknown transport %r: use wifi, nbiot, plc" % n)
    return Selector(ts, names, opts.get("selector"))
