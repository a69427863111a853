# Selector: priority wifi > nbiot > plc on the real micropython binary. Wi-Fi is a fake
# WLAN over the host network, NB-IoT the BG95 emulator, PLC the concentrator bridge, all
# reaching the same echo server. The link in use breaks one after the other; the
# selector fails over, then returns to Wi-Fi once it is healthy again.
import pytest

from transport_harness import EchoServer, run_mpy_live, by_step
from sim.modem import ModemEmu
from sim.plc import Concentrator

SCRIPT = r'''
import sys, json, asyncio, time
from sim.modem import PtyUart
from comm.transport import Selector, TransportError
from comm.wifi import WifiTransport
from comm.nbiot import NbiotTransport
from comm.plc import PlcTransport

class FakeWlan:
    def __init__(self): self.ap = True; self.joined = False; self.on = False
    def active(self, v=None):
        if v is not None: self.on = v
        return self.on
    def connect(self, ssid, pw): self.joined = self.ap
    def isconnected(self): return self.joined and self.ap
    def status(self, what=None): return -55 if what == "rssi" else 1010
    def disconnect(self): self.joined = False

def say(step, **kw):
    kw["step"] = step
    print(json.dumps(kw))

async def echo(c, data):
    await c.send(data)
    buf = bytearray(256); got = b""
    t0 = time.ticks_ms()
    while len(got) < len(data) and time.ticks_diff(time.ticks_ms(), t0) < 5000:
        n = await c.recv_into(buf, 100)
        got += bytes(buf[:n])
    return got == data

async def dead(c):
    try:
        await c.recv_into(bytearray(8), 50)
        return False
    except OSError:
        return True

async def main():
    modem, plc, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    wl = FakeWlan()
    ts = [WifiTransport({"ssid": "meters", "password": "x"}, wlan=wl),
          NbiotTransport(PtyUart(modem), {"reg_poll_ms": 100, "cmd_ms": 800, "open_ms": 5000}),
          PlcTransport(PtyUart(plc), {"ack_ms": 100, "retries": 5, "check_ms": 0})]
    sel = Selector(ts, priority=["wifi", "nbiot", "plc"],
                   cfg={"up_ms": 1500, "fail_hold_s": 0})
    c = await sel.connect("127.0.0.1", port)
    say("first", active=sel.active, echo=await echo(c, b"via wifi"))
    wl.ap = False; wl.joined = False               # access point gone
    r = await sel.step()
    say("wifi_lost", action=r, old_dead=await dead(c))
    t0 = time.ticks_ms()
    c = await sel.connect("127.0.0.1", port)
    say("second", active=sel.active, echo=await echo(c, b"via nbiot"),
        ms=time.ticks_diff(time.ticks_ms(), t0), errors=sel.errors)
    say("detach_now")                              # the test detaches the modem
    await asyncio.sleep_ms(300)
    r = await sel.step()
    say("nbiot_lost", action=r, old_dead=await dead(c))
    c = await sel.connect("127.0.0.1", port)
    say("third", active=sel.active, echo=await echo(c, b"via plc"), status=sel.status())
    r = await sel.step()
    say("no_change", action=r)
    wl.ap = True                                   # Wi-Fi is back
    r = await sel.step()
    say("wifi_back", action=r, old_dead=await dead(c))
    c = await sel.connect("127.0.0.1", port)
    say("fourth", active=sel.active, echo=await echo(c, b"wifi again"), switches=sel.switches)
    wl.ap = False; wl.joined = False
    say("unplug")                                  # the test cuts the PLC line too
    await asyncio.sleep_ms(100)
    await sel.step()
    try:
        await sel.connect("127.0.0.2", 1)          # and nobody listens there
        say("none", raised=False)
    except TransportError as e:
        say("none", raised=True, err=str(e), active=sel.active)

asyncio.run(main())
'''


def test_failover_and_return():
    echo = EchoServer()
    m = ModemEmu(reg_delay_ms=100).start()
    p = Concentrator(seed=1).start()

    def act(o):
        if o.get("step") == "detach_now":
            m.detach()
        elif o.get("step") == "unplug":
            p.set("cut")
    try:
        out, raw = run_mpy_live(SCRIPT, [m.path, p.path, str(echo.port)], act, timeout=50)
    finally:
        m.stop()
        p.stop()
        echo.stop()
    r = by_step(out)
    assert r["first"] == {"step": "first", "active": "wifi", "echo": True}, raw
    assert r["wifi_lost"]["action"] == "failover" and r["wifi_lost"]["old_dead"], raw
    assert r["second"]["active"] == "nbiot" and r["second"]["echo"], raw
    assert "wifi" in r["second"]["errors"]
    assert r["nbiot_lost"]["action"] == "failover" and r["nbiot_lost"]["old_dead"], raw
    assert r["third"]["active"] == "plc" and r["third"]["echo"], raw
    st = r["third"]["status"]
    assert st["active"] == "plc" and st["links"]["plc"]["ok"] and not st["links"]["nbiot"]["ok"]
    assert r["no_change"]["action"] == "ok", raw
    assert r["wifi_back"]["action"] == "return" and r["wifi_back"]["old_dead"], raw
    assert r["fourth"]["active"] == "wifi" and r["fourth"]["echo"], raw
    assert r["fourth"]["switches"] == 3
    assert "none" in r, raw
    n = r["none"]
    assert n["raised"] and n["active"] is None, raw
    for name in ("wifi:", "nbiot:", "plc:"):
        assert name in n["err"], n["err"]


