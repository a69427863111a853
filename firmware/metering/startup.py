# Bringing the chips up at boot without losing energy (metering/chips.py boot() runs it
# once and then drops this module: its code is needed at boot only, and its function and
# class objects would otherwise hold ~2 KiB of heap for the meter's life, docs/ram.md).
# This is the one place that decides whether a chip kept its state (decide()).
#
# At boot every chip is probed (read, not reset) and is, for the meter, one of:
#   KEPT   its configuration fingerprint equals the checkpoint's: the MCU reset, the chip
#          ran on; not reset, its counters are reconciled against the checkpoint's.
#   FRESH  it answers with every configuration row at its reset value: it has counted
#          since its own reset (power-up) at its reset gain. The software reset keeps
#          its data rows, and what it counted is booked (converted at the reset gain).
#   STALE  it answers with a configuration that is neither ours nor the reset one:
#          software reset, counters taken as a new baseline (energy since the
#          checkpoint is flagged lost).
#   HARD   it does not answer (wrong interface latched at power-up, hung): hardware
#          reset, by an EN edge of its whole EN line (every chip on it is started
#          together) or the SYN global reset (every chip on the SYN line).
# A chip reset by EN / SYN has counted since that instant (RESET); the energy between
# power-up and that instant was counted by nobody: bounded and reported. The energy a
# chip counted at its reset gain before configure() is booked at that gain; the few ms
# in which configure() changes the gain are split at the step (as a sign change is in
# energy.py). docs/metering.md "Start-up".
from array import array

from drivers.stpm3x import Stpm3xError
from drivers.stpm3x_cfg import in_reset_state
from drivers.stpm3x_start import start_chips, RESET_NONE, RESET_SW
from drivers.stpm3x_map import DCLK_HZ, CAL_BASE, CAL_DIV, RMS_V_MASK
from metering.persist_load import fingerprint_rows, fingerprint, apply_saved, load
from metering.energy import FLAG_LOST, FLAG_RECONCILED, AP
from metering import scale as _scale

KEPT = 0
FRESH = 1
RESET = 2
STALE = 3
HARD = 4
FAILED = 5
STATE_NAMES = ("kept", "fresh", "reset", "stale", "hard", "failed")

_COUNTS_PER_MS = DCLK_HZ / 2048 / 1000     # energy counts per power-row LSB per ms
_MARGIN = 1.25          # the load may change while nobody counts: 25 % on the estimate


def decide(rows, saved_fp):
    """How a chip probed at boot is to be treated (see the top of this file). rows: what
    probe() read (None = no answer); saved_fp: its fingerprint in the checkpoint."""
    if rows is None:
        return HARD
    if saved_fp and fingerprint_rows(rows) == saved_fp:
        return KEPT
    if in_reset_state(rows):
        return FRESH
    return STALE


