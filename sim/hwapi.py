# The machine.Pin / SPI / UART surface the simulated boards share, written once: the
# in-process wires (sim/bus.py) and the bridge's UART link (sim/bridgeuart.py) each give only
# what carries the bytes and levels (Pin.value, SPI.write_readinto / readinto, UART.write
# filling `self.rx`). Runs on MicroPython and CPython; nothing here allocates on the
# byte path.

from sim.bridgelink import PIN_SCS, PIN_EN, PIN_SYN  # noqa: F401 (the wires' pin kinds)


class PinBase:
    """machine.Pin look-alike; a subclass implements value(v=None)."""
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 4
    IRQ_RISING = 8

    def init(self, *args, **kwargs):
        v = kwargs.get("value")
        if v is not None:
            self.value(v)

    def __call__(self, v=None):
        return self.value(v)

    def irq(self, handler=None, trigger=None, **kwargs):
        """Accepted and kept; the simulated INT pins never fire."""
        self._irq = handler

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def high(self):
        self.value(1)

    def low(self):
        self.value(0)


class SPIBase:
    """machine.SPI look-alike; a subclass implements write_readinto, write, readinto."""
    MSB = 0
    LSB = 1

    def __init__(self):
        self.baudrate = 1000000
        self.polarity = 1
        self.phase = 1

    def init(self, baudrate=None, polarity=None, phase=None, **kwargs):
        if baudrate is not None:
            self.baudrate = baudrate
        if polarity is not None:
            self.polarity = polarity
        if phase is not None:
            self.phase = phase

    def deinit(self):
        pass

    def read(self, n, write=0x00):
        b = bytearray(n)
        self.readinto(b, write)
        return bytes(b)


class Ring:
    """Fixed-size byte FIFO (a UART's receive buffer)."""

    def __init__(self, size=256):
        self.b = bytearray(size)
        self.head = 0
        self.n = 0

    def put(self, v):
        """False (byte lost) when full."""
        if self.n >= len(self.b):
            return False
        self.b[(self.head + self.n) % len(self.b)] = v
        self.n += 1
        return True

    def get(self):
        v = self.b[self.head]
        self.head = (self.head + 1) % len(self.b)
        self.n -= 1
        return v


class UARTBase:
    """machine.UART look-alike; a subclass implements write(buf), putting what the host
    receives into self.rx (a Ring), and init(...) if the baud rate matters to it."""

    def __init__(self, baudrate=9600):
        self.rx = Ring(256)
        self.baudrate = baudrate
        self.timeout = 0

    def init(self, baudrate=None, bits=8, parity=None, stop=1, **kwargs):
        if baudrate is not None:
            self.baudrate = baudrate
        t = kwargs.get("timeout")
        if t is not None:
            self.timeout = t

    def deinit(self):
        pass

    def any(self):
        return self.rx.n

    def readinto(self, buf, nbytes=-1):
        n = len(buf) if nbytes is None or nbytes < 0 else min(nbytes, len(buf))
        q = self.rx
        if n > q.n:
            n = q.n
        if n == 0:
            return None
        for i in range(n):
            buf[i] = q.get()
        return n

    def read(self, nbytes=-1):
        n = self.rx.n if nbytes is None or nbytes < 0 else min(nbytes, self.rx.n)
        if n == 0:
            return None
        b = bytearray(n)
        self.readinto(b)
        return bytes(b)

    def flush(self):
        pass

    def txdone(self):
        return True
