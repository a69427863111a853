# The chips' lifecycle as the meter sees it: bringing them up at boot without losing
# energy (metering/startup.py, loaded for the boot only) and restarting them when they
# fail at run time (Health).
import sys
import gc
from array import array

from metering.energy import FLAG_LOST
from util import unload as _unload


def en_pin(hw, board, i):
    """EN pin of chip i: CHIPS[i]["en"] indexes hw.en; without it, one pin per chip, or
    one pin shared by every chip (the field boards tie EN together)."""
    en = getattr(hw, "en", None) or ()
    if not en:
        return None
    k = board.CHIPS[i].get("en")
    if k is None:
        k = i if len(en) == len(board.CHIPS) else 0
    return en[k] if k < len(en) else None


def boot(hw, board, store=None, cfg=None, sinks=()):
    """Bring the chips up without losing energy, build the ChipGroup and the Meter,
    restore the checkpoint. The returned meter's `startup` says how (docs/metering.md)."""
    from metering.engine import Meter
    from drivers.stpm3x import Stpm3x, ChipGroup     # boot only: no slot in our globals
    n = len(board.CHIPS)
    chips = []
    for i in range(n):
        c = Stpm3x(hw.links[i], board.CHIPS[i].get("part", "STPM34"), syn=hw.syn,
                   en=en_pin(hw, board, i), clock=hw.clock)
        c.nch = len(board.CHIPS[i].get("ch", ()))      # the snapshot layout
        chips.append(c)
    group = ChipGroup(chips, syn=hw.syn, clock=hw.clock)
    # Collections between the boot stages: the objects that live for the meter's life
    # then fill the holes the stage before left, instead of being strewn among its
    # garbage (at 76-80 KiB that left no 2 KiB block for the MQTT receive buffer; ram.md)
    gc.collect()
    m = Meter(hw, group, board, store, cfg)
    gc.collect()
    for s in sinks:
        m.sinks.append(s)
    # The start-up code runs once: import it for the boot and drop what that import
    # loaded (metering.startup, drivers.stpm3x_start), so that its functions and classes
    # do not hold heap for the meter's life (docs/ram.md). A chip restart at run time
    # imports drivers.stpm3x_start again when it needs it (ChipGroup.recover).
    before = set(sys.modules)
    from metering.startup import Startup
    loaded = [k for k in sys.modules if k not in before]
    try:
        Startup(m).run()
    finally:
        Startup = None
        for name in loaded:
            _unload(name)
        # every module that reads the register map has copied its names by now: the
        # map's own globals (163 names, 1.4 KiB) are not read at run time. A module
        # imported later that needs it (metering.calibrate) imports it again.
        _unload("drivers.stpm3x_map")
        # and the offset code the map and the set-up side share (nothing at run time
        # reads it; 240 bytes on the 32-bit build)
        _unload("drivers.stpm3x_offset")
        # the scale computations (ChannelScale, the board's read bounds) are done: the
        # meter keeps their integer results (metering/phases.py); calibrate imports it again
        _unload("metering.scale")
        gc.collect()
    return m




class Health:
    """At run time, after a read: a chip whose counters restarted behind our back gets
    its configuration repaired (chip_error 2); a chip silent for restart_s is restarted
    with the chips on its EN line (chip_error 3), then again every restart_s."""

    def __init__(self, nch):
        self.fail_t = array("i", [0] * nch)
        self.fail_on = 0
        self.restarts = 0

    def check(self, m):
        clock = m.clock
        now = clock.ticks_ms()
        ph = m.phases
        e = m.energy
        chips = m.group.chips
        if e.restarted:
            done = 0
            for p in range(ph.nph):
                if e.restarted & (1 << p):
                    done |= ph.cbit[p]
            e.restarted = 0
            for ci in range(len(chips)):
                if done & (1 << ci):
                    try:
                        chips[ci].verify_config(True)     # rewrite rows that differ
                    except Exception:
                        pass
                    _phase_event(m, ci, "chip_error", 2)
            _drop_restart()
            m.checkpoint()
        for ci in range(len(chips)):
            bit = 1 << ci
            if not m.fail_mask & bit:
                self.fail_on &= ~bit
                continue
            if not self.fail_on & bit:
                self.fail_on |= bit
                self.fail_t[ci] = now
                continue
            if clock.ticks_diff(now, self.fail_t[ci]) < int(m.cfg["restart_s"]) * 1000:
                continue
            self.fail_t[ci] = now                      # next attempt in restart_s
            # the restart code is imported for the restart and dropped after it (ram.md)
            from drivers.stpm3x_start import recover
            try:
                mask = recover(m.group, ci)            # + the chips on its EN line
            except Exception:
                continue
            finally:
                recover = None
                _drop_restart()
            self.restarts += 1
            t = clock.ticks_ms()
            from metering.persist_load import fingerprint    # dropped below
            for cj in range(len(chips)):
                if not mask & (1 << cj):
                    continue
                try:
                    m.persist.fp[cj] = fingerprint(chips[cj])
                except Exception:
                    pass
                for p in range(ph.nph):                # counters restarted at 0
                    if ph.chip[p] == cj:
                        e.set_raw(p, (0, 0, 0, 0, 0, 0), t, skip=False)
                _phase_event(m, cj, "chip_error", 3)
            fingerprint = None
            _drop_restart()
            e.lost |= FLAG_LOST
            m.checkpoint()


def _drop_restart():
    # What a repair or a restart imported (the set-up side, the restart code, the
    # fingerprints and, through them, the register map and the offset code) is not kept
    # for the meter's life: ~3 KiB on the 32-bit build (docs/ram.md)
    for name in ("drivers.stpm3x_start", "drivers.stpm3x_cfg", "metering.persist_load",
                 "drivers.stpm3x_map", "drivers.stpm3x_offset"):
        _unload(name)


def _phase_event(m, ci, kind, value):
    ph = m.phases
    for p in range(ph.nph):
        if ph.chip[p] == ci:
            m.events.event(kind, p + 1, value)
