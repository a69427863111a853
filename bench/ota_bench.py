"""Issue 9 figures (signed OTA updates), for bench/run.py. Each function returns a dict.

    ota_verify()    ota_verify_ms: one Ed25519 check of a real signed manifest by the meter's
                    code (firmware/ota/ed25519.py), median of 5, on the MicroPython binary
                    named by ota_verify_build (MPY32 when it names one, else the cached
                    32-bit unix build of tools/mpbuild.py that make setup builds; the 64-bit
                    wheel only when that cannot be built); ota_verify_field_mults: 255-bit field
                    multiplications per verify (8 per point doubling, 9 per addition), the
                    count a board's time is estimated from (time of one multiplication on
                    the board x this), plus the point doublings/additions and SHA-512 blocks
    ota_heap()      ota_heap_peak_kib: live heap (after gc.collect) the OTA work needs on
                    top of what runs already: its modules, the signature check, staging a
                    whole real release into littlefs with the NB-IoT window of chunks held
                    (bench/mp/ota_heap.py; on the same binary as ota_verify, named by
                    ota_heap_build: on the 32-bit build objects have a Cortex-M's size)
    ota_download()  one real update through Mosquitto of a meter in real time (speed 1,
                    read_ms 100) with a stall probe, window and chunk of NB-IoT (4 x 1 KiB):
                    ota_max_metering_stall_ms: worst lateness of a metering cycle (gap
                    between cycle starts, real ticks, minus read_ms) from the offer to the
                    reboot into the new firmware; ota_stall_before_ms: the same over as long
                    a time before the offer (the machine's own noise);
                    ota_overhead_ratio: every OTA byte on the wire (MQTT packets both ways:
                    offer, requests, chunks, state reports and their PUBACKs) / the payload
                    (the release's files); ota_chunks_sent, and ota_resent_ratio: chunk
                    bytes sent / the image's bytes (1.0: no chunk sent twice; a request
                    that times out on a slow link or a loaded machine is asked again);
                    ota_requests: the chunk requests served (one per window of pieces: more
                    than the pieces / window means windows asked again);
                    ota_download_s: offer to confirmed
"""
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, os.path.join(ROOT, "tests"), HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from benchlib import run_mp, micropython_path  # noqa: E402

PROBE = r'''# bench: the real main (lmain) with a metering stall probe, as tests/e2e_meter.py does
import time
import json
import lmain

BOOT = None
_Run = lmain.Run
st = {"max_late_ms": 0, "n": 0, "late_100": 0}


class ProbedRun(_Run):
    def start(self):
        m = _Run.start(self)
        period = m.read_ms / float(self.opts.get("speed", 1))
        orig = m.cycle
        last = [None, time.ticks_ms()]

        def cycle():
            now = time.ticks_ms()
            if last[0] is not None:
                late = time.ticks_diff(now, last[0]) - period
                st["n"] += 1
                if late > st["max_late_ms"]:
                    st["max_late_ms"] = late
                if late > 100:
                    st["late_100"] += 1
            last[0] = now
            if time.ticks_diff(now, last[1]) >= 1000:
                last[1] = now
                print(json.dumps({"type": "stall", "max_late_ms": st["max_late_ms"],
                                  "n": st["n"], "late_100": st["late_100"]}))
                st["max_late_ms"] = 0
            return orig()
        m.cycle = cycle
        return m


lmain.Run = ProbedRun


def main():
    lmain.BOOT = BOOT
    lmain.main()
'''


def _release(tmp):
    from headend import ota
    ota.keygen(os.path.join(tmp, "k"))
    d = ota.build_release(os.path.join(tmp, "k", "ota.key"), ["unix_sim_3ph"], version="0.2.0",
                          out=os.path.join(tmp, "rel"))
    return d, open(os.path.join(tmp, "k", "ota.pub")).read().strip()


def _binary():
    """The MicroPython the OTA figures come from, and its name for the results: MPY32 when
    it names a binary, else the cached 32-bit unix build with the firmware frozen in (make
    setup builds it: tools/mpbuild.py; word and object sizes as on a Cortex-M), else (it
    cannot be built here: no gcc-multilib, no MicroPython source) the 64-bit wheel."""
    mp32 = os.environ.get("MPY32")
    if mp32 and os.path.exists(mp32):
        return mp32, "32-bit (MPY32)"
    try:
        from tools import mpbuild
        return mpbuild.unix_binary(), "32-bit unix build, firmware frozen (tools/mpbuild.py)"
    except Exception as e:  # reported in the results, not hidden
        print("ota_bench: no 32-bit build (%s): the 64-bit wheel instead" % e, file=sys.stderr)
        return micropython_path(), "unix port, 64-bit wheel"


