"""Heap cuts of issue 7 that a later change could undo without noticing (docs/ram.md
"What was changed"), checked on the 32-bit frozen build (tests/fw32_harness.py)."""
import json

from fw32_harness import run_fw32

# The live heap after a collection, for the scripts below (each runs alone on the 32-bit
# build)
ALLOC = r"""
import gc
def alloc():
    gc.collect()
    return gc.mem_alloc()
"""


MAP_DROP = r"""
import gc, sys, json
def imp():
    # every module the running meter keeps that reads the register map
    import drivers.stpm3x, metering.engine, metering.api, metering.calibrate
def drop():
    import metering.chips
    metering.chips._unload("drivers.stpm3x_map")
""" + ALLOC + r"""
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


# a chip on a bus that answers nothing: enough to build the driver's objects
FAKE_CHIP = r"""
class Pin:
    def value(self, v=None):
        return 1
class Spi:
    def write_readinto(self, tx, rx):
        pass
chip = d.Stpm3x(d.SpiLink(Spi(), Pin()), "STPM34")
"""

PLAN = r"""
import gc, json
from drivers import stpm3x as d
""" + FAKE_CHIP + r"""
gc.collect()
a = gc.mem_alloc()
p = d._Plan(chip, True)
gc.collect()
print(json.dumps({"plan_b": gc.mem_alloc() - a, "nframes": p.nframes}))
"""


def test_a_snapshot_plan_is_packed_not_a_view_per_frame():
    """A chip's snapshot plan holds its frames in one bytes object, copied frame by frame
    into the chip's 5-byte buffer; with a 5- and a 4-byte memoryview per frame (a tuple of
    each) the two-channel plan took 2.3 KiB of the 32-bit heap, now about 0.5."""
    r = json.loads(run_fw32(PLAN, heap_kib=256).strip().splitlines()[-1])
    assert r["nframes"] > 20, r
    assert r["plan_b"] <= 768, r


PHASES = r"""
import gc, json
import unix_sim_3ph as board
from metering.phases import Phases
import metering.scale        # loaded for the boot: not the Phases' own heap
gc.collect()
a = gc.mem_alloc()
p = Phases(board, None)
gc.collect()
print(json.dumps({"phases_b": gc.mem_alloc() - a, "chans": [len(c) for c in p.chans]}))
"""


def test_the_meter_keeps_no_channel_scale_objects():
    """Phases keeps (phase, chip, channel) per phase, not the ChannelScale objects (a dozen
    boxed floats each) that only a calibration reads: the three-phase board's Phases took
    2208 bytes of the 32-bit heap with them, 1200 without."""
    r = json.loads(run_fw32(PHASES, heap_kib=256).strip().splitlines()[-1])
    assert r["chans"] == [3, 3, 3], r
    assert r["phases_b"] <= 1536, r


SCALE_DROP = r"""
import gc, sys, json
import metering.engine, metering.phases, metering.api, metering.chips, metering.events
import metering.scale        # as Meter() imports it during the boot
""" + ALLOC + r"""
a = alloc()
metering.chips._unload("metering.scale")
b = alloc()
print(json.dumps({"freed": a - b, "loaded": "metering.scale" in sys.modules}))
"""


def test_the_scale_module_is_freed_when_boot_drops_it():
    """metering.chips.boot drops metering.scale after the boot: the meter keeps the
    integer multipliers it computed (Phases), not its classes and functions. That frees
    its heap only if no module the running meter keeps holds the module or one of its
    functions (mulsh lives in metering/phases.py for that reason)."""
    r = json.loads(run_fw32(SCALE_DROP, heap_kib=256).strip().splitlines()[-1])
    assert r["loaded"] is False, r
    assert r["freed"] >= 512, r


CFG_DROP = r"""
import gc, sys, json
import drivers.stpm3x_map        # loaded at boot anyway: not counted below
from drivers import stpm3x as d
from metering.chips import _unload
""" + FAKE_CHIP + r"""
""" + ALLOC + r"""
a = alloc()
cal = chip.get_calibration(1)          # a set-up method: loads drivers.stpm3x_cfg
loaded = "drivers.stpm3x_cfg" in sys.modules
b = alloc()
_unload("drivers.stpm3x_cfg")
c = alloc()
again = chip.get_calibration(0)        # imported again when needed
try:
    chip.no_such_method
    missing = "no error"
