# The firmware's end of the board bridge (docs/decisions/0004): machine.Pin / SPI / UART /
# WDT look-alikes that carry every pin level, frame, baud change and watchdog feed over a
# Unix socket to the simulated board in a host process (sim/bridge.py, CPython). The
# simulated chips, their physics and the watchdog live there, outside the interpreter
# whose heap stands for the MCU's RAM; here is only what a board's wires would be.
#
# Runs on the MicroPython unix port (and CPython, for tests). On the frame path nothing
# allocates: ops go into one preallocated buffer, replies are read straight into the
# caller's buffer. Every op is stamped with the firmware's virtual time (a TIME op when it
# moved), so the host integrates the chips up to the instant of each latch and write.
#
# Wire format, client -> host (little endian; "R:" = the host answers):
#   HELLO  'H' u8 version, u8 step, i32 speed_milli, i64 epoch0
#              R: i64 now_us, i64 epoch0, i32 offset_s, u8 synced, u8 boots
#   TIME   'T' i64 now_us, i32 offset_s            PIN   'P' u8 kind, u8 index, u8 level
#   SPI    'S' u8 n, n bytes   R: n bytes, u8 k, n bytes: chip k's reply to the next
#                                 frame if only its SCS moves first (k 0xFF: none)
#   SPI'   's' u8 n, n bytes   a frame answered with that reply (no answer; the host
#                                 checks the reply it gives is the same)
#   BAUD   'B' u8 index, u32 baud
#   UART   'U' u8 index, u8 n, n bytes   R: u8 m, m bytes (what reached the host's UART)
#   WDT    'W' u32 timeout_ms (start; 0 = stop)    FEED  'F'
#   SYNC   'Q'                        R: u8 flags (FLAG_STOP, FLAG_RESET)
import struct

from sim.hwapi import PinBase, SPIBase, UARTBase, PIN_SCS, PIN_EN, PIN_SYN  # noqa: F401

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):
        return x

VERSION = const(1)
OP_HELLO = const(0x48)
OP_TIME = const(0x54)
OP_PIN = const(0x50)
OP_SPI = const(0x53)
OP_SPI_AHEAD = const(0x73)
OP_UART = const(0x55)
OP_BAUD = const(0x42)
OP_WDT = const(0x57)
OP_FEED = const(0x46)
OP_SYNC = const(0x51)
HELLO_REPLY = const(22)
FLAG_STOP = const(1)          # the host asks for a clean shutdown (SIGTERM / Ctrl-C)
FLAG_RESET = const(2)         # the watchdog expired: the host resets the MCU now

PIN_STOP = const(3)           # input: the host's shutdown request (with sim.hwapi's kinds)

_OUT = const(256)             # ops waiting for the next exchange
_IN = const(260)              # a UART reply: count + up to 255 bytes
_SPI_MAX = const(64)          # bytes per SPI transfer (a frame is 4 or 5)
_FLUSH_US = const(1000000)    # one-way ops (time, feeds) reach the host at least this often


class BridgeError(OSError):
    pass


