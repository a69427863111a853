"""The firmware built like a board's image (issue 7): the 32-bit unix MicroPython with the
firmware frozen in through a MicroPython manifest, every board's manifest proven by
building that port with it, the build cache, the clear errors when MicroPython or a
port's toolchain is missing, and the meter run from a ROMFS image mounted with
vfs.VfsRom on the unix port."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from fw32_harness import ROOT, fw32_binary, run_fw32
from fw32_harness import mpbuild  # (it puts the repository on sys.path)

REAL_BOARDS = sorted(mpbuild.FIRMWARE)
# every firmware file but the OTA bootstrap, which stays on the filesystem (docs/ota.md)
FW_FILES = sorted(
    os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "firmware"))
    for d, _, fs in os.walk(os.path.join(ROOT, "firmware")) for f in fs if f.endswith(".py"))
FW_FILES.remove("boot.py")
FW_MODULES = [f[:-3].replace(os.sep, ".") for f in FW_FILES]

# every firmware module imports, frozen (MICROPYPATH=.frozen, an empty working directory)
IMPORT_ALL = r"""
import sys, json
mods = %r
out = {"path": sys.path, "maxsize": sys.maxsize}
for m in mods:
    name = m[:-9] if m.endswith(".__init__") else m
    __import__(name)
    out[name] = sys.modules[name].__file__ if hasattr(sys.modules[name], "__file__") else None
