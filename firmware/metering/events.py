# Events of the meter: the sinks they go to, their sequence numbers, and the
# power-quality conditions that raise them (sag, swell, power fail, reverse power,
# overcurrent, a chip that stops answering). Field names: docs/architecture.md "Records".
from array import array

_SAG = 0
_SWELL = 1
_FAIL = 2
_REVERSE = 3
_OVER = 4
_NCOND = 5
_QUIET_READS = 2          # a chip just reset reads 0 V for a moment: not an event


class Events:
    """Sinks (callables sink(kind, record)) and the event sequence. A sink that raises
    does not stop the meter: it is counted in sink_errors (the counters command shows
    them)."""

    def __init__(self, clock):
        self.clock = clock
        self.sinks = []
        self.seq = 0
        self.sink_errors = 0
        self.last_sink_error = None

    def emit(self, kind, rec, only):
        """Hand a record to every sink (or to the sinks whose bit is set in `only`);
        returns the bit mask of the sinks that raised."""
        bad = 0
        sinks = self.sinks
        for i in range(len(sinks)):
            if not only & (1 << i):
                continue
            try:
                sinks[i](kind, rec)
            except Exception as e:   # a broken listener must not stop the meter
                self.sink_errors += 1
                self.last_sink_error = e
                bad |= 1 << i
        return bad

    def event(self, kind, phase=0, value=0, t=None):
        self.seq += 1
        self.emit("event", {"seq": self.seq, "t": self.clock.time() if t is None else t,
                            "kind": kind, "phase": phase, "value": value}, -1)


class Conditions:
    """Per-phase thresholds and the state of every condition, so that an event is raised
    once when a condition starts (power_fail / power_restore both ways).

    Thresholds: sag_v / swell_v of the board channel (else sag_pct / swell_pct of
    v_nom_v), fail_pct of v_nom_v, reverse_w (net export per phase), swell_a (current
    swell threshold of the channel: `overcurrent`, value mA at onset)."""

    def __init__(self, board, phases, cfg):
        nph = phases.nph
        self.nph = nph
        z = [0] * nph
        self.sag_mv = array("i", z)
        self.swell_mv = array("i", z)
        self.fail_mv = array("i", z)
        self.over_ma = array("i", z)    # 0 = no current threshold
        vn = int(cfg["v_nom_v"]) * 1000
        for p, (ph, ci, k) in enumerate(phases.chans):
            ch = board.CHIPS[ci]["ch"][k]
            self.sag_mv[p] = int(ch.get("sag_v", vn * int(cfg["sag_pct"]) // 100000) * 1000)
            self.swell_mv[p] = int(ch.get("swell_v", vn * int(cfg["swell_pct"]) // 100000)
                                   * 1000)
            self.fail_mv[p] = vn * int(cfg["fail_pct"]) // 100
            self.over_ma[p] = int(ch.get("swell_a", 0) * 1000)
        self.reverse_mw = int(cfg["reverse_w"]) * 1000
        self.state = array("b", [0] * (nph * _NCOND))
        self.fm_prev = 0

    def set_threshold(self, key, value):
        """config_set of sag_v / swell_v (V) or swell_a (A, 0 = off): one value for every
        phase."""
        arr = {"sag_v": self.sag_mv, "swell_v": self.swell_mv, "swell_a": self.over_ma}[key]
        for p in range(self.nph):
            arr[p] = int(value * 1000)

    def all_failed(self, phases):
        # A loop, not all(<generator>): a generator capturing `self` would be a heap
        # allocation on every read.
        for q in range(self.nph):
            if phases.v_mv[q] >= self.fail_mv[q]:
                return False
        return True

    def check(self, phases, cycles, fail_mask, ev, stats):
        """After a read: raise the events whose condition changed. Returns True when
        every phase just fell below the fail threshold (checkpoint while the supply
        holds)."""
        if cycles <= _QUIET_READS:
            return False
        stt = self.state
        all_gone = False
        for p in range(self.nph):
            if not phases.valid & (1 << p):
                continue
            v = phases.v_mv[p]
            j = _NCOND * p
            fail = 1 if v < self.fail_mv[p] else 0
            sag = 1 if (not fail) and v < self.sag_mv[p] else 0
            sw = 1 if v > self.swell_mv[p] else 0
            rev = 1 if phases.p_mw[p] < -self.reverse_mw else 0
            over = 1 if self.over_ma[p] and phases.i_ma[p] > self.over_ma[p] else 0
            if fail != stt[j + _FAIL]:
                stt[j + _FAIL] = fail
                ev.event("power_fail" if fail else "power_restore", p + 1, v)
                if fail and self.all_failed(phases):
                    all_gone = True
            if sag != stt[j + _SAG]:
                stt[j + _SAG] = sag
                if sag:
                    stats.sags[p] += 1
                    ev.event("sag", p + 1, v)
            if sw != stt[j + _SWELL]:
                stt[j + _SWELL] = sw
                if sw:
                    stats.swells[p] += 1
                    ev.event("swell", p + 1, v)
            if rev != stt[j + _REVERSE]:
                stt[j + _REVERSE] = rev
                if rev:
                    ev.event("reverse_power", p + 1, phases.p_mw[p] // 1000)
            if over != stt[j + _OVER]:
                stt[j + _OVER] = over
                if over:
                    ev.event("overcurrent", p + 1, phases.i_ma[p])
        # chip faults (per chip, once per change): value 1 = stopped answering, 0 = back
        prev = self.fm_prev
        if fail_mask != prev:
            for p in range(self.nph):
                bit = phases.cbit[p]
                if (fail_mask ^ prev) & bit:
                    ev.event("chip_error", p + 1, 1 if fail_mask & bit else 0)
            self.fm_prev = fail_mask
        return all_gone
