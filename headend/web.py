"""`lipari web`: the dashboard, the REST API (OpenAPI at /openapi.json) and live updates (SSE).

Standard library only (http.server with one thread per connection), so the head-end runs
wherever Python 3.11 does. The chart library is chart.js from npm (package.json, `npm ci`),
served from node_modules at /vendor/chart.js.

Pages:   /                fleet         /meter/<id>      one meter
API:     /api/v1/...      see OPENAPI below or GET /openapi.json
Live:    /api/v1/stream[?meter=<id>]    text/event-stream, events `fleet` and `meter`

The store is read through headend.queries.Queries. Ingest may run in another process on
the same SQLite file (WAL): a poller ("hub") re-reads the fleet and the watched meters once
per --poll-s and pushes what changed to every open stream.
"""
import argparse
import base64
import json
import mimetypes
import os
import re
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from headend import ROOT
from headend.queries import PERIODS, Queries, QueryError, load_tariff

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
CHART_JS = os.path.join(ROOT, "node_modules", "chart.js", "dist", "chart.umd.min.js")
API = "/api/v1"
METER_ID = r"(?P<meter>[A-Za-z0-9_.:-]{1,64})"


class ApiError(Exception):
    def __init__(self, status, message):
        Exception.__init__(self, message)
        self.status = status


def _json_default(o):
    if isinstance(o, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(o)).decode()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def dumps(o):
    return json.dumps(o, default=_json_default, separators=(",", ":"))


def parse_time(s, name):
    """Epoch seconds, or an ISO date / date-time in UTC (2026-01-31, 2026-01-31T12:00Z)."""
    if s is None or s == "":
        return None
    try:
        return int(float(s))
    except ValueError:
        pass
    import calendar
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M",
                "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(s, fmt))
        except ValueError:
            continue
    raise ApiError(400, "%s=%r: give epoch seconds or a UTC date like 2026-01-31 or "
                        "2026-01-31T12:00:00Z" % (name, s))


