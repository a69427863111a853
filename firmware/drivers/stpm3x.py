# STPM32 / STPM33 / STPM34 driver: SPI and UART frames with CRC-8, a shadow of the
# configuration rows 0..19, latching and an allocation-free snapshot. The set-up side
# (start-up, serial settings, configuration, calibration, restore) is in stpm3x_cfg.py,
# called as methods of Stpm3x all the same (Stpm3x.__getattr__).
# Chip facts: DS10272 / UM2066 as summarised in the project reference (stpm3x.md).
# Usage, timing, frame counts and the error model: docs/driver.md.
from util import sleep_us as _sleep_us

try:
    from micropython import const
except ImportError:  # CPython, host-side tests
    const = lambda x: x  # noqa: E731

# ---- timing (DS10272: >= 4 us between frames and after a latch; start-up waits) ----
_GAP_US = const(5)           # idle time after every frame and after a latch
_LATCH_US = const(10)        # SYN low time for a latch pulse (>= 4 us)

_TRIES = const(3)            # attempts for a configuration read or write
_ZERO_READS = const(3)       # clean passes that must agree on a doubtful all-0x00 reply
_SNAP_TRIES = const(3)       # passes per chip and snapshot (1 + 2 retries)

# ---- registers: rows, fields and status bits by datasheet name (stpm3x_map.py) ----
from drivers.stpm3x_map import RESET_ROWS
# register-map values this module reads at run time, as const() literals (inlined, no
# dict slot; the map itself is dropped after the boot: docs/ram.md);
# tests/test_stpm3x_consts.py checks each against drivers/stpm3x_map.py
_CR3_NOT_COMPARED = const(0xf00000)
_DSP_CR3 = const(2)
_DSP_EV1 = const(0x15)
_DSP_REG1 = const(0x17)
_DSP_REG14 = const(0x24)
_DSP_REG15 = const(0x25)
_DSP_SR1 = const(0x10)
_DSP_SR2 = const(0x11)
_LAST_WRITABLE_ROW = const(0x14)
_NOP = const(0xff)
_N_ROWS = const(0x46)
_PH1_REG1 = const(0x2a)
_PH_STRIDE = const(0xc)
_US1_CRC_EN = const(0x4000)
_US1_CRC_POLY = const(0xff)
_US1_LSB_FIRST = const(0x8000)
_US2_BAUD = const(0xffff)
_US3_BUS_ERRORS = const(0x6c7d0000)
_US3_CRC_ERRORS = const(0x10020000)
_US_REG1 = const(0x12)
_US_REG2 = const(0x13)
_US_REG3 = const(0x14)

# Derived values below are const() literals, each with its derivation from stpm3x_map
# beside it (tests/test_stpm3x_consts.py checks them): a const() with a leading underscore
# costs no heap and is inlined, a computed global was a dict slot read at run time.
# The upper half of DSP_CR3 as written by one frame: software reset / latch bits.
_CR3_LATCH_HI = const(0x60)  # (CR3_LATCH1 | CR3_LATCH2) >> 16
_CR3_SELF_HI = const(0xF0)  # CR3_NOT_COMPARED >> 16
# US_REG1 fields the driver fixes (CRC polynomial 0x07, MSB first, CRC enable): the
# known value of every read (_known_ok)
_US1_KNOWN = const(0xC0FF)  # US1_CRC_POLY | US1_CRC_EN | US1_LSB_FIRST
_US1_POLY = const(0x07)

# US_REG3 error bits as bytes 2 and 3 of the row (the hot path compares bytes)
_U3_CRC_B2 = const(2)  # (US3_CRC_ERRORS >> 16) & 0xFF
_U3_CRC_B3 = const(0x10)  # US3_CRC_ERRORS >> 24
_U3_BUS_B2 = const(0x7D)  # (US3_BUS_ERRORS >> 16) & 0xFF
_U3_BUS_B3 = const(0x6C)  # US3_BUS_ERRORS >> 24
# stuck sigma-delta / period error bits of DSP_SR1/2, as bytes 2 and 3
_SR_STUCK_B2 = const(0x10)  # (SR_C_STUCK >> 16) & 0xFF
_SR_STUCK_B3 = const(1)  # SR_V_STUCK >> 24
_SR_PER_B3 = const(2)  # SR_PER_ERR >> 24
_N_CFG = const(20)                # rows 0..19 held in the shadow
_PH_ENERGIES = const(4)          # PHx_REG1..4: active, fundamental, reactive, apparent

