# Scale factors of one STPM3x channel, from the board's channel config.
#
# Formulas: DS10272 / UM2066 (see shared reference "Conversions"). The firmware's LSB is
# computed once at the *nominal* calibration cal = 0.875 (CHx = 0x800): calibration moves
# the chip's gain (CHV/CHC), never these numbers. Everything the hot path needs is turned
# into integers here, so that engine.cycle() never touches a float (floats are boxed, i.e.
# allocated, on most ports) and no intermediate exceeds 2**30 (a small int on a 32-bit MCU).
try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

from drivers.stpm3x_map import (VREF_V, AV, DCLK_HZ, CAL_BASE, CAL_DIV, CHX_MID,  # noqa: F401
                                DFE_GAINS as GAINS, RMS_V_MASK, RMS_I_MASK, RESET_ROWS,
                                DFE_CR1, DFE_GAIN_SHIFT, DFE_GAIN_MASK)

CAL_NOM = CAL_BASE + CHX_MID / CAL_DIV    # 0.875: the gain at mid-scale CHx
KINT_ROGOWSKI = 0.8155773
# Peak signal at the ADC after the PGA that the sigma-delta converts without clipping.
# The reference's worked example (366 Vrms with R1/R2 = 810k/470, 11 A with CT 2.4 mV/A
# and Ai = 16) both give 0.6 V: one constant, easy to change if the datasheet says better.
FS_PEAK_V = 0.6
SENSORS = ("shunt", "ct", "rogowski")
# The I RMS field of a sine at the ADC limit, at nominal calibration: the same for every
# gain and sensor (the gain scales signal and LSB alike). A reading above 95 % of it may
# be clipped.
I_FIELD_FS = FS_PEAK_V / 1.41421356 * CAL_NOM * 131072 / VREF_V


def reset_gain(k):
    """Current PGA gain of channel index k after a chip reset (DFE_CR1: x16, DFE_CR2:
    x2): the gain a chip counts at from its reset until configure()."""
    return GAINS[(RESET_ROWS[DFE_CR1 + k] >> DFE_GAIN_SHIFT) & DFE_GAIN_MASK]

_INT32_HALF = const(0x80000000)   # |delta| beyond this is ambiguous modulo 2**32
_SMALL_DELTA = const(0x20000000)  # deltas below this keep every intermediate a small int
_SMALL = const(0x40000000)        # 2**30: MicroPython small-int limit on a 32-bit MCU


class ScaleError(ValueError):
    pass


def fixed(lsb, limit_in):
    """(mul, sh) with mul in [2**14, 2**15) so that x * lsb ~= (x * mul) >> sh.

    `limit_in` is the largest |x|; raises ScaleError if the result would not be a small int.
    """
    if lsb <= 0:
        raise ScaleError("scale factor must be positive")
    if limit_in * lsb >= _SMALL:
        raise ScaleError("full-scale value %d x %g does not fit a 30-bit int; use a smaller "
                         "sensor ratio (ks) or a higher current gain" % (limit_in, lsb))
    sh = 0
    m = lsb
    while m < 16384:
        m *= 2
        sh += 1
    while m >= 32768:
        m /= 2
        sh -= 1
    mul = int(m + 0.5)
    if mul == 32768:
        mul = 16384
        sh -= 1
    return mul, sh


