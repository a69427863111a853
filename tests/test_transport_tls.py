"""TLS over the modem and power-line links.

NB-IoT over TLS through the modem's own SSL stack (AT+QSSLCFG / QSSLOPEN / QSSLSEND /
QSSLRECV, the CA uploaded with AT+QFUPL), on the micropython binary against the BG95
emulator, whose TLS client is real (Python ssl) and configured only from what the
firmware put into the modem: a real Mosquitto TLS listener with the right CA accepts the
session, a wrong CA fails the handshake with a clear error and without stalling the
loop, and bulk data crosses a TLS echo server in both directions.

PLC: TLS ends at the concentrator (docs/transports.md "PLC: trust boundary"): a meter
that accepts that (plc tls_at_concentrator) reaches Mosquitto's TLS listener through a
concentrator that verifies the broker; a concentrator with the wrong CA refuses to open
the tunnel; a meter that does not accept it refuses TLS over PLC with a clear error."""
import json
import os
import socket
import ssl
import threading

import pytest

from conftest_broker import Mosquitto, make_certs
from sim.modem import ModemEmu, qf_checksum
from sim.plc import Concentrator
from transport_harness import run_mpy, by_step

SCRIPT = r'''
import sys, json, asyncio, time
from sim.modem import PtyUart
from comm.nbiot import NbiotTransport, ModemError
from comm.mqtt import MQTTClient

path, port, scen, tls = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
cfg = {"apn": "iot.test", "reg_poll_ms": 100, "rd_poll_ms": 200, "cmd_ms": 800,
       "open_ms": 8000, "state_poll_ms": 1000, "negotiate_s": 10}

def ms(t0):
    return time.ticks_diff(time.ticks_ms(), t0)

def say(step, **kw):
    kw["step"] = step
    print(json.dumps(kw))

async def ticker(st):
    while True:                     # a 20 ms task: how late does it get?
        t0 = time.ticks_ms()
        await asyncio.sleep_ms(20)
        st["worst"] = max(st["worst"], ms(t0) - 20)

async def main():
    st = {"worst": 0}
    tk = asyncio.create_task(ticker(st))
    t = NbiotTransport(PtyUart(path), cfg)
    ok = await t.up(8000)
    say("up", ok=ok, health=t.health())
    if scen == "mqtt":
        c = MQTTClient({"client_id": "m1", "host": "127.0.0.1", "port": port,
                        "password": "m1-pw", "tls": tls, "backoff_min_ms": 300,
                        "backoff_max_ms": 600, "connect_timeout_ms": 15000}, t.connect)
        task = asyncio.create_task(c.run())
        sent = False
        t0 = time.ticks_ms()
        while ms(t0) < 6000 and not sent:
            await asyncio.sleep_ms(50)
            if c.isconnected():
                await c.publish("lipari/v1/m1/event", b"over modem tls", 1, False, 5000)
                sent = True
        say("mqtt", sent=sent, stats=c.stats, worst=st["worst"], at=t.port.stats)
        c.stop()
    elif scen == "open":
        t0 = time.ticks_ms()
        try:
            c = await t.connect("127.0.0.1", port, tls)
            say("open", ok=True, ms=ms(t0))
        except ModemError as e:
            say("open", ok=False, err=str(e), code=e.code, ms=ms(t0), worst=st["worst"])
    elif scen == "echo":
        c = await t.connect("127.0.0.1", port, tls)
        data = bytes(range(256)) * 16
        await c.send(data)
        buf = bytearray(1600)
        got = bytearray()
        t0 = time.ticks_ms()
        while len(got) < len(data) and ms(t0) < 8000:
            n = await c.recv_into(buf, 300)
            got += buf[:n]
        say("echo", ok=bytes(got) == data, n=len(got), name=c.name, peer=c.peer)
        c.close()
        c2 = await t.connect("127.0.0.1", port, tls)   # the SSL context is kept
        await c2.send(b"again")
        n = 0
        t0 = time.ticks_ms()
        while not n and ms(t0) < 5000:
            n = await c2.recv_into(buf, 300)
        say("again", ok=bytes(buf[:n]) == b"again")
    tk.cancel()

asyncio.run(main())
'''


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("tls"), tls=True).start()
    yield b
    b.stop()


@pytest.fixture
def emu():
    made = []

    def make(**kw):
        m = ModemEmu(reg_delay_ms=100, **kw).start()
        made.append(m)
        return m
    yield make
    for m in made:
        m.stop()


class TlsEcho:
    """A TLS echo server with the test broker's certificate."""

    def __init__(self, d):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(os.path.join(d, "server.crt"), os.path.join(d, "server.key"))
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(4)
        self.port = self.ls.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            t = self.ctx.wrap_socket(c, server_side=True)
            while True:
                d = t.recv(4096)
                if not d:
                    break
                t.sendall(d)
        except OSError:
            pass
        c.close()

    def stop(self):
        self.ls.close()


def run(m, port, scen, tls):
    out, raw = run_mpy(SCRIPT, [m.path, str(port), scen, json.dumps(tls)], timeout=60)
    return by_step(out), raw


