# The STPM3x driver's set-up side: start-up and reset of one chip, serial settings (CRC,
# baud), configuration from a board's CHIPS entry, gain / phase / offset calibration,
# sag-swell thresholds, and putting a chip back after it lost its setup.
#
# These are the Stpm3x methods a running meter does not call: they run at boot, at a
# calibration and when a chip is restarted. As methods of drivers/stpm3x.py their 26
# function objects and their register-map names held about 1 KiB of heap for the meter's
# life (docs/ram.md); here they are loaded when used and dropped after the boot with the
# start-up code (metering/chips.py). They are still called as methods:
# Stpm3x.__getattr__ finds a name of METHODS here and binds the chip to it, so
# `chip.configure(cfg)` and `chip.start()` work as before. Each takes the chip first.
from drivers.stpm3x import Stpm3xError, _STARTED, crc8, SNAP_OFF
from drivers.stpm3x_map import (
    DSP_CR1, DSP_CR3, DSP_CR4, DSP_CR5, DSP_CR6, DSP_CR9, DSP_CR10, DFE_CR1, DSP_IRQ1,
    DSP_SR1, DSP_SR2, US_REG1, US_REG2, US_REG3, NOP, RESET_ROWS, DSP_CR1_RESET,
    LAST_WRITABLE_ROW, CH_STRIDE_CR, CR1_ROC, CR3_REF_FREQ, CR3_NOT_COMPARED,
    CR4_PHC1_SHIFT, CR4_PHV1_SHIFT, CR4_PHC2_SHIFT, CR4_PHV2_SHIFT, PHC_MASK, PHV_MASK,
    CHX_MASK, CHX_MID, SWV_THR_SHIFT, SAG_THR_SHIFT, SWC_THR_SHIFT, THR_MASK,
    OFA_SHIFT, OFAF_SHIFT, OFR_SHIFT, OFS_SHIFT,
    DFE_GAIN_SHIFT, DFE_GAIN_MASK, DFE_GAINS, VREF_V, AV, CAL_BASE, CAL_DIV,
    US1_CRC_EN, US1_TIMEOUT)
from drivers.stpm3x_offset import OFFSET_MASK, offset_code, offset_value

try:
    from micropython import const
except ImportError:  # CPython, host-side tests
    const = lambda x: x  # noqa: E731


# ---- start-up timing (DS10272) ----
PULSE_US = const(100)       # SYN / SCS / EN pulse width at start-up (ST firmware: 100 us)
POWER_US = const(35000)     # after power-up / EN rising edge
RESET_US = const(20000)     # after the global + communication reset
SEL_US = const(1000)        # SCS held at its interface level after EN rises

_TRIES = const(3)            # attempts for a configuration write (as drivers/stpm3x.py)
_N_CFG = const(20)           # rows 0..19 held in the shadow (as drivers/stpm3x.py)
_SENSORS = ("shunt", "ct", "rogowski")

# Derived values are const() literals with their derivation from stpm3x_map beside them
# (tests/test_stpm3x_consts.py checks them).
# The upper half of DSP_CR3 as written by one frame: software reset.
_CR3_SWRST_HI = const(0x10)  # CR3_SW_RESET >> 16
# Reset canary: configure() sets US_REG1[23:16] (UART RX timeout, ms; reset value 0) to
# this. US_REG1 is in every snapshot, so a chip that reset itself (brown-out, ESD) and
# lost its calibration is flagged (ST_CONFIG) instead of read silently. Harmless on SPI;
# on UART the host sends each frame in one write, far below 20 ms.
_CANARY_MS = const(20)
_US1_CANARY = const(0x140000)  # _CANARY_MS << US1_TIMEOUT_SHIFT
_DFE_EN = const(0x10001)  # DFE_ENV | DFE_ENC

