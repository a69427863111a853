# Load model -> STPM3x register values, for the simulated chip in sim/stpm3x.py.
# Host only (CPython and the MicroPython unix port); allocates freely: it runs in
# advance_to(), never on the frame path.
#
# Per channel: V rms, I rms, phase angle, frequency and optional harmonics go through
# the channel's divider, sensor, PGA and the chip's *configured* calibration
# (CHV/CHC gain, PHC/PHV phase) into the register fields, using the reference's
# formulas. Hidden sensor errors (gain_err_v, gain_err_i, phase_err_deg) make
# calibration testable. Energies integrate exactly: a piecewise-constant load gives
# exact integer accumulators, and the only quantisation is the final floor.
import math

from sim import loads
from sim.regmap import M

# --- chip constants (reference) -----------------------------------------------------
VREF = 1.18
AV = 2
KINT = 0.8155773          # Rogowski integrator gain
CAL_MID = 0.875           # cal at CHx = 0x800
DCLK = 7812.5
PERIOD_MIN = 1536         # valid DSP_REG1 period range (8 us LSB)
PERIOD_MAX = 3840
# counts of an energy row = sum(P_reg * dt_us) / 262144: P_reg/2048 per 128 us.
E_US_PER_COUNT = 262144

# --- choices on unconfirmed points (one place; see docs/simulator.md) --------------
# Reactive sign: +1 = an inductive load (current lagging) gives positive reactive
# power and energy registers.
REACTIVE_SIGN = 1
# Power rows hold the 29-bit two's-complement field only; bits 31:29 read 0.
POWER_SIGN_EXTEND = False
# STPM33: the V2 pins are not bonded. Channel 2 powers/energies use V1 (same
# voltage chain and calibration as channel 1); the V2 RMS field and V2 samples read 0.
# Apparent energy (REGx4) integrates the apparent RMS power (Vrms * Irms).
# Totals (TOT_REG1..4) are the algebraic sum of both channels (one accumulator, one
# floor). STPM32 has no totals: the rows stay 0.
# The energy accumulator works with 16 fraction bits below the power register LSB
# (the chip integrates its internal power, finer than the 29-bit row).
E_FRAC_BITS = 16
# Sag/swell duration fields (SAGx_TIME, SWVx_TIME, SWCx_TIME) count in this unit.
SAG_SWELL_TIME_UNIT_US = 8000
# Rogowski sensitivity ks is given at this frequency (the coil output grows with f).
ROGOWSKI_F_REF = 50.0
# ADC input range: peak volts after the gain stage (Av or PGA). 0.6 V reproduces the
# reference's worked full scales (~366 Vrms with 810k/470, ~11 A with a 2.4 mV/A CT at
# x16). Beyond it the signal is clipped; the sim clamps the amplitude (a clipped sine's
# exact RMS is not modelled).
ADC_PEAK_V = 0.6
# Tamper tolerance by DSP_CR3[18:17].
TAMPER_TOL = (0.125, 0.0833, 0.0625, 0.03125)

_SQRT2 = math.sqrt(2.0)
_FX = 1 << E_FRAC_BITS
_E_DIV = E_US_PER_COUNT << E_FRAC_BITS

# status bits (DSP_SR1/2) and event bits (DSP_EV1/2): names from the register map
_SR_PH_SIGN = (M.SR_PH1_SIGN_SHIFT, M.SR_PH2_SIGN_SHIFT)
_SR_PH_OVF = (M.SR_PH1_OVF_SHIFT, M.SR_PH2_OVF_SHIFT)
_SR_TOT_SIGN = (M.SR_TOT_ACTIVE_SIGN, M.SR_TOT_REACTIVE_SIGN)


def _round(x):
    return int(math.floor(x + 0.5))


def _u32(x):
    return x & 0xFFFFFFFF


def _p29(x):
    # power rows: 29-bit two's complement (M.POWER_SIGN is bit 28), saturated
    if x > M.POWER_SIGN - 1:
        x = M.POWER_SIGN - 1
    elif x < -M.POWER_SIGN:
        x = -M.POWER_SIGN
    if POWER_SIGN_EXTEND:
        return x & 0xFFFFFFFF
    return x & M.POWER_MASK