def test_mqtt_over_modem_tls_with_the_right_ca(emu, tls_broker):
    m = emu()
    r, raw = run(m, tls_broker.tls_port, "mqtt", {"ca": tls_broker.ca})
    assert r["up"]["ok"], raw
    q = r["mqtt"]
    assert q["sent"] and q["stats"]["connects"] == 1, raw
    assert q["worst"] < 200, q                  # the handshake happens in the modem
    log = m.log
    # the CA went into the modem's file system, the SSL context verifies the server
    assert any(c.startswith('AT+QFUPL="UFS:lp_ca.pem",') for c in log), log
    assert 'AT+QSSLCFG="seclevel",1,1' in log and \
        'AT+QSSLCFG="cacert",1,"UFS:lp_ca.pem"' in log, log
    assert any(c.startswith('AT+QSSLOPEN=1,1,0,"127.0.0.1",') for c in log), log
    assert any(c.startswith("AT+QSSLSEND=0,") for c in log)
    assert any(c.startswith("AT+QSSLRECV=0,") for c in log)
    assert not any(c.startswith("AT+QIOPEN") for c in log)     # no plain socket at all
    with open(tls_broker.ca, "rb") as f:
        ca = f.read()
    with open(os.path.join(m.ufs, "lp_ca.pem"), "rb") as f:
        assert f.read() == ca


def test_a_wrong_ca_fails_the_handshake_clearly(emu, tls_broker):
    m = emu()
    other = os.path.join(tls_broker.dir, "other.crt")
    r, raw = run(m, tls_broker.tls_port, "open", {"ca": other})
    o = r["open"]
    assert o["ok"] is False and o["code"] == 550, raw
    assert "TLS" in o["err"] and "CA" in o["err"], o
    assert o["worst"] < 200, o
    assert any("certificate verify failed" in e for e in m.tls_errors), m.tls_errors
    assert "AT+QSSLCLOSE=0" in m.log
    # and the MQTT client keeps trying without connecting
    r, raw = run(m, tls_broker.tls_port, "mqtt", {"ca": other})
    assert not r["mqtt"]["sent"] and r["mqtt"]["stats"]["connects"] == 0, raw
    assert "550" in r["mqtt"]["stats"]["last_error"], r["mqtt"]


def test_ca_provisioned_in_the_modem_and_a_missing_one(emu, tls_broker):
    m = emu()
    with open(tls_broker.ca, "rb") as f, open(os.path.join(m.ufs, "factory.pem"), "wb") as g:
        g.write(f.read())
    r, raw = run(m, tls_broker.tls_port, "open", {"modem_ca": "UFS:factory.pem"})
    assert r["open"]["ok"], raw
    assert not any(c.startswith("AT+QFUPL") for c in m.log)     # referenced, not uploaded
    m2 = emu()
    r, raw = run(m2, tls_broker.tls_port, "open", {"modem_ca": "UFS:absent.pem"})
    assert r["open"]["ok"] is False and r["open"]["code"] == 550, raw
    # no CA at all: refused before anything is sent to the modem
    r, raw = run(m2, tls_broker.tls_port, "open", {})
    assert r["open"]["ok"] is False and "needs a CA" in r["open"]["err"], raw


def test_bulk_data_both_ways_over_modem_tls(emu, tmp_path):
    make_certs(str(tmp_path))
    srv = TlsEcho(str(tmp_path))
    try:
        m = emu()
        r, raw = run(m, srv.port, "echo", {"ca": str(tmp_path / "ca.crt")})
        assert r["echo"]["ok"] and r["echo"]["name"] == "nbiot", raw
        assert r["echo"]["peer"].endswith(" tls"), r["echo"]
        assert r["again"]["ok"], raw
        # 4096 bytes go out in AT+QSSLSEND chunks of at most 1460 bytes
        sends = [c for c in m.log if c.startswith("AT+QSSLSEND=0,")]
        assert sends[:3] == ["AT+QSSLSEND=0,1460", "AT+QSSLSEND=0,1460",
                             "AT+QSSLSEND=0,1176"], sends
        # the CA was uploaded once and the SSL context configured once for both sockets
        assert sum(c.startswith("AT+QFUPL") for c in m.log) == 1
        assert sum(c.startswith('AT+QSSLCFG="seclevel"') for c in m.log) == 1
    finally:
        srv.stop()


def test_upload_checksum_matches_the_quectel_definition():
    # FILE AT Commands Manual: XOR of 16-bit words, an odd last byte as the high byte
    assert qf_checksum(b"\x12\x34\x56\x78") == 0x1234 ^ 0x5678
    assert qf_checksum(b"\x12\x34\x56") == 0x1234 ^ 0x5600
    out, raw = run_mpy("from comm.nbiot_up import qf_checksum\nimport json\n"
                       "print(json.dumps({'a': qf_checksum(bytes(range(255)))}))")
    assert out[0]["a"] == qf_checksum(bytes(range(255))), raw


