# Wi-Fi transport on the real micropython binary: plain TCP echo over the host network,
# refused / unreachable brokers, TLS with server verification and a client certificate,
# and WLAN join failures through a fake network.WLAN.
import os
import socket
import ssl
import subprocess
import threading

import pytest

from transport_harness import EchoServer, run_mpy, by_step

SCRIPT = r'''
import sys, json, asyncio, time
from comm.wifi import WifiTransport, WifiError

class FakeWlan:
    # network.WLAN look-alike: joins after join_ms unless the password is wrong
    def __init__(self, password, join_ms=200):
        self.pw = password; self.join_ms = join_ms; self.t = None; self.on = False
    def active(self, v=None):
        if v is not None: self.on = v
        return self.on
    def connect(self, ssid, pw):
        self.t = time.ticks_ms() if pw == self.pw else None
    def isconnected(self):
        return self.t is not None and time.ticks_diff(time.ticks_ms(), self.t) >= self.join_ms
    def status(self, what=None):
        return -61 if what == "rssi" else (1010 if self.isconnected() else 202)
    def disconnect(self):
        self.t = None

def say(step, **kw):
    kw["step"] = step
    print(json.dumps(kw))

def ms(t0):
    return time.ticks_diff(time.ticks_ms(), t0)

async def try_conn(w, step, host, port, tls=None, data=b"ping"):
    t0 = time.ticks_ms()
    try:
        c = await w.connect(host, port, tls)
        await c.send(data)
        buf = bytearray(len(data) + 16); got = b""
        while len(got) < len(data) and ms(t0) < 5000:
            n = await c.recv_into(buf, 200)
            got += bytes(buf[:n])
        say(step, ok=got == data, ms=ms(t0), name=c.name)
        c.close()
    except WifiError as e:
        say(step, ok=False, err=str(e), ms=ms(t0))

async def main():
    args = json.loads(sys.argv[1])
    w = WifiTransport()
    say("up", ok=await w.up(1000), health=w.health())
    await try_conn(w, "echo", "127.0.0.1", args["echo"], data=bytes(range(256)) * 40)
    await try_conn(w, "refused", "127.0.0.1", args["dead"])
    if "tls" in args:
        p = args["pki"]
        await try_conn(w, "tls_ok", "localhost", args["tls"], {"ca": p + "/ca.pem", "cert": p + "/cli.pem", "key": p + "/cli.key"})
        await try_conn(w, "tls_badca", "localhost", args["tls"], {"ca": p + "/srv.pem", "cert": p + "/cli.pem", "key": p + "/cli.key"})
        await try_conn(w, "tls_nocert", "localhost", args["tls"], {"ca": p + "/ca.pem"})
        await try_conn(w, "tls_noca", "localhost", args["tls"], {})
    # WLAN join: wrong password never joins within the budget; right one joins
    bad = WifiTransport({"ssid": "meters", "password": "nope"}, wlan=FakeWlan("secret"))
    t0 = time.ticks_ms()
    say("join_bad", ok=await bad.up(600), ms=ms(t0), health=bad.health())
    wl = FakeWlan("secret")
    good = WifiTransport({"ssid": "meters", "password": "secret"}, wlan=wl)
    say("join_good", ok=await good.up(2000), health=good.health())
    wl.disconnect()
    await good.check()
    say("lost", health=good.health())

asyncio.run(main())
'''


def _openssl(*a):
    subprocess.run(["openssl"] + list(a), check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    j = lambda n: os.path.join(d, n)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", j("ca.key"), "-out", j("ca.pem"), "-days", "2",
             "-subj", "/CN=lipari test ca")
    with open(j("ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who, cn in (("srv", "localhost"), ("cli", "meter-0001")):
        _openssl("req", *ec, "-keyout", j(who + ".key"), "-out", j(who + ".csr"), "-subj", "/CN=" + cn)
        _openssl("x509", "-req", "-in", j(who + ".csr"), "-CA", j("ca.pem"), "-CAkey", j("ca.key"),
                 "-CAcreateserial", "-out", j(who + ".pem"), "-days", "2", "-extfile", j("ext.cnf"))
    return d


class TlsEcho:
    """TLS echo server that requires a client certificate signed by the test CA."""

    def __init__(self, pki):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(os.path.join(pki, "srv.pem"), os.path.join(pki, "srv.key"))
        self.ctx.load_verify_locations(os.path.join(pki, "ca.pem"))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(4)
        self.port = self.ls.getsockname()[1]
        self.peers = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.settimeout(5)
            t = self.ctx.wrap_socket(c, server_side=True)
            self.peers.append(t.getpeercert()["subject"])
            while True:
                d = t.recv(4096)
                if not d:
                    break
                t.sendall(d)
        except (OSError, ssl.SSLError):
            pass
        c.close()


def test_wifi_tcp_tls_and_join(pki):
    echo = EchoServer()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()                       # nothing listens there
    tls = TlsEcho(pki)
    try:
        out, raw = run_mpy(SCRIPT, [__import__("json").dumps(
            {"echo": echo.port, "dead": dead_port, "tls": tls.port, "pki": pki})])
    finally:
        echo.stop()
    r = by_step(out)
    assert r["up"]["ok"] and r["up"]["health"]["ok"], raw
    assert r["echo"]["ok"] and r["echo"]["name"] == "wifi", raw
    assert not r["refused"]["ok"] and "refused" in r["refused"]["err"], raw
    assert r["refused"]["ms"] < 1000
    assert r["tls_ok"]["ok"], raw
    assert any(("commonName", "meter-0001") in rdn for s in tls.peers for rdn in s), tls.peers
    assert not r["tls_badca"]["ok"] and "not correctly signed" in r["tls_badca"]["err"], raw
    assert not r["tls_nocert"]["ok"], raw        # server insists on the meter certificate
    assert not r["tls_noca"]["ok"] and "CA file" in r["tls_noca"]["err"], raw
    jb = r["join_bad"]
    assert not jb["ok"] and 550 <= jb["ms"] < 1000 and "check SSID" in jb["health"]["detail"], jb
    jg = r["join_good"]
    assert jg["ok"] and jg["health"]["signal"] == -61, jg
    assert not r["lost"]["health"]["ok"] and "lost" in r["lost"]["health"]["detail"]