# The chip methods that live here (Stpm3x.__getattr__ binds them).
METHODS = ("write_half", "start", "scs_level", "comm_reset", "sw_reset_frame", "reload",
           "probe", "load_rows", "attach", "set_crc", "set_baud", "configure",
           "set_offsets", "get_offsets", "set_calibration", "get_calibration", "thresholds",
           "restore", "saved_setup", "rewrite", "verify_config",
           "_peer_started", "_defaults", "_offsets", "_check_ch", "_thresholds")


def write_half(chip, addr, u16):
    """One unverified 16-bit write: addr = row*2 (bits 15:0) or row*2+1 (31:16)."""
    if not 0 <= addr <= 2 * LAST_WRITABLE_ROW + 1:
        raise ValueError("write address 0x%02X: only 0x00..0x29 (rows 0..20)" % addr)
    r = chip._xf(NOP, addr, u16 & 0xFFFF)
    row = addr >> 1
    if addr == US_REG3 * 2:
        chip._u3_lo = u16 & 0xFFFF
    if row < _N_CFG:
        v = chip.shadow_row(row)
        if addr & 1:
            v = (v & 0xFFFF) | (u16 & 0xFFFF) << 16
        else:
            v = (v & 0xFFFF0000) | (u16 & 0xFFFF)
        chip._put(row, v)
    return r


# ---- start-up ----
def _peer_started(chip):
    # a peer on the same SYN line that was started or attached holds a setup (and
    # energy counts) that three SYN pulses would wipe
    for c in _STARTED:
        if c is not chip and c._loaded and chip.syn is not None and c.syn is chip.syn:
            return True
    return False


def start(chip):
    """EN / SCS / SYN start-up and reset of this chip alone, then load the shadow and
    check the chip. With several chips on one SYN line the first start() resets all
    of them; later ones (or a restart) use EN or the software reset so no peer loses
    its setup. For a meter's chips use drivers.stpm3x_start.start_chips(): it starts
    chips that share an EN pin together and keeps the data rows where it can."""
    link = chip.link
    scs = link.scs
    sl = chip._sleep
    reset = False
    chip.started = False
    if chip.en is not None:
        chip.en.value(0)                       # EN low wipes the configuration
        sl(SEL_US)
        if scs is not None:
            scs.value(scs_level(chip))        # interface = SCS at EN rising
        chip.en.value(1)
        sl(SEL_US)
        if scs is not None:
            scs.value(1)
        reset = True
    sl(POWER_US)
    if chip.syn is not None and not _peer_started(chip):
        if scs is not None:
            scs.value(1)
        syn_global_reset(chip.syn, sl)
        reset = True
    comm_reset(chip)
    if reset:
        _defaults(chip)
    sl(RESET_US)
    if not reset:
        sw_reset_frame(chip)
        sl(RESET_US)
    reload(chip, soft=not reset)


def scs_level(chip):
    """SCS level that selects this chip's interface at an EN rising edge."""
    return 1 if chip.link.uart_mode else 0


def comm_reset(chip):
    """One SCS pulse: communication reset (and the SYN pulse counter)."""
    scs = chip.link.scs
    if scs is not None:
        scs.value(0)
        chip._sleep(PULSE_US)
        scs.value(1)
        chip._sleep(PULSE_US)


def sw_reset_frame(chip):
    """DSP_CR3 bit 20: the configuration rows go back to their reset values, the data
    rows (energy counters) keep counting. One frame, not verified (see reload)."""
    chip._xf(NOP, DSP_CR3 * 2 + 1, _CR3_SWRST_HI)


