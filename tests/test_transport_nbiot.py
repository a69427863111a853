# NB-IoT transport: the firmware AT driver (comm/nbiot.py) on the real micropython binary
# talks through a pty to the BG95 emulator (sim/modem.py) running in this process, which
# opens real TCP connections to a local echo server. Each listed fault is switched on and
# the driver must get through it (or fail with a clear error) within a bounded time.
import time

import pytest

from transport_harness import EchoServer, run_mpy, run_mpy_live, by_step
from sim.modem import ModemEmu

# One MicroPython script, scenario chosen by argv[3]. Every step prints one JSON line.
SCRIPT = r'''
import sys, json, asyncio, time
from sim.modem import PtyUart
from comm.nbiot import NbiotTransport, ModemError

path, port, scen = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = {"apn": "iot.test", "reg_poll_ms": 100, "rd_poll_ms": 200, "cmd_ms": 800,
       "open_ms": 8000, "state_poll_ms": 1000}
if len(sys.argv) > 4:
    cfg.update(json.loads(sys.argv[4]))

def ms(t0):
    return time.ticks_diff(time.ticks_ms(), t0)

def say(step, **kw):
    kw["step"] = step
    print(json.dumps(kw))

async def echo(c, data, limit_ms=6000):
    await c.send(data)
    buf = bytearray(1600)
    got = bytearray()
    t0 = time.ticks_ms()
    while len(got) < len(data) and ms(t0) < limit_ms:
        n = await c.recv_into(buf, 300)
        got += buf[:n]
    return bytes(got) == data, ms(t0)

class Key:
    # the modem's PWRKEY: each edge is printed, the test applies it to the emulator
    def value(self, v):
        say("pin", v=v)

async def main():
    t = NbiotTransport(PtyUart(path), cfg, pwrkey=Key() if scen == "pwrkey" else None)
    t0 = time.ticks_ms()
    ok = await t.up(8000)
    say("up", ok=ok, ms=ms(t0), health=t.health(), time=t.time())
    if scen == "upfail":
        return
    if scen == "basic":
        c = await t.connect("127.0.0.1", port)
        good, dt = await echo(c, bytes(range(256)) * 12)
        say("echo", ok=good, ms=dt, name=c.name)
        c.close()
        await t.check()
        say("closed", stats=t.port.stats)
        await t.down()
        say("down", health=t.health())
    elif scen == "cme":
        t0 = time.ticks_ms()
        try:
            await t.connect("127.0.0.1", port)
            say("first", ok=True)
        except ModemError as e:
            say("first", ok=False, err=str(e), code=e.code, ms=ms(t0))
        c = await t.connect("127.0.0.1", port)
        good, dt = await echo(c, b"after cme")
        say("echo", ok=good)
    elif scen == "refused":
        t0 = time.ticks_ms()
        try:
            await t.connect("127.0.0.1", port)
            say("open", ok=True)
        except ModemError as e:
            say("open", ok=False, err=str(e), code=e.code, ms=ms(t0))
    elif scen == "echo":
        t0 = time.ticks_ms()
        c = await t.connect("127.0.0.1", port)
        say("connected", ms=ms(t0))
        good, dt = await echo(c, b"x" * 3000, 10000)
        say("echo", ok=good, ms=dt, stats=t.port.stats)
    elif scen == "parts":
        c = await t.connect("127.0.0.1", port)
        head, body = b"\x32\x10head", bytes(range(200))
        await c.send_parts((head, body))
        buf = bytearray(1600)
        got = bytearray()
        t0 = time.ticks_ms()
        while len(got) < len(head) + len(body) and ms(t0) < 6000:
            n = await c.recv_into(buf, 300)
            got += buf[:n]
        say("small", ok=bytes(got) == head + body)
        big = (b"a" * 1000, b"b" * 1000)     # over one AT+QISEND: part by part
        await c.send_parts(big)
        got = bytearray()
        t0 = time.ticks_ms()
        while len(got) < 2000 and ms(t0) < 6000:
            n = await c.recv_into(buf, 300)
            got += buf[:n]
        say("big", ok=bytes(got) == big[0] + big[1])
    elif scen == "late":
        # up() ran check(): its AT+CSQ was answered after cmd_ms, a timeout; the next
        # command is sent while that answer is still on its way
        reg = await t._reg_state()
        say("check1", health=t.health(), reg=reg, signal=t.signal_dbm, stats=t.port.stats)
        await t.check()
        say("check2", health=t.health(), reg=t.reg, signal=t.signal_dbm, stats=t.port.stats)
        c = await t.connect("127.0.0.1", port)
        good, dt = await echo(c, b"in step again")
        say("echo", ok=good)
    elif scen == "pwrkey":
        say("hang_me")                      # the test hangs the modem now
        await asyncio.sleep_ms(300)
        for _ in range(3):
            await t.check()
        say("hung", health=t.health(), timeouts=t.port.timeouts)
        t0 = time.ticks_ms()
        ok = await t.up(20000)
        say("reup", ok=ok, ms=ms(t0), cycles=t.power_cycles, health=t.health(),
            kept=[k for k in sys.modules if k == "comm.nbiot_up"])
        c = await t.connect("127.0.0.1", port)
        good, dt = await echo(c, b"after a power cycle")
        say("echo", ok=good)
    elif scen == "mute":
        t0 = time.ticks_ms()
        await t.check()
        say("check1", ms=ms(t0), health=t.health())
        t0 = time.ticks_ms()
        await t.check()
        say("check2", ms=ms(t0), health=t.health())
    elif scen == "wait_close":
        c = await t.connect("127.0.0.1", port)
        say("connected")
        t0 = time.ticks_ms()
        err = None
        while ms(t0) < 8000:
            try:
                await c.recv_into(bytearray(64), 200)
            except OSError as e:
                err = str(e)
                break
        say("closed", err=err, ms=ms(t0), health=t.health())
        if scen == "wait_close" and len(sys.argv) > 5:
            c.close()
            t0 = time.ticks_ms()
            ok = False
            while not ok and ms(t0) < 8000:
                ok = await t.up(3000)
            say("reup", ok=ok, ms=ms(t0),
                kept=[k for k in sys.modules if k == "comm.nbiot_up"])
            c = await t.connect("127.0.0.1", port)
            good, dt = await echo(c, b"back again")
            say("echo", ok=good)

asyncio.run(main())
'''


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.stop()


