"""Every runner passes SIGTERM and SIGINT on and leaves nothing behind (issue 8).

- `lipari meter` on a broker: SIGTERM and Ctrl-C (SIGINT) are a clean shutdown - the
  firmware publishes its offline status, sends MQTT DISCONNECT (the broker logs a clean
  disconnect, not a lost connection), checkpoints (the next start continues its
  registers) - and no process is left (the firmware ran in its own session);
- `lipari vboard`: socat and the REPL it runs end with it;
- the emulators' hosts (`python -m sim.modem`, `python -m sim.plc`) end and remove their
  pty link;
- `lipari system` with a real meter: after SIGTERM the meter says goodbye to the broker
  (the meters stop first, the broker last) and nothing of it is left.
Processes are found by a unique path in their command line (the test's tmp directory).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from headend import ROOT

needs_broker = pytest.mark.skipif(not shutil.which("mosquitto"), reason="mosquitto not installed")


def procs_with(text):
    """pids (not zombies) whose command line or working directory contains text."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open("/proc/%s/stat" % d) as f:
                state = f.read().rsplit(")", 1)[-1].split()[0]
            cmd += " cwd=" + os.readlink("/proc/%s/cwd" % d)
        except OSError:
            continue
        if text in cmd and state != "Z":
            out.append((int(d), cmd))
    return out


def gone(text, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = procs_with(text)
        if not left:
            return []
        time.sleep(0.1)
    return left


def read_until(p, pred, timeout_s, lines):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ln = p.stdout.readline()
        if not ln:
            break
        lines.append(ln)
        if pred(ln):
            return True
    return False


def meter_argv(broker, creds, state, days=None):
    a = [sys.executable, "-m", "headend.cli", "meter", "--broker", "127.0.0.1:%d" % broker.port,
         "--transport", "wifi", "--id", "m1", "--creds", creds, "--speed", "60",
         "--interval", "60", "--state", state, "--json"]
    return a + (["--days", str(days)] if days else [])


@needs_broker
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_lipari_meter_stops_cleanly_and_leaves_nothing(tmp_path, sig):
    from conftest_broker import Mosquitto
    from headend import meter_net
    import paho.mqtt.client as mqtt
    broker = Mosquitto(tmp_path / "broker", users={"headend": "h-pw", "m1": "m1-pw"})
    broker.start()
    creds = meter_net.write_creds(str(tmp_path / "m1.creds"), "m1", "m1-pw")
    status = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sig-watch")
    sub.username_pw_set("headend", "h-pw")
    sub.on_message = lambda c, u, m: status.append(json.loads(m.payload))
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("lipari/v1/m1/status", 1)
    sub.loop_start()
    state = str(tmp_path / "m1.flash")
    p = subprocess.Popen(meter_argv(broker, creds, state), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        assert read_until(p, lambda ln: '"interval"' in ln, 90, lines), "".join(lines)
        fw = [pid for pid, cmd in procs_with(state) if pid != p.pid]
        assert fw, procs_with(state)           # the firmware process, in its own session
        assert all(os.getsid(pid) != os.getsid(p.pid) for pid in fw)
        p.send_signal(sig)
        rest = p.communicate(timeout=30)[0]
        lines.append(rest)
        assert p.returncode == 128 + sig, "".join(lines)[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
    out = "".join(lines)
    summ = [json.loads(ln) for ln in out.splitlines() if '"summary"' in ln and ln.startswith("{")]
    assert summ and summ[-1].get("stopped") is True, out[-3000:]
    assert "stopped (clean)" in out
    assert gone(state) == [] and gone(str(tmp_path / "m1.creds")) == []
    # offline status published by the meter, and a clean DISCONNECT (no will)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (status and status[-1].get("online") is False):
        time.sleep(0.1)
    sub.loop_stop()
    sub.disconnect()
    assert status and status[0].get("online") is True and status[-1] == {"online": False}, status
    log = open(broker.log).read()
    assert "Client m1 disconnected" in log, log[-2000:]
    assert "m1 closed its connection" not in log and "exceeded timeout" not in log, log[-2000:]
    # the checkpoint: a new start continues the registers where the stop left them
    r = subprocess.run(meter_argv(broker, creds, state, days=0.001), cwd=ROOT, text=True,
                       capture_output=True, timeout=120)
    again = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    boot = [x for x in again if x.get("type") == "event" and x.get("kind") == "boot"]
    end = [x for x in again if x.get("type") == "summary"]
    assert boot and end and end[-1]["ai_wh"] >= summ[-1]["ai_wh"], r.stdout[-2000:]
    broker.stop()


def test_vboard_sigterm_ends_socat_and_the_repl(tmp_path):
    if not shutil.which("socat"):
        pytest.skip("socat not installed (make setup installs it)")
    link = str(tmp_path / "vm0")
    p = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "lipari"), "vboard",
                          "--dir", str(tmp_path / "flash"), "--link", link], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        assert read_until(p, lambda ln: "virtual board on" in ln, 30, lines), lines
        kids = procs_with(str(tmp_path / "flash"))
        assert len(kids) >= 2, kids                 # socat and the MicroPython REPL
        p.send_signal(signal.SIGTERM)
        p.wait(20)
        assert p.returncode == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
    assert gone(str(tmp_path / "flash")) == []
    assert not os.path.lexists(link)


@pytest.mark.parametrize("mod", ["sim.modem", "sim.plc"])
def test_emulator_hosts_end_on_sigterm_and_remove_their_link(tmp_path, mod):
    link = str(tmp_path / "pty")
    p = subprocess.Popen([sys.executable, "-m", mod, "--pty-link", link], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == link
        assert os.path.lexists(link)
        p.send_signal(signal.SIGTERM)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    assert not os.path.lexists(link)
    assert gone(link) == []


@needs_broker
def test_lipari_system_sigterm_leaves_no_meter_behind(tmp_path):
    work = tmp_path / "work"
    p = subprocess.Popen([sys.executable, "-m", "headend.system", "--meters", "1", "--speed", "60",
                          "--workdir", str(work), "--db", "sqlite:///%s" % (tmp_path / "s.db"),
                          "--web-port", "0", "--mqtt-port", "0", "--tls-dir", str(tmp_path / "tls"),
                          "--grace-s", "10"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    flash = str(work / "meter-1.flash")
    try:
        deadline = time.monotonic() + 90
        fw = []
        while time.monotonic() < deadline and not fw:
            fw = [x for x in procs_with(flash) if "micropython" in x[1] or "main.py" in x[1]]
            time.sleep(0.2)
        assert fw, procs_with(str(tmp_path))
        log = work / "logs" / "meter-1.log"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "event boot" not in log.read_text():
            time.sleep(0.3)
        assert "event boot" in log.read_text(), log.read_text()[-2000:]
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert gone(str(tmp_path), 15) == [], out[-2000:]
    assert "stopped (clean)" in log.read_text(), log.read_text()[-2000:]
    # the meters stop before the broker: the meter's goodbye reached it
    broker_log = (work / "logs" / "broker.log").read_text()
    assert "Client meter-1 disconnected" in broker_log, broker_log[-2000:]
