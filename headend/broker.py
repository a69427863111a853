"""Embedded MQTT 3.1.1 broker: the fallback `make run` uses when Mosquitto is not installed.

Small on purpose, written for this project (asyncio, standard library only), and enough for
Lipari's traffic: QoS 0 and 1 (QoS 2 publishes are accepted and delivered once, onward
delivery is at most QoS 1), retained messages, last will, keepalive, persistent sessions
(clean session = 0 keeps subscriptions and queues QoS 1 messages while the client is away,
bounded, with a drop counter), wildcards `+` / `#`, and shared subscriptions
`$share/<group>/<filter>` (round robin among the group's connected members), which the
head-end's ingest uses to spread meters over several workers.

Not a production broker: no TLS, no authentication (it listens on 127.0.0.1 by default),
no MQTT 5. For a fleet use Mosquitto.

    python -m headend.broker --port 1883
    b = BrokerThread(port=0).start(); b.port; b.stop()
"""
import argparse
import asyncio
import collections
import struct
import sys
import threading

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

MAX_PACKET = 1 << 20          # larger packets close the connection (meters send < 4 KiB)
QUEUE_MAX = 100000            # per offline persistent session
SLOW_CLIENT_BYTES = 64 << 20  # a subscriber that stops reading is disconnected past this


class BrokerError(Exception):
    """A client broke the MQTT protocol; the connection is closed."""


def topic_matches(filt, topic):
    """MQTT filter matching. `$`-topics are not matched by a leading wildcard."""
    if filt == topic:
        return True
    f = filt.split("/")
    t = topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t):
            return False
        if part != "+" and part != t[i]:
            return False
    return len(f) == len(t)


def _valid_filter(filt):
    if not filt:
        return False
    parts = filt.split("/")
    for i, p in enumerate(parts):
        if "#" in p and (p != "#" or i != len(parts) - 1):
            return False
        if "+" in p and p != "+":
            return False
    return True


