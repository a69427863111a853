# The firmware's end of the board bridge (docs/decisions/0004): machine.Pin / SPI / WDT
# look-alikes that carry every pin level, frame and watchdog feed over a Unix socket to
# the simulated board in a host process (sim/bridge.py, CPython). The simulated chips,
# their physics and the watchdog live there, outside the interpreter whose heap stands
# for the MCU's RAM; here is only what a board's wires would be.
#
# This is the one module of sim/ a bridged unix board loads into the firmware's
# interpreter (docs/decisions/0017): besides the links it holds the board's virtual
# clocks, the modems' pty UART and the littlefs shim on a host file, each kept to the
# methods the firmware calls, because a real board has all of it in C and what sits here
# is taken off the measured heap (bench/mp/fw_simshare.py). sim/vclock.py, sim/ptyuart.py
# and sim/unixboard.py re-export them for the in-process boards and the tests; the UART
# links of a UART board are in sim/bridgeuart.py, loaded only by such a board.
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
import os
import struct
import sys
import time

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio

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

PIN_SCS = const(0)            # pin kinds of a simulated board's wires (sim.hwapi, too)
PIN_EN = const(1)
PIN_SYN = const(2)
PIN_STOP = const(3)           # input: the host's shutdown request

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


class LinkPin:
    """machine.Pin look-alike: every level written goes to the host (the wire); a read
    returns the level last written (outputs) or asks the host (the stop input). Only
    value() and calling the pin: what the firmware uses (a method is heap on this board)."""

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

    def __call__(self, v=None):
        return self.value(v)


class LinkSPI:
    """machine.SPI look-alike on the board's shared bus (the host answers each frame)."""

    def __init__(self, bridge):
        self._br = bridge

    def write_readinto(self, wbuf, rbuf):
        self._br.spi(wbuf, rbuf, len(wbuf))


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


# ---- the board's virtual clocks (re-exported by sim/vclock.py) ----
# Both keep an absolute virtual time in microseconds (now_us(), never wraps) and call
# every hook in `clock.hooks` as hook(now_us) whenever sleep_ms() moves virtual time,
# so simulated chips integrate up to that instant before the firmware next latches.
# sleep_us_busy() moves time without calling hooks: it sits on the driver's
# allocation-free path; the simulated chips catch up by themselves before a reset, a
# configuration change or a latch (sim/bus.py SimBoard._sync), else at the next sleep_ms().
DEFAULT_EPOCH = 1767225600      # 2026-01-01T00:00:00Z (sim.loads uses it too)
_TICKS_MASK = const(0x3FFFFFFF)
_TICKS_HALF = const(0x20000000)
_PLAUSIBLE_EPOCH_S = const(1700000000)

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


# ---- a modem's UART behind a pty (re-exported by sim/ptyuart.py) ----
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


# ---- the board's flash, clock and bridged build (re-exported by sim/unixboard.py) ----
FS_BLOCK = const(4096)
_ERASE_CHUNK = const(256)  # an erase writes 0xFF in pieces: the buffer sits in the MCU's heap
FS_BLOCKS = const(256)   # 1 MiB, the smallest filesystem the issues size the queue for
MOUNT = "/flash"