except AttributeError as e:
    missing = str(e)
print(json.dumps({"cal": cal, "again": again, "loaded": loaded, "cfg_b": b - a,
                  "freed": b - c, "missing": missing}))
"""


def test_the_set_up_methods_load_on_use_and_are_freed_when_dropped():
    """The Stpm3x methods a running meter does not call (start-up, serial settings,
    configure, calibration, restore) live in drivers/stpm3x_cfg.py: a chip finds them there
    on first use (Stpm3x.__getattr__) and boot drops the module with the start-up code.
    Dropped, it frees its heap (1.3 KiB of functions and register names)."""
    r = json.loads(run_fw32(CFG_DROP, heap_kib=256).strip().splitlines()[-1])
    # reset values: CHV/CHC mid-scale 0x800, no phase correction
    assert r["cal"] == r["again"] == {"chv": 0x800, "chc": 0x800, "phc": 0, "phv": 0}, r
    assert r["loaded"] is True, r
    assert r["freed"] >= 1024, r          # 1376 bytes when it was written
    assert "no_such_method" in r["missing"], r


BOOT_DROPS = r"""
import sys
import main
main.main(['--board', 'unix_sim_3ph', '--step', '--days', '0.0005', '--print', 'none'])
print('MODULES', sorted(sys.modules))
"""


def test_a_running_meter_holds_none_of_the_boot_only_modules(tmp_path):
    """After the boot the meter keeps none of the modules it needed only to boot: the
    start-up code, the chips' set-up side, the register map, the scale computations."""
    import os
    import subprocess
    from headend import ROOT
    from headend.meter import firmware_env, micropython_path
    r = subprocess.run([micropython_path(), "-X", "heapsize=1m", "-c", BOOT_DROPS],
                       capture_output=True, text=True, timeout=120, env=firmware_env(),
                       cwd=str(tmp_path))
    mods = [ln for ln in r.stdout.splitlines() if ln.startswith("MODULES")]
    assert mods, r.stdout + r.stderr
    loaded = eval(mods[0].split(" ", 1)[1])
    assert "drivers.stpm3x" in loaded and "metering.engine" in loaded, loaded
    for boot_only in ("metering.startup", "drivers.stpm3x_start", "drivers.stpm3x_cfg",
                      "drivers.stpm3x_map", "metering.scale", "metering.api",
                      "metering.persist_load", "metering.store_load", "drivers.stpm3x_offset",
                      "drivers.stpm3x_uart"):
        assert boot_only not in loaded, (boot_only, loaded)
    assert os.path.isdir(ROOT)


API_CALL = r"""
import gc, sys, json
import metering.engine as e
class Clock:
    t = 0
    def set_time(self, t):
        self.t = t
class M:
    clock = Clock()
def alloc():
    gc.collect()
    return gc.mem_alloc()
a = alloc()
e._api("set_time", M, (1700000000,), {})
b = alloc()
try:
    e.Meter.__getattr__(M, "no_such_call")
    missing = "no error"
except AttributeError as ex:
    missing = str(ex)
print(json.dumps({"t": M.clock.t, "kept_b": b - a, "loaded": "metering.api" in sys.modules,
                  "missing": missing}))
"""


def test_a_command_call_imports_the_api_for_the_call_only():
    """The Meter's command calls (readings, counters, settings, presets, time,
    calibration) are in metering/api.py, imported for the call and dropped after it
    (Meter.__getattr__): between two commands the meter holds none of it."""
    r = json.loads(run_fw32(API_CALL, heap_kib=256).strip().splitlines()[-1])
    assert r["t"] == 1700000000, r
    assert r["loaded"] is False and r["kept_b"] <= 64, r
    assert "no_such_call" in r["missing"], r


UNKNOWN_CMDS = r"""
import gc, json, asyncio
from comm.commands import Commands
class M:
    pass
c = Commands(M())
""" + ALLOC + r"""
async def ask(n0, n):
    for i in range(n0, n):
        rid, rep = await c.handle(json.dumps({"id": "r%d" % i, "cmd": "zz%d" % i}).encode())
    return json.loads(rep)
asyncio.run(ask(0, 50))                # the reply cache full: it holds the last 8
a = alloc()
rep = asyncio.run(ask(50, 350))
b = alloc()
print(json.dumps({"grew_b": b - a, "error": rep.get("error")}))
"""


