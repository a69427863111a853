# PLC uplink: a byte tunnel through a PLC modem (transparent UART bridge) to the data
# concentrator, which opens the TCP connection to the broker on the meter's behalf.
# The power line loses and corrupts frames, so the tunnel carries its own framing,
# CRC and stop-and-wait retransmission. Frame format (docs/transports.md):
#
#   A5 5A | len u8 | type u8 | cid u8 | seq u8 | payload[len] | crc16 u16 LE
#
# crc16 = CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over len..payload.
try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

import struct

from util import merge, deadline_ms as _deadline
from comm.transport import (TransportError, NetTime, ticks_ms, ticks_diff,
                            sleep_ms, remaining_ms)

_DEBUG = const(False)
SYNC0 = const(0xA5)
SYNC1 = const(0x5A)
HDR = const(6)             # sync(2) len type cid seq
MAX_PAYLOAD = const(200)   # fits one PLC PHY frame with room for the modem's own header
T_JOIN = const(1)
T_JOIN_ACK = const(2)
T_OPEN = const(3)
T_OPEN_ACK = const(4)
T_DATA = const(5)
T_ACK = const(6)
T_CLOSE = const(7)
T_PING = const(8)
T_PONG = const(9)

_DEFAULTS = {
    "meter_id": "",
    "ack_ms": 300,         # retransmit a frame not acknowledged within this time
    "retries": 10,         # transmissions of one frame before the link counts as broken
    "poll_ms": 5,
    "rx_max": 4096,        # bytes buffered per connection before we stop acknowledging
    "check_ms": 3000,      # a PING older than this makes check() ask again
    # TLS over PLC ends at the concentrator (docs/transports.md, "PLC: trust boundary"):
    # True accepts a TLS request by opening the tunnel, the concentrator making the TLS
    # connection to the broker and verifying it; False refuses it (a meter that must not
    # rely on the concentrator then never uses PLC for a TLS broker).
    "tls_at_concentrator": False,
}


class PlcError(TransportError):
    pass


def crc16(data, crc=0xFFFF):
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def frame(ftype, cid, seq, payload=b""):
    n = len(payload)
    b = bytearray(HDR + n + 2)
    b[0] = SYNC0
    b[1] = SYNC1
    b[2] = n
    b[3] = ftype
    b[4] = cid
    b[5] = seq
    b[6:6 + n] = payload
    struct.pack_into("<H", b, HDR + n, crc16(memoryview(b)[2:HDR + n]))
    return b


class FrameReader:
    """Finds valid frames in a byte stream; skips noise and frames with a bad CRC."""

    def __init__(self):
        self.buf = bytearray()
        self.bad = 0

    def feed(self, data):
        self.buf += data

    def next(self):
        """(type, cid, seq, payload bytes) or None when no complete frame is buffered."""
        b = self.buf
        while True:
            i = b.find(b"\xa5\x5a")
            if i < 0:
                if len(b) > 1:
                    self.buf = b = b[-1:]
                return None
            if i:
                self.buf = b = b[i:]
            if len(b) < HDR:
                return None
            n = b[2]
            if n > MAX_PAYLOAD:
                self.bad += 1
                self.buf = b = b[2:]
                continue
            if len(b) < HDR + n + 2:
                return None
            crc = b[HDR + n] | b[HDR + n + 1] << 8
            if crc != crc16(memoryview(b)[2:HDR + n]):
                self.bad += 1
                self.buf = b = b[2:]     # resync on the next sync word
                continue
            f = (b[3], b[4], b[5], bytes(b[HDR:HDR + n]))
            self.buf = b[HDR + n + 2:]
            return f


class PlcConn:
    def __init__(self, t, cid, host, port):
        self.t = t
        self.cid = cid
        self.name = "plc"
        self.peer = "%s:%d#%d" % (host, port, cid)
        self.tx_seq = 0
        self.rx_seq = 0            # next DATA seq expected from the concentrator
        self.rx = bytearray()
        self.acked = -1            # last seq acknowledged by the concentrator
        self.open_status = None
        self.peer_closed = False
        self.closed = False

    async def send(self, buf):
        if self.closed or self.peer_closed:
            raise PlcError("PLC connection %s is closed: reconnect" % self.peer)
        mv = memoryview(buf)
        for off in range(0, len(mv), MAX_PAYLOAD):
            seq = self.tx_seq
            await self.t._reliable(frame(T_DATA, self.cid, seq, mv[off:off + MAX_PAYLOAD]),
                                   lambda: self.acked == seq or self.peer_closed,
                                   "data on %s" % self.peer)
            if self.peer_closed and self.acked != seq:
                raise PlcError("PLC connection %s closed by the concentrator" % self.peer)
            self.tx_seq = (seq + 1) & 0xFF

    async def recv_into(self, buf, timeout_ms):
        deadline = _deadline(timeout_ms)
        while True:
            self.t._pump()
            if self.rx:
                n = min(len(buf), len(self.rx))
                buf[:n] = self.rx[:n]
                self.rx = self.rx[n:]
                return n
            if self.closed:
                raise PlcError("PLC connection %s was closed locally" % self.peer)
            if self.peer_closed:
                raise PlcError("PLC connection %s closed by the concentrator or the broker: "
                               "reconnect" % self.peer)
            if remaining_ms(deadline) <= 0:
                return 0
            await sleep_ms(min(self.t.cfg["poll_ms"], max(1, remaining_ms(deadline))))

    def close(self):
        if not self.closed:
            self.closed = True
            # Best effort: one CLOSE now; the concentrator also times idle tunnels out.
            self.t._write(frame(T_CLOSE, self.cid, 0))
            self.t.conns.pop(self.cid, None)