# ---- snapshot layout (docs/architecture.md) ----
# Status and integrity rows DSP_SR1..DSP_REG1 (16..23), then channel 1 (DSP_REG14..
# PH1_REG12) and, with two channels in use, channel 2 (DSP_REG15's block to PH2_REG12).
_SNAP_HEAD = tuple(range(_DSP_SR1, _DSP_REG1 + 1))            # rows 16..23
_SNAP_END_1CH = const(54)  # PH1_REG1 + PH_STRIDE (after PH1_REG12)
_SNAP_END_2CH = const(66)  # PH1_REG1 + 2 * PH_STRIDE (after PH2_REG12)
SNAP_ROWS_2CH = _SNAP_HEAD + tuple(range(_DSP_REG14, _SNAP_END_2CH))
SNAP_ROWS_1CH = _SNAP_HEAD + tuple(range(_DSP_REG14, _SNAP_END_1CH))
_SNAP_DATA = const(32)  # 4 * len(_SNAP_HEAD) (byte offset of DSP_REG14)


def snap_off(row):
    """Byte offset of `row` inside a chip block of the snapshot."""
    if _DSP_SR1 <= row < _DSP_SR1 + len(_SNAP_HEAD):
        return (row - _DSP_SR1) * 4
    if _DSP_REG14 <= row < _SNAP_END_2CH:
        return _SNAP_DATA + (row - _DSP_REG14) * 4
    raise ValueError("row %d is not in the snapshot (rows %d..%d, %d..%d)"
                     % (row, _DSP_SR1, _DSP_SR1 + len(_SNAP_HEAD) - 1, _DSP_REG14,
                        _SNAP_END_2CH - 1))


# row -> offset inside a chip block, 0xFF = not in the snapshot (rows 0..69)
SNAP_OFF = bytes(snap_off(r) if r in SNAP_ROWS_2CH else 0xFF for r in range(70))

# ---- per-chip status bits of a snapshot (ChipGroup.status[i]) ----
ST_CRC = const(0x01)        # a reply failed its CRC, or the chip saw a bad frame
ST_BUS = const(0x02)        # overrun / underrun / framing / address error in US_REG3
ST_RETRY = const(0x04)      # more than one pass was needed (values are from a good pass)
ST_FAIL = const(0x08)       # no good pass: this chip's block in buf is NOT valid
ST_STUCK = const(0x10)      # sigma-delta stuck (DSP_SR bit 20 or 24) on a used channel
ST_PERIOD = const(0x20)     # period error (DSP_SR bit 25): no or odd mains on a channel
ST_NOANSWER = const(0x40)   # no reply, or rows 18/19 read all 0x00 / 0xFF
ST_CONFIG = const(0x80)     # US_REG1/2 differ from the shadow (misaligned or chip reset)
_PASS_BAD = const(0xC3)     # ST_CRC | ST_BUS | ST_NOANSWER | ST_CONFIG

_PARTS = ("STPM32", "STPM33", "STPM34")


class Stpm3xError(Exception):
    """The chip did not behave as the datasheet says. The message says what to check."""


# ---- CRC-8, polynomial 0x07, init 0, no final XOR (DS10272 "CRC") ----
# The byte tables as literals, not computed at import: a frozen bytes constant stays in
# flash, a computed one took 2 x 272 bytes of heap for the meter's life (docs/ram.md).
# _T_SPI: MSB first (c = (c << 1) ^ 0x07 while bit 7 is set); _T_UART: the reflected
# polynomial 0xE0, LSB first. tests/test_stpm3x_crc.py recomputes both bit by bit.
_T_SPI = (
    b"\x00\x07\x0e\x09\x1c\x1b\x12\x15\x38\x3f\x36\x31\x24\x23\x2a\x2d"
    b"\x70\x77\x7e\x79\x6c\x6b\x62\x65\x48\x4f\x46\x41\x54\x53\x5a\x5d"
    b"\xe0\xe7\xee\xe9\xfc\xfb\xf2\xf5\xd8\xdf\xd6\xd1\xc4\xc3\xca\xcd"
    b"\x90\x97\x9e\x99\x8c\x8b\x82\x85\xa8\xaf\xa6\xa1\xb4\xb3\xba\xbd"
    b"\xc7\xc0\xc9\xce\xdb\xdc\xd5\xd2\xff\xf8\xf1\xf6\xe3\xe4\xed\xea"
    b"\xb7\xb0\xb9\xbe\xab\xac\xa5\xa2\x8f\x88\x81\x86\x93\x94\x9d\x9a"
    b"\x27\x20\x29\x2e\x3b\x3c\x35\x32\x1f\x18\x11\x16\x03\x04\x0d\x0a"
    b"\x57\x50\x59\x5e\x4b\x4c\x45\x42\x6f\x68\x61\x66\x73\x74\x7d\x7a"
    b"\x89\x8e\x87\x80\x95\x92\x9b\x9c\xb1\xb6\xbf\xb8\xad\xaa\xa3\xa4"
    b"\xf9\xfe\xf7\xf0\xe5\xe2\xeb\xec\xc1\xc6\xcf\xc8\xdd\xda\xd3\xd4"
    b"\x69\x6e\x67\x60\x75\x72\x7b\x7c\x51\x56\x5f\x58\x4d\x4a\x43\x44"
    b"\x19\x1e\x17\x10\x05\x02\x0b\x0c\x21\x26\x2f\x28\x3d\x3a\x33\x34"
    b"\x4e\x49\x40\x47\x52\x55\x5c\x5b\x76\x71\x78\x7f\x6a\x6d\x64\x63"
    b"\x3e\x39\x30\x37\x22\x25\x2c\x2b\x06\x01\x08\x0f\x1a\x1d\x14\x13"
    b"\xae\xa9\xa0\xa7\xb2\xb5\xbc\xbb\x96\x91\x98\x9f\x8a\x8d\x84\x83"
    b"\xde\xd9\xd0\xd7\xc2\xc5\xcc\xcb\xe6\xe1\xe8\xef\xfa\xfd\xf4\xf3")
