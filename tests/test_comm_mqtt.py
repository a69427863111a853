"""The meter's MQTT stack (firmware on micropython) against a real Mosquitto with the
repo's config, and the head-end ingest (CPython): QoS 1 redelivery across a broker restart,
exactly once in the database, keepalive, last will, commands, ACLs."""
import json
import os
import queue
import subprocess
import threading
import time

import paho.mqtt.client as paho
import pytest

from comm_harness import MP, MPPATH, ROOT
from conftest_broker import mosquitto  # noqa: F401  (fixture)
from headend.ingest import Ingest
from headend import mqttcmd
from headend.mqttcmd import send_command
from headend.store import Store

KEY = bytes(range(32))


class MpProc:
    """A micropython process whose stdout lines can be awaited."""

    def __init__(self, args):
        self.p = subprocess.Popen([MP, "-X", "heapsize=4M"] + args, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, MICROPYPATH=MPPATH), cwd=ROOT)
        self.lines = queue.Queue()
        self.all = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.all.append(line)
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pred, timeout=30):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.p.poll() is not None and self.lines.empty():
                    break
                continue
            if pred(line):
                return line
        raise AssertionError("micropython output did not arrive:\n" + "".join(self.all[-30:]))

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(5)


def wait_until(fn, timeout=15):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.1)
    return fn()


def paho_client(port, user, pw, cid=None, clean=True):
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid or "", clean_session=clean)
    c.username_pw_set(user, pw)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    return c


