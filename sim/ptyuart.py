# The UART a unix simulation board hands over for a modem that sits behind a pty (the
# NB-IoT emulator sim/modem.py, the PLC concentrator sim/plc.py): machine.UART's
# readinto / write / any on a tty path. Runs under MicroPython (unix port) and CPython:
# raw mode with VMIN=0/VTIME=0 so that readinto never blocks, like
# machine.UART(timeout=0). Kept apart from the emulators so that the firmware's process
# loads only this.
import sys


class PtyUart:
    """machine.UART look-alike over a tty path: readinto(buf) -> n or None, write(buf),
    any(). Non-blocking: a read returns at once with what the tty holds."""

    def __init__(self, path):
        self.f = open(path, "r+b", buffering=0) if sys.implementation.name != "micropython" \
            else open(path, "r+b")
        fd = self.f.fileno()
        import termios
        if hasattr(termios, "setraw"):
            termios.setraw(fd)
        else:
            import tty
            tty.setraw(fd)
        a = termios.tcgetattr(fd)
        cc = a[6]
        cc[6] = 0  # VMIN: return at once ...
        cc[5] = 0  # VTIME: ... without waiting for more
        termios.tcsetattr(fd, termios.TCSANOW, a)
        try:
            import select
            self._poll = select.poll()
            self._poll.register(self.f, select.POLLIN)
        except (ImportError, AttributeError):
            self._poll = None

    def readinto(self, buf, nbytes=None):
        if nbytes is not None:
            buf = memoryview(buf)[:nbytes]
        n = self.f.readinto(buf)
        return n or None

    def read(self, n=256):
        b = bytearray(n)
        k = self.readinto(b)
        return bytes(b[:k]) if k else None

    def any(self):
        if self._poll is None:
            return 0
        return 1 if self._poll.poll(0) else 0

    def write(self, buf):
        n = self.f.write(buf)
        return len(buf) if n is None else n

    def close(self):
        self.f.close()
