"""Heap cuts of issue 7 that a later change could undo without noticing (docs/ram.md
"What was changed"), checked on the 32-bit frozen build (tests/fw32_harness.py)."""
import json

from fw32_harness import run_fw32

MAP_DROP = r"""
import gc, sys, json
def imp():
    # every module the running meter keeps that reads the register map
    import drivers.stpm3x, metering.engine, metering.api, metering.calibrate
def drop():
    import metering.chips
    metering.chips._unload("drivers.stpm3x_map")
def alloc():
    gc.collect()
    return gc.mem_alloc()
imp()
a = alloc()
drop()
b = alloc()
print(json.dumps({"freed": a - b, "loaded": "drivers.stpm3x_map" in sys.modules}))
"""


def test_the_register_maps_globals_are_freed_when_boot_drops_it():
    """metering.chips.boot drops drivers.stpm3x_map after the boot (163 names, ~1.4 KiB).
    That frees its globals only if no module the meter keeps holds a function of the map
    (a function keeps its module's globals alive): the offset code lives in
    drivers/stpm3x_offset.py for that reason."""
    r = json.loads(run_fw32(MAP_DROP, heap_kib=256).strip().splitlines()[-1])
    assert r["loaded"] is False, r
    assert r["freed"] >= 1024, r


ENCODE = r"""
import gc, json
rep = {"id": "x", "ok": True, "result": {"k%d" % i: "v" * 20 for i in range(60)}}
gc.collect()
a = gc.mem_alloc()
s = json.dumps(rep)
gc.collect()
b = gc.mem_alloc()
out = s.encode()
gc.collect()
c = gc.mem_alloc()
print(json.dumps({"len": len(out), "str_b": b - a, "encode_b": c - b}))
"""


def test_a_replys_encode_shares_the_json_text_instead_of_copying_it():
    """comm/commands.py answers with json.dumps(rep).encode(): on MicroPython str.encode()
    makes a bytes header pointing at the str's data (py/objstr.c bytes_make_new), so the
    reply is not held twice (docs/ram.md). If a MicroPython update made it copy, the
    reply path would need its own encoder."""
    r = json.loads(run_fw32(ENCODE, heap_kib=256).strip().splitlines()[-1])
    assert r["len"] > 1500 and r["str_b"] >= r["len"], r
    assert r["encode_b"] <= 64, r
