# Records and events of the meter: interval (wall-clock aligned), rt, events, maximum
# demand, and the checkpoint schedule. Mixed into engine.Meter; runs after each cycle()
# (poll) and allocates only when it emits something. Record fields: docs/architecture.md
# "Records".
try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

from metering.persist import FLAG_UNSYNCED, FLAG_PARTIAL, FLAG_INVALID

_AI = const(0)
_AE = const(1)
_RQ1 = const(2)
_AP = const(6)
_T0 = const(7)


class Records:
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
            "ai_wh": self.wh(_AI), "ae_wh": self.wh(_AE),
            "rq_varh": [self.wh(_RQ1 + q) for q in range(4)], "ap_vah": self.wh(_AP),
            "ai_ph_wh": [self.wh(_AI, p) for p in range(nph)],
            "ae_ph_wh": [self.wh(_AE, p) for p in range(nph)],
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
            "ai_wh": self.wh(_AI), "ae_wh": self.wh(_AE), "tariff": self.tariff,
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
        if self.reset_mask or self.fail_mask or self._fail_on:
            self._chip_health()
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

    def _all_failed(self):
        # A loop, not all(<generator>): a generator capturing `self` would turn it into
        # a heap-allocated cell on every _events() call, i.e. every metering cycle.
        for q in range(self.nph):
            if self.v_mv[q] >= self.fail_mv[q]:
                return False
        return True

    def _events(self):
        stt = self._state
        if self.cycles <= 2:    # a chip just reset reads 0 V for a moment: not an event
            return
        for p in range(self.nph):
            if not self.valid & (1 << p):
                continue
            v = self.v_mv[p]
            j = 4 * p
            fail = 1 if v < self.fail_mv[p] else 0
            sag = 1 if (not fail) and v < self.sag_mv[p] else 0
            sw = 1 if v > self.swell_mv[p] else 0
            rev = 1 if self.p_mw[p] < -int(self.cfg["reverse_w"]) * 1000 else 0
            if fail != stt[j + 2]:
                stt[j + 2] = fail
                self.event("power_fail" if fail else "power_restore", p + 1, v)
                if fail and self._all_failed():
                    self.checkpoint()   # all phases gone: save while the supply holds
            if sag != stt[j]:
                stt[j] = sag
                if sag:
                    self.sags[p] += 1
                    self.event("sag", p + 1, v)
            if sw != stt[j + 1]:
                stt[j + 1] = sw
                if sw:
                    self.swells[p] += 1
                    self.event("swell", p + 1, v)
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
