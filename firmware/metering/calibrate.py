# Calibration against a reference load: gain (CHV, CHC) at PF 1, phase (PHC, PHV) at
# PF 0.5 lagging, written through the driver, saved to flash and re-applied at boot.
#
# Procedure (docs/metering.md "Calibration"):
#   1. Reference source: Vn, In, PF 1 on the phases to calibrate; wait until stable.
#      `await cal.gain(vn_v, in_a)`:
#        a. average the V RMS field over `seconds`; CHV_new = (12288 + CHV_old) x
#           Xv / Vavg - 12288 with Xv = Vn / V_LSB (reference formula, any starting CHV);
#        b. count the *apparent* energy over `seconds`: CHC_new from the ratio of the
#           expected counts (Vn x In x t x cpw) to the counted ones. Apparent energy does
#           not depend on the phase error, so step 2 does not undo this one; and energy
#           counts resolve far finer than the 17-bit I RMS field.
#   2. Reference source: Vn, In, PF 0.5 lagging (current 60 deg behind).
#      `await cal.phase()`: the ratio of active to apparent energy is cos(measured angle)
#      whatever the gains; the angle error d = angle - 60 deg is compensated by
#      PHV (2.304 deg steps, voltage delay) and PHC (0.0045 deg steps at 50 Hz).
#   0. and 3. Reference voltage Vn on, NO current (load disconnected):
#      `await cal.offset()`: the active and reactive power the chip still measures is the
#      front end's offset (crosstalk from the voltage into the current channel); it is
#      written into the power offset registers OFA / OFAF and OFR (DSP_CR9..12), which the
#      chip adds to the power it measures. Done first (so that the gain and phase steps
#      do not see it) and again last (the gain steps changed its size in register units).
#   4. `cal.save()` stores the values (A/B store "cal" in hw.fs); boot() applies them
#      every time it configures a chip. Each step emits a "calibration" event.
# The firmware LSBs never change: calibration moves the chip's gain to the nominal one.
from metering.energy import AI, AE, AP, RQ1
from metering.persist_load import fingerprint
from drivers.stpm3x_map import OFFSET_LSB_P, DCLK_HZ
from metering.store import Store, StoreError
from metering.scale import ChannelScale
# Loading saved values at boot lives in persist.py, so that this module (13 KB of
# bytecode) is imported only when someone calibrates.
from metering.persist_load import load_cal as _load, apply_saved  # noqa: F401

try:
    import json
except ImportError:  # pragma: no cover
    import ujson as json

from drivers.stpm3x_map import CHX_MID as CAL_MID, CAL_BASE, CAL_DIV  # noqa: F401
PHC_SIGN = 1            # +PHC delays the current (sim/physics.py; unconfirmed on silicon)
_PHC_US = 0.25          # PHC step: 1 / 4 MHz
_PHV_STEPS = 512        # one PHV step = 512 PHC steps
_SQRT3 = 1.7320508075688772


class CalError(Exception):
    pass


