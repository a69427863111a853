# The bridge client's own heap (sim/bridgelink.py, as the unix boards build it) and the
# allocation of its frame path, on the micropython binary (bench/runner_bench.py).
# argv: socket path of a running BridgeServer (three-phase board), frames to run locked.
import gc
import json
import sys

import micropython

gc.collect()
f0 = gc.mem_free()
from sim import bridgelink as bl  # noqa: E402
gc.collect()
f1 = gc.mem_free()
from sim.vclock import StepClock  # noqa: E402  (the board's clock: not the bridge's)
gc.collect()
f1b = gc.mem_free()
br = bl.Bridge(sys.argv[1])
now, ep, off, synced, boots = br.hello(True, 1, 1767225600)
gc.collect()
f2 = gc.mem_free()
clk = StepClock(ep, start_us=now)
br.attach(clk)
gc.collect()
f2b = gc.mem_free()
scs = [bl.LinkPin(br, bl.PIN_SCS, i) for i in range(2)]
en = [bl.LinkPin(br, bl.PIN_EN, i) for i in range(2)]
syn = bl.LinkPin(br, bl.PIN_SYN, 0)
stop = bl.LinkPin(br, bl.PIN_STOP, 0, 0)
spi = bl.LinkSPI(br)
wdt = bl.LinkWDT(br, 8000)
gc.collect()
f3 = gc.mem_free()
tx = bytearray(b"\x48\xff\xff\xff\x00")
rx = bytearray(5)
n = int(sys.argv[2])


def cycle():
    syn.value(0)
    clk.sleep_us_busy(4)
    syn.value(1)
    for i in range(2):
        for _ in range(33):
            scs[i].value(0)
            spi.write_readinto(tx, rx)
            scs[i].value(1)
            clk.sleep_us_busy(4)
    wdt.feed()
    stop.value()


cycle()
x0 = br.exchanges
fr0 = br.frames
failed = 0
micropython.heap_lock()
try:
    for _ in range(n):
        cycle()
except MemoryError:
    failed = 1
micropython.heap_unlock()
print(json.dumps({"code_bytes": f0 - f1, "bridge_bytes": f1b - f2, "links_bytes": f2b - f3,
                  "alloc_failed": failed, "frames": br.frames - fr0,
                  "exchanges": br.exchanges - x0}))