def test_from_options_and_config_errors():
    m = ModemEmu().start()
    p = Concentrator().start()
    code = r'''
import sys, json
from comm.transport import from_options, Selector
from sim.ptyuart import PtyUart
sel = from_options({"transport": "plc,nbiot,wifi", "modem": PtyUart(sys.argv[1]),
                    "plc": PtyUart(sys.argv[2]),
                    "nbiot": {"apn": "x"}, "selector": {"probe_s": 10}})
errs = []
for o in ({"transport": "nbiot"}, {"transport": "lora"}, {"transport": "wifi", "selector": {"probe": 1}},
          {"transport": "wifi", "wifi": {"sid": "x"}}):
    try:
        from_options(o); errs.append(None)
    except ValueError as e:
        errs.append(str(e))
print(json.dumps({"order": [t.name for t in sel.order], "probe": sel.cfg["probe_s"], "errs": errs}))
'''
    try:
        out, raw = __import__("transport_harness").run_mpy(code, [m.path, p.path])
    finally:
        m.stop()
        p.stop()
    assert out, raw
    o = out[0]
    assert o["order"] == ["plc", "nbiot", "wifi"] and o["probe"] == 10
    e = o["errs"]
    assert "--modem" in e[0] and "unknown transport" in e[1]
    assert "unknown key 'probe'" in e[2] and "unknown key 'sid'" in e[3], e


SETTING = r'''
import sys, json, asyncio, os
from comm.transport import Selector
from comm.wiring import WiredSession
from comm.fqueue import FlashQueue
from comm_fakemeter import FakeMeter

class Conn:
    def __init__(self, t): self.name = t.name; self.t = t
    async def send(self, b): pass
    async def recv_into(self, b, ms): return 0
    def close(self): self.t.closed += 1

class T:
    def __init__(self, name): self.name = name; self.closed = 0
    async def up(self, ms): return True
    async def check(self): pass
    def health(self): return {"ok": True, "signal": None, "detail": ""}
    async def connect(self, h, p, tls=None): return Conn(self)
    def time(self): return None
    async def down(self): pass

def req(i, args):
    return json.dumps({"id": str(i), "cmd": "set", "args": args}).encode()

async def main():
    d = sys.argv[1]
    ts = [T("wifi"), T("nbiot"), T("plc")]
    sel = Selector(ts, ["wifi", "nbiot"])
    s = WiredSession("m1", {"host": "x"}, sel.connect, FlashQueue(d + "/q"), {}, {})
    s.selector = sel
    s.attach(FakeMeter())
    await sel.connect("x", 1)
    out = {"before": [t.name for t in sel.order], "active": sel.active}
    for i, a in enumerate(({"transport": ["plc", "wifi"]}, {"transport": ["eth"]},
                           {"transport": ["nbiot", "nbiot"]}, {"transport": []})):
        out["r%d" % i] = json.loads((await s.commands.handle(req(i, a)))[1])
    out["after"] = [t.name for t in sel.order]
    out["wifi_closed"] = ts[0].closed
    out["config"] = json.loads((await s.commands.handle(json.dumps(
        {"id": "c", "cmd": "get", "args": {"what": "config"}}).encode()))[1])["result"]
    sel2 = Selector([T("wifi")], ["wifi"])
    s.selector = sel2
    out["unfitted"] = json.loads((await s.commands.handle(req(9, {"transport": ["nbiot"]})))[1])
    print(json.dumps(out))

asyncio.run(main())
'''


def test_transport_setting_reorders_the_fitted_links(tmp_path):
    # `set transport` is applied by the session's Selector (not passed to a meter that
    # does not keep it): the new order at once, the link in use dropped when it is no
    # longer first; names not fitted on this meter are refused, naming the fitted ones
    import json
    from comm_harness import run_mp
    r = json.loads(run_mp(SETTING.replace("sys.argv[1]", repr(str(tmp_path))),
                          heapsize="4M").strip().splitlines()[-1])
    assert r["before"] == ["wifi", "nbiot"] and r["active"] == "wifi", r
    assert r["r0"]["ok"] and r["after"] == ["plc", "wifi"], r
    assert r["wifi_closed"] == 1, r               # reconnects over the new first link
    assert r["r1"]["error"] == "out_of_range", r  # no Ethernet transport exists
    assert r["r2"]["error"] == "out_of_range" and r["r3"]["error"] == "bad_type", r
    assert r["config"]["transport"] == ["plc", "wifi"], r["config"]
    assert r["unfitted"]["error"] == "refused" and "fitted: wifi" in r["unfitted"]["msg"], r
