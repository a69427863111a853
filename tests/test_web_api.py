"""REST API, SSE and read queries of the head-end web server (headend/web/, queries.py)
on the real Store (SQLite in a temp dir), over real HTTP (uvicorn)."""
import csv
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from headend_harness import T0, fill, interval_record, rt_record
from headend import queries
from headend.store import Store
from headend.web import serve
from headend.web.app import route_table

CONST = (("c1", "wifi", "unix_sim_1ph", 1, "constant"),)     # 1000 W, all day


@pytest.fixture
def web(tmp_path):
    store = Store("sqlite:///%s" % (tmp_path / "t.db"))
    fill(store, days=3)
    fill(store, days=3, fleet=CONST)
    srv = serve(store, port=0, poll_s=0.1)
    srv.state.users.add("root", "admin")
    srv.token = srv.state.users.new_token("root", "tests")[1]
    yield srv, store
    srv.stop()
    store.close()


def auth(srv, headers=None):
    """The headers with the fixture's admin API token."""
    return dict(headers or {}, Authorization="Bearer " + srv.token)


def get(srv, path, raw=False):
    try:
        with urllib.request.urlopen(urllib.request.Request(srv.url + path, headers=auth(srv)),
                                    timeout=10) as r:
            body = r.read()
            return r.status, (body.decode() if raw else json.loads(body)), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def post(srv, path, obj):
    data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    req = urllib.request.Request(srv.url + path, data=data, method="POST",
                                 headers=auth(srv, {"Content-Type": "application/json"}))
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openapi_documents_every_route(web):
    srv, _ = web
    st, doc, _ = get(srv, "/openapi.json")
    assert st == 200 and doc["openapi"].startswith("3.")
    assert any(p.endswith("/meters") for p in doc["paths"])
    # every documented GET path without parameters answers; every route is documented
    for path, ops in doc["paths"].items():
        if "{" not in path and "get" in ops and not path.endswith("/stream"):
            assert get(srv, path, raw=True)[0] == 200, path
    # the document is generated from the routes: every API route is in it
    routed = {path for path, _, _ in route_table(srv.app) if path.startswith("/api/")}
    assert routed and routed == {p for p in doc["paths"] if p.startswith("/api")}
    assert "CommandRequest" in doc["components"]["schemas"]


def test_fleet_list(web):
    srv, _ = web
    st, meters, _ = get(srv, "/api/v1/meters")
    assert st == 200
    assert [m["id"] for m in meters] == ["c1", "m-house-1", "m-plant-3", "m-pv-2"]
    c1 = meters[0]
    assert c1["online"] is True and c1["transport"] == "wifi" and c1["fw"] == "0.3.1"
    assert c1["p_w"] == 1000 and c1["ai_wh"] == 72000 - 250 + 250   # 287 deltas + first 250
    assert c1["last_interval_t"] == T0 + 3 * 86400 and c1["last_interval_seq"] == 288


def test_energy_buckets_and_fleet_sum(web):
    srv, _ = web
    st, d, _ = get(srv, "/api/v1/meters/c1/energy?period=day")
    assert st == 200 and d["bucket_s"] == 900 and d["t1"] == T0 + 3 * 86400
    assert len(d["buckets"]) == 96 and {b["import_wh"] for b in d["buckets"]} == {250}
    st, w, _ = get(srv, "/api/v1/meters/c1/energy?period=week")
    assert len(w["buckets"]) == 168 and sum(b["import_wh"] for b in w["buckets"]) == 72000 - 250
    st, m, _ = get(srv, "/api/v1/meters/c1/energy?period=month")
    assert m["bucket_s"] == 86400 and sum(b["import_wh"] for b in m["buckets"]) == 72000 - 250
    st, f, _ = get(srv, "/api/v1/fleet/energy?period=week")
    per = f["per_meter_import_wh"]
    assert sum(b["import_wh"] for b in f["buckets"]) == sum(per.values())
    assert per["c1"] == 72000 - 250 and per["m-pv-2"] > 0
    assert sum(b["export_wh"] for b in f["buckets"]) > 0          # the PV meter exports
    assert get(srv, "/api/v1/meters/c1/energy?period=year")[0] == 400