_T_UART = (
    b"\x00\x91\xe3\x72\x07\x96\xe4\x75\x0e\x9f\xed\x7c\x09\x98\xea\x7b"
    b"\x1c\x8d\xff\x6e\x1b\x8a\xf8\x69\x12\x83\xf1\x60\x15\x84\xf6\x67"
    b"\x38\xa9\xdb\x4a\x3f\xae\xdc\x4d\x36\xa7\xd5\x44\x31\xa0\xd2\x43"
    b"\x24\xb5\xc7\x56\x23\xb2\xc0\x51\x2a\xbb\xc9\x58\x2d\xbc\xce\x5f"
    b"\x70\xe1\x93\x02\x77\xe6\x94\x05\x7e\xef\x9d\x0c\x79\xe8\x9a\x0b"
    b"\x6c\xfd\x8f\x1e\x6b\xfa\x88\x19\x62\xf3\x81\x10\x65\xf4\x86\x17"
    b"\x48\xd9\xab\x3a\x4f\xde\xac\x3d\x46\xd7\xa5\x34\x41\xd0\xa2\x33"
    b"\x54\xc5\xb7\x26\x53\xc2\xb0\x21\x5a\xcb\xb9\x28\x5d\xcc\xbe\x2f"
    b"\xe0\x71\x03\x92\xe7\x76\x04\x95\xee\x7f\x0d\x9c\xe9\x78\x0a\x9b"
    b"\xfc\x6d\x1f\x8e\xfb\x6a\x18\x89\xf2\x63\x11\x80\xf5\x64\x16\x87"
    b"\xd8\x49\x3b\xaa\xdf\x4e\x3c\xad\xd6\x47\x35\xa4\xd1\x40\x32\xa3"
    b"\xc4\x55\x27\xb6\xc3\x52\x20\xb1\xca\x5b\x29\xb8\xcd\x5c\x2e\xbf"
    b"\x90\x01\x73\xe2\x97\x06\x74\xe5\x9e\x0f\x7d\xec\x99\x08\x7a\xeb"
    b"\x8c\x1d\x6f\xfe\x8b\x1a\x68\xf9\x82\x13\x61\xf0\x85\x14\x66\xf7"
    b"\xa8\x39\x4b\xda\xaf\x3e\x4c\xdd\xa6\x37\x45\xd4\xa1\x30\x42\xd3"
    b"\xb4\x25\x57\xc6\xb3\x22\x50\xc1\xba\x2b\x59\xc8\xbd\x2c\x5e\xcf")


def crc8(data, uart=False, n=4):
    """CRC of the first n bytes of a frame: SPI (MSB first) or UART (reflected)."""
    t = _T_UART if uart else _T_SPI
    c = 0
    for i in range(n):
        c = t[c ^ data[i]]
    return c


# ---- links: one frame in preallocated buffers (the UART link: drivers/stpm3x_uart.py,
# imported by a board whose chips are on UART only) ----
class SpiLink:
    """SPI link to one chip: `spi` in mode 3 (polarity 1, phase 1), MSB first, <= 12 MHz,
    built by the board; `scs` the chip's select pin (idle high)."""
    uart_mode = False

    def __init__(self, spi, scs):
        self.spi = spi
        self.scs = scs
        self.frames = 0
        self.timeouts = 0
        self.sleep_us = _sleep_us
        scs.value(1)

    def xfer(self, tx, rx):
        """Exchange one frame (len(tx) == len(rx), 5 bytes with CRC, 4 without).
        Returns the number of reply bytes (always len(rx) on SPI)."""
        s = self.scs
        s.value(0)
        self.spi.write_readinto(tx, rx)
        s.value(1)
        self.frames = (self.frames + 1) & 0x3FFFFFFF
        return len(rx)


# Chips started in this boot, to know whether a SYN global reset would wipe a peer.
_STARTED = []