class Bridge:
    """One connection to the host's simulated board. `clock` (set by attach) stamps ops."""

    def __init__(self, path):
        import socket
        self.path = path
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if hasattr(s, "recv_into"):                      # CPython
                s.connect(path)
            else:
                s.connect(struct.pack("H", socket.AF_UNIX) + path.encode() + b"\0")
        except OSError as e:
            s.close()
            raise BridgeError("cannot reach the simulated board at %s (%s): start the "
                              "meter with `lipari meter` (it runs the board host)" % (path, e))
        self.sock = s
        self._cpy = hasattr(s, "recv_into")
        self._out = bytearray(_OUT)
        self._n = 0
        self._in = bytearray(_IN)
        self.clock = None
        self._t = -1                  # virtual time of the last TIME op
        self._off = 0
        self._flush_at = 0            # send one-way ops when virtual time reaches this
        self._step = False
        self._deadline = -1           # watchdog expiry (virtual us); -1 = not armed
        self._wdt_us = 0
        self.exchanges = 0            # round trips (for the frames-per-round-trip figure)
        self.frames = 0               # SPI / UART frames carried
        # A frame ahead: the chips' replies are pipelined (the reply to a frame is loaded
        # at the end of the one before), so after frame N the host knows what chip k
        # drives in frame N+1 if only its SCS goes high and low in between. That frame
        # is then answered here and sent one-way: two frames per round trip.
        self._ahead = bytearray(_SPI_MAX)
        self._ahead_n = 0             # bytes of a valid reply ahead (0 = none)
        self._ahead_k = 0             # for the chip whose SCS
        self._ahead_st = 0            # ... went high (1), then low (2) since

    # ---- socket, with the caller's buffers (no allocation on MicroPython) ----
    def _send(self, buf, n):
        if self._cpy:
            self.sock.sendall(memoryview(buf)[:n])
        elif self.sock.write(buf, 0, n) != n:
            raise BridgeError("simulated board closed the bridge")

    def _recv(self, buf, n):
        if self._cpy:
            mv = memoryview(buf)
            got = 0
            while got < n:
                k = self.sock.recv_into(mv[got:n])
                if not k:
                    break
                got += k
        else:
            got = self.sock.readinto(buf, n)
        if got != n:
            raise BridgeError("simulated board closed the bridge")

    # ---- ops ----
    def _room(self, size):
        if self._n + size > _OUT:
            self._send(self._out, self._n)
            self._n = 0

    def _stamp(self):
        # a TIME op when virtual time (or the wall-clock offset) moved since the last one
        c = self.clock
        if c is None:
            return
        t = c.now_us()
        off = c.offset_s
        if t != self._t or off != self._off:
            self._room(13)
            o = self._n
            self._out[o] = OP_TIME
            struct.pack_into("<qi", self._out, o + 1, t, off)
            self._n = o + 13
            self._t = t
            self._off = off

    def _op(self, code, size, stamp=True):
        if stamp:
            self._stamp()
        self._room(size)
        o = self._n
        self._out[o] = code
        self._n = o + size
        return o

    def _exchange(self):
        self._send(self._out, self._n)
        self._n = 0
        self.exchanges += 1

    def flush(self):
        """Send the one-way ops now (time, pins, feeds)."""
        if self._n:
            self._send(self._out, self._n)
            self._n = 0

    def pin(self, kind, index, level):
        if self._ahead_n:
            st = self._ahead_st             # expects SCS k high (st 0), then low (st 1)
            if kind == PIN_SCS and index == self._ahead_k and st < 2 and level == 1 - st:
                self._ahead_st = st + 1
            else:
                self._ahead_n = 0
        # SCS edges need no time (they select a chip); the frame that follows is stamped
        o = self._op(OP_PIN, 4, kind != PIN_SCS)
        b = self._out
        b[o + 1] = kind
        b[o + 2] = index
        b[o + 3] = level

    def spi(self, wbuf, rbuf, n):
        if n > _SPI_MAX:
            raise ValueError("bridge: SPI transfers of at most %d bytes" % _SPI_MAX)
        ahead = self._ahead_n == n and self._ahead_st == 2
        o = self._op(OP_SPI_AHEAD if ahead else OP_SPI, 2 + n)
        b = self._out
        b[o + 1] = n
        for i in range(n):
            b[o + 2 + i] = wbuf[i]
        self.frames += 1
        self._ahead_n = 0
        if ahead:
            a = self._ahead
            for i in range(n):
                rbuf[i] = a[i]
            return
        self._exchange()
        ib = self._in
        self._recv(ib, 2 * n + 1)       # one read: the reply, k, the reply ahead
        for i in range(n):
            rbuf[i] = ib[i]
        k = ib[n]
        if k != 0xFF:
            a = self._ahead
            for i in range(n):
                a[i] = ib[n + 1 + i]
            self._ahead_k = k
            self._ahead_st = 0
            self._ahead_n = n

    def uart(self, index, buf, n, q):
        """Send n bytes to chip `index`; the reply bytes go into the ring `q`."""
        self._ahead_n = 0
        o = self._op(OP_UART, 3 + n)
        b = self._out
        b[o + 1] = index
        b[o + 2] = n
        for i in range(n):
            b[o + 3 + i] = buf[i]
        self._exchange()
        self.frames += 1
        ib = self._in
        self._recv(ib, 1)
        m = ib[0]
        if m:
            self._recv(ib, m)
            for i in range(m):
                q.put(ib[i])

    def baud(self, index, baud):
        self._ahead_n = 0
        o = self._op(OP_BAUD, 6)
        self._out[o + 1] = index
        struct.pack_into("<I", self._out, o + 2, baud)

    def sync(self):
        """Round trip; returns the host's flags (FLAG_STOP, FLAG_RESET)."""
        self._op(OP_SYNC, 1)
        self._exchange()
        self._recv(self._in, 1)
        f = self._in[0]
        if f & FLAG_RESET:
            self._halt()
        return f

    # ---- clock ----
    def hello(self, step, speed, epoch0):
        """First exchange: returns (now_us, epoch0, offset_s, synced, boots) of the board's
        time, which runs on across MCU resets (the host keeps it, like an RTC)."""
        b = self._out
        b[0] = OP_HELLO
        b[1] = VERSION
        b[2] = 1 if step else 0
        struct.pack_into("<iq", b, 3, int(speed * 1000), int(epoch0))
        self._n = 15
        self._exchange()
        self._recv(self._in, HELLO_REPLY)
        now, ep, off, synced, boots = struct.unpack_from("<qqiBB", self._in, 0)
        self._step = bool(step)
        return now, ep, off, synced, boots

    def attach(self, clock):
        """Stamp ops with `clock` and follow its steps (one hook call per sleep_ms)."""
        self.clock = clock
        self._t = -1
        clock.hooks.append(self._hook)

    def _hook(self, now_us):
        # With the deterministic clock the watchdog must fire at its exact virtual
        # instant: a sleep that ends past the deadline asks the host, which resets us.
        if self._deadline >= 0 and self._step and now_us >= self._deadline:
            self.sync()
        if now_us >= self._flush_at:
            self._flush_at = now_us + _FLUSH_US
            self._stamp()
            self.flush()

    def _halt(self):
        # The watchdog fired: the host kills this process (a reset stops the MCU at
        # once; nothing after the deadline may run, not even finally blocks).
        while True:
            try:
                self._recv(self._in, 1)
            except OSError:
                import sys
                sys.exit(3)

    # ---- watchdog ----
    def wdt_start(self, timeout_ms):
        o = self._op(OP_WDT, 5)
        struct.pack_into("<I", self._out, o + 1, timeout_ms)
        self._wdt_us = timeout_ms * 1000
        self._fed()

    def wdt_feed(self):
        self._op(OP_FEED, 1)
        self._fed()

    def wdt_stop(self):
        o = self._op(OP_WDT, 5)
        struct.pack_into("<I", self._out, o + 1, 0)
        self._deadline = -1
        self.flush()

    def _fed(self):
        if self.clock is not None:
            self._deadline = self.clock.now_us() + self._wdt_us
        self.flush()                    # a hardware watchdog sees a feed at once