def test_unknown_commands_do_not_grow_the_heap():
    """A command name is checked against the known ones before the handler is looked
    up: getattr() with an unknown name interned it, ~19 bytes of heap for good per
    distinct name, so requests from the network with made-up commands would exhaust
    the meter's heap (300 of them took 6.1 KiB before the check)."""
    r = json.loads(run_fw32(UNKNOWN_CMDS, heap_kib=256).strip().splitlines()[-1])
    assert r["error"] == "unknown_cmd", r
    assert r["grew_b"] <= 256, r


FORGED = r"""
import gc, json, asyncio
from comm.commands import Commands
class M:
    pass
c = Commands(M(), key=bytes(32))
""" + ALLOC + r"""
async def forged(n0, n):
    for k in range(n0, n):
        # a MAC of 64 characters no request used before (the length of a real one)
        # (built as UTF-8 bytes: chr() would intern each character in this script)
        mac = bytearray()
        for j in range(64):
            cp = 0x4E00 + 64 * k + j
            mac.extend(bytes((0xE0 | cp >> 12, 0x80 | (cp >> 6) & 0x3F, 0x80 | cp & 0x3F)))
        mac = mac.decode()
        req = json.dumps({"id": "f%d" % k, "ctr": k + 1, "mac": mac,
                          "body": json.dumps({"cmd": "ping"})})
        rid, rep = await c.handle(req.encode())
        # the head of a request too large to receive: its integer id ends on a
        # character no request used before
        cp = 0x5E00 + k
        rid2, rep2 = await c.handle(None, b'{"id": 77' + bytes(
            (0xE0 | cp >> 12, 0x80 | (cp >> 6) & 0x3F, 0x80 | cp & 0x3F)) + b', "c')
    return json.loads(rep), json.loads(rep2)
asyncio.run(forged(0, 2))              # the first replies: their tables, the cache
a = alloc()
rep, rep2 = asyncio.run(forged(2, 22))
b = alloc()
print(json.dumps({"grew_b": b - a, "error": rep.get("error"), "oversized": rep2}))
"""


def test_characters_of_a_request_are_not_interned():
    """Indexing a str in MicroPython returns each character as a qstr, interned for good:
    the MAC check compared the request's MAC character by character, so every distinct
    character of a forged MAC stayed in the heap (a remote way to fill it; and on a real
    meter the digits of the first signed command grew the qstr pool by ~0.6 KiB, found in
    the day's block maps), and the id of an oversized request was read the same way. Both
    now work on bytes: 20 forged requests with 1,280 new characters and 20 oversized
    heads leave the heap as it was (the code before: several KiB)."""
    r = json.loads(run_fw32(FORGED, heap_kib=256).strip().splitlines()[-1])
    assert r["error"] == "bad_signature", r
    assert r["oversized"]["error"] == "oversized" and r["oversized"]["id"] == 77, r
    assert r["grew_b"] <= 256, r


def test_every_command_handler_is_named_in_cmds():
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = open(os.path.join(root, "firmware", "comm", "commands.py")).read()
    handlers = set(re.findall(r"def _c_(\w+)\(", src))
    cmds = set(re.findall(r"\w+", re.search(r"\nCMDS = \(([^)]*)\)", src).group(1)))
    assert handlers == cmds and len(cmds) == 8


# the heap of a meter that ran for a while at 64 KiB: free space in holes of ~400 bytes
FRAGMENT = r"""
def fragment():
    global hold
    hold = [None] * 400
    gc.collect()
    n = 0
    try:
        while n < 400:
            hold[n] = bytearray(400)
            n += 1
    except MemoryError:
        pass
    for i in range(0, n, 2):
        hold[i] = None
    gc.collect()
    return n
def whole(obj):
    # what a reply or a console line was before: one string of its whole size
    try:
        json.dumps(obj)
        return "fits"
    except MemoryError:
        return "MemoryError"
"""