def _frames(ra, wa, uart):
    # Frames (read addr, write addr, data 0 for a write / 0xFFFF) with CRC, stride 5, in
    # one bytes object: _pass copies each into the chip's 5-byte frame buffer. A tuple of
    # memoryviews per frame (5- and 4-byte) cost ~1 KiB more per chip (docs/ram.md).
    nf = len(ra)
    tx = bytearray(5 * nf)
    for f in range(nf):
        o = 5 * f
        tx[o] = ra[f]
        tx[o + 1] = wa[f]
        d = 0 if wa[f] != _NOP else 0xFF
        tx[o + 2] = d
        tx[o + 3] = d
        tx[o + 4] = crc8(memoryview(tx)[o:o + 4], uart)
    return bytes(tx)


# Frame of the snapshot pass where US_REG1/2 (just after DSP_SR1/2) have arrived; the
# sticky-status clears ride on the next 4 frames, sent only if those rows checked out.
_SR_CHECK = const(4)
_O_US1 = const(8)  # 4 * (US_REG1 - DSP_SR1) (US_REG1/2 in a chip block and in the shadow)
_O_US3 = const(16)  # 4 * (US_REG3 - DSP_SR1) (US_REG3 in a chip block)
_SH_US1 = const(72)  # 4 * US_REG1 (US_REG1 in the shadow)
# const() is folded at compile time; the name itself would be the 30th global, which
# grows the module's table from 29 to 37 slots (64 bytes for the meter's lifetime)
del const


def _zero_checked(row):
    # energy counters and RMS rows: they do not drop to exactly 0 from one read to the
    # next except at a chip reset or a loss of mains (then the retry confirms the 0)
    if row in (_DSP_REG14, _DSP_REG15):
        return True
    for b in (_PH1_REG1, _PH1_REG1 + _PH_STRIDE):
        if b <= row < b + _PH_ENERGIES:
            return True
    return False


class _Plan:
    """Precomputed snapshot frames of one chip (built once, never reallocated).

    Burst order: DSP_SR1/2 + US_REG1/2 (rows 16..19), the measurement rows 36.., rows
    21..23, then US_REG3 (row 20) last. Rows 18/19 have known values: they prove rows
    16/17 of the same burst are aligned before the sticky status is cleared. US_REG3
    last reports any frame of the pass the chip rejected (CRC, overrun)."""

    def __init__(self, chip, clear_status):
        nch = chip.nch
        rows = SNAP_ROWS_2CH if nch == 2 else SNAP_ROWS_1CH
        self.nch = nch
        self.rows = rows
        self.nrows = len(rows)
        self.clear_status = clear_status
        nhead = _US_REG3 - _DSP_SR1                 # DSP_SR1, DSP_SR2, US_REG1, US_REG2
        bursts = ((_DSP_SR1, nhead), (_DSP_REG14, len(rows) - len(_SNAP_HEAD)),
                  (_DSP_EV1, _DSP_REG1 - _DSP_EV1 + 1), (_US_REG3, 1))
        nf = 1 + len(rows)
        ra = bytearray(b"\xff" * nf)
        wa = bytearray(b"\xff" * nf)
        dst = bytearray(b"\xff" * nf)
        ra[0] = bursts[0][0] * 2
        k = 1
        for bi in range(len(bursts)):
            r0, n = bursts[bi]
            for j in range(n):
                dst[k] = snap_off(r0 + j)
                if j == n - 1 and bi + 1 < len(bursts):
                    ra[k] = bursts[bi + 1][0] * 2   # next burst's address rides here
                k += 1
        wa[nf - 1] = _US_REG3 * 2 + 1        # clear US_REG3 status after reading it
        uart = chip.link.uart_mode
        self.tx = _frames(ra, wa, uart)
        # the same 4 frames after _SR_CHECK, with writes of 0 to DSP_SR1/2 (both halves)
        c0 = _SR_CHECK + 1
        clr = bytes((2 * _DSP_SR1, 2 * _DSP_SR1 + 1, 2 * _DSP_SR2, 2 * _DSP_SR2 + 1))
        self.ctx = _frames(ra[c0:c0 + 4], clr, uart)
        self.dst = bytes(dst)
        self.nframes = nf
        # frames whose row is a counter (PHx_REG1..4) or an RMS row: a 0 there right
        # after a non-zero value is held in doubt until a second pass reads it (_pass)
        zc = bytearray(nf)
        for k in range(1, nf):
            for r in rows:
                if dst[k] == snap_off(r) and _zero_checked(r):
                    zc[k] = 1
        self.zchk = bytes(zc)


