"""The bootstrap (firmware/boot.py), which is never updated over the air: every state of
the switch record, torn writes of it at every byte, a power cut at every flash write
of it on littlefs, and the slot it starts (run on the MicroPython unix port)."""
import json
import os
import subprocess
import sys

from comm_harness import run_mp, MP

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "firmware"))
import boot  # noqa: E402  (CPython: the same file, for building records)

R0 = {"seq": 7, "slot": 0, "state": boot.CONFIRMED, "tries": 0, "last": 1, "floor": 0x000200}

CHOOSE = r"""
import os, json, boot
os.chdir(%r)
before = {}
for i in (0, 1):
    try:
        before[i] = open('fw/rec%%d' %% i, 'rb').read()
    except OSError:
        before[i] = None
r = boot.choose()
after = {}
for i in (0, 1):
    try:
        after[i] = open('fw/rec%%d' %% i, 'rb').read()
    except OSError:
        after[i] = None
print(json.dumps({"r": r, "wrote": [i for i in (0, 1) if before[i] != after[i]],
                  "now": boot.read_record()}))
"""


def layout(tmp_path, recs, mains=("a", "b")):
    """A board directory: fw/rec0, fw/rec1 (bytes or None), slots with a main.mpy."""
    d = tmp_path / "board"
    (d / "fw").mkdir(parents=True)
    for s in mains:
        (d / "fw" / s).mkdir()
        (d / "fw" / s / "main.mpy").write_bytes(b"M")
    for i, b in enumerate(recs):
        if b is not None:
            (d / "fw" / ("rec%d" % i)).write_bytes(b)
    return str(d)


def choose(tmp_path, recs, mains=("a", "b")):
    out = run_mp(CHOOSE % layout(tmp_path, recs, mains))
    return json.loads(out.strip().splitlines()[-1])


def rec(**kw):
    r = dict(R0)
    r.update(kw)
    return r


def test_record_round_trip_and_every_corruption_is_rejected():
    b = boot.pack(R0)
    assert len(b) == 24 and boot.unpack(b) == R0
    for i in range(24):                      # every single-byte corruption
        for bit in (1, 0x80):
            bad = bytearray(b)
            bad[i] ^= bit
            assert boot.unpack(bytes(bad)) is None, (i, bit)
    assert boot.unpack(b[:23]) is None and boot.unpack(b + b"x") is None
    assert boot.unpack(boot.pack(rec(slot=2))) is None            # fields in range


def test_no_record_boots_slot_a_without_writing(tmp_path):
    o = choose(tmp_path, [None, None])
    assert o["r"]["slot"] == 0 and o["r"]["state"] == 0 and o["wrote"] == [] and o["now"] is None


def test_confirmed_slots_boot_as_they_are(tmp_path):
    for slot in (0, 1):
        o = choose(tmp_path / str(slot), [None, boot.pack(rec(slot=slot))])
        assert o["r"]["slot"] == slot and o["wrote"] == []


def test_a_trial_boots_once_then_rolls_back(tmp_path):
    t = rec(seq=8, slot=1, state=boot.TRIAL, tries=0, last=0)
    # first boot of the trial: counted (tries 1) in the other copy, then slot b starts
    o = choose(tmp_path / "t0", [boot.pack(t), boot.pack(rec(seq=7))])
    assert o["r"]["slot"] == 1 and o["r"]["tries"] == 1 and o["r"]["seq"] == 9
    assert o["wrote"] == [1] and o["now"] == o["r"]
    # a second boot still on trial (not confirmed: crash, watchdog, power cut): back to a
    t1 = dict(t, seq=9, tries=1)
    o = choose(tmp_path / "t1", [boot.pack(rec(seq=8)), boot.pack(t1)])
    assert o["r"]["slot"] == 0 and o["r"]["state"] == 0 and o["r"]["last"] == 3
    assert o["r"]["floor"] == R0["floor"] and o["wrote"] == [0]
    # a trial of an empty slot (never happens by design) does not start it
    o = choose(tmp_path / "empty", [boot.pack(t), None], mains=("a",))
    assert o["r"]["slot"] == 0 and o["r"]["last"] == 5


def test_the_newer_valid_copy_wins_and_a_bad_copy_is_ignored(tmp_path):
    a, b = boot.pack(rec(seq=10, slot=0)), boot.pack(rec(seq=11, slot=1))
    assert choose(tmp_path / "1", [a, b])["r"]["slot"] == 1
    assert choose(tmp_path / "2", [b, a])["r"]["slot"] == 1       # copy order does not matter
    bad = bytearray(b)
    bad[5] ^= 1
    assert choose(tmp_path / "3", [a, bytes(bad)])["r"]["slot"] == 0
    assert choose(tmp_path / "4", [b"LPR1", bytes(bad)])["r"]["seq"] == 0   # none valid: default