class PlcTransport:
    name = "plc"

    def __init__(self, uart, cfg=None):
        self.cfg = merge("plc config", _DEFAULTS, cfg)
        self.uart = uart
        self.rd = FrameReader()
        self._rxb = bytearray(256)
        self.conns = {}
        self._next_cid = 1
        self.joined = False
        self.signal = None
        self.detail = "not started"
        self.clock = NetTime()
        self._pong = None          # tick of the last JOIN_ACK / PONG
        self._req = 0              # seq of link-level requests
        self.stats = {"tx": 0, "retx": 0, "rx": 0, "bad": 0, "dup": 0}

    # -- link ---------------------------------------------------------------------
    def _write(self, b):
        self.stats["tx"] += 1
        try:
            self.uart.write(b)
        except OSError:
            pass

    def _pump(self):
        """Read what the UART holds and dispatch every complete frame. Synchronous and
        short: a few hundred bytes per call."""
        for _ in range(8):
            try:
                n = self.uart.readinto(self._rxb)
            except OSError:
                n = None
            if not n:
                break
            self.rd.feed(memoryview(self._rxb)[:n])
        while True:
            f = self.rd.next()
            if f is None:
                break
            self.stats["rx"] += 1
            self._dispatch(*f)
        self.stats["bad"] = self.rd.bad

    def _status(self, payload):
        # JOIN_ACK / PONG payload: signal int8 (dB SNR), epoch u32 (0 = no time)
        if len(payload) >= 5:
            self.signal, epoch = struct.unpack("<bI", payload[:5])
            if epoch:
                self.clock.set(epoch)
        self._pong = ticks_ms()

    def _dispatch(self, ftype, cid, seq, payload):
        if ftype in (T_JOIN_ACK, T_PONG):
            if seq == self._req:
                self._status(payload)
            return
        c = self.conns.get(cid)
        if ftype == T_DATA:
            if c is None:
                self._write(frame(T_CLOSE, cid, 0))   # stale tunnel: tell the concentrator
                return
            if seq == c.rx_seq:
                if len(c.rx) + len(payload) > self.cfg["rx_max"]:
                    return                    # no ACK: the concentrator will retry later
                c.rx += payload
                c.rx_seq = (seq + 1) & 0xFF
            else:
                self.stats["dup"] += 1        # our ACK was lost: acknowledge again
            self._write(frame(T_ACK, cid, seq))
        elif ftype == T_ACK:
            if c is not None:
                c.acked = seq
        elif ftype == T_OPEN_ACK:
            if c is not None and c.open_status is None:
                c.open_status = payload[0] if payload else 255
        elif ftype == T_CLOSE:
            self._write(frame(T_ACK, cid, seq))
            if c is not None:
                c.peer_closed = True

    async def _reliable(self, fr, done, what):
        """Send fr until done() or `retries` transmissions went unanswered."""
        for i in range(self.cfg["retries"]):
            if i:
                self.stats["retx"] += 1
            self._write(fr)
            deadline = _deadline(self.cfg["ack_ms"])
            while remaining_ms(deadline) > 0:
                self._pump()
                if done():
                    return
                await sleep_ms(self.cfg["poll_ms"])
        self.joined = False
        self.detail = "PLC link lost: no answer to %s after %d tries; check the PLC modem " \
            "and the concentrator" % (what, self.cfg["retries"])
        raise PlcError(self.detail)

    async def _ping(self, ftype, payload=b""):
        self._req = (self._req + 1) & 0xFF
        t = ticks_ms()
        self._pong = None
        await self._reliable(frame(ftype, 0, self._req, payload),
                             lambda: self._pong is not None, "JOIN" if ftype == T_JOIN else "PING")
        return ticks_diff(self._pong, t)

    async def up(self, deadline_ms):
        deadline = _deadline(deadline_ms)
        while True:
            try:
                await self._ping(T_JOIN, self.cfg["meter_id"].encode())
                self.joined = True
                self.detail = "joined concentrator"
                return True
            except PlcError:
                if remaining_ms(deadline) <= 0:
                    self.detail = "no PLC concentrator answered within %d ms: check the " \
                        "PLC modem wiring and that the concentrator is on" % deadline_ms
                    return False

    async def check(self):
        if not self.joined:
            return
        if self._pong is not None and ticks_diff(ticks_ms(), self._pong) < self.cfg["check_ms"]:
            return
        try:
            rtt = await self._ping(T_PING)
            self.detail = "joined, rtt %d ms" % rtt
        except PlcError:
            pass    # _reliable cleared joined and set detail

    def health(self):
        return {"ok": self.joined, "signal": self.signal, "detail": self.detail}

    def time(self):
        return self.clock.get()

    async def connect(self, host, port, tls=None):
        if tls is not None and tls is not False and not self.cfg["tls_at_concentrator"]:
            raise PlcError("TLS over PLC ends at the concentrator, which then verifies the "
                           "broker: set plc tls_at_concentrator true to accept that, or use "
                           "another transport")
        if not self.joined:
            raise PlcError("PLC not joined: call up() first (%s)" % self.detail)
        cid = self._next_cid
        self._next_cid = cid % 255 + 1
        c = PlcConn(self, cid, host, port)
        self.conns[cid] = c
        h = host.encode()
        try:
            await self._reliable(frame(T_OPEN, cid, 0, struct.pack("<H", port) + h),
                                 lambda: c.open_status is not None, "OPEN")
        except PlcError:
            self.conns.pop(cid, None)
            raise
        if c.open_status != 0:
            self.conns.pop(cid, None)
            raise PlcError("concentrator could not reach %s:%d (status %d): check the broker "
                           "address" % (host, port, c.open_status))
        return c

    async def down(self):
        for c in list(self.conns.values()):
            c.close()
        self.joined = False
        self.detail = "down"
