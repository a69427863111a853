# PLC tunnel: firmware comm/plc.py on the real micropython binary, through a pty to the
# concentrator bridge (sim/plc.py, CPython) and on to a TCP echo server, over a line that
# loses and corrupts frames. Also the frame format itself, cross-checked between the
# firmware encoder (run under micropython) and the sim's independent CRC.
import json
import os
import sys

import pytest

from transport_harness import EchoServer, run_mpy, run_mpy_live, by_step, ROOT
from sim.plc import Concentrator, frame as sim_frame

SCRIPT = r'''
import sys, json, asyncio, time
from sim.modem import PtyUart
from comm.plc import PlcTransport, PlcError

path, port, scen = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def say(step, **kw):
    kw["step"] = step
    print(json.dumps(kw))

def ms(t0):
    return time.ticks_diff(time.ticks_ms(), t0)

async def echo(c, data, limit_ms=20000):
    t0 = time.ticks_ms()
    async def rx():
        got = bytearray(); buf = bytearray(512)
        while len(got) < len(data) and ms(t0) < limit_ms:
            n = await c.recv_into(buf, 200)
            got += buf[:n]
        return bytes(got)
    task = asyncio.create_task(rx())
    await c.send(data)
    got = await task
    return got == data, ms(t0), len(got)

async def main():
    t = PlcTransport(PtyUart(path), {"meter_id": "m-0042", "ack_ms": 120, "retries": 12})
    t0 = time.ticks_ms()
    ok = await t.up(5000)
    say("up", ok=ok, ms=ms(t0), health=t.health(), time=t.time())
    c = await t.connect("127.0.0.1", port)
    data = bytes((i * 7 + 3) & 0xFF for i in range(6000))
    good, dt, n = await echo(c, data)
    say("echo", ok=good, ms=dt, n=n, stats=t.stats, name=c.name)
    if scen == "lossy":
        return
    say("wait_close")
    t0 = time.ticks_ms()
    err = None
    while ms(t0) < 5000:
        try:
            await c.recv_into(bytearray(16), 200)
        except PlcError as e:
            err = str(e); break
    say("peer_closed", err=err, ms=ms(t0))
    c = await t.connect("127.0.0.1", port)
    say("cut")                       # the test cuts the line now
    await asyncio.sleep_ms(100)
    t0 = time.ticks_ms()
    try:
        await c.send(b"into the void")
        say("send_cut", ok=True)
    except PlcError as e:
        say("send_cut", ok=False, err=str(e), ms=ms(t0), health=t.health())
    say("uncut")
    await asyncio.sleep_ms(100)
    ok = await t.up(3000)
    c = await t.connect("127.0.0.1", port)
    good, dt, n = await echo(c, b"line is back")
    say("back", up=ok, ok=good)

asyncio.run(main())
'''


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.stop()


def test_frame_format_matches_between_firmware_and_sim():
    code = ("import sys, json, binascii\nfrom comm.plc import frame, FrameReader\n"
            "f = frame(5, 3, 250, b'\\xa5\\x5ahello')\n"
            "r = FrameReader(); r.feed(b'noise\\xa5' + f[:5]); a = r.next(); r.feed(f[5:])\n"
            "bad = bytearray(f); bad[7] ^= 1\n"
            "r2 = FrameReader(); r2.feed(bytes(bad) + f)\n"
            "print(json.dumps({'hex': binascii.hexlify(f).decode(), 'partial': a, "
            "'full': list(r.next()[:3]), 'resync': list(r2.next()[:3]), 'bad': r2.bad}))\n")
    out, raw = run_mpy(code)
    assert out, raw
    o = out[0]
    assert bytes.fromhex(o["hex"]) == sim_frame(5, 3, 250, b"\xa5\x5ahello"), raw
    assert o["partial"] is None and o["full"] == [5, 3, 250]
    assert o["resync"] == [5, 3, 250] and o["bad"] >= 1


def test_plc_tunnel_echo_over_lossy_line(echo):
    import time
    c = Concentrator(loss=0.1, corrupt=0.15, seed=7).start()
    t0 = time.time()
    try:
        out, raw = run_mpy(SCRIPT, [c.path, str(echo.port), "lossy"], timeout=50)
    finally:
        c.stop()
    t1 = time.time()
    r = by_step(out)
    assert r["up"]["ok"], raw
    # the concentrator's network time, taken somewhere during the run (however slow)
    assert t0 - 2 <= r["up"]["time"] <= t1 + 2
    assert r["up"]["health"]["signal"] == 12
    e = r["echo"]
    assert e["ok"], raw
    assert e["name"] == "plc"
    # the line really was bad, and the tunnel retransmitted its way through it
    assert c.stats["dropped_up"] + c.stats["dropped_down"] > 0
    assert c.stats["corrupted_down"] > 0 and e["stats"]["bad"] > 0, (c.stats, e)
    assert e["stats"]["retx"] > 0 and c.stats["retx_down"] > 0
    assert e["ms"] < 20000
    assert "m-0042" in c.joined


def test_plc_peer_close_cut_line_and_recovery(echo):
    c = Concentrator(loss=0.0, seed=3).start()

    def act(o):
        s = o.get("step")
        if s == "wait_close":
            echo.close_all()
        elif s == "cut":
            c.set("cut")
        elif s == "uncut":
            c.set("uncut")
    try:
        out, raw = run_mpy_live(SCRIPT, [c.path, str(echo.port), "faults"], act, timeout=40)
    finally:
        c.stop()
    r = by_step(out)
    assert r["echo"]["ok"], raw
    assert r["peer_closed"]["err"] and r["peer_closed"]["ms"] < 2000, raw
    sc = r["send_cut"]
    assert sc["ok"] is False and "PLC link lost" in sc["err"], raw
    assert sc["ms"] < 12 * 120 + 1000        # retries x ack_ms, bounded
    assert not sc["health"]["ok"]
    assert r["back"]["up"] and r["back"]["ok"], raw