def test_a_torn_record_write_at_every_byte_leaves_the_old_or_the_new_state():
    """Write the next record over the other copy and stop after every byte count, with
    what the copy held before (an older record, or erased flash, or nothing) behind the
    torn part: the reader must see exactly the previous or the new record."""
    cur = rec(seq=20, slot=0, state=boot.TRIAL, tries=0, last=0)
    new = dict(cur, seq=21, tries=1)
    older = rec(seq=19, slot=1)
    for behind in (boot.pack(older), b"\xff" * 24, b""):
        for k in range(25):
            torn = boot.pack(new)[:k] + behind[k:]
            copies = {20 & 1: boot.pack(cur), 21 & 1: torn}
            got = None
            for i in (0, 1):
                r = boot.unpack(copies[i][:24]) if len(copies[i]) >= 24 else None
                if r is not None and (got is None or r["seq"] > got["seq"]):
                    got = r
            assert got in (cur, new), (k, behind[:4], got)
            assert (got == new) == (k == 24), k


POWERCUT = r"""
import os, json, sys
from sim.flash import FlashDev, PowerCut
import boot
def mount(dev):
    try:
        os.umount('/fl')
    except OSError:
        pass
    os.mount(os.VfsLfs2(dev), '/fl')
golden = FlashDev(4096, 32)
os.VfsLfs2.mkfs(golden)
mount(golden)
for p in ('/fl/fw', '/fl/fw/a', '/fl/fw/b'):
    os.mkdir(p)
for s in 'ab':
    open('/fl/fw/%s/main.mpy' % s, 'wb').write(b'M')
D = '/fl/fw'
r0 = boot.write_record({"seq": 0, "slot": 0, "state": 0, "tries": 0, "last": 0, "floor": 0}, D)
image = bytes(golden.data)
# the record's life in one update: switch to a trial of b, the boot counts it, confirm
steps = [dict(r0, slot=1, state=1, tries=0), dict(r0, slot=1, state=1, tries=1),
         dict(r0, slot=1, state=0, tries=0, last=1, floor=0x000200)]
out = []
cut = 1
while True:
    dev = FlashDev(4096, 32, bytearray(image))
    dev.cut_at = cut
    mount(dev)
    done = 0
    cur = boot.read_record(D)
    try:
        for s in steps:
            cur = boot.write_record(dict(s, seq=cur["seq"]), D)
            done += 1
    except PowerCut:
        pass
    else:
        break
    mount(dev.reboot())
    got = boot.read_record(D)
    exp_old = dict(steps[done - 1], seq=r0["seq"] + done) if done else r0
    exp_new = dict(steps[done], seq=r0["seq"] + done + 1)
    out.append([cut, done, got == exp_old, got == exp_new])
    cut += 1
print(json.dumps(out))
"""


def test_power_cut_at_every_flash_write_of_the_record_on_littlefs():
    res = json.loads(run_mp(POWERCUT, timeout=300, heapsize="4M").strip().splitlines()[-1])
    assert {done for _, done, _, _ in res} == {0, 1, 2}, res   # each of the 3 writes was cut
    for cut, done, old, new in res:
        assert old or new, (cut, done)        # the state before or after that write, never other


def run_boot(d):
    env = dict(os.environ, MICROPYPATH=".frozen")
    return subprocess.run([MP, "boot.py"], cwd=d, env=env, capture_output=True, text=True,
                          timeout=30)


def test_start_runs_the_chosen_slot_and_a_crashing_trial_rolls_back(tmp_path):
    d = tmp_path / "board"
    for s in ("a", "b"):
        (d / "fw" / s).mkdir(parents=True)
        (d / "fw" / s / "main.py").write_text(
            "import helper\nBOOT = None\ndef main():\n    print('slot %s', helper.X, BOOT['slot'], BOOT['state'])\n" % s)
        (d / "fw" / s / "helper.py").write_text("X = %r\n" % s)
    (d / "helper.py").write_text("X = 'root'\n")         # the slot's modules come first
    (d / "boot.py").write_text(open(os.path.join(ROOT, "firmware", "boot.py")).read())
    r = run_boot(str(d))
    assert r.returncode == 0 and r.stdout.split() == ["slot", "a", "a", "0", "0"], r.stdout + r.stderr
    (d / "fw" / "rec1").write_bytes(boot.pack(rec(seq=1, slot=1, state=boot.TRIAL, tries=0, last=0)))
    r = run_boot(str(d))
    assert r.stdout.split() == ["slot", "b", "b", "1", "1"], r.stdout + r.stderr
    # a trial whose main raises at import: rollback recorded as a crash, then a reset
    (d / "fw" / "b" / "main.py").write_text("raise RuntimeError('broken release')\n")
    (d / "fw" / "rec1").write_bytes(boot.pack(rec(seq=1, slot=1, state=boot.TRIAL, tries=0, last=0)))
    (d / "fw" / "rec0").unlink()
    r = run_boot(str(d))
    assert r.returncode == 3 and "broken release" in r.stdout, r.stdout + r.stderr
    os.chdir(str(d))
    try:
        now = boot.read_record()
    finally:
        os.chdir(ROOT)
    assert now["slot"] == 0 and now["state"] == 0 and now["last"] == 2
    r = run_boot(str(d))
    assert r.returncode == 0 and r.stdout.split()[:2] == ["slot", "a"]


