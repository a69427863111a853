"""The meter's hardware watchdog (issue 7; firmware/watchdog.py, sim/bridge.py, sim/boardhost.py).

The real firmware runs on the unix port against the host's simulated board, with the
StepClock (deterministic). A harness wraps main.py and, on the first boot only, makes
  * the metering cycle hang in a busy loop (the whole MCU stops: no feed, no time),
  * the metering task hang on an await (the rest of the firmware runs on), or
  * the comm session's publisher hang on a PUBACK that never comes;
each ends in a reset by the board's watchdog within the timeout of the last feed, the
host restarts the MCU (the chips keep counting, the flash is kept) and the meter's energy
registers end equal to the simulator's exact energy: no watt-hour lost.
"""
import json
import os
import shutil
import sys

import pytest

from headend import ROOT
from headend.meter import firmware_env, micropython_path
from sim.boardhost import BoardHost

sys.path.insert(0, os.path.join(ROOT, "boards"))
import unix_sim_3ph  # noqa: E402

WDT_MS = 8000
EPOCH = 1767225600      # StepClock's default start, and --start on scaled time
FLAG_LOST = 0x10

HARNESS = r'''
import sys, os, json
mode = sys.argv[1]
at = int(sys.argv[2])
marker = sys.argv[3]
rest = sys.argv[4:]
try:
    os.stat(marker)
    first = False
except OSError:
    open(marker, "w").close()
    first = True

def say(clock):
    print(json.dumps({"type": "info", "msg": "hang", "t_us": clock.now_us()}))

if first and mode == "meter_busy":
    from metering import engine
    cyc = engine.Meter.cycle
    def cycle(self):
        if self.cycles >= at:
            say(self.clock)
            while True:            # the MCU is stuck: no task runs, no time passes
                pass
        return cyc(self)
    engine.Meter.cycle = cycle
elif first and mode == "meter_await":
    import asyncio
    from metering import engine
    async def run(self):
        while self.cycles < at:
            self.cycle()
            self.poll()
            await self.clock.sleep_ms(self.read_ms)
        say(self.clock)
        await asyncio.Event().wait()   # metering waits forever; the rest runs on
    engine.Meter.run = run
elif first and mode == "comm":
    import asyncio
    from comm import mqtt
    pub = mqtt.MQTTClient.publish
    n = [0]
    async def publish(self, topic, *a, **k):
        if topic.endswith("/interval"):
            n[0] += 1
            if n[0] > at:
                say(CLOCK[0])
                await asyncio.Event().wait()    # a PUBACK that never comes, no timeout
        return await pub(self, topic, *a, **k)
    mqtt.MQTTClient.publish = publish
CLOCK = [None]
import main
if mode == "comm":
    R = main.Run
    class Run(R):
        def start(self):
            CLOCK[0] = self.clock
            return R.start(self)
    main.Run = Run
main.main(rest)
if mode == "linger":                  # a REPL after main: the board's watchdog must not fire
    import time
    time.sleep(4)
'''


def run_meter(tmp_path, mode, at, days, extra=(), silence_s=3.0, speed=None):
    h = tmp_path / "harness.py"
    h.write_text(HARNESS)
    clock = ["--step"] if speed is None else ["--speed", str(speed), "--start", "1767225600"]
    argv = [micropython_path(), "-X", "heapsize=1m", str(h), mode, str(at),
            str(tmp_path / "first-boot-done"),
            "--board", "unix_sim_3ph", "--days", str(days), "--print", "json",
            "--state", str(tmp_path / "flash.img"), "--interval", "60"] + clock + list(extra)
    host = BoardHost(unix_sim_3ph, argv, firmware_env(), profile="household", seed=5,
                     silence_s=silence_s, cwd=os.path.join(ROOT, "firmware"))
    lines = []
    rc = host.run(lines.append)
    recs = []
    for ln in lines:
        if ln.startswith("{"):
            recs.append(json.loads(ln))
    exact = getattr(host, "exact_final", None)
    return rc, host, recs, lines, exact


@pytest.fixture(autouse=True)
def _exact_after_run(monkeypatch):
    # keep the board's exact energy at the end of the run (the host stops the board)
    stop = BoardHost.run

    def run(self, on_line=print):
        srv = self.server
        orig = srv.stop

        def keep():
            self.exact_final = sum(srv.exact_energy_wh(p)["ai"] for p in (1, 2, 3))
            self.board_time_us = srv.now_us()
            orig()
        srv.stop = keep
        return stop(self, on_line)
    monkeypatch.setattr(BoardHost, "run", run)


