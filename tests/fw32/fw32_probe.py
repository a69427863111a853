# Heap probe for the RAM tests and benchmarks (tests/fw32_harness.py, bench/fw_bench.py),
# frozen into the 32-bit test build:
#
#   micropython -X heapsize=100k -m fw32_probe [--probe_ms 1000] <firmware/main.py options>
#
# Runs firmware/main.py exactly as a board does, plus one task that, every probe_ms of
# the meter's own (virtual) time, collects garbage and notes the heap still in use: the
# live heap at the firmware's await points, where every task sits between two steps.
# At the end the summary line gets "heap": {"start_b": in use before main.py started,
# "peak_b": highest live heap seen, "peak_t": virtual time of it (s from start),
# "samples": probes taken, "largest_free_b": largest free block after the last
# collection (fragmentation), "free_b": free bytes then, "total_b": heap size}.
# The largest free block comes from micropython.mem_info() ("max free sz", in 16-byte
# blocks on a 32-bit port), printed just before the summary.
import gc
import sys
import micropython

gc.collect()
_START_B = gc.mem_alloc()

import main  # noqa: E402

_HEAP = {"start_b": _START_B, "peak_b": 0, "peak_t": 0, "samples": 0}
_Run = main.Run
_out = main.out


class ProbedRun(_Run):
    def start(self):
        m = _Run.start(self)
        import asyncio
        asyncio.create_task(self._probe(self.opts.get("probe_ms", 1000)))
        self.summary["heap"] = _HEAP
        return m

    async def _probe(self, period_ms):
        t0 = self.clock.ticks_ms()
        while True:
            gc.collect()
            used = gc.mem_alloc()
            _HEAP["samples"] += 1
            if used > _HEAP["peak_b"]:
                _HEAP["peak_b"] = used
                _HEAP["peak_t"] = self.clock.ticks_diff(self.clock.ticks_ms(), t0) // 1000
            await self.clock.sleep_ms(period_ms)


def _summary_out(kind, rec):
    if kind == "summary":
        gc.collect()
        micropython.mem_info()      # "... max free sz: N" for the harness
        rec["heap"]["free_b"] = gc.mem_free()
        rec["heap"]["total_b"] = gc.mem_free() + gc.mem_alloc()
    _out(kind, rec)


main._OPTS["probe_ms"] = int     # our option; main.py parses it with its own
main.Run = ProbedRun
main.out = _summary_out
main.main(sys.argv[1:])
