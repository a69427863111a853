# The UART link to an STPM3x (drivers/stpm3x.py's SpiLink is the SPI one): here, in its
# own module, so that a board whose chips are on SPI does not hold its class and methods
# (docs/ram.md); a UART board imports it and keeps it. The chip's serial settings
# (set_baud, the host rate) are in drivers/stpm3x_cfg.py.
from util import sleep_us as _sleep_us

try:
    from micropython import const
except ImportError:  # CPython, host-side tests
    const = lambda x: x  # noqa: E731

_POLL_US = const(100)        # UART reply polling step
_FLUSH_MAX = const(16)       # bounded drain of stale UART bytes


def _views(buf, n):
    mv = memoryview(buf)
    return tuple(mv[k:n] for k in range(n))



class UartLink:
    """UART link to one chip: `uart` 8N1 built by the board at 9600 baud (the chip's
    reset rate). `scs` (optional) lets the driver pulse SCS: communication reset, and the
    SYN pulse-counter reset after a hardware latch."""
    uart_mode = True

    def __init__(self, uart, scs=None, baud=9600):
        self.uart = uart
        self.scs = scs
        self.frames = 0
        self.timeouts = 0
        self.sleep_us = _sleep_us
        self._buf = bytearray(5)
        self._v5 = _views(self._buf, 5)
        self._v4 = _views(self._buf, 4)
        self._junk = bytearray(8)
        self._has_any = hasattr(uart, "any")
        self.baud = baud
        self._polls = 0
        self._set_timeout(baud)
        if scs is not None:
            scs.value(1)

    def _set_timeout(self, baud):
        # 5 bytes out + 5 bytes back at 10 bits each, plus 2 ms of slack.
        self.timeout_us = 100000000 // baud + 2000
        self._polls = self.timeout_us // _POLL_US + 1

    def flush(self):
        u = self.uart
        for _ in range(_FLUSH_MAX):
            if self._has_any and not u.any():
                return
            if not u.readinto(self._junk):
                return

    def xfer(self, tx, rx):
        """Send one frame, wait (bounded) for the reply of len(rx) bytes.
        Returns the number of reply bytes received; less than len(rx) = timeout."""
        u = self.uart
        n = len(rx)
        if self._has_any and u.any():
            self.flush()                 # a late reply of an earlier, timed-out frame
        u.write(tx)
        views = self._v5 if n == 5 else self._v4
        got = 0
        for _ in range(self._polls):
            k = u.readinto(views[got]) if (not self._has_any or u.any()) else 0
            if k:
                got += k
                if got >= n:
                    break
            else:
                self.sleep_us(_POLL_US)
        self.frames = (self.frames + 1) & 0x3FFFFFFF
        if got < n:
            self.timeouts += 1
            return got
        b = self._buf
        for i in range(n):
            rx[i] = b[i]
        return n
