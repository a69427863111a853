"""Issue 2 figures (the meter core), for bench/run.py.

    core           spi_frames_per_snapshot, snapshot_rows, acquire_heap_locked,
                   cycle_alloc_bytes (bench/mp/acquire.py on micropython)
    sim_heap_kib   heap held by the simulator alone (bench/mp/simheap.py)
    min_heap_kib   smallest -X heapsize that runs a simulated day (64-bit wheel)
    energy         energy_error_ppm against the load's own integral, its detail per
                   profile, the fast-switching figures, calibrated_worst_pct_of_class
                   (bench/mp/energy.py)
"""
import os
import subprocess

from benchlib import (HERE, run_mp, compiled_tree, micropython_path, smallest_passing,
                      previous_result)


def core_figures():
    """Driver frames, heap-locked acquire, allocation per cycle."""
    out = run_mp("acquire.py")
    return {k: out[k] for k in ("spi_frames_per_snapshot", "snapshot_rows", "acquire_heap_locked",
                                "cycle_alloc_bytes")}


def min_heap_kib():
    """Smallest -X heapsize (KiB, 8 KiB steps) at which the virtual meter runs one
    simulated day: main.py must finish the day and print its closing summary; a
    MemoryError (or any other exit, or no end within 20 minutes: a heap so tight that
    the GC thrashes) fails the size.

    The firmware runs compiled (.mpy) as on a board; the simulated hardware shares the
    heap (docs/decisions/0002), its own share is sim_heap_kib. The search starts at the
    last full run's figure and brackets outwards from it (benchlib.smallest_passing): the
    answer runs and 8 KiB less fails, in two tries when nothing changed."""
    main_py, env = compiled_tree()

    def runs(kib):
        argv = [micropython_path(), "-X", "heapsize=%dk" % kib, main_py,
                "--board", "unix_sim_3ph", "--profile", "household", "--step", "--days", "1",
                "--print", "summary"]
        try:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return False
        ok = r.returncode == 0 and '"type": "summary"' in r.stdout
        print("  heap %4d KiB: %s" % (kib, "runs a day" if ok else "fails"), flush=True)
        return ok
    return {"min_heap_kib": smallest_passing(runs, previous_result("min_heap_kib", 256), 8, 1024)}


def energy_figures():
    return run_mp("energy.py", heap="16m", timeout=3600)


def sim_heap_kib():
    return {"sim_heap_kib": run_mp("simheap.py", env=compiled_tree()[1])["sim_heap_kib"]}


# (name, function, keys it produces): a failed measurement writes null to every key.
MEASUREMENTS = [
    ("core", core_figures, ("spi_frames_per_snapshot", "snapshot_rows", "acquire_heap_locked",
                            "cycle_alloc_bytes")),
    ("sim_heap_kib", sim_heap_kib, ("sim_heap_kib",)),
    ("min_heap_kib", min_heap_kib, ("min_heap_kib",)),
    ("energy", energy_figures, ("energy_error_ppm", "energy_error_ppm_quadrants",
                                "energy_error_ppm_pv", "energy_error_ppm_fullscale",
                                "energy_detail_quadrants", "energy_detail_pv",
                                "energy_detail_fullscale", "energy_sim_s_quadrants",
                                "energy_sim_s_pv", "energy_sim_s_fullscale",
                                "energy_error_ppm_fast_1000ms", "energy_error_ppm_fast_250ms",
                                "calibrated_worst_pct_of_class", "calibrated_detail")),
]
