# Virtual clocks with the method set of firmware/clock.py's Clock, for the simulated
# meter (CPython and the MicroPython unix port).
#
# Both keep an absolute virtual time in microseconds (now_us(), never wraps) and call
# every hook in `clock.hooks` as hook(now_us) whenever sleep_ms() moves virtual time,
# so simulated chips integrate up to that instant before the firmware next latches.
# sleep_us_busy() moves time without calling hooks: it sits on the driver's
# allocation-free path; the simulated chips catch up by themselves before a reset, a
# configuration change or a latch (sim/bus.py SimBoard._sync), else at the next sleep_ms().
import time

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio


DEFAULT_EPOCH = 1767225600      # 2026-01-01T00:00:00Z (sim.loads uses it too)
_TICKS_MASK = 0x3FFFFFFF
_TICKS_HALF = 0x20000000
_PLAUSIBLE_EPOCH_S = 1700000000

if hasattr(time, "ticks_us"):
    def _real_us():
        return time.ticks_us()

    def _real_diff(a, b):
        return time.ticks_diff(a, b)
else:
    def _real_us():
        return int(time.monotonic() * 1000000)

    def _real_diff(a, b):
        return a - b


class _VClock:
    def __init__(self, start_epoch=DEFAULT_EPOCH, synced=None):
        self.hooks = []
        self._epoch0 = int(start_epoch)
        self.offset_s = 0
        self.synced = (start_epoch >= _PLAUSIBLE_EPOCH_S) if synced is None else synced

    def now_us(self):
        raise NotImplementedError

    def ticks_us(self):
        return self.now_us() & _TICKS_MASK

    def ticks_ms(self):
        return (self.now_us() // 1000) & _TICKS_MASK

    def ticks_diff(self, a, b):
        d = (a - b) & _TICKS_MASK
        return d - 0x40000000 if d & _TICKS_HALF else d

    def time(self):
        """UTC epoch seconds (int)."""
        return self._epoch0 + self.now_us() // 1000000 + self.offset_s

    def set_time(self, epoch_s):
        self.offset_s += int(epoch_s) - self.time()
        self.synced = True

    def _run_hooks(self):
        now = self.now_us()
        for h in self.hooks:
            h(now)


class StepClock(_VClock):
    """Deterministic virtual time: it moves only when a task awaits sleep_ms().
    With several tasks sleeping, time jumps to the earliest wake-up once every task
    that can run has run (discrete-event order), so concurrent tasks see the same
    timeline they would in real time."""

    def __init__(self, start_epoch=DEFAULT_EPOCH, synced=None, start_us=0):
        _VClock.__init__(self, start_epoch, synced)
        self._now_us = int(start_us)     # > 0: a board's time that ran on across a reset
        self._sleepers = {}
        self._seq = 0

    def now_us(self):
        return self._now_us

    def advance(self, us):
        """Move virtual time forward by `us` now (tests) and call the hooks."""
        self._now_us += int(us)
        self._run_hooks()

    async def sleep_ms(self, ms):
        ms = int(ms)
        if ms <= 0:
            await asyncio.sleep(0)
            return
        wake = self._now_us + ms * 1000
        self._seq += 1
        token = self._seq
        self._sleepers[token] = wake
        try:
            while True:
                await asyncio.sleep(0)
                if self._now_us >= wake:
                    break
                if wake <= min(self._sleepers.values()):
                    # every runnable task had a turn: jump to the earliest wake-up
                    self._now_us = wake
                    self._run_hooks()
                    break
        finally:
            del self._sleepers[token]

    def sleep_us_busy(self, us):
        self._now_us += us


class ScaledClock(_VClock):
    """Virtual time running `speed` times real time (speed 60: a minute per second).

    Time moves in steps: it is read from the real clock when a task's sleep_ms() ends
    (and the hooks let the simulated chips integrate up to that instant), and stands
    still in between. A real chip latches the instant the firmware reads its ticks; with
    time running on between the hooks and the read (at speed 240 a 100 ms stall of a
    busy host is 24 simulated seconds), the counters and the firmware's clock disagreed
    and the engine took the mismatch for a counter restart."""

    def __init__(self, speed=1.0, start_epoch=DEFAULT_EPOCH, synced=None, start_us=0):
        if speed <= 0:
            raise ValueError("speed must be > 0, not %r" % (speed,))
        _VClock.__init__(self, start_epoch, synced)
        self.speed = speed
        self._real0 = _real_us()
        self._base_us = int(start_us)  # virtual us at _real0
        self._now = self._base_us      # virtual us as of the last step

    def _real_now_us(self):
        # re-base now and then so the real ticks never wrap between two reads
        r = _real_us()
        d = _real_diff(r, self._real0)
        if d > 100000000:
            self._base_us += int(d * self.speed)
            self._real0 = r
            d = 0
        return self._base_us + int(d * self.speed)

    def now_us(self):
        return self._now

    def step(self):
        """Catch up with real time now and call the hooks."""
        t = self._real_now_us()
        if t > self._now:
            self._now = t
        self._run_hooks()

    async def sleep_ms(self, ms):
        # at least `ms` of virtual time, as any sleep: a real sleep shorter than the
        # event loop's 1 ms resolution (50 ms at speed 240) must not end early
        end = self._real_now_us() + int(ms) * 1000
        while True:
            rem = end - self._real_now_us()
            await asyncio.sleep((rem if rem > 0 else 0) / 1000000.0 / self.speed)
            self.step()
            if self._now >= end:
                return

    def sleep_us_busy(self, us):
        # The driver's microsecond gaps move the board's time by exactly `us`, as on a
        # board. Sleeping `us / speed` of real time instead cost the OS's minimum sleep
        # (~60 us) per gap, which at speed 600 made one 66-frame cycle last 7 s.
        self._now += us
        self._base_us += us