FRAGMENTED_REPLY = r"""
import gc, json, asyncio
from comm.commands import Commands
from comm.mqtt import _publish
class M:
    def readings(self):
        return {"k%02d" % i: "v" * 50 for i in range(24)}      # a ~1.6 KiB reply
c = Commands(M())
req = json.dumps({"id": "r1", "cmd": "get", "args": {"what": "readings"}}).encode()
def ask():
    return asyncio.run(c.answer(req))
ask()                              # every code path once (first-use allocations)
c._cache = []
""" + FRAGMENT + r"""
n = fragment()
whole = whole(M().readings())
try:
    rid, parts = ask()
    pkt = _publish(0x32, "lipari/v1/m1/resp", 9, parts)
    err = None
except MemoryError as e:
    rid, parts, pkt, err = None, (), (), repr(e)
hold = None
gc.collect()
text = b"".join(parts)
hdr = bytes(pkt[0]) if pkt else b""
print(json.dumps({"n": n, "whole": whole, "err": err, "rid": rid, "sizes": [len(p) for p in parts],
                  "same": text == json.dumps({"id": "r1", "ok": True,
                                              "result": M().readings()},
                                             separators=(",", ":")).encode(),
                  "wire": bytes(hdr) + text == bytes(_publish(0x32, "lipari/v1/m1/resp", 9,
                                                              bytearray(text))),
                  "rest": len(pkt) == len(parts) + 1 and all(a is b for a, b in zip(pkt[1:], parts))}))
"""


def test_a_command_reply_is_written_in_parts_that_fit_a_fragmented_heap():
    """At 64 KiB the `get` replies (~1 KiB) found no free block of their size while the
    heap had 6 KiB free in smaller holes (docs/ram.md). comm.commands.answer writes the
    reply in parts of at most 255 bytes, the same (compact) JSON text, and comm.mqtt sends them
    after the PUBLISH header: here every free hole is ~400 bytes, the whole reply as one
    string does not fit (checked), the reply in parts does, byte for byte."""
    r = json.loads(run_fw32(FRAGMENTED_REPLY, heap_kib=64).strip().splitlines()[-1])
    assert r["n"] > 40, r
    assert r["whole"] == "MemoryError", r          # the test's heap is fragmented enough
    assert r["err"] is None and r["rid"] == "r1", r
    assert sum(r["sizes"]) > 1400 and max(r["sizes"]) <= 256 and len(r["sizes"]) >= 6, r
    assert r["same"] and r["wire"] and r["rest"], r


FRAGMENTED_LINE = r"""
import gc, json
import main
rec = {"seq": 7, "t": 1767225600, "k": [1, 2, 3], "d": {"a": None}}
for i in range(20):
    rec["f%02d" % i] = "w" * 50                 # a ~1.4 KiB console line
main.out("interval", {"seq": 1})                # first-use allocations
""" + FRAGMENT + r"""
n = fragment()
w = whole(rec)
main.out("interval", rec)
hold = None
gc.collect()
print(json.dumps({"n": n, "whole": w}))
"""


def test_a_console_line_needs_no_block_of_its_size():
    """main.out (the console sink: `lipari meter` reads its lines) printed
    json.dumps(dict(rec)): a copy of the record and the whole line as one string; at a
    64 KiB heap the sink missed records so. It now writes the line per field: the same
    JSON object ("type" added), printed whole in a heap whose holes are ~400 bytes where
    the line as one string does not fit (checked)."""
    lines = run_fw32(FRAGMENTED_LINE, heap_kib=64).strip().splitlines()
    r = json.loads(lines[-1])
    assert r["n"] > 40 and r["whole"] == "MemoryError", r
    rec = {"seq": 7, "t": 1767225600, "k": [1, 2, 3], "d": {"a": None}}
    rec.update(("f%02d" % i, "w" * 50) for i in range(20))
    assert json.loads(lines[-2]) == dict(rec, type="interval"), lines[-2][:200]
    assert json.loads(lines[-3]) == {"seq": 1, "type": "interval"}, lines[-3]