@pytest.fixture
def emu():
    made = []

    def make(**kw):
        m = ModemEmu(reg_delay_ms=kw.pop("reg_delay_ms", 100), **kw).start()
        made.append(m)
        return m
    yield make
    for m in made:
        m.stop()


def run(m, echo, scen, cfg=None, extra=(), on_obj=None):
    args = [m.path, str(echo.port), scen] + ([__import__("json").dumps(cfg or {})] + list(extra))
    if on_obj:
        out, raw = run_mpy_live(SCRIPT, args, on_obj)
    else:
        out, raw = run_mpy(SCRIPT, args)
    return by_step(out), raw


def test_attach_echo_time_and_at_sequence(emu, echo):
    # registration 1.5 s after power-up: the interpreter's start on a loaded machine can
    # take longer than the default 100 ms, and a modem already registered gets no CGATT
    m = emu(reg_delay_ms=1500)
    r, raw = run(m, echo, "basic")
    assert r["up"]["ok"], raw
    h = r["up"]["health"]
    assert h["ok"] and h["signal"] == -113 + 2 * 20, h
    assert abs(r["up"]["time"] - time.time()) < 5, "network time from AT+QLTS=1 is GMT"
    assert r["echo"]["ok"], raw
    assert r["echo"]["name"] == "nbiot"
    assert not r["down"]["health"]["ok"]
    log = m.log
    for cmd in ("ATE0", 'AT+QICSGP=1,1,"iot.test","","",0', "AT+CGATT=1", "AT+QIACT=1",
                "AT+QIRD=0,512", "AT+QICLOSE=0", "AT+QIDEACT=1"):
        assert cmd in log, (cmd, log)
    assert any(c.startswith('AT+QIOPEN=1,0,"TCP","127.0.0.1",') for c in log)
    # 3072 bytes go out in AT+QISEND chunks of at most 1460 bytes
    assert [c for c in log if c.startswith("AT+QISEND")] == \
        ["AT+QISEND=0,1460", "AT+QISEND=0,1460", "AT+QISEND=0,152"]


def test_sim_pin(emu, echo):
    m = emu(pin="4321")
    r, raw = run(m, echo, "upfail")
    assert not r["up"]["ok"] and "PIN" in r["up"]["health"]["detail"], raw
    m2 = emu(pin="4321")
    r, raw = run(m2, echo, "upfail", {"pin": "4321"})
    assert r["up"]["ok"], raw
    assert 'AT+CPIN="4321"' in m2.log
    m3 = emu(pin="4321")
    r, raw = run(m3, echo, "upfail", {"pin": "0000"})
    assert not r["up"]["ok"] and "incorrect SIM PIN" in r["up"]["health"]["detail"], raw


def test_cme_error_reply_then_recovers(emu, echo):
    m = emu()
    m.faults("cme=QIOPEN:566:1")
    r, raw = run(m, echo, "cme")
    assert r["first"]["ok"] is False and r["first"]["code"] == 566, raw
    assert "check broker address" in r["first"]["err"]
    assert r["first"]["ms"] < 1500
    assert r["echo"]["ok"], raw


def test_qiopen_failure_urc(emu, echo):
    m = emu()
    echo.stop()          # nothing listens: the modem reports +QIOPEN: 0,566
    r, raw = run(m, echo, "refused")
    assert r["open"]["ok"] is False and r["open"]["code"] == 566, raw
    assert "AT+QICLOSE=0" in m.log


def test_slow_replies(emu, echo):
    m = emu()
    m.faults("slow_ms=300")
    r, raw = run(m, echo, "echo")
    assert r["up"]["ok"], raw
    assert r["echo"]["ok"], raw
    assert r["echo"]["stats"]["timeouts"] == 0


