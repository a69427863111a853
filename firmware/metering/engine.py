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

# energy registers per phase; tariff registers follow at _T0
AI = const(0)
AE = const(1)
RQ1 = const(2)
AP = const(6)
_T0 = const(7)

FLAG_UNSYNCED = const(1)
FLAG_PARTIAL = const(2)
FLAG_INVALID = const(4)
FLAG_RECONCILED = const(8)
FLAG_LOST = const(16)

# Sign conventions (reference: "reactive sign unconfirmed"): import = positive active
# counter; reactive counter taken as is (ST's code negates it). One place to change.
ACTIVE_SIGN = const(1)
REACTIVE_SIGN = const(1)

_CFG_ROWS = 14           # rows 0..13: DSP/DFE configuration, fingerprinted at checkpoints
_CKPT_VERSION = 1

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
    "tariff": None,       # tariff.py config
}


class MeterError(Exception):
    pass


def snap_off(row):
    """Byte offset of a row inside a chip's snapshot block (docs/architecture.md)."""
    if 16 <= row <= 23:
        return (row - 16) * 4
    if 36 <= row <= 65:
        return 32 + (row - 36) * 4
    raise MeterError("row %d is not in the snapshot" % row)


class Meter:
    def __init__(self, hw, group, board, store=None, cfg=None):
        c = dict(DEFAULTS)
        c.update(getattr(board, "DEFAULTS", None) or {})
        c.update(cfg or {})
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
            self._o_vi[p] = b + snap_off(36 + k)
            v1 = board.CHIPS[ci].get("part") == "STPM33" and k == 1
            self._o_v[p] = b + snap_off(36 if v1 else 36 + k)
            self._o_per[p] = b + snap_off(23) + 2 * k
            self._o_pha[p] = b + snap_off(39 + 2 * k)
            self._o_e[p] = b + snap_off(42 + 12 * k)
            self._o_p[p] = b + snap_off(46 + 12 * k)
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
        self._state = array("b", [0] * (nph * 4))  # sag, swell, fail, reverse per phase
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
            v = mulsh(b[o] | (b[o + 1] & 0x7F) << 8, m[j], m[j + 1])
            o = self._o_vi[p]
            self.v_mv[p] = v
            self.i_ma[p] = mulsh((b[o + 1] >> 7) | b[o + 2] << 1 | b[o + 3] << 9,
                                 m[j + 2], m[j + 3])
            o = self._o_p[p]
            pw = mulsh(_s29(b, o), m[j + 4], m[j + 5])
            qv = mulsh(_s29(b, o + 8), m[j + 4], m[j + 5]) * REACTIVE_SIGN
            sr = _s29(b, o + 12)
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
            per = (b[o] | b[o + 1] << 8) & 0x0FFF
            if 1536 <= per <= 3840:
                self.f_mhz[p] = 125000000 // per
                o = self._o_pha[p]
                # C_PHA: delay of the current in 8 us steps, 0..period (reference and
                # sim); reported in (-180, 180] degrees, + = current lagging
                pha = (b[o + 2] | b[o + 3] << 8) & 0x0FFF
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
            _set(raw, r + 2, b, o + 8)
            _set(raw, r + 4, b, o + 12)
            self._based |= bit
            self._t_ok[p] = now
            return
        self._t_ok[p] = now
        dp = _delta(raw, r, b, o) * ACTIVE_SIGN
        dq = _delta(raw, r + 2, b, o + 8) * REACTIVE_SIGN
        ds = _delta(raw, r + 4, b, o + 12)
        k = p * self.nreg
        cpw = self._cpw[p]
        if dp >= 0:
            self._add(k + AI, dp, cpw)
            self._add(k + _T0 + self.tariff, dp, cpw)
            self._ck_e += dp >> 10
            q = 0 if dq >= 0 else 3
        else:
            self._add(k + AE, -dp, cpw)
            self._ck_e += (-dp) >> 10
            q = 1 if dq >= 0 else 2
        self._ck_s += (ds if ds >= 0 else -ds) >> 4
        self._add(k + RQ1 + q, dq if dq >= 0 else -dq, cpw)
        self._add(k + AP, ds if ds >= 0 else -ds, cpw)

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

    # ---------------------------------------------------------------- records
    def _clear_interval_stats(self):
        for p in range(self.nph):
            self._vmin[p] = 0
            self._vmax[p] = 0
            self._vsum_hi[p] = 0
            self._vsum_lo[p] = 0
            self._vn[p] = 0
            self.sags[p] = 0
            self.swells[p] = 0
        self._iv_invalid = 0
        self.pmax_w = 0
        self._dem_sum_w = 0
        self._dem_n = 0

    def interval_record(self, t_end, dur_s, flags):
        nph = self.nph
        vavg = []
        for p in range(nph):
            n = self._vn[p]
            vavg.append(((self._vsum_hi[p] << 20) + self._vsum_lo[p]) // n if n else 0)
        inv = self._iv_invalid
        for p in range(nph):
            if self._vn[p] == 0:
                inv |= 1 << p
        if inv:
            flags |= FLAG_INVALID
        return {
            "seq": self.iv_seq, "t_end": t_end, "dur_s": dur_s, "flags": flags,
            "tariff": self.tariff,
            "ai_wh": self.wh(AI), "ae_wh": self.wh(AE),
            "rq_varh": [self.wh(RQ1 + q) for q in range(4)], "ap_vah": self.wh(AP),
            "ai_ph_wh": [self.wh(AI, p) for p in range(nph)],
            "ae_ph_wh": [self.wh(AE, p) for p in range(nph)],
            "v_min_mv": list(self._vmin), "v_max_mv": list(self._vmax), "v_avg_mv": vavg,
            "pmax_w": self.pmax_w, "sags": list(self.sags), "swells": list(self.swells),
            "tariff_wh": [self.wh(_T0 + t) for t in range(self.tariffs.n)],
            "ph_invalid": inv,
        }

    def rt_record(self, t):
        return {
            "t": t, "valid": self.valid,
            "v_mv": list(self.v_mv), "i_ma": list(self.i_ma), "p_mw": list(self.p_mw),
            "q_mvar": list(self.q_mvar), "s_mva": list(self.s_mva),
            "pf_milli": list(self.pf_milli), "f_mhz": max(self.f_mhz),
            "f_ph_mhz": list(self.f_mhz), "angle_mdeg": list(self.angle_mdeg),
            "p_mw_total": self.p_mw_total, "q_mvar_total": self.q_mvar_total,
            "s_mva_total": self.s_mva_total,
            "ai_wh": self.wh(AI), "ae_wh": self.wh(AE), "tariff": self.tariff,
        }

    def emit(self, kind, rec):
        for s in self.sinks:
            try:
                s(kind, rec)
            except Exception:   # a broken listener must not stop the meter
                self.sink_errors += 1

    def event(self, kind, phase=0, value=0, t=None):
        self.ev_seq += 1
        self.emit("event", {"seq": self.ev_seq, "t": self.clock.time() if t is None else t,
                            "kind": kind, "phase": phase, "value": value})

    # ------------------------------------------------------------- after a cycle
    def poll(self):
        """Events, demand, interval close, rt records, checkpoints. Call after cycle()."""
        clock = self.clock
        self._events()
        now_ms = clock.ticks_ms()
        dem_ms = int(self.cfg["demand_s"]) * 1000
        if clock.ticks_diff(now_ms, self._dem_t0) >= dem_ms:
            if self._dem_n:
                d = self._dem_sum_w // self._dem_n
                if d > self.pmax_w:
                    self.pmax_w = d
            self._dem_sum_w = 0
            self._dem_n = 0
            self._dem_t0 = now_ms
        t = clock.time()
        synced = bool(clock.synced)
        if self._iv_end_t is None:
            self._open_interval(t, FLAG_PARTIAL)
        elif synced != self._synced or t < self._last_t - 2 or t > self._iv_end_t + \
                int(self.cfg["interval_s"]):
            # clock set or jumped: close what we have as a partial interval
            self._close_interval(self._last_t, FLAG_PARTIAL)
            self._open_interval(t, FLAG_PARTIAL)
            self.event("clock_set", 0, t - self._last_t, t)
        elif t >= self._iv_end_t:
            self._close_interval(self._iv_end_t, 0)
            self._open_interval(t, 0)
        self._synced = synced
        self._last_t = t
        self.tariff = self.tariffs.index(t, synced)
        rt = int(self.cfg["rt_s"])
        if rt and t >= self._rt_next:
            self._rt_next = t - t % rt + rt
            self.emit("rt", self.rt_record(t))
        el = clock.ticks_diff(now_ms, self._ck_ticks)
        if el >= int(self.cfg["ckpt_s"]) * 1000 or (
                el >= int(self.cfg["ckpt_min_s"]) * 1000 and (
                    self._ck_e >= self._ck_e_thr or self._ck_s >= self._ck_s_thr)):
            self.checkpoint()

    def _open_interval(self, t, flags):
        iv = int(self.cfg["interval_s"])
        self._iv_start_t = t
        self._iv_end_t = t - t % iv + iv
        self._iv_t0 = self.clock.ticks_ms()
        self._iv_flags = flags | (0 if self.clock.synced else FLAG_UNSYNCED)
        self._dem_t0 = self._iv_t0
        self._clear_interval_stats()

    def _close_interval(self, t_end, flags):
        if self._dem_n:           # demand sub-period in progress counts too
            d = self._dem_sum_w // self._dem_n
            if d > self.pmax_w:
                self.pmax_w = d
        dur_s = (self.clock.ticks_diff(self.clock.ticks_ms(), self._iv_t0) + 500) // 1000
        fl = self._iv_flags | flags | self.lost
        if not self.clock.synced:
            fl |= FLAG_UNSYNCED
        self.lost = 0
        self.iv_seq += 1
        rec = self.interval_record(t_end, dur_s, fl)
        # checkpoint first: an interval's totals are on flash before anyone sees them, so
        # published interval totals never go backwards, whatever happens next
        self.checkpoint()
        self.emit("interval", rec)
        return rec

    def _events(self):
        stt = self._state
        for p in range(self.nph):
            if not self.valid & (1 << p):
                continue
            v = self.v_mv[p]
            j = 4 * p
            fail = v < self.fail_mv[p]
            if fail != stt[j + 2]:
                stt[j + 2] = fail
                self.event("power_fail" if fail else "power_restore", p + 1, v)
                if fail and self.valid and all(
                        self.v_mv[q] < self.fail_mv[q] for q in range(self.nph)):
                    self.checkpoint()   # all phases gone: save while the supply holds
            sag = (not fail) and v < self.sag_mv[p]
            if sag != stt[j]:
                stt[j] = sag
                if sag:
                    self.sags[p] += 1
                    self.event("sag", p + 1, v)
            sw = v > self.swell_mv[p]
            if sw != stt[j + 1]:
                stt[j + 1] = sw
                if sw:
                    self.swells[p] += 1
                    self.event("swell", p + 1, v)
            rev = self.p_mw[p] < -int(self.cfg["reverse_w"]) * 1000
            if rev != stt[j + 3]:
                stt[j + 3] = rev
                if rev:
                    self.event("reverse_power", p + 1, self.p_mw[p] // 1000)
        # chip faults (per chip, once per change)
        fm = self.fail_mask
        prev = self._fm_prev
        if fm != prev:
            for p in range(self.nph):       # value 1 = stopped answering, 0 = back
                bit = self._cbit[p]
                if (fm ^ prev) & bit:
                    self.event("chip_error", p + 1, 1 if fm & bit else 0)
            self._fm_prev = fm

    # ----------------------------------------------------------- persistence
    def _pack(self, smax=0):
        nph, nr, nch = self.nph, self.nreg, len(self.board.CHIPS)
        out = bytearray(struct.pack("<BBBBIIIIB", _CKPT_VERSION, nph, nr, nch, self.iv_seq,
                                    self.ev_seq, self.clock.time() & 0xFFFFFFFF, smax,
                                    1 if self.clock.synced else 0))
        for p in range(nph):
            out.extend(struct.pack("<IB", self._cpw[p], 1 if self._based & (1 << p) else 0))
            for k in range(6):
                out.extend(struct.pack("<H", self._raw[6 * p + k]))
            for r in range(nr):
                out.extend(struct.pack("<II", self._wh[p * nr + r], self._rem[p * nr + r]))
        for ci in range(nch):
            out.extend(struct.pack("<I", self._fp[ci]))
        return bytes(out)

    def _unpack(self, data):
        """-> dict or None. Tolerates a changed cpw (rescales rem) and tariff count."""
        try:
            ver, nph, nr, nch, ivs, evs, t, smax, syn = struct.unpack_from("<BBBBIIIIB",
                                                                           data, 0)
            if ver != _CKPT_VERSION or nph != self.nph or nch != len(self.board.CHIPS):
                return None
            o = 21
            ph = []
            for p in range(nph):
                cpw, based = struct.unpack_from("<IB", data, o)
                o += 5
                raw = struct.unpack_from("<6H", data, o)
                o += 12
                regs = []
                for r in range(nr):
                    regs.append(struct.unpack_from("<II", data, o))
                    o += 8
                ph.append((cpw, based, raw, regs))
            fps = struct.unpack_from("<%dI" % nch, data, o)
        except (ValueError, TypeError, struct.error if hasattr(struct, "error") else ValueError):
            return None
        return {"iv_seq": ivs, "ev_seq": evs, "t": t, "ph": ph, "fp": fps, "nreg": nr,
                "smax": smax, "synced": syn}

    def checkpoint(self):
        """Save totals + raw counters; returns True if saved. Never raises."""
        self._ck_ticks = self.clock.ticks_ms()
        self._ck_e = 0
        self._ck_s = 0
        smax = self._smax
        self._smax = 0
        for p in range(self.nph):
            if self._sreg[p] > self._smax:
                self._smax = self._sreg[p]
        if self.store is None:
            return False
        try:
            self.store.save(self._pack(smax))
            return True
        except Exception:
            self.ckpt_errors += 1
            return False

    def _fingerprint(self, chip):
        return fingerprint(chip)

    def start(self, configure=None, assume_kept=None):
        """Boot: restore totals, find out per chip whether it kept its state across the MCU
        reset (its configuration fingerprint still matches the checkpoint) and reconcile its
        counters; configure the chips that lost it. `configure(ci)` (default: chip.start()
        + chip.configure(board cfg with saved calibration)) runs only for those.
        boot() decided already (and re-configured the kept chips, which changes no
        value): it passes assume_kept so the fingerprints are read after configure."""
        st = None
        if self.store is not None:
            data = self.store.load()
            st = self._unpack(data) if data else None
        chips = getattr(self.group, "chips", ())
        kept = 0
        cold = 0
        if st:
            self.iv_seq, self.ev_seq = st["iv_seq"], st["ev_seq"]
            nr = min(st["nreg"], self.nreg)
            for p, (cpw, based, raw, regs) in enumerate(st["ph"]):
                for r in range(nr):
                    wh, rem = regs[r]
                    if cpw != self._cpw[p]:          # board scale changed: keep the value
                        rem = rem * self._cpw[p] // cpw
                    self._wh[p * self.nreg + r] = wh
                    self._rem[p * self.nreg + r] = rem
        for ci in range(len(chips)):
            chip = chips[ci]
            fp = None
            try:
                fp = self._fingerprint(chip)
            except Exception:
                fp = None
            if assume_kept is not None:
                same = assume_kept and st is not None
            else:
                same = st and fp is not None and fp == st["fp"][ci]
            if same:
                kept += 1
                self._fp[ci] = fp or 0
                for p in range(self.nph):
                    if self._chip[p] == ci and st["ph"][p][1]:
                        raw = st["ph"][p][2]
                        for k in range(6):
                            self._raw[6 * p + k] = raw[k]
                        self._based |= 1 << p
                        self._t_ok[p] = self.clock.ticks_ms()
                self.lost |= FLAG_RECONCILED
                # exact only if < 2**31 counts passed since the checkpoint; with a clock
                # that kept time, bound it by the largest recent apparent power
                if not (st["synced"] and self.clock.synced) or (
                        st["smax"] * 2 * (self.clock.time() - st["t"]) * 3.815
                        >= 2147483648.0):
                    if not st["synced"] or not self.clock.synced:
                        self.uncertain = True
                    else:
                        self.lost |= FLAG_LOST
                continue
            cold += 1
            try:
                if configure is not None:
                    configure(ci)
                else:
                    self._configure(ci)
                self._fp[ci] = self._fingerprint(chip)
                # a global reset zeroes the energy rows: count from 0, not from the
                # first read, so the energy between reset and first read is not lost
                for p in range(self.nph):
                    if self._chip[p] == ci:
                        for k in range(6):
                            self._raw[6 * p + k] = 0
                        self._based |= 1 << p
                        self._t_ok[p] = self.clock.ticks_ms()
            except Exception as e:
                self.fail_mask |= 1 << ci
                self._fp[ci] = 0
                self._start_error = e
            if st:
                self.lost |= FLAG_LOST
        self.started = True
        self._synced = bool(self.clock.synced)
        self.event("boot", 0, kept)
        if st and cold:
            t = self.clock.time()
            self.event("power_restore", 0, (t - st["t"]) if self.clock.synced else 0)
        self._ck_ticks = self.clock.ticks_ms()
        return {"restored": st is not None, "kept": kept, "cold": cold}

    def _configure(self, ci):
        chip = self.group.chips[ci]
        cfg = self.board.CHIPS[ci]
        chip.start()
        chip.configure(_saved_cal(cfg, ci, self.hw), getattr(self.board, "MAINS_HZ", 50))

    async def run(self):
        """Read every read_ms forever; sinks get "interval", "event" and "rt" records."""
        if not self.started:
            self.start()
        clock = self.clock
        while True:
            t0 = clock.ticks_ms()
            self.cycle()
            self.poll()
            d = self.read_ms - clock.ticks_diff(clock.ticks_ms(), t0)
            await clock.sleep_ms(d if d > 0 else 0)


def _en_for(hw, i, n):
    en = getattr(hw, "en", None) or ()
    if len(en) == n:
        return en[i]
    return en[0] if (en and i == 0) else None   # one shared EN: only the first chip


def saved_fingerprints(store):
    """Chip fingerprints in the newest checkpoint (or None): for boot()."""
    if store is None:
        return None
    data = store.load()
    if not data or len(data) < 21:
        return None
    try:
        ver, nph, nr, nch = struct.unpack_from("<BBBB", data, 0)
        if ver != _CKPT_VERSION:
            return None
        o = 21 + nph * (5 + 12 + 8 * nr)
        return struct.unpack_from("<%dI" % nch, data, o)
    except (ValueError, IndexError):
        return None


def fingerprint(chip):
    """CRC32 of configuration rows 0..13 as read from the chip (self-clearing latch /
    reset bits of DSP_CR3 masked). Equal to the checkpoint's: the chip kept its state."""
    from metering.store import crc32
    buf = bytearray(4 * _CFG_ROWS)
    for r in range(_CFG_ROWS):
        v = chip.read_row(r) & 0xFFFFFFFF
        if r == 2:
            v &= ~0x00F00000
        struct.pack_into("<I", buf, 4 * r, v)
    return crc32(buf) or 1


def boot(hw, board, store=None, cfg=None, sinks=()):
    """Bring up the chips without losing energy, build the ChipGroup and the Meter.

    If the newest checkpoint's configuration fingerprints still match every chip, the
    chips kept their state across an MCU reset: they are NOT reset (a reset zeroes the
    energy rows), only re-configured (same values: the counters keep running) and the
    meter reconciles their counters against the checkpoint. Otherwise every chip is
    started (one shared global reset) and configured with any saved calibration."""
    from drivers.stpm3x import Stpm3x, ChipGroup
    n = len(board.CHIPS)
    chips = []
    for i in range(n):
        chips.append(Stpm3x(hw.links[i], board.CHIPS[i].get("part", "STPM34"),
                            syn=hw.syn, en=_en_for(hw, i, n), clock=hw.clock))
    fps = saved_fingerprints(store)
    kept = fps is not None and len(fps) == n
    if kept:
        for i in range(n):
            try:
                if fingerprint(chips[i]) != fps[i]:
                    kept = False
            except Exception:
                kept = False
            if not kept:
                break
    hz = getattr(board, "MAINS_HZ", 50)
    failed = 0
    for i in range(n):
        try:
            if not kept:
                chips[i].start()
            chips[i].configure(_saved_cal(board.CHIPS[i], i, hw), hz)
        except Exception as e:   # a dead chip must not stop the other phases
            failed |= 1 << i
            print("metering: chip %d: %s" % (i, e))
    group = ChipGroup(chips, syn=hw.syn, clock=hw.clock)
    m = Meter(hw, group, board, store, cfg)
    for s in sinks:
        m.sinks.append(s)
    m.start(configure=_noop, assume_kept=kept)
    m.fail_mask |= failed
    return m


def _noop(ci):
    pass


def _saved_cal(chip_cfg, ci, hw):
    try:
        from metering import calibrate
    except ImportError:
        return chip_cfg
    return calibrate.apply_saved(chip_cfg, ci, hw)


def _s29(b, o):
    # 29-bit two's complement power field from 4 little-endian bytes
    v = b[o] | b[o + 1] << 8 | b[o + 2] << 16 | (b[o + 3] & 0x1F) << 24
    return v - 0x20000000 if v & 0x10000000 else v


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
