"""The client's packet parser on micropython, with a scripted fake Conn: packets split at
any byte boundary, oversized commands acknowledged and reported with their id, and random
bytes from a 'broker' never kill the client task."""
import json

from comm_harness import MP_FAKE_CONN, run_mp

FAKE = MP_FAKE_CONN + r"""
import json, random
from comm.mqtt import MQTTClient
def acks(sent):
    return [sent[k + 3] for k in range(len(sent) - 3) if sent[k] == 0x40 and sent[k + 1] == 2]
"""

SPLIT = FAKE + r"""
big = pub(b"lipari/v1/m1/cmd", b'{"id": "big1", "x": "' + b"y" * 5000 + b'"}', 7)
small = pub(b"lipari/v1/m1/cmd", b'{"id": "s"}', 8)
stream = b"\x20\x02\x00\x00" + small + b"\xd0\x00" + big + small.replace(b"\x00\x08{", b"\x00\x09{")
res = []
for chunk in (1, 2, 3, 7, 100, 1023, 4096):
    got = []
    conn = FakeConn(stream, chunk)
    async def opener(h, p, t): return conn
    c = MQTTClient({"client_id": "m1", "host": "x", "max_packet": 1024}, opener,
                   on_message=lambda t, p, d: got.append(
                       c.oversized_head[:12].decode() if p is None else p.decode()))
    async def main():
        task = asyncio.create_task(c.run())
        for _ in range(2000):
            await asyncio.sleep_ms(2)
            if len(got) >= 3 and len(acks(conn.sent)) >= 3: break
        c.stop()
    asyncio.run(main())
    res.append({"chunk": chunk, "got": got, "acks": acks(conn.sent), "over": c.stats["oversized"],
                "drops": c.stats["drops"]})
print(json.dumps(res))
"""

GARBAGE = FAKE + r"""
random.seed(99)
alive = 0
errors = set()
for n in range(150):
    junk = bytes(random.getrandbits(8) for _ in range(random.getrandbits(6)))
    if n % 3 == 0:                       # a plausible header with a lying length
        junk = bytes([random.choice((0x30, 0x32, 0x40, 0x90, 0xd0)), random.getrandbits(8)]) + junk
    conns = [FakeConn(b"\x20\x02\x00\x00" + junk, 1 + n % 5)]
    async def opener(h, p, t):
        # first link: CONNACK then junk; reconnects: a clean broker
        return conns.pop() if conns else FakeConn(b"\x20\x02\x00\x00", 4)
    c = MQTTClient({"client_id": "m1", "host": "x", "max_packet": 256, "backoff_min_ms": 1,
                    "backoff_max_ms": 2}, opener, on_message=lambda t, p, d: None)
    async def main():
        global alive
        task = asyncio.create_task(c.run())
        for _ in range(15):
            await asyncio.sleep_ms(2)
        alive += 0 if task.done() else 1
        c.stop()
        await asyncio.sleep_ms(10)
    asyncio.run(main())
    if c.stats["drops"]:
        errors.add(c.stats["last_error"][:24])
print(json.dumps({"alive": alive, "errors": sorted(errors)}))
"""


def test_packets_split_anywhere_and_oversized_commands():
    res = json.loads(run_mp(SPLIT, heapsize="4M").strip().splitlines()[-1])
    for r in res:
        assert r["got"] == ['{"id": "s"}', '{"id": "big1', '{"id": "s"}'], r
        assert r["acks"] == [8, 7, 9] and r["over"] == 1 and r["drops"] == 0, r


def test_random_bytes_from_the_broker_never_kill_the_client():
    r = json.loads(run_mp(GARBAGE, heapsize="4M", timeout=60).strip().splitlines()[-1])
    assert r["alive"] == 150, r
    assert len(r["errors"]) >= 2, r       # malformed input was noticed, not ignored