# -- commands ------------------------------------------------------------------------
class Commander:
    """Sends a command to a meter with headend.mqttcmd.send_command and waits for the reply.

    Signed when a key file exists for the meter (keys_dir/<meter>.key, as `lipari cmd`);
    the counter then comes from the store so that it always increases."""

    def __init__(self, broker, store=None, user=None, password=None, keys_dir="var/keys",
                 tls_ca=None):
        self.broker = broker
        self.tls_ca = tls_ca
        self.store = store
        self.user = user
        self.password = password
        self.keys_dir = keys_dir if os.path.isabs(keys_dir) else os.path.join(ROOT, keys_dir)

    def send(self, meter_id, cmd, args, timeout_s):
        if not self.broker:
            raise ApiError(503, "commands need the broker: start the web server with "
                                "--broker HOST:PORT (lipari system does this)")
        host, _, port = self.broker.rpartition(":")
        try:
            from headend import mqttcmd
        except ImportError as e:
            raise ApiError(503, "commands are not available in this build (%s)" % e)
        if args is not None and not isinstance(args, dict):
            raise ApiError(400, 'args must be a JSON object like {"rt_s": 30}')
        key = mqttcmd.load_key(meter_id, self.keys_dir)
        ctr = None
        if key is not None and self.store is not None:
            ctr = self.store.next_cmd_counter(meter_id, floor=time.time_ns() // 1000000)
        try:
            return mqttcmd.send_command(meter_id, cmd, args or {}, host=host or "127.0.0.1",
                                        port=int(port), user=self.user, password=self.password,
                                        key=key, ctr=ctr, timeout_s=timeout_s,
                                        tls_ca=self.tls_ca)
        except mqttcmd.CmdError as e:
            if str(e).startswith("no reply"):
                raise TimeoutError(str(e))
            raise


def _is_timeout(e):
    return isinstance(e, TimeoutError)


# -- live updates ----------------------------------------------------------------------
class Hub:
    """Polls the store and keeps the newest snapshot of the fleet and of each watched meter.

    Streams wait on `cond` for the version of their keys to change. One poller for all
    clients keeps the database load independent of the number of open dashboards."""

    def __init__(self, queries, lock, poll_s=1.0):
        self.q = queries
        self.lock = lock
        self.poll_s = poll_s
        self.cond = threading.Condition()
        self.snap = {}            # key -> (version, json text)
        self.watch = {}           # meter id -> number of open streams
        self.version = 0
        self._stop = threading.Event()
        self._kick = threading.Event()
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name="lipari-web-hub", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._kick.set()
        with self.cond:
            self.cond.notify_all()

    @property
    def stopping(self):
        return self._stop.is_set()

    def kick(self):
        """Poll now (after a command, so its effect shows at once)."""
        self._kick.set()

    def add(self, meter_id):
        with self.cond:
            if meter_id:
                self.watch[meter_id] = self.watch.get(meter_id, 0) + 1
        self.kick()

    def remove(self, meter_id):
        with self.cond:
            if meter_id and meter_id in self.watch:
                self.watch[meter_id] -= 1
                if self.watch[meter_id] <= 0:
                    del self.watch[meter_id]

    def _put(self, key, value):
        text = dumps(value)
        with self.cond:
            old = self.snap.get(key)
            if old is None or old[1] != text:
                self.version += 1
                self.snap[key] = (self.version, text)
                self.cond.notify_all()

    def poll_once(self):
        with self.lock:
            fleet = fleet_snapshot(self.q)
        self._put("fleet", fleet)
        with self.cond:
            ids = list(self.watch)
        for mid in ids:
            with self.lock:
                m = meter_snapshot(self.q, mid)
            self._put("meter:" + mid, m)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                self.errors += 1
                if self.errors <= 3:
                    traceback.print_exc()
            self._kick.wait(self.poll_s)
            self._kick.clear()


def fleet_snapshot(q):
    meters = q.meters()
    newest = 0
    for m in meters:
        last = q.last_interval(m["id"])
        m["last_interval_t"] = last.get("t_end") if last else None
        m["last_interval_seq"] = last.get("seq") if last else None
        m["ai_wh"] = last.get("ai_wh") if last else None
        newest = max(newest, m["last_interval_t"] or 0)
    online = sum(1 for m in meters if m.get("online"))
    p_w = sum(m.get("p_w") or 0 for m in meters if m.get("online"))
    return {"meters": meters, "count": len(meters), "online": online, "p_w": p_w,
            "newest_interval_t": newest or None}


def meter_snapshot(q, mid):
    m = q.meter(mid)
    last = q.last_interval(mid)
    log = q.status_log(mid)
    return {"meter": m, "rt": q.rt(mid), "last_interval": last,
            "events": q.events(mid, limit=20),
            "status": log[-1]["status"] if log else None}


# -- OpenAPI -----------------------------------------------------------------------------
def _op(summary, params=(), resp="application/json", body=None, responses=None):
    op = {"summary": summary, "parameters": list(params),
          "responses": {"200": {"description": "OK", "content": {resp: {}}}}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    for code, text in (responses or {}).items():
        op["responses"][code] = {"description": text}
    return op


def _p(name, where="query", desc="", required=False, schema=None):
    return {"name": name, "in": where, "required": required or where == "path",
            "description": desc, "schema": schema or {"type": "string"}}


_M = _p("meter", "path", "meter id")
_T0 = _p("from", desc="start, epoch s or UTC date (2026-01-31)")
_T1 = _p("to", desc="end (exclusive), epoch s or UTC date")
_PERIOD = _p("period", desc="chart span", schema={"type": "string", "enum": list(PERIODS)})

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "Lipari head-end API", "version": "1",
             "description": "Fleet, interval data (billing), events, live readings, projected "
                            "bill and commands for Lipari meters. Energies in Wh, power in W; "
                            "per-phase live values keep the meter's integer units (v_mv, i_ma, "
                            "p_mw, pf_milli, f_mhz)."},
    "paths": {
        API + "/meters": {"get": dict(_op("The fleet: every meter with online state, transport, "
                                          "firmware, board, last seen (epoch s) and active "
                                          "power"), responses={"200": {
            "description": "the fleet, sorted by id",
            "content": {"application/json": {"schema": {
                "type": "array", "items": {"$ref": "#/components/schemas/Meter"}}}}}})},
        API + "/meters/{meter}": {"get": _op("One meter with its newest live reading, newest "
                                             "interval, recent events and status", [_M],
                                             responses={"404": "unknown meter"})},
        API + "/meters/{meter}/rt": {"get": _op("Newest live reading (per phase V, I, P, PF, f)",
                                                [_M])},
        API + "/meters/{meter}/intervals": {"get": _op(
            "Interval records in [from, to) with the energy since the previous record "
            "(import_wh, export_wh)", [_M, _T0, _T1])},
        API + "/meters/{meter}/intervals.csv": {"get": _op(
            "Interval data for billing as CSV (UTC, cumulative registers and deltas in Wh)",
            [_M, _T0, _T1], resp="text/csv")},
        API + "/meters/{meter}/energy": {"get": _op(
            "Energy per bucket: day = 15 min, week = 1 h, month = 1 day buckets, ending at the "
            "newest record", [_M, _PERIOD])},
        API + "/meters/{meter}/events": {"get": _op("Events, newest first", [_M, _p(
            "limit", schema={"type": "integer"})])},
        API + "/meters/{meter}/status": {"get": _op("Status changes (online, transport, "
                                                    "firmware, OTA), oldest first", [_M])},
        API + "/meters/{meter}/bill": {"get": _op(
            "Projected bill for the current billing period from the time-of-use tariff", [_M])},
        API + "/meters/{meter}/commands": {"post": _op(
            "Send a command to the meter and wait for its reply", [_M],
            body={"type": "object", "required": ["cmd"],
                  "properties": {"cmd": {"type": "string"}, "args": {},
                                 "timeout_s": {"type": "number", "default": 10}}},
            responses={"400": "bad request", "503": "no broker configured",
                       "504": "the meter did not answer in time", "502": "the command failed"})},
        API + "/fleet/energy": {"get": _op("Energy of the whole fleet per bucket", [_PERIOD])},
        API + "/intervals.csv": {"get": _op("Interval data of every meter as CSV, for a billing "
                                            "run", [_T0, _T1], resp="text/csv")},
        API + "/events": {"get": _op("Events of every meter, newest first")},
        API + "/quarantine": {"get": _op("Payloads that could not be decoded, with the reason")},
        API + "/tariff": {"get": _op("The time-of-use tariff used for bills")},
        API + "/stream": {"get": _op("Server-sent events: `fleet` (always) and `meter` (with "
                                     "?meter=ID) whenever they change",
                                     [_p("meter", desc="also stream this meter")],
                                     resp="text/event-stream")},
        "/healthz": {"get": _op("Liveness: 200 when the database answers")},
    },
    "components": {"schemas": {"Meter": {"type": "object", "properties": {
        "id": {"type": "string"}, "online": {"type": "boolean"},
        "transport": {"type": "string", "nullable": True, "description": "wifi, nbiot, plc"},
        "fw": {"type": "string", "nullable": True}, "board": {"type": "string", "nullable": True},
        "signal": {"type": "integer", "nullable": True, "description": "dBm"},
        "last_seen": {"type": "number", "nullable": True, "description": "epoch s, head-end clock"},
        "p_w": {"type": "number", "nullable": True, "description": "active power, W (+ import)"},
        "last_interval_t": {"type": "integer", "nullable": True},
        "last_interval_seq": {"type": "integer", "nullable": True},
        "ai_wh": {"type": "integer", "nullable": True, "description": "import register, Wh"}}}}},
}