def check(rc, host, recs, lines, exact, bound_ms, speed=None):
    out = "\n".join(lines[-30:])
    assert rc == 0, out
    hang = [r for r in recs if r.get("msg") == "hang"]
    assert len(hang) == 1, out                     # hung once, on the first boot only
    assert len(host.resets) == 1, (host.resets, out)
    reason, at_us, fed_us = host.resets[0]
    assert reason == "watchdog"
    # reset within the timeout of the last feed (with scaled time: the board's timeout,
    # but never sooner than 2 s of real time), and the feeding stopped within the
    # firmware's bound after the hang began
    late = 1000000 if speed is None else int(2.5 * speed * 1000000)
    assert WDT_MS * 1000 <= at_us - fed_us <= WDT_MS * 1000 + late, host.resets
    t_hang = hang[0]["t_us"]
    assert fed_us <= t_hang + bound_ms * 1000 + 1000000, (fed_us, t_hang)
    assert at_us >= t_hang
    # two boots; the second found the chips still counting (boot value = bit mask of
    # the chips that kept their state, docs/protocol.md)
    boots = [r for r in recs if r.get("type") == "event" and r.get("kind") == "boot"]
    assert len(boots) == 2 and boots[1]["value"] == (1 << len(unix_sim_3ph.CHIPS)) - 1, boots
    summ = [r for r in recs if r.get("type") == "summary"]
    assert len(summ) == 1, out
    ivs = [r for r in recs if r.get("type") == "interval"]
    seqs = [r["seq"] for r in ivs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs   # none lost, none twice
    t0 = EPOCH                                    # the board's time 0
    after = [r for r in ivs if (r["t_end"] - t0) * 1000000 > at_us]
    assert after and not any(r["flags"] & FLAG_LOST for r in after), after
    # no watt-hour lost: each interval's register (latched within a read period after its
    # end; on scaled time a loaded host may stretch that) is the floor of the exact energy
    # of the load up to then, across the reset too
    lag = 1100000 if speed is None else 30000000
    for r in ivs:
        t = (r["t_end"] - t0) * 1000000
        lo, hi = exact_at(t), exact_at(t + lag)
        assert lo - 1 <= r["ai_wh"] <= hi, (r["seq"], r["ai_wh"], lo, hi)
    assert summ[0]["ai_wh"] == ivs[-1]["ai_wh"] or "unsent" not in summ[0]
    assert 0 <= exact - summ[0]["ai_wh"], (exact, summ[0])
    return summ[0]


def exact_at(t_us):
    """The true import energy of all phases at board time t_us: the test's load on a fresh
    simulated board (the physical energy depends on the load alone)."""
    from sim.bridge import MirrorClock
    from sim.bus import SimBoard
    b = SimBoard(unix_sim_3ph.CHIPS, interface="spi", profile="household", seed=5,
                 clock=MirrorClock(EPOCH))
    b.advance_to(int(t_us))
    return sum(b.exact_energy_wh(p)["ai"] for p in (1, 2, 3))


def test_hung_metering_cycle_busy_loop_resets_and_loses_nothing(tmp_path):
    r = run_meter(tmp_path, "meter_busy", 150, 0.01)
    check(*r, bound_ms=0)


def test_hung_metering_task_resets_and_loses_nothing(tmp_path):
    r = run_meter(tmp_path, "meter_await", 150, 0.01)
    check(*r, bound_ms=3000)


def test_watchdog_handed_back_when_the_main_loop_ends(tmp_path):
    """After main ends (here --days; Ctrl-C at a console too) the interpreter may live on:
    `lipari vboard`'s REPL, mpremote deploying. The board's watchdog is stopped then (a
    board's own, which cannot be, is fed by a timer), so no reset comes under them."""
    rc, host, recs, lines, exact = run_meter(tmp_path, "linger", 0, 0.002, silence_s=1.0)
    assert rc == 0, lines[-10:]
    assert host.resets == [], host.resets
    assert host.server.wdt.feeds > 100 and not host.server.wdt.armed
    assert [r for r in recs if r.get("type") == "summary"]


needs_broker = pytest.mark.skipif(not shutil.which("mosquitto"), reason="mosquitto not installed")


@needs_broker
def test_hung_comm_task_resets_and_every_record_is_delivered(tmp_path):
    """Comm runs on real time (its timeouts are real), so this one runs the meter on
    scaled time: 120 x, PUBACK timeout 1 s (comm hung after 2 x 1 s + 5 s of real time)."""
    from conftest_broker import Mosquitto
    from headend.ingest import Ingest
    from headend.store import Store
    from headend import meter_net
    broker = Mosquitto(tmp_path / "broker", users={"headend": "h-pw", "wd1": "wd1-pw"})
    broker.start()
    creds = meter_net.write_creds(str(tmp_path / "wd1.creds"), "wd1", "wd1-pw",
                                  session={"ack_timeout_ms": 1000})
    store = Store("sqlite:///%s/h.db" % tmp_path)
    ing = Ingest(store, port=broker.port, user="headend", password="h-pw",
                 client_id="wd-ingest").start()
    try:
        assert ing.connected.wait(5)
        speed = 120
        r = run_meter(tmp_path, "comm", 2, 0.02,
                      ["--broker", "127.0.0.1:%d" % broker.port, "--id", "wd1",
                       "--transport", "wifi", "--creds", creds], speed=speed)
        summ = check(*r, bound_ms=(2 * 1000 + 5000 + 1000) * speed, speed=speed)
        assert summ["unsent"] == 0, summ
        import time
        deadline = time.monotonic() + 10
        made = [x["seq"] for x in r[2] if x.get("type") == "interval"]
        while time.monotonic() < deadline:
            got = [x["seq"] for x in store.intervals("wd1")]
            if got == made:
                break
            time.sleep(0.2)
        assert got == made, (got, made)
    finally:
        ing.stop()
        broker.stop()
        store.close()
