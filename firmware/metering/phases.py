# Phase layout and live values: where each phase's fields sit in the snapshot, the
# integer multipliers that convert them, and the values of the last read.
#
# convert() is on the hot path: it allocates nothing (values go into preallocated
# arrays, every field is pulled from bytes so no intermediate reaches 2**30, a small int
# on a 32-bit MCU). A phase whose chip failed the snapshot is invalid: its values read 0
# and its bit in `valid` is clear, never "zero and valid".
from array import array

try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

from drivers.stpm3x import snap_off
# register-map values this module reads at run time, as const() literals (inlined, no
# dict slot; the map itself is dropped after the boot: docs/ram.md);
# tests/test_stpm3x_consts.py checks each against drivers/stpm3x_map.py
_CH_STRIDE_REG = const(2)
_DSP_REG1 = const(0x17)
_DSP_REG14 = const(0x24)
_DSP_REG17 = const(0x27)
_PERIOD_CH2_SHIFT = const(0x10)
_PERIOD_HZ_NUM = const(0x1e848)
_PERIOD_MASK = const(0xfff)
_PERIOD_MAX = const(0xf00)
_PERIOD_MIN = const(0x600)
_PH1_REG1 = const(0x2a)
_PHA_MASK = const(0xfff)
_PHA_SHIFT = const(0x10)
_PH_ACTIVE_E = const(0)
_PH_ACTIVE_P = const(4)
_PH_APPARENT_P = const(7)
_PH_REACTIVE_P = const(6)
_PH_STRIDE = const(0xc)
_POWER_MASK = const(0x1fffffff)
_POWER_SIGN = const(0x10000000)
_RMS_I_SHIFT = const(0xf)
_RMS_V_MASK = const(0x7fff)

# Sign conventions the reference leaves open (reactive sign "unconfirmed"): import is a
# positive active counter; the reactive counter is taken as is (ST's code negates it).
# One place to change; the energy registers and the live values both follow it.
ACTIVE_SIGN = 1
REACTIVE_SIGN = 1

# Byte offsets inside a channel's block of PHx rows (4 bytes a row)
_PQ = const(4 * (_PH_REACTIVE_P - _PH_ACTIVE_P))
_PS = const(4 * (_PH_APPARENT_P - _PH_ACTIVE_P))
_PER_HZ_MILLI = const(_PERIOD_HZ_NUM * 1000)
del const       # folded at compile time: the name would be an 11th global (12 slots, not 10)


def mulsh(x, mul, sh):
    """(x * mul) >> sh for |x| < 2**30, mul < 2**15, without an intermediate >= 2**30.

    Truncates toward zero (error < 1 output unit + 2**-15 relative from `fixed`)."""
    neg = x < 0
    if neg:
        x = -x
    hi = x >> 15
    lo = x & 0x7FFF
    if sh >= 15:
        r = (hi * mul + ((lo * mul) >> 15)) >> (sh - 15)
    else:
        r = ((hi * mul) << (15 - sh)) + ((lo * mul) >> sh)
    return -r if neg else r