# -- HTTP ----------------------------------------------------------------------------------
class App:
    """Routing and the shared state of one web server."""

    def __init__(self, store, tariff=None, broker=None, poll_s=1.0, cmd_timeout_s=10.0,
                 commander=None):
        self.store = store
        self.q = Queries(store, tariff)
        self.lock = threading.RLock()      # Queries keeps caches: one caller at a time
        self.hub = Hub(self.q, self.lock, poll_s)
        self.commander = commander or Commander(broker, store)
        self.cmd_timeout_s = cmd_timeout_s
        self.routes = []
        r = self.route
        r("GET", r"/", self.page_fleet)
        r("GET", r"/meter/" + METER_ID, self.page_meter)
        r("GET", r"/static/(?P<name>[A-Za-z0-9_.-]+)", self.static)
        r("GET", r"/vendor/chart\.js", self.chart_js)
        r("GET", r"/openapi\.json", lambda h: (200, OPENAPI))
        r("GET", r"/healthz", self.healthz)
        r("GET", API + r"/meters", self.api_meters)
        r("GET", API + r"/meters/" + METER_ID, self.api_meter)
        r("GET", API + r"/meters/" + METER_ID + r"/rt", self.api_rt)
        r("GET", API + r"/meters/" + METER_ID + r"/intervals", self.api_intervals)
        r("GET", API + r"/meters/" + METER_ID + r"/intervals\.csv", self.api_csv)
        r("GET", API + r"/meters/" + METER_ID + r"/energy", self.api_energy)
        r("GET", API + r"/meters/" + METER_ID + r"/events", self.api_events)
        r("GET", API + r"/meters/" + METER_ID + r"/status", self.api_status)
        r("GET", API + r"/meters/" + METER_ID + r"/bill", self.api_bill)
        r("POST", API + r"/meters/" + METER_ID + r"/commands", self.api_command)
        r("GET", API + r"/fleet/energy", self.api_fleet_energy)
        r("GET", API + r"/intervals\.csv", self.api_csv_all)
        r("GET", API + r"/events", self.api_all_events)
        r("GET", API + r"/quarantine", self.api_quarantine)
        r("GET", API + r"/tariff", lambda h: (200, self.q.tariff))
        r("GET", API + r"/stream", self.stream)

    def route(self, method, pattern, fn):
        self.routes.append((method, re.compile(pattern + r"/?\Z"), fn))

    def dispatch(self, h):
        path = unquote(h.path_only)
        allowed = []
        verb = "GET" if h.command == "HEAD" else h.command
        for method, rx, fn in self.routes:
            m = rx.match(path)
            if not m:
                continue
            if method != verb:
                allowed.append(method)
                continue
            h.params = m.groupdict()
            return fn(h)
        if allowed:
            raise ApiError(405, "use %s for %s" % (" or ".join(allowed), path))
        raise ApiError(404, "no such page or API path: %s (the API is described at /openapi.json)"
                       % path)

    def _meter(self, h, mid=None):
        mid = mid if mid is not None else h.params["meter"]
        with self.lock:
            if self.q.meter(mid) is None:
                raise ApiError(404, "unknown meter %r; GET %s/meters lists the fleet" % (mid, API))
        return mid

    def _period(self, h):
        p = h.arg("period", "day")
        if p not in PERIODS:
            raise ApiError(400, "period must be one of %s" % ", ".join(PERIODS))
        return p

    # pages and files
    def page_fleet(self, h):
        return h.file(os.path.join(STATIC, "fleet.html"))

    def page_meter(self, h):
        return h.file(os.path.join(STATIC, "meter.html"))

    def static(self, h):
        return h.file(os.path.join(STATIC, h.params["name"]))

    def chart_js(self, h):
        if not os.path.exists(CHART_JS):
            raise ApiError(404, "chart.js is not installed: run `npm ci` in %s (make setup does "
                                "this)" % ROOT)
        return h.file(CHART_JS, cache_s=3600)

    def healthz(self, h):
        with self.lock:
            n = len(self.q.meters())
        return 200, {"ok": True, "meters": n, "hub_errors": self.hub.errors}

    # API
    def api_meters(self, h):
        with self.lock:
            return 200, fleet_snapshot(self.q)["meters"]

    def api_meter(self, h):
        mid = self._meter(h)
        with self.lock:
            return 200, meter_snapshot(self.q, mid)

    def api_rt(self, h):
        mid = self._meter(h)
        with self.lock:
            return 200, self.q.rt(mid)

    def api_intervals(self, h):
        mid = self._meter(h)
        t0, t1 = parse_time(h.arg("from"), "from"), parse_time(h.arg("to"), "to")
        with self.lock:
            return 200, self.q.intervals(mid, t0, t1)

    def api_csv(self, h):
        mid = self._meter(h)
        t0, t1 = parse_time(h.arg("from"), "from"), parse_time(h.arg("to"), "to")
        with self.lock:
            text = self.q.csv(mid, t0, t1)
        return h.raw(200, text.encode(), "text/csv; charset=utf-8",
                     {"Content-Disposition": 'attachment; filename="%s-intervals.csv"' % mid})

    def api_csv_all(self, h):
        t0, t1 = parse_time(h.arg("from"), "from"), parse_time(h.arg("to"), "to")
        with self.lock:
            text = self.q.csv(None, t0, t1)
        return h.raw(200, text.encode(), "text/csv; charset=utf-8",
                     {"Content-Disposition": 'attachment; filename="lipari-intervals.csv"'})

    def api_energy(self, h):
        mid = self._meter(h)
        p = self._period(h)
        with self.lock:
            return 200, self.q.energy(mid, p, parse_time(h.arg("at"), "at"))

    def api_fleet_energy(self, h):
        p = self._period(h)
        with self.lock:
            return 200, self.q.fleet_energy(p, parse_time(h.arg("at"), "at"))

    def api_events(self, h):
        mid = self._meter(h)
        with self.lock:
            return 200, self.q.events(mid, limit=_int(h.arg("limit", "100"), "limit"))

    def api_all_events(self, h):
        with self.lock:
            return 200, self.q.events(None, limit=_int(h.arg("limit", "100"), "limit"))

    def api_status(self, h):
        mid = self._meter(h)
        with self.lock:
            return 200, self.q.status_log(mid)

    def api_bill(self, h):
        mid = self._meter(h)
        with self.lock:
            return 200, self.q.bill(mid, parse_time(h.arg("at"), "at"))

    def api_quarantine(self, h):
        with self.lock:
            return 200, self.q.quarantined()

    def api_command(self, h):
        mid = self._meter(h)
        body = h.json_body()
        cmd = body.get("cmd") if isinstance(body, dict) else None
        if not isinstance(cmd, str) or not re.match(r"^[a-z_][a-z0-9_]{0,31}$", cmd):
            raise ApiError(400, 'body must be JSON like {"cmd": "status", "args": {}}; cmd is a '
                                'lower-case command name')
        timeout_s = body.get("timeout_s", self.cmd_timeout_s)
        if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 120:
            raise ApiError(400, "timeout_s must be a number of seconds in (0, 120]")
        t = time.monotonic()
        try:
            reply = self.commander.send(mid, cmd, body.get("args"), timeout_s)
        except ApiError:
            raise
        except Exception as e:
            if _is_timeout(e):
                raise ApiError(504, "meter %s did not answer %r within %g s: it may be offline "
                                    "or busy. The command stays queued in the broker and runs "
                                    "when the meter reconnects." % (mid, cmd, timeout_s))
            raise ApiError(502, "command %r to meter %s failed: %s" % (cmd, mid, e))
        self.hub.kick()
        return 200, {"meter": mid, "cmd": cmd, "reply": reply,
                     "elapsed_ms": int((time.monotonic() - t) * 1000)}

    def stream(self, h):
        mid = h.arg("meter")
        if mid is not None:
            self._meter(h, mid)
        keys = ["fleet"] + (["meter:" + mid] if mid else [])
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")
        h.send_header("X-Accel-Buffering", "no")
        h.end_headers()
        h.close_connection = True
        hub = self.hub
        hub.add(mid)
        sent = {}
        last_write = time.monotonic()
        try:
            h.wfile.write(b"retry: 2000\n\n")
            h.wfile.flush()
            while not hub.stopping:
                out = []
                with hub.cond:
                    for k in keys:
                        v = hub.snap.get(k)
                        if v and sent.get(k) != v[0]:
                            sent[k] = v[0]
                            out.append("id: %d\nevent: %s\ndata: %s\n\n" % (v[0], k.split(":")[0],
                                                                           v[1]))
                    if not out:
                        hub.cond.wait(5)
                if out:
                    h.wfile.write("".join(out).encode())
                    h.wfile.flush()
                    last_write = time.monotonic()
                elif time.monotonic() - last_write > 15:
                    h.wfile.write(b": keep-alive\n\n")   # finds closed clients, keeps proxies
                    h.wfile.flush()
                    last_write = time.monotonic()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            hub.remove(mid)
        return None


