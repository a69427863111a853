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
    # the unix port has no usable ROMFS partition: files, and it says why
    assert "copying the compiled files" in r.stdout, r.stdout
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


class BoardLoop:
    """The virtual board powered and running its firmware as a board does: the bootstrap
    at power-up; when the firmware resets (an OTA reboot exits the unix port), the board
    is powered up again on the same filesystem."""

    def __init__(self, flash, link):
        import threading
        self.flash, self.link = str(flash), link
        self.boots = 0
        self.out = []
        self.stop_ = False
        self.proc = self.run = None
        self.th = threading.Thread(target=self._loop, daemon=True)
        self.th.start()

    def _loop(self):
        while not self.stop_:
            self.proc = vboard.start(self.flash, self.link, heap="1M")
            self.boots += 1
            self.run = subprocess.Popen([deploy.mpremote(), "connect", self.link, "resume", "exec",
                                         "import boot; boot.start()"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in self.run.stdout:
                self.out.append(line)
            self.run.wait()
            vboard.stop(self.proc)

    def stop(self):
        self.stop_ = True
        if self.run and self.run.poll() is None:
            self.run.kill()
        if self.proc:
            vboard.stop(self.proc)
        self.th.join(20)


def test_deployed_board_takes_an_ota_update_and_rolls_a_bad_one_back(tmp_path):
    """lipari deploy with the OTA key, then the deployed firmware (started by its bootstrap)
    takes release 0.2.0 from lipari ota push through Mosquitto, then rolls back 0.2.1,
    which crashes at boot."""
    from conftest_broker import Mosquitto
    from ota_harness import FAST_MQTT, FAST_SESSION, FAST_OTA, patched_tree, wait_for
    from headend import meter_net, ota
    from headend.store import Store
    broker = Mosquitto(tmp_path / "broker", users={"headend": "headend-pw", "m1": "m1-pw"}).start()
    loop = None
    try:
        keys = str(tmp_path / "keys")
        ota.keygen(keys)
        build = str(tmp_path / "mpy")
        assert lipari("deploy", "--compile-only", "--build", build).returncode == 0
        creds = meter_net.write_creds(str(tmp_path / "creds.json"), "m1", "m1-pw", os.urandom(32),
                                      mqtt=FAST_MQTT, session=FAST_SESSION)
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps({"broker": "127.0.0.1:%d" % broker.port, "id": "m1",
                                   "creds": "creds.json", "transport": "wifi", "speed": 20,
                                   "interval": 60, "print": "none", "ota": FAST_OTA}))
        flash = tmp_path / "flash"
        link = str(tmp_path / "vm1")
        proc = vboard.start(str(flash), link)
        try:
            r = lipari("deploy", "--port", link, "--board", "unix_sim_3ph", "--build", build,
                       "--no-reset", "--config", str(cfg), "--pub", keys + "/ota.pub")
            assert r.returncode == 0, r.stdout + r.stderr
            r = subprocess.run([deploy.mpremote(), "connect", link, "resume", "fs", "cp", creds,
                                ":creds.json"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            vboard.stop(proc)
        assert (flash / "ota.pub").read_text().strip() == open(keys + "/ota.pub").read().strip()
        loop = BoardLoop(flash, link)
        rels = str(tmp_path / "releases")

        def release(version, src=None):
            args = ["ota", "release", "--key", keys + "/ota.key", "--board", "unix_sim_3ph",
                    "--version", version, "--out", rels, "--trial-s", "120"]
            r = lipari(*(args + (["--src", src] if src else [])), timeout=120)
            assert r.returncode == 0, r.stderr
            return os.path.join(rels, version)

        def push(rel):
            return lipari("ota", "push", rel, "--meter", "m1", "--db", "sqlite:///%s" % (tmp_path / "h.db"),
                          "--port", str(broker.port), "--user", "headend", "--password", "headend-pw",
                          "--pub", keys + "/ota.pub", "--stage-timeout", "150", timeout=200)
        good = release("0.2.0")
        r = push(good)
        assert r.returncode == 0, r.stdout + r.stderr + "".join(loop.out[-20:])
        assert '"m1": ["confirmed"' in r.stdout
        bad = release("0.2.1", patched_tree(tmp_path, "crash", {
            "main.py": ("import sys\n", "import sys\nraise RuntimeError('0.2.1 is broken')\n")}))
        r = push(bad)
        assert r.returncode == 1 and "crashed at boot" in r.stdout, r.stdout + "".join(loop.out[-20:])
        # the board runs 0.2.0 again from slot b, confirmed; its flash says so
        sys.path.insert(0, os.path.join(ROOT, "firmware"))
        import boot
        sys.path.pop(0)
        cwd = os.getcwd()
        os.chdir(str(flash))
        try:
            rec = boot.read_record()
        finally:
            os.chdir(cwd)
        assert rec["slot"] == 1 and rec["state"] == 0 and rec["last"] == 2, rec
        st = Store("sqlite:///%s" % (tmp_path / "h.db"))
        from headend import ota_store
        s = ota_store.meter_state(st, "m1")["state"]
        st.close()
        assert s["fw"] == "0.2.0" and s["state"] == "rolled_back", s
        assert loop.boots >= 4          # first boot, the update, the crashed trial, back
    finally:
        if loop:
            loop.stop()
        broker.stop()