class FileDev:
    """Block device on a host file, for `lipari meter --state FILE`: a restart of the
    virtual meter finds its flash as it left it, like a board after a power cycle."""

    # Nothing here may allocate after __init__: littlefs can call in from a file's
    # finaliser, which the GC runs with the heap locked.
    def __init__(self, path, block_size=FS_BLOCK, blocks=FS_BLOCKS):
        self.bs = block_size
        self.n = blocks
        self.fresh = False
        self._ff = b"\xff" * _ERASE_CHUNK
        try:
            self.f = open(path, "r+b")
        except OSError:
            self.f = open(path, "w+b")
            for _ in range(blocks * block_size // _ERASE_CHUNK):
                self.f.write(self._ff)
            self.f.flush()
            self.fresh = True

    def readblocks(self, block, buf, offset=0):
        self.f.seek(block * self.bs + offset)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, offset=None):
        if offset is None:
            offset = 0
        self.f.seek(block * self.bs + offset)
        self.f.write(buf)
        self.f.flush()

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:
            self.f.seek(arg * self.bs)
            for _ in range(self.bs // _ERASE_CHUNK):
                self.f.write(self._ff)
            return 0
        return 0


def mount(state=None, point=MOUNT):
    """Mount littlefs at `point` (formatting a blank device) and return the path."""
    # A file, not a RAM device, even when nothing is kept: the simulated flash must not
    # live in the MicroPython heap, whose size stands for the MCU's RAM.
    if not state:
        state = "/tmp/lipari-flash-%s.img" % "".join("%02x" % b for b in os.urandom(6))
        dev = FileDev(state)
        os.remove(state)        # the open file stays usable; nothing is left behind
    else:
        dev = FileDev(state)
    try:
        vfs = os.VfsLfs2(dev)
    except OSError:
        os.VfsLfs2.mkfs(dev)
        vfs = os.VfsLfs2(dev)
    try:
        os.umount(point)
    except (OSError, AttributeError):
        pass
    os.mount(vfs, point)
    return point


def clock_from(opts, start_us=0, epoch=None, offset_s=0):
    """The board's virtual clock from the options (--step, --speed, --start); a bridged
    board continues the time its host kept across a reset (start_us, epoch, offset_s)."""
    start = epoch if epoch is not None else opts.get("start")
    if opts.get("step"):
        c = StepClock(int(start) if start else DEFAULT_EPOCH, start_us=start_us)
    else:
        c = ScaledClock(speed=float(opts.get("speed", 1)), start_epoch=_epoch_now(start),
                        start_us=start_us)
    c.offset_s = offset_s
    return c


def _epoch_now(start):
    if start:
        return int(start)
    now = int(time.time())
    if now < 1700000000:          # a port whose epoch is 2000
        now += 946684800
    return now


def pty_uart(path, what, opt):
    """The UART of a modem behind a pty (the emulators in sim/), for Hardware."""
    if not path:
        return None
    try:
        return PtyUart(path)
    except OSError as e:
        raise ValueError("cannot open the %s tty %s (%s): start the emulator first "
                         "(lipari meter does) or fix --%s" % (what, path, e, opt))


# Time from power-up until the firmware first touches the chips (MicroPython boot, the
# board module, mounting the filesystem): the chips integrate all along. A ScaledClock
# takes it from real time; a StepClock is moved on by this much.
MCU_BOOT_MS = 800


def mcu_boot(clock, opts):
    ms = int(opts.get("boot_ms", MCU_BOOT_MS))
    if hasattr(clock, "advance"):
        clock.advance(ms * 1000)
    elif hasattr(clock, "step"):
        clock.step()            # the host's start-up, scaled: the firmware's ticks see it


def bridge_path(opts):
    """The bridge's socket (--bridge, or LIPARI_BRIDGE: `lipari vboard` sets it), or None:
    the board then runs its chips in process (sim/unixboard.py)."""
    return opts.get("bridge") or os.getenv("LIPARI_BRIDGE")


def build(board, opts):
    """A unix board's Hardware with its chips behind the bridge at bridge_path(opts)."""
    from drivers.stpm3x import SpiLink
    from hw import Hardware
    modem = pty_uart(opts.get("modem"), "NB-IoT modem", "modem")
    plc = pty_uart(opts.get("plc"), "PLC modem", "plc")
    br = Bridge(bridge_path(opts))
    step = bool(opts.get("step"))
    speed = float(opts.get("speed", 1))
    epoch0 = opts.get("start")
    if not epoch0:
        epoch0 = DEFAULT_EPOCH if step else _epoch_now(None)
    now_us, epoch, off, _synced, _boots = br.hello(step, speed, int(epoch0))
    clock = clock_from(opts, now_us, epoch, off)
    br.attach(clock)
    mcu_boot(clock, opts)
    n = len(board.CHIPS)
    scs = [LinkPin(br, PIN_SCS, i) for i in range(n)]
    # one pin per EN line (CHIPS "en": chips with the same number share one)
    lines = 1 + max(c.get("en", i) for i, c in enumerate(board.CHIPS))
    en = [LinkPin(br, PIN_EN, k) for k in range(lines)]
    if board.INTERFACE == "spi":
        spi = LinkSPI(br)
        links = [SpiLink(spi, scs[i]) for i in range(n)]
    else:
        from sim.bridgeuart import LinkUART      # a UART board only: not on the SPI boards
        from drivers.stpm3x_uart import UartLink      # a UART board's link only
        links = [UartLink(LinkUART(br, i), scs[i]) for i in range(n)]

    def wdt(timeout=5000, id=0):
        return LinkWDT(br, timeout)
    fs = mount(opts.get("state"))
    hw = Hardware(links, syn=LinkPin(br, PIN_SYN, 0), en=en, clock=clock, fs=fs,
                  wdt=wdt, stop=LinkPin(br, PIN_STOP, 0, 0), sim=br)
    hw.modem_uart = modem
    hw.plc_uart = plc
    return hw