def _int(s, name):
    try:
        return max(1, min(10000, int(s)))
    except (TypeError, ValueError):
        raise ApiError(400, "%s must be an integer" % name)


class Handler(BaseHTTPRequestHandler):
    server_version = "lipari-web/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        if self.server.verbose:
            BaseHTTPRequestHandler.log_message(self, fmt, *args)

    def arg(self, name, default=None):
        v = self.query.get(name)
        return v[-1] if v else default

    def json_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > 65536:
            raise ApiError(413, "request body too large")
        try:
            return json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            raise ApiError(400, "request body is not valid JSON")

    def raw(self, status, body, ctype, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return None

    def file(self, path, cache_s=0):
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            raise ApiError(404, "no such file: %s" % os.path.basename(path))
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return self.raw(200, body, ctype,
                        {"Cache-Control": "max-age=%d" % cache_s if cache_s else "no-cache"})

    def _guard(self):
        """No login here, so keep other web sites out: on a loopback server only loopback
        host names (DNS rebinding), and state-changing requests only as JSON from our own
        origin (a cross-site form cannot send application/json without a CORS preflight,
        which this server never grants)."""
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if self.server.loopback and host not in ("127.0.0.1", "localhost", "::1", ""):
            raise ApiError(403, "this server answers only as http://127.0.0.1:%d/ (host %r "
                                "refused); start it with --host to serve other names"
                           % (self.server.server_address[1], host))
        if self.command in ("POST", "PUT", "DELETE"):
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise ApiError(415, "send the request body as Content-Type: application/json")
            origin = self.headers.get("Origin")
            if origin and origin != "null" and urlsplit(origin).netloc != self.headers.get("Host"):
                raise ApiError(403, "cross-site request from %s refused" % origin)

    def _go(self):
        u = urlsplit(self.path)
        self.path_only = u.path
        self.query = parse_qs(u.query)
        try:
            self._guard()
            res = self.server.app.dispatch(self)
            if res is not None:
                status, obj = res
                self.raw(status, dumps(obj).encode(), "application/json")
        except ApiError as e:
            self.raw(e.status, dumps({"error": str(e), "status": e.status}).encode(),
                     "application/json")
        except QueryError as e:
            self.raw(400, dumps({"error": str(e), "status": 400}).encode(), "application/json")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            traceback.print_exc()
            self.raw(500, dumps({"error": "internal error: %s: %s (see the head-end log)"
                                          % (type(e).__name__, e), "status": 500}).encode(),
                     "application/json")

    do_GET = do_POST = do_HEAD = _go

    def do_PUT(self):
        self._go()

    do_DELETE = do_PUT


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app, host="127.0.0.1", port=8000, verbose=False):
        self.app = app
        self.verbose = verbose
        self.loopback = host in ("127.0.0.1", "localhost", "::1")
        ThreadingHTTPServer.__init__(self, (host, port), Handler)

    @property
    def url(self):
        host, port = self.server_address[:2]
        return "http://%s:%d" % (host, port)

    def start(self):
        """Serve in a daemon thread (tests, lipari system in-process)."""
        self.app.hub.start()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.1,),
                                        name="lipari-web", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.app.hub.stop()
        self.shutdown()
        self.server_close()


