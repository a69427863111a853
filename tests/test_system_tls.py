"""The shipped Mosquitto configuration over TLS (conf/mosquitto/: the 8883 listener with
certificates made by conf/mosquitto/make-certs.sh): the head-end's own clients (ingest,
`lipari cmd`) verify the broker, still log in with their password, and an unrelated CA or an
anonymous client is refused."""
import json
import os
import ssl
import subprocess
import threading
import time

import pytest

from conftest_broker import CONF, Mosquitto
from headend import mqttcmd
from headend.ingest import Ingest
from headend.store import Store

paho = pytest.importorskip("paho.mqtt.client")


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("tls"), tls=True).start()
    yield b
    b.stop()


def connect(b, user, password, ca, cert=None, key=None, timeout_s=5):
    """-> the CONNACK reason, or the TLS error text."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="probe-%s" % user)
    if user:
        c.username_pw_set(user, password)
    c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
    got = threading.Event()
    res = {}

    def on_connect(cl, u, flags, rc, props=None):
        res["rc"] = str(rc)
        got.set()
    c.on_connect = on_connect
    try:
        c.connect("127.0.0.1", b.tls_port, 30)
    except (ssl.SSLError, OSError) as e:
        return "tls: %s" % e
    c.loop_start()
    got.wait(timeout_s)
    c.disconnect()
    c.loop_stop()
    return res.get("rc", "no CONNACK")


def test_shipped_config_has_the_tls_listener_on():
    conf = open(os.path.join(CONF, "mosquitto.conf")).read().splitlines()
    active = [x.split()[:2] for x in conf if x.strip() and not x.startswith("#")]
    assert ["listener", "8883"] in active
    for key in ("cafile", "certfile", "keyfile"):
        assert any(a[0] == key for a in active), key


def test_verified_login_over_tls_and_refusals(tls_broker):
    b = tls_broker
    assert connect(b, "headend", "headend-pw", b.ca) == "Success"
    assert "certificate verify failed" in connect(b, "headend", "headend-pw",
                                                  os.path.join(b.dir, "other.crt"))
    assert connect(b, None, None, b.ca) == "Not authorized"              # no anonymous
    assert connect(b, "headend", "wrong", b.ca) in ("Bad user name or password",
                                                    "Not authorized")


def test_ingest_and_commands_over_tls(tls_broker, tmp_path):
    """A meter publishes an interval over TLS; ingest (over TLS) stores it; a command
    through mqttcmd over TLS reaches the meter and its reply comes back."""
    b = tls_broker
    store = Store("sqlite:///%s" % (tmp_path / "tls.db"))
    ing = Ingest(store, "127.0.0.1", b.tls_port, "headend", "headend-pw", "ingest-tls",
                 tls_ca=b.ca).start()
    meter = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="m1")
    meter.username_pw_set("m1", "m1-pw")
    meter.tls_set(ca_certs=b.ca)

    def on_message(c, u, msg):
        req = json.loads(msg.payload)
        c.publish("lipari/v1/m1/resp", json.dumps({"id": req["id"], "ok": True,
                                                   "result": {"t": 1}}), 1)
    meter.on_message = on_message
    meter.connect("127.0.0.1", b.tls_port, 30)
    meter.subscribe("lipari/v1/m1/cmd", 1)
    meter.loop_start()
    try:
        assert ing.connected.wait(10)
        time.sleep(0.3)
        rec = {"v": 1, "k": "interval", "seq": 1, "t_end": 1767225600, "dur_s": 900, "flags": 0,
               "tariff": 0, "ai_wh": 250, "ae_wh": 0}
        meter.publish("lipari/v1/m1/interval", json.dumps(rec), 1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not store.intervals("m1"):
            time.sleep(0.1)
        assert [r["ai_wh"] for r in store.intervals("m1")] == [250]
        rep = mqttcmd.send_command("m1", "ping", {}, "127.0.0.1", b.tls_port, "headend",
                                   "headend-pw", timeout_s=10, tls_ca=b.ca)
        assert rep["ok"] and rep["result"] == {"t": 1}
    finally:
        meter.loop_stop()
        meter.disconnect()
        ing.stop()
        store.close()


def test_make_certs_issues_meter_credentials(tls_broker, tmp_path):
    """`make-certs.sh meter` gives a meter its MQTT password, command key and a client
    certificate from the same CA; with them it logs in over TLS."""
    b = tls_broker
    passwd = os.path.join(b.dir, "passwd")
    r = subprocess.run([os.path.join(CONF, "make-certs.sh"), "meter", b.dir, "m7", passwd,
                        str(tmp_path / "keys")], capture_output=True, text=True, check=True)
    lines = dict(x.split(" = ", 1) for x in r.stdout.splitlines() if " = " in x)
    pw = lines["mqtt_password"].strip('"')
    assert len(open(tmp_path / "keys" / "m7.key").read().strip()) == 64
    b.restart()                                   # re-reads the password file
    crt = os.path.join(b.dir, "meters", "m7.crt")
    out = subprocess.run(["openssl", "verify", "-CAfile", b.ca, crt], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert connect(b, "m7", pw, b.ca, crt, os.path.join(b.dir, "meters", "m7.key")) == "Success"
    assert connect(b, "m7", "not-" + pw, b.ca) != "Success"
