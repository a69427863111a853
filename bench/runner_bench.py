"""Issue 7 figures of the host runner and the board bridge (docs/decisions/0007), for
bench/run.py.

    bridge_client  bridge_client_heap_bytes: the link objects of a three-phase board
                   (Bridge with its buffers, SCS/EN/SYN/stop pins, SPI, watchdog) on the
                   micropython binary, compiled .mpy as lipari meter runs it;
                   bridge_client_code_bytes: the heap its module takes when loaded from
                   .mpy (0 when frozen); bridge_frame_allocs: 0 when a latch, 66 frames,
                   a feed and a stop-line read run under heap_lock() (1 = it allocated)
    day_wall       one simulated day of the three-phase meter (--step), in-process and
                   over the bridge, in one run: wall and CPU seconds (firmware + host),
                   their ratio, and frames per round trip over the bridge
"""
import os
import resource
import subprocess
import sys
import time

from benchlib import ROOT, run_mp, compiled_tree, micropython_path

sys.path.insert(0, os.path.join(ROOT, "boards"))


def bridge_client():
    import unix_sim_3ph
    from sim.bridge import BridgeServer
    env = compiled_tree()[1]
    srv = BridgeServer(unix_sim_3ph).start()
    try:
        out = run_mp("bridgeheap.py", srv.path, 2, "spi", 200, env=env)
    finally:
        srv.stop()
    if out["frames"] != 200 * 66 or out["control_alloc"] != 1:
        raise RuntimeError("the frames did not go over the bridge, or heap_lock is not "
                           "seen: %r" % out)
    return {"bridge_client_heap_bytes": out["bridge_bytes"] + out["links_bytes"],
            "bridge_client_code_bytes": out["code_bytes"],
            "bridge_frame_allocs": out["alloc_failed"],
            "bridge_frames_per_roundtrip_locked": round(out["frames"] / out["exchanges"], 2)}


def _day(bridged):
    """(wall s, firmware CPU s, host CPU s, frames, round trips) of one simulated day."""
    import unix_sim_3ph
    main_py, env = compiled_tree()
    argv = [micropython_path(), "-X", "heapsize=1m", main_py, "--board", "unix_sim_3ph",
            "--profile", "household", "--seed", "1", "--step", "--days", "1",
            "--print", "summary"]
    srv = None
    if bridged:
        from sim.bridge import BridgeServer
        srv = BridgeServer(unix_sim_3ph, profile="household", seed=1).start()
        argv += ["--bridge", srv.path]
    s0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - t0
        frames, rts = (srv.frames, srv.exchanges) if srv else (0, 0)
    finally:
        if srv is not None:
            srv.stop()
    s1 = resource.getrusage(resource.RUSAGE_SELF)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode or '"type": "summary"' not in r.stdout:
        raise RuntimeError("the simulated day failed: %s" % (r.stderr or r.stdout)[-800:])
    fw = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    host = (s1.ru_utime + s1.ru_stime) - (s0.ru_utime + s0.ru_stime)
    return wall, fw, host, frames, rts


def day_wall():
    wi, fi, _, _, _ = _day(False)
    wb, fb, hb, frames, rts = _day(True)
    return {"day_wall_s_inprocess": round(wi, 1), "day_wall_s_bridged": round(wb, 1),
            "day_wall_ratio_bridged": round(wb / wi, 2),
            "day_cpu_s_inprocess": round(fi, 1), "day_cpu_s_bridged": round(fb + hb, 1),
            "frames_per_roundtrip": round(frames / rts, 2)}


# (name, function, keys it produces): a failed measurement writes null to every key.
MEASUREMENTS = [
    ("bridge_client", bridge_client, ("bridge_client_heap_bytes", "bridge_client_code_bytes",
                                      "bridge_frame_allocs",
                                      "bridge_frames_per_roundtrip_locked")),
    ("day_wall", day_wall, ("day_wall_s_inprocess", "day_wall_s_bridged",
                            "day_wall_ratio_bridged", "day_cpu_s_inprocess",
                            "day_cpu_s_bridged", "frames_per_roundtrip")),
]