def test_counter_going_backwards_is_no_negative_spike():
    recs = [interval_record(1, 900, 1000, 0), interval_record(2, 1800, 1200, 0),
            interval_record(3, 2700, 50, 0), interval_record(4, 3600, 150, 0),
            interval_record(4, 3600, 150, 0)]                      # duplicate delivery
    d = queries.with_deltas(recs)
    assert [r["import_wh"] for r in d] == [None, 200, 0, 100]
    b = queries.buckets(recs, 0, 3600, 1800)
    assert [x["import_wh"] for x in b] == [200, 100]


def test_csv_export_for_billing(web):
    srv, _ = web
    st, text, hdr = get(srv, "/api/v1/meters/c1/intervals.csv?from=2026-01-02&to=2026-01-03", raw=True)
    assert st == 200 and hdr["Content-Type"].startswith("text/csv")
    assert "attachment" in hdr["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 96
    assert rows[0]["t_end_utc"] == "2026-01-02T00:00:00Z"
    assert rows[-1]["t_end_utc"] == "2026-01-02T23:45:00Z"
    assert {r["import_wh"] for r in rows} == {"250"}               # first row has its delta too
    assert int(rows[-1]["ai_wh"]) - int(rows[0]["ai_wh"]) == 95 * 250
    st, js, _ = get(srv, "/api/v1/meters/c1/intervals?from=%d&to=%d" % (T0 + 86400, T0 + 86400 + 3600))
    assert [r["seq"] for r in js] == [96, 97, 98, 99] and js[0]["import_wh"] == 250
    assert get(srv, "/api/v1/meters/c1/intervals?from=yesterday")[0] == 400


def test_bill_projection_time_of_use(web):
    srv, _ = web
    st, b, _ = get(srv, "/api/v1/meters/c1/bill")
    assert st == 200 and b["currency"] == "EUR"
    assert b["period_start"] == T0 and b["period_end"] == T0 + 31 * 86400
    # Thu 1 and Fri 2 Jan: 07:00-23:00 peak (2 x 16 kWh); everything else off-peak; the
    # very first interval (00:00-00:15) has no predecessor, so no energy
    kwh = {r["name"]: r["kwh"] for r in b["rates"]}
    assert kwh == {"peak": 32.0, "off-peak": 39.75}
    covered = 3 * 86400 - 900
    energy = 32.0 * 0.34 + 39.75 * 0.19
    assert b["covered_s"] == covered
    assert b["cost_so_far"] == round(energy + 0.30 * covered / 86400, 2)
    assert b["projected_total"] == round(energy * 31 * 86400 / covered + 0.30 * 31, 2)


def test_tariff_rules():
    t = queries.check_tariff({"utc_offset_min": 60, "billing_day": 15,
                              "schedule": [{"days": [5, 6], "from": "22:00", "to": "06:00",
                                            "rate": 1},
                                           {"from": "06:00", "to": "22:00", "rate": 0}]})
    sat_2330_local = T0 + 2 * 86400 + 22 * 3600 + 1800        # Sat 03 Jan 22:30 UTC = 23:30 local
    assert queries.rate_at(t, sat_2330_local) == 1
    assert queries.rate_at(t, T0 + 12 * 3600) == 0
    assert queries.billing_period(t, T0 + 3600)[0] == T0 - 17 * 86400 - 3600   # Dec 15 local
    with pytest.raises(queries.QueryError, match="HH:MM"):
        queries.check_tariff({"schedule": [{"from": "7", "to": "23:00", "rate": 0}]})
    with pytest.raises(queries.QueryError, match="rates"):
        queries.check_tariff({"schedule": [{"from": "07:00", "to": "23:00", "rate": 5}]})


def test_meter_detail_events_status_quarantine(web):
    srv, store = web
    st, m, _ = get(srv, "/api/v1/meters/m-plant-3")
    assert st == 200 and len(m["rt"]["v_mv"]) == 3 and m["status"]["ota"] == "idle"
    assert m["last_interval"]["seq"] == 288
    st, ev, _ = get(srv, "/api/v1/meters/m-plant-3/events?limit=1")
    assert [e["kind"] for e in ev] == ["sag"]
    st, log, _ = get(srv, "/api/v1/meters/m-plant-3/status")
    assert log[0]["status"]["transport"] == "plc"
    store.quarantine("lipari/x/up", b"\xff\x00junk", "CRC mismatch")
    store.commit()
    st, q, _ = get(srv, "/api/v1/quarantine")
    assert q[0]["reason"] == "CRC mismatch" and q[0]["payload"] == "/wBqdW5r"   # base64


def test_errors_say_what_to_do(web):
    srv, _ = web
    st, e, _ = get(srv, "/api/v1/meters/nope")
    assert st == 404 and "/api/v1/meters lists the fleet" in e["error"]
    st, e, _ = get(srv, "/api/v1/nothing")
    assert st == 404 and "openapi.json" in e["error"]
    st, e = post(srv, "/api/v1/meters", {})
    assert st == 405 and "GET" in e["error"]
    st, e = post(srv, "/api/v1/meters/c1/commands", b"not json")
    assert st == 400 and "JSON" in e["error"]
    st, e = post(srv, "/api/v1/meters/c1/commands", {"cmd": "status"})
    assert st == 503 and "--broker" in e["error"]
    st, e = post(srv, "/api/v1/meters/c1/commands", {"cmd": "ping", "args": {"x": "y" * 70000}})
    assert st == 413 and "too large" in e["error"]
    # half a UTF-16 pair escaped in JSON is no character: refused, not a 500
    st, e = post(srv, "/api/v1/meters/c1/commands", b'{"cmd": "set", "args": {"a\\ud800": 1}}')
    assert st == 400 and "Unicode" in e["error"], e
    st, e = post(srv, "/api/v1/meters/c1/commands", {"cmd": "Ping!", "bogus": 1})
    assert st == 400 and "cmd" in e["error"] and "bogus" in e["error"]
    st, e, _ = get(srv, "/api/v1/meters/c1/events?limit=many")
    assert st == 400 and "limit must be an integer" in e["error"]
    st, e, _ = get(srv, "/api/v1/meters/c1/intervals?from=1e400")
    assert st == 400 and "from=" in e["error"]


def test_commands_reply_timeout_failure(web):
    srv, _ = web
    calls = []

    class Fake:
        def send(self, meter_id, cmd, args, timeout_s):
            calls.append((meter_id, cmd, args, timeout_s))
            if cmd == "sleep":
                raise TimeoutError("nothing")
            if cmd == "bad":
                raise RuntimeError("meter says: unknown command")
            return {"ok": True, "v": 1}

    srv.state.commander = Fake()
    st, r = post(srv, "/api/v1/meters/c1/commands", {"cmd": "status", "args": {"a": 1}})
    assert st == 200 and r["reply"] == {"ok": True, "v": 1}
    assert calls[-1] == ("c1", "status", {"a": 1}, 10.0)
    st, r = post(srv, "/api/v1/meters/c1/commands", {"cmd": "sleep", "timeout_s": 2})
    assert st == 504 and "did not answer 'sleep' within 2 s" in r["error"]
    st, r = post(srv, "/api/v1/meters/c1/commands", {"cmd": "bad"})
    assert st == 502 and "unknown command" in r["error"]
    st, r = post(srv, "/api/v1/meters/c1/commands", {"cmd": "status", "timeout_s": 500})
    assert st == 400


def test_sse_pushes_changes(web):
    srv, store = web
    host, port = srv.server_address[:2]
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(b"GET /api/v1/stream?meter=c1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer %s\r\n\r\n" % srv.token.encode())
    f = sock.makefile("rb")
    head = []
    for line in f:
        if line in (b"\r\n", b"\n"):
            break
        head.append(line.decode().strip().lower())
    assert head[0].startswith("http/1.1 200")
    assert any(h.startswith("content-type: text/event-stream") for h in head)
    events = []

    def reader():
        ev = None
        try:
            for line in f:
                line = line.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    ev = line[7:]
                elif line.startswith("data: "):
                    events.append((ev, json.loads(line[6:])))
        except OSError:
            pass

    threading.Thread(target=reader, daemon=True).start()

    def wait_for(pred, timeout_s=5):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for e in list(events):
                if pred(e):
                    return e
            time.sleep(0.05)
        raise AssertionError("no such event within %s s; got %s" % (timeout_s, [e[0] for e in events]))

    wait_for(lambda e: e[0] == "fleet" and e[1]["count"] == 4)
    wait_for(lambda e: e[0] == "meter" and e[1]["rt"]["p_mw"] == [1000000])
    store.add_rt("c1", rt_record(T0 + 3 * 86400 + 20, 2345.0))
    store.add_interval("c1", 289, interval_record(289, T0 + 3 * 86400 + 900, 72250, 0), b"")
    store.commit()
    wait_for(lambda e: e[0] == "meter" and e[1]["rt"]["p_mw"] == [2345000]
             and e[1]["last_interval"]["seq"] == 289)
    wait_for(lambda e: e[0] == "fleet" and [m for m in e[1]["meters"] if m["id"] == "c1"][0]["p_w"] == 2345)
    n = len(srv.state.hub.watch)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    assert n == 1


def test_pages_and_chart_library_served(web):
    srv, _ = web
    for path in ("/", "/meter/c1", "/static/app.css", "/static/meter.js"):
        st, body, _ = get(srv, path, raw=True)
        assert st == 200 and len(body) > 100, path
    chart = os.path.join(os.path.dirname(os.path.dirname(__file__)), "node_modules", "chart.js")
    if os.path.isdir(chart):
        st, body, hdr = get(srv, "/vendor/chart.js", raw=True)
        assert st == 200 and "javascript" in hdr["Content-Type"] and "Chart" in body[:5000]
    assert get(srv, "/static/../web.py", raw=False)[0] == 404


def test_meter_page_offers_only_the_firmware_commands(web):
    """The command list on the meter page names only commands the firmware handles
    (firmware/comm/commands.py, one _c_<name> method each): no relay (no Lipari board has
    one), nothing the meter would answer with "unknown command"."""
    import re
    srv, _ = web
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fw = set(re.findall(r"def _c_(\w+)\(", open(os.path.join(
        root, "firmware", "comm", "commands.py")).read()))
    st, html, _ = get(srv, "/meter/c1", raw=True)
    assert st == 200
    offered = set(re.findall(r'<option value="(\w+)">', html.split('id="cmds"')[1]
                             .split("</datalist>")[0]))
    assert offered and offered <= fw, offered - fw
    assert "relay" not in html.lower()
    st, js, _ = get(srv, "/static/meter.js", raw=True)
    assert st == 200 and "relay" not in js.lower()


def test_commands_through_a_real_broker(web, tmp_path):
    """Dashboard/API -> broker -> meter -> reply, with headend.mqttcmd and Mosquitto; a
    meter that does not answer gives a clear 504."""
    paho = pytest.importorskip("paho.mqtt.client")
    from headend_harness import start_broker, stop_broker
    from headend.web import Commander
    srv, store = web
    proc, port, _ = start_broker("mosquitto", str(tmp_path))

    class b:
        pass
    b.port = port
    b.stop = lambda: stop_broker(proc)
    meter = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="c1")
    seen = []

    def on_message(c, u, msg):
        req = json.loads(msg.payload)
        seen.append(req)
        c.publish("lipari/v1/c1/resp", json.dumps({"id": req["id"], "ok": True,
                                                   "result": {"pong": req["args"]}}), qos=1)

    meter.on_message = on_message
    meter.connect("127.0.0.1", b.port)
    meter.subscribe("lipari/v1/c1/cmd", 1)
    meter.loop_start()
    try:
        time.sleep(0.3)
        srv.state.commander = Commander("127.0.0.1:%d" % b.port, store, keys_dir="/nonexistent")
        st, r = post(srv, "/api/v1/meters/c1/commands", {"cmd": "ping", "args": {"n": 7}})
        assert st == 200, r
        assert r["reply"]["ok"] is True and r["reply"]["result"] == {"pong": {"n": 7}}
        assert seen[0]["cmd"] == "ping"
        st, r = post(srv, "/api/v1/meters/m-pv-2/commands", {"cmd": "ping", "timeout_s": 1})
        assert st == 504 and "did not answer 'ping' within 1 s" in r["error"]
        st, r = post(srv, "/api/v1/meters/c1/commands", {"cmd": "set", "args": [1, 2]})
        assert st == 400 and "JSON object" in r["error"]
    finally:
        meter.loop_stop()
        meter.disconnect()
        b.stop()


