# What the command layer (comm/commands.py) calls on a Meter: readings, counters,
# settings, presets, raw rows, time, calibration. Each takes the meter first; the Meter
# finds them here when one is called (Meter.__getattr__ and _API in metering/engine.py)
# and imports this module for the call only: nothing here is on the hot path, and a
# running meter between two commands does not hold its functions (docs/ram.md). Errors
# a user can fix raise ValueError with the fix in the message.
try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x  # noqa: E731

from metering.records import rt_record, interval_snapshot
from util import lookup

_CHX_MID = const(0x800)     # stpm3x_map.CHX_MID, CHV/CHC at mid-scale: the map is not
#                             kept after boot (tests/test_stpm3x_consts.py checks it)
_REG = (("ai_wh", 0), ("ae_wh", 1), ("ap_vah", 6))   # register: its index
_SETTABLE = ("rt_s", "read_ms", "interval_s", "demand_s", "ckpt_s", "ckpt_min_s", "ckpt_wh",
             "reverse_w", "sag_v", "swell_v", "swell_a", "tariff")


def readings(m):
    """Latest live values (the rt record)."""
    return rt_record(m, m.clock.time())


def counters(m):
    """Energy registers as in an interval record, plus diagnostics."""
    r = interval_snapshot(m, m.clock.time())
    for k in ("seq", "t_end", "dur_s", "flags", "v_min_mv", "v_max_mv", "v_avg_mv",
              "pmax_w", "sags", "swells", "ph_invalid"):
        r.pop(k, None)
    iv = m.intervals
    d = {"cycles": m.cycles, "fail_mask": m.fail_mask,
         "sink_errors": m.events.sink_errors, "record_errors": iv.errors,
         "records_lost": iv.dropped, "rt_skipped": iv.rt_skipped,
         "chip_restarts": m.health.restarts,
         "chips": [getattr(c, "counters", {}) for c in getattr(m.group, "chips", ())]}
    d.update(m.persist.counters())
    if m.startup is not None:
        d["startup"] = m.startup
    r["diag"] = d
    return r