def ota_verify():
    tmp = tempfile.mkdtemp(prefix="ota-bench-")
    try:
        d, pub = _release(tmp)
        path = os.path.join(tmp, "case.json")
        with open(path, "w") as f:
            json.dump([pub, open(os.path.join(d, "manifest.sig")).read().strip(),
                       open(os.path.join(d, "manifest.json"), "rb").read().hex()], f)
        binary, build = _binary()
        r = run_mp("ota_verify.py", path, binary=binary)
        if not r["ok"]:
            raise RuntimeError("the meter's verifier rejected a good signature")
        return {"ota_verify_ms": round(r["ms"], 1), "ota_verify_field_mults": r["field_mults"],
                "ota_verify_point_ops": [r["dbl"], r["add"]],
                "ota_verify_sha512_blocks": r["sha512_blocks"],
                "ota_verify_build": build}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ota_heap():
    tmp = tempfile.mkdtemp(prefix="ota-bench-")
    try:
        d, pub = _release(tmp)
        binary, build = _binary()
        r = run_mp("ota_heap.py", d, pub, 4, heap="2m", binary=binary)
        if not r["done"]:
            raise RuntimeError("the release was not staged completely")
        return {"ota_heap_peak_kib": r["ota_heap_peak_kib"], "ota_code_kib": r["ota_code_kib"],
                "ota_heap_build": build}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ota_download():
    from ota_harness import OtaFleet, wait_for
    tmp = tempfile.mkdtemp(prefix="ota-bench-")
    f = OtaFleet(tmp, ["m1"])
    try:
        m = f.meter("m1", extra=["--read_ms", "100", "--speed", "1"],
                    ota_cfg={"window": {"wifi": 4}, "gap_ms": 20})     # NB-IoT's window
        # the probe wraps the deployed firmware's main (slot a)
        m.stop()
        a = os.path.join(m.dir, "fw", "a")
        os.rename(os.path.join(a, "main.mpy"), os.path.join(a, "lmain.mpy"))
        with open(os.path.join(a, "main.py"), "w") as fh:
            fh.write(PROBE)
        m = f.meters["m1"] = type(m)(m.dir, m.argv[4:])
        rel = f.release("0.2.0")
        img = open(os.path.join(rel, "image.bin"), "rb").read()
        payload = sum(e[1] for e in json.loads(img[_tsize(rel):_tsize(rel) + _dsize(rel)]))
        wait_for(lambda: len([r for r in m.records if r.get("type") == "stall"]) >= 20, 120,
                 "the meter running")
        t0 = time.time()
        from headend.ota_server import OtaServer, push
        srv = OtaServer(f.store, port=f.broker.port, user="headend", password="headend-pw").start()
        try:
            push(f.store, srv, rel, ["m1"], stage_timeout_s=600, log=lambda *a: None)
        finally:
            srv.stop()
        t1 = time.time()
        boot2 = min([r["ht"] for r in m.records if r["boot"] == 2] or [t1])
        during = [r["max_late_ms"] for r in m.records
                  if r.get("type") == "stall" and r["boot"] == 1 and r["ht"] >= t0]
        before = [r["max_late_ms"] for r in m.records
                  if r.get("type") == "stall" and r["boot"] == 1 and t0 - (boot2 - t0) <= r["ht"] < t0]
        st = f.ota_state("m1")["state"]
        if st["state"] != "confirmed":
            raise RuntimeError("update not confirmed: %s" % st)
        return {"ota_max_metering_stall_ms": round(max(during), 1),
                "ota_stall_before_ms": round(max(before), 1) if before else None,
                "ota_overhead_ratio": round(srv.stats["wire_bytes"] / payload, 4),
                "ota_chunks_sent": srv.stats["chunks"],
                "ota_requests": srv.stats["requests"],
                "ota_resent_ratio": round(srv.stats["chunk_bytes"] / len(img), 4),
                "ota_download_s": round(t1 - t0, 1)}
    finally:
        f.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _manifest(rel):
    return json.load(open(os.path.join(rel, "manifest.json")))


def _tsize(rel):
    m = _manifest(rel)
    from headend.ota import HASH
    return HASH * ((m["body_size"] + m["block"] - 1) // m["block"])


def _dsize(rel):
    return _manifest(rel)["dir_size"]


MEASUREMENTS = [
    ("ota_verify", ota_verify, ("ota_verify_ms", "ota_verify_field_mults", "ota_verify_point_ops",
                                "ota_verify_sha512_blocks", "ota_verify_build")),
    ("ota_heap", ota_heap, ("ota_heap_peak_kib", "ota_code_kib", "ota_heap_build")),
    ("ota_download", ota_download, ("ota_max_metering_stall_ms", "ota_stall_before_ms",
                                    "ota_overhead_ratio", "ota_chunks_sent",
                                    "ota_requests", "ota_resent_ratio", "ota_download_s")),
]

if __name__ == "__main__":
    names = sys.argv[1:]
    for name, fn, keys in MEASUREMENTS:
        if not names or name in names:
            print(name, json.dumps(fn()), flush=True)