class Stpm3x:
    """One STPM32/33/34 on a SpiLink or UartLink."""

    def __init__(self, link, part="STPM34", syn=None, en=None, clock=None):
        if part not in _PARTS:
            raise ValueError("part %r: use one of %s" % (part, ", ".join(_PARTS)))
        self.link = link
        self.part = part
        self.syn = syn
        self.en = en
        self.clock = clock
        self.nch_max = 1 if part == "STPM32" else 2
        self.nch = self.nch_max
        self._sleep = clock.sleep_us_busy if clock is not None else _sleep_us
        link.sleep_us = self._sleep
        self._tbl = _T_UART if link.uart_mode else _T_SPI
        self.crc = True
        self.started = False
        self.shadow = bytearray(80)           # rows 0..19, little endian
        self._tx = bytearray(5)
        self._rx = bytearray(5)
        self._tx4 = memoryview(self._tx)[:4]
        self._rx4 = memoryview(self._rx)[:4]
        self._latch = bytearray(5)
        self._latch4 = memoryview(self._latch)[:4]
        self._sr = bytearray(8)               # sticky status merged across passes
        self._plan = None
        self._ch = [None, None]               # channel configs (for thresholds)
        self._last = ""                       # cause of the last failed exchange
        self._u3_lo = 0                       # US_REG3[15:0] (status masks) as written
        self._loaded = False                  # shadow read from the chip (start/attach)
        self.n_crc = 0
        self.n_bus = 0
        self.n_retry = 0
        self.n_fail = 0
        self.n_noanswer = 0
        self.n_stuck = 0
        self.n_period = 0
        self.n_zero = 0                       # all-0x00 replies the CRC cannot vouch for
        self.n_known = 0                      # known-value (US_REG1) checks that failed
        for r in range(_N_CFG):
            self._put(r, RESET_ROWS[r])

    def __getattr__(self, name):
        # The set-up methods (start-up, serial settings, configure, calibration, restore:
        # drivers/stpm3x_cfg.py METHODS) are looked up there on first use, so that a
        # running meter does not hold their function objects (docs/ram.md).
        if name[:2] != "__":
            import drivers.stpm3x_cfg as cfg
            if name in cfg.METHODS:
                f = getattr(cfg, name)
                return lambda *a, **kw: f(self, *a, **kw)
        raise AttributeError("'Stpm3x' object has no attribute '%s'" % name)

    # ---- counters ----
    @property
    def counters(self):
        l = self.link
        return {"crc": self.n_crc, "bus": self.n_bus, "retries": self.n_retry,
                "failures": self.n_fail, "noanswer": self.n_noanswer,
                "stuck": self.n_stuck, "period": self.n_period,
                "zero": self.n_zero, "known": self.n_known,
                "frames": l.frames, "timeouts": l.timeouts}

    # ---- shadow ----
    def shadow_row(self, row):
        """Last value written to / read from configuration row 0..19."""
        o = 4 * row
        s = self.shadow
        return s[o] | s[o + 1] << 8 | s[o + 2] << 16 | s[o + 3] << 24

    def _put(self, row, v):
        o = 4 * row
        s = self.shadow
        s[o] = v & 0xFF
        s[o + 1] = (v >> 8) & 0xFF
        s[o + 2] = (v >> 16) & 0xFF
        s[o + 3] = (v >> 24) & 0xFF
        if row == _DSP_CR3:
            self._build_latch()

    def _build_latch(self):
        # Software latch: write DSP_CR3[31:16] = shadow | latch1 | latch2 (self-clearing).
        hi = (self.shadow_row(_DSP_CR3) >> 16 & ~_CR3_SELF_HI) | _CR3_LATCH_HI
        b = self._latch
        b[0] = _NOP
        b[1] = _DSP_CR3 * 2 + 1
        b[2] = hi & 0xFF
        b[3] = hi >> 8
        b[4] = crc8(b, self.link.uart_mode)

    # ---- one frame ----
    def _xf(self, ra, wa, data):
        """One frame; reply in self._rx. 0 = ok, 1 = reply CRC bad, 2 = no reply."""
        t = self._tx
        t[0] = ra
        t[1] = wa
        t[2] = data & 0xFF
        t[3] = (data >> 8) & 0xFF
        if self.crc:
            t[4] = crc8(t, self.link.uart_mode)
            n = self.link.xfer(t, self._rx)
            want = 5
        else:
            n = self.link.xfer(self._tx4, self._rx4)
            want = 4
        self._sleep(_GAP_US)
        if n != want:
            self._last = "noanswer"
            return 2
        if want == 5 and crc8(self._rx, self.link.uart_mode) != self._rx[4]:
            self.n_crc += 1
            self._last = "crc"
            return 1
        return 0

    def _reply(self):
        r = self._rx
        return r[0] | r[1] << 8 | r[2] << 16 | r[3] << 24

    def _read_checked(self, first, n):
        """Rows first..first+n-1 as a list, checked beyond the CRC (docs/driver.md, error
        model): US_REG1, whose low half is known (_known_ok), is read in the same burst
        (one more frame unless it is among the rows): a MISO / TX line stuck low reads
        00 00 00 00 00, which passes CRC-8 (init 0), and fails there. A row that reads
        all 0x00 where zero is not its expected value (_zero_doubtful) is taken only
        when _ZERO_READS clean passes read the same. US_REG3 comes last (and is cleared): a frame
        the chip rejected (CRC, overrun) shows up there. Bounded (_TRIES passes, 2 more
        to confirm a 0); every
        failed check is counted, and nothing unchecked is returned."""
        kr = _US_REG1 - first
        extra = not 0 <= kr < n
        nf = n + 1 if extra else n
        prev = None
        seen = 0
        for _ in range(_TRIES + _ZERO_READS - 1):
            vals = []
            doubt = False
            ok = self._xf(first * 2, _NOP, 0xFFFF) != 2
            for j in range(nf):
                if not ok and self._last == "noanswer":
                    break                       # UART silent: don't wait n timeouts
                ra = _US_REG3 * 2 if j == nf - 1 else _US_REG1 * 2 if j == n - 1 else _NOP
                r = self._xf(ra, _NOP, 0xFFFF)
                ok = ok and r == 0
                v = self._reply()
                if r == 0 and j < n and self._zero_doubtful(first + j, v):
                    doubt = True
                vals.append(v)
            if not ok and self._last == "noanswer":
                self.n_retry += 1
                continue
            r = self._xf(_NOP, _US_REG3 * 2 + 1, 0)
            u3 = self._reply()
            if ok and r == 0:
                known = vals.pop() if extra else vals[kr]
                if not self._known_ok(known):
                    self.n_known += 1
                    self._last = "known"
                elif u3 & _US3_CRC_ERRORS:
                    self.n_crc += 1
                    self._last = "crc"
                elif u3 & _US3_BUS_ERRORS:
                    self.n_bus += 1
                    self._last = "bus"
                elif not doubt:
                    return vals
                else:
                    seen = seen + 1 if vals == prev else 1
                    prev = vals
                    if seen >= _ZERO_READS:
                        return vals             # the same zeros read in enough passes
                    self.n_zero += 1
                    self._last = "zero"
            self.n_retry += 1
        self.n_fail += 1
        raise Stpm3xError("STPM3x rows %d..%d: no clean reply after %d tries (%s): %s"
                          % (first, first + n - 1, _TRIES + _ZERO_READS - 1, self._last, self._hint()))

    def _known_ok(self, us1):
        """US_REG1's low half is known whatever the configuration: polynomial 0x07, MSB
        first, CRC enable as the driver speaks (write_row refuses to change them). Any
        other reply (all 0x00 from a line stuck low, a misaligned row) fails."""
        return us1 & _US1_KNOWN == (_US1_POLY | _US1_CRC_EN if self.crc else _US1_POLY)

    def _zero_doubtful(self, row, v):
        """True if `v` (a reply that passed its CRC) is 0 where 0 is not the expected
        value: a configuration row whose shadow is not 0 (the status rows 16/17/20 are
        0 when nothing happened), or any data row (21..69)."""
        if v:
            return False
        if row in (_DSP_SR1, _DSP_SR2, _US_REG3):
            return False
        if row < _N_CFG:
            return self.shadow_row(row) != 0
        return True

    def _hint(self):
        if self._last in ("zero", "known"):
            return ("replies read all 0x00 or another row than asked (MISO / TX stuck low "
                    "or glitching): check wiring, SCS, the chip's power and EN")
        if self._last == "noanswer":
            return ("no answer: check wiring (UART TX/RX crossed, common ground), power, "
                    "EN, and that SCS is high at EN rising edge to select UART")
        if self._last == "crc":
            return ("replies fail CRC: check wiring and signal integrity, SPI mode 3 "
                    "(polarity 1, phase 1) or the UART baud rate")
        return "bus errors reported by the chip: check wiring and signal integrity"

    # ---- public register access ----
    def read_row(self, row):
        """Read row 0..69 (3 frames, checked against US_REG3)."""
        if not 0 <= row < _N_ROWS:
            raise ValueError("row %r: rows are 0..69" % (row,))
        return self._read_checked(row, 1)[0]

    def write_row(self, row, value, verify=True, halves=3):
        """Write row 0..20 (both halves unless `halves` says 1 = low, 2 = high), read it
        back and retry on mismatch. Self-clearing bits of DSP_CR3 are not compared."""
        if not 0 <= row <= _LAST_WRITABLE_ROW:
            raise ValueError("row %r: only rows 0..20 are writable" % (row,))
        value &= 0xFFFFFFFF
        if row == _US_REG1 and (value ^ self.shadow_row(row)) & (_US1_CRC_EN | _US1_LSB_FIRST
                                                                  | _US1_CRC_POLY):
            raise ValueError("US_REG1 CRC enable / bit order / polynomial: use set_crc(); "
                             "the driver speaks CRC-8 poly 0x07, MSB first")
        if row == _US_REG2 and self.link.uart_mode and (value ^ self.shadow_row(row)) & _US2_BAUD:
            raise ValueError("US_REG2 baud rate: use set_baud()")
        vmask = 0xFFFFFFFF & ~_CR3_NOT_COMPARED if row == _DSP_CR3 else 0xFFFFFFFF
        got = None
        for _ in range(_TRIES):
            if halves & 1:
                self._xf(_NOP, row * 2, value & 0xFFFF)
                if row == _US_REG3:
                    self._u3_lo = value & 0xFFFF
            if halves & 2:
                self._xf(_NOP, row * 2 + 1, value >> 16)
            if not verify or row in (_DSP_SR1, _DSP_SR2, _US_REG3):
                if row < _N_CFG:
                    self._put(row, value)
                return
            got = self._read_checked(row, 1)[0]
            want = value
            if halves == 1:
                want = (got & 0xFFFF0000) | (value & 0xFFFF)
            elif halves == 2:
                want = (value & 0xFFFF0000) | (got & 0xFFFF)
            if (got ^ want) & vmask == 0:
                self._put(row, got if row != _DSP_CR3 else want)
                return
            self.n_retry += 1
        self.n_fail += 1
        raise Stpm3xError("STPM3x row %d: wrote 0x%08X, reads back 0x%08X: check wiring "
                          "and signal integrity" % (row, value, got))

    def _rmw(self, row, mask, bits):
        """Read-modify-write on the shadow: write only the halves that change."""
        old = self.shadow_row(row)
        new = (old & ~mask & 0xFFFFFFFF) | (bits & mask)
        d = old ^ new
        halves = (1 if d & 0xFFFF else 0) | (2 if d >> 16 else 0)
        if halves:
            self.write_row(row, new, True, halves)

    # ---- latch + snapshot internals (allocation-free) ----
    def _latch_sw(self):
        if self.crc:
            self.link.xfer(self._latch, self._rx)
        else:
            self.link.xfer(self._latch4, self._rx4)
        self._sleep(_GAP_US)

    def _build_plan(self, clear_status):
        self._plan = _Plan(self, clear_status)
        return self._plan

    def _pass(self, buf, base):
        plan = self._plan
        link = self.link
        sleep = self._sleep
        t = self._tbl
        sh = self.shadow
        dst = plan.dst
        zc = plan.zchk
        f = self._tx                          # each frame is copied in from the plan
        if self.crc:
            v = f
            rx = self._rx
            n = 5
        else:
            v = self._tx4
            rx = self._rx4
            n = 4
        err = 0
        clear = False
        floating = 0
        for k in range(plan.nframes):
            if clear and _SR_CHECK < k <= _SR_CHECK + 4:
                src = plan.ctx
                o = 5 * (k - _SR_CHECK - 1)
            else:
                src = plan.tx
                o = 5 * k
            f[0] = src[o]
            f[1] = src[o + 1]
            f[2] = src[o + 2]
            f[3] = src[o + 3]
            f[4] = src[o + 4]
            if link.xfer(v, rx) != n:
                sleep(_GAP_US)
                self.n_noanswer += 1
                return ST_NOANSWER
            sleep(_GAP_US)
            if k == 0:
                continue                       # reply to the previous request: discard
            b0 = rx[0]
            b1 = rx[1]
            b2 = rx[2]
            b3 = rx[3]
            if n == 5 and t[t[t[t[b0] ^ b1] ^ b2] ^ b3] != rx[4]:
                err |= ST_CRC
                if b0 & b1 & b2 & b3 & rx[4] == 0xFF:
                    floating += 1              # MISO / RX idle high: nobody drives it
                continue
            o = base + dst[k]
            if zc[k] and not (b0 | b1 | b2 | b3) and (buf[o] | buf[o + 1] | buf[o + 2]
                                                      | buf[o + 3]):
                # all 0x00 (CRC 0: what a MISO / TX stuck low sends) where this counter
                # or RMS row was not 0 before: stored, but the pass is repeated; a
                # second pass that reads 0 again finds 0 in buf and takes it
                err |= ST_CRC
                self.n_zero += 1
            buf[o] = b0
            buf[o + 1] = b1
            buf[o + 2] = b2
            buf[o + 3] = b3
            if k == _SR_CHECK:
                # rows 18/19 (offsets 8..15) must equal the shadow: then rows 16/17
                # before them are aligned too and the status can be merged + cleared.
                o = base + _O_US1
                zero = 0
                ones = 0
                for j in range(8):
                    b = buf[o + j]
                    if b == 0:
                        zero += 1
                    elif b == 0xFF:
                        ones += 1
                    if b != sh[_SH_US1 + j]:
                        err |= ST_CONFIG
                if zero == 8 or ones == 8:
                    err |= ST_NOANSWER
                if not err and plan.clear_status:
                    clear = True
                    sr = self._sr
                    for j in range(8):
                        sr[j] |= buf[base + j]
        if floating == plan.nframes - 1:
            self.n_noanswer += 1
            return err | ST_NOANSWER
        # US_REG3 (row 20, offset 16) came last. Bits 15:0 are masks we know: anything
        # else means the frame before was dropped and the slot holds another row.
        o = base + _O_US3
        b2 = buf[o + 2]
        b3 = buf[o + 3]
        if buf[o] != self._u3_lo & 0xFF or buf[o + 1] != self._u3_lo >> 8:
            err |= ST_CONFIG
        elif b2 & _U3_CRC_B2 or b3 & _U3_CRC_B3:
            err |= ST_CRC
        elif b2 & _U3_BUS_B2 or b3 & _U3_BUS_B3:
            err |= ST_BUS
        return err

    def _snapshot_into(self, buf, base, relatch):
        st = 0
        tries = 0
        while tries < _SNAP_TRIES:
            if tries:
                self.n_retry += 1
                if relatch:
                    self._latch_sw()           # the latch frame itself may have been lost
            tries += 1
            e = self._pass(buf, base)
            st |= e
            if e & ST_CRC:
                self.n_crc += 1
            if e & ST_BUS:
                self.n_bus += 1
            if not e & _PASS_BAD:
                break
        else:
            self.n_fail += 1
            return st | ST_FAIL
        if tries > 1:
            st |= ST_RETRY
        if self._plan.clear_status:
            sr = self._sr                      # status since the previous snapshot
            for j in range(8):
                buf[base + j] = sr[j]
                sr[j] = 0
        # stuck sigma-delta: bit 20 (current) / 24 (voltage); period error: bit 25
        s2 = buf[base + 2]                     # DSP_SR1 bits 23:16, 31:24
        s3 = buf[base + 3]
        if self._plan.nch == 2:
            s2 |= buf[base + 6]                # DSP_SR2
            s3 |= buf[base + 7]
        if s2 & _SR_STUCK_B2 or s3 & _SR_STUCK_B3:
            st |= ST_STUCK
            self.n_stuck += 1
        if s3 & _SR_PER_B3:
            st |= ST_PERIOD
            self.n_period += 1
        return st


