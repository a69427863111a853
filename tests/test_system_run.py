"""`lipari system` orchestration (headend/system.py) with stub meters and ingest, the real
web server and the real brokers: it starts everything, prints the dashboard address, and
leaves no process behind after SIGTERM, after SIGKILL of itself, or when a needed part dies."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "headend_harness.py")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:        # a zombie is dead for our purpose
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start(tmp, broker="mosquitto", extra=(), meter_flags="", web_cmd=None):
    piddir = str(tmp / "pids")
    os.makedirs(piddir, exist_ok=True)
    stub = "{python} %s stub" % HARNESS
    argv = [sys.executable, "-m", "headend.system", "--broker", broker, "--mqtt-port", "0",
            "--web-port", "0", "--workdir", str(tmp / "work"), "--grace-s", "2",
            "--db", "sqlite:///%s" % (tmp / "sys.db"), "--tls-dir", str(tmp / "tls"),
            "--ingest-cmd", stub + " ingest %s --grandchild" % piddir,
            "--meter-cmd", stub + " {id} %s %s --profile {profile} --broker {broker}"
                           % (piddir, meter_flags),
            "--web-cmd", web_cmd or ("{python} -m headend.web --db {db} --host {host} "
                                     "--port {web_port} --broker {mqtt_host}:{client_port} "
                                     "{tls_args}")] + list(extra)
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    return p, piddir


def read_until(p, text, timeout_s=30):
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError("no %r within %s s; output:\n%s" % (text, timeout_s, "".join(lines)))


def pids(piddir, expect, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        files = [f for f in os.listdir(piddir) if f.endswith(".pid")]
        if len(files) >= expect:
            time.sleep(0.2)
            files = [f for f in os.listdir(piddir) if f.endswith(".pid")]
            return {f[:-4]: int(open(os.path.join(piddir, f)).read()) for f in files}
        time.sleep(0.05)
    raise AssertionError("only %s pid files" % os.listdir(piddir))


def all_dead(ps, timeout_s=8):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = {k: v for k, v in ps.items() if alive(v)}
        if not left:
            return {}
        time.sleep(0.1)
    for v in left.values():      # do not leave them behind even when the test fails
        try:
            os.kill(v, signal.SIGKILL)
        except OSError:
            pass
    return left


def test_starts_everything_and_sigterm_stops_every_process(tmp_path):
    p, piddir = start(tmp_path, "mosquitto", meter_flags="", extra=["--meters", "3"])
    try:
        lines = read_until(p, "Dashboard: ")
        out = "".join(lines)
        assert "broker (mosquitto) on 127.0.0.1:" in out
        url = lines[-1].split("Dashboard: ")[1].strip().rstrip("/")
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())["meters"] == 0
        ps = pids(piddir, 5)          # ingest + its child + 3 meters
        assert set(ps) == {"ingest", "ingest.child", "meter-1", "meter-2", "meter-3"}
        log = open(tmp_path / "work" / "logs" / "meter-3.log").read()
        assert "'--profile', 'motor', '--broker', '127.0.0.1:" in log
        started = json.load(open(tmp_path / "work" / "pids.json"))
        assert set(started) == {"broker", "ingest", "web", "meter-1", "meter-2", "meter-3",
                                "reaper"}
        ps.update({"sup-" + k: v for k, v in started.items()})
        # the broker it started works
        paho = pytest.importorskip("paho.mqtt.client")
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="probe")
        port = int(out.split("broker (mosquitto) on 127.0.0.1:")[1].split(",")[0])
        c.connect("127.0.0.1", port)
        c.disconnect()
        # ... and its TLS listener, verified with the CA made at the first run
        tls_port = int(out.split(", TLS on 127.0.0.1:")[1].split()[0])
        ca = str(tmp_path / "tls" / "ca.crt")
        assert "(CA %s)" % ca in out
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="probe-tls")
        c.tls_set(ca_certs=ca)
        c.connect("127.0.0.1", tls_port)
        c.disconnect()
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=20)[0]
        assert p.returncode == 0, rest
        assert "stopped 6 processes" in rest
        assert all_dead(ps) == {}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_stubborn_process_is_killed_and_sigkill_of_supervisor_leaves_nothing(tmp_path):
    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed")
    p, piddir = start(tmp_path, "auto", meter_flags="--ignore-term --grandchild",
                      extra=["--meters", "2"])
    try:
        out = "".join(read_until(p, "Dashboard: "))
        assert "broker (mosquitto)" in out
        ps = pids(piddir, 6)
        started = json.load(open(tmp_path / "work" / "pids.json"))
        assert len(started) == 6                 # broker, ingest, web, 2 meters, reaper
        ps.update({"sup-" + k: v for k, v in started.items() if k != "reaper"})
        assert open("/proc/%d/cmdline" % started["broker"]).read().startswith("mosquitto")
        os.kill(p.pid, signal.SIGKILL)           # no clean-up code runs in the supervisor
        p.wait(5)
        # the reaper terminates every group; the stubborn meters get SIGKILL after grace
        assert all_dead(ps, timeout_s=10) == {}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_stubborn_process_reported_on_normal_stop(tmp_path):
    p, piddir = start(tmp_path, "mosquitto", meter_flags="--ignore-term",
                      extra=["--meters", "1", "--duration", "3"])
    try:
        rest = p.communicate(timeout=30)[0]
        assert p.returncode == 0, rest
        assert "meter-1 did not stop within 2.0 s: killed" in rest
        assert all_dead(pids(piddir, 3)) == {}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_needed_part_dying_stops_everything(tmp_path):
    p, piddir = start(tmp_path, "mosquitto", extra=["--meters", "1"],
                      web_cmd="{python} %s stub web %s --exit 3" % (HARNESS, tmp_path / "pids"))
    try:
        rest = p.communicate(timeout=30)[0]
        assert p.returncode == 1
        assert "the web server exited at start" in rest and "stub web running" in rest
        time.sleep(0.5)
        assert all_dead(pids(piddir, 3)) == {}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_whole_head_end_with_protocol_level_meters(tmp_path):
    """Broker + the real ingest + the real web server, with meters that speak the MQTT
    protocol (tests/headend_harness.py fakemeter): the fleet appears online with live power
    and intervals, a command gets its reply through the API, and everything stops."""
    pytest.importorskip("paho.mqtt.client")
    fake = "{python} %s fakemeter {id} {broker} {board} {transport} {profile}" % HARNESS
    p, piddir = start(tmp_path, "auto", extra=["--meters", "3", "--meter-cmd", fake,
                                               "--ingest-cmd", "", "--status-s", "1"])
    try:
        lines = read_until(p, "Dashboard: ")
        url = lines[-1].split("Dashboard: ")[1].strip().rstrip("/")
        pw_line = read_until(p, "Log in as admin with password ")[-1]
        password = pw_line.split("password ")[1].strip()
        from headend.users import Users
        users = Users("sqlite:///%s" % (tmp_path / "sys.db"))
        assert users.verify("admin", password)["role"] == "admin"
        token = users.new_token("admin", "test")[1]
        auth = {"Authorization": "Bearer " + token}
        with pytest.raises(urllib.error.HTTPError) as e:      # nothing without a login
            urllib.request.urlopen(url + "/api/v1/meters", timeout=5)
        assert e.value.code == 401
        deadline = time.monotonic() + 20
        meters = []
        while time.monotonic() < deadline:
            with urllib.request.urlopen(urllib.request.Request(url + "/api/v1/meters",
                                                               headers=auth), timeout=5) as r:
                meters = json.loads(r.read())
            if len(meters) == 3 and all(m["online"] and m["p_w"] and
                                        (m["last_interval_seq"] or 0) >= 2 for m in meters):
                break
            time.sleep(0.3)
        else:
            pytest.fail("fleet never complete: %s\n%s" % (meters, open(
                tmp_path / "work" / "logs" / "ingest.log").read()[-1500:]))
        assert {m["transport"] for m in meters} == {"wifi", "nbiot", "plc"}
        with urllib.request.urlopen(urllib.request.Request(url + "/api/v1/meters/meter-3",
                                                           headers=auth), timeout=5) as r:
            m3 = json.loads(r.read())
        assert len(m3["rt"]["v_mv"]) == 3 and m3["meter"]["fw"] == "fake-0.1"
        req = urllib.request.Request(url + "/api/v1/meters/meter-2/commands", method="POST",
                                     data=json.dumps({"cmd": "get", "args": {"what": "x"}}).encode(),
                                     headers=dict(auth, **{"Content-Type": "application/json"}))
        with urllib.request.urlopen(req, timeout=20) as r:
            reply = json.loads(r.read())["reply"]
        assert reply["ok"] and reply["result"] == {"cmd": "get", "args": {"what": "x"}}
        started = json.load(open(tmp_path / "work" / "pids.json"))
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=30)[0]
        assert p.returncode == 0, rest
        assert "3/3 meters online, fleet " in rest
        assert all_dead(started) == {}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
