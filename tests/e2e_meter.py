# firmware/main.py with a stall probe, for the end-to-end test and the comm benchmark:
#   micropython tests/e2e_meter.py <main.py options>
# Runs exactly what main.py runs, and measures with the port's real ticks the gap between
# the starts of consecutive metering cycles. The closing summary line gets
#   "stall": {"period_ms": the intended real gap (read_ms / speed), "max_gap_ms",
#             "max_late_ms": max(gap - period), "late_50", "late_100": gaps later than
#             50 / 100 ms, "n": gaps measured}
# and one {"type": "stall", ...} line is printed every 5 s of real time while running.
import time
import json

import main

_T0 = time.ticks_ms()


_Run = main.Run


class ProbedRun(_Run):
    def start(self):
        m = _Run.start(self)
        speed = 1.0 if self.opts.get("step") else float(self.opts.get("speed", 1))
        period_ms = m.read_ms / speed
        st = {"period_ms": period_ms, "max_gap_ms": 0, "max_late_ms": 0, "late_50": 0,
              "late_100": 0, "n": 0}
        self.summary["stall"] = st
        orig = m.cycle
        last = [None, time.ticks_ms()]

        def cycle():
            now = time.ticks_ms()
            prev = last[0]
            if prev is not None:
                g = time.ticks_diff(now, prev)
                late = g - period_ms
                st["n"] += 1
                if g > st["max_gap_ms"]:
                    st["max_gap_ms"] = g
                if late > st["max_late_ms"]:
                    st["max_late_ms"] = late
                if late > 50:
                    st["late_50"] += 1
                if late > 100:
                    st["late_100"] += 1
            last[0] = now
            if time.ticks_diff(now, last[1]) >= 5000:
                last[1] = now
                d = dict(st)
                d["type"] = "stall"
                d["t_ms"] = time.ticks_diff(now, _T0)
                print(json.dumps(d))
            return orig()

        m.cycle = cycle
        return m


main.Run = ProbedRun
main.main()
