"""Accounts, roles, CSRF, tokens, the audit log and the login limit of the web server
(headend/web/auth.py, headend/users.py, headend/audit.py, headend/policy.py), over real
HTTP. The route table is walked, so that a route added later cannot escape the checks."""
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from headend_harness import fill
from headend.store import Store
from headend.users import Users
from headend.web import serve
from headend.web.app import create_app, route_table
from headend.web.auth import PUBLIC, is_public
from headend.web.server import WebServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
# A valid body for every state-changing route (so that only the role check can refuse).
# A new route must add one here: the walk fails on a route it has no body for.
BODIES = {
    ("POST", "/api/v1/meters/{meter}/commands"): {"cmd": "ping"},
    ("POST", "/api/v1/users"): {"name": "newbie", "role": "viewer"},
    ("PATCH", "/api/v1/users/{name}"): {"role": "viewer"},
    ("POST", "/api/v1/users/{name}/tokens"): {"label": "x"},
    ("POST", "/api/v1/ota/rollouts"): {"release": "9.9.9", "meters": ["m-house-1"]},
    ("POST", "/logout"): None,
    ("POST", "/login"): None,
}
PARAMS = {"meter": "m-house-1", "name": "vera"}


class Recorder:
    """A commander that records what would have been signed and sent."""

    def __init__(self):
        self.calls = []

    def send(self, meter_id, cmd, args, timeout_s):
        self.calls.append((meter_id, cmd, args))
        return {"ok": True, "result": {"cmd": cmd}}


@pytest.fixture
def site(tmp_path):
    store = Store("sqlite:///%s" % (tmp_path / "a.db"))
    fill(store, days=1)
    srv = serve(store, port=0, poll_s=0.1)
    srv.state.commander = Recorder()
    users = srv.state.users
    tokens = {}
    for name, role, meters in (("ada", "admin", None), ("otto", "operator", None),
                               ("vera", "viewer", None), ("shop", "viewer", ["m-house-1"])):
        users.add(name, role, name + "-password", meters)
        tokens[name] = users.new_token(name, "test")[1]
    srv.tokens = tokens
    yield srv
    srv.stop()
    store.close()


def call(srv, method, path, body=None, token=None, headers=None, raw=False, data=None):
    h = dict(headers or {})
    if token:
        h["Authorization"] = "Bearer " + token
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(srv.url + path, data=data, method=method, headers=h)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=15) as r:
            b = r.read()
            return r.status, (b if raw else _j(b)), r.headers
    except urllib.error.HTTPError as e:
        b = e.read()
        return e.code, (b if raw else _j(b)), e.headers


def _j(b):
    try:
        return json.loads(b)
    except ValueError:
        return b.decode(errors="replace")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


def routes(srv):
    out = []
    for path, methods, _ in route_table(srv.app):
        for m in methods - {"HEAD"}:
            out.append((m, path, re.sub(r"\{(\w+)\}", lambda x: PARAMS[x.group(1)], path)))
    return sorted(out)


def test_nothing_but_the_public_paths_without_a_login(site):
    srv = site
    seen = 0
    for method, path, url in routes(srv):
        if is_public(path) or (method, path) == ("POST", "/login"):
            continue
        seen += 1
        st, body, hdr = call(srv, method, url, BODIES.get((method, path), {}))
        if path.startswith("/api/") or method != "GET":
            assert st == 401, (method, path, st, body)
            assert "log in first" in body["error"]
        else:                                          # a page: to the login form
            assert st == 303 and hdr["Location"].startswith("/login?next="), (method, path, st)
    assert seen >= 25
    for path in ("/healthz", "/openapi.json", "/login", "/static/app.css"):
        assert call(srv, "GET", path, raw=True)[0] == 200, path
    # a made-up token or session is no login either
    assert call(srv, "GET", "/api/v1/meters", token="lip_forged")[0] == 401
    assert call(srv, "GET", "/api/v1/meters",
                headers={"Cookie": "lipari_session=forged"})[0] == 401
    assert srv.state.commander.calls == []