def test_missing_reply_times_out_and_recovers(emu, echo):
    m = emu()
    m.faults("mute=CSQ:2")      # the first is eaten by the check() inside up()
    r, raw = run(m, echo, "mute")
    c1, c2 = r["check1"], r["check2"]
    assert 700 <= c1["ms"] < 1500, c1        # cmd_ms = 800: waited, then gave up
    assert "did not answer AT+CSQ" in c1["health"]["detail"]
    assert c2["ms"] < 700 and c2["health"]["ok"], c2


def test_late_reply_is_not_taken_for_the_next_answer(emu, echo):
    # AT+CSQ is answered 500 ms after the driver gave up on it: its "+CSQ: 20,99" and
    # "OK" arrive while the driver waits for the next command's answer. The driver
    # resynchronises (ATI, whose answer cannot be confused) before that next command.
    m = emu()
    m.faults("late=CSQ:1300:1")
    r, raw = run(m, echo, "late")
    c1, c2 = r["check1"], r["check2"]
    assert c1["stats"]["timeouts"] == 1 and c1["signal"] is None, c1
    assert c1["reg"] == 1, (c1, raw)          # AT+CEREG? got its own answer, not +CSQ's
    assert c2["health"]["ok"] and c2["signal"] == -113 + 2 * 20 and c2["reg"] == 1, c2
    assert r["echo"]["ok"], raw
    assert "ATI" in m.log


def test_hung_modem_is_power_cycled_with_pwrkey(emu, echo):
    # The board hands the modem's PWRKEY over (Hardware.modem_pwrkey); after max_timeouts
    # unanswered commands up() presses it: the hung module turns off, no RDY comes, the
    # driver presses again and the module boots (RDY) and attaches.
    m = emu()
    presses = []

    def act(o):
        if o.get("step") == "hang_me":
            m.set_fault("hang")
        elif o.get("step") == "pin":
            presses.append(o["v"])
            m.pwrkey(o["v"] == 1)
    r, raw = run(m, echo, "pwrkey", {"max_timeouts": 2, "rdy_ms": 2500, "pwrkey_ms": 700},
                 on_obj=act)
    assert not r["hung"]["health"]["ok"] and r["hung"]["timeouts"] >= 2, raw
    assert r["reup"]["ok"] and r["reup"]["cycles"] == 1, raw
    assert r["reup"]["kept"] == [], raw              # comm/nbiot_up.py: loaded for the call
    assert presses == [1, 0, 1, 0], presses          # off (no RDY), then on
    assert r["echo"]["ok"], raw


def test_hung_modem_up_fails_within_budget(emu, echo):
    m = emu()
    m.faults("hang")
    r, raw = run(m, echo, "upfail")
    assert r["up"]["ok"] is False, raw
    assert r["up"]["ms"] < 8000 + 1000, r["up"]
    assert "check power" in r["up"]["health"]["detail"]


def test_lost_urcs(emu, echo):
    # No "recv" URC at all and the +QIOPEN URC lost: polling AT+QIRD and AT+QISTATE
    # still deliver the data, in bounded time.
    m = emu()
    m.faults("lose_urc=recv,lose_urc=qiopen:1")
    r, raw = run(m, echo, "echo")
    assert r["connected"]["ms"] < 4000, raw
    assert any(c.startswith("AT+QISTATE=1,0") for c in m.log)
    assert r["echo"]["ok"] and r["echo"]["ms"] < 3000, raw


def test_lost_closed_urc_detected_by_state_poll(emu, echo):
    m = emu()
    m.faults("lose_urc=closed")

    def act(o):
        if o.get("step") == "connected":
            echo.close_all()
    r, raw = run(m, echo, "wait_close", on_obj=act)
    assert r["closed"]["err"] and r["closed"]["ms"] < 3000, raw


def test_detach_closes_conn_then_reattach(emu, echo):
    m = emu()

    def act(o):
        if o.get("step") == "connected":
            m.detach()
        elif o.get("step") == "closed":
            m.attach()
    r, raw = run(m, echo, "wait_close", extra=["reup"], on_obj=act)
    cl = r["closed"]
    assert cl["err"] and cl["ms"] < 1500, raw
    assert not cl["health"]["ok"]
    assert r["reup"]["ok"], raw
    # the bring-up ran again from comm/nbiot_up.py, loaded for the call and not kept
    assert r["reup"]["kept"] == [], raw
    assert r["echo"]["ok"], raw


def test_parts_go_out_as_one_send(emu, echo):
    """send_parts (comm.mqtt gives a PUBLISH's header and payload so, without copying the
    payload into a packet): parts that fit one AT+QISEND go in one, with the total length,
    written back to back after the prompt; parts over 1460 bytes together go part by
    part. The echo server returns exactly the bytes sent."""
    m = emu()
    r, raw = run(m, echo, "parts")
    assert r["small"]["ok"] and r["big"]["ok"], raw
    assert [c for c in m.log if c.startswith("AT+QISEND")] == \
        ["AT+QISEND=0,206", "AT+QISEND=0,1000", "AT+QISEND=0,1000"], m.log