def reload(chip, soft=False):
    """After a reset: read rows 0..20, check DSP_CR1 holds its reset value and load
    the shadow. soft=True (software reset): whether it also resets US_REG1/2 (CRC,
    baud) is unconfirmed, so the current serial settings are tried first, then the
    reset ones. Raises Stpm3xError with what to check."""
    rows = None
    for attempt in range(2 if soft else 1):
        if attempt:
            _defaults(chip)
        try:
            rows = chip._read_checked(0, US_REG3 + 1)
            break
        except Stpm3xError:
            pass
    if rows is None:
        raise Stpm3xError("STPM3x (%s) does not answer after reset: %s"
                          % (chip.part, chip._hint()))
    r0 = rows[0]
    if r0 in (0, 0xFFFFFFFF) or rows[US_REG1] in (0, 0xFFFFFFFF):
        raise Stpm3xError("STPM3x (%s) reads all 0x%02X: check wiring (SCS, clock, "
                          "MOSI/MISO or TX/RX), power and EN" % (chip.part, r0 & 0xFF))
    if r0 != DSP_CR1_RESET:
        raise Stpm3xError("STPM3x (%s): DSP_CR1 reads 0x%08X instead of 0x%08X after "
                          "reset: check wiring and the interface selection (SCS level at "
                          "EN rising edge)" % (chip.part, r0, DSP_CR1_RESET))
    for r in range(_N_CFG):
        chip._put(r, rows[r])
    chip._u3_lo = rows[US_REG3] & 0xFFFF
    chip.started = True
    chip._loaded = True
    if chip not in _STARTED:
        _STARTED.append(chip)


def probe(chip):
    """Rows 0..20 as the chip holds them now, or None if it does not answer: no
    reset, nothing loaded (a few frames; for deciding how to start it)."""
    try:
        return chip._read_checked(0, US_REG3 + 1)   # US_REG1 checked (known value)
    except Stpm3xError:
        return None


def load_rows(chip, rows):
    """Adopt a chip from rows 0..20 that probe() read: no reset, the shadow is what
    the chip holds (the counters keep running)."""
    for r in range(_N_CFG):
        chip._put(r, rows[r])
    chip._u3_lo = rows[US_REG3] & 0xFFFF
    chip._loaded = True
    if chip not in _STARTED:
        _STARTED.append(chip)


def attach(chip):
    """Adopt a chip that kept running across an MCU restart: no reset (the energy
    rows keep counting), just load the shadow from rows 0..19. configure() calls it
    when neither start() nor attach() ran."""
    try:
        rows = chip._read_checked(0, US_REG3 + 1)   # US_REG1 checked (known value)
    except Stpm3xError:
        raise Stpm3xError("STPM3x (%s) does not answer: %s; or call start() to reset "
                          "it" % (chip.part, chip._hint()))
    load_rows(chip, rows)


def _defaults(chip):
    # State after a reset: CRC on, 9600 baud, reset register values.
    chip.crc = True
    chip._u3_lo = 0
    for r in range(_N_CFG):
        chip._put(r, RESET_ROWS[r])
    if chip.link.uart_mode and chip.link.baud != 9600:
        set_host_baud(chip.link, 9600)


# ---- serial settings ----
def set_crc(chip, on):
    """Enable / disable the frame CRC (US_REG1 bit 14) and check it took effect."""
    on = bool(on)
    if on == chip.crc:
        return
    old = chip.shadow_row(US_REG1)
    lo = (old & 0xFFFF) | US1_CRC_EN if on else (old & 0xFFFF) & ~US1_CRC_EN
    want = (old & 0xFFFF0000) | lo
    for _ in range(_TRIES):
        chip._xf(NOP, US_REG1 * 2, lo)       # sent in the current mode
        chip.crc = on
        if chip.link.uart_mode:
            chip.link.flush()
        try:
            got = chip._read_checked(US_REG1, 1)[0]
        except Stpm3xError:
            got = None
        if got == want:
            chip._put(US_REG1, want)
            return
        chip.crc = not on                       # the write was lost: still old mode
        chip.n_retry += 1
    chip.n_fail += 1
    raise Stpm3xError("STPM3x: could not %s the frame CRC: check wiring, or reset the "
                      "chip (EN)" % ("enable" if on else "disable"))