def test_every_state_change_refused_without_login_or_with_too_small_a_role(site):
    """Walks every POST/PUT/PATCH/DELETE route: no session or token -> 401; a viewer's
    token -> 403; nothing reaches a meter and nothing but refusals enter the audit log."""
    srv = site
    changing = [(m, p, u) for m, p, u in routes(srv)
                if m in STATE_CHANGING and (m, p) not in (("POST", "/login"),
                                                          ("POST", "/logout"))]
    assert len(changing) >= 4
    for method, path, url in changing:
        assert (method, path) in BODIES, "add a valid body for %s %s to BODIES" % (method, path)
        body = BODIES[(method, path)]
        st, b, _ = call(srv, method, url, body)
        assert st == 401, (method, path, st, b)
        st, b, _ = call(srv, method, url, body, srv.tokens["vera"])
        assert st == 403, (method, path, st, b)
        assert "vera is viewer" in b["error"]
    # an operator cannot do what needs an admin
    for cmd, args in (("calibrate", {"phase": 1}), ("preset", {"ai_wh": 1}), ("reset", {}),
                      ("set", {"tariff": {}}),
                      ("set", {"rt_s": 5, "interval_s": 60}), ("ota", {"url": "x"}),
                      ("anything_new", {})):
        st, b, _ = call(srv, "POST", "/api/v1/meters/m-house-1/commands",
                        {"cmd": cmd, "args": args}, srv.tokens["otto"])
        assert st == 403 and "needs the admin role; otto is operator" in b["error"], (cmd, b)
    for m, p, u in changing:
        if p.startswith(("/api/v1/users", "/api/v1/ota")):         # admin only
            assert call(srv, m, u, BODIES[(m, p)], srv.tokens["otto"])[0] == 403, p
    assert srv.state.commander.calls == []               # nothing was signed or sent
    outcomes = {e["outcome"] for e in srv.state.audit.entries(limit=1000)}
    assert outcomes == {"denied"}


def test_operator_and_admin_commands_reach_the_meter_and_the_audit_log(site):
    srv = site
    for cmd, args in (("ping", {}), ("get", {"what": "readings"}), ("time", {"t": 1}),
                      ("reboot", {}), ("set", {"rt_s": 30, "payload": "json"})):
        st, b, _ = call(srv, "POST", "/api/v1/meters/m-house-1/commands",
                        {"cmd": cmd, "args": args}, srv.tokens["otto"])
        assert st == 200 and b["reply"]["ok"], (cmd, b)
    st, b, _ = call(srv, "POST", "/api/v1/meters/m-pv-2/commands",
                    {"cmd": "calibrate", "args": {"phase": 1}}, srv.tokens["ada"])
    assert st == 200
    assert [c[1] for c in srv.state.commander.calls] == ["ping", "get", "time", "reboot", "set",
                                                         "calibrate"]
    st, log, _ = call(srv, "GET", "/api/v1/meters/m-pv-2/audit", token=srv.tokens["vera"])
    assert [(e["user_name"], e["cmd"], e["outcome"], e["action"]) for e in log] == [
        ("ada", "calibrate", "ok", "calibration"), ("ada", "calibrate", "sent", "calibration")]
    assert log[0]["answer"] == {"ok": True, "result": {"cmd": "calibrate"}}
    assert log[0]["ref"] == log[1]["ref"] and log[0]["via"] == "token"
    st, text, hdr = call(srv, "GET", "/api/v1/audit.csv", token=srv.tokens["ada"], raw=True)
    lines = text.decode().splitlines()
    assert st == 200 and "attachment" in hdr["Content-Disposition"]
    assert lines[0].startswith("id,t,t_utc,user_name") and len(lines) == 1 + 12
    assert ",otto,operator,token,m-house-1,setting,set," in lines[-3]
    st, text, _ = call(srv, "GET", "/api/v1/audit.csv?meter=m-pv-2", token=srv.tokens["ada"],
                       raw=True)
    assert len(text.decode().splitlines()) == 1 + 2
    assert call(srv, "GET", "/api/v1/audit?meter=m-pv-2", token=srv.tokens["shop"])[0] == 404


def test_audit_log_is_append_only(site):
    srv = site
    call(srv, "POST", "/api/v1/meters/m-house-1/commands", {"cmd": "ping"}, srv.tokens["otto"])
    db = sqlite3.connect(srv.state.store.url[len("sqlite:///"):])
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET user_name = 'nobody'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit")
    db.close()
    assert len(srv.state.audit.entries()) == 2


