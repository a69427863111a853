"""A power cut at every flash write of an OTA update (tests/ota_powercut_mp.py on the
MicroPython unix port, littlefs on sim/flash.py): every cut leaves a meter that boots a
complete signed firmware with its energy checkpoint intact, and the update then
completes from where it stopped.

The release is small (a few files, 256-byte blocks, so that a block spans files and
files span blocks) to keep the run short: the writes it makes are of every kind a full
release makes (clearing the slot, the download note, the block table, the directory,
files, the switch record, the trial boot, the confirmation), and the checkpoints of the
metering in between. The full-size release goes through the same code (tests/
test_ota_e2e.py, with a meter power cut in the middle of its download).
"""
import json
import os

from comm_harness import run_mp
from ota_harness import ROOT

from headend import ota


def small_files(seed):
    def blob(n, k):
        return bytes((i * 7 + k * 13 + seed) & 0xFF for i in range(n))
    return [("main.mpy", blob(700, 1)), ("version.mpy", blob(90, 2)),
            ("ota/agent.mpy", blob(1500, 3)), ("ota/empty.mpy", b""),
            ("comm/x.mpy", blob(257, 4))]


def small_image(tmp_path, seed):
    """A small ROMFS image (mpremote's writer): a main and a few modules of text, ~3 KB,
    so that the update spans a dozen blocks of 256 bytes."""
    from mpremote.romfs import make_romfs
    src = tmp_path / ("rom%d" % seed)
    for p, n in (("main.py", 700), ("version.py", 60), ("ota/agent.py", 1500), ("comm/x.py", 500)):
        (src / p).parent.mkdir(parents=True, exist_ok=True)
        (src / p).write_text("# %d\n" % seed + "".join(
            "X%d = %d\n" % (i, (i * 7 + seed) % 97) for i in range(n // 8)))
    return make_romfs(str(src), mpy_cross=False)


def powercut_inputs(tmp_path, block=256, kind="mpy"):
    key_dir = tmp_path / "k"
    ota.keygen(str(key_dir))
    key = ota.load_key(str(key_dir / "ota.key"))
    files = small_files(1)
    dir_json, body = ota.make_body(files)
    if kind == "romfs":
        files, dir_json, body = [], b"", small_image(tmp_path, 1)
    table = ota.make_table(body, block)
    import hashlib
    m = {"v": 1, "version": "0.2.0", "min_version": "0.2.0", "boards": ["unix-sim-3ph"],
         "kind": kind, "created": 0, "expires": 1 << 40, "block": block,
         "dir_size": len(dir_json), "body_size": len(body), "files": len(files),
         "table_sha256": hashlib.sha256(table).hexdigest(),
         "body_sha256": hashlib.sha256(body).hexdigest(), "trial_s": 600}
    raw = json.dumps(m, sort_keys=True, separators=(",", ":"))
    key.sign(raw.encode())
    inp = {"manifest": raw, "image": (table + body).hex(), "kind": kind,
           "base": [(p, d.hex()) for p, d in small_files(2)],
           "new": [(p, d.hex()) for p, d in files]}
    if kind == "romfs":
        inp["base"], inp["new"] = small_image(tmp_path, 2).hex(), body.hex()
    path = tmp_path / "in.json"
    path.write_text(json.dumps(inp))
    return str(path)


def run_powercut(path, timeout=600):
    code = "INPUT = %r\nexec(open(%r).read())\n" % (
        path, os.path.join(ROOT, "tests", "ota_powercut_mp.py"))
    out = run_mp(code, timeout=timeout, heapsize="8M")
    return json.loads(out.strip().splitlines()[-1])


def test_power_cut_at_every_write_of_an_update(tmp_path):
    res = run_powercut(powercut_inputs(tmp_path))
    cuts = res["cuts"]
    assert len(cuts) == res["writes"] and len(cuts) >= 40, len(cuts)
    bad = [c for c in cuts if not (c[2] and c[3] and c[4] is True)]
    assert not bad, bad
    # both outcomes happen: cuts before the switch boot the old slot, after it the new one
    assert {c[1] for c in cuts} == {0, 1}


def test_power_cut_at_every_write_of_a_romfs_update(tmp_path):
    """The same for a ROMFS release: the image staged into fw/b.rom (the unix board's
    ROMFS slot); each cut leaves a slot whose image is the signed one and mounts."""
    res = run_powercut(powercut_inputs(tmp_path, kind="romfs"))
    cuts = res["cuts"]
    assert len(cuts) == res["writes"] and len(cuts) >= 25, len(cuts)
    bad = [c for c in cuts if not (c[2] and c[3] and c[4] is True)]
    assert not bad, bad
    assert {c[1] for c in cuts} == {0, 1}


# A board's ROMFS partition, emulated after MicroPython's vfs.rom_ioctl (extmod/vfs.h):
# NOR flash (erased bytes read 0xFF, a write only clears bits: writing over bytes that
# were not erased corrupts them), prepared (erased) in whole units, written in multiples
# of the smallest write; a power cut at the k-th erase or write (a torn write keeps its
# first half). ota/rom.py's PartRom runs on it from the first byte to a power cut at
# every operation and the resume after it.
PARTITION = r"""
import os, json, binascii, hashlib
from ota import manifest as man
from ota.rom import RomStage
from ota.stage import ChunkError
IN = json.loads(open(INPUT).read())
M = man.check_fields(json.loads(IN["manifest"]))
IMAGE = binascii.unhexlify(IN["image"])
BODY = IMAGE[man.table_size(M):]


class Cut(Exception):
    pass


class Rom:
    def __init__(self, size, unit, minw):
        self.seg = [bytearray(b"\xff" * size) for _ in range(2)]
        self.unit, self.minw = unit, minw
        self.ops = 0
        self.cut_at = 0
        self.bad = []          # writes over bytes not erased, misaligned calls

    def op(self):
        self.ops += 1
        if self.cut_at and self.ops == self.cut_at:
            raise Cut()

    def __call__(self, cmd, *a):
        if cmd == 1:
            return len(self.seg)
        if cmd == 2:
            return memoryview(self.seg[a[0]])
        if cmd == 6:
            return self.unit
        s = self.seg[a[0]]
        if cmd == 3:
            off, n = (0, a[1]) if len(a) == 2 else a[1:]
            u = self.unit if self.unit > 0 else len(s)
            if off % u or (len(a) == 3 and self.unit <= 0):
                self.bad.append(["prepare", off, n])
            for x in range(off, min(off + n + u - 1, len(s)) // u * u, u):
                self.op()
                s[x:x + u] = b"\xff" * u
            return self.minw
        if cmd == 4:
            off, buf = a[1], a[2]
            if off % self.minw or len(buf) % self.minw:
                self.bad.append(["write", off, len(buf)])
            for i in range(len(buf)):
                if s[off + i] != 0xFF:
                    self.bad.append(["not erased", off + i])
                    break
            self.op()
            for i in range(len(buf)):
                if self.cut_at and self.ops == self.cut_at and i == len(buf) // 2:
                    raise Cut()            # torn: the first half is programmed
                s[off + i] &= buf[i]
            return 0
        if cmd == 5:
            return 0


def pieces():
    ts, b, tot = man.table_size(M), M["block"], man.wire_size(M)
    off = 0
    while off < tot:
        end = min((off // b + 1) * b, ts) if off < ts else min(ts + ((off - ts) // b + 1) * b, tot)
        yield off, IMAGE[off:end]
        off = end


def update(rom, d):
    st = RomStage(d, M, 1, io=rom)
    for off, data in pieces():
        if off + len(data) > st.next_offset():
            st.accept(off, data)
    for _ in st.check_files():
        pass
    return st


def clear(d):
    for n in os.listdir(d):
        os.remove(d + "/" + n)


out = {}
for unit in (1024, -22):               # erase units of 1 KiB; a partition erased whole
    d = WORK + "/u%d" % unit
    os.mkdir(d)
    rom = Rom(8192, unit, 16)
    rom.seg[1][:len(BODY)] = bytes(len(BODY))    # an older image: bytes to erase first
    golden = bytes(rom.seg[1])
    update(rom, d)
    ok_full = bytes(rom.seg[1][:len(BODY)]) == BODY and not rom.bad
    total = rom.ops
    cuts = []
    for k in range(1, total + 1):
        clear(d)
        rom = Rom(8192, unit, 16)
        rom.seg[1][:] = golden
        rom.cut_at = k
        try:
            update(rom, d)
            cuts.append([k, "no cut"])
            continue
        except Cut:
            pass
        rom.cut_at = 0
        resumed_from = RomStage(d, M, 1, io=rom).next_offset()
        try:
            update(rom, d)
            res = bytes(rom.seg[1][:len(BODY)]) == BODY and not rom.bad
        except (man.Refused, ChunkError) as e:
            res = repr(e) + repr(rom.bad[:3])
        cuts.append([k, res, resumed_from])
    out[str(unit)] = {"ok": ok_full, "ops": total, "cuts": cuts}
print(json.dumps(out))
"""


def test_romfs_partition_path_power_cut_at_every_erase_and_write(tmp_path):
    """PartRom (a board's ROMFS partition through vfs.rom_ioctl) on the emulated partition:
    the image lands whole with only erased bytes written; a cut at every erase and write,
    then the resume, still gives exactly the signed image, and a resume after a cut past
    the first erase unit does not start over (erase units of 1 KiB: 4 blocks of 256)."""
    path = powercut_inputs(tmp_path, kind="romfs")
    work = tmp_path / "work"
    work.mkdir()
    code = "INPUT = %r\nWORK = %r\n" % (path, str(work)) + PARTITION
    res = json.loads(run_mp(code, timeout=300, heapsize="8M").strip().splitlines()[-1])
    for unit, r in res.items():
        assert r["ok"], unit
        assert len(r["cuts"]) == r["ops"] and r["ops"] >= 4, (unit, r["ops"])
        bad = [c for c in r["cuts"] if c[1] is not True]
        assert not bad, (unit, bad)
    # resumed downloads keep the erase units already written (the table is 16 x blocks)
    table = max(c[2] for c in res["-22"]["cuts"])
    assert max(c[2] for c in res["1024"]["cuts"]) > table + 1024, res["1024"]["cuts"]
