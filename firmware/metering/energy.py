# Energy registers of every phase, kept exact in counts.
#
# Energy comes only from the chips' energy counters (never from sampled power): the
# int32 difference between two reads, from 16-bit halves, split by sign into import /
# export and by the signs of active and reactive into four reactive quadrants. Each
# register is (wh, rem) with 0 <= rem < cpw (counts per Wh of that phase): nothing is
# rounded away. accumulate() is on the hot path and allocates nothing in steady state.
# docs/metering.md "Energy accounting" and "Wrap bound".
from array import array

try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

from drivers.stpm3x_map import DCLK_HZ
# register-map values this module reads at run time, as const() literals (inlined, no
# dict slot; the map itself is dropped after the boot: docs/ram.md);
# tests/test_stpm3x_consts.py checks each against drivers/stpm3x_map.py
_PH_ACTIVE_E = const(0)
_PH_APPARENT_E = const(3)
_PH_REACTIVE_E = const(2)

# registers per phase; tariff registers follow at T0
AI = const(0)
AE = const(1)
RQ1 = const(2)
AP = const(6)
T0 = const(7)

FLAG_RECONCILED = const(8)      # interval flags this part raises (records.py has all)
FLAG_LOST = const(16)

# Byte offsets of the reactive and apparent energy rows after the active one.
_EQ = const(4 * (_PH_REACTIVE_E - _PH_ACTIVE_E))
_ES = const(4 * (_PH_APPARENT_E - _PH_ACTIVE_E))
# 2**31 counts at a power row s take s * 2 (margin) * gap_s * DCLK / 2048 >= 2**31, i.e.
# gap_ms >= _AMBIG / s: an integer test, so the rare path allocates nothing either.
_AMBIG = int(2147483648 * 1000 * 2048 / (2 * DCLK_HZ))


