"""Head-end test and bench helpers (not a test file itself).

- `fill(store, ...)`: a small deterministic fleet history written through the real Store
  (interval records as docs/architecture.md "Records" defines them, events, live readings,
  status), for the web tests and screenshots.
- `interval_record(...)`, `rt_record(...)`: one record of each kind.
- `start_broker(...)` / `stop_broker(...)`: a throwaway Mosquitto for the web tests.
(The ingest bench is headend/loadtest_ingest.py, run by bench/headend_bench.py.)
"""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

T0 = 1767225600          # 2026-01-01T00:00:00Z, a Thursday


def load_w(profile, t):
    """Deterministic active power in W of a profile at epoch t (import > 0, export < 0)."""
    h = (t % 86400) / 3600.0
    if profile == "pv":                      # house with PV: exports at noon
        sun = max(0.0, math.sin(math.pi * (h - 6) / 12)) if 6 <= h <= 18 else 0.0
        return 400 + 300 * (h > 17) - 3500 * sun
    if profile == "motor":
        return 5500 if 7 <= h < 17 else 300
    if profile == "constant":
        return 1000
    return 250 + 1200 * math.exp(-((h - 19) ** 2) / 4) + 500 * math.exp(-((h - 7.5) ** 2) / 1)


def interval_record(seq, t_end, ai_wh, ae_wh, phases=1, dur_s=900, pmax_w=0, flags=0, tariff=0):
    return {"seq": seq, "t_end": t_end, "dur_s": dur_s, "flags": flags, "tariff": tariff,
            "ai_wh": ai_wh, "ae_wh": ae_wh, "rq_varh": [ai_wh // 10, 0, 0, ae_wh // 20],
            "ap_vah": ai_wh + ae_wh + ai_wh // 20,
            "ai_ph_wh": [ai_wh // phases] * phases, "ae_ph_wh": [ae_wh // phases] * phases,
            "v_min_mv": [226100] * phases, "v_max_mv": [234900] * phases,
            "v_avg_mv": [230400] * phases, "pmax_w": pmax_w, "sags": 0, "swells": 0,
            "tariff_wh": [ai_wh]}


def rt_record(t, p_w, phases=1, f_mhz=50012):
    per = p_w / phases
    v = [230100 + 700 * k for k in range(phases)]
    pf = 950 if p_w >= 0 else -990
    return {"t": t, "v_mv": v, "i_ma": [int(abs(per) / (vv / 1000) / (abs(pf) / 1000) * 1000) for vv in v],
            "p_mw": [int(per * 1000)] * phases, "q_mvar": [int(abs(per) * 300)] * phases,
            "pf_milli": [pf] * phases, "f_mhz": f_mhz}


FLEET = (  # id, transport, board, phases, profile
    ("m-house-1", "wifi", "unix_sim_1ph", 1, "household"),
    ("m-pv-2", "nbiot", "unix_sim_1ph", 1, "pv"),
    ("m-plant-3", "plc", "unix_sim_3ph", 3, "motor"),
)

FLEET_MORE = (  # two more for the screenshots: five meters as `make run` starts
    ("m-shop-4", "wifi", "unix_sim_3ph", 3, "household"),
    ("m-flat-5", "plc", "unix_sim_1ph", 1, "constant"),
)


def fill(store, days=3, t_start=T0, fleet=FLEET, interval_s=900):
    """Write `days` of history for every meter of `fleet` into store and commit.
    Returns {meter id: last interval record}."""
    last = {}
    for mid, transport, board, phases, profile in fleet:
        store.set_status(mid, {"online": True, "transport": transport, "fw": "0.3.1",
                               "board": board, "ota": "idle", "signal": -67})
        ai = ae = 0
        n = int(days * 86400 // interval_s)
        for k in range(1, n + 1):
            t = t_start + k * interval_s
            p = load_w(profile, t - interval_s // 2)
            e = p * interval_s / 3600.0
            if e >= 0:
                ai += int(round(e))
            else:
                ae += int(round(-e))
            rec = interval_record(k, t, ai, ae, phases, interval_s, int(abs(p) * 1.2))
            store.add_interval(mid, k, rec, b"raw")
            last[mid] = rec
        tl = t_start + n * interval_s
        store.add_rt(mid, rt_record(tl + 10, load_w(profile, tl), phases))
        store.add_event(mid, 1, {"seq": 1, "t": t_start + 3600, "kind": "power_up", "phase": None,
                                 "value": None})
        store.add_event(mid, 2, {"seq": 2, "t": t_start + 86400 + 4000, "kind": "sag", "phase": 1,
                                 "value": 195000})
    store.commit()
    return last


# -- a throwaway broker for the web tests ---------------------------------------------
def start_broker(kind="auto", workdir=None):
    """Start Mosquitto on a free loopback port -> (Popen, port, "mosquitto"). kind: auto or
    mosquitto (the embedded Python broker is gone: docs/decisions/0004). Stop with
    stop_broker()."""
    import shutil
    import socket
    import subprocess
    import tempfile
    import time
    from headend.system import mosquitto_conf, pick_port
    if kind not in ("auto", "mosquitto"):
        raise ValueError("broker %r: only Mosquitto (auto / mosquitto)" % kind)
    if not shutil.which("mosquitto"):
        raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
    kind = "mosquitto"
    port = pick_port("127.0.0.1", 0)
    workdir = workdir or tempfile.mkdtemp(prefix="lipari-bench-")
    conf = os.path.join(workdir, "mosquitto.conf")
    mosquitto_conf(conf, port, workdir)
    argv = ["mosquitto", "-c", conf]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port, kind
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_broker(proc)
                raise RuntimeError("%s broker did not start on port %d" % (kind, port))
            time.sleep(0.05)


def stop_broker(proc):
    import signal
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except Exception:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass


# -- a fake meter on MQTT (protocol-level stand-in for `lipari meter`) ----------------------
def fakemeter_main(argv):
    """python tests/headend_harness.py fakemeter ID HOST:PORT BOARD TRANSPORT PROFILE
    Publishes what a meter publishes (retained status with a last will, rt every 0.3 s,
    an interval record every second as JSON payloads) and answers commands. Stops on
    SIGTERM (saying offline first) or after 120 s."""
    import json
    import signal
    import threading
    import time
    import paho.mqtt.client as paho
    mid, broker, board, transport, profile = argv[:5]
    host, port = broker.rsplit(":", 1)
    phases = 3 if "3ph" in board else 1
    base = "lipari/v1/%s/" % mid
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=mid, clean_session=False)
    c.will_set(base + "status", json.dumps({"online": False}), 1, True)

    def on_connect(cl, u, flags, rc, props=None):
        cl.publish(base + "status", json.dumps({"online": True, "fw": "fake-0.1", "board": board,
                                                "transport": transport, "queued": 0,
                                                "dropped": 0, "reconnects": 0}), 1, True)
        cl.subscribe(base + "cmd", 1)

    def on_message(cl, u, msg):
        req = json.loads(msg.payload)
        inner = json.loads(req["body"]) if "body" in req else req
        cl.publish(base + "resp", json.dumps({"id": req["id"], "ok": True,
                                              "result": {"cmd": inner.get("cmd"),
                                                         "args": inner.get("args")}}), 1)

    c.on_connect, c.on_message = on_connect, on_message
    c.connect(host, int(port), 30)
    c.loop_start()
    seq, ai, t = 0, 0, T0
    deadline = time.monotonic() + 120
    next_iv = time.monotonic() + 1
    while not stop.is_set() and time.monotonic() < deadline:
        p_w = load_w(profile, t)
        rec = rt_record(t, p_w, phases)
        rec.update(v=1, k="rt")
        c.publish(base + "rt", json.dumps(rec), 0)
        if time.monotonic() >= next_iv:
            next_iv += 1
            seq += 1
            t += 900
            ai += int(max(0.0, p_w) / 4)
            iv = interval_record(seq, t, ai, 0, phases)
            iv.update(v=1, k="interval")
            c.publish(base + "interval", json.dumps(iv), 1)
        stop.wait(0.3)
    c.publish(base + "status", json.dumps({"online": False}), 1, True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    return 0


# -- stub process for the `lipari system` orchestration tests ------------------------------
def stub_main(argv):
    """python tests/headend_harness.py stub NAME PIDDIR [--ignore-term] [--grandchild]
    [--exit N]: writes PIDDIR/NAME.pid (and NAME.child.pid), then sleeps (at most 120 s)."""
    import signal
    import subprocess
    import time
    name, piddir = argv[0], argv[1]
    if "--ignore-term" in argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--grandchild" in argv:
        # like `lipari meter`, which runs micropython as its child in the same group
        c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open(os.path.join(piddir, name + ".child.pid"), "w") as f:
            f.write(str(c.pid))
    with open(os.path.join(piddir, name + ".pid"), "w") as f:
        f.write(str(os.getpid()))
    print("stub %s running, argv %s" % (name, argv), flush=True)
    if "--exit" in argv:
        return int(argv[argv.index("--exit") + 1])
    time.sleep(120)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["stub"]:
        sys.exit(stub_main(sys.argv[2:]))
    if sys.argv[1:2] == ["fakemeter"]:
        sys.exit(fakemeter_main(sys.argv[2:]))
    print(__doc__)
