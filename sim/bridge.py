"""The host's end of the board bridge (CPython; docs/decisions/0004).

The simulated board of a `unix_sim_*` meter - its STPM3x chips, their physics and load, the
SPI bus, SYN / SCS / EN wires and the chips' UARTs (sim/bus.py) - lives here, outside the
MicroPython interpreter whose heap stands for the MCU's RAM. The firmware reaches it through
sim/bridgelink.py over a Unix socket: every op carries the firmware's virtual time, and the
chips are integrated up to that instant before every latch (SYN rising edge, software
latch), every configuration write (rows 0..15, which includes the software latch and
reset) and every EN edge, so simulated time stays exact. The other frames - reads, and
writes to the status and interface rows 16..20 - change nothing the physics integrates
(events wait in the chip's pending status until the next latch either way), so they are
answered without integrating first: one integration per metering cycle, as in-process.

The board outlives the firmware process, as a board outlives an MCU reset: chips keep
counting, the board's time (an RTC) runs on, and a new connection continues from there.
The hardware watchdog lives here too (`on_reset` is called when it expires); so does the
shutdown request line the host raises on SIGTERM / Ctrl-C.

    srv = BridgeServer(board_module, profile="household", seed=1).start()
    ... firmware runs with --bridge srv.path ...
    srv.exact_energy_wh(1); srv.stop()
"""
import os
import socket
import struct
import tempfile
import threading
import time

from sim import bridgelink as L
from sim import stpm3x
from sim.unixboard import sim_board

_MIN_REAL_S = 2.0       # a scaled-time watchdog never fires sooner (a stalled host is not a hung MCU)
_SILENCE_S = 10.0       # step time: a firmware silent this long (real) is hung (busy loop)
_CONFIG_WA_MAX = 0x1F   # write addresses of rows 0..15 (DSP_CR1 .. DFE_CR2 and friends)


class MirrorClock:
    """The board's view of the firmware's virtual time (as the ops report it), with the
    method set SimBoard uses from a clock: now_us(), time(), hooks."""

    def __init__(self, epoch0, now_us=0, offset_s=0):
        self.hooks = []
        self.epoch0 = int(epoch0)
        self.t = int(now_us)
        self.offset_s = int(offset_s)

    def now_us(self):
        return self.t

    def time(self):
        return self.epoch0 + self.t // 1000000 + self.offset_s


class Watchdog:
    """The board's hardware watchdog: armed by the firmware (WDT op), fed (FEED op), it
    expires when the board's time passes the last feed + timeout."""

    def __init__(self):
        self.timeout_us = 0
        self.fed_us = 0
        self.fed_real = 0.0
        self.armed = False
        self.expired_at_us = None
        self.feeds = 0
        self.resets = 0

    def arm(self, timeout_ms, now_us):
        self.timeout_us = int(timeout_ms) * 1000
        self.armed = self.timeout_us > 0        # 0: stopped (LinkWDT.deinit)
        self.feed(now_us)

    def feed(self, now_us):
        self.fed_us = now_us
        self.fed_real = time.monotonic()
        self.feeds += 1

    def deadline_us(self):
        return self.fed_us + self.timeout_us