class Energy:
    """(wh, rem) per phase and register, the chips' raw counters at the last read, and
    what the restart / ambiguity checks need."""

    def __init__(self, cpw, nreg, gap_ms, clock):
        nph = len(cpw)
        self.nph = nph
        self.nreg = nreg
        self.cpw = cpw
        self.gap_ms = gap_ms
        self.clock = clock
        n = nph * nreg
        self.wh_ = [0] * n
        self.rem = [0] * n
        z = [0] * nph
        self.raw = array("H", [0] * (nph * 6))   # active, reactive, apparent: lo, hi
        self.based = 0                  # phases whose raw counters are a baseline
        # ticks (ms) of the last good read of each phase, and its latch instant in us (the
        # split's clock); lists: a port's ticks may exceed an array's 32 bits
        self.t_ok = list(z)
        self.t_ok_us = list(z)
        self.skip = 0                   # phases exempt from the restart check once
        self.sprev = array("i", z)      # apparent power row at the previous read
        self.pr_prev = array("i", z)    # active / reactive power rows at the previous
        self.qr_prev = array("i", z)    # read (counter sign convention)
        self.smax = 0                   # largest apparent power row since the checkpoint
        self.ck_e = 0                   # |active| counts >> 10 since the checkpoint
        self.ck_s = 0                   # |apparent| counts >> 4 since the checkpoint
        self.lost = 0                   # FLAG_LOST / FLAG_RECONCILED for the interval
        self.restarted = 0              # phases whose counters restarted (health acts)

    # ---------------------------------------------------------------- hot path
    def accumulate(self, p, b, o, now, now_us, pn, qn, sr, tariff):
        """One good read of phase p latched at ticks now (ms) / now_us: counters at
        b[o..] (PHx_REG1..4), power rows pn, qn, sr (counter convention, |apparent|),
        tariff register for its import."""
        bit = 1 << p
        r = 6 * p
        raw = self.raw
        if sr > self.smax:
            self.smax = sr
        gap = self.clock.ticks_diff(now, self.t_ok[p])
        if not self.based & bit or (gap > self.gap_ms and self._ambiguous(p, gap, sr)):
            if self.based & bit:
                self.lost |= FLAG_LOST   # unread too long for this load: ambiguous
            self.rebase(p, b, o, now, pn, qn, sr, now_us)
            return
        self.t_ok[p] = now
        gap_us = self.clock.ticks_diff(now_us, self.t_ok_us[p])
        self.t_ok_us[p] = now_us
        # A chip that reset behind our back (supply glitch) restarted its counters: the
        # apparent counter must grow by about S x dt. Anything else (negative, or more
        # than 2x what the larger of the last two apparent powers can count, in units of
        # 16 counts) is a counter restart: re-baseline rather than book a random jump.
        sa = sr
        sb = self.sprev[p]
        self.sprev[p] = sr
        if sb > sa:
            sa = sb
        lo = b[o + _ES] | b[o + _ES + 1] << 8
        hi = b[o + _ES + 2] | b[o + _ES + 3] << 8
        dl = lo - raw[r + 4]
        dh = (hi - raw[r + 5] - (1 if dl < 0 else 0)) & 0xFFFF
        skip = self.skip & bit       # first read after a baseline taken elsewhere
        if skip:
            self.skip &= ~bit
        if gap < 8000 and not skip and (dh >= 0x8000 or (
                (dh << 12) | (((dl + 0x10000) & 0xFFFF) >> 4)) > ((sa >> 12) + 1) * (gap + 50) * 2):
            self.rebase(p, b, o, now, pn, qn, sr, now_us)
            self.lost |= FLAG_LOST
            self.restarted |= bit
            return
        dp = _delta(raw, r, b, o)
        dq = _delta(raw, r + 2, b, o + _EQ)
        ds = _delta(raw, r + 4, b, o + _ES)
        k = p * self.nreg
        cpw = self.cpw[p]
        pp = self.pr_prev[p]
        qp = self.qr_prev[p]
        self.pr_prev[p] = pn
        self.qr_prev[p] = qn
        if ((pp < 0) != (pn < 0) or (qp < 0) != (qn < 0)) and gap_us > 0:
            self._split(k, dp, dq, pp, pn, qp, qn, gap_us, cpw, tariff)
        else:
            self.book(k, dp, dq, cpw, tariff)
        ads = ds if ds >= 0 else -ds
        self.ck_s += ads >> 4
        self._add(k + AP, ads, cpw)

    def book(self, k, dp, dq, cpw, tariff):
        """Active counts dp to import or export, reactive dq to its quadrant (signs of
        both); k = first register of the phase."""
        if dp >= 0:
            self._add(k + AI, dp, cpw)
            self._add(k + T0 + tariff, dp, cpw)
            self.ck_e += dp >> 10
            q = 0 if dq >= 0 else 3
        else:
            self._add(k + AE, -dp, cpw)
            self.ck_e += (-dp) >> 10
            q = 1 if dq >= 0 else 2
        self._add(k + RQ1 + q, dq if dq >= 0 else -dq, cpw)

    def _split(self, k, dp, dq, pp, pn, qp, qn, gap_us, cpw, tariff):
        """A power changed sign between two reads: the counters only hold the net energy,
        which would book e.g. inductive minus capacitive reactive energy into one
        quadrant. Model the change as one step at an unknown instant (the power
        registers before and after are known) and solve for it from the net counter
        delta, then book each side by its own signs. Exact for a step, close for a
        ramp; rare, so it may use floats (and allocate). The gap is timed in us between
        the latches: a ms tick would move the solved instant by up to 0.1 % of a read."""
        c = gap_us * DCLK_HZ / 2048 / 1000000   # counts per power-row LSB over the gap
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
        self.book(k, p1, q1, cpw, tariff)
        self.book(k, dp - p1, dq - q1, cpw, tariff)

    def _ambiguous(self, p, gap_ms, sr):
        # Rare path (a chip missed reads): could 2**31 counts have passed? Use the larger
        # of the last apparent power and the maximum since the checkpoint, x2 margin.
        s = sr if sr > self.smax else self.smax
        return s > 0 and gap_ms >= _AMBIG // s

    def _add(self, slot, d, cpw):
        if d:
            r = self.rem[slot] + d
            if r >= cpw:
                q = r // cpw
                self.wh_[slot] += q
                r -= q * cpw
            self.rem[slot] = r

    # ---------------------------------------------------------------- baselines
    def rebase(self, p, b, o, now, pn, qn, sr, now_us):
        """Take phase p's counters at b[o..] as the baseline (nothing booked)."""
        r = 6 * p
        _set(self.raw, r, b, o)
        _set(self.raw, r + 2, b, o + _EQ)
        _set(self.raw, r + 4, b, o + _ES)
        self.based |= 1 << p
        self.t_ok[p] = now
        self.t_ok_us[p] = self.clock.ticks_us() if now_us is None else now_us
        self.pr_prev[p] = pn
        self.qr_prev[p] = qn
        self.sprev[p] = sr

    def set_raw(self, p, raw6, now, skip):
        """Baseline from saved raw counters (a checkpoint): the next read takes the int32
        difference; skip=True exempts that read from the restart check (the time since
        the checkpoint is not the time since the last read)."""
        for k in range(6):
            self.raw[6 * p + k] = raw6[k]
        self.based |= 1 << p
        self.t_ok[p] = now
        self.t_ok_us[p] = self.clock.ticks_us()
        if skip:
            self.skip |= 1 << p

    def drop(self, p):
        """Phase p has no baseline any more (its chip restarts): the next read sets it."""
        self.based &= ~(1 << p)

    # ---------------------------------------------------------------- registers
    def wh(self, reg, phase=None):
        """Register in Wh (floor of the exact value): one phase (0-based) or the total
        across phases (floor of the exact sum, so totals never go backwards)."""
        nr = self.nreg
        if phase is not None:
            return self.wh_[phase * nr + reg]
        whs = 0
        same = True
        c0 = self.cpw[0]
        rs = 0
        for p in range(self.nph):
            whs += self.wh_[p * nr + reg]
            rs += self.rem[p * nr + reg]
            if self.cpw[p] != c0:
                same = False
        if same:                       # the usual case: small ints only
            return whs + rs // c0
        frac_num = 0
        den = 1
        for p in range(self.nph):
            c = self.cpw[p]
            frac_num = frac_num * c + self.rem[p * nr + reg] * den
            den *= c
        return whs + frac_num // den

    def exact_wh(self, reg, phase):
        """Float value of a register, for tests and the benchmark (not used on the meter)."""
        s = phase * self.nreg + reg
        return self.wh_[s] + self.rem[s] / self.cpw[phase]

    def counts(self, reg, phase):
        s = phase * self.nreg + reg
        return self.wh_[s] * self.cpw[phase] + self.rem[s]

    def preset(self, reg, phase, wh):
        s = phase * self.nreg + reg
        self.wh_[s] = int(wh)
        self.rem[s] = 0

    def since_checkpoint(self, s_now):
        """A checkpoint was saved: restart what the schedule measures; the apparent
        maximum restarts from the present apparent power row s_now."""
        self.smax = s_now
        self.ck_e = 0
        self.ck_s = 0


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
