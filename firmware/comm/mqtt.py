# MQTT 3.1.1 client for asyncio over any transport Conn (comm/transport.py contract:
# async send(buf), async recv_into(buf, timeout_ms) -> n, close(), name).
# Why not umqtt.simple: docs/decisions/0001-mqtt-client.md (blocking sockets, no keepalive,
# no QoS 1 redelivery, no reconnection, owns its socket).
#
# Resilience is one task: run() keeps the link up (connect, read, keepalive, reconnect with
# backoff and jitter). publish() and subscribe() may be called from other tasks; they share
# one write lock. Every await has a deadline, so the metering task is never held up by
# the network for longer than one bounded step.
import gc
import struct
import os

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio

try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731


_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)
_SUBACK = const(0x90)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)
_DEBUG = const(False)
_OOM = "out of memory: link dropped, set up again after the backoff"
# A bytes payload this large is sent after its header instead of copied into one packet
# (_publish): records stay one write; command replies and OTA requests, which can be
# 1-2 KiB, need no second block of their size. Over a link that writes parts as one send
# (conn.send_parts: the NB-IoT modem, one AT+QISEND) every bytes payload goes so: no
# copy of a record or a live reading while it is in flight (docs/ram.md)
_SPLIT_B = const(512)
# The largest command request's payload (comm/commands.py MAX_CMD_BYTES; a test keeps the
# two equal): the resting receive buffer holds one such PUBLISH on the command topic.
# Not imported from there: the session loads comm.commands only while it answers one.
_CMD_BYTES = const(1024)
# const() is folded at compile time, and merge / lookup are imported where they are used
# (once each): three globals fewer keep the module's table at 23 slots, not 29
del const

# ticks, sleeping, deadlines: util.py
from util import (ticks_ms as _ticks, ticks_diff as _diff, sleep_ms as _sleep_ms,
                  wait_ms as _deadline)


def _why(e):
    """The message of e, without allocating when it has one: str(e) builds a new string,
    and a MemoryError raised while reporting another error ended the MQTT task (seen at
    a 64 KiB heap: the watchdog then reset the meter)."""
    a = e.args
    if len(a) == 1 and isinstance(a[0], str):
        return a[0]
    try:
        return "%s" % (e,)
    except MemoryError:
        return _OOM


def _rand16():
    # jitter source: os.urandom where the port has it, else the tick counter's low bits
    try:
        r = os.urandom(2)
        return r[0] << 8 | r[1]
    except (AttributeError, OSError):
        return (_ticks() * 40503) & 0xFFFF


DEFAULTS = (
    ("client_id", None),          # the meter id; also the broker user name
    ("host", None),
    ("port", 1883),
    ("tls", None),                # passed to transport.connect (server verification there)
    ("user", None),               # default: client_id when a password is given
    ("password", None),
    ("keepalive_s", 60),
    ("clean", False),             # persistent session: QoS 1 survives reconnects both ways
    ("will", None),               # (topic, payload, qos, retain)
    ("connect_timeout_ms", 20000),
    ("ack_timeout_ms", 10000),    # PUBACK / SUBACK / PINGRESP / CONNACK
    ("backoff_min_ms", 1000),
    ("backoff_max_ms", 120000),
    ("max_packet", 4160),         # largest incoming packet ever taken (fixed header
                                  # included): the receive buffer's size during an OTA
                                  # download is at most this; larger ones are discarded
                                  # and reported (4160: a chunk of a 4096-byte block)
    ("cmd_topic", None),          # where commands come (default lipari/v1/<client_id>/cmd):
                                  # sizes the resting receive buffer (rx_buffer())
    ("poll_ms", 200),             # longest single wait for incoming bytes
)

CONNACK_REASONS = (
    (1, "broker refused the protocol version (needs MQTT 3.1.1)"),
    (2, "broker rejected the client id (check the meter id)"),
    (3, "broker unavailable (try later)"),
    (4, "bad user name or password (check the meter's credentials in the config file)"),
    (5, "not authorised (check the broker's password and ACL files)"),
)