class Startup:
    """One boot's bring-up and start-up energy accounting (runs once)."""

    def __init__(self, m):
        self.m = m
        self.chips = m.group.chips
        n = len(self.chips)
        self.state = [HARD] * n
        self.errors = [None] * n

    def run(self):
        m = self.m
        clock = m.clock
        chips = self.chips
        n = len(chips)
        saved = load(m.persist)
        restore(m, saved)
        fps = saved["fp"] if saved else None
        rows = [c.probe() for c in chips]
        st = self.state
        for i in range(n):
            st[i] = decide(rows[i], fps[i] if fps and i < len(fps) else None)
        hard = soft = 0
        for i in range(n):
            if st[i] == HARD:
                hard |= 1 << i
            elif st[i] in (FRESH, STALE):
                soft |= 1 << i
        t_start = clock.ticks_ms()
        kinds, errors = start_chips(chips, hard, soft, m.group.syn)
        # the MCU's ticks: time since power-up (MCU and chips power up together), read
        # after the resets so that it bounds the uncounted time from above
        t_reset = clock.ticks_ms()
        for i in range(n):
            if errors[i] is not None:
                st[i] = FAILED
                self.errors[i] = errors[i]
            elif kinds[i] not in (RESET_NONE, RESET_SW):
                st[i] = RESET             # counters restarted at t_reset (EN / SYN)
            elif st[i] == KEPT:
                chips[i].load_rows(rows[i])
        m.persist.prepare()
        # counters at the reset configuration, one latched instant for every chip
        g = m.group
        t_pre = clock.ticks_ms()
        u_pre = clock.ticks_us()         # the latch instant, finer: the window is short
        g.latch()
        fail = g.snapshot()
        pre = self._take(fail)
        hz = getattr(m.board, "MAINS_HZ", 50)
        for i in range(n):
            if st[i] == FAILED:
                continue
            try:
                chips[i].configure(apply_saved(m.board.CHIPS[i], i, m.hw), hz)
            except Exception as e:       # a dead chip must not stop the other phases
                st[i] = FAILED
                self.errors[i] = e
                print("metering: chip %d: %s" % (i, e))
        t_post = clock.ticks_ms()
        u_post = clock.ticks_us()
        w_ms = clock.ticks_diff(u_post, u_pre) / 1000.0
        g.latch()
        fail2 = g.snapshot()
        m.phases.convert(g.buf, fail2)
        for i in range(n):
            if fail2 & (1 << i) and st[i] != FAILED:
                st[i] = FAILED
        self._account(saved, pre, t_start, t_reset, t_pre, t_post, w_ms, u_post)
        for i in range(n):
            if st[i] == FAILED:
                m.fail_mask |= 1 << i
                if self.errors[i] is None:
                    self.errors[i] = Stpm3xError("no valid snapshot after start-up")
            else:
                try:
                    m.persist.fp[i] = fingerprint(chips[i])
                except Exception:
                    m.persist.fp[i] = 0
        self._events(saved)
        m.started = True

    def _take(self, fail):
        """Copy what the start-up accounting needs out of the snapshot buffer: per phase
        the six raw counter halves and the power rows and I field, or None."""
        m = self.m
        ph = m.phases
        b = m.group.buf
        ph.convert(b, fail)
        out = []
        for p in range(ph.nph):
            if fail & ph.cbit[p]:
                out.append(None)
                continue
            o = ph.o_e[p]
            raw = [b[o + j] | b[o + j + 1] << 8 for j in (0, 2, 8, 10, 12, 14)]
            out.append((raw, ph.pr[p], ph.qr[p], ph.sreg[p], ph.i_field(b, p),
                        ph.v_field(b, p)))
        return out

    def _account(self, saved, pre, t_start, t_reset, t_pre, t_post, w_ms, u_post):
        m = self.m
        ph = m.phases
        e = m.energy
        clock = m.clock
        now = t_post
        td = clock.ticks_diff
        up_reset = t_reset                 # ticks since the MCU (and the chips) powered up
        up_pre = t_pre
        b = m.group.buf
        nph = ph.nph
        self.booked_mwh = array("i", [0] * nph)
        self.unmetered_mwh = array("i", [0] * nph)
        self.cold = 0
        for p in range(nph):
            ci = ph.chip[p]
            s = self.state[ci]
            o = ph.o_e[p]
            if s == FAILED:
                continue
            if s == KEPT:
                self._reconcile(p, saved, now)
                continue
            self.cold |= 1 << p
            if s == STALE or pre[p] is None:
                e.rebase(p, b, o, now, ph.pr[p], ph.qr[p], ph.sreg[p], u_post)
                if saved:
                    e.lost |= FLAG_LOST
                continue
            # FRESH (counted since power-up) or RESET (since t_reset), at reset gain
            raw0, pr0, qr0, sr0, if0, vf0 = pre[p]
            dp0 = _s32(raw0[0], raw0[1])
            dq0 = _s32(raw0[2], raw0[3])
            ds0 = _s32(raw0[4], raw0[5])
            # window pre -> post: counts at both gains; solve the gain step from the
            # apparent counter (always growing), as energy._split does for a sign change
            rp = e.raw                              # baseline = the post snapshot
            e.rebase(p, b, o, now, ph.pr[p], ph.qr[p], ph.sreg[p], u_post)
            r = 6 * p
            dpw = _s32(rp[r], rp[r + 1]) - dp0
            dqw = _s32(rp[r + 2], rp[r + 3]) - dq0
            dsw = _s32(rp[r + 4], rp[r + 5]) - ds0
            r1 = sr0 * _COUNTS_PER_MS
            r2 = ph.sreg[p] * _COUNTS_PER_MS
            tau = w_ms / 2.0
            if abs(r1 - r2) > 0.01 * max(r1, r2) and w_ms > 0:
                tau = (dsw - r2 * w_ms) / (r1 - r2)
                tau = 0.0 if tau < 0 else (w_ms * 1.0 if tau > w_ms else tau)
            pw1 = pr0 * _COUNTS_PER_MS * tau        # window part before the gain step
            qw1 = qr0 * _COUNTS_PER_MS * tau
            sw1 = sr0 * _COUNTS_PER_MS * tau
            f = self._factor(p)
            up_s = (up_pre if s == FRESH else td(t_pre, t_start)) / 1000.0
            plausible = ds0 >= 0 and ds0 <= 2 * r1 * (up_s * 1000 + 50) + 1000
            if f and if0 < 0.95 * _scale.I_FIELD_FS and vf0 < 0.95 * RMS_V_MASK and plausible:
                dp = (dp0 + pw1) * f + (dpw - pw1)
                dq = (dq0 + qw1) * f + (dqw - qw1)
                ds = (ds0 + sw1) * f + (dsw - sw1)
                miss_ms = up_reset if s == RESET else 0
            else:
                # clipped at the reset gain, counted too long, or a sensor whose reset
                # reading means nothing (Rogowski without its integrator): only what was
                # counted at the configured gain is booked, the rest is bounded
                dp = dpw - pw1
                dq = dqw - qw1
                ds = dsw - sw1
                miss_ms = up_pre + tau
            dp, dq, ds = int(dp), int(dq), int(ds)
            add_counts(e, p, dp, dq, ds, m.tariff)
            cpw = ph.cpw[p]
            self.booked_mwh[p] = int((dp if dp > 0 else -dp) * 1000 // cpw)
            # what nobody counted: at most the apparent power of the first read for the
            # time from power-up, with a margin for a load that changed meanwhile
            self.unmetered_mwh[p] = int(ph.s_mva[p] * miss_ms * _MARGIN / 3600000) \
                if miss_ms else 0

    def _factor(self, p):
        """Counts at the reset configuration -> counts at the configured one: the PGA
        gain ratio and the calibration gains (CHV, CHC) the chip has now; 0 when the
        reset reading cannot be converted."""
        m = self.m
        ph = m.phases
        ci = ph.chip[p]
        k = ph.k[p]
        chcfg = m.board.CHIPS[ci]["ch"][k]
        if chcfg.get("sensor", "ct") == "rogowski":
            return 0
        chip = self.chips[ci]
        cal = chip.get_calibration(k)
        kv = 0 if (chip.part == "STPM33" and k == 1) else k
        calv = CAL_BASE + chip.get_calibration(kv)["chv"] / CAL_DIV
        cali = CAL_BASE + cal["chc"] / CAL_DIV
        g = int(chcfg.get("gain", 2))
        return g / _scale.reset_gain(k) * calv * cali / (_scale.CAL_NOM * _scale.CAL_NOM)

    def _reconcile(self, p, saved, now):
        """A chip that kept running: the next read takes the int32 difference against
        the checkpoint's raw counters, exact while fewer than 2**31 counts passed."""
        m = self.m
        e = m.energy
        clock = m.clock
        cpw, based, raw, regs = saved["ph"][p]
        if based:
            e.set_raw(p, raw, now, skip=True)
        else:
            e.rebase(p, m.group.buf, m.phases.o_e[p], now, 0, 0, 0, None)
        e.lost |= FLAG_RECONCILED
        # with a clock that kept time, bound the counts by the largest recent apparent
        # power: 2**31 counts would be ambiguous
        if not (saved["synced"] and clock.synced) or (
                saved["smax"] * 2 * (clock.time() - saved["t"]) * DCLK_HZ / 2048
                >= 2147483648.0):
            if not saved["synced"] or not clock.synced:
                m.uncertain = True
            else:
                e.lost |= FLAG_LOST

    def _events(self, saved):
        m = self.m
        kept = 0                          # bit mask of the chips that kept their state
        cold = 0
        for i in range(len(self.state)):
            if self.state[i] == KEPT:
                kept |= 1 << i
            else:
                cold += 1
        if saved and cold:
            m.energy.lost |= FLAG_LOST    # what was counted since the checkpoint is gone
        m.events.event("boot", 0, kept)
        if saved and cold:
            t = m.clock.time()
            m.events.event("power_restore", 0, (t - saved["t"]) if m.clock.synced else 0)
        for p in range(m.nph):
            if self.cold & (1 << p):
                m.events.event("startup", p + 1, self.unmetered_mwh[p])
        m.startup = {"states": [STATE_NAMES[s] for s in self.state],
                     "booked_mwh": list(self.booked_mwh),
                     "unmetered_mwh": list(self.unmetered_mwh),
                     "errors": [None if x is None else str(x) for x in self.errors]}


def _s32(lo, hi):
    v = lo | hi << 16
    return v - 0x100000000 if v & 0x80000000 else v


def restore(m, saved):
    """Registers and sequence numbers of meter m from a checkpoint (boot only: here, not
    a method of Meter/Energy, so that a running meter does not hold it)."""
    if not saved:
        return
    m.intervals.seq = saved["iv_seq"]
    m.events.seq = saved["ev_seq"]
    e = m.energy
    nr = e.nreg
    for p in range(m.nph):
        cpw_saved, based, raw, regs = saved["ph"][p]
        # a changed cpw (board scale) rescales rem so that the value is kept
        cpw = e.cpw[p]
        for r in range(min(len(regs), nr)):
            wh, rem = regs[r]
            if cpw_saved != cpw:
                rem = rem * cpw // cpw_saved
            e.wh_[p * nr + r] = wh
            e.rem[p * nr + r] = rem


def add_counts(e, p, dp, dq, ds, tariff):
    """Book counts measured outside the reads (start-up) into Energy e: active dp,
    reactive dq, apparent ds, in this phase's counts."""
    k = p * e.nreg
    cpw = e.cpw[p]
    e.book(k, dp, dq, cpw, tariff)
    e._add(k + AP, ds if ds >= 0 else -ds, cpw)
