# The simulated STPM3x's framing and register map, run on the real MicroPython unix
# port and on CPython: the same script prints JSON, the asserts check it.
import os

import pytest

from dualrun import run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPY = os.path.join(REPO, ".venv", "bin", "micropython")

SCRIPT = r'''
import json
from sim import stpm3x as S
from sim.bus import SimBoard

out = {}
rx = bytearray(5)

def val(b):
    return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)

def x(c, ra, wa=0xFF, data=0xFFFF, crc=True):
    c.spi_frame(S.frame(ra, wa, data, crc=crc), rx)
    return val(rx)

def read(c, row):
    x(c, row * 2)
    return x(c, 0xFF)

out["crc"] = [S.crc8(bytes([0xFF, 0x08, 0xFA, 0xF7])),
              S.crc8(bytes([0xFF, 0x08, 0xFA, 0xF7]), uart=True),
              S.crc8(bytes([0x04, 0x03, 0xCD, 0xAB]), uart=True)]
out["baud_regs"] = [S.baud_reg(b) for b in (2400, 9600, 19200, 57600, 115200, 230400, 460800)]

# reset values: first reply, then a burst of the whole map with 0xFF
c = S.Chip("STPM34")
out["first_reply"] = x(c, 0x00)
out["burst"] = [x(c, 0xFF) for _ in range(70)]
out["after_last"] = x(c, 0xFF)           # pointer wrapped to row 0

# datasheet example 1: 04 03 CD AB writes row 1 bits 31:16, requests row 2
c = S.Chip("STPM34")
r0 = x(c, 0x04, 0x03, 0xABCD)
out["ex1"] = [r0, x(c, 0x02), x(c, 0xFF)]   # row 2, then row 1
# datasheet example 2: 06 06 BB AA then FF FF FF FF
c = S.Chip("STPM34")
x(c, 0x06, 0x06, 0xAABB)
out["ex2"] = x(c, 0xFF, 0xFF, 0xFFFF)

# pipelining: reply N is the row chosen in frame N-1
c = S.Chip("STPM34")
out["pipe"] = [x(c, 0x00), x(c, 0x04), x(c, 0x24), x(c, 0x26), x(c, 0x02)]

# 16-bit half writes
c = S.Chip("STPM34")
x(c, 0xFF, 0x08, 0x1234)
lo = read(c, 4)
x(c, 0xFF, 0x09, 0x5678)
out["halves"] = [lo, read(c, 4)]

# read-only rows and bad addresses
c = S.Chip("STPM34")
x(c, 0xFF, 0x2A, 0x1234)
out["wr_ro"] = [read(c, 21), read(c, 20)]
c = S.Chip("STPM34")
x(c, 0x08)
x(c, 0x8C)
out["rd_bad"] = [x(c, 0x03), x(c, 0xFF), read(c, 20)]
# sticky US_REG3: writing 1s keeps nothing set, writing 0 clears; low half = masks
x(c, 0xFF, 0x29, 0xFFFF)
keep = read(c, 20)
x(c, 0xFF, 0x29, 0x0000)
x(c, 0xFF, 0x28, 0x00A5)
out["us3_clear"] = [keep, read(c, 20)]
# sticky DSP_SR1
c = S.Chip("STPM34")
c.pend_sr[0] = 0x04001000
c.latch()
a = read(c, 16)
x(c, 0xFF, 0x20, 0xFFFF)
x(c, 0xFF, 0x21, 0xFBFF)
b = read(c, 16)
x(c, 0xFF, 0x20, 0x0000)
out["sr_clear"] = [a, b, read(c, 16)]

# bad CRC: write ignored, CRC bit set, next reply not the row asked for
c = S.Chip("STPM34")
x(c, 0x08)
f = S.frame(0x06, 0x06, 0x1111)
f[4] ^= 0x01
c.spi_frame(f, rx)
out["bad_crc"] = [x(c, 0xFF), read(c, 3), read(c, 20), c.crc_errors]

# CRC disable / enable: 24 24 07 00 with CRC, then 4-byte frames, 24 24 07 40 without
c = S.Chip("STPM34")
x(c, 0x24, 0x24, 0x0007)
r4 = bytearray(4)
c.spi_frame(bytes([0x24, 0xFF, 0xFF, 0xFF]), r4)
off = val(r4)
c.spi_frame(bytes([0x24, 0x24, 0x07, 0x40]), r4)
c.spi_frame(bytes([0x24, 0xFF, 0xFF, 0xFF]), r4)
out["crc_toggle"] = [off, c.frame_len(), val(r4), x(c, 0xFF), rx[4] == S.crc8(rx[:4])]

# software latch (DSP_CR3 bit 21, self-clearing) and SW reset (bit 20)
c = S.Chip("STPM34")
c.live[42] = 0x12345678
before = read(c, 42)
x(c, 0xFF, 0x05, 0x0020)
out["sw_latch"] = [before, read(c, 42), read(c, 2), c.latches]
x(c, 0xFF, 0x08, 0x0001)
x(c, 0xFF, 0x26, 0x0341)
x(c, 0xFF, 0x05, 0x0010)
out["sw_reset"] = [read(c, 4), read(c, 19), read(c, 42), read(c, 2)]

# SYN pulses with SCS high: 1 latch, 2 reset measurement, 3 global reset
def pulses(c, n):
    for _ in range(n):
        c.set_syn(0)
        c.set_syn(1)
for n in (1, 2, 3):
    c = S.Chip("STPM34")
    x(c, 0xFF, 0x08, 0x0042)               # config change
    x(c, 0x24, 0x24, 0x0007)               # CRC off
    c.live[42] = 777
    c.live[23] = 0x0A000A00
    pulses(c, n)
    c.set_syn(0)   # SYN low while SCS low is ignored
    c.set_scs(0)
    c.set_syn(1)
    c.set_scs(1)
    out["syn%d" % n] = [c.regs[4], c.regs[42], c.regs[23], c.frame_len(), c.latches]
# an SCS pulse between pulses restarts the count: two latches, no reset
c = S.Chip("STPM34")
x(c, 0xFF, 0x08, 0x0042)
pulses(c, 1)
c.set_scs(0)
c.set_scs(1)
pulses(c, 1)
c.set_scs(0)
c.set_scs(1)
pulses(c, 1)
out["syn_scs"] = [c.regs[4], c.latches]

# EN low wipes the configuration; the rising edge samples SCS for the interface
c = S.Chip("STPM34")
x(c, 0xFF, 0x08, 0x0042)
c.set_en(0)
dead_reply = x(c, 0x00)
c.set_scs(1)
c.set_en(1)
out["en"] = [dead_reply, c.regs[4], c.interface]
c.set_en(0)
c.set_scs(0)
c.set_en(1)
c.set_scs(1)
out["en_spi"] = [c.interface, x(c, 0x00)]

# fault knobs
c = S.Chip("STPM34")
c.corrupt_next(2)
x(c, 0x00)
bad1 = rx[4] != S.crc8(rx[:4])
x(c, 0x00)
bad2 = rx[4] != S.crc8(rx[:4])
x(c, 0x00)
good = rx[4] == S.crc8(rx[:4]) and val(rx) == 0x040000A0
c.dead = True
x(c, 0x00)
d1 = list(rx)
c.dead_byte = 0x00
x(c, 0x00)
out["faults"] = [bad1, bad2, good, d1, list(rx)]
c = S.Chip("STPM34", seed=3)
c.crc_error_rate = 0.25
nbad = 0
for _ in range(400):
    x(c, 0x00)
    if rx[4] != S.crc8(rx[:4]):
        nbad += 1
out["rate"] = nbad

# the shared bus: no SCS low reads 0xFF; the selected chip answers; one SYN latches all
CHIPS = ({"part": "STPM34", "ch": ({"phase": 1}, {"phase": 2})},
         {"part": "STPM33", "ch": ({"phase": 3},)})
b = SimBoard(CHIPS)
buf = bytearray(5)
b.spi.write_readinto(S.frame(0x02), buf)
idle = list(buf)
def bx(i, ra, wa=0xFF, data=0xFFFF):
    b.scs[i].value(0)
    b.spi.write_readinto(S.frame(ra, wa, data), buf)
    b.scs[i].value(1)
    return val(buf)
bx(0, 0xFF, 0x08, 0x0042)
bx(0, 0x08)
bx(1, 0x08)
r = [bx(0, 0xFF), bx(1, 0xFF)]
b.pulse_syn()
out["bus"] = [idle, r, [ch.latches for ch in b.chips], b.chips[0].frames, b.chips[1].frames]

# UART: reflected CRC, replies queued, baud switch via US_REG2
b = SimBoard(CHIPS, interface="uart")
u = b.uarts[0]
u.write(S.frame(0x04, 0x03, 0xABCD, uart=True))
rep = bytearray(5)
n1 = u.readinto(rep)
first = [n1, val(rep), rep[4] == S.crc8(rep[:4], uart=True)]
u.write(S.frame(0xFF, 0x26, 0x008B, uart=True))     # 115200 baud
lost = [u.any(), u.lost, int(u.baud())]
u.write(S.frame(0x26, uart=True))                    # still 9600: not heard
unheard = [u.any(), b.chips[0].regs[20] >> 19 & 1]
u.init(baudrate=115200)
u.write(S.frame(0x26, uart=True))
u.readinto(rep)
u.write(S.frame(0xFF, uart=True))
n2 = u.readinto(rep)
got = [n2, val(rep) & 0xFFFF]
# a partial frame is dropped at the next write() (RX timeout)
u.write(bytes([0x02, 0xFF]))
u.write(S.frame(0x02, uart=True))
u.readinto(rep)
u.write(S.frame(0xFF, uart=True))
u.readinto(rep)
out["uart"] = [first, lost, unheard, got, val(rep), b.chips[0].regs[20] >> 18 & 1,
               b.uarts[1].any()]
# SPI bytes are not heard by a chip in UART mode
b.scs[0].value(0)
b.spi.write_readinto(S.frame(0x00), buf)
b.scs[0].value(1)
out["uart_spi"] = list(buf)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def mpy(tmp_path_factory):
    return run_script(SCRIPT, "sim_chip_script.py", tmp_path_factory.mktemp("mpy"))


@pytest.fixture(scope="module")
def cpy(tmp_path_factory):
    return run_script(SCRIPT, "sim_chip_script.py", tmp_path_factory.mktemp("cpy"), micropython=False)


def test_same_results_on_cpython(mpy, cpy):
    assert mpy == cpy


def test_crc_check_values(mpy):
    assert mpy["crc"] == [0xDD, 0xFC, 0x68]
    assert mpy["baud_regs"] == [0x1A0B, 0x0683, 0x0341, 0x0116, 0x008B, 0x0045, 0x0023]


def test_reset_values_and_first_reply(mpy):
    from sim import stpm3x
    assert mpy["first_reply"] == 0x040000A0
    assert mpy["burst"] == list(stpm3x.RESET_VALUES)
    assert mpy["burst"][:3] == [0x040000A0, 0x240000A0, 0x000004E0]
    assert mpy["burst"][12:14] == [0x0F270327, 0x03270327]
    assert mpy["burst"][18:20] == [0x00004007, 0x00000683]
    assert mpy["after_last"] == 0x040000A0


def test_datasheet_examples(mpy):
    assert mpy["ex1"] == [0x040000A0, 0x000004E0, 0xABCD00A0]
    assert mpy["ex2"] == 0x0000AABB


def test_pipelining(mpy):
    assert mpy["pipe"] == [0x040000A0, 0x040000A0, 0x000004E0, 0x00004007, 0x00000683]


def test_half_writes(mpy):
    assert mpy["halves"] == [0x003F1234, 0x56781234]


def test_read_only_rows_and_bad_addresses(mpy):
    row21, us3 = mpy["wr_ro"]
    assert row21 == 0 and us3 == 1 << 27
    r_odd, r_after, us3 = mpy["rd_bad"]
    # 0x8C and 0x03 are refused: the pointer stays on row 4
    assert r_odd == 0x003FF800 and r_after == 0x003FF800
    assert us3 == 1 << 26


def test_sticky_clears(mpy):
    keep, cleared = mpy["us3_clear"]
    assert keep == 1 << 26
    assert cleared == 0x00A5
    assert mpy["sr_clear"] == [0x04001000, 0x00001000, 0]


def test_bad_crc_ignored(mpy):
    reply, row3, us3, n = mpy["bad_crc"]
    assert reply == 0x003FF800       # old pointer (row 4), not row 3
    assert row3 == 0
    assert us3 & (1 << 28)
    assert n == 1


def test_crc_disable_enable(mpy):
    off, flen, reg, nxt, crc_ok = mpy["crc_toggle"]
    assert off == 0x00000007
    assert flen == 5
    # a 4-byte frame while CRC is on is incomplete: dropped, but it shifted out
    # the reply already loaded (row 18, now with CRC on)
    assert reg == 0x00004007
    assert nxt == 0x00004007 and crc_ok


def test_software_latch_and_reset(mpy):
    before, after, cr3, latches = mpy["sw_latch"]
    assert before == 0 and after == 0x12345678
    assert cr3 == 0x000004E0 and latches == 1
    row4, row19, row42, cr3 = mpy["sw_reset"]
    assert row4 == 0x003FF800        # configuration back to reset
    assert row19 == 0x0341           # serial rows kept
    assert row42 == 0x12345678       # data kept
    assert cr3 == 0x000004E0


def test_syn_pulse_counts(mpy):
    # 1: latched, config kept; 2: measurement rows reset; 3: global reset, CRC on
    assert mpy["syn1"] == [0x003F0042, 777, 0x0A000A00, 4, 1]
    assert mpy["syn2"] == [0x003F0042, 0, 0x09C409C4, 4, 2]
    assert mpy["syn3"][:4] == [0x003FF800, 0, 0x09C409C4, 5]
    assert mpy["syn_scs"] == [0x003F0042, 3]


def test_en_wipes_and_selects_interface(mpy):
    assert mpy["en"] == [0xFFFFFFFF, 0x003FF800, "uart"]
    assert mpy["en_spi"] == ["spi", 0x040000A0]


def test_fault_knobs(mpy):
    bad1, bad2, good, d1, d0 = mpy["faults"]
    assert bad1 and bad2 and good
    assert d1 == [0xFF] * 5 and d0 == [0] * 5
    assert 60 <= mpy["rate"] <= 140      # 25 % of 400


def test_shared_bus(mpy):
    idle, replies, latches, f0, f1 = mpy["bus"]
    assert idle == [0xFF] * 5
    assert replies == [0x003F0042, 0x003FF800]   # only chip 0 got the write
    assert latches == [1, 1]
    assert f0 == 3 and f1 == 2


def test_uart_framing_and_baud(mpy):
    first, lost, unheard, got, partial, timeout_bit, other = mpy["uart"]
    assert first == [5, 0x040000A0, True]
    assert lost[0] == 0 and lost[1] == 5 and 115000 < lost[2] < 115300
    assert unheard == [0, 1]
    assert got == [5, 0x008B]
    assert partial == 0xABCD00A0 and timeout_bit == 1
    assert other == 0
    assert mpy["uart_spi"] == [0xFF] * 5