class BridgeServer:
    """One simulated board and its socket; serves one firmware connection at a time."""

    def __init__(self, board, profile="household", seed=0, sensor_errors=False, path=None,
                 on_reset=None, silence_s=_SILENCE_S, min_real_s=_MIN_REAL_S):
        self.board = board
        self.profile = profile
        self.seed = int(seed)
        self.sensor_errors = bool(sensor_errors)
        self.on_reset = on_reset
        self.silence_s = silence_s
        self.min_real_s = min_real_s
        self.lock = threading.RLock()
        self.sb = None                  # SimBoard, built at the first HELLO (needs the epoch)
        self.clock = None               # MirrorClock
        self.step = True
        self.speed = 1.0
        self.synced = True
        self.boots = 0
        self.wdt = Watchdog()
        self.stop_requested = False
        self.exchanges = 0
        self.frames = 0
        self.advances = 0
        self.ahead = 0                  # replies sent a frame ahead
        self.ahead_stale = 0            # ... that the frame then did not give (must stay 0)
        self._ahead = None
        self.connected = False
        self._t_real = time.monotonic()  # real time of the last op (for scaled time)
        self._last_op_real = time.monotonic()
        self._conn = None
        self._dead = None               # the connection of an MCU the watchdog reset
        self._closing = False
        if path is None:
            self._dir = tempfile.mkdtemp(prefix="lipari-bridge-")
            path = os.path.join(self._dir, "board.sock")
        else:
            self._dir = None
        self.path = path
        try:
            os.unlink(path)
        except OSError:
            pass
        self._ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ls.bind(path)
        self._ls.listen(2)
        self._th = threading.Thread(target=self._accept_loop, daemon=True,
                                    name="bridge-%s" % getattr(board, "NAME", "board"))

    # ---- life cycle ----
    def start(self):
        self._th.start()
        return self

    def stop(self):
        self._closing = True
        for s in (self._conn, self._ls):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass
        self._th.join(2)
        for p in (self.path,):
            try:
                os.unlink(p)
            except OSError:
                pass
        if self._dir:
            try:
                os.rmdir(self._dir)
            except OSError:
                pass

    def request_stop(self):
        """Raise the shutdown request line: the firmware stops cleanly at its next poll."""
        self.stop_requested = True

    def disconnect(self):
        """Drop the firmware's connection (its process is gone: an MCU reset)."""
        c = self._conn
        if c is not None:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ---- host-side access (tests, summaries) ----
    def now_us(self):
        """The board's time: the firmware's last reported virtual time, plus (scaled
        time) the real time since then."""
        with self.lock:
            if self.clock is None:
                return 0
            t = self.clock.t
            if not self.step:
                t += int((time.monotonic() - self._t_real) * self.speed * 1000000)
            return t

    def exact_energy_wh(self, phase):
        """True energy of a phase up to the board's time (sim/bus.py SimBoard)."""
        with self.lock:
            self._advance(self.clock.t)
            return self.sb.exact_energy_wh(phase)

    def set_load(self, profile):
        with self.lock:
            self.sb.set_load(profile)

    # ---- serving ----
    def _accept_loop(self):
        while not self._closing:
            try:
                conn, _ = self._ls.accept()
            except OSError:
                return
            self._conn = conn
            self.connected = True
            try:
                self._serve(conn)
            except OSError:
                pass
            finally:
                self.connected = False
                self._conn = None
                try:
                    conn.close()
                except OSError:
                    pass
                self._release()

    def _release(self):
        # An MCU in reset drives nothing: the board's pull-ups take SCS, SYN and EN high
        # (EN high: the chips keep measuring through the reset, as on the field board).
        with self.lock:
            sb = self.sb
            if sb is None:
                return
            for p in list(sb.scs) + [sb.syn] + list(sb.en):
                if not p.value():
                    if p is sb.syn or p in sb.en:
                        self._advance(self.clock.t)
                    p.value(1)

    def _serve(self, conn):
        buf = bytearray()
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                return
            self._last_op_real = time.monotonic()
            if conn is self._dead:
                continue                # reset by the watchdog: nothing after it happens
            buf += chunk
            with self.lock:
                used = self._ops(conn, buf)
            if used:
                del buf[:used]

    def _ops(self, conn, buf):
        """Apply every complete op in buf; returns the bytes used."""
        i = 0
        n = len(buf)
        while i < n and conn is not self._dead:
            op = buf[i]
            if op == L.OP_TIME:
                if i + 13 > n:
                    break
                t, off = struct.unpack_from("<qi", buf, i + 1)
                self._time(t, off)
                i += 13
            elif op == L.OP_PIN:
                if i + 4 > n:
                    break
                self._pin(buf[i + 1], buf[i + 2], buf[i + 3])
                i += 4
            elif op == L.OP_SPI or op == L.OP_SPI_AHEAD:
                if i + 2 > n or i + 2 + buf[i + 1] > n:
                    break
                k = buf[i + 1]
                rx = self._spi(buf[i + 2:i + 2 + k])
                if op == L.OP_SPI:
                    conn.sendall(rx + self._reply_ahead(k))
                elif rx != self._ahead:
                    self.ahead_stale += 1       # the chip changed behind the firmware's back
                i += 2 + k
            elif op == L.OP_UART:
                if i + 3 > n or i + 3 + buf[i + 2] > n:
                    break
                k = buf[i + 2]
                conn.sendall(self._uart(buf[i + 1], buf[i + 3:i + 3 + k]))
                i += 3 + k
            elif op == L.OP_BAUD:
                if i + 6 > n:
                    break
                self.sb.uarts[buf[i + 1]].init(baudrate=struct.unpack_from("<I", buf, i + 2)[0])
                i += 6
            elif op == L.OP_WDT:
                if i + 5 > n:
                    break
                self.wdt.arm(struct.unpack_from("<I", buf, i + 1)[0], self.clock.t)
                i += 5
            elif op == L.OP_FEED:
                if self.wdt.armed:
                    self.wdt.feed(self.clock.t)
                i += 1
            elif op == L.OP_SYNC:
                f = L.FLAG_STOP if self.stop_requested else 0
                if self.wdt.expired_at_us is not None:
                    f |= L.FLAG_RESET
                conn.sendall(bytes((f,)))
                i += 1
            elif op == L.OP_HELLO:
                if i + 15 > n:
                    break
                conn.sendall(self._hello(buf[i + 2], *struct.unpack_from("<iq", buf, i + 3)))
                i += 15
            else:
                raise OSError("bridge: unknown op 0x%02x from the firmware" % op)
            self.exchanges += op in (L.OP_SPI, L.OP_UART, L.OP_SYNC, L.OP_HELLO)
        return i

    def _hello(self, step, speed_milli, epoch0):
        self.boots += 1
        self.wdt.armed = False              # a reset stops the watchdog until it is started
        self.wdt.expired_at_us = None
        if self.sb is None:
            self.step = bool(step)
            self.speed = speed_milli / 1000.0 if speed_milli > 0 else 1.0
            self.clock = MirrorClock(epoch0)
            self.sb = sim_board(self.board, self.clock, self.profile, self.seed,
                                self.sensor_errors)
            self.synced = epoch0 >= 1700000000
        else:
            self.clock.t = self.now_us()        # the board's time ran on during the reset
        self._t_real = time.monotonic()
        c = self.clock
        return struct.pack("<qqiBB", c.t, c.epoch0, c.offset_s, 1 if self.synced else 0,
                           self.boots)

    def _time(self, t, off):
        c = self.clock
        if t > c.t:
            c.t = t
        c.offset_s = off
        self._t_real = time.monotonic()
        w = self.wdt
        if w.armed and w.expired_at_us is None and c.t >= w.deadline_us():
            if self.step or time.monotonic() - w.fed_real >= self.min_real_s:
                self._expire(w.deadline_us())

    def _advance(self, t):
        # integrate every chip up to t: what SimBoard's clock hooks do in-process
        self.advances += 1
        for h in self.clock.hooks:
            h(t)

    def _pin(self, kind, index, level):
        sb = self.sb
        if kind == L.PIN_SCS:
            sb.scs[index].value(level)
        elif kind == L.PIN_SYN:
            if level and not sb.syn.value():
                self._advance(self.clock.t)    # a SYN rising edge latches: integrate first
            sb.syn.value(level)
        elif kind == L.PIN_EN:
            if level != sb.en[index].value():
                self._advance(self.clock.t)
            sb.en[index].value(level)

    def _reply_ahead(self, n):
        # the next frame's reply of the one selected chip (see bridgelink, SPI op)
        sb = self.sb
        k = -1
        for j, p in enumerate(sb.scs):
            if not p.value():
                if k >= 0:
                    k = -1              # two selected: wired-AND, no reply ahead
                    break
                k = j
        if k >= 0:
            a = bytearray(n)
            if sb.chips[k].spi_next_reply(a, n):
                self._ahead = bytes(a)
                self.ahead += 1
                return bytes((k,)) + self._ahead
        self._ahead = None
        return b"\xff" * (n + 1)

    def _config_write(self, wa):
        # wa: the frame's write address byte as on the wire (0xFF = no write)
        if wa <= _CONFIG_WA_MAX:
            return True
        # a chip set to LSB-first (US_REG1 bit 15) sees every byte reversed
        return stpm3x.REV8[wa] <= _CONFIG_WA_MAX and any(
            (c.regs[stpm3x.US_REG1] >> 15) & 1 for c in self.sb.chips)

    def _spi(self, tx):
        if len(tx) < 2 or self._config_write(tx[1]):
            self._advance(self.clock.t)
        rx = bytearray(len(tx))
        self.sb.spi.write_readinto(tx, rx)
        self.frames += 1
        return bytes(rx)

    def _uart(self, index, data):
        if len(data) not in (4, 5) or self._config_write(data[1]):
            self._advance(self.clock.t)
        u = self.sb.uarts[index]
        u.write(data)
        self.frames += 1
        got = u.read() or b""
        got = got[:255]
        return bytes((len(got),)) + got

    # ---- watchdog ----
    def _expire(self, at_us):
        w = self.wdt
        w.expired_at_us = at_us
        w.armed = False
        w.resets += 1
        self._dead = self._conn         # no reply to anything more: the MCU has stopped
        if self.on_reset is not None:
            self.on_reset("watchdog", at_us, w.fed_us)

    def check_watchdog(self):
        """Called now and then by the host (real time): a watchdog that a silent firmware
        (blocked, or in a busy loop, so reporting no time) no longer feeds expires."""
        with self.lock:
            w = self.wdt
            if not w.armed or w.expired_at_us is not None or self.clock is None:
                return False
            real = time.monotonic()
            if self.step:
                if real - self._last_op_real < self.silence_s:
                    return False
                at = w.deadline_us()
                if self.clock.t > at:
                    at = self.clock.t
                self.clock.t = at               # the board's time at the reset
            else:
                if real - w.fed_real < self.min_real_s or \
                        self.now_us() < w.deadline_us():
                    return False
                at = self.now_us()
                self.clock.t = at
                self._t_real = real
            self._expire(at)
            return True
