# The meter: small parts composed here, each with one job (docs/metering.md):
#   phases      phases.py   layout of the snapshot, live values of the last read
#   energy      energy.py   energy registers (wh, rem) from the chips' counters
#   stats       stats.py    voltage / demand / sag / swell statistics of the interval
#   events      events.py   sinks and event sequence; conditions: what raises events
#   intervals   records.py  interval and rt records
#   persist     persist.py  checkpoint content, schedule and failures
#   health      chips.py    chips that restarted or went silent (start-up: chips.boot)
#   (api.py     what the command layer calls: imported per call, Meter.__getattr__)
#
# cycle() is the hot path: latch, snapshot, convert, accumulate; it allocates nothing in
# steady state (tested under micropython.heap_lock()). poll() runs after it and allocates
# only when it emits something.

from metering.tariff import Tariff
from metering.phases import Phases
from metering.energy import Energy, T0
from metering.stats import IntervalStats
from metering.events import Events, Conditions
from metering.records import Intervals
from metering.persist import Persistence
from metering.chips import Health, boot, _unload  # noqa: F401  (boot: main.py's entry)
from util import merge, pick

# Names are imported here only where this module uses them: each imported name is a slot
# of this module's globals for the meter's life (docs/ram.md). The register numbers,
# flags and snapshot layout are read from their own modules (energy, records, drivers).

DEFAULTS = (
    ("read_ms", 1000),      # read period; must stay below scale.max_read_ms(board)
    ("interval_s", 900),    # interval records, aligned to the wall clock
    ("rt_s", 10),           # real-time records (0 = off)
    ("demand_s", 60),       # maximum-demand integration period
    ("ckpt_s", 900),        # checkpoint at least this often (and at each interval close)
    ("ckpt_min_s", 60),     # ... and at most this often
    ("ckpt_wh", 20),        # ... earlier if this much energy is not yet checkpointed
    ("v_nom_v", 230),       # nominal voltage: default sag / swell / fail thresholds
    ("sag_pct", 90),
    ("swell_pct", 110),
    ("fail_pct", 50),       # below this a phase is "power_fail"
    ("reverse_w", 20),      # net export above this raises "reverse_power"
    ("restart_s", 30),      # a chip silent this long is restarted (then every restart_s)
    ("tariff", None),       # tariff.py config
)


# A board or read period the meter cannot run with (raised at boot only): a ValueError,
# no class of its own (~100 bytes of heap for the meter's lifetime; docs/ram.md).
MeterError = ValueError


