"""Issue 7 figures: the firmware's RAM and flash on the 32-bit MicroPython build with the
firmware frozen in (tools/mpbuild.py), for bench/run.py. docs/ram.md has the table per
board; docs/benchmarks.md says how each key is measured.

    fw_code_flash     fw_code_flash_kib: the firmware's bytecode as a board holds it (the
                      ROMFS image of the stm32 board: every firmware module and the board
                      module, compiled); fw_frozen_kib: the frozen part of the 32-bit
                      image for that board (firmware, board, asyncio)
    fw_sim_share      fw_sim_share_kib: heap the bridged unix board adds that a board
                      has in C (sim modules, link objects, clock, modem pty)
    fw_day            a calendar day of the whole meter at the STM32F405's heap (100 KiB),
                      speed 480 (3 min):
                      fw_heap_peak_kib (the firmware's live heap at its await points, sim
                      share taken off), fw_largest_free_kib_after_day, records delivered
    fw_min_heap_kib   the smallest heap (4 KiB steps) that runs that day to the end
                      (speed 1440: a minute per try)
    fw_soak           a simulated month at 100 KiB, speed 4320 (10 min): daily peak and
                      largest free block, first week against last week (drift)
    boot_to_first_record_ms   real time from starting the interpreter to the boot event
                      (speed-1 clock over the bridge), median of 5 boots

Helpers other areas can use (the OTA engineer's ota_verify_ms, for one):
    from benchlib import fw32_binary, run_fw32     # the binary; run a script on it
"""
import json
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import HERE, ROOT, MP_SCRIPTS, fw32_binary, run_fw32  # noqa: F401

import fw32_harness as fh
from tools import mpbuild

# Simulated seconds per real second. The 32-bit build over the bridge runs about 100
# metering cycles per real second on this shared machine, so above ~100 the cycles come
# late (the chips keep integrating on board time, so no energy is lost: a late cycle reads
# more of it) while everything else - interval records, queue, MQTT, commands, the broker
# restart - happens as often per simulated day as at speed 1. Comm's timeouts run on the
# MCU's real ticks, so the network side is not rushed. Heap figures count objects, which
# a late cycle does not change; what runs fewer times is the (allocation-free) cycle.
DAY_SPEED = 480          # the calendar day: 3 minutes
MIN_HEAP_SPEED = 1440    # each try of the bisection: 1 minute
SOAK_DAYS = 30
SOAK_SPEED = 4320        # the month: 10 minutes


def fw_code_flash():
    with tempfile.TemporaryDirectory() as d:
        img, size = mpbuild.romfs("stm32_stpm34_33_ct", out=os.path.join(d, "stm32.romfs"))
    exe = mpbuild.unix_binary("stm32_stpm34_33_ct")
    with open(os.path.join(os.path.dirname(exe), "frozen_bytes")) as f:
        frozen = int(f.read())
    return {"fw_code_flash_kib": round(size / 1024, 1), "fw_frozen_kib": round(frozen / 1024, 1)}


def _sim_share_b():
    sys.path.insert(0, os.path.join(ROOT, "boards"))
    import unix_sim_3ph
    from sim.bridge import BridgeServer
    srv = BridgeServer(unix_sim_3ph).start()
    master, slave = pty.openpty()
    try:
        with open(os.path.join(MP_SCRIPTS, "fw_simshare.py")) as f:
            out = run_fw32(f.read(), heap_kib=256, args=(srv.path, os.ttyname(slave)))
    finally:
        srv.stop()
        os.close(master)
        os.close(slave)
    return json.loads(out.strip().splitlines()[-1])


def fw_sim_share():
    r = _sim_share_b()
    return {"fw_sim_share_kib": round(r["total_b"] / 1024, 1),
            "fw_sim_share_modules_kib": round(r["modules_b"] / 1024, 1)}


def _day(heap_kib, hours=24, interval_s=900, speed=DAY_SPEED, report_s=0, workdir=None):
    wd = workdir or tempfile.mkdtemp(prefix="lipari-fwday-")
    return fh.fit_run(wd, hours=hours, speed=speed, interval_s=interval_s, heap_kib=heap_kib,
                      report_s=report_s)