def set_baud(chip, baud):
    """Change the chip's UART rate (US_REG2), re-init the host UART, verify."""
    link = chip.link
    if not link.uart_mode:
        raise Stpm3xError("set_baud: this chip is on SPI; only a UartLink has a baud rate")
    reg = baud_reg(baud)
    old_baud = link.baud
    old = chip.shadow_row(US_REG2)
    want = (old & 0xFFFF0000) | reg
    for _ in range(_TRIES):
        chip._xf(NOP, US_REG2 * 2, reg)       # reply may come at either rate
        set_host_baud(link, baud)
        chip._sleep(PULSE_US)
        try:
            got = chip._read_checked(US_REG2, 1)[0]
        except Stpm3xError:
            got = None
        if got == want:
            chip._put(US_REG2, want)
            return
        set_host_baud(link, old_baud)            # did the chip keep the old rate?
        try:
            got = chip._read_checked(US_REG2, 1)[0]
        except Stpm3xError:
            got = None
        if got != old:
            break
        chip.n_retry += 1
    chip.n_fail += 1
    raise Stpm3xError("STPM3x: baud change to %d failed (chip reads US_REG2 %s): check "
                      "wiring; cycle EN to return to 9600 baud"
                      % (baud, "?" if got is None else "0x%08X" % got))


# ---- configuration ----
def configure(chip, chip_cfg, mains_hz=50):
    """Apply a board CHIPS entry (docs/architecture.md, Boards). Writes only what
    differs from the shadow, verifies every row."""
    chans = chip_cfg.get("ch", ())
    if not 1 <= len(chans) <= chip.nch_max:
        raise ValueError("%s takes 1..%d channels, config gives %d"
                         % (chip.part, chip.nch_max, len(chans)))
    if mains_hz not in (50, 60):
        raise ValueError("mains_hz %r: use 50 or 60" % (mains_hz,))
    for c in chans:
        if c.get("sensor", "ct") not in _SENSORS:
            raise ValueError("sensor %r: use shunt, ct or rogowski" % (c.get("sensor"),))
        if c.get("gain", 2) not in DFE_GAINS:
            raise ValueError("gain %r: use 2, 4, 8 or 16" % (c.get("gain"),))
        for k in ("r1", "r2", "ks"):
            if k in c and not c[k] > 0:
                raise ValueError("channel %s must be > 0" % k)
    chip.nch = len(chans)              # the snapshot layout follows the board even
    if not chip._loaded:               # if this chip fails below
        attach(chip)
    chip._rmw(DSP_CR3, CR3_REF_FREQ, CR3_REF_FREQ if mains_hz == 60 else 0)
    for i in range(chip.nch_max):
        dfe = DFE_CR1 + i
        if i >= len(chans):
            chip._rmw(dfe, _DFE_EN, 0)          # unused channel: V and C off
            chip._ch[i] = None
            continue
        c = chans[i]
        chip._ch[i] = c
        roc = CR1_ROC if c.get("sensor", "ct") == "rogowski" else 0
        chip._rmw(DSP_CR1 + i, CR1_ROC, roc)
        code = DFE_GAINS.index(c.get("gain", 2))
        gmask = DFE_GAIN_MASK << DFE_GAIN_SHIFT
        chip._rmw(dfe, gmask | _DFE_EN, (code << DFE_GAIN_SHIFT) | _DFE_EN)
        set_calibration(chip, i, c.get("chv", CHX_MID), c.get("chc", CHX_MID),
                        c.get("phc", 0), c.get("phv", 0))
        _offsets(chip, i, c)
    chip._rmw(US_REG1, US1_TIMEOUT, _US1_CANARY)
    irq = chip_cfg.get("irq")
    if irq is not None:
        for i in range(2):                        # DSP_IRQ1, DSP_IRQ2
            chip._rmw(DSP_IRQ1 + i, 0xFFFFFFFF, irq[i])
    chip._xf(NOP, US_REG3 * 2 + 1, 0)          # start snapshots with a clean US_REG3


