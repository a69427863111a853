# The bridge client's own heap (sim/bridgelink.py, the objects a unix board builds) and
# the allocation of its frame path, on the micropython binary. Used by
# bench/runner_bench.py (compiled tree) and tests/test_bridge.py (sources).
# argv: socket path of a running BridgeServer, chips, "spi" | "uart", cycles to run locked.
import gc
import json
import sys

import micropython

import asyncio  # noqa: E402,F401 (the firmware's own: bridgelink's clocks use it)
gc.collect()
f0 = gc.mem_free()
from sim import bridgelink as bl  # noqa: E402
if sys.argv[3] == "uart":         # a UART board's link (sim/bridgeuart.py): code, too
    from sim.bridgeuart import LinkUART
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
n = int(sys.argv[2])
uart = sys.argv[3] == "uart"
scs = [bl.LinkPin(br, bl.PIN_SCS, i) for i in range(n)]
en = [bl.LinkPin(br, bl.PIN_EN, i) for i in range(n)]
syn = bl.LinkPin(br, bl.PIN_SYN, 0)
stop = bl.LinkPin(br, bl.PIN_STOP, 0, 0)
if uart:
    bus = [LinkUART(br, i) for i in range(n)]
else:
    bus = bl.LinkSPI(br)
wdt = bl.LinkWDT(br, 8000)
gc.collect()
f3 = gc.mem_free()
tx = bytearray(b"\x48\xff\xff\xff\x00")
rx = bytearray(5)
mv = memoryview(rx)
FRAMES = 33                      # per chip and cycle: a snapshot's worth on the 3-phase board


def cycle():
    syn.value(0)
    clk.sleep_us_busy(4)
    syn.value(1)
    for i in range(n):
        if uart:                 # SCS pulse after a hardware latch (SYN counter reset)
            scs[i].value(0)
            scs[i].value(1)
        for k in range(FRAMES):
            if uart:
                u = bus[i]
                u.write(tx)
                u.readinto(rx, u.any())
            else:
                scs[i].value(0)
                bus.write_readinto(tx, rx if k & 1 else mv)
                scs[i].value(1)
            clk.sleep_us_busy(4)
    wdt.feed()
    stop.value()


def locked(f, times):
    bad = 0
    micropython.heap_lock()
    try:
        for _ in range(times):
            f()
    except MemoryError:
        bad = 1
    micropython.heap_unlock()
    return bad


cycle()
x0 = br.exchanges
fr0 = br.frames
failed = locked(cycle, int(sys.argv[4]))
control = locked(lambda: bytearray(4), 1)     # the harness sees an allocation
print(json.dumps({"code_bytes": f0 - f1, "bridge_bytes": f1b - f2, "links_bytes": f2b - f3,
                  "alloc_failed": failed, "control_alloc": control,
                  "frames": br.frames - fr0, "exchanges": br.exchanges - x0}))
