# Wall clock and ticks for the meter. A virtual clock (sim/vclock.py) has the same
# methods, so the firmware never asks `time` directly for "now".
import time

try:
    import asyncio
except ImportError:  # pragma: no cover - very old ports
    import uasyncio as asyncio

_ticks_ms = getattr(time, "ticks_ms", None)
if _ticks_ms is None:  # CPython, for host-side unit tests only
    _t0 = time.monotonic()

    def _ticks_ms():
        return int((time.monotonic() - _t0) * 1000) & 0x3FFFFFFF

    def _ticks_us():
        return int((time.monotonic() - _t0) * 1000000) & 0x3FFFFFFF

    def _ticks_diff(a, b):
        d = (a - b) & 0x3FFFFFFF
        return d - 0x40000000 if d & 0x20000000 else d
else:
    _ticks_us = time.ticks_us
    _ticks_diff = time.ticks_diff

# Epoch seconds below this are not a real date: the RTC was never set.
_PLAUSIBLE_EPOCH_S = 1700000000


class Clock:
    """Real time. `synced` turns True once something trustworthy set the time."""

    def __init__(self):
        self.hooks = []
        self.offset_s = 0
        self.synced = time.time() + self._epoch_fix() >= _PLAUSIBLE_EPOCH_S

    @staticmethod
    def _epoch_fix():
        # Ports whose epoch is 2000-01-01 (most MCUs) report 946684800 s less.
        return 946684800 if time.gmtime(0)[0] == 2000 else 0

    def ticks_ms(self):
        return _ticks_ms()

    def ticks_us(self):
        return _ticks_us()

    def ticks_diff(self, a, b):
        return _ticks_diff(a, b)

    def time(self):
        return int(time.time()) + self._epoch_fix() + self.offset_s

    def set_time(self, epoch_s):
        self.offset_s += int(epoch_s) - self.time()
        self.synced = True

    async def sleep_ms(self, ms):
        await asyncio.sleep_ms(ms) if hasattr(asyncio, "sleep_ms") else await asyncio.sleep(ms / 1000)

    def sleep_us_busy(self, us):
        # Short, bounded waits for bus timing (>= 4 us between frames, pulse widths).
        if hasattr(time, "sleep_us"):
            time.sleep_us(us)
        else:
            time.sleep(us / 1000000)