class Phases:
    """Static layout of every phase (chip, channel, snapshot offsets, scale) and the live
    values of the last read: v_mv, i_ma, p_mw (+ = import), q_mvar (+ = inductive),
    s_mva, pf_milli, f_mhz, angle_mdeg (current behind voltage), per phase; totals;
    `valid` (bit p = phase p+1 read correctly)."""

    def __init__(self, board, base):
        # metering.scale is imported here, not at the top: chips.boot drops it after the
        # boot (its classes and functions are not needed at run time; docs/ram.md)
        from metering.scale import channels
        chans = channels(board)                 # ScaleError: the caller says which board
        # (phase, chip, channel) only: each ChannelScale holds a dozen boxed floats
        # (~0.5 KiB on a 32-bit MCU) that nothing but a calibration reads after this
        # (metering/calibrate.py builds its own from the board)
        self.chans = tuple(c[:3] for c in chans)
        nph = len(chans)
        self.nph = nph
        self.all = (1 << nph) - 1
        base = base or [0] * len(board.CHIPS)
        z = [0] * nph
        self.chip = array("b", z)
        self.cbit = array("i", z)           # bit of the phase's chip in a failure mask
        self.k = array("b", z)              # channel index on the chip
        self.o_v = array("i", z)            # DSP_REG14/15 whose V field this phase uses
        self.o_vi = array("i", z)           # DSP_REG14/15 of the phase (I field)
        self.o_per = array("i", z)
        self.o_pha = array("i", z)
        self.o_e = array("i", z)            # PHx_REG1 (energies follow)
        self.o_p = array("i", z)            # PHx_REG5 (powers follow)
        self.mul = array("i", [0] * (nph * 6))   # v mul, sh, i mul, sh, p mul, sh
        self.cpw = array("i", z)
        for p, (ph, ci, k, s) in enumerate(chans):
            self.chip[p] = ci
            self.cbit[p] = 1 << ci
            self.k[p] = k
            b = base[ci]
            self.o_vi[p] = b + snap_off(_DSP_REG14 + k)
            # STPM33: the V2 pins are not bonded, channel 2 measures with V1
            v1 = board.CHIPS[ci].get("part") == "STPM33" and k == 1
            self.o_v[p] = b + snap_off(_DSP_REG14 if v1 else _DSP_REG14 + k)
            self.o_per[p] = b + snap_off(_DSP_REG1) + k * (_PERIOD_CH2_SHIFT // 8)
            self.o_pha[p] = b + snap_off(_DSP_REG17 + _CH_STRIDE_REG * k) + _PHA_SHIFT // 8
            ph_row = _PH1_REG1 + _PH_STRIDE * k
            self.o_e[p] = b + snap_off(ph_row + _PH_ACTIVE_E)
            self.o_p[p] = b + snap_off(ph_row + _PH_ACTIVE_P)
            m = self.mul
            m[6 * p], m[6 * p + 1] = s.v_mul, s.v_sh
            m[6 * p + 2], m[6 * p + 3] = s.i_mul, s.i_sh
            m[6 * p + 4], m[6 * p + 5] = s.p_mul, s.p_sh
            self.cpw[p] = s.cpw
        self.v_mv = array("i", z)
        self.i_ma = array("i", z)
        self.p_mw = array("i", z)
        self.q_mvar = array("i", z)
        self.s_mva = array("i", z)
        self.pf_milli = array("i", z)
        self.f_mhz = array("i", z)
        self.angle_mdeg = array("i", z)
        # power rows in the counters' sign convention (for the energy split and checks)
        self.pr = array("i", z)
        self.qr = array("i", z)
        self.sreg = array("i", z)           # |apparent power row|
        self.valid = 0
        self.p_mw_total = 0
        self.q_mvar_total = 0
        self.s_mva_total = 0

    def phases_of(self, chip_mask):
        """Phase mask of the chips in chip_mask."""
        m = 0
        for p in range(self.nph):
            if chip_mask & self.cbit[p]:
                m |= 1 << p
        return m

    def convert(self, b, fail):
        """Fill the live values from snapshot bytes b; fail = the driver's mask of chips
        whose block is invalid. Returns the valid phase mask. Allocation-free."""
        m = self.mul
        valid = 0
        pt = 0
        qt = 0
        st = 0
        for p in range(self.nph):
            if fail & self.cbit[p]:
                self.v_mv[p] = 0
                self.i_ma[p] = 0
                self.p_mw[p] = 0
                self.q_mvar[p] = 0
                self.s_mva[p] = 0
                self.pf_milli[p] = 0
                self.f_mhz[p] = 0
                self.angle_mdeg[p] = 0
                continue
            valid |= 1 << p
            j = 6 * p
            o = self.o_v[p]
            self.v_mv[p] = mulsh((b[o] | b[o + 1] << 8) & _RMS_V_MASK, m[j], m[j + 1])
            o = self.o_vi[p]
            # I field [31:15]: bytes 1..3 hold bits 31:8
            self.i_ma[p] = mulsh((b[o + 1] | b[o + 2] << 8 | b[o + 3] << 16)
                                 >> (_RMS_I_SHIFT - 8), m[j + 2], m[j + 3])
            o = self.o_p[p]
            pr = s29(b, o) * ACTIVE_SIGN
            qr = s29(b, o + _PQ) * REACTIVE_SIGN
            sr = s29(b, o + _PS)
            if sr < 0:
                sr = -sr
            self.pr[p] = pr
            self.qr[p] = qr
            self.sreg[p] = sr
            pw = mulsh(pr, m[j + 4], m[j + 5])
            qv = mulsh(qr, m[j + 4], m[j + 5])
            sv = mulsh(sr, m[j + 4], m[j + 5])
            self.p_mw[p] = pw
            self.q_mvar[p] = qv
            self.s_mva[p] = sv
            self.pf_milli[p] = _ratio_milli(pw, sv)
            pt += pw
            qt += qv
            st += sv
            o = self.o_per[p]
            per = (b[o] | b[o + 1] << 8) & _PERIOD_MASK
            if _PERIOD_MIN <= per <= _PERIOD_MAX:
                self.f_mhz[p] = _PER_HZ_MILLI // per
                o = self.o_pha[p]
                # C_PHA: delay of the current in 8 us steps, 0..period (reference and
                # sim); reported in (-180, 180] degrees, + = current lagging
                pha = (b[o] | b[o + 1] << 8) & _PHA_MASK
                a = pha * 180000 // per * 2
                if a > 180000:
                    a -= 360000
                self.angle_mdeg[p] = a
            else:
                self.f_mhz[p] = 0
                self.angle_mdeg[p] = 0
        self.valid = valid
        self.p_mw_total = pt
        self.q_mvar_total = qt
        self.s_mva_total = st
        return valid

    def v_field(self, b, p):
        """Raw V RMS field of phase p in snapshot b (calibration averages it)."""
        o = self.o_v[p]
        return (b[o] | b[o + 1] << 8) & _RMS_V_MASK

    def i_field(self, b, p):
        o = self.o_vi[p]
        return (b[o + 1] | b[o + 2] << 8 | b[o + 3] << 16) >> (_RMS_I_SHIFT - 8)


def s29(b, o):
    """29-bit two's complement power field from 4 little-endian bytes; the top byte is
    masked before the shift, so nothing reaches 2**30 (a small int on an MCU)."""
    v = b[o] | b[o + 1] << 8 | b[o + 2] << 16 | (b[o + 3] & (_POWER_MASK >> 24)) << 24
    return v - (_POWER_SIGN << 1) if v & _POWER_SIGN else v


def _ratio_milli(a, c):
    # 1000 * a / c with |a| <= c, no intermediate >= 2**30
    if c <= 0:
        return 0
    while c > 0x7FFFF or a > 0x7FFFF or a < -0x7FFFF:
        a >>= 1
        c >>= 1
    if c == 0:
        return 0
    r = (a * 1000 // c) if a >= 0 else -((-a) * 1000 // c)
    if r > 1000:
        return 1000
    if r < -1000:
        return -1000
    return r