class ChipGroup:
    """All chips of a meter: one latch, one snapshot into one preallocated buffer.
    Build it after configure(): the layout (2 or 1 channels per chip) is fixed here."""

    def __init__(self, chips, syn=None, clock=None, clear_status=True):
        chips = tuple(chips)
        if not 1 <= len(chips) <= 29:
            raise ValueError("ChipGroup takes 1..29 chips, got %d" % len(chips))
        self.chips = chips
        self.n = len(chips)
        self.syn = syn
        self.clear_status = clear_status
        # A hardware latch needs every SCS high, and (on UART) an SCS pulse afterwards to
        # reset the SYN pulse counter; without an SCS pin fall back to the software latch.
        hw = syn is not None
        for c in chips:
            if c.link.uart_mode and c.link.scs is None:
                hw = False
        self.hw_latch = hw
        self._sleep = clock.sleep_us_busy if clock is not None else (
            chips[0]._sleep if chips else _sleep_us)
        self._uart_scs = tuple(c.link.scs for c in chips if c.link.uart_mode and hw)
        base = []
        off = 0
        for c in chips:
            p = c._build_plan(clear_status)
            base.append(off)
            off += 4 * p.nrows
        self.base = tuple(base)
        self.rows = tuple(c._plan.rows for c in chips)
        self.buf = bytearray(off)
        self.status = bytearray(self.n)
        self.row_off = SNAP_OFF
        self.frames_last = 0
        self.latch_frames_last = 0
        self.mask_last = 0
        if hw:
            syn.value(1)

    def latch(self):
        """Latch all chips: one SYN pulse (same instant for every phase) or, without
        SYN, the software latch (DSP_CR3 bits 21 + 22) chip by chip."""
        sleep = self._sleep
        if self.hw_latch:
            syn = self.syn
            syn.value(0)
            sleep(_LATCH_US)
            syn.value(1)
            scs = self._uart_scs
            for i in range(len(scs)):          # reset the SYN pulse counter (UART)
                sleep(_GAP_US)
                scs[i].value(0)
                sleep(_GAP_US)
                scs[i].value(1)
            sleep(_GAP_US)
            self.latch_frames_last = 0
        else:
            chips = self.chips
            for i in range(self.n):
                chips[i]._latch_sw()
            self.latch_frames_last = self.n

    def snapshot(self):
        """Read every chip's snapshot rows into self.buf. Returns the mask of chips
        whose block is invalid (bit i = chip i; 0 = all good). Allocation-free."""
        buf = self.buf
        base = self.base
        chips = self.chips
        relatch = not self.hw_latch
        mask = 0
        frames = 0
        for i in range(self.n):
            c = chips[i]                       # layout = c._plan, fixed at construction
            link = c.link
            f0 = link.frames
            st = c._snapshot_into(buf, base[i], relatch)
            frames += (link.frames - f0) & 0x3FFFFFFF
            self.status[i] = st
            if st & ST_FAIL:
                mask |= 1 << i
        self.frames_last = frames
        self.mask_last = mask
        return mask
