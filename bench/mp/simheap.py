# Bench (micropython): heap taken by the simulated hardware alone (its modules, the chips
# and the load model; not the flash mount, which a board has too), so min_heap_kib can be read as firmware + simulator.
import gc
import json

gc.collect()
a = gc.mem_alloc()
import sim.bus
import sim.vclock
import sim.loads
import sim.unixboard
import unix_sim_3ph as board
clock = sim.unixboard.clock_from({"step": True})
sb = sim.bus.SimBoard(board.CHIPS, interface=board.INTERFACE, mains_hz=board.MAINS_HZ,
                      profile="household", seed=1, clock=clock)

gc.collect()
b = gc.mem_alloc()
print(json.dumps({"sim_heap_kib": round((b - a) / 1024, 1)}))
