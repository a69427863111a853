# The simulator's physics, load profiles and virtual clocks, run on the real
# MicroPython unix port and on CPython (same script, JSON out, asserts here).
import math
import os

import pytest

from dualrun import run_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPY = os.path.join(REPO, ".venv", "bin", "micropython")

SCRIPT = r'''
import json
import math
from sim import stpm3x as S
from sim import loads
from sim.bus import SimBoard
from sim.vclock import StepClock, ScaledClock
try:
    import asyncio
except ImportError:
    import uasyncio as asyncio

out = {}
CH = {"r1": 810000, "r2": 470, "sensor": "ct", "ks": 0.0024, "gain": 16}

def ch(phase, **kw):
    d = dict(CH)
    d["phase"] = phase
    for k in kw:
        d[k] = kw[k]
    return d

def gain16(chip):
    # what the driver does: channel 2 PGA x16 (reset value is x2)
    chip.regs[13] = (chip.regs[13] & 0xF3FFFFFF) | (3 << 26)

def set_gain(chip, code):
    # PGA of both channels: code 0..3 = x2, x4, x8, x16
    for row in (12, 13):
        chip.regs[row] = (chip.regs[row] & 0xF3FFFFFF) | (code << 26)

def s32(v):
    return v - 0x100000000 if v & 0x80000000 else v

def s29(v):
    v &= 0x1FFFFFFF
    return v - 0x20000000 if v & 0x10000000 else v

rx = bytearray(5)

def spi_read(b, i, row):
    buf = bytearray(5)
    for ra in (row * 2, 0xFF):
        b.scs[i].value(0)
        b.spi.write_readinto(S.frame(ra), buf)
        b.scs[i].value(1)
    return buf[0] | (buf[1] << 8) | (buf[2] << 16) | (buf[3] << 24)

# 1. exact energy vs register counts, through wraps, read over SPI every 10 s
b = SimBoard(({"part": "STPM34", "ch": (ch(1), ch(2))},),
             profile=loads.make("constant", v_rms=230.0, i_rms=10.0, pf=1.0, phases=2))
gain16(b.chips[0])
lsb = b.chips[0].phys.ch[0].lsb()
prev = [0, 0]
cnt = [0, 0]
wraps = 0
for k in range(1, 61):
    b.advance_to(k * 10000000)
    b.latch()
    for j in range(2):
        v = spi_read(b, 0, 42 + 12 * j)
        if j == 0 and v < prev[0]:
            wraps += 1
        cnt[j] += s32((v - prev[j]) & 0xFFFFFFFF)
        prev[j] = v
ex = [b.exact_energy_wh(1)["ai"], b.exact_energy_wh(2)["ai"]]
out["exact_const"] = [cnt[0] * lsb["e_wh"], cnt[1] * lsb["e_wh"], ex[0], ex[1], wraps]
r = b.chips[0].regs
out["rms"] = [r[36] & 0x7FFF, r[36] >> 15, s29(r[46]), lsb["v"], lsb["i"], lsb["p"]]

# household and PV on a 3-phase board (STPM34 + STPM33), every 30 s for 12 h
# (PGA x4: a 2.4 mV/A CT then takes ~44 A, enough for a kettle on top of the oven)
CHIPS3 = ({"part": "STPM34", "ch": (ch(1, gain=4), ch(2, gain=4))},
          {"part": "STPM33", "ch": (ch(3, gain=4),)})
lsb4 = b.chips[0].phys.ch[0].lsb(gain=4)
for name in ("household", "pv"):
    b = SimBoard(CHIPS3, profile=name, seed=7)
    set_gain(b.chips[0], 1)
    set_gain(b.chips[1], 1)
    prev = [0, 0, 0]
    cnt = [0, 0, 0]
    for k in range(1, 1441):
        b.advance_to(k * 30000000)
        b.latch()
        for n, (i, row) in enumerate(((0, 42), (0, 54), (1, 42))):
            v = b.chips[i].regs[row]
            cnt[n] += s32((v - prev[n]) & 0xFFFFFFFF)
            prev[n] = v
    res = []
    for ph in (1, 2, 3):
        e = b.exact_energy_wh(ph)
        res.append([cnt[ph - 1] * lsb4["e_wh"], e["ai"], e["ae"]])
    out["exact_" + name] = res

# 2. gain calibration with hidden sensor errors (reference CHV/CHC formulas)
b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},),
             profile=loads.make("constant", v_rms=230.0, i_rms=5.0, pf=1.0, phases=1))
c = b.chips[0]
c.phys.ch[0].gain_err_v = 0.008
c.phys.ch[0].gain_err_i = -0.005
b.advance_to(1000000)
b.latch()
vf0 = c.regs[36] & 0x7FFF
if0 = c.regs[36] >> 15
xv = 230.0 / lsb["v"]
xi = 5.0 / lsb["i"]
chv = int(14336 * xv / vf0 - 12288 + 0.5)
chc = int(14336 * xi / if0 - 12288 + 0.5)
c.regs[4] = (c.regs[4] & 0xFFFFF000) | chv
c.regs[5] = (c.regs[5] & 0xFFFFF000) | chc
b.advance_to(2000000)
b.latch()
out["cal"] = [vf0 * lsb["v"], if0 * lsb["i"], chv, chc,
              (c.regs[36] & 0x7FFF) * lsb["v"], (c.regs[36] >> 15) * lsb["i"],
              s29(c.regs[46]) * lsb["p"]]

# 3. phase compensation: CT leading 0.3 deg, PF 0.5 inductive
b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},),
             profile=loads.make("constant", v_rms=230.0, i_rms=5.0, phi_deg=60.0, phases=1))
c = b.chips[0]
c.phys.ch[0].phase_err_deg = -0.3
b.advance_to(1000000)
b.latch()
p_before = s29(c.regs[46]) * lsb["p"]
phc = int(0.3 / (360.0 * 50 / 4e6) + 0.5)
c.regs[3] = (c.regs[3] & ~(0x3FF << 12)) | (phc << 12)
b.advance_to(2000000)
b.latch()
out["phase"] = [p_before, s29(c.regs[46]) * lsb["p"], phc,
                (c.regs[39] >> 16) & 0xFFF, s29(c.regs[48]) * lsb["p"]]

# 4. sag / swell from thresholds, events and sticky bits
prof = loads.Steps(rows=((10, 230.0, 5.0, 0.0, 50.0), (10, 180.0, 5.0, 0.0, 50.0),
                         (10, 230.0, 5.0, 0.0, 50.0), (10, 260.0, 5.0, 0.0, 50.0),
                         (10, 230.0, 5.0, 0.0, 50.0)), phases=1)
b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},), profile=prof)
c = b.chips[0]
def thr(v):
    return int(v * math.sqrt(2) * 2 * 0.875 * 470 / 810470 * 1024 / 1.18 + 0.5)
c.regs[4] = (c.regs[4] & 0x00000FFF) | (thr(200) << 22) | (thr(250) << 12)
seen = []
for t in (5, 15, 25, 35, 45):
    b.advance_to(t * 1000000)
    b.latch()
    seen.append([c.regs[16] >> 26 & 15, c.regs[21] >> 22 & 0x1F])
    c.regs[16] = 0
out["sag"] = [seen, [[e[0], e[1]] for e in c.phys.events]]

# 5. period: 60 Hz, then out of range (frozen + PER_ERR)
b = SimBoard(({"part": "STPM34", "ch": (ch(1), ch(2))},),
             profile=loads.Steps(rows=((1, 230.0, 1.0, 0.0, 60.0), (1, 230.0, 1.0, 0.0, 100.0)),
                                 phases=2))
c = b.chips[0]
b.advance_to(500000)
b.latch()
p60 = [c.regs[23] & 0xFFF, c.regs[16] >> 25 & 1]
b.advance_to(1500000)
b.latch()
out["period"] = [p60, [c.regs[23] & 0xFFF, c.regs[23] >> 16, c.regs[16] >> 25 & 1,
                       c.regs[21] >> 21 & 1]]

# 6. signs, 29-bit powers, quadrants
q = []
for phi in (60.0, -36.8699, 150.0, -150.0):
    b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},),
                 profile=loads.make("constant", v_rms=230.0, i_rms=4.0, phi_deg=phi, phases=1))
    c = b.chips[0]
    b.advance_to(3600000000)
    b.latch()
    e = b.exact_energy_wh(1)
    q.append([c.regs[46], s29(c.regs[46]) * lsb["p"], s29(c.regs[48]) * lsb["p"],
              s29(c.regs[49]) * lsb["p"], c.regs[16] >> 12 & 15,
              [round(e[k], 6) for k in ("ai", "ae", "rq1", "rq2", "rq3", "rq4", "ap")],
              c.regs[44], c.regs[66]])
out["quad"] = q

# 7. harmonics, stuck sigma-delta, samples, rogowski integrator
b = SimBoard(({"part": "STPM34", "ch": (ch(1), ch(2, sensor="rogowski", ks=0.0001))},),
             profile=loads.make("constant", v_rms=230.0, i_rms=5.0, pf=1.0, phases=2))
c = b.chips[0]
gain16(c)
c.regs[1] |= 1 << 21            # ROC2: integrator on for the Rogowski channel
c.phys.ch[0].harmonics = ((3, 0.1, 0.3, 0.0),)
b.advance_to(1000000)
b.latch()
lsb_r = c.phys.ch[1].lsb()
h = [s29(c.regs[46]) * lsb["p"], s29(c.regs[47]) * lsb["p"], (c.regs[36] & 0x7FFF) * lsb["v"],
     (c.regs[37] >> 15) * lsb_r["i"], s29(c.regs[58]) * lsb_r["p"]]
c.regs[1] &= ~(1 << 21)         # integrator off: the coil's derivative, 90 deg off
b.advance_to(2000000)
b.latch()
h.append(s29(c.regs[58]) * lsb_r["p"])
c.phys.ch[0].stuck_i = True
b.advance_to(3000000)
b.latch()
smp = c.regs[24]
h += [c.regs[36] >> 15, c.regs[16] >> 20 & 1, smp - 0x100000000 if smp & 0x80000000 else smp]
out["misc"] = h

# 7b. ADC clipping and the fullscale profile
b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},),
             profile=loads.make("constant", v_rms=230.0, i_rms=20.0, phases=1))
b.advance_to(1000000)
b.latch()
clip = (b.chips[0].regs[36] >> 15) * lsb["i"]
b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},), profile="fullscale")
b.advance_to(1000000)
b.latch()
r = b.chips[0].regs[36]
out["clip"] = [clip, b.chips[0].phys.ch[0].i_full(), b.load.at(0)[0][1],
               (r >> 15) * lsb["i"], (r & 0x7FFF) * lsb["v"]]

# 8. two SYN pulses reset the counters; the true energy goes on
b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},),
             profile=loads.make("constant", v_rms=230.0, i_rms=5.0, phases=1))
c = b.chips[0]
b.advance_to(10000000)
b.latch()
e1 = c.regs[42]
b.pulse_syn()
b.pulse_syn()                   # second pulse without SCS: measurement reset
b.scs[0].value(0)               # SCS pulse: the next SYN pulse is a first one again
b.scs[0].value(1)
b.advance_to(20000000)
b.latch()
out["reset2"] = [e1, c.regs[42], b.exact_energy_wh(1)["ai"]]

# 9. load profiles: deterministic, shapes
hh = loads.make("household", seed=3)
pv = loads.make("pv", seed=3)
mo = loads.make("motor", seed=3)
iec = loads.make("iec", in_a=5.0, imax_a=60.0)
out["loads"] = {
    "hh": [list(hh.at(t)[0]) for t in (0, 30000, 43200, 70000)],
    "hh_next": hh.next_change(125.5),
    "pv_noon": list(pv.at(12 * 3600)[1]),
    "pv_night": list(pv.at(2 * 3600)[1]),
    "motor": [list(mo.at(t)[0]) for t in (0, 15, 95)],
    "iec_n": len(iec.points),
    "iec": [list(iec.at(t)[0]) for t in (0, 10, 75, 85, 165)],
    "hash": [loads.hash01(1, k) for k in range(3)],
}

# 10. virtual clocks
clk = StepClock(start_epoch=1767225600)
b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},), clock=clk,
             profile=loads.make("constant", v_rms=230.0, i_rms=5.0, phases=1))
hooks = []
clk.hooks.append(lambda t: hooks.append(t))
order = []
async def task(name, ms, n):
    for _ in range(n):
        await clk.sleep_ms(ms)
        order.append([name, clk.ticks_ms()])
async def main():
    await asyncio.gather(task("a", 300, 4), task("b", 500, 3))
asyncio.run(main())
clk.sleep_us_busy(40)
tw = [clk.ticks_diff(5, 0x3FFFFFFB), clk.ticks_diff(0x3FFFFFFB, 5)]
t_before = clk.time()
clk.set_time(1800000000)
out["step"] = [order, hooks, b.chips[0].phys.t_us, clk.now_us(), tw, t_before,
               clk.time(), clk.synced, StepClock(start_epoch=0).synced]
# set_load integrates the old load up to the clock's now before switching
clk2 = StepClock()
b = SimBoard(({"part": "STPM32", "ch": (ch(1),)},), clock=clk2,
             profile=loads.make("constant", v_rms=230.0, i_rms=5.0, phases=1))
clk2.sleep_us_busy(3600000000)          # time moved, no hook yet
b.set_load(loads.make("constant", v_rms=230.0, i_rms=0.0, phases=1))
clk2.advance(3600000000)
out["set_load"] = b.exact_energy_wh(1)["ai"]
sc = ScaledClock(speed=200.0)
async def m2():
    t0 = sc.now_us()
    await sc.sleep_ms(2000)
    return sc.now_us() - t0
out["scaled"] = asyncio.run(m2())
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def mpy(tmp_path_factory):
    return run_script(SCRIPT, "sim_physics_script.py", tmp_path_factory.mktemp("mpy"))


@pytest.fixture(scope="module")
def cpy(tmp_path_factory):
    return run_script(SCRIPT, "sim_physics_script.py", tmp_path_factory.mktemp("cpy"), micropython=False)


def _close(a, b, rel=1e-9):
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
    return a == b


def test_cpython_agrees(mpy, cpy):
    cpy = dict(cpy)
    mpy = dict(mpy)
    # 2 s of virtual sleep at speed 200 (real-time slack is scaled up 200 times)
    assert 2000000 <= mpy.pop("scaled") < 4000000
    assert 2000000 <= cpy.pop("scaled") < 4000000
    assert _close(mpy, cpy)


def test_exact_energy_constant_through_wraps(mpy):
    e1, e2, x1, x2, wraps = mpy["exact_const"]
    assert wraps >= 5                       # ~74 s per wrap at 2.3 kW
    assert x1 == pytest.approx(2300 * 600 / 3600, rel=1e-12)
    assert abs(e1 / x1 - 1) < 1e-6
    assert abs(e2 / x2 - 1) < 1e-6         # channel 2 after the x16 gain write


@pytest.mark.parametrize("name", ["household", "pv"])
def test_exact_energy_profiles(mpy, name):
    total_ae = 0
    for reg_wh, ai, ae in mpy["exact_" + name]:
        assert ai > 100                     # half a day of load
        assert abs(reg_wh - (ai - ae)) < 1e-6 * (ai + ae)
        total_ae += ae
    if name == "pv":
        assert total_ae > 100               # it exported at midday
    else:
        assert total_ae == 0


def test_rms_and_power_fields(mpy):
    vf, if_, p, lv, li, lp = mpy["rms"]
    assert lv == pytest.approx(0.03548, rel=1e-3)    # reference worked example
    assert li == pytest.approx(0.000268, rel=2e-3)
    assert vf == round(230 / lv) and if_ == round(10 / li)
    assert abs(p * lp - 2300) <= lp


def test_gain_calibration(mpy):
    v0, i0, chv, chc, v1, i1, p1 = mpy["cal"]
    assert v0 == pytest.approx(230 * 1.008, rel=2e-4)
    assert i0 == pytest.approx(5 * 0.995, rel=2e-4)
    assert chv < 0x800 < chc
    assert v1 == pytest.approx(230, rel=3e-4)       # 15-bit field: 1.5e-4 per LSB
    assert i1 == pytest.approx(5, rel=1e-4)
    assert p1 == pytest.approx(1150, rel=2e-4)


def test_phase_compensation(mpy):
    before, after, phc, cpha, q = mpy["phase"]
    assert before / 575 - 1 > 0.008         # 0.3 deg at PF 0.5: ~0.9 % high
    assert phc == 67
    assert after == pytest.approx(575, rel=2e-4)
    assert cpha == round(60 / 360 * 2500)
    assert q == pytest.approx(1150 * math.sin(math.radians(60)), rel=2e-4)


def test_sag_swell(mpy):
    seen, events = mpy["sag"]
    # [SR1 bits 26..29 (sag start, sag end, swell start, swell end), EV1 bits 22..26]
    assert seen[0] == [0, 0]
    assert seen[1][0] == 0b0001 and seen[1][1] & 0x10     # sag start, sag history
    assert seen[2][0] == 0b0010                            # sag end
    assert seen[3][0] == 0b0100 and seen[3][1] & 0x01     # swell start
    assert seen[4][0] == 0b1000
    kinds = [k for _, k in events]
    assert kinds == ["sag_start", "sag_end", "swell_start", "swell_end"]
    t = [x for x, _ in events]
    assert t[0] == 10000000 + 1248 * 8 and t[1] == 20000000
    assert t[2] == 30000000 + 1248 * 8 and t[3] == 40000000


def test_period(mpy):
    p60, bad = mpy["period"]
    assert p60 == [round(125000 / 60), 0]
    assert bad == [2083, 2083, 1, 1]


def test_signs_and_quadrants(mpy):
    q60, qcap, qexp_ind, qexp_cap = mpy["quad"]
    # raw 29-bit field: bits 31:29 clear; sign bit 28 only on export
    assert q60[0] < 1 << 28 and qexp_ind[0] >> 28 == 1 and qexp_ind[0] < 1 << 29
    assert q60[1] == pytest.approx(460, rel=1e-4)
    assert qexp_ind[1] == pytest.approx(-920 * math.cos(math.radians(30)), rel=1e-4)
    assert q60[2] > 0 and qcap[2] < 0 and qexp_ind[2] > 0 and qexp_cap[2] < 0
    assert q60[3] == pytest.approx(920, rel=1e-4)            # apparent RMS
    # SR1 PH1 sign bits (A, F, R, S)
    assert q60[4] == 0 and qcap[4] == 0b0100 and qexp_ind[4] == 0b0011
    assert qexp_cap[4] == 0b0111
    # exact energy by quadrant (ai, ae, rq1..rq4, ap) after one hour
    s = 920.0
    assert q60[5][2] == pytest.approx(s * math.sin(math.radians(60)), rel=1e-6)
    assert qcap[5][5] > 500 and qexp_ind[5][3] > 400 and qexp_cap[5][4] > 400
    assert qexp_ind[5][1] == pytest.approx(s * math.cos(math.radians(30)), rel=1e-6)
    assert all(x[5][6] == pytest.approx(s, rel=1e-6) for x in mpy["quad"])
    # reactive energy register (wrapped many times in an hour) agrees with the
    # exact reactive energy modulo 2^32
    e_wh = 1.1077029620118583e-08
    want = round(s * math.sin(math.radians(60)) / e_wh) % 2 ** 32
    assert abs(q60[6] - want) <= 1
    assert q60[7] == 0                                        # STPM32: no totals


def test_harmonics_rogowski_stuck(mpy):
    p, p1, vrms, i_rog, p_rog, p_rog_noint, i_stuck, stuck_bit, sample = mpy["misc"]
    assert p == pytest.approx(1150 * (1 + 0.03), rel=2e-4)
    assert p1 == pytest.approx(1150, rel=2e-4)
    assert vrms == pytest.approx(230 * math.sqrt(1.01), rel=2e-4)
    assert i_rog == pytest.approx(5, rel=1e-3)
    assert p_rog == pytest.approx(1150, rel=2e-4)
    assert abs(p_rog_noint) < 2                # integrator off: 90 deg out
    assert i_stuck == 0 and stuck_bit == 1
    assert abs(sample) <= 230 * math.sqrt(2.2) / 0.03548 * 256


def test_adc_clipping_and_fullscale(mpy):
    clip, i_full, fs_i, fs_i_read, fs_v_read = mpy["clip"]
    assert i_full == pytest.approx(11.05, rel=1e-3)     # reference: Imax ~11 A
    assert clip == pytest.approx(i_full, rel=1e-3)      # 20 A does not fit
    assert fs_i == pytest.approx(0.9 * i_full, rel=1e-9)
    assert fs_i_read == pytest.approx(fs_i, rel=1e-3)
    assert fs_v_read == pytest.approx(0.9 * 366, rel=2e-3)


def test_two_syn_pulses_reset_counters_not_truth(mpy):
    e1, e2, exact = mpy["reset2"]
    lsb = 1.1077029620118583e-08
    assert e1 * lsb == pytest.approx(1150 * 10 / 3600, rel=1e-6)
    assert e2 * lsb == pytest.approx(1150 * 10 / 3600, rel=1e-6)   # counted again from 0
    assert exact == pytest.approx(1150 * 20 / 3600, rel=1e-9)


def test_load_profiles(mpy):
    L = mpy["loads"]
    for v, i, phi, f in L["hh"]:
        assert 225 < v < 235 and 0 <= i < 30 and 0 <= phi < 35 and 49.9 < f < 50.1
    assert L["hh"][0] != L["hh"][1]
    assert L["hh_next"] == 180
    assert L["pv_noon"][2] > 90              # exporting
    assert L["pv_night"][2] < 90
    start, run, off = L["motor"]
    assert start[2] > 70 and 35 < run[2] < 45 and off[1] == 0
    assert L["iec_n"] == 8 + 7 + 7
    assert L["iec"][0][1] == pytest.approx(0.05) and L["iec"][0][2] == 0
    assert L["iec"][1][1] == pytest.approx(0.1)
    assert L["iec"][2][1] == pytest.approx(60.0) and L["iec"][2][2] == 0   # Imax
    assert L["iec"][3][1] == pytest.approx(0.1) and L["iec"][3][2] == 60
    assert L["iec"][4][2] == pytest.approx(-36.8699, abs=1e-3)
    assert len(set(L["hash"])) == 3 and all(0 <= x < 1 for x in L["hash"])


def test_set_load_integrates_old_load_first(mpy):
    assert mpy["set_load"] == pytest.approx(1150.0, rel=1e-9)


def test_virtual_clocks(mpy):
    order, hooks, phys_t, now, tw, t_before, t_after, synced, unsynced = mpy["step"]
    assert order == [["a", 300], ["b", 500], ["a", 600], ["a", 900], ["b", 1000],
                     ["a", 1200], ["b", 1500]]
    assert hooks[-1] == 1500000 and hooks == sorted(hooks)
    assert phys_t == 1500000                 # the board integrated up to the last hook
    assert now == 1500040                    # busy wait moved time, no hook
    assert tw == [10, -10]
    assert t_before == 1767225601 and t_after == 1800000000
    assert synced is True and unsynced is False
