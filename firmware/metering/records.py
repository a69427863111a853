# Interval and rt records: intervals close on wall-clock boundaries (or as partial ones
# when the clock is set or jumps), rt records come every rt_s. Field names and flags:
# docs/architecture.md "Records".
#
# The interval record and its lists are built once and refilled in place at every close,
# so closing an interval needs no heap: the path that keeps energy works when the rest of
# the heap is exhausted. A sink must therefore encode or copy a record before it returns
# (the session encodes it into the flash queue, the console prints it). A record no sink
# could take is offered again to that sink at the next reads (at most 5 offers, counted;
# a record given up on raises a "record_lost" event).
try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

# the energy registers (metering/energy.py's AI, AE, RQ1, AP, T0) as const() literals:
# inlined, no slot in this module's globals (tests/test_stpm3x_consts.py checks them)
_AI = const(0)
_AE = const(1)
_RQ1 = const(2)
_AP = const(6)
_T0 = const(7)

FLAG_UNSYNCED = const(1)
FLAG_PARTIAL = const(2)
FLAG_INVALID = const(4)
FLAG_RECONCILED = const(8)
FLAG_LOST = const(16)

_RETRIES = const(5)        # offers of a record no sink took, one per read
_HOLD_MS = const(60000)    # longest wait of a record for a checkpoint of its totals


class Intervals:
    """The running interval and the rt schedule."""

    def __init__(self, nph, ntariff, clock, cfg):
        self.clock = clock
        self.cfg = cfg
        self.seq = 0
        self.start_t = None
        self.end_t = None
        self.t0_ms = 0
        self.flags = 0
        self.rt_next = 0
        self.last_t = 0
        self.synced = False
        self.rec = new_record(nph, ntariff)      # refilled in place at every close
        self.pending = 0              # sinks (bit mask) that did not take rec yet
        self.tries = 0
        self.held = False             # rec waits for a checkpoint that holds its totals
        self.held_ms = 0
        self.errors = 0               # interval records some sink failed to take
        self.dropped = 0              # ... and gave up on after _RETRIES offers
        self.rt_skipped = 0           # live readings not made for want of memory

    def open(self, t, flags, stats):
        iv = int(self.cfg["interval_s"])
        self.start_t = t
        self.end_t = t - t % iv + iv
        self.t0_ms = self.clock.ticks_ms()
        self.flags = flags | (0 if self.clock.synced else FLAG_UNSYNCED)
        stats.clear(self.t0_ms)

    def fill(self, t_end, dur_s, flags, m, r):
        """Refill the interval record (or r) from the meter's parts (no allocation)."""
        if r is None:
            r = self.rec
        e = m.energy
        st = m.stats
        inv = st.invalid_mask()
        if inv:
            flags |= FLAG_INVALID
        r["seq"] = self.seq
        r["t_end"] = t_end
        r["dur_s"] = dur_s
        r["flags"] = flags
        r["tariff"] = m.tariff
        r["ai_wh"] = e.wh(_AI)
        r["ae_wh"] = e.wh(_AE)
        rq = r["rq_varh"]
        for q in range(4):
            rq[q] = e.wh(_RQ1 + q)
        r["ap_vah"] = e.wh(_AP)
        ai = r["ai_ph_wh"]
        ae = r["ae_ph_wh"]
        vmin = r["v_min_mv"]
        vmax = r["v_max_mv"]
        vavg = r["v_avg_mv"]
        sags = r["sags"]
        swells = r["swells"]
        for p in range(e.nph):
            ai[p] = e.wh(_AI, p)
            ae[p] = e.wh(_AE, p)
            vmin[p] = st.vmin[p]
            vmax[p] = st.vmax[p]
            vavg[p] = st.vavg(p)
            sags[p] = st.sags[p]
            swells[p] = st.swells[p]
        r["pmax_w"] = st.pmax_w
        tw = r["tariff_wh"]
        for t in range(len(tw)):
            tw[t] = e.wh(_T0 + t)
        r["ph_invalid"] = inv
        return r

    def close(self, t_end, flags, m):
        """Close the running interval: checkpoint first (an interval's totals are on
        flash before anyone sees them, so published totals never go backwards), then
        hand the record to the sinks."""
        m.stats.close()
        dur_s = (self.clock.ticks_diff(self.clock.ticks_ms(), self.t0_ms) + 500) // 1000
        fl = self.flags | flags | m.energy.lost
        if not self.clock.synced:
            fl |= FLAG_UNSYNCED
        m.energy.lost = 0
        if self.pending:
            self.pending = 0         # the previous record is overwritten: say so
            self.dropped += 1
            m.events.event("record_lost", 0, self.rec["seq"])
        self.tries = 0
        if self.held:                # the previous record never got its checkpoint
            self.held = False
            self._offer(m, -1)
        self.seq += 1
        rec = self.fill(t_end, dur_s, fl, m, None)
        if m.persist.checkpoint(m) or m.persist.store is None:
            self._offer(m, -1)
        else:
            # not on flash: published totals could go backwards after a reset. Hold the
            # record until a later save succeeds (persist retries), at most _HOLD_MS.
            self.held = True
            self.held_ms = self.clock.ticks_ms()
        return rec

    def _offer(self, m, only):
        bad = m.events.emit("interval", self.rec, only)
        if bad:
            self.errors += 1
            self.tries += 1
            if self.tries < _RETRIES:
                self.pending = bad           # offered again to those sinks only
            else:
                self.pending = 0
                self.dropped += 1
                m.events.event("record_lost", 0, self.rec["seq"])
        else:
            self.pending = 0
            self.tries = 0

    def retry(self, m):
        """Offer a held record once its totals are on flash (or it waited _HOLD_MS), and
        again a record some sinks failed to take (one offer per read)."""
        if self.held:
            if m.persist.streak == 0 or self.clock.ticks_diff(
                    self.clock.ticks_ms(), self.held_ms) >= _HOLD_MS:
                self.held = False
                self._offer(m, -1)
            return
        if self.pending:
            self._offer(m, self.pending)

    def poll(self, m, t, synced):
        """Open / close intervals for wall time t."""
        if self.end_t is None:
            self.open(t, FLAG_PARTIAL, m.stats)
        elif synced != self.synced or t < self.last_t - 2 or t > self.end_t + \
                int(self.cfg["interval_s"]):
            # clock set or jumped: close what we have as a partial interval
            self.close(self.last_t, FLAG_PARTIAL, m)
            self.open(t, FLAG_PARTIAL, m.stats)
            m.events.event("clock_set", 0, t - self.last_t, t)
        elif t >= self.end_t:
            self.close(self.end_t, 0, m)
            self.open(t, 0, m.stats)
        self.synced = synced
        self.last_t = t
        rt = int(self.cfg["rt_s"])
        if rt and t >= self.rt_next:
            self.rt_next = t - t % rt + rt
            try:
                rec = rt_record(m, t)
            except MemoryError:
                # a live reading keeps no energy: skipped and counted, never the end of
                # the metering cycle (it was, at an 80 KiB heap)
                self.rt_skipped += 1
                return
            m.events.emit("rt", rec, -1)