class LinkPin(PinBase):
    """machine.Pin look-alike: every level written goes to the host (the wire); a read
    returns the level last written (outputs) or asks the host (the stop input)."""

    def __init__(self, bridge, kind, index, value=1):
        self._br = bridge
        self._kind = kind
        self._index = index
        self._v = value

    def value(self, v=None):
        if v is None:
            if self._kind == PIN_STOP:
                return 1 if self._br.sync() & FLAG_STOP else 0
            return self._v
        v = 1 if v else 0
        self._v = v
        self._br.pin(self._kind, self._index, v)
        return None


class LinkSPI(SPIBase):
    """machine.SPI look-alike on the board's shared bus (the host answers each frame)."""

    def __init__(self, bridge):
        SPIBase.__init__(self)
        self._br = bridge

    def write_readinto(self, wbuf, rbuf):
        self._br.spi(wbuf, rbuf, len(wbuf))

    def write(self, buf):
        self._br.spi(buf, self._br._in, len(buf))

    def readinto(self, buf, write=0x00):
        n = len(buf)
        for i in range(n):
            buf[i] = write
        self._br.spi(buf, buf, n)


class LinkUART(UARTBase):
    """machine.UART look-alike wired to one chip: write() sends the bytes and collects the
    reply bytes that reached this UART at its baud rate; any() / readinto() read them."""

    def __init__(self, bridge, index, baudrate=9600):
        UARTBase.__init__(self, baudrate)
        self._br = bridge
        self._index = index
        bridge.baud(index, baudrate)

    def init(self, baudrate=None, bits=8, parity=None, stop=1, **kwargs):
        UARTBase.init(self, baudrate, bits, parity, stop, **kwargs)
        if baudrate is not None:
            self._br.baud(self._index, baudrate)

    def write(self, buf):
        n = len(buf)
        self._br.uart(self._index, buf, n, self.rx)
        return n


class LinkWDT:
    """machine.WDT look-alike: the watchdog itself runs in the host, which resets (restarts)
    the MCU when it is not fed within `timeout` ms of the board's time."""

    def __init__(self, bridge, timeout=5000, id=0):
        self._br = bridge
        self.timeout_ms = int(timeout)
        bridge.wdt_start(self.timeout_ms)

    def feed(self):
        self._br.wdt_feed()

    def deinit(self):
        """Stop it (the firmware's main loop ended and handed the board back: the REPL
        of `lipari vboard`). A board's own watchdog cannot be stopped."""
        self._br.wdt_stop()
