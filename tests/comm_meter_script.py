# A virtual meter's comm stack for the broker tests, run on micropython:
#   micropython comm_meter_script.py <port> <records> [hold_s]
# Session + FlashQueue on littlefs (sim/flash RAM device) + the plain-socket transport;
# a FakeMeter feeds interval/event/rt records through the sinks like metering/engine.
import sys
import json
import os
import asyncio
from sim.flash import FlashDev
from comm.fqueue import FlashQueue
from comm.session import Session
import comm_sockconn as sc
from comm_fakemeter import FakeMeter
from comm_harness_mp import INTERVAL

PORT = int(sys.argv[1])
N = int(sys.argv[2])
HOLD_S = int(sys.argv[3]) if len(sys.argv) > 3 else 0
MID = sys.argv[4] if len(sys.argv) > 4 else "m1"
HA = len(sys.argv) > 5 and sys.argv[5] == "ha"

dev = FlashDev(4096, 64)
os.VfsLfs2.mkfs(dev)
os.mount(os.VfsLfs2(dev), "/fl")
q = FlashQueue("/fl/q")
m = FakeMeter()
s = Session(MID, {"host": "127.0.0.1", "port": PORT, "password": MID + "-pw", "keepalive_s": 2,
                  "backoff_min_ms": 300, "backoff_max_ms": 1000, "ack_timeout_ms": 3000},
            sc.connect, q, cfg={"rt_s": 1, "backlog_per_s": 50, "ack_timeout_ms": 3000, "ha_discovery": HA},
            info={"fw": "test-1", "board": "sim"})
s.attach(m, key=bytes(range(32)), state_path="/fl/ctr")


async def main():
    task = asyncio.create_task(s.run())
    print("start")
    for i in range(N):
        rec = dict(INTERVAL)
        rec["seq"] = i
        rec["t_end"] = INTERVAL["t_end"] + 900 * i
        for sink in m.sinks:
            sink("interval", rec)
            if i % 5 == 0:
                sink("event", {"seq": i // 5, "t": rec["t_end"], "kind": "sag", "phase": 1,
                               "value": 180000 + i})
            sink("rt", {"t": rec["t_end"], "v_mv": [230000, 231000, 229000],
                        "p_mw": [1000000, 0, 5], "ai_wh": 100 + i})
        print("rec", i)
        await asyncio.sleep_ms(100)
    for _ in range(300):                    # wait (bounded) for the backlog to drain
        if not len(q):
            break
        await asyncio.sleep_ms(100)
    print(json.dumps({"session": s.stats, "mqtt": s.client.stats, "q": q.stats()}))
    await asyncio.sleep(HOLD_S)
    print("done")


asyncio.run(main())