ENCODE = FAKE + r"""
import gc
from comm.mqtt import _publish_packet, _publish
def ref(first, topic, pid, payload):
    body = bytes([len(topic) >> 8, len(topic) & 255]) + topic
    if pid is not None:
        body += bytes([pid >> 8, pid & 255])
    body += payload
    n = len(body); out = bytearray([first])
    while True:
        b = n & 127; n >>= 7
        out.append(b | 128 if n else b)
        if not n: break
    return bytes(out) + body
bad = []
for tlen in (1, 20):
    for plen in (0, 1, 100, 101, 102, 123, 124, 125, 126, 127, 128, 16350, 16380, 16384, 20000):
        for pid in (None, 1, 65535):
            t = b"t" * tlen
            p = bytes(range(256)) * (plen // 256) + bytes(range(plen % 256))
            first = 0x30 if pid is None else 0x32
            for topic, payload in ((t, p), (t.decode(), memoryview(p))):
                got = _publish_packet(first, topic, pid, payload)
                if bytes(got) != ref(first, t, pid, p):
                    bad.append((tlen, plen, pid))
                hdr = _publish_packet(first, topic, pid, payload, False)
                if bytes(hdr) + p != ref(first, t, pid, p) or len(hdr) > 1 + 4 + 2 + tlen + 2:
                    bad.append(("header", tlen, plen, pid))
# one allocation of the packet's size, not a body grown and then copied
p = b"x" * 1000
gc.collect()
a0 = gc.mem_alloc()
pkt = _publish_packet(0x32, b"lipari/v1/m1/reply", 7, p)
grew = gc.mem_alloc() - a0
# a large bytes payload is sent after its header, not copied; a small one or a mutable
# one (it could change before a resend) is copied into the packet
big = b"r" * 900
split = _publish(0x32, "lipari/v1/m1/resp", 9, big)
whole = ref(0x32, b"lipari/v1/m1/resp", 9, big)
kinds = [isinstance(split, tuple) and split[1] is big and bytes(split[0]) + big == whole,
         isinstance(_publish(0x32, "t", 9, b"r" * 100), bytearray),
         isinstance(_publish(0x32, "t", 9, bytearray(900)), bytearray)]
print(json.dumps({"bad": bad, "len": len(pkt), "grew": grew, "kinds": kinds}))
"""


def test_publish_packet_is_encoded_exactly_and_allocated_once():
    """The PUBLISH packet built in one allocation (docs/ram.md) is byte for byte the
    MQTT 3.1.1 encoding, across the remaining-length boundaries (127/128, 16383/16384),
    with and without a packet id, for str / bytes topics and memoryview payloads."""
    r = json.loads(run_mp(ENCODE, heapsize="4M").strip().splitlines()[-1])
    assert r["bad"] == [], r
    assert r["kinds"] == [True, True, True], r
    assert r["len"] == 1 + 2 + 2 + 18 + 2 + 1000
    # the packet (1025 bytes: 65 blocks of 16 on the 64-bit port's heap) and at most a few
    # small objects; a body grown by extend() and copied would add another ~1 KiB
    assert r["grew"] < r["len"] + 256, r


RESEND = FAKE + r"""
conns = [FakeConn(b"\x20\x02\x00\x00", 4), FakeConn(b"\x20\x02\x00\x00", 4)]
used = []
async def opener(h, p, t):
    k = conns.pop(0)
    used.append(k)
    return k
c = MQTTClient({"client_id": "m1", "host": "x", "backoff_min_ms": 1, "backoff_max_ms": 2,
                "ack_timeout_ms": 5000}, opener)
big = bytes(range(256)) * 3 + b"end"
async def main():
    task = asyncio.create_task(c.run())
    for _ in range(500):
        await asyncio.sleep_ms(2)
        if c.isconnected(): break
    p = asyncio.create_task(c.publish("lipari/v1/m1/resp", big, 1))
    await asyncio.sleep_ms(30)
    c._drop("test: link lost before the PUBACK")
    for _ in range(500):
        await asyncio.sleep_ms(2)
        if len(used) == 2 and c.isconnected(): break
    await asyncio.sleep_ms(30)
    c.stop()
    p.cancel()
asyncio.run(main())
first = pub(b"lipari/v1/m1/resp", big, 1)
dup = bytes([first[0] | 0x08]) + first[1:]
s1, s2 = bytes(used[0].sent), bytes(used[1].sent)
print(json.dumps({"first": s1.endswith(first), "dup": s2.endswith(dup),
                  "retransmits": c.stats["retransmits"]}))
"""


def test_a_large_publish_sent_after_its_header_is_resent_whole_with_dup():
    """A reply of 771 bytes goes out as header + payload (comm.mqtt._publish); the link
    drops before the PUBACK: after the reconnect the same packet is sent again, whole,
    with the DUP flag in its header (MQTT 3.1.1 4.4)."""
    r = json.loads(run_mp(RESEND, heapsize="4M").strip().splitlines()[-1])
    assert r == {"first": True, "dup": True, "retransmits": 1}, r


OOM = FAKE + r"""
class OomConn(FakeConn):
    # CONNACK, then a MemoryError on the next read (the heap full while reading)
    async def recv_into(self, buf, t):
        if self.i >= 4:
            self.i = -1000
            raise MemoryError("memory allocation failed, allocating 304 bytes")
        return await FakeConn.recv_into(self, buf, t)
opened = []
async def opener(h, p, t):
    opened.append(len(opened))
    if len(opened) == 1:
        raise MemoryError("memory allocation failed, allocating 304 bytes")   # connecting
    if len(opened) == 2:
        return OomConn(b"\x20\x02\x00\x00", 4)
    return FakeConn(b"\x20\x02\x00\x00", 4)
c = MQTTClient({"client_id": "m1", "host": "x", "backoff_min_ms": 1, "backoff_max_ms": 2},
               opener)
errors = []
async def main():
    task = asyncio.create_task(c.run())
    for _ in range(300):
        await asyncio.sleep_ms(2)
        if c.stats["last_error"] and c.stats["last_error"] not in errors:
            errors.append(c.stats["last_error"])
        if len(opened) >= 3 and c.isconnected():
            break
    alive = not task.done()
    c.stop()
    return alive
alive = asyncio.run(main())
print(json.dumps({"alive": alive, "opened": len(opened), "connected": c.isconnected(),
                  "mem_errors": c.stats["mem_errors"], "connects": c.stats["connects"],
                  "errors": errors}))
"""


