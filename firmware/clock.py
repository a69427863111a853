# Wall clock and ticks for the meter. A virtual clock (sim/vclock.py) has the same
# methods, so the firmware never asks `time` directly for "now".
import time

from util import ticks_ms as _ticks_ms, ticks_us as _ticks_us, ticks_diff as _ticks_diff
from util import sleep_ms as _sleep_ms, sleep_us as _sleep_us

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

    def sleep_ms(self, ms):
        return _sleep_ms(ms)        # asyncio's awaitable itself: no frame of ours (util.py)

    def sleep_us_busy(self, us):
        # Short, bounded waits for bus timing (>= 4 us between frames, pulse widths).
        _sleep_us(us)
