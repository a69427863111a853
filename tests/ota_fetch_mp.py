# Runs on micropython (tests/test_ota_fetch.py): the agent's MQTT download loop
# (ota/agent.py _fetch_mqtt) against a fake session whose head-end answers each request
# as headend/ota_server.py does (whole pieces from "o" within "n"), with the delivery
# order chosen by IN["mode"]:
#   "race": the first piece of an answer, then (while the agent writes it) the middle
#           ones, then the last one only after the agent has written all the others and
#           waited a while (a broker or head-end that stalls between pieces);
#   "lose": every piece at once, but the second answer's last piece is lost once;
#   "bad":  every piece at once, each with a byte flipped (the download fails).
# IN["oom"]: the client's rx_buffer() raises MemoryError this many times (-1: always).
# Prints one JSON line: the pieces sent per offset, the requests, the agent's counters,
# whether the slot holds the whole image, and the milliseconds it took.
import os
import json
import struct
import binascii
import time
try:
    import asyncio
except ImportError:
    import uasyncio as asyncio

from ota import manifest as man
from ota.agent import Agent
from ota.manifest import Refused
from ota.stage import Stage, makedirs

IN = json.loads(open(INPUT).read())     # INPUT: set by the test before exec
RAW = IN["manifest"].encode()
M = man.check_fields(json.loads(RAW))
IMAGE = binascii.unhexlify(IN["image"])
D = IN["dir"]
GAP_MS = IN["cfg"]["gap_ms"]


class Client:
    def __init__(self):
        self.stats = {"connects": 1}
        self.requests = []
        self.rx = []                       # rx_buffer() calls: the sizes asked for
        self.rx_rest = 1047
        self.oom = IN.get("oom", 0)

    def rx_buffer(self, n=0):
        self.rx.append(n)
        if n and self.oom:
            self.oom -= 1
            raise MemoryError("memory allocation failed, allocating %d bytes" % n)

    def isconnected(self):
        return True

    def transport_name(self):
        return "nbiot"

    async def publish(self, topic, payload, qos, *a):
        if topic.endswith("ota/req"):
            r = json.loads(payload)
            self.requests.append([r["o"], r["n"]])
            asyncio.create_task(HEADEND.answer(r["o"], r["n"], len(self.requests)))


class Session:
    base = "lipari/v1/m1/"
    queue = []
    cfg = {"ack_timeout_ms": 1000}

    def __init__(self):
        self.client = Client()
        self.handlers = {}

    def add_topic(self, suffix, qos, handler):
        self.handlers[suffix] = handler


class HeadEnd:
    def __init__(self, agent, tag):
        self.agent = agent
        self.tag = tag
        self.sent = {}                     # offset -> times sent

    def pieces(self, off, n):
        out = []
        pos = off
        while pos < len(IMAGE) and (not out or man.piece_end(M, pos) - off <= n):
            end = man.piece_end(M, pos)
            out.append((pos, IMAGE[pos:end]))
            pos = end
        return out

    def send(self, off, data):
        self.sent[off] = self.sent.get(off, 0) + 1
        if IN["mode"] == "bad":
            data = bytes([data[0] ^ 1]) + data[1:]
        self.agent._on_data(b"\x01" + self.tag + struct.pack("<I", off) + data)

    async def until_written(self, k):
        while self.agent.stats["chunks"] < k or self.agent.inbox:
            await asyncio.sleep_ms(1)

    async def answer(self, off, n, k):
        ps = self.pieces(off, min(n, 16384))
        if IN["mode"] in ("lose", "bad"):
            for i, (o, d) in enumerate(ps):
                if k == 2 and i == len(ps) - 1:
                    self.sent[o] = self.sent.get(o, 0) + 1     # lost on the way
                    continue
                self.send(o, d)
            return
        base = self.agent.stats["chunks"]
        self.send(*ps[0])
        if len(ps) == 1:
            return
        await self.until_written(base + 1)        # the agent writes it, then pauses
        for o, d in ps[1:-1]:
            self.send(o, d)                       # these come while it is not waiting
        await self.until_written(base + len(ps) - 1)
        await asyncio.sleep_ms(5 * GAP_MS)        # the last piece is late, not lost
        self.send(*ps[-1])


async def main():
    s = Session()
    makedirs(D + "/b")
    a = Agent(s, None, None, None, {"slot": 0, "state": 0, "dir": D}, IN["cfg"])
    o = {"id": "r1.m1", "raw": RAW, "m": M}
    global HEADEND
    HEADEND = HeadEnd(a, man.tag(o))
    st = Stage(D, M, D + "/b")
    t0 = time.ticks_ms()
    why = None
    try:
        await asyncio.wait_for_ms(a._fetch_mqtt(st, o), 120000)
    except Refused as e:
        why = "%s: %s" % (e.code, e)
    ms = time.ticks_diff(time.ticks_ms(), t0)
    await asyncio.sleep_ms(20 * GAP_MS)           # anything still on its way is counted
    ok = st.done()
    if ok:
        for _ in st.check_files():
            pass
    print(json.dumps({"sent": [[k, v] for k, v in sorted(HEADEND.sent.items())],
                      "pieces": len(HEADEND.pieces(0, len(IMAGE))),
                      "requests": s.client.requests, "stats": a.stats, "done": ok,
                      "ms": ms, "rx": s.client.rx, "need": a.chunk_packet_bytes(M), "block": M["block"],
                      "refused": why}))


HEADEND = None
asyncio.run(main())
