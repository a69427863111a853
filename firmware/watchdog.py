# The meter's hardware watchdog (issue 7). It is fed only while the meter is healthy:
# the metering cycle keeps its period and the comm session's publisher keeps turning. A
# hang anywhere - a task stuck on an await, a busy loop, a blocking call that never
# returns - stops the feeding and the watchdog resets the MCU; the meter then resumes from
# its checkpoint and the chips' running counters, so no energy is lost
# (docs/operations.md, Watchdog).
#
#   wd = watchdog.start(hw, board, meter, session)   # None: this board has no watchdog
#   asyncio.create_task(wd.run())
#
# The board declares WDT_MS (its timeout); hw.wdt, if the board gives one, builds the
# watchdog (the unix simulation boards: the host's, outside the interpreter), otherwise
# machine.WDT does.
from util import ticks_ms as _rt_ms, ticks_diff as _rt_diff   # the MCU's (real) ticks

try:
    from micropython import const
except ImportError:  # CPython (tests)
    def const(x):
        return x

TIMEOUT_MS = const(8000)   # default WDT_MS: within every supported MCU's range (RP2040 <= 8388)
PERIOD_MS = const(1000)    # one check (and feed) per second
METER_CYCLES = const(3)    # metering is hung after 3 read periods without a cycle
COMM_SLACK_MS = const(5000)  # comm is hung after 2 x its PUBACK timeout + this without a
#                            publisher turn: its longest legitimate wait is a slow send and
#                            one PUBACK, or the 5 s pause after an error


class Watchdog:
    """Feeds `wdt` every period while both the meter's cycle counter and the session's
    publisher counter (`beats`) move within their bounds. `reason` says what starved it.
    Each is judged on its own clock: metering on the meter's (`clock`), comm on the MCU's
    ticks, which its timeouts use (on a board they are the same; a simulated board's
    scaled time runs faster than comm's)."""

    def __init__(self, wdt, clock, meter, session=None, period_ms=PERIOD_MS, comm_ms=None):
        self.wdt = wdt
        self.clock = clock
        self.meter = meter
        self.session = session
        self.period_ms = period_ms
        self.meter_ms = max(METER_CYCLES * int(meter.read_ms), 2 * period_ms)
        if comm_ms is None:
            ack = 15000
            if session is not None:
                ack = int(getattr(session, "cfg", {}).get("ack_timeout_ms", ack))
            comm_ms = 2 * ack + COMM_SLACK_MS
        self.comm_ms = comm_ms
        self.feeds = 0
        self.starved = 0             # checks that did not feed
        self.reason = None           # "metering" or "comm" once a check failed
        self.stopping = False        # set for a (bounded) clean shutdown: feed regardless
        self._m = _Progress(meter.cycles, clock.ticks_ms())
        self._c = _Progress(self._beats(), _rt_ms())

    def _beats(self):
        s = self.session
        return 0 if s is None else getattr(s, "beats", 0)

    def check(self):
        """None when healthy, else what is stuck ("metering", "comm")."""
        c = self.clock
        if self._m.stuck(self.meter.cycles, c.ticks_ms(), self.meter_ms, c.ticks_diff,
                         self.meter_ms // self.period_ms):
            return "metering"
        if self.session is not None and \
                self._c.stuck(self._beats(), _rt_ms(), self.comm_ms, _rt_diff, 2):
            return "comm"
        return None

    async def run(self):
        while True:
            r = None if self.stopping else self.check()
            if r is None:
                self.wdt.feed()
                self.feeds += 1
            else:
                if self.reason is None:
                    print("watchdog: %s stuck, not fed: reset in at most %d ms" % (
                        r, self.timeout_ms()))
                self.reason = r
                self.starved += 1
            await self.clock.sleep_ms(self.period_ms)

    def timeout_ms(self):
        return getattr(self.wdt, "timeout_ms", TIMEOUT_MS)

    def release(self):
        """The firmware's main loop has ended (Ctrl-C at the console, or the unix port's
        --days / stop): someone is at the console, or the process ends. A watchdog that
        can be stopped is (the unix boards'); a board's cannot, so a timer keeps feeding
        it while the console is in use (mpremote, deploy), else it says when it resets."""
        self.stopping = True
        stop = getattr(self.wdt, "deinit", None)
        if stop is not None:
            stop()
            return
        try:
            from machine import Timer
            wdt = self.wdt
            self._timer = Timer(-1)
            self._timer.init(period=self.timeout_ms() // 2, callback=lambda t: wdt.feed())
        except Exception:        # no virtual timer on this port
            print("watchdog: still running: the board resets within %d ms"
                  % self.timeout_ms())


class _Progress:
    """A counter that must move: stuck once it stood still for longer than `bound_ms`
    *and* over more than `checks` checks, so that a jump of the clock (a virtual board's
    host that stalled) is not taken for a hang before the task had its turn."""

    def __init__(self, value, now):
        self.value = value
        self.t = now
        self.checks = 0

    def stuck(self, value, now, bound_ms, diff, checks):
        if value != self.value:
            self.value = value
            self.t = now
            self.checks = 0
            return False
        self.checks += 1
        return diff(now, self.t) > bound_ms and self.checks > checks


def start(hw, board, meter, session):
    """The meter's Watchdog, its hardware watchdog started, or None if the board has none
    (the unix port run without the host's board)."""
    ms = int(getattr(board, "WDT_MS", TIMEOUT_MS))
    make = getattr(hw, "wdt", None)
    if make is None:
        try:
            import machine
            make = getattr(machine, "WDT", None)
        except ImportError:
            make = None
    if make is None:
        return None
    return Watchdog(make(timeout=ms), hw.clock, meter, session)