PLC_SCRIPT = r"""
import sys, json, asyncio, time
from sim.modem import PtyUart
from comm.plc import PlcTransport, PlcError
from comm.mqtt import MQTTClient
path, port, tls, pcfg = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
async def main():
    cfg = {"meter_id": "m1", "ack_ms": 120, "retries": 12}
    cfg.update(pcfg)
    t = PlcTransport(PtyUart(path), cfg)
    print(json.dumps({"step": "up", "ok": await t.up(5000)}))
    try:
        c = await t.connect("127.0.0.1", port, tls)
        c.close()
        print(json.dumps({"step": "open", "ok": True}))
    except PlcError as e:
        print(json.dumps({"step": "open", "ok": False, "err": str(e)}))
        return
    m = MQTTClient({"client_id": "m1", "host": "127.0.0.1", "port": port,
                    "password": "m1-pw", "tls": tls, "connect_timeout_ms": 10000}, t.connect)
    task = asyncio.create_task(m.run())
    sent = False
    for _ in range(100):
        await asyncio.sleep_ms(50)
        if m.isconnected():
            await m.publish("lipari/v1/m1/event", b"over plc", 1, False, 5000)
            sent = True
            break
    print(json.dumps({"step": "mqtt", "sent": sent, "stats": m.stats}))
    m.stop()
asyncio.run(main())
"""


def run_plc(conc, port, tls, pcfg):
    out, raw = run_mpy(PLC_SCRIPT, [conc.path, str(port), json.dumps(tls), json.dumps(pcfg)],
                       timeout=60)
    return by_step(out), raw


def test_plc_tls_ends_at_a_concentrator_that_verifies_the_broker(tls_broker):
    tls = {"ca": tls_broker.ca}
    c = Concentrator(seed=1, upstream_ca=tls_broker.ca).start()
    try:
        r, raw = run_plc(c, tls_broker.tls_port, tls, {"tls_at_concentrator": True})
        assert r["up"]["ok"] and r["open"]["ok"], raw
        assert r["mqtt"]["sent"] and r["mqtt"]["stats"]["connects"] == 1, raw
        # the meter refuses TLS over PLC unless told that the concentrator terminates it
        r, raw = run_plc(c, tls_broker.tls_port, tls, {})
        assert r["open"]["ok"] is False and "concentrator" in r["open"]["err"], raw
    finally:
        c.stop()
    bad = Concentrator(seed=1, upstream_ca=os.path.join(tls_broker.dir, "other.crt")).start()
    try:
        r, raw = run_plc(bad, tls_broker.tls_port, tls, {"tls_at_concentrator": True})
        assert r["open"]["ok"] is False and "could not reach" in r["open"]["err"], raw
        assert "certificate verify failed" in bad.last_error, bad.last_error
    finally:
        bad.stop()


def test_lipari_meter_over_modem_and_plc_tls_into_the_database(tls_broker, tmp_path):
    # The whole chain with the real firmware (main.py, comm/wiring.py) as `lipari meter`
    # runs it: credentials naming the CA make the MQTT session TLS; over NB-IoT the BG95
    # emulator's SSL stack carries it, over PLC the concentrator (which verifies the broker
    # against the same CA, the meter accepting that with tls_at_concentrator).
    import subprocess
    import sys
    import time
    from headend import meter_net
    from headend.ingest import Ingest
    from headend.store import Store
    store = Store("sqlite:///%s/h.db" % tmp_path)
    ing = Ingest(store, port=tls_broker.port, user="headend", password="headend-pw",
                 client_id="tls-ingest", anchor=True).start()
    procs = {}
    try:
        assert ing.connected.wait(5)
        creds = {
            "m2": meter_net.write_creds(str(tmp_path / "m2.creds"), "m2", "m2-pw",
                                        ca=tls_broker.ca),
            "m3": meter_net.write_creds(str(tmp_path / "m3.creds"), "m3", "m3-pw",
                                        ca=tls_broker.ca, plc={"tls_at_concentrator": True})}
        for mid, tr in (("m2", "nbiot"), ("m3", "plc")):
            procs[mid] = subprocess.Popen(
                [sys.executable, "-m", "headend.cli", "meter", "--broker",
                 "127.0.0.1:%d" % tls_broker.tls_port, "--transport", tr, "--id", mid,
                 "--creds", creds[mid], "--days", "0.005", "--speed", "240", "--interval",
                 "60", "--start", "1767225600", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        outs = {mid: p.communicate(timeout=120)[0] for mid, p in procs.items()}
        time.sleep(1.0)
        for mid, tr in (("m2", "nbiot"), ("m3", "plc")):
            lines = [json.loads(ln) for ln in outs[mid].splitlines() if ln.startswith("{")]
            made = [r["seq"] for r in lines if r.get("type") == "interval"]
            summ = [r for r in lines if r.get("type") == "summary"]
            assert summ and summ[0]["unsent"] == 0 and len(made) >= 5, outs[mid][-1500:]
            assert [r["seq"] for r in store.intervals(mid)] == made, (mid, outs[mid][-800:])
            st = [s for s in store.status_log(mid) if s["status"].get("online")]
            assert st and st[-1]["status"]["transport"] == tr, st
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        ing.stop()
        store.close()