class Meter:
    def __init__(self, hw, group, board, store=None, cfg=None):
        # board DEFAULTS are shared by several parts (fs, ...): take the metering keys
        c = merge("metering config", DEFAULTS,
                  pick(getattr(board, "DEFAULTS", None), dict(DEFAULTS)), cfg)
        self.cfg = c
        self.hw = hw
        self.clock = hw.clock
        self.group = group
        self.board = board
        self.store = store
        from metering import scale as _scale    # here only: chips.boot drops it after
        try:
            ph = Phases(board, getattr(group, "base", None))
        except _scale.ScaleError as e:
            raise MeterError("board %s: %s" % (getattr(board, "NAME", "?"), e))
        self.phases = ph
        self.chans = ph.chans
        self.nph = ph.nph
        self.read_ms = int(c["read_ms"])
        self.bound_ms = _scale.max_read_ms(board)
        if not 50 <= self.read_ms <= self.bound_ms // 2:
            raise MeterError("read_ms %d: use 50..%d ms so that no counter wrap is missed"
                             % (self.read_ms, self.bound_ms // 2))
        self.tariffs = Tariff(c["tariff"])
        self.nreg = T0 + self.tariffs.n
        self.tariff = self.tariffs.unsynced
        self.energy = Energy(ph.cpw, self.nreg, self.bound_ms // 2, self.clock)
        self.stats = IntervalStats(self.nph, self.clock)
        self.events = Events(self.clock)
        self.sinks = self.events.sinks
        self.conditions = Conditions(board, ph, c)
        self.intervals = Intervals(self.nph, self.tariffs.n, self.clock, c)
        nch = len(board.CHIPS)
        self.persist = Persistence(store, self.nph, self.nreg, nch, c, self.clock)
        self.persist.set_threshold(c["ckpt_wh"], min(ph.cpw))
        self.health = Health(nch)
        self.fail_mask = 0
        self.cycles = 0
        self.started = False
        self.running = False      # run() is reading (commands must not drive cycle())
        self.uncertain = False    # boot reconciliation could not be bounded (no clock)
        self.startup = None       # how the chips came up (chips.Startup), for counters

    # ---------------------------------------------------------------- hot path
    def cycle(self):
        """Latch + snapshot + convert + accumulate. Allocation-free in steady state."""
        g = self.group
        clock = self.clock
        now = clock.ticks_ms()          # the latch instant: the counters' timestamp
        now_us = clock.ticks_us()
        g.latch()
        fail = g.snapshot()
        self.fail_mask = fail
        b = g.buf
        ph = self.phases
        e = self.energy
        st = self.stats
        valid = ph.convert(b, fail)
        st.invalid |= ph.all & ~valid
        tariff = self.tariff
        for p in range(self.nph):
            if valid & (1 << p):
                e.accumulate(p, b, ph.o_e[p], now, now_us, ph.pr[p], ph.qr[p], ph.sreg[p],
                             tariff)
                st.add_voltage(p, ph.v_mv[p])
        st.add_demand(ph.p_mw_total)
        self.cycles += 1
        return valid

    # ---------------------------------------------------------------- after a read
    def poll(self):
        """Events, chip health, demand, intervals, rt records, checkpoints."""
        clock = self.clock
        if self.conditions.check(self.phases, self.cycles, self.fail_mask, self.events,
                                 self.stats):
            self.checkpoint()       # every phase gone: save while the supply holds
        if self.energy.restarted or self.fail_mask or self.health.fail_on:
            self.health.check(self)
        now_ms = clock.ticks_ms()
        self.stats.demand_tick(now_ms, int(self.cfg["demand_s"]) * 1000)
        t = clock.time()
        synced = bool(clock.synced)
        self.intervals.retry(self)
        self.intervals.poll(self, t, synced)
        self.tariff = self.tariffs.index(t, synced)
        p = self.persist
        if p.due(self, now_ms):
            self.checkpoint()
        elif p._unreported >= 0:
            p.report(self)

    async def run(self):
        """Read every read_ms forever; sinks get "interval", "event" and "rt" records."""
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

    # ---------------------------------------------------------------- parts, by name
    def checkpoint(self):
        """Save now; never raises (persist.py counts and reports failures)."""
        return self.persist.checkpoint(self)

    def close_interval(self, t_end, flags=0):
        """Close the running interval now (tests; a meter closes it on the clock)."""
        return self.intervals.close(t_end, flags, self)

    def event(self, kind, phase=0, value=0, t=None):
        self.events.event(kind, phase, value, t)

    def wh(self, reg, phase=None):
        return self.energy.wh(reg, phase)

    def exact_wh(self, reg, phase):
        return self.energy.exact_wh(reg, phase)

    def counts(self, reg, phase):
        return self.energy.counts(reg, phase)

    def preset(self, reg, phase, wh):
        self.energy.preset(reg, phase, wh)

    # ---------------------------------------------------------------- commands (api.py)
    def __getattr__(self, name):
        # readings(), counters(), config_get(), config_set(), preset_counters(), raw_rows(),
        # reboot(), set_time(), calibrate(): metering/api.py, imported for the call and
        # dropped after it, so that a running meter does not hold it between two
        # commands (docs/ram.md)
        if name in _API:
            return lambda *a, **kw: _api(name, self, a, kw)
        # live values of the last read (phases.py): looked up here, not five properties
        # (a property and its getter are 32 bytes of heap each, for the meter's lifetime)
        if name in ("valid", "v_mv", "i_ma", "p_mw", "f_mhz"):
            return getattr(self.phases, name)
        raise AttributeError("'Meter' object has no attribute '%s'" % name)


_API = ("readings", "counters", "config_get", "config_set", "preset_counters", "raw_rows",
        "reboot", "set_time", "calibrate")


def _api(name, m, a, kw):
    import metering.api as api
    try:
        return getattr(api, name)(m, *a, **kw)    # calibrate: its coroutine keeps the module
    finally:
        _unload("metering.api")
