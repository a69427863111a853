"""MQTT over TLS with server verification, on micropython with the Wi-Fi transport
(comm/wifi.py, the unix port's network): the right CA connects and publishes, a wrong CA
is refused and the client keeps retrying without holding up the loop."""
import json
import os

import pytest

from comm_harness import ROOT, run_mp
from conftest_broker import Mosquitto

if not os.path.exists(os.path.join(ROOT, "firmware", "comm", "wifi.py")):
    pytest.skip("comm/wifi.py (the transport) is not there yet", allow_module_level=True)

SCRIPT = r"""
import asyncio, json, time
from comm.wifi import WifiTransport
from comm.mqtt import MQTTClient, MqttError
async def main():
    t = WifiTransport()
    await t.up(5000)
    c = MQTTClient({"client_id": "m1", "host": "127.0.0.1", "port": PORT, "password": "m1-pw",
                    "tls": {"ca": CA}, "backoff_min_ms": 200, "backoff_max_ms": 400,
                    "connect_timeout_ms": 3000}, t.connect)
    task = asyncio.create_task(c.run())
    worst = 0
    ok = False
    for _ in range(60):                         # 3 s, measuring the loop's lateness
        t0 = time.ticks_ms()
        await asyncio.sleep_ms(50)
        worst = max(worst, time.ticks_diff(time.ticks_ms(), t0) - 50)
        if c.isconnected() and not ok:
            await c.publish("lipari/v1/m1/event", b"tls", 1, False, 3000)
            ok = True
    print(json.dumps({"ok": ok, "worst": worst, "stats": c.stats}))
    c.stop()
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("tls"), tls=True).start()
    yield b
    b.stop()


def _run(b, ca):
    code = SCRIPT.replace("PORT", str(b.tls_port)).replace("CA", repr(ca))
    return json.loads(run_mp(code, heapsize="4M", timeout=60).strip().splitlines()[-1])


def test_tls_with_the_right_ca_publishes(tls_broker):
    r = _run(tls_broker, tls_broker.ca)
    assert r["ok"] and r["stats"]["connects"] == 1, r


def test_tls_with_a_wrong_ca_is_refused_without_stalling(tls_broker):
    r = _run(tls_broker, os.path.join(tls_broker.dir, "other.crt"))
    assert not r["ok"] and r["stats"]["connects"] == 0, r
    assert r["stats"]["last_error"], r
    assert r["worst"] < 500, r
