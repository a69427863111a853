"""`lipari deploy` on a board with a ROMFS partition (issue 7): the image goes to the
partition with `mpremote romfs deploy`, the OTA bootstrap, board, key and config to the
filesystem, and slot a stays empty (the bootstrap's `import main` then finds
/rom/main.mpy); no partition or one too small means the compiled files in slot a, with
the reason said. mpremote is replaced by a
script that answers `romfs query` like a board and records what it was asked to do (a
real partition needs real hardware; the pty virtual board's is a 4-byte placeholder,
tests/test_deploy_vboard.py)."""
import json
import os
import stat
import subprocess
import sys

import pytest

from headend import deploy
from fw32_harness import mpbuild  # (it puts the repository on sys.path)

FAKE = r"""#!%s
import json, sys
log = %r
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
if "query" in sys.argv:
    print(%r)
"""


def fake_mpremote(tmp_path, query_out):
    p = tmp_path / "mpremote"
    log = str(tmp_path / "calls.jsonl")
    p.write_text(FAKE % (sys.executable, log, query_out))
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(p), log


def calls(log):
    with open(log) as f:
        return [json.loads(ln) for ln in f]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("romfs")
    return mpbuild.romfs("stm32_stpm34_33_ct", out=str(d / "stm32.romfs"))


def test_board_with_a_big_partition_gets_the_image_and_a_stub(tmp_path, image, monkeypatch):
    img, size = image
    mp, log = fake_mpremote(tmp_path, "ROMFS0 partition has size %d bytes (64 blocks of "
                            "4096 bytes each)" % (size + 4096))
    monkeypatch.setattr(deploy, "mpremote", lambda: mp)
    build = str(tmp_path / "mpy")
    assert deploy.main(["--compile-only", "--build", build]) == 0
    rc = deploy.main(["--port", "/dev/ttyACM9", "--board", "stm32_stpm34_33_ct", "--build", build,
                      "--romfs-image", img, "--pub", str(tmp_path / "none.pub")])
    assert rc == 0
    c = calls(log)
    assert c[0][-2:] == ["romfs", "query"]
    deployed = c[1]
    i = deployed.index("romfs")
    assert deployed[i:i + 3] == ["romfs", "deploy", img]
    assert ":boot.py" in deployed and ":board.py" in deployed     # the bootstrap, the board
    assert not any(a.startswith(":fw/a/") for a in deployed)       # slot a stays empty
    assert any("rm(p)" in a for a in deployed)                     # old slots cleared first
    assert deployed[-1] == "soft-reset"
    # what the image holds: the firmware's main and the board, as the bootstrap imports them
    with open(img, "rb") as f:
        data = f.read()
    assert b"main.mpy" in data and b"board.mpy" in data and b"fqueue.mpy" in data


@pytest.mark.parametrize("query, why", [
    ("No ROMFS partitions available", "no ROMFS partition"),
    ("ROMFS is not enabled on this device", "no ROMFS partition"),
    ("ROMFS0 partition has size 4096 bytes (1 blocks of 4096 bytes each)", "too small"),
])
def test_otherwise_the_compiled_files_with_the_reason(tmp_path, image, monkeypatch, capsys,
                                                      query, why):
    img, _ = image
    mp, log = fake_mpremote(tmp_path, query)
    monkeypatch.setattr(deploy, "mpremote", lambda: mp)
    build = str(tmp_path / "mpy")
    assert deploy.main(["--compile-only", "--build", build]) == 0
    rc = deploy.main(["--port", "/dev/ttyACM9", "--board", "stm32_stpm34_33_ct", "--build", build,
                      "--romfs-image", img, "--no-reset", "--pub", str(tmp_path / "none.pub")])
    assert rc == 0
    out = capsys.readouterr().out
    assert why in out and "copying the compiled files" in out, out
    files = calls(log)[-1]
    assert "romfs" not in files and ":fw/a/drivers/stpm3x.mpy" in files and ":board.py" in files


def test_files_flag_skips_the_query(tmp_path, image, monkeypatch):
    mp, log = fake_mpremote(tmp_path, "ROMFS0 partition has size 999999 bytes")
    monkeypatch.setattr(deploy, "mpremote", lambda: mp)
    build = str(tmp_path / "mpy")
    assert deploy.main(["--compile-only", "--build", build]) == 0
    assert deploy.main(["--port", "/dev/x", "--board", "stm32_stpm34_33_ct", "--build", build,
                        "--files", "--no-reset", "--pub", str(tmp_path / "none.pub")]) == 0
    c = calls(log)
    assert len(c) == 1 and "romfs" not in c[0]