def config_get(m):
    c = {}
    for k in _SETTABLE:
        if k in m.cfg:
            c[k] = m.cfg[k]
    c["sag_v"] = [v // 1000 for v in m.conditions.sag_mv]
    c["swell_v"] = [v // 1000 for v in m.conditions.swell_mv]
    c["swell_a"] = [v / 1000 for v in m.conditions.over_ma]
    c["max_read_ms"] = m.bound_ms // 2
    return c


def config_set(m, key, value):
    """Apply one setting; ValueError (with what to do) if it is refused."""
    if key not in _SETTABLE:
        raise ValueError("%s is not a metering setting (metering takes: %s)"
                         % (key, ", ".join(_SETTABLE)))
    if key == "tariff":
        from metering.tariff import Tariff
        t = Tariff(value)             # TariffError is a ValueError
        if t.n != m.tariffs.n:
            raise ValueError("tariff: the number of registers (%d) cannot change on a "
                             "running meter; keep %d" % (t.n, m.tariffs.n))
        m.tariffs = t
    elif key == "read_ms":
        v = int(value)
        if not 50 <= v <= m.bound_ms // 2:
            raise ValueError("read_ms %d: use 50..%d so that no counter wrap is missed"
                             % (v, m.bound_ms // 2))
        m.read_ms = v
    elif key in ("sag_v", "swell_v", "swell_a"):
        m.conditions.set_threshold(key, value)
    elif key == "reverse_w":
        m.conditions.reverse_mw = int(value) * 1000
    elif key == "interval_s":
        v = int(value)
        if v <= 0 or 86400 % v:
            raise ValueError("interval_s %d: use a divisor of a day (60, 300, 900, ...)"
                             % v)
    m.cfg[key] = value
    if key == "ckpt_wh":
        m.persist.set_threshold(value, min(m.phases.cpw))
    return {key: value}


def preset_counters(m, values, phase=None):
    """Set energy registers (matching the utility meter, or {} = reset to 0).

    With `phase` (1-based) the values apply to that phase. Without, a total (ai_wh,
    ae_wh, ap_vah, rq_varh, tariff_wh) is put on phase 1 and the other phases' same
    register is zeroed; *_ph_wh lists then set each phase. Emits "counter_preset" and
    checkpoints at once."""
    nph = m.nph
    phases = range(nph) if phase is None else (int(phase) - 1,)
    for p in phases:
        if not 0 <= p < nph:
            raise ValueError("phase %d: this meter has phases 1..%d" % (p + 1, nph))
    _check_preset(m, values or {})     # all or nothing: refuse before any change
    if not values:
        for p in phases:
            for r in range(m.nreg):
                m.preset(r, p, 0)
    values = values or {}
    for k in values:
        if (lookup(_REG, k, None) is None
                and k not in ("rq_varh", "tariff_wh", "ai_ph_wh", "ae_ph_wh")):
            raise ValueError("cannot preset %s" % k)
    # totals first, then per-phase lists (which win where both are given)
    for k in ("ai_wh", "ae_wh", "ap_vah", "rq_varh", "tariff_wh", "ai_ph_wh", "ae_ph_wh"):
        if k not in values:
            continue
        v = values[k]
        r = lookup(_REG, k, None)
        if r is not None:
            _preset_total(m, r, [v], phase)
        elif k == "rq_varh":
            for q in range(min(4, len(v))):
                _preset_total(m, 2 + q, [v[q]], phase)
        elif k == "tariff_wh":
            for t in range(min(m.tariffs.n, len(v))):
                _preset_total(m, 7 + t, [v[t]], phase)
        elif k in ("ai_ph_wh", "ae_ph_wh"):
            reg = 0 if k == "ai_ph_wh" else 1
            for p in range(min(nph, len(v))):
                m.preset(reg, p, v[p])
    m.event("counter_preset", phase or 0, m.wh(0))
    m.checkpoint()
    return counters(m)


def _check_preset(m, values):
    # A value must fit its register (32 bits on flash) and a list its registers: a
    # value that has nowhere to go is refused, never silently dropped.
    lim = {"rq_varh": 4, "tariff_wh": m.tariffs.n, "ai_ph_wh": m.nph,
           "ae_ph_wh": m.nph}
    for k, v in values.items():
        vs = v if isinstance(v, (list, tuple)) else [v]
        if k in lim and (not isinstance(v, (list, tuple)) or len(v) > lim[k]):
            raise ValueError("%s: this meter has %d such registers; give a list of at "
                             "most %d values" % (k, lim[k], lim[k]))
        if k not in lim and isinstance(v, (list, tuple)):
            raise ValueError("%s is one register: give one integer" % k)
        for x in vs:
            if not isinstance(x, int) or not 0 <= x <= 0xFFFFFFFF:
                raise ValueError("%s: %r does not fit a register (0..4294967295)"
                                 % (k, x))


def _preset_total(m, reg, v, phase):
    if phase is not None:
        m.preset(reg, int(phase) - 1, v[0])
        return
    for p in range(m.nph):
        m.preset(reg, p, v[0] if p == 0 else 0)


def raw_rows(m, chip, rows):
    chips = getattr(m.group, "chips", ())
    if not 0 <= chip < len(chips):
        raise ValueError("chip %d: this meter has chips 0..%d" % (chip, len(chips) - 1))
    return [chips[chip].read_row(r) for r in rows]


def reboot(m):
    """The `reboot` command, after its reply went out: checkpoint (so no energy is
    lost across the restart), then reset the MCU. The unix port has no
    machine.reset(): the process exits with status 3 for its supervisor to restart."""
    m.checkpoint()
    try:
        import machine
        machine.reset()
    except (ImportError, AttributeError):
        import sys
        sys.exit(3)


def set_time(m, epoch_s):
    """Set the wall clock; the running interval closes as partial at the next poll."""
    m.clock.set_time(int(epoch_s))


async def calibrate(m, args):
    """Command form of the procedure (calibrate.py) for one phase, while run() goes on:
    {"phase": 1, "v_mv": 230000, "i_ma": 5000, "pf_milli": 1000} -> gain step;
    pf_milli 500 -> phase step; "action": "offset" (reference voltage, no current:
    power offsets), "measure" (readings only), "reset"."""
    from metering.calibrate import Calibrator, CalError
    ph = int(args.get("phase", 1))
    action = args.get("action", "apply")
    if action == "measure":
        r = readings(m)
        return {k: (r[k][ph - 1] if isinstance(r[k], list) else r[k])
                for k in ("v_mv", "i_ma", "p_mw", "pf_milli", "angle_mdeg")}
    cal = Calibrator(m, phases=[ph], drive=not m.running)
    try:
        if action == "reset":
            p, ci, k = ph - 1, m.chans[ph - 1][1], m.chans[ph - 1][2]
            chip = m.group.chips[ci]
            chip.set_calibration(k, _CHX_MID, _CHX_MID, 0, 0)
            chip.set_offsets(k, 0, 0, 0, 0)
            cal._record(p, ci, k, chip)
            cal.save()
            return {"phase": ph, "reset": True}
        if action == "offset":
            r = await cal.offset()
            cal.save()
            return {"phase": ph, "ofa": r[ph][0], "ofr": r[ph][1]}
        pf = int(args.get("pf_milli", 1000))
        if pf == 1000:
            if "v_mv" not in args or "i_ma" not in args:
                raise ValueError("calibrate at PF 1 needs v_mv and i_ma of the reference")
            r = await cal.gain(args["v_mv"] / 1000.0, args["i_ma"] / 1000.0)
            res = {"phase": ph, "chv": r[ph][0], "chc": r[ph][1]}
        elif pf == 500:
            r = await cal.phase()
            res = {"phase": ph, "phc": r[ph][0], "phv": r[ph][1]}
        else:
            raise ValueError("calibrate: use pf_milli 1000 (gain) then 500 (phase)")
        cal.save()
        return res
    except CalError as e:
        raise ValueError(str(e))
