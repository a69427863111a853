"""OTA of the `romfs` payload kind (docs/ota.md): a release whose payload is the board's
ROMFS image (`lipari ota release --kind romfs`), staged into the other ROMFS slot and
mounted at /rom by the bootstrap.

- end to end through Mosquitto, from `lipari ota push` to virtual meters deployed from a
  ROMFS image (fw/a.rom, mounted with vfs.VfsRom on the unix port): a good update is
  confirmed and runs from the new image, one that crashes at boot rolls back;
- a power cut at every flash write of a ROMFS update (tests/ota_powercut_mp.py, the
  unix board's image file on littlefs);
- the board path (a ROMFS partition through vfs.rom_ioctl) against an emulated partition
  with NOR-flash semantics (erase units, writes that only clear bits) and a power cut at
  every erase and write: the documented API, not hardware.
"""
import json
import os
import shutil

import pytest

from ota_harness import OtaFleet, patched_tree, wait_for
from test_ota_e2e import energy_intact, settled

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                reason="mosquitto not installed (make setup installs it)")


@pytest.fixture
def fleet(tmp_path):
    f = OtaFleet(tmp_path, ["m1", "m2"])
    yield f
    f.close()


def test_romfs_update_confirmed_and_a_crashing_one_rolled_back(fleet, tmp_path):
    f = fleet
    good = f.meter("m1", romfs=True)
    crash = f.meter("m2", romfs=True, profile="pv")
    rel = f.release("0.2.0", kind="romfs")
    rel_crash = f.release("0.2.1", kind="romfs", src=patched_tree(tmp_path, "crash", {
        "main.py": ("import sys\n", "import sys\nraise RuntimeError('release 0.2.1 is broken')\n")}))
    for r in (rel, rel_crash):
        m = json.load(open(os.path.join(r, "manifest.json")))
        assert m["kind"] == "romfs" and m["dir_size"] == 0
        img = open(os.path.join(r, "image.bin"), "rb").read()
        assert img[len(img) - m["body_size"]:][:3] == b"\xd2\xcd\x31"   # the body: an image
    assert good.running_version() == "0.1.0" and not os.path.isdir(os.path.join(good.dir, "fw", "a"))
    wait_for(lambda: all(len(m.intervals()) >= 2 for m in (good, crash)), 60, "metering")
    procs = [f.push_bg(rel, "m1"), f.push_bg(rel_crash, "m2")]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 1], outs
    s1 = wait_for(lambda: settled(f, "m1", "confirmed"), 30, "m1 confirmed")
    assert s1["fw"] == "0.2.0" and s1["slot"] == "b"
    s2 = wait_for(lambda: settled(f, "m2", "rolled_back"), 30, "m2 rolled back")
    assert s2["fw"] == "0.1.0" and "crashed at boot" in s2["reason"] and s2["target"] == "0.2.1"
    # the new firmware is the image in slot b: no .mpy files were staged anywhere
    b = os.path.join(good.dir, "fw", "b")
    assert os.path.getsize(b + ".rom") == json.load(open(os.path.join(rel, "manifest.json")))["body_size"]
    assert not os.path.isdir(b) or not os.listdir(b)
    assert good.running_version() == "0.2.0" and good.record()["state"] == 0
    assert crash.running_version() == "0.1.0" and crash.record()["slot"] == 0
    assert crash.record()["last"] == 2
    n2 = len(crash.intervals())
    wait_for(lambda: len(crash.intervals()) > n2 + 1, 60, "metering after the rollback")
    for mid in ("m1", "m2"):
        energy_intact(f, mid)
    assert not good.errors() and len(crash.errors()) == 1, (good.errors(), crash.errors())