# A session with a fake meter and publish (the replies kept in `sent`), for the
# command-task scripts below
SESSION = r"""
import gc, sys, json, asyncio
from comm import session, fqueue
q = fqueue.FlashQueue("q")
s = session.Session("m1", {"host": "x"}, None, q, info={"fw": "t"})
class M:
    def __init__(self):
        self.sinks = []
    def readings(self):
        return {"v": [230.0 + i for i in range(40)], "text": "x" * 600}
m = M()
sent = []
keep = lambda b: b                      # what `sent` keeps of a reply
async def publish(topic, payload, qos=0, retain=False, timeout_ms=None):
    sent.append(keep(b"".join(payload) if isinstance(payload, tuple) else payload))
s.client.publish = publish
""" + ALLOC + r"""
"""

CMDS_DROPPED = SESSION + r"""
if sys.argv[-1] == "keep":
    session._drop_commands = lambda: None   # what the session did before: keep it
async def ask(n0, n):
    t = asyncio.create_task(s._cmd_task())
    for i in range(n0, n):
        s._cmds.append(json.dumps({"id": "r%d" % i, "cmd": "ping"}).encode())
        s._cmd_wake.set()
        while len(sent) <= i:
            await asyncio.sleep_ms(1)
    t.cancel()
    await asyncio.sleep_ms(1)
a0 = alloc()
s.attach(m)
asyncio.run(ask(0, 10))
a1 = alloc()
loaded = "comm.commands" in sys.modules
import comm.commands
a2 = alloc()
print(json.dumps({"kept_b": a1 - a0, "module_b": a2 - a1, "loaded": loaded,
                  "last": json.loads(sent[-1]), "n": len(sent)}))
"""


def test_the_session_holds_the_command_module_only_while_it_answers():
    """The session builds a comm.commands.Commands per command over the state it keeps
    (counter, redelivery cache, stats: comm.commands.state()) and drops the module after
    the reply: between two commands the meter holds ~1.5 KiB less than with the module
    and its Commands kept for good (measured: the same ten commands with the drop
    disabled). The replies and the cache are unchanged (the last reply, r9, is there)."""
    drop = json.loads(run_fw32(CMDS_DROPPED, heap_kib=256, args=("drop",)).strip().splitlines()[-1])
    keep = json.loads(run_fw32(CMDS_DROPPED, heap_kib=256, args=("keep",)).strip().splitlines()[-1])
    assert drop["n"] == keep["n"] == 10 and drop["last"] == keep["last"], (drop, keep)
    assert drop["last"]["id"] == "r9" and drop["last"]["ok"] is True, drop
    assert drop["loaded"] is False and keep["loaded"] is True, (drop, keep)
    assert drop["module_b"] >= 1024, drop          # importing it again costs its heap
    assert keep["kept_b"] - drop["kept_b"] >= 1024, (drop, keep)


CMD_IDLE = SESSION + r"""
keep = len                              # the length only: no copy of the reply here
async def run():
    t = asyncio.create_task(s._cmd_task())
    await asyncio.sleep_ms(5)
    s._cmds.append(b'{"id": "r0", "cmd": "ping"}')   # the first command: the cache list, state
    s._cmd_wake.set()
    while not sent:
        await asyncio.sleep_ms(1)
    await asyncio.sleep_ms(5)
    a0 = alloc()
    s._cmds.append(b'{"id": "r1", "cmd": "get", "args": {"what": "readings"}}')
    s._cmd_wake.set()
    while len(sent) < 2:
        await asyncio.sleep_ms(1)
    await asyncio.sleep_ms(5)                 # the task idle again, waiting for the next
    a1 = alloc()
    print(json.dumps({"idle_kept_b": a1 - a0, "reply_b": sent[-1],
                      "loaded": "comm.commands" in sys.modules}))
    t.cancel()
s.attach(m)
asyncio.run(run())
"""


def test_an_idle_command_task_keeps_nothing_of_the_last_command():
    """The command task's loop stays suspended between two commands, and MicroPython's
    GC is conservative: the loop's stale value-stack slots kept the last request, its
    reply's parts and the Commands object (so the whole comm.commands module) alive until
    the next command, hours on a meter (measured: 1,104 bytes kept after a ~0.9 KiB reply
    on the code before, 96 after). Each command now runs in a frame of its own that is
    garbage once it is answered (comm/session.py _cmd_one)."""
    r = json.loads(run_fw32(CMD_IDLE, heap_kib=256).strip().splitlines()[-1])
    # a ~0.9 KiB reply (888 bytes of compact JSON since 2026-11-30; 0.9 KiB spaced)
    assert r["reply_b"] > 850 and r["loaded"] is False, r
    assert r["idle_kept_b"] < 256, r


