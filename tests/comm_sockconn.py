# Test transport: a plain TCP Conn following the comm/transport.py contract, for
# micropython and CPython. Fault injection: blackhole() silently discards what is sent
# (a link that died without telling anyone); kill() makes every call fail.
import socket
import time

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio

_EAGAIN = (11, 35, 115)


def _ms():
    return time.ticks_ms() if hasattr(time, "ticks_ms") else int(time.monotonic() * 1000)


def _diff(a, b):
    return time.ticks_diff(a, b) if hasattr(time, "ticks_diff") else a - b


async def _sleep(ms):
    if hasattr(asyncio, "sleep_ms"):
        await asyncio.sleep_ms(ms)
    else:
        await asyncio.sleep(ms / 1000)


class SockConn:
    name = "tcp"

    def __init__(self, sock):
        self.s = sock
        self.dead = False
        self.hole = False
        self.sent = 0

    def blackhole(self, on=True):
        self.hole = on

    def kill(self):
        self.dead = True

    async def send(self, buf, timeout_ms=5000):
        if self.dead:
            raise OSError(104)
        if self.hole:
            self.sent += len(buf)
            return
        mv = memoryview(buf)
        t0 = _ms()
        while len(mv):
            try:
                n = self.s.send(mv)
            except OSError as e:
                if e.args[0] not in _EAGAIN:
                    raise
                n = None
            if n:
                mv = mv[n:]
                self.sent += n
            elif _diff(_ms(), t0) > timeout_ms:
                raise OSError(110)
            else:
                await _sleep(5)

    async def recv_into(self, buf, timeout_ms):
        t0 = _ms()
        while True:
            if self.dead:
                raise OSError(104)
            try:
                n = self.s.readinto(buf) if hasattr(self.s, "readinto") else self.s.recv_into(buf)
            except OSError as e:
                if e.args[0] not in _EAGAIN:
                    raise
                n = None
            if n == 0:
                raise OSError(104)          # closed by the peer
            if n:
                return n
            if _diff(_ms(), t0) >= timeout_ms:
                return 0
            await _sleep(5)

    def close(self):
        self.dead = True
        try:
            self.s.close()
        except OSError:
            pass


CONNS = []


async def connect(host, port, tls=None):
    ai = socket.getaddrinfo(host, port)[0]
    s = socket.socket(ai[0], socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(ai[-1])
    except OSError as e:
        if e.args[0] not in _EAGAIN:
            s.close()
            raise
    import select
    p = select.poll()
    p.register(s, select.POLLOUT)
    t0 = _ms()
    while True:
        ev = p.poll(0)
        if ev:
            if ev[0][1] & (select.POLLERR | select.POLLHUP):
                s.close()
                raise OSError(111)          # refused
            break
        if _diff(_ms(), t0) > 5000:
            s.close()
            raise OSError(110)
        await _sleep(5)
    c = SockConn(s)
    CONNS.append(c)
    return c
