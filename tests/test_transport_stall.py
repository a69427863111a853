# A hanging modem must never starve the metering task: a 10 ms asyncio ticker runs beside
# the NB-IoT driver (and the PLC tunnel) while the modem stops answering mid-connection,
# while up() retries against a dead modem, and while a PLC line is cut. The worst gap
# between ticks is measured on the real micropython binary and must stay under 100 ms.
from transport_harness import EchoServer, run_mpy_live, by_step
from sim.modem import ModemEmu
from sim.plc import Concentrator

SCRIPT = r'''
import sys, json, asyncio, time
from sim.modem import PtyUart
from comm.nbiot import NbiotTransport
from comm.plc import PlcTransport

worst = [0]
async def ticker():
    last = time.ticks_ms()
    while True:
        await asyncio.sleep_ms(10)
        now = time.ticks_ms()
        worst[0] = max(worst[0], time.ticks_diff(now, last) - 10)
        last = now

def say(step, **kw):
    kw["step"] = step
    kw["worst_ms"] = worst[0]
    print(json.dumps(kw))

def ms(t0):
    return time.ticks_diff(time.ticks_ms(), t0)

async def main():
    modem, plc, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.create_task(ticker())
    t = NbiotTransport(PtyUart(modem), {"reg_poll_ms": 100, "cmd_ms": 1000, "send_ms": 2000})
    ok = await t.up(5000)
    c = await t.connect("127.0.0.1", port)
    await c.send(b"x" * 4000)
    say("busy", ok=ok)
    say("hang_now")                      # the test hangs the modem here
    await asyncio.sleep_ms(50)
    t0 = time.ticks_ms(); err = None
    try:
        for _ in range(20):
            await c.send(b"y" * 1460)
            await c.recv_into(bytearray(1500), 200)
    except OSError as e:
        err = str(e)
    say("hung_io", err=err, ms=ms(t0))
    t0 = time.ticks_ms()
    t.ready = False
    ok = await t.up(3000)
    say("hung_up", ok=ok, ms=ms(t0), health=t.health())
    p = PlcTransport(PtyUart(plc), {"ack_ms": 150, "retries": 6})
    await p.up(2000)
    pc = await p.connect("127.0.0.1", port)
    say("cut_now")
    await asyncio.sleep_ms(50)
    t0 = time.ticks_ms(); err = None
    try:
        await pc.send(b"z" * 1000)
    except OSError as e:
        err = str(e)
    say("plc_cut", err=err, ms=ms(t0))

asyncio.run(main())
'''


def test_hung_modem_never_blocks_the_loop():
    echo = EchoServer()
    m = ModemEmu(reg_delay_ms=100).start()
    p = Concentrator(seed=2).start()

    def act(o):
        if o.get("step") == "hang_now":
            m.set_fault("hang")
        elif o.get("step") == "cut_now":
            p.set("cut")
    try:
        out, raw = run_mpy_live(SCRIPT, [m.path, p.path, str(echo.port)], act, timeout=40)
    finally:
        m.stop()
        p.stop()
        echo.stop()
    r = by_step(out)
    assert r["busy"]["ok"], raw
    hi = r["hung_io"]
    assert hi["err"] and "did not answer" in hi["err"] and hi["ms"] < 3000, raw
    hu = r["hung_up"]
    assert hu["ok"] is False and hu["ms"] < 3000 + 700, raw
    pc = r["plc_cut"]
    assert pc["err"] and pc["ms"] < 6 * 150 + 500, raw
    worst = max(o["worst_ms"] for o in out)
    print("worst loop stall while the modem hung: %d ms" % worst)
    assert worst < 100, raw