def romfs_image(tmp_path, name, files):
    """A ROMFS image (mpremote's writer) of {path: text}."""
    from mpremote.romfs import make_romfs
    src = tmp_path / ("src-" + name)
    for p, text in files.items():
        (src / p).parent.mkdir(parents=True, exist_ok=True)
        (src / p).write_text(text)
    return make_romfs(str(src), mpy_cross=False)


def test_romfs_slots_are_mounted_at_rom_and_roll_back_the_same_way(tmp_path):
    """A slot without a main in its directory is its ROMFS image (fw/<slot>.rom on the
    unix board), mounted at /rom with vfs.VfsRom and first on sys.path; a slot's directory
    with a main wins over its image; a trial of an image that is not ROMFS (or has no
    main) rolls back as an empty slot; one that crashes rolls back as a crash."""
    main = ("import helper\nBOOT = None\ndef main():\n    print('rom', helper.X, BOOT['slot'], "
            "BOOT['state'], __file__)\n")
    d = tmp_path / "board"
    (d / "fw").mkdir(parents=True)
    (d / "boot.py").write_text(open(os.path.join(ROOT, "firmware", "boot.py")).read())
    (d / "helper.py").write_text("X = 'root'\n")
    for s in "ab":
        (d / "fw" / (s + ".rom")).write_bytes(romfs_image(tmp_path, s, {
            "main.py": main, "helper.py": "X = %r\n" % s}))
    r = run_boot(str(d))                               # no record: slot a, from its image
    assert r.returncode == 0 and r.stdout.split() == ["rom", "a", "0", "0", "/rom/main.py"], \
        r.stdout + r.stderr
    (d / "fw" / "rec1").write_bytes(boot.pack(rec(seq=1, slot=1, state=boot.TRIAL, tries=0, last=0)))
    r = run_boot(str(d))                               # a trial of b: its image
    assert r.stdout.split() == ["rom", "b", "1", "1", "/rom/main.py"], r.stdout + r.stderr
    (d / "fw" / "a").mkdir()                           # a directory with a main wins
    (d / "fw" / "a" / "main.py").write_text(main.replace("rom", "dir"))
    (d / "fw" / "a" / "helper.py").write_text("X = 'a-dir'\n")
    r = run_boot(str(d))                               # b tried once already: back to a
    assert r.stdout.split()[:3] == ["dir", "a-dir", "0"], r.stdout + r.stderr
    os.chdir(str(d))
    try:
        assert boot.read_record()["last"] == 3
    finally:
        os.chdir(ROOT)

    def trial_of_b(image):
        (d / "fw" / "b.rom").write_bytes(image)
        for i in (0, 1):
            if (d / "fw" / ("rec%d" % i)).exists():
                (d / "fw" / ("rec%d" % i)).unlink()
        (d / "fw" / "rec1").write_bytes(boot.pack(rec(seq=1, slot=1, state=boot.TRIAL,
                                                      tries=0, last=0)))
        r = run_boot(str(d))
        os.chdir(str(d))
        try:
            return r, boot.read_record()
        finally:
            os.chdir(ROOT)
    good = romfs_image(tmp_path, "b2", {"main.py": main, "helper.py": "X = 'b'\n"})
    for bad in (good[:len(good) // 2], b"\x00" + good[1:],
                romfs_image(tmp_path, "nomain", {"helper.py": "X = 1\n"})):
        r, now = trial_of_b(bad)
        assert now["slot"] == 0 and now["last"] == 5, (now, r.stdout, r.stderr)
        assert r.stdout.split()[:2] == ["dir", "a-dir"], r.stdout + r.stderr
    r, now = trial_of_b(romfs_image(tmp_path, "crash", {"main.py": "raise RuntimeError('bad rom')\n"}))
    assert r.returncode == 3 and "bad rom" in r.stdout and now["slot"] == 0 and now["last"] == 2