def _s24(x):
    # sample rows: signed 24-bit (M.SAMPLE_SIGN is bit 23), sign-padded to 32, saturated
    if x > M.SAMPLE_SIGN - 1:
        x = M.SAMPLE_SIGN - 1
    elif x < -M.SAMPLE_SIGN:
        x = -M.SAMPLE_SIGN
    return x & 0xFFFFFFFF


class Channel:
    """One measuring channel: its board wiring and its hidden imperfections."""

    def __init__(self, cfg=None):
        self.phase = None
        self.r1 = 810000
        self.r2 = 470
        self.sensor = "ct"
        self.ks = 0.0024
        self.gain = 16          # the board's intended PGA gain (for full scale)
        # hidden sensor errors: relative gain, phase (deg, + = current lags more)
        self.gain_err_v = 0.0
        self.gain_err_i = 0.0
        self.phase_err_deg = 0.0
        self.harmonics = ()     # ((n, v_frac, i_frac, phi_deg), ...)
        # a real front end (front_end()): crosstalk from the voltage into the current
        # channel (a power offset in W / var, present whenever the voltage is), noise
        # (per physics step: active / reactive power, W; current RMS, A) and a current
        # sensor whose ratio and phase errors grow at low current: + nl_gain and
        # + nl_phase_deg times nl_i0_a / (I + nl_i0_a)
        self.p_offset_w = 0.0
        self.q_offset_var = 0.0
        self.noise_w = 0.0
        self.noise_a = 0.0
        self.nl_gain = 0.0
        self.nl_phase_deg = 0.0
        self.nl_i0_a = 0.1
        self.noise_seed = 0
        # fault knobs
        self.stuck_v = False
        self.stuck_i = False
        self.period_err = False
        self.acc = [0, 0, 0, 0]     # REG1..4 accumulators, units P_fx * us
        self.reset_measure()
        self.reset_exact()
        if cfg:
            self.configure(cfg)

    def configure(self, cfg):
        for k in ("phase", "r1", "r2", "sensor", "ks", "gain"):
            if k in cfg:
                setattr(self, k, cfg[k])
        if self.sensor not in ("shunt", "ct", "rogowski"):
            raise ValueError("sensor must be shunt, ct or rogowski, not %r" % (self.sensor,))

    def reset_measure(self):
        # in place: called from SYN / EN edges, which must not allocate
        acc = self.acc
        for k in range(4):
            acc[k] = 0
        self.period = 2500
        self.sag_us = 0             # how long the condition has held
        self.swell_us = 0
        self.cswell_us = 0
        self.sag_on = False
        self.swell_on = False
        self.cswell_on = False

    def reset_exact(self):
        self.exact = {"ai": 0.0, "ae": 0.0, "rq1": 0.0, "rq2": 0.0, "rq3": 0.0,
                      "rq4": 0.0, "ap": 0.0}

    def kdiv(self):
        return 1.0 + self.r1 / self.r2

    def kint(self):
        return KINT if self.sensor == "rogowski" else 1.0

    def lsb(self, calv=CAL_MID, cali=CAL_MID, gain=None):
        """Nominal LSB sizes (reference formulas): dict(v, i, p, e_wh, v_sample,
        i_sample) in V, A, W, Wh."""
        ai = gain or self.gain
        kd = self.kdiv()
        ki = self.kint()
        v = VREF * kd / (calv * AV * 32768)
        i = VREF / (cali * ai * 131072 * self.ks * ki)
        p = VREF * VREF * kd / (ki * AV * ai * self.ks * calv * cali * 268435456)
        return {"v": v, "i": i, "p": p, "e_wh": p * E_US_PER_COUNT / 1e6 / 3600.0,
                "v_sample": v / 256, "i_sample": i / 64}

    def v_full(self):
        """Largest V rms the voltage ADC takes without clipping."""
        return ADC_PEAK_V / (_SQRT2 * AV) * self.kdiv()

    def i_full(self, gain=None):
        """Largest I rms the current ADC takes without clipping (at `gain`, default
        the board's PGA gain)."""
        return ADC_PEAK_V / (_SQRT2 * (gain or self.gain) * self.ks * self.kint())