def _offsets(chip, i, c):
    # DSP_CR9/11: AH_UP, OFA, OFAF; DSP_CR10/12: AH_DOWN, OFR, OFS (codes: map's
    # offset_code, where the unconfirmed sign encoding is decided)
    set_offsets(chip, i, c.get("ofa", 0), c.get("ofaf", 0), c.get("ofr", 0),
                c.get("ofs", 0))


def set_offsets(chip, ch, ofa=None, ofaf=None, ofr=None, ofs=None):
    """Power offsets of channel index `ch` (-512..511, in units of 4 power-row LSB:
    active, fundamental active, reactive, apparent). None leaves one unchanged."""
    _check_ch(chip, ch)
    ra = DSP_CR9 + CH_STRIDE_CR * ch
    for row, v, sh in ((ra, ofa, OFA_SHIFT), (ra, ofaf, OFAF_SHIFT),
                       (ra + 1, ofr, OFR_SHIFT), (ra + 1, ofs, OFS_SHIFT)):
        if v is not None:
            chip._rmw(row, OFFSET_MASK << sh, offset_code(v) << sh)


def get_offsets(chip, ch):
    """{"ofa", "ofaf", "ofr", "ofs"} of channel index `ch` from the shadow."""
    _check_ch(chip, ch)
    ra = chip.shadow_row(DSP_CR9 + CH_STRIDE_CR * ch)
    rr = chip.shadow_row(DSP_CR10 + CH_STRIDE_CR * ch)
    return {"ofa": offset_value(ra >> OFA_SHIFT), "ofaf": offset_value(ra >> OFAF_SHIFT),
            "ofr": offset_value(rr >> OFR_SHIFT), "ofs": offset_value(rr >> OFS_SHIFT)}


def set_calibration(chip, ch, chv=None, chc=None, phc=None, phv=None):
    """Gain (CHV/CHC, 12 bit, 0x800 = mid) and phase (PHC 10 bit, PHV 2 bit)
    calibration of channel index `ch` (0 = chip channel 1, 1 = channel 2).
    Sag/swell thresholds of the channel are recomputed with the new gains."""
    _check_ch(chip, ch)
    for name, v, top in (("chv", chv, CHX_MASK), ("chc", chc, CHX_MASK),
                         ("phc", phc, PHC_MASK), ("phv", phv, PHV_MASK)):
        if v is not None and not (isinstance(v, int) and 0 <= v <= top):
            raise ValueError("%s %r: must be an int 0..%d" % (name, v, top))
    rv = DSP_CR5 + CH_STRIDE_CR * ch             # DSP_CR5 / CR7: CHV, SWV, SAG
    rc = DSP_CR6 + CH_STRIDE_CR * ch             # DSP_CR6 / CR8: CHC, SWC
    if chv is not None:
        chip._rmw(rv, CHX_MASK, chv)
    if chc is not None:
        chip._rmw(rc, CHX_MASK, chc)
    sh_c, sh_v = _ph_shifts(ch)
    if phc is not None:
        chip._rmw(DSP_CR4, PHC_MASK << sh_c, phc << sh_c)
    if phv is not None:
        chip._rmw(DSP_CR4, PHV_MASK << sh_v, phv << sh_v)
    if chip._ch[ch] is not None:
        _thresholds(chip, ch, chip._ch[ch])


def get_calibration(chip, ch):
    """Current calibration of channel index `ch` from the shadow."""
    _check_ch(chip, ch)
    cr4 = chip.shadow_row(DSP_CR4)
    sh_c, sh_v = _ph_shifts(ch)
    return {"chv": chip.shadow_row(DSP_CR5 + CH_STRIDE_CR * ch) & CHX_MASK,
            "chc": chip.shadow_row(DSP_CR6 + CH_STRIDE_CR * ch) & CHX_MASK,
            "phc": (cr4 >> sh_c) & PHC_MASK, "phv": (cr4 >> sh_v) & PHV_MASK}


