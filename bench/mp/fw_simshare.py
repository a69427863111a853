# What a bridged unix board puts in the heap that a real board has in C (bench/fw_bench.py):
# the sim modules the firmware process imports (frozen: their module objects and
# functions, not their code) and the objects standing for the MCU's peripherals (the
# bridge client and its link pins / SPI / watchdog, the virtual clock, the modem's pty
# UART). Subtracted from the probe's live heap to give the firmware's own figure; the
# littlefs mount is not subtracted (a board mounts its filesystem in the heap too).
# The board module loads sim.bridgelink alone when bridged (decision 0017;
# tests/test_fw_ram_steps.py checks that a bridged run has no other sim module); asyncio,
# which its clocks use, is the firmware's own and is imported before the count.
# argv: socket path of a running BridgeServer (three-phase board), a pty path.
import gc
import json
import sys

import asyncio  # noqa: F401

gc.collect()
a = gc.mem_alloc()
from sim import bridgelink as bl  # noqa: E402
gc.collect()
b = gc.mem_alloc()
br = bl.Bridge(sys.argv[1])
now, ep, off, synced, boots = br.hello(False, 120, 1767225600)
clk = bl.ScaledClock(speed=120, start_epoch=ep, start_us=now)
br.attach(clk)
links = ([bl.LinkPin(br, bl.PIN_SCS, i) for i in range(2)] +
         [bl.LinkPin(br, bl.PIN_EN, 0)] +           # one EN line, shared by both chips
         [bl.LinkPin(br, bl.PIN_SYN, 0), bl.LinkPin(br, bl.PIN_STOP, 0, 0), bl.LinkSPI(br),
          bl.LinkWDT(br, 8000)])
uart = bl.PtyUart(sys.argv[2])
gc.collect()
c = gc.mem_alloc()
print(json.dumps({"modules_b": b - a, "objects_b": c - b, "total_b": c - a}))