RUNTIME_MODULES = r"""
import gc, sys, json
""" + ALLOC + r"""
import asyncio, util                     # loaded before the meter's modules on a board
a = alloc()
import drivers.stpm3x, metering.engine   # what a running meter keeps of drivers/, metering/
import metering.chips
for name in ("drivers.stpm3x_map", "metering.scale", "drivers.stpm3x_offset"):
    metering.chips._unload(name)         # as metering.chips.boot does after the start-up
b = alloc()
import drivers.stpm3x_uart
c = alloc()
print(json.dumps({"kept_b": b - a, "uart_b": c - b,
                  "mods": sorted(k for k in sys.modules if k.startswith(("drivers", "metering")))}))
"""


def test_a_running_meter_holds_less_of_drivers_and_metering():
    """The module objects of drivers/ and metering/ a running meter keeps, on the 32-bit
    frozen build (docs/ram.md, 2026-11-30 morning): 9520 bytes before (measured on main at
    3e88c14 with this script), 8000 after: the checkpoint / record reading, the start-up's
    restore, the chip restart and the driver's encodings in modules loaded on use, the UART
    link in its own module, register-map values as const() literals, the offset code
    dropped after the boot. Bound: 8.2 KiB (a regression of 200 bytes fails)."""
    r = json.loads(run_fw32(RUNTIME_MODULES, heap_kib=256).strip().splitlines()[-1])
    for gone in ("drivers.stpm3x_map", "metering.scale", "drivers.stpm3x_offset",
                 "metering.persist_load", "metering.store_load", "metering.startup",
                 "drivers.stpm3x_cfg", "drivers.stpm3x_start"):
        assert gone not in r["mods"], r
    assert r["kept_b"] <= 8200, r
    # the UART link an SPI board no longer holds is worth its own module
    assert r["uart_b"] >= 200, r



COMM_RUNTIME = r"""
import gc, sys, json
""" + ALLOC + r"""
import asyncio, util, comm.transport     # loaded before them on a running NB-IoT meter
a = alloc()
import comm.nbiot, comm.fqueue           # what a running NB-IoT meter keeps of them
b = alloc()
# the queue opened (its boot side loaded for the call), and the modem's bring-up / TLS
# set-up / resync module loaded as up(), connect(tls) and a timed-out command load it
q = comm.fqueue.FlashQueue("q", seg_bytes=256, max_segs=4)
q.append(1, b"x" * 20)
q.close()
q = None
fns = []
after = []
for i in range(2):
    m = comm.nbiot._load()
    fns = [n for n in ("up", "ssl_setup", "resync", "qf_checksum") if hasattr(m, n)]
    m = None
    after.append(alloc())
print(json.dumps({"kept_b": b - a, "again_b": after[1] - after[0], "fns": fns,
                  "mods": sorted(k for k in sys.modules if k.startswith("comm"))}))
"""


def test_a_running_nbiot_meter_holds_less_of_the_modem_and_the_queue():
    """The module objects of comm.nbiot and comm.fqueue a running NB-IoT meter keeps, on
    the 32-bit frozen build (docs/ram.md, 2026-11-30 day): 3232 bytes before (main at
    101d883, this script's first part: nbiot 2048, fqueue 1184), 2960 after: the modem's
    bring-up, TLS set-up and resync in comm/nbiot_up.py and the queue's scan / open /
    meta file in comm/fqueue_load.py, both loaded on use and dropped at once. Bound:
    3100 bytes (the old code fails it by 132)."""
    r = json.loads(run_fw32(COMM_RUNTIME, heap_kib=256).strip().splitlines()[-1])
    assert r["mods"] == ["comm", "comm.fqueue", "comm.nbiot", "comm.transport"], r
    assert r["fns"] == ["up", "ssl_setup", "resync", "qf_checksum"], r
    assert r["kept_b"] <= 3100, r
    # loading the bring-up again (a link loss, a TLS reconnect) keeps nothing of it
    assert r["again_b"] <= 16, r