def test_session_exactly_once_through_broker_restart_commands_and_will(mosquitto, tmp_path):
    store = Store("sqlite:///%s/h.db" % tmp_path)
    ing = Ingest(store, port=mosquitto.port, user="headend", password="headend-pw",
                 client_id="ingest-test", anchor=True).start()
    assert ing.connected.wait(5)
    n = 40
    meter = MpProc(["tests/comm_meter_script.py", str(mosquitto.port), str(n), "30"])
    try:
        meter.wait_for(lambda l: l == "rec 10")
        mosquitto.restart(down_s=0.5)           # mid-stream: records queue in flash
        summary = json.loads(meter.wait_for(lambda l: l.startswith("{"), 60))
        assert summary["q"]["queued"] == 0 and summary["q"]["dropped"] == 0
        assert summary["mqtt"]["connects"] >= 2            # it reconnected by itself
        got = wait_until(lambda: len(store.intervals("m1")) == n and
                         len(store.events("m1")) == n // 5)
        assert got, (len(store.intervals("m1")), len(store.events("m1")))
        seqs = [r["seq"] for r in store.intervals("m1")]
        assert seqs == list(range(n))                       # in order, none lost, none twice
        assert store.intervals("m1")[3]["ai_wh"] == 5123456
        assert store.meters()[0]["online"] is True and store.meters()[0]["fw"] == "test-1"
        assert wait_until(lambda: store.rt("m1"))
        # commands over the live session
        rep = send_command("m1", "ping", port=mosquitto.port, user="headend",
                           password="headend-pw", timeout_s=10)
        assert rep["ok"] is True
        rep = send_command("m1", "preset", {"ai_wh": 42}, port=mosquitto.port, user="headend",
                           password="headend-pw", timeout_s=10)
        assert rep["error"] == "unauthorized"
        rep = send_command("m1", "preset", {"ai_wh": 42}, port=mosquitto.port, user="headend",
                           password="headend-pw", key=KEY, timeout_s=10)
        assert rep["ok"] is True, rep
        keys = tmp_path / "keys"
        keys.mkdir()
        (keys / "m1.key").write_text(KEY.hex())
        assert mqttcmd.main(["m1", "preset", "ai_wh=43", "--port", str(mosquitto.port),
                             "--user", "headend", "--password", "headend-pw",
                             "--keys", str(keys), "--timeout", "10"]) == 0
        rep = send_command("m1", "set", {"rt_s": 2, "payload": "json"}, port=mosquitto.port,
                           user="headend", password="headend-pw", timeout_s=10)
        assert rep["ok"] is True, rep
        rep = send_command("m1", "get", {"what": "config"}, port=mosquitto.port,
                           user="headend", password="headend-pw", timeout_s=10)
        assert rep["result"]["rt_s"] == 2 and rep["result"]["payload"] == "json"
        rep = send_command("m1", "set", {"rt_s": 0}, port=mosquitto.port, user="headend",
                           password="headend-pw", timeout_s=10)
        assert rep["error"] == "out_of_range" and "rt_s" in rep["msg"]
        rep = send_command("m1", "set", {"rt_s": "x" * 3000}, port=mosquitto.port,
                           user="headend", password="headend-pw", timeout_s=10)
        assert rep["error"] == "oversized"                  # discarded, answered, alive
        # the largest command (1024 bytes: comm/commands.py MAX_CMD_BYTES) fits the
        # client's resting receive buffer (1047 bytes for "m1": comm/mqtt.py rx_rest) and
        # is answered by its checks; one byte more is answered "oversized"
        n0 = len(json.dumps({"id": "0" * 16, "cmd": "set", "args": {"rt_s": ""}}))
        for n, want in ((1024, "bad_type"), (1025, "oversized")):
            rep = send_command("m1", "set", {"rt_s": "x" * (n - n0)}, port=mosquitto.port,
                               user="headend", password="headend-pw", timeout_s=10)
            assert rep["error"] == want, (n, rep)
        rep = send_command("m1", "ping", port=mosquitto.port, user="headend",
                           password="headend-pw", timeout_s=10)
        assert rep["ok"] is True
        # last will: the meter dies without DISCONNECT (keepalive 2 s)
        meter.kill()
        assert wait_until(lambda: store.meters()[0]["online"] is False, 10)
        assert [x["online"] for x in store.status_log("m1")][-1] is False
        # a command sent while the meter is away waits in its persistent session
        resp = []
        he = paho_client(mosquitto.port, "headend", "headend-pw")
        he.on_message = lambda c, u, m: resp.append(json.loads(m.payload))
        he.subscribe("lipari/v1/m1/resp", 1)
        time.sleep(0.3)
        he.publish("lipari/v1/m1/cmd", b'{"id": "while-away", "cmd": "ping"}', 1).wait_for_publish(5)
        meter = MpProc(["tests/comm_meter_script.py", str(mosquitto.port), "0", "5"])
        assert wait_until(lambda: [r for r in resp if r.get("id") == "while-away"], 15), resp
        assert wait_until(lambda: store.meters()[0]["online"] is True, 10)
        he.disconnect()
        he.loop_stop()
    finally:
        meter.kill()
        ing.stop()


REDELIVERY = r"""
import sys, asyncio, json
from comm.mqtt import MQTTClient
import comm_sockconn as sc
PORT = int(sys.argv[1])
async def main():
    c = MQTTClient({"client_id": "m2", "host": "127.0.0.1", "port": PORT, "user": "m2",
                    "password": "m2-pw", "keepalive_s": 2, "backoff_min_ms": 300,
                    "backoff_max_ms": 1000}, sc.connect)
    t = asyncio.create_task(c.run())
    await c.wait_connected(5000)
    sc.CONNS[-1].blackhole()            # the link dies silently: the PUBLISH never arrives
    p = asyncio.create_task(c.publish("lipari/v1/m2/event", b'{"v":1,"k":"event","seq":7,"t":1,"kind":"sag"}', 1, False, 30000))
    await asyncio.sleep_ms(300)
    print("sent")
    await p
    print(json.dumps(c.stats))
    await asyncio.sleep(4)                # idle: keepalive pings keep the session up
    print(json.dumps(c.stats))
    await c.disconnect()
asyncio.run(main())
"""


def test_qos1_redelivered_with_dup_after_broker_restart(mosquitto, tmp_path):
    # a persistent head-end session that is away during the restart
    ing = paho_client(mosquitto.port, "headend", "headend-pw", "sub-persist", clean=False)
    ing.subscribe("lipari/v1/+/event", 1)
    time.sleep(0.3)
    ing.disconnect()
    ing.loop_stop()
    script = tmp_path / "redeliver.py"
    script.write_text(REDELIVERY)
    meter = MpProc([str(script), str(mosquitto.port)])
    try:
        meter.wait_for(lambda l: l == "sent")
        mosquitto.restart(down_s=0.3)
        stats = json.loads(meter.wait_for(lambda l: l.startswith("{"), 30))
        assert stats["retransmits"] >= 1 and stats["connects"] >= 2
        later = json.loads(meter.wait_for(lambda l: l.startswith("{"), 30))
        assert later["pings"] > stats["pings"] and later["drops"] == stats["drops"]
        got = []
        sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="sub-persist",
                          clean_session=False)
        sub.username_pw_set("headend", "headend-pw")
        sub.on_message = lambda c, u, m: got.append((m.topic, m.payload))
        sub.connect("127.0.0.1", mosquitto.port)
        sub.loop_start()
        assert wait_until(lambda: got, 5)
        sub.disconnect()
        sub.loop_stop()
        assert got == [("lipari/v1/m2/event", b'{"v":1,"k":"event","seq":7,"t":1,"kind":"sag"}')]
    finally:
        meter.kill()