def _ran_the_day(r, hours=24, interval_s=900):
    want = int(hours * 3600 // interval_s)
    return (r["exit"] == 0 and not r["resets"] and not r["memory_errors"]
            and r["lost"] == 0 and r["duplicated"] == 0 and r["unsent"] == 0
            and r["produced"] >= want - 1 and r["stored"] == r["produced"]
            and all(rep.get("ok") for _, _, rep in r["commands"]))


def _why(r, hours=24, interval_s=900):
    """What failed in a run, in words (the run's dict is long: its tail hides this)."""
    want = int(hours * 3600 // interval_s)
    keys = ("exit", "resets", "lost", "duplicated", "unsent", "produced", "stored")
    bad = [c[0] for c in r["commands"] if not c[2].get("ok")]
    return ("%s; records wanted >= %d; memory errors %d; commands not answered %s; comm %s"
            % (", ".join("%s %s" % (k, r[k]) for k in keys), want - 1,
               len(r["memory_errors"]), bad, json.dumps((r.get("summary") or {}).get("comm"))))


def fw_day():
    r = _day(fh.BOARD_HEAP_KIB)
    if not _ran_the_day(r):
        raise RuntimeError("the day at %d KiB failed: %s" % (fh.BOARD_HEAP_KIB, _why(r)))
    share = _sim_share_b()["total_b"]
    h = r["heap"]
    return {"fw_heap_peak_kib": round((h["peak_b"] - share) / 1024, 1),
            "fw_heap_peak_total_kib": round(h["peak_b"] / 1024, 1),
            "fw_largest_free_kib_after_day": round(h["largest_free_b"] / 1024, 1),
            "fw_free_kib_after_day": round(h["free_b"] / 1024, 1),
            "fw_day_records": r["produced"], "fw_day_records_lost": r["lost"],
            "fw_day_connects": r["comm"]["connects"], "fw_day_wall_s": r["wall_s"]}


def fw_min_heap_kib():
    """Bisect in 4 KiB steps between a heap that fails and one that runs the day (each
    try is a whole simulated day with comm, commands and a broker restart)."""
    tried = {}

    def runs(kib):
        ok = _ran_the_day(_day(kib, speed=MIN_HEAP_SPEED))
        tried[kib] = ok
        print("  heap %3d KiB: %s" % (kib, "runs the day" if ok else "fails"), flush=True)
        return ok
    hi = fh.BOARD_HEAP_KIB
    if not runs(hi):
        raise RuntimeError("the day does not run at %d KiB" % hi)
    lo = 32
    if runs(lo):
        return {"fw_min_heap_kib": lo, "fw_min_heap_tried": tried}
    while hi - lo > 4:
        mid = (lo + hi) // 2 // 4 * 4
        if runs(mid):
            hi = mid
        else:
            lo = mid
    return {"fw_min_heap_kib": hi, "fw_min_heap_tried": tried}


def fw_soak():
    """A simulated month at the board's heap: the probe reports once per simulated day
    (highest live heap that day, largest free block after it); drift = the last week's
    worst against the first week's."""
    r = _day(fh.BOARD_HEAP_KIB, hours=24 * SOAK_DAYS, speed=SOAK_SPEED, report_s=86400)
    if not _ran_the_day(r, hours=24 * SOAK_DAYS):
        raise RuntimeError("the month did not run: %s" % _why(r, hours=24 * SOAK_DAYS))
    days = r["reports"]
    if len(days) < SOAK_DAYS - 1:
        raise RuntimeError("only %d daily reports" % len(days))
    first, last = days[1:8], days[-7:]          # day 1 includes the boot
    peak = lambda ds: max(d["peak_b"] for d in ds) / 1024           # noqa: E731
    free = lambda ds: min(d["largest_free_b"] for d in ds) / 1024   # noqa: E731
    return {"fw_soak_days": len(days), "fw_soak_records": r["produced"],
            "fw_soak_peak_first_week_kib": round(peak(first), 1),
            "fw_soak_peak_last_week_kib": round(peak(last), 1),
            "fw_soak_peak_drift_kib": round(peak(last) - peak(first), 1),
            "fw_soak_largest_free_first_week_kib": round(free(first), 1),
            "fw_soak_largest_free_last_week_kib": round(free(last), 1),
            "fw_soak_largest_free_drift_kib": round(free(last) - free(first), 1),
            "fw_soak_daily": [(d["t_s"] // 86400, round(d["peak_b"] / 1024, 1),
                               round(d["largest_free_b"] / 1024, 1)) for d in days],
            "fw_soak_wall_s": r["wall_s"]}


def boot_to_first_record_ms(n=5):
    """Start the 32-bit build over the bridge with the clock at speed 1 (board time = real
    time, so the chips' start-up waits count as on a board) and time, on the host, the
    first record line (the boot event: restored energy, chips up)."""
    sys.path.insert(0, os.path.join(ROOT, "boards"))
    times = []
    for i in range(n):
        with tempfile.TemporaryDirectory() as d:
            cwd = os.path.join(d, "cwd")
            os.mkdir(cwd)
            m = fh.BridgedMeter(fh.fw32_cmd(fh.BOARD_HEAP_KIB, "-m", "main", "--board",
                                            "unix_sim_3ph", "--speed", "1", "--print", "json",
                                            "--state", os.path.join(d, "flash.img")),
                                mpbuild.frozen_env(), cwd, os.path.join(d, "log"))
            t0 = time.monotonic()
            while m.first_record_s is None and m.running() and time.monotonic() - t0 < 60:
                time.sleep(0.005)
            first = m.first_record_s
            m.kill()
        if first is None:
            raise RuntimeError("no record within 60 s: %s" % m.other[-5:])
        times.append(first * 1000)
    return {"boot_to_first_record_ms": round(statistics.median(times)),
            "boot_to_first_record_ms_range": [round(min(times)), round(max(times))]}


# (name, function, keys it produces): a failed measurement writes null to every key.
MEASUREMENTS = [
    ("fw_code_flash", fw_code_flash, ("fw_code_flash_kib", "fw_frozen_kib")),
    ("fw_sim_share", fw_sim_share, ("fw_sim_share_kib", "fw_sim_share_modules_kib")),
    ("fw_day", fw_day, ("fw_heap_peak_kib", "fw_heap_peak_total_kib",
                        "fw_largest_free_kib_after_day", "fw_free_kib_after_day",
                        "fw_day_records", "fw_day_records_lost", "fw_day_connects",
                        "fw_day_wall_s")),
    ("fw_min_heap_kib", fw_min_heap_kib, ("fw_min_heap_kib", "fw_min_heap_tried")),
    ("fw_soak", fw_soak, ("fw_soak_days", "fw_soak_records", "fw_soak_peak_first_week_kib",
                          "fw_soak_peak_last_week_kib", "fw_soak_peak_drift_kib",
                          "fw_soak_largest_free_first_week_kib",
                          "fw_soak_largest_free_last_week_kib",
                          "fw_soak_largest_free_drift_kib", "fw_soak_daily",
                          "fw_soak_wall_s")),
    ("boot_to_first_record_ms", boot_to_first_record_ms,
     ("boot_to_first_record_ms", "boot_to_first_record_ms_range")),
]
