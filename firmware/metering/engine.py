# Metering engine: snapshot bytes -> per-phase values and energy registers.
#
# cycle() is the hot path: latch, snapshot, convert, accumulate. It allocates nothing in
# steady state (tested under micropython.heap_lock()): values go into preallocated arrays,
# energy into lists of small ints, every field is pulled from bytes so no intermediate
# exceeds 2**30. Everything that builds dicts (records, events, checkpoints) lives in
# poll() / run(), which run once per read but allocate only when they emit something.
#
# Energy comes only from the chips' energy counters (never from sampled power): the int32
# difference between two reads, from 16-bit halves, split by sign into import / export and
# by the sign of active and reactive into four reactive quadrants. Registers are kept as
# (wh, rem) with rem < cpw (counts per Wh of that phase): exact in counts.
# See docs/metering.md for the model, persistence guarantees and wrap bounds.
import struct
from array import array

try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

from metering import scale as _scale
from metering.scale import mulsh
from metering.tariff import Tariff
from util import merge, pick
from drivers.stpm3x import snap_off  # noqa: F401  (the snapshot layout; harness uses it)
from drivers.stpm3x_map import (DSP_REG1, DSP_REG14, DSP_REG17, PH1_REG1, PH_STRIDE,
                                PH_ACTIVE_E, PH_REACTIVE_E, PH_APPARENT_E, PH_ACTIVE_P,
                                PH_REACTIVE_P, PH_APPARENT_P, CH_STRIDE_REG,
                                PERIOD_CH2_SHIFT, RMS_V_MASK, RMS_I_SHIFT, PERIOD_MASK,
                                PERIOD_MIN, PERIOD_MAX, PERIOD_HZ_NUM, PHA_SHIFT, PHA_MASK,
                                POWER_MASK, POWER_SIGN)

# energy registers per phase; tariff registers follow at _T0
AI = const(0)
AE = const(1)
RQ1 = const(2)
AP = const(6)
_T0 = const(7)

from metering.persist import (Persist, boot, fingerprint, saved_fingerprints,  # noqa: F401
                               FLAG_UNSYNCED, FLAG_PARTIAL, FLAG_INVALID, FLAG_RECONCILED,
                               FLAG_LOST)
from metering.api import Api
from metering.records import Records

# Byte offsets inside a channel's block of PHx rows (4 bytes a row): reactive and
# apparent energy after the active one, reactive and apparent power after the active.
_EQ = 4 * (PH_REACTIVE_E - PH_ACTIVE_E)
_ES = 4 * (PH_APPARENT_E - PH_ACTIVE_E)
_PQ = 4 * (PH_REACTIVE_P - PH_ACTIVE_P)
_PS = 4 * (PH_APPARENT_P - PH_ACTIVE_P)
_PER_HZ_MILLI = PERIOD_HZ_NUM * 1000

# Sign conventions (reference: "reactive sign unconfirmed"): import = positive active
# counter; reactive counter taken as is (ST's code negates it). One place to change.
ACTIVE_SIGN = const(1)
REACTIVE_SIGN = const(1)


DEFAULTS = {
    "read_ms": 1000,      # read period; must stay below scale.max_read_ms(board)
    "interval_s": 900,    # interval records, aligned to the wall clock
    "rt_s": 10,           # real-time records (0 = off)
    "demand_s": 60,       # maximum-demand integration period
    "ckpt_s": 900,        # checkpoint at least this often (and at each interval close)
    "ckpt_min_s": 60,     # ... and at most this often
    "ckpt_wh": 20,        # ... earlier if this much energy is not yet checkpointed
    "v_nom_v": 230,       # nominal voltage: default sag / swell / fail thresholds
    "sag_pct": 90,
    "swell_pct": 110,
    "fail_pct": 50,       # below this a phase is "power_fail"
    "reverse_w": 20,      # net export above this raises "reverse_power"
    "restart_s": 30,      # a chip silent this long is restarted (then every restart_s)
    "tariff": None,       # tariff.py config
}