def rt_record(m, t):
    """Live values (a new dict: rt records are not energy-keeping)."""
    ph = m.phases
    return {
        "t": t, "valid": ph.valid,
        "v_mv": list(ph.v_mv), "i_ma": list(ph.i_ma), "p_mw": list(ph.p_mw),
        "q_mvar": list(ph.q_mvar), "s_mva": list(ph.s_mva),
        "pf_milli": list(ph.pf_milli), "f_mhz": max(ph.f_mhz),
        "f_ph_mhz": list(ph.f_mhz), "angle_mdeg": list(ph.angle_mdeg),
        "p_mw_total": ph.p_mw_total, "q_mvar_total": ph.q_mvar_total,
        "s_mva_total": ph.s_mva_total,
        "ai_wh": m.energy.wh(_AI), "ae_wh": m.energy.wh(_AE), "tariff": m.tariff,
    }


def new_record(nph, ntariff):
    """An interval record with every field (docs/architecture.md "Records")."""
    z = [0] * nph
    return {"seq": 0, "t_end": 0, "dur_s": 0, "flags": 0, "tariff": 0,
            "ai_wh": 0, "ae_wh": 0, "rq_varh": [0, 0, 0, 0], "ap_vah": 0,
            "ai_ph_wh": list(z), "ae_ph_wh": list(z), "v_min_mv": list(z),
            "v_max_mv": list(z), "v_avg_mv": list(z), "pmax_w": 0,
            "sags": list(z), "swells": list(z), "tariff_wh": [0] * ntariff,
            "ph_invalid": 0}


def interval_snapshot(m, t):
    """A fresh dict with the interval record's fields as of now (the counters command;
    allocates, leaves the preallocated record alone)."""
    r = new_record(m.nph, m.tariffs.n)
    return m.intervals.fill(t, 0, 0, m, r)