def test_bill_uses_the_meters_own_registers_when_it_has_one_per_rate(tmp_path):
    store = Store("sqlite:///%s" % (tmp_path / "r.db"))
    ai = [0, 0]
    for k in range(1, 97):                  # one day; the meter books 1/3 to register 1
        t = T0 + 86400 + k * 900            # Fri 2 Jan
        ai[k % 3 == 0] += 300
        rec = interval_record(k, t, sum(ai), 0)
        rec["tariff_wh"] = list(ai)
        store.add_interval("r1", k, rec)
    store.commit()
    b = queries.Queries(store).bill("r1")
    assert b["booked_by"] == "meter registers"
    # 95 deltas (the first record has none): k = 2..96, 32 of them with k % 3 == 0
    assert [r["kwh"] for r in b["rates"]] == pytest.approx([63 * 0.3, 32 * 0.3])
    store.close()


def test_event_cache_sees_new_events_only_once(web):
    srv, store = web
    q = srv.state.q
    assert [e["kind"] for e in q.events("c1", limit=5)] == ["sag", "power_up"]
    store.add_event("c1", 3, {"seq": 3, "t": T0 + 86400 + 4000, "kind": "swell", "phase": 2,
                              "value": 260000})      # same t as the newest cached one
    store.add_event("c1", 4, {"seq": 4, "t": T0 + 2 * 86400, "kind": "power_fail",
                              "phase": None, "value": None})
    store.commit()
    assert [e["kind"] for e in q.events("c1", limit=5)] == ["power_fail", "swell", "sag",
                                                            "power_up"]
    assert [e["kind"] for e in q.events("c1", limit=5)] == ["power_fail", "swell", "sag",
                                                            "power_up"]