class MeterError(Exception):
    pass


class Meter(Records, Persist, Api):
    def __init__(self, hw, group, board, store=None, cfg=None):
        # board DEFAULTS are shared by several parts (fs, ...): take the metering keys
        c = merge(DEFAULTS, pick(getattr(board, "DEFAULTS", None), DEFAULTS), cfg,
                  what="metering config")
        self.cfg = c
        self.hw = hw
        self.clock = hw.clock
        self.group = group
        self.board = board
        self.store = store
        self.sinks = []
        try:
            chans = _scale.channels(board)
        except _scale.ScaleError as e:
            raise MeterError("board %s: %s" % (getattr(board, "NAME", "?"), e))
        self.chans = chans
        self.read_ms = int(c["read_ms"])
        self.bound_ms = _scale.max_read_ms(board)
        self._gap_ms = self.bound_ms // 2
        if not 50 <= self.read_ms <= self.bound_ms // 2:
            raise MeterError("read_ms %d: use 50..%d ms so that no counter wrap is missed"
                             % (self.read_ms, self.bound_ms // 2))
        self.tariffs = Tariff(c["tariff"])
        nph = len(chans)
        self.nph = nph
        self.nreg = _T0 + self.tariffs.n
        self.tariff = self.tariffs.unsynced
        # static per-phase layout
        self._chip = array("b", [0] * nph)
        self._cbit = array("i", [0] * nph)
        self._k = array("b", [0] * nph)
        self._o_vi = array("i", [0] * nph)
        self._o_v = array("i", [0] * nph)     # STPM33 channel 2 reads V1
        self._o_per = array("i", [0] * nph)
        self._o_pha = array("i", [0] * nph)
        self._o_e = array("i", [0] * nph)     # PHx_REG1; REG3 at +8, REG4 at +12
        self._o_p = array("i", [0] * nph)     # PHx_REG5; REG7 at +8, REG8 at +12
        self._mul = array("i", [0] * (nph * 6))  # v mul, sh, i mul, sh, p mul, sh
        self._cpw = array("i", [0] * nph)
        self.sag_mv = array("i", [0] * nph)
        self.swell_mv = array("i", [0] * nph)
        self.fail_mv = array("i", [0] * nph)
        vn = int(c["v_nom_v"]) * 1000
        base = getattr(group, "base", None) or [0] * len(board.CHIPS)
        for p, (ph, ci, k, s) in enumerate(chans):
            chcfg = board.CHIPS[ci]["ch"][k]
            self._chip[p] = ci
            self._cbit[p] = 1 << ci
            self._k[p] = k
            b = base[ci]
            self._o_vi[p] = b + snap_off(DSP_REG14 + k)
            # STPM33: the V2 pins are not bonded, channel 2 measures with V1
            v1 = board.CHIPS[ci].get("part") == "STPM33" and k == 1
            self._o_v[p] = b + snap_off(DSP_REG14 if v1 else DSP_REG14 + k)
            self._o_per[p] = b + snap_off(DSP_REG1) + k * (PERIOD_CH2_SHIFT // 8)
            self._o_pha[p] = b + snap_off(DSP_REG17 + CH_STRIDE_REG * k) + PHA_SHIFT // 8
            ph = PH1_REG1 + PH_STRIDE * k
            self._o_e[p] = b + snap_off(ph + PH_ACTIVE_E)
            self._o_p[p] = b + snap_off(ph + PH_ACTIVE_P)
            m = self._mul
            m[6 * p], m[6 * p + 1] = s.v_mul, s.v_sh
            m[6 * p + 2], m[6 * p + 3] = s.i_mul, s.i_sh
            m[6 * p + 4], m[6 * p + 5] = s.p_mul, s.p_sh
            self._cpw[p] = s.cpw
            self.sag_mv[p] = int(chcfg.get("sag_v", vn * int(c["sag_pct"]) // 100000) * 1000)
            self.swell_mv[p] = int(chcfg.get("swell_v", vn * int(c["swell_pct"]) // 100000)
                                   * 1000)
            self.fail_mv[p] = vn * int(c["fail_pct"]) // 100
        # live values (valid only where the bit in self.valid is set; 0 elsewhere)
        self.v_mv = array("i", [0] * nph)
        self.i_ma = array("i", [0] * nph)
        self.p_mw = array("i", [0] * nph)
        self.q_mvar = array("i", [0] * nph)
        self.s_mva = array("i", [0] * nph)
        self.pf_milli = array("i", [0] * nph)
        self.f_mhz = array("i", [0] * nph)
        self.angle_mdeg = array("i", [0] * nph)
        self.valid = 0
        self.p_mw_total = 0
        self.q_mvar_total = 0
        self.s_mva_total = 0
        self.fail_mask = 0
        self._fm_prev = 0
        self._start_error = None
        self.cycles = 0
        # energy: (wh, rem) per phase x register; raw counter halves per phase x 3 x 2
        n = nph * self.nreg
        self._wh = [0] * n
        self._rem = [0] * n
        self._raw = array("H", [0] * (nph * 6))
        self._based = 0                 # phases with a counter baseline
        self._t_ok = array("i", [0] * nph)
        self._sreg = array("i", [0] * nph)    # apparent power row (|counts| rate / 3.8)
        self._sprev = array("i", [0] * nph)   # ... at the previous read
        self._pr = array("i", [0] * nph)      # active / reactive power rows, now and at
        self._qr = array("i", [0] * nph)      # the previous read (counter sign convention)
        self._pr_prev = array("i", [0] * nph)
        self._qr_prev = array("i", [0] * nph)
        self.reset_mask = 0                   # chips whose counters restarted (poll acts)
        self._skip = 0                        # phases exempt from the restart check once
        self._fail_t = array("i", [0] * len(board.CHIPS))   # ticks of first failure
        self._fail_on = 0                     # chips failing since _fail_t
        self._smax = 0                        # its maximum since the last checkpoint
        self.lost = 0                   # FLAG_LOST / FLAG_RECONCILED pending for the interval
        # interval statistics
        self._vmin = array("i", [0] * nph)
        self._vmax = array("i", [0] * nph)
        self._vsum_hi = array("i", [0] * nph)   # sum = hi * 2**20 + lo, no int >= 2**30
        self._vsum_lo = array("i", [0] * nph)
        self._vn = array("i", [0] * nph)
        self._iv_invalid = 0
        self._dem_sum_w = 0
        self._dem_n = 0
        self._dem_t0 = 0
        self.pmax_w = 0
        self.sags = [0] * nph
        self.swells = [0] * nph
        # sag, swell, fail, reverse per phase (0 = normal)
        self._state = array("b", [0] * (nph * 4))
        self._fp = [0] * len(board.CHIPS)         # config fingerprints at last checkpoint
        self.iv_seq = 0
        self.ev_seq = 0
        self._iv_start_t = None
        self._iv_end_t = None
        self._iv_t0 = 0
        self._iv_flags = 0
        self._rt_next = 0
        self._ck_t = 0
        self._ck_e = 0          # |active| counts >> 10 since the checkpoint (all phases)
        self._ck_s = 0          # |apparent| counts >> 4 since the checkpoint (all phases)
        self._ck_e_thr = int(c["ckpt_wh"]) * (min(self._cpw) >> 10)
        self._ck_s_thr = 1 << 26   # 2**30 counts: half the reconciliation ambiguity
        self._ck_ticks = 0
        self._last_t = 0
        self._synced = False
        self.sink_errors = 0
        self.ckpt_errors = 0
        self.started = False
        self.running = False      # run() is reading (commands must not drive cycle())
        self.uncertain = False    # boot reconciliation could not be bounded (no clock)
        self._clear_interval_stats()

    # ---------------------------------------------------------------- hot path
    def cycle(self):
        """Latch + snapshot + convert + accumulate. Allocation-free in steady state."""
        g = self.group
        g.latch()
        fail = g.snapshot()
        self.fail_mask = fail
        b = g.buf
        now = self.clock.ticks_ms()
        m = self._mul
        valid = 0
        pt = 0
        qt = 0
        st = 0
        for p in range(self.nph):
            if fail & self._cbit[p]:
                self.v_mv[p] = 0
                self.i_ma[p] = 0
                self.p_mw[p] = 0
                self.q_mvar[p] = 0
                self.s_mva[p] = 0
                self.pf_milli[p] = 0
                self.f_mhz[p] = 0
                self.angle_mdeg[p] = 0
                self._iv_invalid |= 1 << p
                continue
            valid |= 1 << p
            j = 6 * p
            o = self._o_v[p]
            v = mulsh((b[o] | b[o + 1] << 8) & RMS_V_MASK, m[j], m[j + 1])
            o = self._o_vi[p]
            self.v_mv[p] = v
            # I field [31:15]: bytes 1..3 hold bits 31:8
            self.i_ma[p] = mulsh((b[o + 1] | b[o + 2] << 8 | b[o + 3] << 16)
                                 >> (RMS_I_SHIFT - 8), m[j + 2], m[j + 3])
            o = self._o_p[p]
            pw = mulsh(_s29(b, o), m[j + 4], m[j + 5])
            qv = mulsh(_s29(b, o + _PQ), m[j + 4], m[j + 5]) * REACTIVE_SIGN
            # power rows in the counters' sign convention, for _energy's sign-change split
            self._pr[p] = _s29(b, o) * ACTIVE_SIGN
            self._qr[p] = _s29(b, o + _PQ) * REACTIVE_SIGN
            sr = _s29(b, o + _PS)
            if sr < 0:
                sr = -sr
            self._sreg[p] = sr
            if sr > self._smax:
                self._smax = sr
            sv = mulsh(sr, m[j + 4], m[j + 5])
            pw *= ACTIVE_SIGN
            self.p_mw[p] = pw
            self.q_mvar[p] = qv
            self.s_mva[p] = sv
            self.pf_milli[p] = _ratio_milli(pw, sv)
            pt += pw
            qt += qv
            st += sv
            o = self._o_per[p]
            per = (b[o] | b[o + 1] << 8) & PERIOD_MASK
            if PERIOD_MIN <= per <= PERIOD_MAX:
                self.f_mhz[p] = _PER_HZ_MILLI // per
                o = self._o_pha[p]
                # C_PHA: delay of the current in 8 us steps, 0..period (reference and
                # sim); reported in (-180, 180] degrees, + = current lagging
                pha = (b[o] | b[o + 1] << 8) & PHA_MASK
                a = pha * 180000 // per * 2
                if a > 180000:
                    a -= 360000
                self.angle_mdeg[p] = a
            else:
                self.f_mhz[p] = 0
                self.angle_mdeg[p] = 0
            self._energy(p, b, now)
            # interval voltage statistics
            if self._vn[p] == 0 or v < self._vmin[p]:
                self._vmin[p] = v
            if v > self._vmax[p]:
                self._vmax[p] = v
            lo = self._vsum_lo[p] + v
            if lo >= 0x100000:
                self._vsum_hi[p] += lo >> 20
                lo &= 0xFFFFF
            self._vsum_lo[p] = lo
            self._vn[p] += 1
        self.valid = valid
        self.p_mw_total = pt
        self.q_mvar_total = qt
        self.s_mva_total = st
        if pt > 0:
            self._dem_sum_w += pt // 1000
        self._dem_n += 1
        self.cycles += 1
        return valid

    def _energy(self, p, b, now):
        bit = 1 << p
        o = self._o_e[p]
        r = 6 * p
        raw = self._raw
        gap = self.clock.ticks_diff(now, self._t_ok[p])
        if not self._based & bit or (gap > self._gap_ms and self._ambiguous(p, gap)):
            if self._based & bit:
                self.lost |= FLAG_LOST   # unread too long for this load: ambiguous
            _set(raw, r, b, o)
            _set(raw, r + 2, b, o + _EQ)
            _set(raw, r + 4, b, o + _ES)
            self._based |= bit
            self._t_ok[p] = now
            return
        self._t_ok[p] = now
        # A chip that reset behind our back (supply glitch) restarted its counters: the
        # apparent counter must grow by about S x dt. Anything else (negative, or more
        # than 2x what the larger of the last two apparent powers can count, in units of
        # 16 counts) is a counter restart: re-baseline rather than book a random jump.
        sa = self._sreg[p]
        sb = self._sprev[p]
        self._sprev[p] = sa
        if sb > sa:
            sa = sb
        lo = b[o + _ES] | b[o + _ES + 1] << 8
        hi = b[o + _ES + 2] | b[o + _ES + 3] << 8
        dl = lo - raw[r + 4]
        dh = (hi - raw[r + 5] - (1 if dl < 0 else 0)) & 0xFFFF
        skip = self._skip & bit       # first read after an MCU-reset reconciliation
        if skip:
            self._skip &= ~bit
        if gap < 8000 and not skip and (dh >= 0x8000 or ((dh << 12) | (((dl + 0x10000) & 0xFFFF) >> 4))
                           > ((sa >> 12) + 1) * (gap + 50) * 2):
            _set(raw, r, b, o)
            _set(raw, r + 2, b, o + _EQ)
            _set(raw, r + 4, b, o + _ES)
            self.lost |= FLAG_LOST
            self.reset_mask |= self._cbit[p]
            return
        dp = _delta(raw, r, b, o) * ACTIVE_SIGN
        dq = _delta(raw, r + 2, b, o + _EQ) * REACTIVE_SIGN
        ds = _delta(raw, r + 4, b, o + _ES)
        k = p * self.nreg
        cpw = self._cpw[p]
        pp = self._pr_prev[p]
        qp = self._qr_prev[p]
        pn = self._pr[p]
        qn = self._qr[p]
        self._pr_prev[p] = pn
        self._qr_prev[p] = qn
        if ((pp < 0) != (pn < 0) or (qp < 0) != (qn < 0)) and gap > 0:
            self._split(k, dp, dq, pp, pn, qp, qn, gap, cpw)
        else:
            self._book(k, dp, dq, cpw)
        self._ck_s += (ds if ds >= 0 else -ds) >> 4
        self._add(k + AP, ds if ds >= 0 else -ds, cpw)

    def _book(self, k, dp, dq, cpw):
        """Active to import or export, reactive to its quadrant (signs of both)."""
        if dp >= 0:
            self._add(k + AI, dp, cpw)
            self._add(k + _T0 + self.tariff, dp, cpw)
            self._ck_e += dp >> 10
            q = 0 if dq >= 0 else 3
        else:
            self._add(k + AE, -dp, cpw)
            self._ck_e += (-dp) >> 10
            q = 1 if dq >= 0 else 2
        self._add(k + RQ1 + q, dq if dq >= 0 else -dq, cpw)

    def _split(self, k, dp, dq, pp, pn, qp, qn, gap_ms, cpw):
        """A power changed sign between two reads: the counters only hold the net energy,
        which would book e.g. inductive minus capacitive reactive energy into one
        quadrant. Model the change as one step at an unknown instant (the power
        registers before and after are known) and solve for it from the net counter
        delta, then book each side by its own signs. Exact for a step, close for a
        ramp; rare, so it may use floats (and allocate)."""
        c = gap_ms * 125 / 32768.0       # counts per register LSB over the gap
        # the quantity that changed sign fixes the step instant: f = share before it
        if (pp < 0) != (pn < 0) and pp != pn:
            f = (dp / c - pn) / (pp - pn)
        elif qp != qn:
            f = (dq / c - qn) / (qp - qn)
        else:
            f = 0.0
        f = 0.0 if f < 0.0 else (1.0 if f > 1.0 else f)
        p1 = int(c * pp * f)
        q1 = int(c * qp * f)
        # the rest after the step, so that the net of every counter is kept exactly
        self._book(k, p1, q1, cpw)
        self._book(k, dp - p1, dq - q1, cpw)

    def _ambiguous(self, p, gap_ms):
        # Rare path (a chip missed reads): could 2**31 counts have passed? Use the larger
        # of the last apparent power and the maximum since the checkpoint, x2 margin.
        s = self._sreg[p] if self._sreg[p] > self._smax else self._smax
        return s * 2 * (gap_ms / 1000.0) * 7812.5 / 2048 >= 2147483648.0

    def _add(self, slot, d, cpw):
        if d:
            r = self._rem[slot] + d
            if r >= cpw:
                q = r // cpw
                self._wh[slot] += q
                r -= q * cpw
            self._rem[slot] = r

    # ------------------------------------------------------------- registers
    def wh(self, reg, phase=None):
        """Register value in Wh (floor of the exact value): one phase (0-based) or the
        total across phases (floor of the exact sum, so totals never go backwards)."""
        nr = self.nreg
        if phase is not None:
            return self._wh[phase * nr + reg]
        whs = 0
        frac_num = 0
        den = 1
        for p in range(self.nph):
            whs += self._wh[p * nr + reg]
            c = self._cpw[p]
            frac_num = frac_num * c + self._rem[p * nr + reg] * den
            den *= c
        return whs + frac_num // den

    def exact_wh(self, reg, phase):
        """Float value of a register, for tests and the benchmark (not used on the meter)."""
        s = phase * self.nreg + reg
        return self._wh[s] + self._rem[s] / self._cpw[phase]

    def counts(self, reg, phase):
        s = phase * self.nreg + reg
        return self._wh[s] * self._cpw[phase] + self._rem[s]

    def preset(self, reg, phase, wh):
        """Set a register (commands: preset totals to match the utility meter)."""
        s = phase * self.nreg + reg
        self._wh[s] = int(wh)
        self._rem[s] = 0

    async def run(self):
        """Read every read_ms forever; sinks get "interval", "event" and "rt" records."""
        if not self.started:
            self.start()
        clock = self.clock
        self.running = True
        try:
            while True:
                t0 = clock.ticks_ms()
                self.cycle()
                self.poll()
                d = self.read_ms - clock.ticks_diff(clock.ticks_ms(), t0)
                await clock.sleep_ms(d if d > 0 else 0)
        finally:
            self.running = False


def _s29(b, o):
    # 29-bit two's complement power field from 4 little-endian bytes
    # the top byte masked before the shift: nothing reaches 2**30 (a small int on an MCU)
    v = b[o] | b[o + 1] << 8 | b[o + 2] << 16 | (b[o + 3] & (POWER_MASK >> 24)) << 24
    return v - (POWER_SIGN << 1) if v & POWER_SIGN else v


def _set(raw, r, b, o):
    raw[r] = b[o] | b[o + 1] << 8
    raw[r + 1] = b[o + 2] | b[o + 3] << 8


def _delta(raw, r, b, o):
    """int32 difference of the counter at b[o..o+3] against raw[r] (lo), raw[r+1] (hi);
    stores the new halves. Small-int arithmetic while |delta| < 2**29."""
    lo = b[o] | b[o + 1] << 8
    hi = b[o + 2] | b[o + 3] << 8
    dl = lo - raw[r]
    dh = hi - raw[r + 1]
    raw[r] = lo
    raw[r + 1] = hi
    if dl < 0:
        dl += 0x10000
        dh -= 1
    dh &= 0xFFFF
    if dh >= 0x8000:
        dh -= 0x10000
    return dh * 0x10000 + dl


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