def _check_ch(chip, ch):
    if ch not in (0, 1) or ch >= chip.nch_max:
        raise ValueError("channel index %r: use 0%s for %s"
                         % (ch, "" if chip.nch_max == 1 else " or 1", chip.part))


def _thresholds(chip, ch, c):
    # THR = V sqrt2 Av calV R2/(R1+R2) 2^10 / Vref; SWC_THR = I sqrt2 Ai ks calI 2^10 / Vref
    rv = DSP_CR5 + CH_STRIDE_CR * ch
    rc = DSP_CR6 + CH_STRIDE_CR * ch
    calv = CAL_BASE + (chip.shadow_row(rv) & CHX_MASK) / CAL_DIV
    cali = CAL_BASE + (chip.shadow_row(rc) & CHX_MASK) / CAL_DIV
    r1 = c.get("r1", 810000)
    r2 = c.get("r2", 470)
    kv = 1.4142135623730951 * AV * calv * r2 / (r1 + r2) * 1024 / VREF_V
    ki = 1.4142135623730951 * c.get("gain", 2) * c.get("ks", 0.0024) * cali * 1024 / VREF_V
    sag = _thr(c.get("sag_v"), kv, 0)
    swv = _thr(c.get("swell_v"), kv, THR_MASK)
    swc = _thr(c.get("swell_a"), ki, THR_MASK)
    chip._rmw(rv, THR_MASK << SWV_THR_SHIFT | THR_MASK << SAG_THR_SHIFT,
              swv << SWV_THR_SHIFT | sag << SAG_THR_SHIFT)
    chip._rmw(rc, THR_MASK << SWC_THR_SHIFT, swc << SWC_THR_SHIFT)


def thresholds(chip, ch):
    """Raw (sag, swell_v, swell_c) 10-bit thresholds of channel index `ch`."""
    _check_ch(chip, ch)
    v = chip.shadow_row(DSP_CR5 + CH_STRIDE_CR * ch)
    c = chip.shadow_row(DSP_CR6 + CH_STRIDE_CR * ch)
    return ((v >> SAG_THR_SHIFT) & THR_MASK, (v >> SWV_THR_SHIFT) & THR_MASK,
            (c >> SWC_THR_SHIFT) & THR_MASK)


def restore(chip):
    """Bring a chip that lost its setup (brown-out, EN glitch, stopped answering)
    back: start() again, then rewrite the configuration rows 0..15 from the shadow
    and the serial settings (baud, CRC). Not for the hot path: a few hundred frames.
    On a shared EN line use stpm3x_start.recover(group, i), which restarts the whole line."""
    saved = saved_setup(chip)
    start(chip)
    rewrite(chip, saved)


def saved_setup(chip):
    """What rewrite() needs to put this chip back as it is now configured."""
    return (bytes(chip.shadow), chip.crc,
            chip.link.baud if chip.link.uart_mode else None, chip._u3_lo)


def rewrite(chip, saved):
    """After a reset: configuration rows 0..15, the reset canary, US_REG3 masks, baud
    and CRC as saved_setup() recorded them."""
    want, crc, baud, u3 = saved
    for r in range(DSP_SR1):                     # configuration rows 0..15
        o = 4 * r
        v = want[o] | want[o + 1] << 8 | want[o + 2] << 16 | want[o + 3] << 24
        if r == DSP_CR3:
            v &= ~CR3_NOT_COMPARED & 0xFFFFFFFF
        if v != chip.shadow_row(r):
            chip._rmw(r, 0xFFFFFFFF, v)
    o = 4 * US_REG1
    v = want[o] | want[o + 1] << 8 | want[o + 2] << 16 | want[o + 3] << 24
    chip._rmw(US_REG1, US1_TIMEOUT, v)
    if u3:
        chip.write_row(US_REG3, u3, True, 1)
    if baud is not None and baud != chip.link.baud:
        set_baud(chip, baud)
    set_crc(chip, crc)
    chip._xf(NOP, US_REG3 * 2 + 1, 0)