class MqttError(Exception):
    """MQTT session failure; the message says what to check."""


def _enc_len(out, n):
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return


def _publish_packet(first, topic, pid, payload, copy=True, ln=None):
    """A PUBLISH packet (pid None for QoS 0) allocated once at its exact size: building
    it by extending a bytearray and then copying it into the packet held two or three
    copies of the payload at once, each needing a free block of its size (a command's
    1 KiB reply failed so on a tight heap: docs/ram.md). copy=False: the fixed header,
    topic and packet id only (the payload follows it on the wire; ln: its length, when
    the payload is given in parts)."""
    t = topic.encode() if isinstance(topic, str) else topic
    nt = len(t)
    if ln is None:
        ln = len(payload)
    rem = 2 + nt + (0 if pid is None else 2) + ln
    nlen = 1
    r = rem >> 7
    while r:
        nlen += 1
        r >>= 7
    out = bytearray(1 + nlen + rem - (0 if copy else ln))
    out[0] = first
    i = 1
    r = rem
    while True:
        b = r & 0x7F
        r >>= 7
        out[i] = b | 0x80 if r else b
        i += 1
        if not r:
            break
    struct.pack_into("!H", out, i, nt)
    i += 2
    out[i:i + nt] = t
    i += nt
    if pid is not None:
        struct.pack_into("!H", out, i, pid)
        i += 2
    if copy:
        out[i:] = payload
    return out


def _publish(first, topic, pid, payload, split_b=_SPLIT_B):
    """What publish() sends: one packet, or for a large immutable payload (bytes: it
    cannot change before a resend) (header, payload), sent back to back under the write
    lock: no second block of the payload's size (a 1 KiB command reply at 80 KiB found
    none: docs/ram.md); one more transport write for such a payload. A tuple of bytes
    (a command reply written in parts, comm.commands.answer) is sent the same way, part
    after part: no block of the whole reply's size is needed at all."""
    if isinstance(payload, tuple):
        n = 0
        for part in payload:
            n += len(part)
        return (_publish_packet(first, topic, pid, None, False, n),) + payload
    if isinstance(payload, bytes) and len(payload) >= split_b:
        return (_publish_packet(first, topic, pid, payload, False), payload)
    return _publish_packet(first, topic, pid, payload)


def packet_bytes(topic_b, payload_b, qos):
    """Bytes of a whole PUBLISH packet (fixed header included) with a topic of topic_b
    bytes and a payload of payload_b bytes at qos (a packet id from QoS 1)."""
    rem = 2 + topic_b + (2 if qos else 0) + payload_b
    n = 2                               # packet type, first remaining-length byte
    r = rem >> 7
    while r:
        n += 1
        r >>= 7
    return n + rem


def _head_total(buf, n):
    """Total bytes of the packet starting buf (n bytes of it received), None while its
    length is not all received (or malformed: _parse says so)."""
    rl = 0
    mul = 1
    for i in range(1, min(n, 5)):
        b = buf[i]
        rl += (b & 0x7F) * mul
        mul <<= 7
        if not b & 0x80:
            return i + 1 + rl
    return None


def _str(out, s):
    b = s.encode() if isinstance(s, str) else bytes(s)
    out.extend(struct.pack("!H", len(b)))
    out.extend(b)