def login(srv, user, password, ip_headers=None):
    """POST the login form as a browser does; -> (status, session cookie or None, csrf)."""
    st, page, hdr = call(srv, "GET", "/login", raw=True)
    form_csrf = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
    cookie = hdr["Set-Cookie"].split(";")[0]
    data = urllib.parse.urlencode({"username": user, "password": password,
                                   "csrf": form_csrf, "next": "/meter/x"}).encode()
    st, _, hdr = call(srv, "POST", "/login", data=data,
                      headers=dict(ip_headers or {}, Cookie=cookie,
                                   **{"Content-Type": "application/x-www-form-urlencoded"}))
    sess = None
    for k, v in hdr.items():
        if k.lower() == "set-cookie" and v.startswith("lipari_session="):
            sess = v
    return st, sess, hdr


def test_session_cookie_and_csrf(site):
    srv = site
    st, sess, hdr = login(srv, "otto", "otto-password")
    assert st == 303 and hdr["Location"] == "/meter/x"
    flags = [f.strip().lower() for f in sess.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "secure" not in flags
    cookie = sess.split(";")[0]
    st, me, _ = call(srv, "GET", "/api/v1/me", headers={"Cookie": cookie})
    assert st == 200 and me["name"] == "otto" and me["role"] == "operator" and me["csrf"]
    url = "/api/v1/meters/m-house-1/commands"
    st, b, _ = call(srv, "POST", url, {"cmd": "ping"}, headers={"Cookie": cookie})
    assert st == 403 and "X-CSRF-Token" in b["error"]
    st, b, _ = call(srv, "POST", url, {"cmd": "ping"},
                    headers={"Cookie": cookie, "X-CSRF-Token": "wrong"})
    assert st == 403
    st, b, _ = call(srv, "POST", url, {"cmd": "ping"},
                    headers={"Cookie": cookie, "X-CSRF-Token": me["csrf"]})
    assert st == 200 and srv.state.audit.entries()[0]["via"] == "session"
    # log out: the session is gone
    assert call(srv, "POST", "/logout", headers={"Cookie": cookie,
                                                 "X-CSRF-Token": me["csrf"]})[0] == 303
    assert call(srv, "GET", "/api/v1/me", headers={"Cookie": cookie})[0] == 401
    # a login form without its cookie (another site posting it) is refused
    data = urllib.parse.urlencode({"username": "otto", "password": "otto-password",
                                   "csrf": "x"}).encode()
    st, _, hdr = call(srv, "POST", "/login", data=data,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert st == 400 and "lipari_session" not in str(hdr)


def test_login_rate_limited(site):
    srv = site
    for _ in range(5):
        assert login(srv, "vera", "wrong-password")[0] == 401
    st, sess, hdr = login(srv, "vera", "vera-password")      # right, but too late
    assert st == 429 and sess is None and int(hdr["Retry-After"]) > 0
    assert login(srv, "otto", "otto-password")[0] == 303       # other users are not locked


def test_secure_cookie_behind_a_tls_proxy(tmp_path):
    store = Store("sqlite:///%s" % (tmp_path / "p.db"))
    app = create_app(store)
    srv = WebServer(app, "127.0.0.1", 0, proxy_headers=True,
                    forwarded_allow_ips="127.0.0.1").start()
    try:
        srv.state.users.add("ada", "admin", "ada-password")
        st, sess, _ = login(srv, "ada", "ada-password", {"X-Forwarded-Proto": "https"})
        assert st == 303 and "secure" in [f.strip().lower() for f in sess.split(";")]
    finally:
        srv.stop()
        store.close()


def test_a_customer_viewer_sees_only_its_own_meters(site):
    srv = site
    tok = srv.tokens["shop"]
    st, meters, _ = call(srv, "GET", "/api/v1/meters", token=tok)
    assert [m["id"] for m in meters] == ["m-house-1"]
    assert call(srv, "GET", "/api/v1/meters/m-pv-2", token=tok)[0] == 404
    assert call(srv, "GET", "/api/v1/meters/m-pv-2/intervals.csv", token=tok)[0] == 404
    assert call(srv, "GET", "/api/v1/meters/m-house-1/bill", token=tok)[0] == 200
    st, fe, _ = call(srv, "GET", "/api/v1/fleet/energy?period=day", token=tok)
    assert list(fe["per_meter_import_wh"]) == ["m-house-1"]
    st, text, _ = call(srv, "GET", "/api/v1/intervals.csv", token=tok, raw=True)
    assert {r.split(",")[0] for r in text.decode().splitlines()[1:]} == {"m-house-1"}
    assert call(srv, "GET", "/api/v1/quarantine", token=tok)[0] == 403
    assert call(srv, "GET", "/api/v1/stream?meter=m-pv-2", token=tok)[0] == 404
    # its live stream's fleet event holds its meter only
    host, port = srv.server_address
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
              + tok.encode() + b"\r\n\r\n")
    f = s.makefile("rb")
    deadline = time.monotonic() + 10
    fleet = None
    for line in f:
        if line.startswith(b"data: "):
            fleet = json.loads(line[6:])
            break
        assert time.monotonic() < deadline
    s.close()
    assert fleet["count"] == 1 and [m["id"] for m in fleet["meters"]] == ["m-house-1"]


def test_user_administration_is_admin_only_and_audited(site):
    srv = site
    st, b, _ = call(srv, "POST", "/api/v1/users", {"name": "new", "role": "operator"},
                    srv.tokens["ada"])
    assert st == 200 and len(b["password"]) >= 16
    assert Users(srv.state.accounts).verify("new", b["password"])["role"] == "operator"
    st, b, _ = call(srv, "PATCH", "/api/v1/users/new", {"disabled": True}, srv.tokens["ada"])
    assert st == 200 and b["disabled"] is True
    st, b, _ = call(srv, "POST", "/api/v1/users/vera/tokens", {"role": "admin"},
                    srv.tokens["ada"])
    assert st == 400 and "above the user's viewer" in b["error"]
    st, b, _ = call(srv, "POST", "/api/v1/users", {"name": "bad name!", "role": "root"},
                    srv.tokens["ada"])
    assert st == 400 and "name" in b["error"] and "role" in b["error"]
    log = [(e["cmd"], e["outcome"]) for e in srv.state.audit.entries() if e["action"] == "user"]
    assert log == [("token_add", "refused"), ("user_change", "ok"), ("user_add", "ok")]
    assert call(srv, "GET", "/api/v1/audit", token=srv.tokens["otto"])[1] == []


def test_a_token_is_capped_by_its_user(site):
    srv = site
    users = srv.state.users
    _, tok = users.new_token("otto", "read-only", role="viewer")
    st, b, _ = call(srv, "POST", "/api/v1/meters/m-house-1/commands", {"cmd": "ping"}, tok)
    assert st == 403 and "otto is viewer" in b["error"]
    users.update("ada", role="viewer")                     # demoted: its admin token follows
    st, b, _ = call(srv, "POST", "/api/v1/users", {"name": "x1", "role": "viewer"},
                    srv.tokens["ada"])
    assert st == 403
    users.update("otto", disabled=True)
    assert call(srv, "GET", "/api/v1/meters", token=srv.tokens["otto"])[0] == 401


def test_lipari_user_command_line(tmp_path):
    db = "sqlite:///%s" % (tmp_path / "u.db")

    def run(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "headend.cli", "user", "--db", db] +
                              list(args), cwd=ROOT, capture_output=True, text=True, timeout=60,
                              input=stdin)
    r = run("add", "alice", "--role", "operator")
    assert r.returncode == 0, r.stderr
    pw = r.stdout.split("password: ")[1].strip()
    users = Users(db)
    assert users.verify("alice", pw)["role"] == "operator"
    assert run("add", "alice").returncode == 2
    r = run("passwd", "alice", "--stdin", stdin="a-new-long-password\n")
    assert r.returncode == 0 and users.verify("alice", "a-new-long-password")
    assert users.verify("alice", pw) is None
    r = run("token", "alice", "--label", "cron", "--role", "viewer")
    tok = r.stdout.strip().splitlines()[-1]
    assert users.token(tok).role == "viewer" and users.token(tok).name == "alice"
    r = run("token", "alice", "--role", "admin")
    assert r.returncode == 2 and "above the user's operator" in r.stderr
    r = run("add", "shop", "--meters", "m1,m2")
    assert r.returncode == 0 and users.get("shop")["meters"] == ["m1", "m2"]
    assert "alice" in run("list").stdout


def test_first_admin_once(tmp_path):
    users = Users("sqlite:///%s" % (tmp_path / "f.db"))
    pw = users.ensure_first_admin()
    assert pw and users.verify("admin", pw)["role"] == "admin"
    assert users.ensure_first_admin() is None
    assert PUBLIC                                   # the public list is what the gate uses