def test_other_sites_cannot_drive_the_api(web):
    srv, _ = web
    srv.state.commander = type("C", (), {"send": lambda self, *a: {"ok": True}})()
    url = srv.url + "/api/v1/meters/c1/commands"

    def call(data, headers):
        req = urllib.request.Request(url, data=data, method="POST", headers=auth(srv, headers))
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    body = json.dumps({"cmd": "ping"}).encode()
    assert call(body, {"Content-Type": "application/json"}) == 200
    assert call(body, {"Content-Type": "text/plain"}) == 415           # a cross-site form
    assert call(body, {"Content-Type": "application/json",
                       "Origin": "http://evil.example"}) == 403
    host = "127.0.0.1:%d" % srv.server_address[1]
    assert call(body, {"Content-Type": "application/json", "Origin": "http://" + host}) == 200
    req = urllib.request.Request(srv.url + "/api/v1/meters",
                                 headers=auth(srv, {"Host": "evil.example"}))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 403                                           # DNS rebinding
    req = urllib.request.Request(srv.url + "/api/v1/meters", method="HEAD", headers=auth(srv))
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200 and r.read() == b""


def test_fleet_csv_for_a_billing_run(web):
    srv, _ = web
    st, text, _ = get(srv, "/api/v1/intervals.csv?from=2026-01-03&to=2026-01-04", raw=True)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert st == 200 and len(rows) == 4 * 96
    assert [r["meter_id"] for r in rows[::96]] == ["c1", "m-house-1", "m-plant-3", "m-pv-2"]
    st, doc, _ = get(srv, "/openapi.json")
    assert doc["paths"]["/api/v1/meters"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"]["items"]["$ref"] == "#/components/schemas/Meter"
    st, meters, _ = get(srv, "/api/v1/meters")
    assert set(meters[0]) <= set(doc["components"]["schemas"]["Meter"]["properties"])


def test_command_line_errors_say_what_to_do(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "headend.web"] + list(args), cwd=root,
                              capture_output=True, text=True, timeout=30)
    bad = tmp_path / "t.json"
    bad.write_text('{"rates": []}')
    r = run("--tariff", str(bad), "--db", "sqlite:///%s" % (tmp_path / "x.db"))
    assert r.returncode == 2 and "'rates' must be a non-empty list" in r.stderr
    r = run("--db", "mysql://x", "--port", "0")
    assert r.returncode == 2 and "unknown database URL" in r.stderr
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        r = run("--db", "sqlite:///%s" % (tmp_path / "x.db"), "--port", str(s.getsockname()[1]))
    finally:
        s.close()
    assert r.returncode == 2 and "Use --port to pick another port" in r.stderr