def _enc_len(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _packet(ptype, flags, body):
    return bytes([(ptype << 4) | flags]) + _enc_len(len(body)) + body


class _Reader:
    def __init__(self, data):
        self.d = data
        self.i = 0

    def u8(self):
        if self.i >= len(self.d):
            raise BrokerError("packet too short")
        self.i += 1
        return self.d[self.i - 1]

    def u16(self):
        if self.i + 2 > len(self.d):
            raise BrokerError("packet too short")
        self.i += 2
        return struct.unpack_from("!H", self.d, self.i - 2)[0]

    def bytes_(self):
        n = self.u16()
        if self.i + n > len(self.d):
            raise BrokerError("string runs past the packet")
        self.i += n
        return bytes(self.d[self.i - n:self.i])

    def str_(self):
        try:
            return self.bytes_().decode()
        except UnicodeError:
            raise BrokerError("string is not UTF-8")

    def rest(self):
        return bytes(self.d[self.i:])

    def more(self):
        return self.i < len(self.d)


class Session:
    def __init__(self, client_id, clean):
        self.client_id = client_id
        self.clean = clean
        self.subs = {}                      # filter -> qos (not shared)
        self.subs_shared = {}               # (group, filter) -> qos
        self.writer = None
        self.inflight = collections.OrderedDict()   # pid -> (topic, payload)
        self.queue = collections.deque()    # (topic, payload, qos) while offline
        self.dropped = 0
        self.next_pid = 0
        self.qos2_in = set()
        self.will = None

    def pid(self):
        for _ in range(65535):
            self.next_pid = self.next_pid % 65535 + 1
            if self.next_pid not in self.inflight:
                return self.next_pid
        raise BrokerError("65535 messages in flight to %s" % self.client_id)


class Broker:
    def __init__(self, host="127.0.0.1", port=1883, queue_max=QUEUE_MAX):
        self.host = host
        self.port = port
        self.queue_max = queue_max
        self.sessions = {}                  # client id -> Session
        self.shared = {}                    # (group, filter) -> [client ids]
        self.rr = collections.Counter()     # (group, filter) -> next index
        self.retained = {}                  # topic -> (payload, qos)
        self.stats = collections.Counter()
        self._server = None
        self._anon = 0

    async def start(self):
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        if self._server:
            self._server.close()
            for s in list(self.sessions.values()):
                if s.writer:
                    s.writer.close()
            await self._server.wait_closed()

    # -- routing ---------------------------------------------------------------------
    def publish(self, topic, payload, qos=0, retain=False):
        self.stats["received"] += 1
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        targets = {}
        for s in self.sessions.values():
            best = -1
            for f, q in s.subs.items():
                if q > best and topic_matches(f, topic):
                    best = q
            if best >= 0:
                targets[s.client_id] = min(best, qos)
        for (group, filt), members in self.shared.items():
            if not members or not topic_matches(filt, topic):
                continue
            n = len(members)
            start = self.rr[(group, filt)]
            chosen = None
            for k in range(n):
                cid = members[(start + k) % n]
                s = self.sessions.get(cid)
                if s is not None and s.writer is not None:
                    chosen = cid
                    self.rr[(group, filt)] = (start + k + 1) % n
                    break
            if chosen is None:              # nobody online: queue for a persistent member
                for cid in members:
                    s = self.sessions.get(cid)
                    if s is not None and not s.clean:
                        chosen = cid
                        break
            if chosen is not None:
                q = min(qos, self.sessions[chosen].subs_shared.get((group, filt), 0))
                targets[chosen] = max(targets.get(chosen, -1), q)
        for cid, q in targets.items():
            self._deliver(self.sessions[cid], topic, payload, q, False)

    def _deliver(self, s, topic, payload, qos, retain):
        qos = min(qos, 1)
        if s.writer is None:
            if not s.clean and qos:
                if len(s.queue) >= self.queue_max:
                    s.queue.popleft()
                    s.dropped += 1
                    self.stats["dropped"] += 1
                s.queue.append((topic, payload, qos))
            return
        flags = (qos << 1) | (1 if retain else 0)
        body = _str(topic)
        if qos:
            pid = s.pid()
            s.inflight[pid] = (topic, payload)
            body += struct.pack("!H", pid)
        self._write(s, _packet(PUBLISH, flags, body + payload))
        self.stats["sent"] += 1

    def _write(self, s, data):
        w = s.writer
        if w is None:
            return
        try:
            if w.transport.get_write_buffer_size() > SLOW_CLIENT_BYTES:
                self.stats["slow_disconnects"] += 1
                w.close()
                return
            w.write(data)
        except Exception:
            pass

    # -- one connection --------------------------------------------------------------
    async def _read_packet(self, reader, timeout):
        h = await asyncio.wait_for(reader.readexactly(1), timeout)
        n = 0
        for shift in (0, 7, 14, 21):
            b = (await asyncio.wait_for(reader.readexactly(1), timeout))[0]
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
        else:
            raise BrokerError("malformed remaining length")
        if n > MAX_PACKET:
            raise BrokerError("packet of %d bytes is larger than %d" % (n, MAX_PACKET))
        body = await asyncio.wait_for(reader.readexactly(n), timeout) if n else b""
        return h[0] >> 4, h[0] & 0x0F, body

    async def _client(self, reader, writer):
        s = None
        graceful = False
        try:
            ptype, _, body = await self._read_packet(reader, 10)
            if ptype != CONNECT:
                raise BrokerError("first packet is not CONNECT")
            s, keepalive = self._connect(_Reader(body), writer)
            if s is None:
                return
            timeout = keepalive * 1.5 if keepalive else None
            while True:
                ptype, flags, body = await self._read_packet(reader, timeout)
                if ptype == DISCONNECT:
                    graceful = True
                    break
                self._handle(s, ptype, flags, _Reader(body))
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, BrokerError,
                OSError):
            pass
        finally:
            if s is not None and s.writer is writer:
                s.writer = None
                will = s.will
                s.will = None
                if s.clean:
                    self._drop_session(s)
                if will and not graceful:
                    self.publish(*will)
            try:
                writer.close()
            except Exception:
                pass

    def _connect(self, r, writer):
        proto = r.str_()
        level = r.u8()
        if proto not in ("MQTT", "MQIsdp") or level not in (3, 4):
            writer.write(_packet(CONNACK, 0, b"\x00\x01"))   # unacceptable protocol version
            return None, 0
        cflags = r.u8()
        keepalive = r.u16()
        cid = r.str_()
        clean = bool(cflags & 0x02)
        if not cid:
            if not clean:
                writer.write(_packet(CONNACK, 0, b"\x00\x02"))
                return None, 0
            self._anon += 1
            cid = "auto-%d" % self._anon
        will = None
        if cflags & 0x04:
            wt = r.str_()
            wp = r.bytes_()
            will = (wt, wp, (cflags >> 3) & 3, bool(cflags & 0x20))
        old = self.sessions.get(cid)
        if old is not None and old.writer is not None:       # take-over: close the old link
            try:
                old.writer.close()
            except Exception:
                pass
            old.writer = None
            if old.will:
                w, old.will = old.will, None
                self.publish(*w)
        present = old is not None and not clean and not old.clean
        if old is not None and not present:
            self._drop_session(old)
            old = None
        s = old if present else Session(cid, clean)
        s.clean = clean
        s.will = will
        s.writer = writer
        self.sessions[cid] = s
        writer.write(_packet(CONNACK, 0, bytes([1 if present else 0, 0])))
        # resend what was in flight, then what was queued while away
        for pid, (t, p) in list(s.inflight.items()):
            self._write(s, _packet(PUBLISH, 0x0A, _str(t) + struct.pack("!H", pid) + p))
        while s.queue and s.writer is not None:
            self._deliver(s, *s.queue.popleft(), False)
        self.stats["connects"] += 1
        return s, keepalive

    def _drop_session(self, s):
        if self.sessions.get(s.client_id) is s:
            del self.sessions[s.client_id]
        for key, members in self.shared.items():
            if s.client_id in members:
                members.remove(s.client_id)

    def _handle(self, s, ptype, flags, r):
        if ptype == PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                raise BrokerError("PUBLISH with QoS 3")
            topic = r.str_()
            if not topic or "+" in topic or "#" in topic:
                raise BrokerError("PUBLISH to an invalid topic %r" % topic)
            pid = r.u16() if qos else 0
            payload = r.rest()
            if qos == 2:
                self._write(s, _packet(PUBREC, 0, struct.pack("!H", pid)))
                if pid in s.qos2_in:
                    return                   # duplicate of one we already delivered
                s.qos2_in.add(pid)
            self.publish(topic, payload, qos, bool(flags & 1))
            if qos == 1:
                self._write(s, _packet(PUBACK, 0, struct.pack("!H", pid)))
        elif ptype == PUBACK:
            s.inflight.pop(r.u16(), None)
        elif ptype == PUBREC:                # we never send QoS 2, but answer politely
            self._write(s, _packet(PUBREL, 2, struct.pack("!H", r.u16())))
        elif ptype == PUBREL:
            pid = r.u16()
            s.qos2_in.discard(pid)
            self._write(s, _packet(PUBCOMP, 0, struct.pack("!H", pid)))
        elif ptype == PUBCOMP:
            s.inflight.pop(r.u16(), None)
        elif ptype == SUBSCRIBE:
            pid = r.u16()
            granted = bytearray()
            new = []
            while r.more():
                filt = r.str_()
                q = min(r.u8() & 3, 1)
                if not _valid_filter(filt):
                    granted.append(0x80)
                    continue
                if filt.startswith("$share/"):
                    parts = filt.split("/", 2)
                    if len(parts) < 3 or not parts[1] or not _valid_filter(parts[2]):
                        granted.append(0x80)
                        continue
                    key = (parts[1], parts[2])
                    members = self.shared.setdefault(key, [])
                    if s.client_id not in members:
                        members.append(s.client_id)
                    s.subs_shared[key] = q
                else:
                    s.subs[filt] = q
                    new.append((filt, q))
                granted.append(q)
            self._write(s, _packet(SUBACK, 0, struct.pack("!H", pid) + bytes(granted)))
            for filt, q in new:
                for t, (p, rq) in list(self.retained.items()):
                    if topic_matches(filt, t):
                        self._deliver(s, t, p, min(q, rq), True)
        elif ptype == UNSUBSCRIBE:
            pid = r.u16()
            while r.more():
                filt = r.str_()
                if filt.startswith("$share/"):
                    parts = filt.split("/", 2)
                    key = (parts[1], parts[2]) if len(parts) == 3 else None
                    if key in self.shared and s.client_id in self.shared[key]:
                        self.shared[key].remove(s.client_id)
                else:
                    s.subs.pop(filt, None)
            self._write(s, _packet(UNSUBACK, 0, struct.pack("!H", pid)))
        elif ptype == PINGREQ:
            self._write(s, _packet(PINGRESP, 0, b""))
        else:
            raise BrokerError("unexpected packet type %d" % ptype)


