# Runs on micropython (tests/test_ota_powercut.py): an OTA update on littlefs over the
# fault-injecting flash (sim/flash.py), with a power cut at every flash write of it, in
# turn. The update is the agent's sequence: clear the inactive slot, note the download,
# every chunk (metering checkpoints in between: it keeps running), the switch to a trial,
# the boot that counts it, the confirmation. After each cut: power-up, the bootstrap
# chooses, and we check that the chosen slot holds a complete signed firmware and that
# the energy checkpoint is the last one saved (or, if the cut hit that save, the one
# before); then the update is carried on from what is on flash, to the end.
# IN["kind"] "romfs": the release is a ROMFS image, staged into fw/b.rom (ota/rom.py) and
# slot a is the image fw/a.rom; a slot is good when its image is the signed one and the
# bootstrap mounts it.
import os
import sys
import json
import hashlib
import binascii

from sim.flash import FlashDev, PowerCut
import boot
from ota import manifest as man
from ota.stage import Stage, ChunkError, rmtree, makedirs, remove, size, DL
from ota.rom import RomStage
from metering.store import Store

IN = json.loads(open(INPUT).read())     # INPUT: set by the test before exec
MP = "/fl"
D = MP + "/fw"
M = man.check_fields(json.loads(IN["manifest"]))
IMAGE = binascii.unhexlify(IN["image"])
ROM = IN.get("kind") == "romfs"
BLOCKS = 128


def mount(dev):
    try:
        os.umount(MP)
    except OSError:
        pass
    os.mount(os.VfsLfs2(dev), MP)


def pieces():
    ts, b, tot = man.table_size(M), M["block"], man.wire_size(M)
    off = 0
    while off < tot:
        end = min((off // b + 1) * b, ts) if off < ts else min(ts + ((off - ts) // b + 1) * b, tot)
        yield off, IMAGE[off:end]
        off = end


def slot_ok(slot, files):
    """Every file of a signed directory [[path, size, sha256]] is in the slot, intact
    (romfs: files is the image's [size, sha256], the slot is fw/<slot>.rom)."""
    if ROM:
        try:
            data = open("%s/%s.rom" % (D, "ab"[slot]), "rb").read()
        except OSError:
            return False
        return [len(data), binascii.hexlify(hashlib.sha256(data).digest()).decode()] == files
    for p, n, h in files:
        try:
            data = open("%s/%s/%s" % (D, "ab"[slot], p), "rb").read()
        except OSError:
            return False
        if len(data) != n or binascii.hexlify(hashlib.sha256(data).digest()).decode() != h:
            return False
    return True


def energy(k):
    return b"energy %08d" % k


class Update:
    """The agent's writes, step by step (ota/agent.py: _prepare, _fetch, _switch, trial)."""

    def __init__(self, store, saved):
        self.store = store
        self.saved = saved

    def checkpoint(self):
        k = len(self.saved)
        self.saved.append(None)            # a save is under way
        self.store.save(energy(k))
        self.saved[-1] = k

    def prepare(self):
        rmtree(D + "/b")
        remove(D + "/b.rom")
        remove(D + "/b.json")
        makedirs(D + "/b")
        with open(D + "/" + DL, "w") as f:
            f.write(json.dumps({"slot": 1}))

    def fetch(self, st):
        i = 0
        for off, data in pieces():
            if off + len(data) <= st.next_offset():
                continue
            st.accept(off, data)
            i += 1
            if i % 3 == 0:
                self.checkpoint()

    def switch(self, st):
        with open(D + "/b.json", "w") as f:
            f.write(json.dumps({"version": M["version"]}))
        r = boot.read_record(D)
        boot.write_record(dict(r, slot=1, state=boot.TRIAL, tries=0, last=0), D)
        st.cleanup()

    def confirm(self):
        r = boot.read_record(D)
        boot.write_record(dict(r, state=boot.CONFIRMED, tries=0, last=1), D)

    def run(self, resume=False):
        """From the state on flash to the end (resume=False: from the start)."""
        r = boot.read_record(D)
        if r["slot"] == 1 and r["state"] == boot.CONFIRMED:
            return
        if r["slot"] == 1 and r["state"] == boot.TRIAL:
            self.confirm()                # running the trial (the power-up counted it)
            return
        if not (resume and size(D + "/" + DL) > 0):
            self.prepare()
        st = RomStage(D, M, 1) if ROM else Stage(D, M, D + "/b")
        self.fetch(st)
        for _ in st.check_files():
            pass
        self.switch(st)
        boot.choose(D)                    # reboot into the trial: the boot counts it
        self.checkpoint()                 # metering on the new firmware
        self.confirm()


# the meter as deployed: slot a (the old signed firmware), record, an energy checkpoint
golden = FlashDev(4096, BLOCKS)
os.VfsLfs2.mkfs(golden)
mount(golden)
for p in (D, D + "/a"):
    os.mkdir(p)
if ROM:
    with open(D + "/a.rom", "wb") as f:
        f.write(binascii.unhexlify(IN["base"]))
for p, data in ([] if ROM else IN["base"]):
    makedirs((D + "/a/" + p).rsplit("/", 1)[0])
    with open(D + "/a/" + p, "wb") as f:
        f.write(binascii.unhexlify(data))
boot.write_record({"seq": 0, "slot": 0, "state": 0, "tries": 0, "last": 0, "floor": 0}, D)
Store(MP, "meter").save(energy(0))
image = bytes(golden.data)

def signed_dir(files):
    # what the release signer hashed (the host passes the files): [path, size, sha256]
    if ROM:
        data = binascii.unhexlify(files)
        return [len(data), binascii.hexlify(hashlib.sha256(data).digest()).decode()]
    return [[p, len(binascii.unhexlify(d)), binascii.hexlify(hashlib.sha256(
        binascii.unhexlify(d)).digest()).decode()] for p, d in files]


base_dir = signed_dir(IN["base"])
new_dir = signed_dir(IN["new"])

results = []
cut = 1
while True:
    dev = FlashDev(4096, BLOCKS, bytearray(image))
    dev.cut_at = cut
    mount(dev)
    store = Store(MP, "meter")
    store.load()
    saved = [0]
    u = Update(store, saved)
    try:
        u.run()
    except Exception:                      # PowerCut, or the EIO (StoreError) littlefs
        if not dev.dead:                   # or the store made of it: the cut, nothing else
            raise
    else:
        break                              # the whole update ran: every write was cut once
    ops = dev.ops
    # power-up
    mount(dev.reboot())
    r = boot.choose(D)
    good = slot_ok(r["slot"], base_dir if r["slot"] == 0 else new_dir) and \
        boot.slot_path(r["slot"], D) is not None       # what the bootstrap would start
    st = Store(MP, "meter")
    got = st.load()
    done = [k for k in saved if k is not None]
    ok_energy = got in (energy(done[-1]), energy(done[-1] + 1) if saved[-1] is None else None)
    # carry on from what is on flash, to the end
    u = Update(st, done + ([done[-1] + 1] if got == energy(done[-1] + 1) else []))
    try:
        u.run(resume=True)
        r2 = boot.read_record(D)
        finished = r2["slot"] == 1 and r2["state"] == 0 and slot_ok(1, new_dir) or \
            "record %r, slot b intact %r" % (r2, slot_ok(1, new_dir))
    except (ChunkError, man.Refused, OSError) as e:
        finished = "error %r" % (e,)
    results.append([cut, r["slot"], good, ok_energy, finished])
    cut += 1
print(json.dumps({"cuts": results, "writes": dev.ops}))
