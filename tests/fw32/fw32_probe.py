# Heap probe for the RAM tests and benchmarks (tests/fw32_harness.py, bench/fw_bench.py),
# frozen into the 32-bit test build:
#
#   micropython -X heapsize=100k -m fw32_probe [--probe_ms 1000] [--probe_report_s 86400]
#               <firmware/main.py options>
#
# Runs firmware/main.py exactly as a board does, plus one task that, every probe_ms of
# the meter's own (virtual) time, collects garbage and notes the heap still in use: the
# live heap at the firmware's await points, where every task sits between two steps.
# Every probe_report_s (virtual) it prints micropython.mem_info() and one line
#   {"type": "heap", "t_s": virtual s since start, "peak_b": highest live heap since the
#    last report, "used_b": live heap now, "free_b": free bytes now}
# (the largest free block is mem_info's "max free sz", in 16-byte blocks on a 32-bit
# port). At the end the summary line gets "heap": {"start_b": in use before main.py
# started, "peak_b", "peak_t": virtual s of the peak, "samples", "free_b", "total_b"},
# after one more mem_info() (the largest free block after the run).
import gc
import json
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
        asyncio.create_task(self._probe(_PROBE[0], _PROBE[1]))
        self.summary["heap"] = _HEAP
        return m

    async def _probe(self, period_ms, report_s):
        clock = self.clock
        last = clock.ticks_ms()
        t_ms = 0             # meter time since start, summed step by step: ticks wrap (2**30
        #                      ms, and ticks_diff spans half of that: 6.2 days)
        since = 0            # peak since the last report
        last_report = 0
        while True:
            gc.collect()
            used = gc.mem_alloc()
            _HEAP["samples"] += 1
            now = clock.ticks_ms()
            t_ms += clock.ticks_diff(now, last)
            last = now
            t_s = t_ms // 1000
            if used > _HEAP["peak_b"]:
                _HEAP["peak_b"] = used
                _HEAP["peak_t"] = t_s
            if used > since:
                since = used
            if report_s and t_s - last_report >= report_s:
                last_report = t_s
                micropython.mem_info()
                print(json.dumps({"type": "heap", "t_s": t_s, "peak_b": since, "used_b": used,
                                  "free_b": gc.mem_free()}))
                since = 0
            await clock.sleep_ms(period_ms)


def _summary_out(kind, rec):
    if kind == "summary" and "heap" in rec:
        gc.collect()
        micropython.mem_info()      # "... max free sz: N" for the harness
        rec["heap"]["free_b"] = gc.mem_free()
        rec["heap"]["total_b"] = gc.mem_free() + gc.mem_alloc()
    _out(kind, rec)


# our options (--probe_ms, --probe_report_s) taken off the command line; main.py gets the
# rest (its option table is a constant tuple: nothing to add to)
_ARGS = sys.argv[1:]
_PROBE = [1000, 0]
for _i, _k in enumerate(("--probe_ms", "--probe_report_s")):
    if _k in _ARGS:
        _j = _ARGS.index(_k)
        _PROBE[_i] = int(_ARGS[_j + 1])
        del _ARGS[_j:_j + 2]
main.Run = ProbedRun
main.out = _summary_out
main.main(_ARGS)
