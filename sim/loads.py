# Deterministic, seeded load profiles for the simulated meter (CPython and the
# MicroPython unix port give the same numbers: no `random`, a stateless integer hash).
#
# A profile is piecewise constant over steps so that energy integrates exactly:
#   profile.at(t_s)  -> per phase (v_rms, i_rms, phi_deg, f_hz)   (tuple, phase 1 first)
#   profile.next_change(t_s) -> next instant (s) where values change, or None
# and the integer-exact variants at_us(t_us) / next_change_us(t_us) the simulator uses.
# phi_deg is the angle by which the current lags the voltage: P = V I cos(phi),
# Q = V I sin(phi) (inductive > 0, capacitive < 0, export when |phi| > 90).
import math

from sim.vclock import DEFAULT_EPOCH  # noqa: F401 (profiles start there by default)


def hash01(seed, k):
    """Deterministic pseudo-random float in [0, 1) for (seed, k)."""
    x = (seed * 0x9E3779B1 + k * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    x = (x * 0x297A2D39) & 0xFFFFFFFF
    x ^= x >> 15
    return x / 4294967296.0


def _bump(h, centre, width):
    d = (h - centre) / width
    return math.exp(-d * d)


def phi_from_pf(pf, capacitive=False):
    """Angle for a power factor; negative pf = export (power flows to the grid)."""
    a = math.degrees(math.acos(min(abs(pf), 1.0)))
    if capacitive:
        a = -a
    if pf < 0:
        a = 180.0 - a
    return a


class Profile:
    """Base: constant per step of `step_s` seconds; subclasses implement _values(k)."""
    name = "profile"

    def __init__(self, phases=3, seed=0, mains_hz=50, epoch0=DEFAULT_EPOCH, step_s=60,
                 **kwargs):
        self.phases = phases
        self.seed = seed
        self.mains_hz = float(mains_hz)
        self.epoch0 = epoch0
        self.step_s = step_s
        self._step_us = int(step_s * 1000000) if step_s else 0
        self._cache_k = None
        self._cache = None

    def _k(self, t_us):
        if not self._step_us:
            return 0
        k = t_us // self._step_us
        return k if k > 0 else 0

    def at_us(self, t_us):
        k = self._k(t_us)
        if k != self._cache_k:
            self._cache = self._values(k)
            self._cache_k = k
        return self._cache

    def next_change_us(self, t_us):
        if not self._step_us:
            return None
        return (self._k(t_us) + 1) * self._step_us

    def at(self, t_s):
        return self.at_us(int(t_s * 1000000))

    def next_change(self, t_s):
        n = self.next_change_us(int(t_s * 1000000))
        return None if n is None else n / 1000000

    def hour(self, k):
        """Hour of day (UTC, float) at the start of step k."""
        return ((self.epoch0 + k * self.step_s) % 86400) / 3600.0

    def _r(self, k, ph, what):
        return hash01(self.seed, (k * 8 + ph) * 16 + what)

    def _values(self, k):
        raise NotImplementedError


class Constant(Profile):
    """Same V, I, PF on every phase forever (phi_deg overrides pf)."""
    name = "constant"

    def __init__(self, v_rms=230.0, i_rms=5.0, pf=1.0, phi_deg=None, f_hz=None,
                 capacitive=False, **kwargs):
        kwargs["step_s"] = 0
        Profile.__init__(self, **kwargs)
        phi = phi_from_pf(pf, capacitive) if phi_deg is None else float(phi_deg)
        f = self.mains_hz if f_hz is None else float(f_hz)
        self._row = (float(v_rms), float(i_rms), phi, f)

    def _values(self, k):
        return tuple(self._row for _ in range(self.phases))


class Fullscale(Constant):
    """Near full scale (the board passes its channel's full-scale V and I)."""
    name = "fullscale"

    def __init__(self, v_rms=300.0, i_rms=10.0, **kwargs):
        Constant.__init__(self, v_rms=v_rms, i_rms=i_rms, pf=1.0, **kwargs)


class Household(Profile):
    """A home: base load, morning and evening peaks, appliance spikes, PF 0.85..1."""
    name = "household"

    def __init__(self, scale=1.0, v_rms=230.0, **kwargs):
        Profile.__init__(self, **kwargs)
        self.scale = scale
        self.v_nom = v_rms

    def _load_w(self, k, ph):
        h = self.hour(k)
        w = 120 + 450 * _bump(h, 7.5, 1.0) + 250 * _bump(h, 12.5, 1.5) + 900 * _bump(h, 19.5, 1.8)
        w *= 0.6 + 0.8 * self._r(k, ph, 0)
        if self._r(k, ph, 1) < 0.03:
            w += 2000                     # kettle, oven
        return w * self.scale

    def _row(self, k, ph, w):
        v = self.v_nom + 6 * (self._r(k, ph, 2) - 0.5)
        f = self.mains_hz + 0.04 * (self._r(9999, 0, 3) - 0.5) + 0.02 * (self._r(k, 0, 3) - 0.5)
        if w >= 0:
            pf = 0.85 + 0.14 * self._r(k, ph, 4)
            phi = phi_from_pf(pf)
        else:
            pf = 0.98
            phi = phi_from_pf(-pf)
        return (v, abs(w) / (v * pf), phi, f)

    def _values(self, k):
        return tuple(self._row(k, ph, self._load_w(k, ph)) for ph in range(self.phases))


class PV(Household):
    """A home with solar panels: export (negative power) around midday."""
    name = "pv"

    def __init__(self, peak_w=3000.0, **kwargs):
        Household.__init__(self, **kwargs)
        self.peak_w = peak_w

    def _values(self, k):
        h = self.hour(k)
        sun = math.sin(math.pi * (h - 6) / 12) if 6 < h < 18 else 0.0
        out = []
        for ph in range(self.phases):
            cloud = 0.5 + 0.5 * self._r(k, ph, 5)
            pv = self.peak_w / self.phases * sun * cloud
            out.append(self._row(k, ph, self._load_w(k, ph) - pv))
        return tuple(out)


class Motor(Profile):
    """An inductive motor cycling on and off: inrush at low PF, running at PF ~0.75,
    balanced phases."""
    name = "motor"

    def __init__(self, p_w=1500.0, v_rms=230.0, on_steps=8, off_steps=4, step_s=10,
                 **kwargs):
        Profile.__init__(self, step_s=step_s, **kwargs)
        self.p_w = p_w
        self.v_nom = v_rms
        self.on_steps = on_steps
        self.off_steps = off_steps

    def _values(self, k):
        pos = k % (self.on_steps + self.off_steps)
        out = []
        for ph in range(self.phases):
            v = self.v_nom + 4 * (self._r(k, ph, 2) - 0.5)
            f = self.mains_hz + 0.02 * (self._r(k, 0, 3) - 0.5)
            if pos >= self.on_steps:
                i, pf = 0.0, 1.0
            elif pos == 0:
                pf = 0.3
                i = 6 * self.p_w / self.phases / (v * 0.75)
            else:
                pf = 0.72 + 0.06 * self._r(k, ph, 4)
                i = self.p_w / self.phases / (v * pf)
            out.append((v, i, phi_from_pf(pf), f))
        return tuple(out)


class IEC(Profile):
    """IEC 62053-22 accuracy test points, one per step, cycling: currents 0.01 In ..
    Imax at PF 1, then 0.02 In .. Imax at 0.5 inductive and at 0.8 capacitive.
    `points` lists (i_a, phi_deg, limit_pct)."""
    name = "iec"
    FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

    def __init__(self, in_a=5.0, imax_a=None, v_rms=230.0, step_s=10, **kwargs):
        Profile.__init__(self, step_s=step_s, **kwargs)
        self.v_nom = v_rms
        imax = imax_a if imax_a else 2 * in_a
        pts = []
        for phi, low, hi, start in ((0.0, 0.4, 0.2, 0.01),
                                    (60.0, 0.5, 0.3, 0.02),
                                    (-math.degrees(math.acos(0.8)), 0.5, 0.3, 0.02)):
            cur = [fr * in_a for fr in self.FRACTIONS if fr >= start] + [imax]
            for i in cur:
                if phi == 0.0:
                    lim = low if i < 0.05 * in_a else hi
                else:
                    lim = low if i < 0.1 * in_a else hi
                pts.append((i, phi, lim))
        self.points = pts

    def _values(self, k):
        i, phi, _ = self.points[k % len(self.points)]
        return tuple((self.v_nom, i, phi, self.mains_hz) for _ in range(self.phases))


class Steps(Profile):
    """Explicit steps: rows of (duration_s, v_rms, i_rms, phi_deg, f_hz), the same on
    every phase; the last row holds forever. For sags, swells, frequency steps."""
    name = "steps"

    def __init__(self, rows=((1, 230.0, 5.0, 0.0, 50.0),), **kwargs):
        kwargs["step_s"] = 0
        Profile.__init__(self, **kwargs)
        self.rows = tuple(tuple(r) for r in rows)
        ends = []
        t = 0
        for r in self.rows:
            t += int(r[0] * 1000000)
            ends.append(t)
        self._ends = ends

    def _index(self, t_us):
        for k, end in enumerate(self._ends):
            if t_us < end:
                return k
        return len(self.rows) - 1

    def at_us(self, t_us):
        r = self.rows[self._index(t_us)]
        row = (float(r[1]), float(r[2]), float(r[3]), float(r[4]))
        return tuple(row for _ in range(self.phases))

    def next_change_us(self, t_us):
        k = self._index(t_us)
        return self._ends[k] if k < len(self.rows) - 1 else None


class Quadrants(Profile):
    """Steps of irregular length (min_s..max_s, microsecond boundaries, so they fall
    between reads) with a random apparent power (s_min_w..s_max_w) and a random angle
    0..360 deg per phase: import and export, inductive and capacitive, every quadrant,
    and sign changes in the middle of reads."""
    name = "quadrants"

    def __init__(self, min_s=3.0, max_s=40.0, s_min_w=100.0, s_max_w=9000.0, v_rms=230.0,
                 **kwargs):
        kwargs["step_s"] = 0
        Profile.__init__(self, **kwargs)
        self.min_us = int(min_s * 1000000)
        self.span_us = int((max_s - min_s) * 1000000)
        self.s_min_w = s_min_w
        self.s_max_w = s_max_w
        self.v_nom = v_rms
        self._ends = [self._dur(0)]          # end of step k (us), grown on demand
        self._last = 0

    def _dur(self, k):
        return self.min_us + int(self.span_us * hash01(self.seed + 7919, k))

    def _step(self, t_us):
        ends = self._ends
        k = self._last if (self._last < len(ends) and
                           (self._last == 0 or ends[self._last - 1] <= t_us)) else 0
        while True:
            while k >= len(ends):
                ends.append(ends[-1] + self._dur(len(ends)))
            if t_us < ends[k]:
                self._last = k
                return k
            k += 1

    def at_us(self, t_us):
        k = self._step(t_us if t_us > 0 else 0)
        if k != self._cache_k:
            self._cache = self._values(k)
            self._cache_k = k
        return self._cache

    def next_change_us(self, t_us):
        return self._ends[self._step(t_us if t_us > 0 else 0)]

    def _values(self, k):
        out = []
        for ph in range(self.phases):
            s = self.s_min_w + (self.s_max_w - self.s_min_w) * self._r(k, ph, 0)
            phi = 360.0 * self._r(k, ph, 1) - 180.0
            v = self.v_nom + 6 * (self._r(k, ph, 2) - 0.5)
            f = self.mains_hz + 0.04 * (self._r(k, 0, 3) - 0.5)
            out.append((v, s / v, phi, f))
        return tuple(out)


def energy_wh(profile, phase, t0_us, t1_us):
    """The physical energy of one phase of a profile between two instants (us, profile
    time): import / export active (Wh), reactive per quadrant (varh), apparent (VAh),
    integrated from the profile's own piecewise-constant V, I, phi and nothing else: no
    chip model, no LSB, no conversion shared with the firmware (the reference of
    energy_error_ppm, bench/mp/energy.py)."""
    out = {"ai": 0.0, "ae": 0.0, "rq1": 0.0, "rq2": 0.0, "rq3": 0.0, "rq4": 0.0, "ap": 0.0}
    t = t0_us
    while t < t1_us:
        nxt = profile.next_change_us(t)
        end = t1_us if nxt is None or nxt > t1_us else nxt
        if end <= t:
            end = t1_us
        v, i, phi, f = profile.at_us(t)[phase - 1]
        h = (end - t) / 3.6e9
        a = math.radians(phi)
        p = v * i * math.cos(a) * h
        q = v * i * math.sin(a) * h
        if p >= 0:
            out["ai"] += p
            out["rq1" if q >= 0 else "rq4"] += abs(q)
        else:
            out["ae"] -= p
            out["rq2" if q >= 0 else "rq3"] += abs(q)
        out["ap"] += v * i * h
        t = end
    return out


PROFILES = {"constant": Constant, "steps": Steps, "fullscale": Fullscale, "household": Household,
            "pv": PV, "motor": Motor, "iec": IEC, "quadrants": Quadrants}


def make(name, **kwargs):
    """Build a profile by name: constant, steps, fullscale, household, pv, motor, iec,
    quadrants."""
    cls = PROFILES.get(name)
    if cls is None:
        raise ValueError("unknown load profile %r: use one of %s"
                         % (name, ", ".join(sorted(PROFILES))))
    return cls(**kwargs)