class Physics:
    """Physics of one chip: channel models, energy accumulators, status, events."""

    def __init__(self, chip, seed=0, mains_hz=50):
        self.chip = chip
        self.seed = seed
        self.mains_hz = mains_hz
        self.ch = [Channel(), Channel()]
        if chip.n_ch == 1:
            self.ch[1].phase = None
        self.tot_acc = [0, 0, 0, 0]
        self.t_us = 0
        self.events = []            # (t_us, kind, channel index, value)
        self.max_step_us = None     # optional cap on one physics step

    def set_channel(self, j, cfg):
        self.ch[j].configure(cfg)

    def randomise_errors(self, seed=None, gain=0.01, phase_deg=0.5):
        """Give each channel hidden sensor errors, uniform in +-gain / +-phase_deg."""
        s = self.seed if seed is None else seed
        for j, c in enumerate(self.ch):
            c.gain_err_v = gain * (2 * loads.hash01(s, 10 * j + 1) - 1)
            c.gain_err_i = gain * (2 * loads.hash01(s, 10 * j + 2) - 1)
            c.phase_err_deg = phase_deg * (2 * loads.hash01(s, 10 * j + 3) - 1)

    def front_end(self, seed=None, gain=0.03, phase_deg=0.9, offset_w=0.4, noise_w=0.005,
                  noise_a=0.001, nl_gain=0.001, nl_phase_deg=0.03, nl_i0_a=0.1):
        """Hidden errors of a real front end on each channel, seeded: gain and phase as
        randomise_errors(), a power offset (crosstalk) of up to +-offset_w W (and var),
        noise, and a low-current non-linearity of up to +-nl_gain / +-nl_phase_deg."""
        s = self.seed if seed is None else seed
        self.randomise_errors(s, gain, phase_deg)
        for j, c in enumerate(self.ch):
            c.p_offset_w = offset_w * (2 * loads.hash01(s, 10 * j + 4) - 1)
            c.q_offset_var = offset_w * (2 * loads.hash01(s, 10 * j + 5) - 1)
            c.noise_w = noise_w
            c.noise_a = noise_a
            c.nl_gain = nl_gain * (2 * loads.hash01(s, 10 * j + 6) - 1)
            c.nl_phase_deg = nl_phase_deg * (2 * loads.hash01(s, 10 * j + 7) - 1)
            c.nl_i0_a = nl_i0_a
            c.noise_seed = (s * 977 + j * 131 + 17) & 0x7FFFFFFF

    def reset_measure(self):
        for c in self.ch:
            c.reset_measure()
        acc = self.tot_acc
        for k in range(4):
            acc[k] = 0

    def exact_energy_wh(self, j=0):
        """True physical energy of channel j (no sensor error): ai, ae (Wh), rq1..rq4
        (varh per quadrant), ap (VAh)."""
        return dict(self.ch[j].exact)

    # --- time ---------------------------------------------------------------------------
    def _conds(self, load, t_rel_us):
        """Per channel (v, i, phi, f, harmonics) at t_rel_us, and the next change."""
        nxt = None
        per = None
        if load is not None:
            per = load.at_us(t_rel_us)
            nxt = load.next_change_us(t_rel_us)
        out = []
        for c in self.ch:
            if per is not None and c.phase is not None and 0 < c.phase <= len(per):
                out.append(per[c.phase - 1])
            else:
                out.append((0.0, 0.0, 0.0, float(self.mains_hz)))
        return out, nxt

    def advance_to(self, now_us, load=None, t0_us=0):
        """Integrate from the last instant to now_us (absolute us)."""
        t = self.t_us
        if now_us <= t:
            return
        conds = None
        while t < now_us:
            conds, nxt = self._conds(load, t - t0_us)
            t_end = now_us
            if nxt is not None and nxt + t0_us < t_end:
                t_end = nxt + t0_us
            if self.max_step_us and t_end - t > self.max_step_us:
                t_end = t + self.max_step_us
            if t_end <= t:          # a profile that does not move forward
                t_end = now_us
            self._step(t, t_end - t, conds)
            t = t_end
        self.t_us = now_us
        if self.chip.powered and self.chip.regs[M.DSP_CR3] & M.CR3_AUTO_LATCH:
            self.chip.latch()       # auto-latch (every 128 us: at least now)

    # --- one piecewise-constant step -----------------------------------------------------
    def _step(self, t_us, dt_us, conds):
        chip = self.chip
        for j, c in enumerate(self.ch):
            self._exact(c, j, conds, dt_us)
        if not chip.powered:
            return
        regs = chip.regs
        live = chip.live
        part = chip.part
        cr3 = regs[M.DSP_CR3]
        cr4 = regs[M.DSP_CR4]
        res = []
        for j in range(2):
            res.append(self._measure(j, conds, regs, cr4, t_us))
        sr = [0, 0]
        ev = [0, 0]
        # powers, energies, signs
        for j in range(2):
            m = res[j]
            c = self.ch[j]
            base = M.PH1_REG1 + M.PH_STRIDE * j
            sign_bit = _SR_PH_SIGN[j]
            ovf_bit = _SR_PH_OVF[j]
            fx = (m["p_fx"], m["f_fx"], m["q_fx"], m["s_fx"])
            for k in range(4):
                old = c.acc[k] // _E_DIV
                c.acc[k] += fx[k] * dt_us
                new = c.acc[k] // _E_DIV
                live[base + k] = _u32(new)
                if (old >> 31) != (new >> 31):
                    sr[0] |= 1 << (ovf_bit + k)
                    ev[j] |= 1 << (M.EV_OVF_SHIFT + k)
                if fx[k] < 0:
                    sr[0] |= 1 << (sign_bit + k)
                    ev[j] |= 1 << (M.EV_SIGN_SHIFT + k)
            live[base + M.PH_ACTIVE_P] = _p29(_round(m["p_fx"] / _FX))
            live[base + M.PH_FUND_P] = _p29(_round(m["f_fx"] / _FX))
            live[base + M.PH_REACTIVE_P] = _p29(_round(m["q_fx"] / _FX))
            live[base + M.PH_APPARENT_P] = _p29(_round(m["s_fx"] / _FX))
            live[base + M.PH_APPARENT_VP] = _p29(_round(m["sv_fx"] / _FX))
            live[base + M.PH_MOM_ACTIVE_P] = _p29(_round(m["p_fx"] / _FX))
            live[base + M.PH_MOM_FUND_P] = _p29(_round(m["f_fx"] / _FX))
            live[base + M.PH_AH_ACC] = 0
        # totals
        if part != "STPM32":
            tfx = [res[0]["p_fx"] + res[1]["p_fx"], res[0]["f_fx"] + res[1]["f_fx"],
                   res[0]["q_fx"] + res[1]["q_fx"], res[0]["s_fx"] + res[1]["s_fx"]]
            for k in range(4):
                old = self.tot_acc[k] // _E_DIV
                self.tot_acc[k] += tfx[k] * dt_us
                new = self.tot_acc[k] // _E_DIV
                live[M.TOT_REG1 + k] = _u32(new)
                if k < 2:          # total active / reactive sign (1 = negative)
                    if tfx[k * 2] < 0:
                        sr[0] |= _SR_TOT_SIGN[k]
                        ev[0] |= 1 << (M.EV_TOT_SHIFT + k)
                        ev[1] |= 1 << (M.EV_TOT_SHIFT + k)
                if k in (0, 2) and (old >> 31) != (new >> 31):
                    bit = M.SR_TOT_ACTIVE_OVF if k == 0 else M.SR_TOT_REACTIVE_OVF
                    sr[0] |= bit
                    ev[0] |= bit
                    ev[1] |= bit
        sr[1] = sr[0]
        # per channel: rms, period, phase, samples, stuck, sag/swell
        period = [c.period for c in self.ch]
        for j in range(2):
            m = res[j]
            c = self.ch[j]
            if m["v_stuck"]:
                sr[j] |= M.SR_V_STUCK
                ev[j] |= M.EV_V_STUCK
            if m["i_stuck"]:
                sr[j] |= M.SR_C_STUCK
                ev[j] |= M.EV_C_STUCK
            if m["v_field"]:
                ev[j] |= M.EV_V_ZCR
            if m["i_field"]:
                ev[j] |= M.EV_C_ZCR
            f = m["f"]
            p = _round(125000.0 / f) if f > 0 else 0
            if c.period_err or p < PERIOD_MIN or p > PERIOD_MAX:
                sr[j] |= M.SR_PER_ERR
                ev[j] |= M.EV_PER_ERR
            else:
                c.period = p
            period[j] = c.period
            live[M.DSP_REG14 + j] = m["v_field"] | (m["i_field"] << M.RMS_I_SHIFT)
            self._sag_swell(j, c, m, cr3, regs, t_us, dt_us, sr, ev)
            cpha = 0
            if m["v_field"] and m["i_field"] and f > 0:
                cpha = _round((m["phi_m"] % 360.0) / 360.0 * M.PERIOD_HZ_NUM / f) & M.PHA_MASK
            r = M.DSP_REG17 + M.CH_STRIDE_REG * j
            live[r] = (live[r] & M.SWELL_TIME_MASK) | (cpha << M.PHA_SHIFT)
            # instantaneous samples at the end of the step
            t_end_s = (t_us + dt_us) / 1e6
            # phases of a 3-phase supply sit 120 deg apart on the sample rows
            vph = self.ch[0 if (j == 1 and part == "STPM33") else j].phase or 1
            wt = 2 * math.pi * ((f * t_end_s - (vph - 1) / 3.0) % 1.0)
            vs, is_ = m["vs"], m["is"]
            v1 = _SQRT2 * m["V"] * math.sin(wt)
            i1 = _SQRT2 * m["I"] * math.sin(wt - math.radians(m["phi_m"]))
            vt, it = v1, i1
            for h in m["harm"]:
                n, vh, ih, ph = h
                vt += _SQRT2 * vh * math.sin(n * wt)
                it += _SQRT2 * ih * math.sin(n * wt - math.radians(ph))
            if m["v_field"] or j == 0 or part != "STPM33":
                live[M.DSP_REG2 + 2 * j] = _s24(_round(vt * vs * 256))
                live[M.DSP_REG6 + 2 * j] = _s24(_round(v1 * vs * 256))
            live[M.DSP_REG2 + 1 + 2 * j] = _s24(_round(it * is_ * 64))
            live[M.DSP_REG6 + 1 + 2 * j] = _s24(_round(i1 * is_ * 64))
        if part == "STPM33":
            period[1] = period[0]
            live[M.DSP_REG2 + 2] = 0         # V2 sample and fundamental: not bonded
            live[M.DSP_REG6 + 2] = 0
        live[M.DSP_REG1] = ((period[0] & M.PERIOD_MASK)
                            | ((period[1] & M.PERIOD_MASK) << M.PERIOD_CH2_SHIFT))
        # tamper
        if part != "STPM32" and cr3 & M.CR3_TMP_EN:
            tol = TAMPER_TOL[(cr3 >> M.CR3_TMP_TOL_SHIFT) & M.CR3_TMP_TOL_MASK]
            p1 = res[0]["p_fx"]
            p2 = res[1]["p_fx"]
            if abs(p1 - p2) > tol * abs(p1 + p2):
                sr[0] |= M.SR_TAMPER
                sr[1] |= M.SR_TAMPER
                sr[0 if abs(p1) >= abs(p2) else 1] |= M.SR_TAMPER_HIGH
        live[M.DSP_EV1] = ev[0]
        live[M.DSP_EV2] = ev[1]
        chip.pend_sr[0] |= sr[0]
        chip.pend_sr[1] |= sr[1]

    def _measure(self, j, conds, regs, cr4, t_us=0):
        """What channel j's chain measures: register-scale quantities."""
        chip = self.chip
        c = self.ch[j]
        if j == 1 and chip.n_ch == 1:
            cond = (0.0, 0.0, 0.0, float(self.mains_hz))
        else:
            cond = conds[j]
        v, i, phi, f = cond[0], cond[1], cond[2], cond[3]
        vj = j
        if j == 1 and chip.part == "STPM33":
            vj = 0                       # V2 not bonded: PH2 uses V1
            v, f = conds[0][0], conds[0][3]
        cv = self.ch[vj]
        cr_v = regs[M.DSP_CR5 + M.CH_STRIDE_CR * vj]
        cr_i = regs[M.DSP_CR6 + M.CH_STRIDE_CR * j]
        dfe_v = regs[M.DFE_CR1 + vj]
        dfe_i = regs[M.DFE_CR1 + j]
        calv = 0.75 + (cr_v & M.CHX_MASK) / 16384.0
        cali = 0.75 + (cr_i & M.CHX_MASK) / 16384.0
        ai = 2 << ((dfe_i >> M.DFE_GAIN_SHIFT) & M.DFE_GAIN_MASK)
        roc = 1 if regs[M.DSP_CR1 + j] & M.CR1_ROC else 0
        # sensor transfer relative to ks: gain and phase shift (+ = current lags more)
        if c.sensor == "rogowski":
            g, sph = (KINT, 0.0) if roc else ((f / ROGOWSKI_F_REF if f > 0 else 0.0), -90.0)
        else:
            g, sph = (KINT * ROGOWSKI_F_REF / f if f > 0 else 0.0, 90.0) if roc else (1.0, 0.0)
        if j == 0:
            phc = (cr4 >> M.CR4_PHC1_SHIFT) & M.PHC_MASK
            phv = (cr4 >> M.CR4_PHV1_SHIFT) & M.PHV_MASK
        else:
            phc = (cr4 >> M.CR4_PHC2_SHIFT) & M.PHC_MASK
            phv = (cr4 >> M.CR4_PHV2_SHIFT) & M.PHV_MASK
        comp_deg = 360.0 * f * (phc - 512 * phv) / 4e6
        v_stuck = cv.stuck_v
        i_stuck = c.stuck_i
        v_on = (dfe_v & M.DFE_ENV) and not v_stuck
        i_on = (dfe_i & M.DFE_ENC) and not i_stuck
        V = v * (1 + cv.gain_err_v) if v_on else 0.0
        nl = c.nl_i0_a / (i + c.nl_i0_a) if (c.nl_gain or c.nl_phase_deg) else 0.0
        I = i * (1 + c.gain_err_i + c.nl_gain * nl) if i_on else 0.0
        v_lim = ADC_PEAK_V / (_SQRT2 * AV) * cv.kdiv()
        i_lim = ADC_PEAK_V / (_SQRT2 * ai * c.ks * g) if g > 0 else 0.0
        if V > v_lim:
            V = v_lim              # clipped
        if I > i_lim:
            I = i_lim
        phi_m = phi + c.phase_err_deg + c.nl_phase_deg * nl + sph + comp_deg
        vs = calv * AV * 32768 / (VREF * cv.kdiv())
        is_ = cali * ai * 131072 * c.ks * g / VREF
        ps = vs * is_ / 16.0
        harm = []
        v2 = 1.0
        i2 = 1.0
        p = V * I * math.cos(math.radians(phi_m))
        for h in c.harmonics:
            n, vf, if_, ph = h
            php = ph + c.phase_err_deg + n * comp_deg
            harm.append((n, V * vf, I * if_, php))
            v2 += vf * vf
            i2 += if_ * if_
            p += V * vf * I * if_ * math.cos(math.radians(php))
        vrms = V * math.sqrt(v2)
        irms = I * math.sqrt(i2)
        p1 = V * I * math.cos(math.radians(phi_m))
        q1 = V * I * math.sin(math.radians(phi_m))
        q = q1
        if V and i_on:
            # crosstalk (with the voltage) and noise of this step
            k = t_us // 100000
            na = c.noise_w * (2 * loads.hash01(c.noise_seed, 2 * k) - 1)
            nq = c.noise_w * (2 * loads.hash01(c.noise_seed, 2 * k + 1) - 1)
            p += c.p_offset_w + na
            p1 += c.p_offset_w + na
            q += c.q_offset_var + nq
            if c.noise_a:
                irms = math.sqrt(irms * irms + c.noise_a * c.noise_a)
        # power offset registers (DSP_CR9..12), in units of OFFSET_LSB_P power-row LSB;
        # the sign encoding is the register map's decision (offset_value)
        ra = regs[M.DSP_CR9 + M.CH_STRIDE_CR * j]
        rr = regs[M.DSP_CR10 + M.CH_STRIDE_CR * j]
        o_lsb = M.OFFSET_LSB_P * _FX
        ofa = M.offset_value(ra >> M.OFA_SHIFT) * o_lsb
        ofaf = M.offset_value(ra >> M.OFAF_SHIFT) * o_lsb
        ofr = M.offset_value(rr >> M.OFR_SHIFT) * o_lsb
        ofs = M.offset_value(rr >> M.OFS_SHIFT) * o_lsb
        v_field = min(_round(vrms * vs), M.RMS_V_MASK)
        if j == 1 and chip.part == "STPM33":
            v_field = 0
        return {
            "V": V, "I": I, "f": f, "phi_m": phi_m, "vs": vs, "is": is_, "harm": harm,
            "v_field": v_field, "i_field": min(_round(irms * is_), M.RMS_I_MASK),
            "p_fx": _round(p * ps * _FX) + ofa, "f_fx": _round(p1 * ps * _FX) + ofaf,
            "q_fx": _round(REACTIVE_SIGN * q * ps * _FX) + ofr,
            "s_fx": _round(vrms * irms * ps * _FX) + ofs, "sv_fx": _round(V * I * ps * _FX),
            "v_stuck": v_stuck, "i_stuck": i_stuck,
            "v_code": vrms * _SQRT2 * AV * calv / cv.kdiv() * 1024 / VREF,
            "i_code": irms * _SQRT2 * ai * c.ks * g * cali * 1024 / VREF,
            "sag_thr": (cr_v >> M.SAG_THR_SHIFT) & M.THR_MASK,
            "swv_thr": (cr_v >> M.SWV_THR_SHIFT) & M.THR_MASK,
            "swc_thr": (cr_i >> M.SWC_THR_SHIFT) & M.THR_MASK,
        }

    def _sag_swell(self, j, c, m, cr3, regs, t_us, dt_us, sr, ev):
        live = self.chip.live
        min_us = (cr3 & M.CR3_SAG_TIME_THR) * 8
        sag = m["sag_thr"] > 0 and m["v_code"] < m["sag_thr"]
        swell = m["v_code"] > m["swv_thr"]
        cswell = m["i_code"] > m["swc_thr"]
        if self.chip.part == "STPM33" and j == 1:
            sag = swell = False
        for name, cond, start_bit, end_bit, hist in (
                ("sag", sag, M.SR_SAG_START, M.SR_SAG_END, M.EV_SAG_SHIFT),
                ("swell", swell, M.SR_SWELL_START, M.SR_SWELL_END, M.EV_V_SWELL_SHIFT),
                ("cswell", cswell, M.SR_C_SWELL_START, M.SR_C_SWELL_END,
                 M.EV_C_SWELL_SHIFT)):
            held = getattr(c, name + "_us")
            on = getattr(c, name + "_on")
            if cond:
                before = held
                held += dt_us
                if not on and held >= min_us:
                    on = True
                    sr[j] |= start_bit
                    self.events.append((t_us + max(0, min_us - before), name + "_start", j,
                                        m["v_code"] if name != "cswell" else m["i_code"]))
                if on:
                    ev[j] |= 1 << hist
            else:
                if on:
                    sr[j] |= end_bit
                    self.events.append((t_us, name + "_end", j, held))
                    on = False
                held = 0
            setattr(c, name + "_us", held)
            setattr(c, name + "_on", on)
            if on:
                units = min(held // SAG_SWELL_TIME_UNIT_US, M.SWELL_TIME_MASK)
                r16 = M.DSP_REG16 + M.CH_STRIDE_REG * j
                r17 = M.DSP_REG17 + M.CH_STRIDE_REG * j
                keep = 0xFFFFFFFF & ~M.SWELL_TIME_MASK
                if name == "sag":
                    live[r16] = (live[r16] & M.SWELL_TIME_MASK) | (units << M.SAG_TIME_SHIFT)
                elif name == "swell":
                    live[r16] = (live[r16] & keep) | units
                else:
                    live[r17] = (live[r17] & keep) | units

    def _exact(self, c, j, conds, dt_us):
        """Integrate the true physical energy of channel j (no sensor errors)."""
        chip = self.chip
        if c.phase is None or (j == 1 and chip.n_ch == 1):
            return
        v, i, phi = conds[j][0], conds[j][1], conds[j][2]
        if j == 1 and chip.part == "STPM33":
            v = conds[0][0]
        p = v * i * math.cos(math.radians(phi))
        q = v * i * math.sin(math.radians(phi))
        v2 = 1.0
        i2 = 1.0
        for h in c.harmonics:
            n, vf, if_, ph = h
            p += v * vf * i * if_ * math.cos(math.radians(ph))
            v2 += vf * vf
            i2 += if_ * if_
        s = v * math.sqrt(v2) * i * math.sqrt(i2)
        h = dt_us / 3.6e9
        e = c.exact
        if p >= 0:
            e["ai"] += p * h
        else:
            e["ae"] -= p * h
        aq = abs(q) * h
        if p >= 0:
            e["rq1" if q >= 0 else "rq4"] += aq
        else:
            e["rq2" if q >= 0 else "rq3"] += aq
        e["ap"] += s * h