def test_a_memory_error_while_connecting_or_reading_drops_the_link_and_reconnects():
    """At a reconnect the heap is at its tightest: a MemoryError while the session is set
    up, or while it reads, used to end the MQTT task (only the watchdog brought the meter
    back). It drops the link, is counted (mem_errors: the status' task_errors) and the
    client connects again after the backoff."""
    r = json.loads(run_mp(OOM, heapsize="4M").strip().splitlines()[-1])
    assert r["alive"] and r["connected"], r
    assert r["opened"] == 3 and r["mem_errors"] == 2 and r["connects"] == 2, r
    assert all(e.startswith("out of memory") for e in r["errors"]), r


WHY = r"""
import json, micropython
from comm.mqtt import _why, MqttError
e1 = MqttError("no CONNACK from broker within 1000 ms")
e2 = OSError(104)
got = [None, None]
micropython.heap_lock()
try:
    got[0] = _why(e1)
    got[1] = _why(e2)
finally:
    micropython.heap_unlock()
got.append(_why(e2))
print(json.dumps(got))
"""


def test_reporting_a_link_error_cannot_end_the_mqtt_task_on_a_full_heap():
    """run() kept the reason of a failed connection or read as str(e), which builds a new
    string: at a 64 KiB heap that allocation (304 bytes) raised a MemoryError inside the
    except clause and ended the MQTT task (the watchdog reset the meter). comm.mqtt._why
    takes the message without allocating, and says "out of memory" when formatting one
    needs the heap (here: locked)."""
    r = json.loads(run_mp(WHY, heapsize="4M").strip().splitlines()[-1])
    assert r[0] == "no CONNACK from broker within 1000 ms", r
    assert r[1].startswith("out of memory"), r
    assert "104" in r[2], r


GATHER = FAKE + r"""
class PartsConn(FakeConn):
    def __init__(self, *a):
        FakeConn.__init__(self, *a)
        self.calls = []
    async def send_parts(self, parts):
        self.calls.append(parts)
        for p in parts:
            self.sent.extend(p)
from comm.mqtt import MqttError
kinds = {}
for gather in (True, False):
    conn = PartsConn(b"\x20\x02\x00\x00", 4) if gather else FakeConn(b"\x20\x02\x00\x00", 4)
    async def opener(h, p, t):
        return conn
    c = MQTTClient({"client_id": "m1", "host": "x", "ack_timeout_ms": 300}, opener)
    rec = bytes(range(150))
    async def main():
        task = asyncio.create_task(c.run())
        for _ in range(500):
            await asyncio.sleep_ms(2)
            if c.isconnected(): break
        n0 = len(conn.sent)
        await c.publish("lipari/v1/m1/rt", rec, 0)
        try:
            await c.publish("lipari/v1/m1/interval", rec, 1)   # no PUBACK: times out
        except MqttError:
            pass
        c.stop()
        return bytes(conn.sent[n0:])
    sent = asyncio.run(main())
    want = pub(b"lipari/v1/m1/rt", rec) + pub(b"lipari/v1/m1/interval", rec, 1)
    calls = getattr(conn, "calls", [])
    kinds[str(gather)] = {"exact": sent == want, "calls": len(calls),
                          "shared": all(k[-1] is rec for k in calls),
                          "heads": [len(k[0]) for k in calls]}
print(json.dumps(kinds))
"""


def test_a_link_that_sends_parts_gets_the_payload_uncopied():
    """Over a link with send_parts (the NB-IoT modem: one AT+QISEND for the parts) a
    PUBLISH goes as its header and the caller's payload object itself, QoS 0 and 1: no
    copy of a record or live reading in flight. The bytes on the wire are the same as the
    one-packet encoding a link without send_parts gets."""
    r = json.loads(run_mp(GATHER, heapsize="4M").strip().splitlines()[-1])
    assert r["True"] == {"exact": True, "calls": 2, "shared": True,
                         "heads": [1 + 2 + 2 + 15, 1 + 2 + 2 + 21 + 2]}, r
    assert r["False"]["exact"] is True and r["False"]["calls"] == 0, r
