# The simulator's bus side must allocate nothing on MicroPython: the firmware's
# acquire path runs under micropython.heap_lock() with these fakes on the other end.
# Each operation runs locked on the real unix port; a control that does allocate
# proves the harness notices.
import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPY = os.path.join(REPO, ".venv", "bin", "micropython")

SCRIPT = r'''
import json
import micropython
from sim import stpm3x as S
from sim.bus import SimBoard
from sim.vclock import StepClock

CHIPS = ({"part": "STPM34", "ch": ({"phase": 1}, {"phase": 2})},
         {"part": "STPM33", "ch": ({"phase": 3},)})
clk = StepClock()
b = SimBoard(CHIPS, clock=clk, profile="household")
b.advance_to(3600000000)
bu = SimBoard(CHIPS, interface="uart")
spi = b.spi
scs = b.scs
syn = b.syn
c0 = b.chips[0]
c0.crc_error_rate = 0.2
c0.rx_error_rate = 0.1
tx = S.frame(0x48)
txff = S.frame(0xFF)
wr = S.frame(0xFF, 0x05, 0x0060)        # software latch via DSP_CR3
wr_sr = S.frame(0xFF, 0x20, 0x0000)     # clear DSP_SR1
rx = bytearray(5)
mv = memoryview(rx)
utx = S.frame(0x48, uart=True)
uff = S.frame(0xFF, uart=True)
u = bu.uarts[0]
urx = bytearray(5)

def t_control():
    bytearray(4)
def t_spi_frames():
    for i in range(2):
        scs[i].value(0)
        spi.write_readinto(tx, rx)
        scs[i].value(1)
        scs[i](0)
        spi.write_readinto(txff, mv)
        scs[i](1)
def t_spi_write_readinto():
    scs[0].off()
    spi.write(wr)
    scs[0].on()
    scs[1].low()
    spi.readinto(rx, 0xFF)
    scs[1].high()
    scs[0].value(0)
    spi.write(wr_sr)
    scs[0].value(1)
def t_syn_latch():
    syn.value(0)
    syn.value(1)
    for p in scs:
        p.value(0)
        p.value(1)
def t_syn_resets():
    syn(0); syn(1); syn.off(); syn.on(); syn.low(); syn.high()
def t_chip_direct():
    c0.spi_frame(tx, rx)
    c0.latch()
    c0.corrupt_next(1)
    c0.spi_frame(txff, rx)
def t_en():
    b.en[1].value(0)
    b.en[1].value(1)
def t_uart():
    u.write(utx)
    u.readinto(urx)
    u.write(uff)
    n = u.any()
    u.readinto(urx, n)
def t_clock():
    clk.ticks_us()
    clk.ticks_ms()
    clk.ticks_diff(clk.ticks_us(), 5)
    clk.sleep_us_busy(4)

res = {}
flag = [0]
for f in (t_control, t_spi_frames, t_spi_write_readinto, t_syn_latch, t_syn_resets,
          t_chip_direct, t_en, t_uart, t_clock):
    for _ in range(3):
        f()                      # warm up (first-call caches)
    flag[0] = 0
    micropython.heap_lock()
    try:
        for _ in range(40):
            f()
    except MemoryError:
        flag[0] = 1
    micropython.heap_unlock()
    res[f.__name__] = "alloc" if flag[0] else "ok"
# the work really happened
res["frames"] = c0.frames
res["uart_frames"] = bu.chips[0].frames
res["latches"] = c0.latches
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    path = tmp_path_factory.mktemp("heap") / "sim_heap_script.py"
    path.write_text(SCRIPT)
    env = dict(os.environ, MICROPYPATH=REPO + ":.frozen")
    p = subprocess.run([MPY, str(path)], capture_output=True, text=True, env=env,
                       timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr + p.stdout
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_harness_detects_allocation(res):
    assert res["t_control"] == "alloc"


@pytest.mark.parametrize("name", ["t_spi_frames", "t_spi_write_readinto", "t_syn_latch",
                                  "t_syn_resets", "t_chip_direct", "t_en", "t_uart",
                                  "t_clock"])
def test_no_allocation(res, name):
    assert res[name] == "ok"


def test_work_was_done(res):
    assert res["frames"] >= 258          # 6 frames x 43 runs on chip 0
    assert res["uart_frames"] >= 86
    assert res["latches"] > 100
