# Bench (micropython): driver frames per snapshot, heap-locked acquire, allocation of a
# full metering cycle in steady state, on the three-phase virtual board.
import gc
import json
import micropython
import unix_sim_3ph as board
from metering.engine import boot


def main():
    hw = board.build({"step": True, "profile": "household", "seed": 3})
    m = boot(hw, board, None, {"rt_s": 0})
    g = m.group
    clock = hw.clock
    for _ in range(5):                       # reach steady state
        clock.advance(1000000)
        m.cycle()
        m.poll()
    # frames: the links count every frame they exchange
    links = hw.links
    f0 = sum(l.frames for l in links)
    g.latch()
    fail = g.snapshot()
    frames = sum(l.frames for l in links) - f0
    rows = sum(len(r) for r in g.rows)
    # acquire (latch + snapshot) with the heap locked: a MemoryError would mean it allocates
    locked = 0
    for _ in range(20):
        clock.advance(1000000)
        micropython.heap_lock()
        try:
            g.latch()
            fail |= g.snapshot()
            locked += 1
        except MemoryError:
            pass
        finally:
            micropython.heap_unlock()
    # one full metering cycle (cycle + poll) in steady state, allocation counted by the GC;
    # first a few cycles to settle after the bare acquires above (a 20 s gap)
    for _ in range(5):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    worst = 0
    total = 0
    n = 200
    for _ in range(n):
        clock.advance(1000000)              # the simulated chips integrate here
        gc.collect()
        a = gc.mem_alloc()
        m.cycle()
        m.poll()
        d = gc.mem_alloc() - a
        total += d
        worst = d if d > worst else worst
    print(json.dumps({
        "spi_frames_per_snapshot": frames,
        "snapshot_rows": rows,
        "acquire_heap_locked": locked == 20 and fail == 0,
        "cycle_alloc_bytes": worst,
        "cycle_alloc_bytes_mean": total / n,
        "valid_phases_mask": m.valid,
    }))


main()