import board
out["board"] = board.NAME
out["chips"] = len(board.CHIPS)
out["has_build"] = callable(board.build)
import gc
gc.collect()
a = gc.mem_alloc()
x = [None] * 10
out["list10_b"] = gc.mem_alloc() - a
print(json.dumps(out))
"""


def test_every_board_has_a_manifest_that_freezes_the_firmware_and_the_board():
    boards = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "boards")) if f.endswith(".py"))
    src, _ = mpbuild.source()
    fw = set(FW_FILES)
    for b in boards:
        files = mpbuild.manifest_files(src, mpbuild._unix_manifest(b))
        targets = {t for _, t in files}
        assert fw <= targets, (b, sorted(fw - targets))         # every firmware file
        frozen_board = "board.py" if b in mpbuild.FIRMWARE else b + ".py"
        assert frozen_board in targets, (b, sorted(targets))
        full = dict((t, f) for f, t in files)[frozen_board]
        assert os.path.realpath(full) == os.path.join(ROOT, "boards", b + ".py"), (b, full)
        assert "asyncio/core.py" in targets, b
        assert "boot.py" not in targets, b                       # the bootstrap is not frozen


@pytest.mark.parametrize("board", REAL_BOARDS)
def test_real_board_manifest_builds_the_32bit_unix_port(board, tmp_path):
    """The board's manifest, minus its port's own (which the unix port lacks), frozen
    into the 32-bit unix port: the firmware and `board` import from the image alone."""
    exe = mpbuild.unix_binary(board)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # the bootstrap on the board's filesystem, where `lipari deploy` puts it (ota.agent
    # imports it); everything else from the image
    shutil.copy(os.path.join(ROOT, "firmware", "boot.py"), cwd / "boot.py")
    p = subprocess.run([exe, "-c", IMPORT_ALL % (FW_MODULES,)], capture_output=True, text=True,
                       cwd=cwd, env=mpbuild.frozen_env(), timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["path"] == ["", ".frozen"]                        # nothing but the image
    assert r["maxsize"] == 2 ** 31 - 1 and r["list10_b"] == 112   # i386 words, 16-byte blocks
    import importlib.util
    spec = importlib.util.spec_from_file_location("b", os.path.join(ROOT, "boards", board + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert r["board"] == mod.NAME and r["chips"] == len(mod.CHIPS) and r["has_build"]
    assert r["comm.mqtt"] == "comm/mqtt.py" and r["main"] == "main.py"


def test_test_build_is_cached_by_its_inputs():
    exe = fw32_binary()
    src, key, manifest = mpbuild.unix_key(mpbuild.TEST_BUILD)
    assert os.path.basename(os.path.dirname(exe)) == "unix32-fw32-" + key
    assert mpbuild.unix_binary(mpbuild.TEST_BUILD, build=False) == exe     # no rebuild
    # the key covers every file the image freezes
    with open(os.path.join(os.path.dirname(exe), "inputs.txt")) as f:
        listed = {ln.split()[0] for ln in f.read().splitlines()[2:]}
    for m in FW_MODULES:
        assert m.replace(".", "/") + ".py" in listed, m
    assert {"unix_sim_3ph.py", "fw32_probe.py", "sim/bus.py", "asyncio/core.py"} <= listed


def test_clear_errors_without_micropython_or_a_toolchain(tmp_path, monkeypatch):
    with pytest.raises(mpbuild.BuildError, match="not a MicroPython checkout"):
        mpbuild.source(str(tmp_path))
    # no MPY_DIR, no snapshot, offline: say the three ways out
    monkeypatch.delenv("MPY_DIR", raising=False)
    monkeypatch.setattr(mpbuild, "snapshot", lambda: None)
    monkeypatch.setattr(mpbuild, "CACHE", str(tmp_path / "cache"))
    with pytest.raises(mpbuild.BuildError) as e:
        mpbuild.source(fetch=False)
    assert "MPY_DIR" in str(e.value) and "shared/vendor/micropython.tar.xz" in str(e.value)
    assert mpbuild.PINNED_TAG in str(e.value)
    # the snapshot has no stm32 port: make firmware says to pass a full checkout
    monkeypatch.undo()
    with pytest.raises(mpbuild.BuildError, match="MPY_DIR=<a full MicroPython checkout>"):
        mpbuild.firmware("stm32_stpm34_33_ct")
    # a checkout with the port but no toolchain on PATH: say which and how to get it
    src, _ = mpbuild.source()
    fake = tmp_path / "mpy"
    for d in ("py", "tools", "extmod", "ports/stm32"):
        (fake / d).mkdir(parents=True)
    (fake / "py" / "mpconfig.h").write_text("")
    os.symlink(os.path.join(src, "tools", "manifestfile.py"), fake / "tools" / "manifestfile.py")
    os.symlink(os.path.join(src, "extmod", "asyncio"), fake / "extmod" / "asyncio")
    monkeypatch.setenv("PATH", "/nonexistent")
    for board, tool in (("stm32_stpm34_33_ct", "arm-none-eabi-gcc"), ("esp32s3_stpm34_33_ct", "idf.py")):
        os.makedirs(fake / "ports" / mpbuild.FIRMWARE[board][0], exist_ok=True)
        with pytest.raises(mpbuild.BuildError) as e:
            mpbuild.firmware(board, mpy_dir=str(fake))
        assert tool in str(e.value) and "install" in str(e.value), str(e.value)
    with pytest.raises(mpbuild.BuildError, match="unix simulation board"):
        mpbuild.firmware("unix_sim_3ph", mpy_dir=str(fake))


def test_make_firmware_without_board_prints_usage():
    p = subprocess.run(["make", "-s", "firmware"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "usage: make firmware BOARD=" in p.stdout + p.stderr


ROMFS_RUN = r"""
import sys, vfs, json
with open(sys.argv[1], "rb") as f:
    img = f.read()
vfs.mount(vfs.VfsRom(img), "/rom")
sys.path[:] = ["/rom", ".frozen"]       # the image first: it must shadow the frozen copy
import main
files = {}
for name in ("main", "comm.fqueue", "metering.engine", "drivers.stpm3x", "unix_sim_3ph", "sim.bus"):
    __import__(name)
    files[name] = sys.modules[name].__file__
print(json.dumps({"files": files}))
main.main(["--board", "unix_sim_3ph", "--step", "--days", "0.01", "--interval", "60",
           "--print", "summary"])
"""


def test_meter_runs_from_a_romfs_image(tmp_path):
    img, size = mpbuild.romfs("unix_sim_3ph", out=str(tmp_path / "unix.romfs"))
    assert size > 20000
    with open(img, "rb") as f:
        assert f.read(3) == b"\xd2\xcd\x31"                    # ROMFS header
    out = run_fw32(ROMFS_RUN, heap_kib=1024, args=(img,), timeout=120)
    lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    files = lines[0]["files"]
    for name, path in files.items():
        assert path.startswith("/rom/") and path.endswith(".mpy"), (name, path)
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["intervals"] >= 4 and summary["valid"] == 7, out
    assert summary["ai_wh"] > 0