def verify_config(chip, repair=True):
    """Read rows 0..19 and compare with the shadow (status rows 16/17 skipped).
    Returns the rows that differed; rewrites them when `repair`."""
    rows = chip._read_checked(0, US_REG3 + 1)
    bad = []
    for r in range(_N_CFG):
        if r in (DSP_SR1, DSP_SR2):
            continue
        m = 0xFFFFFFFF & ~CR3_NOT_COMPARED if r == DSP_CR3 else 0xFFFFFFFF
        if (rows[r] ^ chip.shadow_row(r)) & m:
            bad.append(r)
    if repair:
        for r in bad:
            if r not in (US_REG1, US_REG2):
                chip.write_row(r, chip.shadow_row(r))
    return bad


def syn_global_reset(syn, sleep):
    """Three SYN pulses (every SCS high): global reset of every chip on the SYN line."""
    for _ in range(3):
        syn.value(0)
        sleep(PULSE_US)
        syn.value(1)
        sleep(PULSE_US)


def in_reset_state(rows):
    """True if rows 0..20 (as probe() returns them) hold a chip nobody configured since
    its last reset: configuration rows at their reset values (DSP_CR3's self-clearing
    bits aside) and no reset canary in US_REG1. Such a chip has been counting since that
    reset at its reset gain."""
    for r in range(DSP_SR1):
        m = 0xFFFFFFFF & ~CR3_NOT_COMPARED if r == DSP_CR3 else 0xFFFFFFFF
        if (rows[r] ^ RESET_ROWS[r]) & m:
            return False
    return not rows[US_REG1] & US1_TIMEOUT


def _ph_shifts(ch):
    # DSP_CR4 fields of channel index ch: (PHC shift, PHV shift)
    return (CR4_PHC1_SHIFT, CR4_PHV1_SHIFT) if ch == 0 else (CR4_PHC2_SHIFT, CR4_PHV2_SHIFT)


def _thr(x, k, default):
    if x is None:
        return default
    v = int(x * k + 0.5)
    return 0 if v < 0 else THR_MASK if v > THR_MASK else v


# ---- encodings and helpers a running meter does not call (here, not in
# drivers/stpm3x.py, so that it does not hold them; docs/ram.md) ----
def make_frame(read_addr, write_addr=NOP, data=0xFFFF, uart=False, crc=True):
    """Host frame [read addr][write addr][data LSB][data MSB]([CRC]) as bytes."""
    b = bytearray((read_addr & 0xFF, write_addr & 0xFF, data & 0xFF, (data >> 8) & 0xFF, 0))
    if not crc:
        return bytes(b[:4])
    b[4] = crc8(b, uart)
    return bytes(b)


def baud_reg(baud):
    """US_REG2[15:0] for a UART rate: int(16 MHz / (16 baud)) << 4 | round(frac * 16)."""
    if not 1200 <= baud <= 1000000:
        raise ValueError("baud %r: use 1200 .. 1000000 (e.g. 9600, 115200)" % (baud,))
    ip = 1000000 // baud
    frac16 = ((1000000 % baud) * 32 + baud) // (2 * baud)
    return (ip << 4) + frac16


def set_host_baud(link, baud):
    """Re-initialise a UartLink's host UART (the chip's rate is set by set_baud)."""
    try:
        link.uart.init(baudrate=baud, bits=8, parity=None, stop=1)
    except TypeError:
        link.uart.init(baud)
    link.baud = baud
    link._set_timeout(baud)
    link.flush()


def row_u32(group, i, row):
    """Debug helper (allocates on 32-bit MCUs): row value of chip i of a ChipGroup from
    its snapshot buffer."""
    o = group.base[i] + SNAP_OFF[row]
    b = group.buf
    return b[o] | b[o + 1] << 8 | b[o + 2] << 16 | b[o + 3] << 24
