"""`make run` on the real firmware: the real `lipari system` (Mosquitto with TLS, ingest,
web, one real virtual meter: the firmware on the MicroPython unix port with simulated
chips) brings the meter's live readings and interval records into the database and onto
the dashboard, read through the API after logging in with the first admin's password as a
person would; a command from the API reaches the real firmware and its reply comes back;
SIGTERM leaves no process behind."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from test_system_run import all_dead, read_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


def login(url, user, password):
    """The login form as a browser posts it -> (session cookie, csrf token)."""
    opener = urllib.request.build_opener(NoRedirect)
    with opener.open(url + "/login", timeout=10) as r:
        page = r.read().decode()
        form_cookie = r.headers["Set-Cookie"].split(";")[0]
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    data = urllib.parse.urlencode({"username": user, "password": password, "csrf": csrf,
                                   "next": "/"}).encode()
    req = urllib.request.Request(url + "/login", data=data, method="POST", headers={
        "Cookie": form_cookie, "Content-Type": "application/x-www-form-urlencoded"})
    try:
        opener.open(req, timeout=10)
        raise AssertionError("the login did not redirect")
    except urllib.error.HTTPError as e:
        assert e.code == 303, e.read()
        cookie = [v for k, v in e.headers.items() if k.lower() == "set-cookie"
                  and v.startswith("lipari_session=")][0].split(";")[0]
    me = api(url, "/api/v1/me", cookie)
    return cookie, me["csrf"]


def api(url, path, cookie, body=None, csrf=None):
    h = {"Cookie": cookie}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h.update({"Content-Type": "application/json", "X-CSRF-Token": csrf})
    req = urllib.request.Request(url + path, data=data, headers=h,
                                 method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if r.headers["Content-Type"].startswith("application/json") \
            else body.decode()


def test_make_run_with_one_real_meter(tmp_path):
    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed (make setup installs it)")
    argv = [sys.executable, "-m", "headend.cli", "system", "--meters", "1", "--speed", "300",
            "--mqtt-port", "0", "--web-port", "0", "--workdir", str(tmp_path / "work"),
            "--tls-dir", str(tmp_path / "tls"), "--db", "sqlite:///%s" % (tmp_path / "run.db"),
            "--grace-s", "5", "--status-s", "5"]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        lines = read_until(p, "Dashboard: ", timeout_s=60)
        url = lines[-1].split("Dashboard: ")[1].strip().rstrip("/")
        password = read_until(p, "Log in as admin with password ")[-1].split("password ")[1].strip()
        cookie, csrf = login(url, "admin", password)
        assert "<title>Lipari" in api(url, "/", cookie)            # the dashboard page
        deadline = time.monotonic() + 120
        m = {}
        while time.monotonic() < deadline:
            meters = api(url, "/api/v1/meters", cookie)
            m = meters[0] if meters else {}
            if m.get("online") and (m.get("last_interval_seq") or 0) >= 2 and m.get("p_w"):
                break
            time.sleep(1)
        else:
            log = open(tmp_path / "work" / "logs" / "meter-1.log").read()[-2000:]
            pytest.fail("meter-1 never showed up with intervals: %s\n%s" % (m, log))
        assert m["id"] == "meter-1" and m["transport"] == "wifi" and m["board"]
        detail = api(url, "/api/v1/meters/meter-1", cookie)
        assert detail["rt"]["v_mv"][0] > 200000                   # ~230 V from the chips
        iv = api(url, "/api/v1/meters/meter-1/intervals", cookie)
        assert [r["seq"] for r in iv] == list(range(iv[0]["seq"], iv[0]["seq"] + len(iv)))
        assert iv[-1]["ai_wh"] >= iv[0]["ai_wh"] and iv[-1]["dur_s"] > 0
        # a command through the API, the broker's TLS listener and the real firmware
        r = api(url, "/api/v1/meters/meter-1/commands", cookie,
                {"cmd": "get", "args": {"what": "config"}, "timeout_s": 30}, csrf)
        assert r["reply"]["ok"] is True and "rt_s" in r["reply"]["result"], r
        audit = api(url, "/api/v1/meters/meter-1/audit", cookie)
        assert [(a["user_name"], a["cmd"], a["outcome"]) for a in audit][:2] == [
            ("admin", "get", "ok"), ("admin", "get", "sent")]
        started = json.load(open(tmp_path / "work" / "pids.json"))
        assert set(started) == {"broker", "ingest", "web", "meter-1", "reaper"}
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=60)[0]
        assert p.returncode == 0, rest
        assert "1/1 meters online" in "".join(lines) + rest
        assert all_dead(started) == {}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