class Calibrator:
    """Runs the procedure on a Meter. With drive=True (default) it calls meter.cycle()
    itself every read_ms: stop meter.run() first (the command handler does)."""

    def __init__(self, meter, phases=None, drive=True):
        self.m = meter
        self.drive = drive
        self.phases = list(range(meter.nph)) if phases is None else [p - 1 for p in phases]
        self.results = {}
        for p in self.phases:
            if not 0 <= p < meter.nph:
                raise CalError("phase %d does not exist on this board" % (p + 1))

    def _chip(self, p):
        ph, ci, k = self.m.chans[p]
        # the channel's scale, built again: the meter keeps none (metering/phases.py)
        s = ChannelScale(self.m.board.CHIPS[ci]["ch"][k])
        return self.m.group.chips[ci], ci, k, s

    async def _window(self, seconds):
        """Cycles for `seconds`: V field sums, active/apparent count deltas, duration."""
        m = self.m
        clock = m.clock
        n = max(2, int(seconds * 1000 // m.read_ms))
        nph = m.nph
        vsum = [0] * nph
        cnt = [0] * nph
        a0 = [0] * nph
        s0 = [0] * nph
        q0 = [0] * nph
        a1 = [0] * nph
        s1 = [0] * nph
        q1 = [0] * nph
        imax = [0] * nph
        t0 = None
        t_us = 0
        for j in range(n + 1):
            await clock.sleep_ms(m.read_ms)
            if self.drive:
                m.cycle()
            t = clock.ticks_us()
            if t0 is not None:
                t_us += clock.ticks_diff(t, t0)
            t0 = t
            b = m.group.buf
            for p in self.phases:
                if not m.valid & (1 << p):
                    raise CalError("phase %d: chip not answering, check wiring" % (p + 1))
                a = m.counts(AI, p) - m.counts(AE, p)
                s = m.counts(AP, p)
                # net reactive: Q1 + Q2 are positive, Q3 + Q4 negative
                q = (m.counts(RQ1, p) + m.counts(RQ1 + 1, p) - m.counts(RQ1 + 2, p)
                     - m.counts(RQ1 + 3, p))
                if j == 0:
                    a0[p], s0[p], q0[p] = a, s, q
                    continue
                a1[p], s1[p], q1[p] = a, s, q
                vsum[p] += m.phases.v_field(b, p)
                cnt[p] += 1
                if m.phases.i_ma[p] > imax[p]:
                    imax[p] = m.phases.i_ma[p]
        return {"v": [vsum[p] / cnt[p] if cnt[p] else 0 for p in range(nph)],
                "a": [a1[p] - a0[p] for p in range(nph)],
                "s": [s1[p] - s0[p] for p in range(nph)],
                "q": [q1[p] - q0[p] for p in range(nph)], "i_ma": imax, "t_s": t_us / 1e6}

    async def offset(self, seconds=30, max_ma=50):
        """Steps 0 and 3 (reference voltage on, no current): measure the active and
        reactive power offsets and cancel them with OFA / OFAF and OFR. Returns
        {phase: (ofa, ofr)} (codes: -512..511, units of 4 power-row LSB)."""
        m = self.m
        w = await self._window(seconds)
        out = {}
        for p in self.phases:
            chip, ci, k, s = self._chip(p)
            if w["v"][p] < 100:
                raise CalError("phase %d: no voltage; connect the reference source" % (p + 1))
            if w["i_ma"][p] > max_ma:
                raise CalError("phase %d: %d mA flows; the offset step needs the load "
                               "disconnected (no current)" % (p + 1, w["i_ma"][p]))
            # counts/s -> power-row LSB: each 128 us the counter grows by P_reg / 2048
            k_lsb = 2048.0 / DCLK_HZ / w["t_s"] / OFFSET_LSB_P
            cur = chip.get_offsets(k)
            ofa = _code(cur["ofa"] - w["a"][p] * k_lsb, p, "active")
            ofr = _code(cur["ofr"] - w["q"][p] * k_lsb, p, "reactive")
            chip.set_offsets(k, ofa=ofa, ofaf=ofa, ofr=ofr)
            out[p + 1] = (ofa, ofr)
            self._record(p, ci, k, chip)
            m.event("calibration", p + 1, ofa)
        return out

    async def gain(self, vn_v, in_a, seconds=10):
        """Step 1 (reference Vn, In, PF 1). Returns {phase: (chv, chc)}."""
        if not (vn_v > 0 and in_a > 0):
            raise CalError("gain(): give the reference voltage (V) and current (A)")
        m = self.m
        w = await self._window(seconds)
        for p in self.phases:
            chip, ci, k, s = self._chip(p)
            cur = chip.get_calibration(k)
            vavg = w["v"][p]
            if vavg < 100:
                raise CalError("phase %d: no voltage; connect the reference source"
                               % (p + 1))
            v1 = chip.part == "STPM33" and k == 1   # V2 not bonded: V1's CHV rules
            if not v1:
                chv = _gain_code(cur["chv"], (vn_v / s.v_lsb) / vavg, p, "voltage")
                chip.set_calibration(k, chv=chv)
        w = await self._window(seconds)
        out = {}
        for p in self.phases:
            chip, ci, k, s = self._chip(p)
            cur = chip.get_calibration(k)
            exp = vn_v * in_a * w["t_s"] / 3600.0 * s.cpw
            got = w["s"][p]
            if got <= exp * 0.05:
                raise CalError("phase %d: no current; connect the reference load" % (p + 1))
            chc = _gain_code(cur["chc"], exp / got, p, "current")
            chip.set_calibration(k, chc=chc)
            out[p + 1] = (chip.get_calibration(k)["chv"], chc)
            self._record(p, ci, k, chip)
            m.event("calibration", p + 1, chc)
        return out

    async def phase(self, seconds=10, pf_ref=0.5):
        """Step 2 (reference Vn, In, PF 0.5 lagging). Returns {phase: (phc, phv)}."""
        if pf_ref != 0.5:
            raise CalError("phase(): the procedure uses PF 0.5 lagging (60 deg)")
        m = self.m
        w = await self._window(seconds)
        out = {}
        for p in self.phases:
            chip, ci, k, s = self._chip(p)
            a, sa = w["a"][p], w["s"][p]
            if sa <= 0 or a <= 0:
                raise CalError("phase %d: no active power at PF 0.5; check the load and "
                               "that current flows in the import direction" % (p + 1))
            e = 2.0 * a / sa - 1.0          # cos(60 + d) = 0.5 (1 + e)
            d = -e / _SQRT3
            d = -(e + d * d / 2) / _SQRT3   # one Newton step: d in rad, + = lags more
            d_deg = d * 57.29577951308232
            f_hz = (m.f_mhz[p] or 50000) / 1000.0
            step_deg = 360.0 * f_hz * _PHC_US / 1e6
            cur = chip.get_calibration(k)
            units = cur["phc"] - _PHV_STEPS * cur["phv"] - PHC_SIGN * d_deg / step_deg
            units = int(units + 0.5) if units >= 0 else -int(-units + 0.5)
            phv = 0
            while units + _PHV_STEPS * phv < 0 and phv < 3:
                phv += 1
            phc = units + _PHV_STEPS * phv
            if not 0 <= phc <= 1023:
                raise CalError("phase %d: phase error %.2f deg is beyond the compensation "
                               "range (-6.9..+4.6 deg): check the sensor wiring" % (p + 1, d_deg))
            chip.set_calibration(k, phc=phc, phv=phv)
            out[p + 1] = (phc, phv)
            self._record(p, ci, k, chip)
            m.event("calibration", p + 1, phc - _PHV_STEPS * phv)
        return out

    def _record(self, p, ci, k, chip):
        c = chip.get_calibration(k)
        c.update(chip.get_offsets(k))
        self.results.setdefault(str(ci), [{}, {}])[k] = c
        m = self.m
        try:
            m.persist.fp[ci] = fingerprint(chip)   # the chip's config changed on purpose
        except Exception:
            pass

    def save(self):
        """Persist the calibration (merged with what is saved) and checkpoint the meter so
        that the new configuration fingerprint is the one boot() expects."""
        fs = getattr(self.m.hw, "fs", None)
        if not fs:
            raise CalError("no filesystem (hw.fs): calibration would be lost at reset")
        allc = _load(fs)
        for ci, chs in self.results.items():
            old = allc.get(ci, [{}, {}])
            allc[ci] = [chs[k] or (old[k] if k < len(old) else {}) for k in range(2)]
        try:
            Store(fs, "cal").save(json.dumps(allc).encode())
        except StoreError as e:
            raise CalError("saving calibration failed: %s" % e)
        self.m.checkpoint()
        return allc


def _code(v, p, what):
    code = int(v + 0.5) if v >= 0 else -int(-v + 0.5)
    if not -512 <= code <= 511:
        raise CalError("phase %d: %s power offset beyond the chip's range (+-512 x 4 LSB): "
                       "check the wiring and that no load is connected" % (p + 1, what))
    return code


def _gain_code(cur, ratio, p, what):
    # cal = CAL_BASE + CH / CAL_DIV; the reading scales with cal, so the code that makes
    # it `ratio` times larger is (CAL_BASE * CAL_DIV + CH) * ratio - CAL_BASE * CAL_DIV
    base = CAL_BASE * CAL_DIV                   # 12288
    new = (base + cur) * ratio - base
    code = int(new + 0.5)
    if not 0 <= code <= 4095:
        raise CalError("phase %d: %s gain off by %.1f %%, beyond the chip's range "
                       "(-14..+14 %%): check the divider / sensor values in the board file"
                       % (p + 1, what, (ratio - 1) * 100))
    return code
