"""Load generator for the web server (`make bench` key web_requests_per_s): a fleet of
`meters` meters in SQLite, the real `lipari web` in its own process, and `clients`
concurrent keep-alive HTTP clients fetching the fleet page's JSON (GET /api/v1/meters, the
list the fleet table shows) with an API token for `duration_s` seconds.

    python tests/web_load.py --meters 1000 --clients 50 --duration 10
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "/api/v1/meters"


def make_fleet(url, meters, intervals=4):
    """meters meters with a status, `intervals` interval records and a live reading each."""
    from headend_harness import T0, interval_record, rt_record
    from headend.store import Store
    store = Store(url)
    for k in range(meters):
        mid = "bench-%04d" % k
        store.set_status(mid, {"online": k % 10 != 0, "transport": ("wifi", "nbiot", "plc")[k % 3],
                               "fw": "0.3.1", "board": "unix_sim_1ph", "signal": -70})
        for s in range(1, intervals + 1):
            store.add_interval(mid, s, interval_record(s, T0 + 900 * s, 250 * s, 0), b"")
        store.add_rt(mid, rt_record(T0 + 900 * intervals + 10, 500.0 + k))
    store.commit()
    store.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def bench_web(meters=1000, clients=50, duration_s=10.0, tmpdir=None, warmup_s=1.0):
    """-> {web_requests_per_s, web_p50_ms, web_p99_ms, web_errors, web_requests,
    meters, clients, duration_s}. Every answer must be 200; every 10th is parsed and must
    list all `meters` meters (an error otherwise, counted in web_errors)."""
    from headend.users import Users
    tmpdir = tmpdir or tempfile.mkdtemp(prefix="lipari-webbench-")
    url = "sqlite:///" + os.path.join(tmpdir, "web.db")
    make_fleet(url, meters)
    users = Users(url)
    users.add("bench", "viewer", "bench-password")
    token = users.new_token("bench", "bench")[1]
    port = free_port()
    log = open(os.path.join(tmpdir, "web.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "headend.web", "--db", url, "--port",
                             str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("lipari web did not start: %s" % open(
                        os.path.join(tmpdir, "web.log")).read()[-800:])
                time.sleep(0.05)
        hdr = {"Authorization": "Bearer " + token}
        lat = [[] for _ in range(clients)]
        counts = [[0, 0] for _ in range(clients)]       # ok, errors
        errors = []
        start = threading.Barrier(clients + 1)
        window = {}

        def client(k):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            start.wait(30)
            n = 0
            while True:
                now = time.monotonic()
                if now >= window["end"]:
                    break
                try:
                    c.request("GET", PATH, headers=hdr)
                    r = c.getresponse()
                    body = r.read()
                    ok = r.status == 200
                    if ok and n % 10 == 0:
                        ok = len(json.loads(body)) == meters
                    if not ok and len(errors) < 5:
                        errors.append("HTTP %d: %s" % (r.status, body[:200]))
                except (OSError, http.client.HTTPException) as e:
                    ok = False
                    if len(errors) < 5:
                        errors.append(repr(e))
                    c.close()
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                t = time.monotonic()
                if now >= window["t0"]:                  # count after the warm-up only
                    counts[k][0 if ok else 1] += 1
                    lat[k].append(t - now)
                n += 1
            c.close()

        ts = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        for t in ts:
            t.start()
        window["t0"] = time.monotonic() + warmup_s
        window["end"] = window["t0"] + duration_s
        start.wait(30)
        for t in ts:
            t.join(duration_s + warmup_s + 60)
        elapsed = duration_s
        ok = sum(c[0] for c in counts)
        bad = sum(c[1] for c in counts)
        all_lat = sorted(x for ls in lat for x in ls)
        pct = (lambda q: round(1000 * all_lat[min(len(all_lat) - 1, int(q * len(all_lat)))], 1)
               if all_lat else None)
        return {"web_requests_per_s": round(ok / elapsed, 1), "web_p50_ms": pct(0.5),
                "web_p99_ms": pct(0.99), "web_errors": bad, "web_requests": ok,
                "web_error_samples": errors, "meters": meters, "clients": clients,
                "duration_s": duration_s}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    import argparse
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), ROOT]
    p = argparse.ArgumentParser(prog="web_load.py")
    p.add_argument("--meters", type=int, default=1000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0)
    a = p.parse_args()
    print(json.dumps(bench_web(a.meters, a.clients, a.duration)))