def serve(store, host="127.0.0.1", port=8000, tariff=None, broker=None, poll_s=1.0,
          verbose=False):
    """Build and start a web server on a Store; returns it (its .url, .stop())."""
    return WebServer(App(store, tariff, broker, poll_s), host, port, verbose).start()


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari web", description=__doc__.splitlines()[0])
    p.add_argument("--db", default=os.environ.get("LIPARI_DB", "sqlite:///var/lipari.db"),
                   help="database URL: sqlite:///path or postgresql://user:pw@host/db "
                        "(default sqlite:///var/lipari.db, or $LIPARI_DB)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--broker", help="HOST:PORT of the MQTT broker, for commands")
    p.add_argument("--user", default=os.environ.get("LIPARI_MQTT_USER"),
                   help="MQTT user for commands (default $LIPARI_MQTT_USER)")
    p.add_argument("--password", default=os.environ.get("LIPARI_MQTT_PASSWORD"),
                   help="MQTT password (default $LIPARI_MQTT_PASSWORD)")
    p.add_argument("--keys", default=os.environ.get("LIPARI_KEYS", "var/keys"),
                   help="directory of meters' command keys (<meter>.key), as lipari cmd")
    p.add_argument("--tls-ca", help="CA file: send commands to the broker over TLS")
    p.add_argument("--tariff", help="time-of-use tariff, JSON (see headend/queries.py)")
    p.add_argument("--poll-s", type=float, default=1.0, help="how often live views re-read the "
                                                              "database (default 1 s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    a = p.parse_args(argv)
    from headend.store import StoreError
    from headend.store_pg import open_store
    try:
        tariff = load_tariff(a.tariff)
    except QueryError as e:
        print("lipari web: %s" % e, file=sys.stderr)
        return 2
    try:
        store = open_store(a.db)
    except StoreError as e:
        print("lipari web: %s" % e, file=sys.stderr)
        return 2
    try:
        cmd = Commander(a.broker, store, a.user, a.password, a.keys, a.tls_ca)
        srv = WebServer(App(store, tariff, a.broker, a.poll_s, commander=cmd), a.host, a.port,
                        a.verbose)
    except OSError as e:
        print("lipari web: cannot listen on %s:%d: %s. Use --port to pick another port."
              % (a.host, a.port, e), file=sys.stderr)
        return 2
    print("lipari web: dashboard at %s/  (API: %s/openapi.json)" % (srv.url, srv.url), flush=True)
    srv.app.hub.start()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.app.hub.stop()
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