class ChannelScale:
    """LSB sizes and integer multipliers of one channel.

    Attributes (floats, SI units): v_lsb, i_lsb, p_lsb (W per power-row LSB),
    e_lsb_wh (Wh per energy-row LSB). Integers: cpw (energy counts per Wh, rounded; the
    energy accounting is exact in counts, the rounding of cpw is < 1e-7 relative),
    v/i/p multipliers for phases.mulsh(), fs_v_rms / fs_i_rms (full scale, sine).
    """

    def __init__(self, ch):
        try:
            r1 = float(ch["r1"])
            r2 = float(ch["r2"])
            ks = float(ch["ks"])
            gain = int(ch["gain"])
            sensor = ch.get("sensor", "ct")
        except (KeyError, TypeError, ValueError):
            raise ScaleError("channel config needs r1, r2, ks, gain (see docs/architecture.md"
                             " Boards): got %r" % (ch,))
        if sensor not in SENSORS:
            raise ScaleError("sensor %r: use one of %s" % (sensor, ", ".join(SENSORS)))
        if gain not in GAINS:
            raise ScaleError("current gain %r: use 2, 4, 8 or 16" % (gain,))
        if r1 <= 0 or r2 <= 0 or ks <= 0:
            raise ScaleError("r1, r2 and ks must be positive")
        kint = KINT_ROGOWSKI if sensor == "rogowski" else 1.0
        div = 1.0 + r1 / r2
        self.gain = gain
        self.kint = kint
        self.div = div
        self.ks = ks
        self.v_lsb = VREF_V * div / (CAL_NOM * AV * 32768)
        self.i_lsb = VREF_V / (CAL_NOM * gain * 131072 * ks * kint)
        self.p_lsb = VREF_V * VREF_V * div / (kint * AV * gain * ks * CAL_NOM * CAL_NOM
                                              * 268435456)
        self.e_lsb_wh = self.p_lsb * 2048 / DCLK_HZ / 3600
        cpw = int(1.0 / self.e_lsb_wh + 0.5)
        if cpw < 1000 or cpw >= _SMALL_DELTA:
            raise ScaleError("energy LSB %g Wh out of range: check r1, r2, ks, gain"
                             % self.e_lsb_wh)
        self.cpw = cpw
        # Full scale (sine, peak FS_PEAK_V after gain) and the counting rates it implies.
        self.fs_v_rms = FS_PEAK_V / AV * div / 1.41421356
        self.fs_i_rms = FS_PEAK_V / gain / (ks * kint) / 1.41421356
        self.fs_p_w = self.fs_v_rms * self.fs_i_rms
        self.v_mul, self.v_sh = fixed(self.v_lsb * 1000, RMS_V_MASK)
        self.i_mul, self.i_sh = fixed(self.i_lsb * 1000, RMS_I_MASK)
        # Power rows are 29-bit, but the ADC clips first: 2x sine full scale covers any
        # waveform (peak-limited square waves) with margin.
        p_max_reg = int(2 * self.fs_p_w / self.p_lsb) + 1
        if p_max_reg > 0x10000000:
            p_max_reg = 0x10000000
        self.p_mul, self.p_sh = fixed(self.p_lsb * 1000, p_max_reg)

    def counts_per_s(self, p_w):
        """Energy-row counts per second at active power p_w."""
        return p_w / self.p_lsb * DCLK_HZ / 2048

    def wrap_s(self, worst=True):
        """Longest time between two reads before an int32 difference becomes ambiguous.

        worst=True: the register full scale (V field 0x7FFF x I field 0x1FFFF, the power
        row near 2**28), the most any chip can count whatever the analog front end; the
        engine enforces read_ms <= wrap_s() / 2. worst=False: the analog full scale
        (sine at FS_PEAK_V), what real hardware reaches before the ADC clips."""
        return _INT32_HALF / self.rate_fs(worst)

    def rate_fs(self, worst=True):
        """Energy counts per second at full scale (see wrap_s)."""
        if worst:
            return RMS_V_MASK * RMS_I_MASK / 16.0 * DCLK_HZ / 2048
        return self.counts_per_s(self.fs_p_w)

    def alloc_free_s(self, worst=True):
        """Longest read interval for which every intermediate stays a small int (< 2**30)
        on a 32-bit MCU: delta + remainder < 2**30."""
        return (_SMALL - self.cpw - 0x10000) / self.rate_fs(worst)

    def ambiguity_wh(self):
        """Energy of 2**31 counts: what may pass between a checkpoint and the end of an MCU
        reset for the raw-counter reconciliation to stay exact."""
        return _INT32_HALF / self.cpw


def channels(board):
    """[(phase, chip_index, ch_index, ChannelScale)] sorted by phase; validates the board."""
    out = []
    seen = []
    for ci, chip in enumerate(board.CHIPS):
        chs = chip.get("ch", ())
        if not 1 <= len(chs) <= 2:
            raise ScaleError("chip %d: 'ch' needs one or two channel dicts" % ci)
        for k, ch in enumerate(chs):
            ph = ch.get("phase")
            if not isinstance(ph, int) or not 1 <= ph <= board.PHASES or ph in seen:
                raise ScaleError("chip %d channel %d: phase %r must be unique in 1..%d"
                                 % (ci, k + 1, ph, board.PHASES))
            seen.append(ph)
            out.append((ph, ci, k, ChannelScale(ch)))
    if len(seen) != board.PHASES:
        raise ScaleError("board has PHASES = %d but %d channels" % (board.PHASES, len(seen)))
    out.sort(key=lambda e: e[0])
    return out


def max_read_ms(board, worst=True):
    """Worst-case read interval of a board (ms): the shortest wrap bound of its channels.
    The engine refuses a read_ms above this; docs/metering.md tabulates it per board."""
    return int(min(c[3].wrap_s(worst) for c in channels(board)) * 1000)


def alloc_free_read_ms(board, worst=True):
    return int(min(c[3].alloc_free_s(worst) for c in channels(board)) * 1000)


def table(board):
    """Rows for the docs table: phase, V/I/P LSB, full scale, cpw, wrap bounds."""
    rows = []
    for ph, ci, k, s in channels(board):
        rows.append({"phase": ph, "chip": ci, "ch": k + 1, "v_lsb_mv": s.v_lsb * 1000,
                     "i_lsb_ma": s.i_lsb * 1000, "p_lsb_mw": s.p_lsb * 1000,
                     "fs_v": s.fs_v_rms, "fs_i": s.fs_i_rms, "cpw": s.cpw,
                     "wrap_analog_s": s.wrap_s(False), "wrap_reg_s": s.wrap_s(True),
                     "alloc_free_analog_s": s.alloc_free_s(False),
                     "alloc_free_reg_s": s.alloc_free_s(True),
                     "ambiguity_wh": s.ambiguity_wh()})
    return rows