class MQTTClient:
    def __init__(self, cfg, connect, on_message=None, on_connect=None):
        """cfg: dict overriding DEFAULTS. connect: async (host, port, tls) -> Conn.
        on_message(topic, payload, dup): called for each incoming PUBLISH (payload None
        when the packet exceeded max_packet and was discarded; its first bytes are then in
        self.oversized_head); must not block.
        on_connect(session_present): coroutine function, started as a task after each
        (re)connect (subscribe and publish the birth message there)."""
        from util import merge
        c = merge("MQTT config", DEFAULTS, cfg)
        if not c["client_id"] or not c["host"]:
            raise ValueError("MQTT needs client_id (the meter id) and host (the broker)")
        if c["password"] is not None and c["user"] is None:
            c["user"] = c["client_id"]  # MQTT forbids a password without a user name
        if not 0 < c["keepalive_s"] < 65536:
            raise ValueError("keepalive_s must be 1..65535")
        self.cfg = c
        self._open = connect
        self.on_message = on_message
        self.on_connect = on_connect
        self._conn = None
        self._wlock = asyncio.Lock()
        self._pid = 0
        self._inflight = {}         # pid -> [packet (_publish()), sent?, acked Event]
        self._subacks = {}          # pid -> Event
        # The receive buffer at rest holds the largest command (a PUBLISH at QoS 1 of
        # _CMD_BYTES on the command topic: 1077 bytes for a 32-character meter id); an OTA
        # download asks for more while it runs (rx_buffer()). Not max_packet for the whole
        # run: that was 2 KiB of live heap for the few minutes a download takes.
        ct = c["cmd_topic"] or "lipari/v1/%s/cmd" % c["client_id"]
        self.rx_rest = min(packet_bytes(len(ct.encode()), _CMD_BYTES, 1), c["max_packet"])
        self._rx = bytearray(self.rx_rest)
        self._rx_next = None            # buffer (grow) or size (shrink) for _swap()
        self._rxn = 0
        self._skip = 0
        self._last_tx = self._last_rx = _ticks()
        self._ping_at = None
        self._up = asyncio.Event()
        self.stats = {"connects": 0, "drops": 0, "tx": 0, "rx": 0, "retransmits": 0,
                      "pings": 0, "oversized": 0, "mem_errors": 0, "last_error": None}
        self.session_present = False
        self._ready = False             # CONNACK received and in-flight messages resent
        self.oversized_head = b""
        self._stop = False

    # -- state -----------------------------------------------------------------------
    def isconnected(self):
        return self._ready

    def transport_name(self):
        return getattr(self._conn, "name", None) if self._conn else None

    async def wait_connected(self, timeout_ms):
        """True once connected (within timeout_ms)."""
        if self._ready:
            return True
        try:
            await _deadline(self._up.wait(), timeout_ms)
        except asyncio.TimeoutError:
            pass
        return self._ready

    def _next_pid(self):
        for _ in range(65535):
            self._pid = self._pid % 65535 + 1
            if self._pid not in self._inflight and self._pid not in self._subacks:
                return self._pid
        raise MqttError("65535 packets in flight")

    # -- low level -------------------------------------------------------------------
    async def _send(self, buf):
        conn = self._conn
        if conn is None:
            raise MqttError("not connected")
        async with self._wlock:
            try:
                if isinstance(buf, tuple):       # (header, payload...): _publish()
                    gather = getattr(conn, "send_parts", None)
                    if gather is not None:      # one link write (one modem send)
                        await _deadline(gather(buf), self.cfg["ack_timeout_ms"])
                    else:
                        for part in buf:
                            await _deadline(conn.send(part), self.cfg["ack_timeout_ms"])
                else:
                    await _deadline(conn.send(buf), self.cfg["ack_timeout_ms"])
            except (OSError, asyncio.TimeoutError) as e:
                self._drop("send failed: %r" % (e,), conn)
                raise MqttError("link lost while sending")
        self._last_tx = _ticks()
        self.stats["tx"] += 1

    def _drop(self, why, conn=None):
        if self._conn is None or (conn is not None and conn is not self._conn):
            return                      # already gone, or an older link than the current
        if _DEBUG:
            print("mqtt: drop:", why)
        try:
            self._conn.close()
        except Exception:
            pass
        self._conn = None
        self._ready = False
        self._up = asyncio.Event()
        self.stats["drops"] += 1
        self.stats["last_error"] = why

    def _packet(self, first, body):
        out = bytearray()
        out.append(first)
        _enc_len(out, len(body))
        out.extend(body)
        return out

    async def _open_session(self):
        c = self.cfg
        try:
            conn = await _deadline(self._open(c["host"], c["port"], c["tls"]),
                                   c["connect_timeout_ms"])
        except asyncio.TimeoutError:
            raise MqttError("no connection to %s:%d within %d ms" % (c["host"], c["port"],
                                                                     c["connect_timeout_ms"]))
        except OSError as e:
            # A message that names the broker already (the transport selector's "no
            # transport reached HOST:PORT (...)") is kept as it is: last_error holds it
            # until the next error, and a longer copy of it was ~0.3 KiB more of heap
            # for the rest of the run, and as much again at each attempt (docs/ram.md)
            m = _why(e)
            raise MqttError(m if c["host"] in m else
                            "cannot connect to %s:%d: %s" % (c["host"], c["port"], m))
        flags = 0 if not c["clean"] else 0x02
        body = bytearray(b"\x00\x04MQTT\x04")
        w = c["will"]
        if w:
            flags |= 0x04 | ((w[2] & 3) << 3) | (0x20 if w[3] else 0)
        if c["user"] is not None:
            flags |= 0x80
        if c["password"] is not None:
            flags |= 0x40
        body.append(flags)
        body.extend(struct.pack("!H", c["keepalive_s"]))
        _str(body, c["client_id"])
        if w:
            _str(body, w[0])
            _str(body, w[1])
        if c["user"] is not None:
            _str(body, c["user"])
        if c["password"] is not None:
            _str(body, c["password"])
        self._conn = conn
        self._rxn = self._skip = 0
        if self._rx_next is not None:
            self._swap()                # nothing buffered from the old link
        self._ping_at = None
        try:
            await self._send(self._packet(_CONNECT, body))
            # CONNACK: 4 bytes, within the deadline
            t0 = _ticks()
            while self._rxn < 4:
                left = c["ack_timeout_ms"] - _diff(_ticks(), t0)
                if left <= 0:
                    raise MqttError("no CONNACK from %s within %d ms" % (c["host"],
                                                                         c["ack_timeout_ms"]))
                n = await conn.recv_into(memoryview(self._rx)[self._rxn:4], min(left, c["poll_ms"]))
                self._rxn += n
            if self._rx[0] != _CONNACK or self._rx[1] != 2:
                raise MqttError("broker answered CONNECT with packet 0x%02x" % self._rx[0])
            rc = self._rx[3]
            if rc:
                from util import lookup
                raise MqttError("broker refused the connection: %s" %
                                lookup(CONNACK_REASONS, rc, "code %d" % rc))
        except (OSError, MqttError) as e:
            self._drop("connect: %s" % e)
            raise MqttError(str(e)) if not isinstance(e, MqttError) else e
        self._rxn = 0
        self.session_present = bool(self._rx[2] & 1)
        self._last_rx = _ticks()
        self.stats["connects"] += 1
        # MQTT 3.1.1 4.4: resend unacknowledged PUBLISH packets, DUP set if sent before.
        # Publishes queued meanwhile by other tasks are picked up by the next round.
        done = []
        for _ in range(8):
            todo = [pid for pid in sorted(self._inflight) if pid not in done]
            if not todo:
                break
            for pid in todo:
                done.append(pid)
                ent = self._inflight.get(pid)
                if ent is None:
                    continue
                if ent[1]:
                    pkt = ent[0]
                    (pkt[0] if isinstance(pkt, tuple) else pkt)[0] |= 0x08
                    self.stats["retransmits"] += 1
                ent[1] = True
                await self._send(ent[0])
        self._ready = True
        self._up.set()
        if self.on_connect:
            # a task: subscribing needs run() to be reading the SUBACK
            asyncio.create_task(self.on_connect(self.session_present))
        return self.session_present

    # -- receive buffer ----------------------------------------------------------------
    def rx_buffer(self, n=0):
        """Ask for a receive buffer that takes packets of n bytes (fixed header included);
        n 0: the resting size (rx_rest) again. A larger buffer is allocated here, so a
        MemoryError reaches the caller with nothing changed (the OTA agent counts it and
        tries again); ValueError when n passes max_packet. The run task swaps it in at a
        packet boundary, keeping what the buffer holds (_swap). Going back to the resting
        size allocates nothing here and never raises (the agent calls it on every exit)."""
        n = max(n, self.rx_rest)
        if n > self.cfg["max_packet"]:
            raise ValueError("a %d-byte packet is above mqtt max_packet (%d)"
                             % (n, self.cfg["max_packet"]))
        if n > len(self._rx):
            nx = self._rx_next
            if isinstance(nx, bytearray) and len(nx) == n:
                return                          # already waiting to be swapped in
            nx = self._rx_next = None           # a pending other one is freed first
            self._rx_next = bytearray(n)
        elif n < len(self._rx):
            self._rx_next = n
        else:
            self._rx_next = None

    def _swap(self):
        """Put the buffer rx_buffer() asked for in place: only from the run task, between
        its reads (a read in progress writes into the buffer it was given). What the buffer
        holds - the start of the next packet - is copied over; a smaller buffer waits until
        the packet being received fits it (or nothing is buffered), so no packet is cut."""
        nx = self._rx_next
        rxn = self._rxn
        if isinstance(nx, int):
            if rxn:
                t = _head_total(self._rx, rxn)
                if t is None or t > nx:
                    return                      # the packet being received needs more
            try:
                nx = bytearray(nx)
            except MemoryError:
                gc.collect()
                self.stats["mem_errors"] += 1   # the larger buffer stays: tried again
                return
        if rxn > len(nx):
            return
        nx[0:rxn] = memoryview(self._rx)[0:rxn]
        self._rx = nx
        self._rx_next = None

    # -- incoming --------------------------------------------------------------------
    def _parse(self, acks):
        """Handle the complete packets at the start of self._rx, appending the PUBACKs
        to send to acks (kept when a later packet is malformed: what was delivered is
        acknowledged). Oversized packets switch to discard mode."""
        buf = self._rx
        while self._rxn >= 2:
            rl = 0
            mul = 1
            i = 1
            while True:
                if i >= self._rxn:
                    return acks                     # length bytes not all here yet
                b = buf[i]
                rl += (b & 0x7F) * mul
                mul <<= 7
                i += 1
                if not b & 0x80:
                    break
                if i > 4:
                    raise MqttError("malformed packet length from broker")
            total = i + rl
            first = buf[0]
            if total > len(buf):
                # Too big for our buffer: report it (the command layer answers "oversized"),
                # acknowledge it so the broker does not redeliver it forever, drop the rest.
                if self._rxn < len(buf):
                    return acks                 # fill the buffer first: topic, id, start
                self.stats["oversized"] += 1
                if first & 0xF0 == _PUBLISH and self._rxn >= i + 2:
                    tl = buf[i] << 8 | buf[i + 1]
                    if self._rxn >= i + 2 + tl + 2:
                        topic = bytes(buf[i + 2:i + 2 + tl]).decode()
                        p = i + 2 + tl
                        if first & 0x06:
                            acks.append(buf[p] << 8 | buf[p + 1])
                            p += 2
                        # the start of the payload, so that the reply can name the request
                        self.oversized_head = bytes(buf[p:min(p + 128, self._rxn)])
                        if self.on_message:
                            try:
                                self.on_message(topic, None, bool(first & 0x08))
                            except Exception as e:
                                self.stats["last_error"] = "on_message: %r" % (e,)
                self._skip = total - self._rxn
                self._rxn = 0
                return acks
            if self._rxn < total:
                return acks
            self._handle(first, memoryview(buf)[i:total], acks)
            rest = self._rxn - total
            buf[0:rest] = buf[total:self._rxn]
            self._rxn = rest
        return acks

    def _handle(self, first, body, acks):
        t = first & 0xF0
        if t == _PUBLISH:
            qos = (first >> 1) & 3
            tl = body[0] << 8 | body[1]
            p = 2 + tl
            if qos == 3 or p + (2 if qos else 0) > len(body):
                raise MqttError("malformed PUBLISH from the broker (QoS %d, topic of %d "
                                "bytes in a %d byte packet)" % (qos, tl, len(body)))
            topic = bytes(body[2:2 + tl]).decode()
            if qos:
                acks.append(body[p] << 8 | body[p + 1])
                p += 2
            self.stats["rx"] += 1
            if self.on_message:
                try:
                    self.on_message(topic, bytes(body[p:]), bool(first & 0x08))
                except Exception as e:          # a handler bug must not kill the link
                    self.stats["last_error"] = "on_message: %r" % (e,)
        elif t == _PUBACK:
            ent = self._inflight.pop(body[0] << 8 | body[1], None)
            if ent:
                ent[2].set()
        elif t == _SUBACK:
            ev = self._subacks.get(body[0] << 8 | body[1])
            if ev:
                if body[2] == 0x80:
                    self.stats["last_error"] = "subscription refused (check the ACL)"
                ev.set()
        elif t == _PINGRESP:
            self._ping_at = None

    async def _poll(self):
        """One bounded read step: receive, parse, acknowledge, keep alive."""
        c = self.cfg
        conn = self._conn
        buf = self._rx                  # the read fills this one: _swap() only after it
        if self._skip:
            n = await conn.recv_into(buf, c["poll_ms"])
            if n:
                self._last_rx = _ticks()
                if n <= self._skip:
                    self._skip -= n
                    n = 0
                else:
                    buf[0:n - self._skip] = buf[self._skip:n]
                    n -= self._skip
                    self._skip = 0
                self._rxn = n
        else:
            n = await conn.recv_into(memoryview(buf)[self._rxn:], c["poll_ms"])
            if n:
                self._last_rx = _ticks()
                self._rxn += n
        if self._rx_next is not None:
            self._swap()                # before parsing: a chunk begun in the old buffer
        acks = []
        bad = None
        try:
            self._parse(acks)
        except (IndexError, UnicodeError, ValueError) as e:
            bad = MqttError("malformed packet from the broker: %r" % (e,))
        except MqttError as e:
            bad = e
        for pid in acks:        # what was delivered is acknowledged, even before an error
            await self._send(bytearray((_PUBACK, 2, pid >> 8, pid & 0xFF)))
        if bad is not None:
            raise bad
        now = _ticks()
        ka = c["keepalive_s"] * 1000
        if self._ping_at is not None and _diff(now, self._ping_at) > c["ack_timeout_ms"]:
            raise MqttError("no PINGRESP within %d ms" % c["ack_timeout_ms"])
        if _diff(now, self._last_rx) > ka * 3 // 2:
            raise MqttError("nothing from the broker for %d s" % (ka * 3 // 2000))
        if self._ping_at is None and (_diff(now, self._last_tx) >= ka // 2
                                      or _diff(now, self._last_rx) >= ka // 2):
            self._ping_at = now
            self.stats["pings"] += 1
            await self._send(bytearray((_PINGREQ, 0)))

    # -- public ----------------------------------------------------------------------
    async def connect(self):
        """One connection attempt (raises MqttError). run() does this with backoff."""
        return await self._open_session()

    def _oom(self):
        # The heap had no room (at a reconnect the heap is at its tightest: the transport
        # and the session are set up again while the other tasks hold their buffers).
        # The link, a half-open one too, is dropped and set up again after the backoff,
        # with a collection first; counted (the status' task_errors), never silent. No
        # allocation before the collection: the strings are constants.
        gc.collect()
        self.stats["mem_errors"] += 1
        self._drop(_OOM)
        return _OOM

    async def run(self):
        """Keep the session up until stop(): connect, read, keepalive, reconnect with
        exponential backoff (backoff_min_ms .. backoff_max_ms) and +-25 % jitter. A
        MemoryError while connecting or reading drops the link and counts as a failed
        connection (backoff), instead of ending the task."""
        c = self.cfg
        backoff = c["backoff_min_ms"]
        while not self._stop:
            if self._conn is None:
                err = None
                try:
                    await self._open_session()
                    backoff = c["backoff_min_ms"]
                except MqttError as e:
                    err = _why(e)
                except MemoryError:
                    err = self._oom()
                if err is not None:
                    self.stats["last_error"] = err
                    j = backoff // 4
                    wait = backoff - j + _rand16() % (2 * j + 1)
                    backoff = min(backoff * 2, c["backoff_max_ms"])
                    t0 = _ticks()
                    while not self._stop and _diff(_ticks(), t0) < wait:
                        await _sleep_ms(min(100, wait))
                    continue
            try:
                await self._poll()
            except (OSError, MqttError) as e:
                self._drop(_why(e))
            except MemoryError:
                self.stats["last_error"] = self._oom()

    async def publish(self, topic, payload, qos=0, retain=False, timeout_ms=None):
        """QoS 0: send now (MqttError when not connected). QoS 1: returns once the broker
        has acknowledged, waiting out reconnects for up to timeout_ms (default
        ack_timeout_ms); the packet is resent with DUP after a reconnect. MqttError on
        timeout (the message is then given up: the caller keeps it and tries again)."""
        # payloads from this size on go after their header, not copied into the packet
        # (here, not a method: a 24th entry would grow the class's table to 29 slots)
        c = self._conn
        split_b = 0 if c is not None and getattr(c, "send_parts", None) is not None \
            else _SPLIT_B
        c = None
        if qos == 0:
            if not self._ready:
                raise MqttError("not connected")
            await self._send(_publish(_PUBLISH | (1 if retain else 0), topic, None, payload,
                                      split_b))
            return
        pid = self._next_pid()
        ev = asyncio.Event()
        ent = [_publish(_PUBLISH | 0x02 | (1 if retain else 0), topic, pid, payload,
                        split_b), False, ev]
        self._inflight[pid] = ent
        timeout_ms = timeout_ms or self.cfg["ack_timeout_ms"]
        try:
            if self._ready:
                ent[1] = True
                try:
                    await self._send(ent[0])
                except MqttError:
                    pass                        # resent after the reconnect
            await _deadline(ev.wait(), timeout_ms)
        except asyncio.TimeoutError:
            raise MqttError("no PUBACK for %s within %d ms" % (topic, timeout_ms))
        finally:
            self._inflight.pop(pid, None)

    async def subscribe(self, topic, qos=1):
        if self._conn is None:
            raise MqttError("not connected")
        body = bytearray()
        pid = self._next_pid()
        body.extend(struct.pack("!H", pid))
        _str(body, topic)
        body.append(qos)
        ev = asyncio.Event()
        self._subacks[pid] = ev
        try:
            await self._send(self._packet(_SUBSCRIBE, body))
            await _deadline(ev.wait(), self.cfg["ack_timeout_ms"])
        except asyncio.TimeoutError:
            raise MqttError("no SUBACK for %s" % topic)
        finally:
            self._subacks.pop(pid, None)

    async def disconnect(self):
        """Clean DISCONNECT (the broker then does not publish the will)."""
        self._stop = True
        if self._conn is not None:
            try:
                await self._send(bytearray((_DISCONNECT, 0)))
            except MqttError:
                pass
            self._drop("disconnect")

    def stop(self):
        self._stop = True