def test_acl_meter_cannot_publish_or_read_as_another(mosquitto):
    seen = []
    he = paho_client(mosquitto.port, "headend", "headend-pw")
    he.on_message = lambda c, u, m: seen.append((m.topic, m.payload))
    he.subscribe("lipari/v1/#", 1)
    m1_seen = []
    m1 = paho_client(mosquitto.port, "m1", "m1-pw", "m1")
    m1.on_message = lambda c, u, m: m1_seen.append(m.topic)
    m1.subscribe([("lipari/v1/m2/cmd", 1), ("lipari/v1/m1/cmd", 1), ("lipari/v1/+/rt", 1)])
    time.sleep(0.5)
    he.publish("lipari/v1/m2/cmd", b"for m2", 1).wait_for_publish(5)
    he.publish("lipari/v1/m1/cmd", b"for m1", 1).wait_for_publish(5)
    m1.publish("lipari/v1/m1/rt", b"own rt", 0)
    m1.publish("lipari/v1/m1/interval", b"own", 1).wait_for_publish(5)
    assert wait_until(lambda: ("lipari/v1/m1/interval", b"own") in seen
                      and "lipari/v1/m1/cmd" in m1_seen, 5)
    time.sleep(0.3)
    assert m1_seen == ["lipari/v1/m1/cmd"]      # not m2's cmd, not even its own rt
    # forging another meter's data: Mosquitto drops it (and 2.0 disconnects the client)
    for topic in ("lipari/v1/m2/interval", "lipari/v1/m2/status", "lipari/v1/m2/resp"):
        m1.publish(topic, b"forged", 1)
        time.sleep(0.3)
    time.sleep(0.5)
    assert not [t for t, p in seen if p == b"forged"]
    # wrong password is refused
    bad = paho.Client(paho.CallbackAPIVersion.VERSION2)
    bad.username_pw_set("m1", "wrong")
    rcs = []
    bad.on_connect = lambda c, u, f, rc, p=None: rcs.append(rc)
    bad.connect("127.0.0.1", mosquitto.port)
    bad.loop_start()
    wait_until(lambda: rcs, 5)
    bad.loop_stop()
    assert rcs and rcs[0].is_failure
    for c in (he, m1):
        c.disconnect()
        c.loop_stop()


def test_home_assistant_discovery_and_json_rt(mosquitto):
    got = {}
    ha = paho_client(mosquitto.port, "homeassistant", "ha-pw")
    ha.on_message = lambda c, u, m: got.setdefault(m.topic, m.payload)
    ha.subscribe([("homeassistant/#", 1), ("lipari/v1/+/rt", 0), ("lipari/v1/+/status", 1),
                  ("lipari/v1/+/interval", 1)])
    time.sleep(0.3)
    meter = MpProc(["tests/comm_meter_script.py", str(mosquitto.port), "3", "5", "m3", "ha"])
    try:
        assert wait_until(lambda: "lipari/v1/m3/rt" in got and
                          "homeassistant/sensor/m3/energy_import/config" in got, 15)
        cfg = json.loads(got["homeassistant/sensor/m3/energy_import/config"])
        assert cfg["device_class"] == "energy" and cfg["state_class"] == "total_increasing"
        assert cfg["state_topic"] == "lipari/v1/m3/rt" and cfg["unit_of_measurement"] == "Wh"
        assert cfg["availability"][0]["topic"] == "lipari/v1/m3/status"
        rt = json.loads(got["lipari/v1/m3/rt"])            # HA templates read JSON
        assert rt["k"] == "rt" and isinstance(rt["ai_wh"], int)
        assert json.loads(got["lipari/v1/m3/status"])["online"] is True
        assert "lipari/v1/m3/interval" not in got           # not for Home Assistant's eyes
    finally:
        meter.kill()
        ha.disconnect()
        ha.loop_stop()
