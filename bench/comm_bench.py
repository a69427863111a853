"""Issue 3 figures (the comm stack), for bench/run.py. Each function returns a dict.

    interval_record_bytes()        binary v1 interval record, 3 phases, 2 tariffs
    interval_record_wire_bytes()   the same as one MQTT QoS 1 PUBLISH (fixed header, topic
                                   lipari/v1/lipari-0001/interval, packet id)
    interval_record_bytes_usual()  the same record as a three-phase meter usually sends it
                                   (ai_wh one more than the sum of the phases), payload
                                   and PUBLISH
    json_interval_record_bytes()   the same record as JSON
    max_metering_stall_ms()        worst lateness of a metering cycle (real ticks on the
                                   unix port; gap between cycle starts minus read_ms) on
                                   two real-time meters while the broker is down, the
                                   Wi-Fi path black-holes and the modem hangs / is slow
    chaos_records()                records_lost / records_duplicated of the chaos run of
                                   tests/test_e2e_chaos.py (3 meters, 3 transports, broker
                                   kills, link drops, modem faults) over a whole simulated
                                   day at 360x (the test runs 3 hours)

The sizes are encoded by firmware/comm/codec.py on the micropython binary
(tests/comm_harness.py). Run alone: python bench/comm_bench.py [name ...]
"""
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


def interval_record_bytes():
    import comm_harness
    return {"interval_record_bytes": comm_harness.interval_bin_size()}


def interval_record_wire_bytes():
    import comm_harness
    return {"interval_record_wire_bytes": comm_harness.interval_wire_size()}


def interval_record_bytes_usual():
    # the usual three-phase record (ai_wh not the sum of the phases: layout bit 6 off)
    import comm_harness
    return {"interval_record_bytes_usual": comm_harness.interval_bin_size_usual(),
            "interval_record_wire_bytes_usual": comm_harness.interval_wire_size(
                rec=comm_harness.SAMPLE_INTERVAL_USUAL)}


def json_interval_record_bytes():
    import comm_harness
    return {"json_interval_record_bytes": comm_harness.interval_json_size()}


# Faults while two meters run in real time (speed 1, read_ms 100): fractions of 55 s.
STALL_FAULTS = (
    (0.10, "modem", "hang"),           # the modem answers nothing ...
    (0.12, "broker", "kill 10"),       # ... and the broker is gone for 10 s
    (0.38, "modem", "unhang"),
    (0.42, "proxy", "blackhole 5"),    # Wi-Fi path silently drops everything
    (0.50, "modem", "slow_ms 500"),
    (0.60, "modem", "lose_urc recv 5"),
    (0.62, "proxy", "reset"),
    (0.70, "modem", "detach"),
    (0.78, "modem", "attach"),
    (0.85, "modem", "clear"),
)


def max_metering_stall_ms(workdir=None):
    import e2e_harness as h
    wd = workdir or tempfile.mkdtemp(prefix="lipari-stall-")
    meters = (("s-wifi", "wifi", "household"), ("s-nbiot", "nbiot", "household"))
    # 55 s: the run ends just before the 60 s boundary, whose interval closes it
    res = h.chaos_run(wd, hours=55 / 3600.0, speed=1, interval_s=60, faults=STALL_FAULTS,
                      meters=meters, read_ms=100, log=lambda *a: None)
    st = {mid: r["stall"] for mid, r in res["meters"].items()}
    if not all(st.values()):
        raise RuntimeError("a meter printed no stall figures: %s" % json.dumps(res, default=str)[-1500:])
    return {"max_metering_stall_ms": round(max(s["max_late_ms"] for s in st.values()), 1),
            "max_metering_gap_ms": max(s["max_gap_ms"] for s in st.values()),
            "metering_cycles_late_100ms": sum(s["late_100"] for s in st.values()),
            "metering_cycles_measured": sum(s["n"] for s in st.values()),
            "stall_run_lost": res["records_lost"],
            "stall_run_connects": {m: (r["comm"] or {}).get("connects")
                                   for m, r in res["meters"].items()}}


def chaos_records(workdir=None, hours=24, speed=360):
    import e2e_harness as h
    wd = workdir or tempfile.mkdtemp(prefix="lipari-chaos-")
    t0 = time.monotonic()
    res = h.chaos_run(wd, hours=hours, speed=speed, interval_s=60, log=lambda *a: None)
    if res["failures"]:                # a meter died, stopped early or kept records
        raise RuntimeError("chaos run invalid: %s" % "; ".join(res["failures"]))
    ms = res["meters"].values()
    return {"records_lost": res["records_lost"],
            "records_duplicated": res["records_duplicated"],
            "chaos_records_checked": sum(r["produced"] + r["events_produced"] for r in ms),
            "chaos_redeliveries_absorbed": res["redeliveries_absorbed"],
            "chaos_faults": len(res["faults"]),
            "chaos_simulated_h": hours, "chaos_speed": speed,
            "chaos_max_late_ms_at_speed": round(res["max_metering_stall_ms"] or 0, 1),
            "chaos_wall_s": round(time.monotonic() - t0, 1)}


# (name, function, keys it produces): a failed measurement writes null to every key.
MEASUREMENTS = [
    ("interval_record_bytes", interval_record_bytes, ("interval_record_bytes",)),
    ("interval_record_wire_bytes", interval_record_wire_bytes, ("interval_record_wire_bytes",)),
    ("json_interval_record_bytes", json_interval_record_bytes, ("json_interval_record_bytes",)),
    ("interval_record_bytes_usual", interval_record_bytes_usual,
     ("interval_record_bytes_usual", "interval_record_wire_bytes_usual")),
    ("max_metering_stall_ms", max_metering_stall_ms,
     ("max_metering_stall_ms", "max_metering_gap_ms", "metering_cycles_late_100ms",
      "metering_cycles_measured", "stall_run_lost", "stall_run_connects")),
    ("chaos_records", chaos_records,
     ("records_lost", "records_duplicated", "chaos_records_checked", "chaos_redeliveries_absorbed",
      "chaos_faults", "chaos_simulated_h", "chaos_speed", "chaos_max_late_ms_at_speed",
      "chaos_wall_s")),
]


if __name__ == "__main__":
    only = set(sys.argv[1:])
    out = {}
    for name, fn, _keys in MEASUREMENTS:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        out.update(fn())
        print("%-28s %6.1f s" % (name, time.monotonic() - t0), file=sys.stderr)
    print(json.dumps(out, indent=1, sort_keys=True))
