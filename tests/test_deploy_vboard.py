"""The flashing workflow end to end: a virtual board on a pty (socat + the MicroPython unix
port's REPL) is flashed with `lipari deploy` through mpremote, exactly as a real board is,
and the deployed firmware then meters from its own filesystem."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from headend import ROOT, deploy, vboard

pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed (make setup installs it)")

BIN = os.path.dirname(sys.executable)


def lipari(*args, **kw):
    return subprocess.run([os.path.join(BIN, "lipari"), *args], capture_output=True, text=True,
                          timeout=kw.get("timeout", 120))


@pytest.fixture
def board(tmp_path):
    link = str(tmp_path / "vm0")
    # the virtual board's heap also holds the simulator (compiled from source) and, for
    # the OTA part, the MQTT session: 512k, as `lipari meter --broker` gives 384k + sim
    proc = vboard.start(str(tmp_path / "flash"), link, heap="512k")
    yield link, tmp_path / "flash"
    vboard.stop(proc)


def test_deploy_then_meter_from_the_boards_own_files(board, tmp_path):
    link, flash = board
    build = str(tmp_path / "mpy")
    r = lipari("deploy", "--compile-only", "--build", build)
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"step": True, "days": 0.02, "print": "summary"}))
    r = lipari("deploy", "--port", link, "--board", "unix_sim_3ph", "--build", build, "--no-reset",
               "--config", str(cfg), "--pub", str(tmp_path / "none.pub"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refuse every update" in r.stderr          # no OTA key: said, not hidden
    # what mpremote copied is on the board's filesystem: the bootstrap, slot a compiled
    assert (flash / "boot.py").is_file() and (flash / "board.py").is_file()
    assert (flash / "config.json").is_file() and not (flash / "main.py").exists()
    assert (flash / "fw" / "a" / "main.mpy").is_file()
    assert (flash / "fw" / "a" / "drivers" / "stpm3x.mpy").is_file()
    assert (flash / "fw" / "a" / "metering" / "engine.mpy").is_file()
    assert not (flash / "fw" / "a" / "drivers" / "stpm3x.py").exists()
    # the board runs the deployed firmware as it does at power-up: the bootstrap chooses
    # slot a, main reads /config.json (board.py is the default board module)
    code = "import boot; boot.start()"
    r = subprocess.run([deploy.mpremote(), "connect", link, "resume", "exec", code],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert summary and summary[-1]["type"] == "summary", r.stdout
    s = summary[-1]
    assert s["valid"] == 0b111 and s["cycles"] >= 1700 and s["ai_wh"] > 0
    # it imported the compiled modules from the board, not the repository's sources
    r = subprocess.run([deploy.mpremote(), "connect", link, "resume", "exec",
                        "import sys; sys.path.insert(0, 'fw/a'); import drivers.stpm3x as d; "
                        "print(d.__file__)"],
                       capture_output=True, text=True, timeout=60)
    assert "fw/a/drivers" in r.stdout, r.stdout


def test_deploy_refuses_unknown_board_and_missing_build(board, tmp_path):
    link, _ = board
    r = lipari("deploy", "--port", link, "--board", "no_such_board", "--build", str(tmp_path / "none"))
    assert r.returncode != 0 and "make mpy" in (r.stderr + r.stdout)
    build = str(tmp_path / "mpy")
    assert lipari("deploy", "--compile-only", "--build", build).returncode == 0
    r = lipari("deploy", "--port", link, "--board", "no_such_board", "--build", build)
    assert r.returncode != 0 and "unix_sim_3ph" in (r.stderr + r.stdout)
