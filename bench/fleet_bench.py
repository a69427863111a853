"""Issue 11 figures (the fleet load test), for bench/run.py.

    fleet()   lipari loadtest with 10,000 simulated meters (10,000 real MQTT connections,
              each one meter: client id, account, ACL, will of its own) against Mosquitto
              (conf/mosquitto) and one anchor ingest worker into SQLite (the default
              deployment), the meters' clocks sped up step by step (--ramp): each step is a
              fleet of N meter-equivalents, meters with 15-minute intervals of which 1 %
              also stream live readings every 10 s. The meters' clocks are spread over
              +-7.5 minutes (--skew-s 450), so that their uploads spread over the interval
              (docs/scaling.md: with aligned clocks every interval is one burst).

    fleet_meters_sustained   the largest step (meter-equivalents) with p99 latency, meter
                             timestamp -> database commit, under 2 s, every step before it
                             too, and zero loss over the whole run (0 if any record is lost)
    fleet_p99_latency_ms     p99 of that step
    fleet_connections        meters connected (real MQTT connections)

Run alone: python bench/run.py fleet  (about 5 minutes; nothing else heavy beside it)
"""
import os
import tempfile

from benchlib import ROOT  # noqa: F401  (sys.path)

# Meter-equivalents per step: x1.5 from 500,000 up to the 10,000,000 of the goal and past
RAMP = [500_000, 750_000, 1_100_000, 1_700_000, 2_500_000, 3_800_000, 5_700_000, 8_500_000,
        12_800_000]


def fleet(meters=10_000, ramp=RAMP, step_s=30.0, workdir=None):
    from headend import loadtest
    out = workdir or tempfile.mkdtemp(prefix="lipari-fleet-bench-")
    a = loadtest.parser().parse_args([
        "--meters", str(meters), "--ramp", ",".join("%d" % f for f in ramp),
        "--step-s", str(step_s), "--skew-s", "450", "--rt-share", "0.01", "--rt-s", "10",
        "--interval-s", "900", "--drain-s", "180", "--connect-timeout-s", "300",
        "--out", out, "-q"])
    rep = loadtest.run(a, log=lambda s: None)
    if rep["meters_connected"] < meters:
        raise RuntimeError("only %d of %d meters connected" % (rep["meters_connected"], meters))
    if rep["records_lost"] or rep["unsent"] or rep["duplicates_stored"]:
        raise RuntimeError("the fleet run lost records: %s" % rep["why_failed"])
    st = rep.get("sustained_step")
    procs = rep["processes"]
    return {
        "fleet_meters_sustained": rep["sustained_meter_equivalents"],
        "fleet_p99_latency_ms": st["latency_ms"]["p99"] if st else None,
        "fleet_connections": rep["meters_connected"],
        "fleet_records_per_s": st["committed_records_per_s"] if st else None,
        "fleet_steps": [{"fleet": s["fleet"], "offered": s["offered_records_per_s"],
                         "committed": s["committed_records_per_s"],
                         "p99_ms": s["latency_ms"]["p99"], "passed": s["passed"]}
                        for s in rep["steps"]],
        "fleet_cpu_pct_avg": {g: v["cpu_pct_avg"] for g, v in procs.items()},
        "fleet_rss_mb_max": {g: v["rss_mb_max"] for g, v in procs.items()},
        "fleet_records_checked": sum(rep["made"].values()),
        "fleet_report": os.path.join(out, "report.json"),
    }


def fleet_aligned(meters=10_000, speed=30.0, duration_s=70.0, workdir=None):
    """The same 10,000 meters with synchronised clocks (--skew-s 0), as the firmware
    runs today: every interval closes on the same instant for all of them, so each
    boundary (every 900/speed s here) is a burst of 10,000 records. p99 latency of the
    interval records = how long the head-end takes to drain one burst."""
    from headend import loadtest
    out = workdir or tempfile.mkdtemp(prefix="lipari-fleet-aligned-")
    a = loadtest.parser().parse_args([
        "--meters", str(meters), "--speed", str(speed), "--duration", str(duration_s),
        "--skew-s", "0", "--rt-share", "0.01", "--drain-s", "180",
        "--connect-timeout-s", "300", "--out", out, "-q", "--no-plot"])
    rep = loadtest.run(a, log=lambda s: None)
    if rep["records_lost"] or rep["unsent"]:
        raise RuntimeError("the aligned run lost records: %s" % rep["why_failed"])
    p99 = rep["latency_ms_qos1"]["p99"]
    return {"fleet_aligned_meters": rep["meters_connected"],
            "fleet_aligned_burst_p99_ms": p99,
            "fleet_aligned_burst_max_ms": rep["latency_ms_qos1"]["max"],
            "fleet_aligned_drain_records_per_s": round(meters / (p99 / 1000), 1) if p99 else None}


MEASUREMENTS = [
    ("fleet", fleet, ("fleet_meters_sustained", "fleet_p99_latency_ms", "fleet_connections",
                      "fleet_records_per_s", "fleet_steps", "fleet_cpu_pct_avg",
                      "fleet_rss_mb_max", "fleet_records_checked", "fleet_report")),
    ("fleet_aligned", fleet_aligned, ("fleet_aligned_meters", "fleet_aligned_burst_p99_ms",
                                      "fleet_aligned_burst_max_ms",
                                      "fleet_aligned_drain_records_per_s")),
]