class BrokerThread:
    """The broker on its own event loop in a daemon thread (tests, `lipari system`)."""

    def __init__(self, host="127.0.0.1", port=0):
        self.broker = Broker(host, port)
        self._loop = None
        self._thread = None
        self._ready = threading.Event()
        self._error = None

    @property
    def port(self):
        return self.broker.port

    def start(self, timeout_s=5):
        self._thread = threading.Thread(target=self._run, name="lipari-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError("embedded broker did not start within %s s" % timeout_s)
        if self._error:
            raise self._error
        return self

    def _run(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self.broker.start())
        except OSError as e:
            self._error = OSError("embedded broker cannot listen on %s:%s: %s (is another broker "
                                  "running there?)" % (self.broker.host, self.broker.port, e))
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.broker.stop())
        self._loop.close()

    def stop(self, timeout_s=5):
        if self._loop and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(timeout_s)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m headend.broker", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="TCP port (default 1883, 0 = any free)")
    a = p.parse_args(argv)

    async def run():
        b = Broker(a.host, a.port)
        try:
            await b.start()
        except OSError as e:
            print("broker: cannot listen on %s:%d: %s. Pick another --port or stop the program "
                  "using it." % (a.host, a.port, e), file=sys.stderr)
            return 1
        print("broker: listening on %s:%d" % (a.host, b.port), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await b.stop()

    try:
        return asyncio.run(run()) or 0
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
