# Byte-exact STPM32/33/34 register-map simulator (host only: CPython and the
# MicroPython unix port).
#
# Frame processing, pin edges and latching allocate nothing on MicroPython: the
# firmware's acquire path is tested under micropython.heap_lock() with this chip on
# the other end of the bus. Everything that may allocate (physics, events) happens
# in advance_to(). Choices where the reference is silent or "unconfirmed" are the
# constants just below; docs/simulator.md lists them with the reason.
from array import array

from sim import physics
from sim.regmap import M

# --- choices on unconfirmed points (one place; see docs/simulator.md) --------------
# Read pointer after row 69 when the read address is 0xFF: wraps to row 0.
PTR_AFTER_LAST = 0
# A frame whose CRC is wrong is dropped whole: no write, and the read pointer keeps
# its old row, so the next reply carries that old row instead of the one asked for.
# An odd or too-high read address also leaves the pointer where it was.
# DSP_CR3 bit 20 (SW reset) restores rows 0..15 (DSP/DFE configuration, IRQ masks);
# serial rows (US_REG1..3), status and data rows are kept.
SW_RESET_LAST_ROW = M.DSP_IRQ2          # row 15
# The SYN pulse counter is cleared by an SCS falling edge, by every completed frame
# (either interface) and by EN. Pulses count only while SCS is high.
# Sticky status (DSP_SR1/2, US_REG3 bits 31:16): a write ANDs the half, so writing 0
# clears and writing 1 keeps a bit (a write can never set a status bit).
# UART: the gap between two host write() calls counts as longer than the RX timeout:
# a partial frame left at the start of a write() is dropped (US_REG3 timeout bit).
# UART: the reply to a frame that changes US_REG2 is sent at the new baud rate.
# Baud match tolerance host vs chip, percent: UART 8N1 tolerates a few percent.
BAUD_TOLERANCE_PCT = 3
# US_REG1 bit 15 (LSB-first) reverses every byte on the SPI shift register; the CRC
# is computed over the logical (reversed back) bytes.

# Rows, fields and status bits by datasheet name: the firmware's register map
# (firmware/drivers/stpm3x_map.py), so both sides speak of the same rows with the same
# names; this file's *behaviour* is written from the datasheet on its own
# (docs/decisions/0005-one-register-map.md).

N_ROWS = M.N_ROWS
PARTS = ("STPM32", "STPM33", "STPM34")
LAST_WRITE_ADDR = 2 * M.LAST_WRITABLE_ROW + 1     # rows 0..20 writable
LAST_READ_ADDR = 2 * (M.N_ROWS - 1)
FIRST_DATA_ROW = M.FIRST_DATA_ROW                  # rows 21..69: live -> latched
# kept as module names: tests and the bus use them
DSP_CR3 = M.DSP_CR3
DSP_SR1 = M.DSP_SR1
DSP_SR2 = M.DSP_SR2
US_REG1 = M.US_REG1
US_REG2 = M.US_REG2
US_REG3 = M.US_REG3
US3_UART_CRC = M.US3_UART_CRC
US3_TIMEOUT = M.US3_UART_TIMEOUT
US3_FRAME = M.US3_UART_FRAME
US3_RD_ADDR = M.US3_RD_ADDR
US3_WR_ADDR = M.US3_WR_ADDR
US3_SPI_CRC = M.US3_SPI_CRC
_CRC_EN = M.US1_CRC_EN
_LSB_FIRST = M.US1_LSB_FIRST
_CRC_POLY = M.US1_CRC_POLY
_CR3_SW_RESET = M.CR3_SW_RESET
_CR3_LATCH = M.CR3_LATCH1 | M.CR3_LATCH2
_CR3_KEEP = 0xFFFFFFFF & ~M.CR3_SELF_CLEAR       # SW reset and latch bits clear themselves
_CR3_AUTO_LATCH = M.CR3_AUTO_LATCH

RESET_VALUES = M.RESET_ROWS + (0,) * (M.N_ROWS - len(M.RESET_ROWS))

REG_NAMES = (
    "DSP_CR1", "DSP_CR2", "DSP_CR3", "DSP_CR4", "DSP_CR5", "DSP_CR6", "DSP_CR7",
    "DSP_CR8", "DSP_CR9", "DSP_CR10", "DSP_CR11", "DSP_CR12", "DFE_CR1", "DFE_CR2",
    "DSP_IRQ1", "DSP_IRQ2", "DSP_SR1", "DSP_SR2", "US_REG1", "US_REG2", "US_REG3",
    "DSP_EV1", "DSP_EV2", "DSP_REG1", "DSP_REG2", "DSP_REG3", "DSP_REG4", "DSP_REG5",
    "DSP_REG6", "DSP_REG7", "DSP_REG8", "DSP_REG9", "DSP_REG10", "DSP_REG11",
    "DSP_REG12", "DSP_REG13", "DSP_REG14", "DSP_REG15", "DSP_REG16", "DSP_REG17",
    "DSP_REG18", "DSP_REG19",
) + tuple("PH1_REG%d" % (i + 1) for i in range(12)) \
  + tuple("PH2_REG%d" % (i + 1) for i in range(12)) \
  + tuple("TOT_REG%d" % (i + 1) for i in range(4))

# Bit reversal of a byte (UART CRC variant, LSB-first SPI).
REV8 = bytearray(256)
for _i in range(256):
    _r = 0
    for _b in range(8):
        if _i & (1 << _b):
            _r |= 0x80 >> _b
    REV8[_i] = _r


def crc_table(poly, tab=None):
    """CRC-8 (MSB first, init 0) lookup table for `poly`; refills `tab` if given."""
    if tab is None:
        tab = bytearray(256)
    for i in range(256):
        c = i
        for _ in range(8):
            c = ((c << 1) ^ poly) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        tab[i] = c
    return tab


def crc8(data, poly=0x07, uart=False):
    """CRC of a frame's bytes as the chip computes it (SPI or UART variant)."""
    tab = crc_table(poly)
    c = 0
    if uart:
        for b in data:
            c = tab[c ^ REV8[b]]
        return REV8[c]
    for b in data:
        c = tab[c ^ b]
    return c


def baud_reg(baud):
    """US_REG2[15:0] value for a baud rate (16 MHz / 16, 4 fraction bits)."""
    div = 16000000 / (16 * baud)
    whole = int(div)
    frac = int((div - whole) * 16 + 0.5)
    if frac == 16:
        whole, frac = whole + 1, 0
    return (whole << 4) | frac


def reg_baud(reg):
    """Baud rate a US_REG2[15:0] value produces."""
    reg &= 0xFFFF
    return 16000000 / reg if reg else 0


def frame(read_addr, write_addr=0xFF, data=0xFFFF, crc=True, uart=False, poly=0x07):
    """Host-side frame bytes (helper for tests)."""
    b = bytearray((read_addr, write_addr, data & 0xFF, (data >> 8) & 0xFF))
    if crc:
        b.append(crc8(b, poly, uart))
    return b


class Chip:
    """One STPM3x. Registers: `regs` (what a read returns: config, sticky status and
    the latched data rows) and `live` (data rows as the DSP computes them; captured
    into `regs` on each latch)."""

    def __init__(self, part="STPM34", seed=0, interface="spi", mains_hz=50):
        if part not in PARTS:
            raise ValueError("unknown part %r: use one of %s" % (part, ", ".join(PARTS)))
        self.part = part
        self.n_ch = 1 if part == "STPM32" else 2
        self.regs = array("I", RESET_VALUES)
        self.live = array("I", RESET_VALUES)
        self.pend_sr = array("I", (0, 0))     # status waiting for the next latch
        self.ptr = 0
        self._rx = bytearray(5)
        self._rxn = 0
        self._tx = bytearray(5)
        self._txi = 0
        self._crc_tab = crc_table(0x07)
        self._poly = 0x07
        # UART reply queue (ring)
        self._uq = bytearray(64)
        self._uq_head = 0
        self._uq_n = 0
        # pins and supply: the chip runs while it has a supply (vdd) and EN is high
        self.interface = interface            # "spi" / "uart", chosen at power-up / EN
        self.vdd = True
        self.en_level = 1
        self.powered = True
        self.resets = 0                       # power-on, EN, SYN global resets (tests)
        self.sw_resets = 0
        # Called with force=True/False before anything that changes what the chip
        # integrates or latches, so that physics first runs up to "now" (SimBoard sets
        # it; a bare Chip has no time source). force=False may skip a short lag: it sits
        # on the firmware's allocation-free latch path.
        self._sync = None
        self._scs = 1
        self._syn = 1
        self.syn_count = 0
        # fault injection
        self.hung = False      # serial port stuck until a hardware reset (tests)
        self.dead = False
        self.dead_byte = 0xFF
        self._rng = (seed * 2654435761 + 12345) & 0x7FFFFFFF or 1
        self._err_thr = 0
        self._rx_err_thr = 0
        self._corrupt_n = 0
        self._rx_corrupt_n = 0
        # statistics for tests
        self.frames = 0
        self.crc_errors = 0
        self.latches = 0
        # physics (channel models, energy accumulators, events)
        self.phys = physics.Physics(self, seed=seed, mains_hz=mains_hz)
        self.reset()

    # --- fault knobs ----------------------------------------------------------------
    @property
    def crc_error_rate(self):
        return self._err_thr / 2147483648.0

    @crc_error_rate.setter
    def crc_error_rate(self, rate):
        """Probability that a reply has one bit flipped after its CRC was computed."""
        self._err_thr = int(min(max(rate, 0.0), 1.0) * 2147483648.0)

    @property
    def rx_error_rate(self):
        return self._rx_err_thr / 2147483648.0

    @rx_error_rate.setter
    def rx_error_rate(self, rate):
        """Probability that a received frame arrives with one bit flipped."""
        self._rx_err_thr = int(min(max(rate, 0.0), 1.0) * 2147483648.0)

    def corrupt_next(self, n=1):
        """Flip one bit in each of the next n replies (after the CRC was computed),
        starting with the reply already loaded for the next frame."""
        if n > 0:
            self._tx[self._rand() & 3] ^= 1 << (self._rand() & 7)
        self._corrupt_n = n - 1 if n > 0 else 0

    def corrupt_next_rx(self, n=1):
        """Flip one bit in each of the next n frames the chip receives."""
        self._rx_corrupt_n = n

    def _rand(self):
        self._rng = (self._rng * 1103515245 + 12345) & 0x7FFFFFFF
        return self._rng

    # --- resets -----------------------------------------------------------------------
    def reset(self):
        """Global reset (power-up, EN rising edge, 3 SYN pulses): every row to its
        reset value, CRC on with poly 0x07, read pointer at row 0."""
        regs = self.regs
        live = self.live
        for r in range(N_ROWS):
            regs[r] = RESET_VALUES[r]
            live[r] = RESET_VALUES[r]
        self.pend_sr[0] = 0
        self.pend_sr[1] = 0
        if self._poly != 0x07:
            self._poly = 0x07
            crc_table(0x07, self._crc_tab)
        self.ptr = 0
        self._rxn = 0
        self._uq_n = 0
        self.syn_count = 0
        self.resets += 1
        self.hung = False
        self.phys.reset_measure()
        self._load_reply()

    def reset_measure(self):
        """Reset of the measurement (data) rows: 2 SYN pulses."""
        regs = self.regs
        live = self.live
        for r in range(FIRST_DATA_ROW, N_ROWS):
            regs[r] = RESET_VALUES[r]
            live[r] = RESET_VALUES[r]
        self.phys.reset_measure()

    def sw_reset(self):
        """DSP_CR3 bit 20: configuration rows back to reset values; serial settings,
        status and the data rows (the energy counters) are kept."""
        self.sw_resets += 1
        regs = self.regs
        for r in range(SW_RESET_LAST_ROW + 1):
            regs[r] = RESET_VALUES[r]

    def latch(self):
        """Capture the live data rows and pending status into the readable rows."""
        regs = self.regs
        live = self.live
        for r in range(FIRST_DATA_ROW, N_ROWS):
            regs[r] = live[r]
        regs[DSP_SR1] |= self.pend_sr[0]
        regs[DSP_SR2] |= self.pend_sr[1]
        self.pend_sr[0] = 0
        self.pend_sr[1] = 0
        self.latches += 1

    # --- pins and supply ---------------------------------------------------------------
    def _catch_up(self, force):
        if self._sync is not None:
            self._sync(force)

    def set_en(self, level):
        level = 1 if level else 0
        if level == self.en_level:
            return
        self._catch_up(True)
        self.en_level = level
        self._power()

    def set_supply(self, on):
        """The chip's supply (power cut / restore): like EN, a rising edge is a power-on
        reset that samples SCS to choose the interface."""
        on = bool(on)
        if on == self.vdd:
            return
        self._catch_up(True)
        self.vdd = on
        self._power()

    def _power(self):
        # EN low (or no supply) wipes the configuration and the counters; the rising
        # edge is a power-on reset and samples SCS to choose the interface (DS10272).
        on = 1 if (self.vdd and self.en_level) else 0
        if on == self.powered:
            return
        self.powered = on
        self.reset()
        if on:
            self.interface = "spi" if self._scs == 0 else "uart"

    def set_scs(self, level):
        level = 1 if level else 0
        if level == self._scs:
            return
        self._scs = level
        if not self.powered:
            return
        if level == 0:
            self.syn_count = 0
            self._rxn = 0          # frame starts; reply already loaded
            self._txi = 0
        else:
            self._rxn = 0          # SCS high mid-frame: partial frame dropped
            self._txi = 0

    def set_syn(self, level):
        level = 1 if level else 0
        if level == self._syn:
            return
        self._syn = level
        if not self.powered or not self._scs or not level:
            return
        # rising edge (end of the pulse) with SCS high
        n = self.syn_count + 1
        self._catch_up(n >= 2)
        self.syn_count = n
        self.latch()
        if n == 2:
            self.reset_measure()
        elif n >= 3:
            self.reset()
            self.syn_count = 0

    # --- framing ----------------------------------------------------------------------
    def crc_on(self):
        return 1 if self.regs[US_REG1] & _CRC_EN else 0

    def frame_len(self):
        return 5 if self.regs[US_REG1] & _CRC_EN else 4

    def _load_reply(self):
        """Load the reply to the next frame: the row at the pointer (after the write)."""
        v = self.regs[self.ptr]
        tx = self._tx
        tx[0] = v & 0xFF
        tx[1] = (v >> 8) & 0xFF
        tx[2] = (v >> 16) & 0xFF
        tx[3] = (v >> 24) & 0xFF
        tx[4] = 0
        if self.regs[US_REG1] & _CRC_EN:
            tab = self._crc_tab
            c = 0
            if self.interface == "uart":
                for i in range(4):
                    c = tab[c ^ REV8[tx[i]]]
                c = REV8[c]
            else:
                for i in range(4):
                    c = tab[c ^ tx[i]]
            tx[4] = c
        if self._corrupt_n > 0:
            self._corrupt_n -= 1
            tx[self._rand() & 3] ^= 1 << (self._rand() & 7)
        elif self._err_thr and self._rand() < self._err_thr:
            tx[self._rand() & 3] ^= 1 << (self._rand() & 7)
        self._txi = 0

    def _process(self, n):
        """One complete frame in self._rx (n bytes): check CRC, write, move pointer."""
        rx = self._rx
        regs = self.regs
        self.frames += 1
        self.syn_count = 0
        if self._rx_corrupt_n > 0:
            self._rx_corrupt_n -= 1
            rx[self._rand() % n] ^= 1 << (self._rand() & 7)
        elif self._rx_err_thr and self._rand() < self._rx_err_thr:
            rx[self._rand() % n] ^= 1 << (self._rand() & 7)
        if n == 5:
            tab = self._crc_tab
            c = 0
            if self.interface == "uart":
                for i in range(4):
                    c = tab[c ^ REV8[rx[i]]]
                c = REV8[c]
            else:
                for i in range(4):
                    c = tab[c ^ rx[i]]
            if c != rx[4]:
                self.crc_errors += 1
                regs[US_REG3] |= US3_UART_CRC if self.interface == "uart" else US3_SPI_CRC
                self._load_reply()
                return
        ra = rx[0]
        wa = rx[1]
        if wa != 0xFF:
            if wa <= LAST_WRITE_ADDR:
                self._write_half(wa, rx[2] | (rx[3] << 8))
            else:
                regs[US_REG3] |= US3_WR_ADDR
        if ra == 0xFF:
            p = self.ptr + 1
            self.ptr = PTR_AFTER_LAST if p >= N_ROWS else p
        elif ra & 1 or ra > LAST_READ_ADDR:
            regs[US_REG3] |= US3_RD_ADDR
        else:
            self.ptr = ra >> 1
        self._load_reply()

    def _write_half(self, wa, data):
        row = wa >> 1
        regs = self.regs
        high = wa & 1
        if high:
            val = data << 16
            keep = 0x0000FFFF
        else:
            val = data
            keep = 0xFFFF0000
        if row == DSP_SR1 or row == DSP_SR2 or (row == US_REG3 and high):
            regs[row] &= val | keep            # sticky: write 0 clears
            return
        if row < DSP_SR1:
            # configuration (gain, calibration, enables, offsets): physics integrates up
            # to now under the old setting first. A write that only latches (DSP_CR3
            # latch bits, the software latch of every read) need not catch up exactly.
            new = (regs[row] & keep) | val
            d = new ^ regs[row]
            if row == DSP_CR3:
                if new & _CR3_SW_RESET or d & _CR3_KEEP:
                    self._catch_up(True)
                elif new & _CR3_LATCH:
                    self._catch_up(False)
            elif d:
                self._catch_up(True)
        regs[row] = (regs[row] & keep) | val
        if row == DSP_CR3 and high:
            v = regs[DSP_CR3]
            if v & _CR3_SW_RESET:
                self.sw_reset()
            if v & _CR3_LATCH:
                self.latch()
            regs[DSP_CR3] &= _CR3_KEEP
        elif row == US_REG1 and not high:
            poly = regs[US_REG1] & _CRC_POLY
            if poly != self._poly:
                self._poly = poly
                crc_table(poly, self._crc_tab)

    # --- SPI --------------------------------------------------------------------------
    def spi_byte(self, b):
        """Exchange one byte while SCS is low; returns the byte the chip drives."""
        if self.dead:
            return self.dead_byte
        if not self.powered or self.interface != "spi" or self._scs or self.hung:
            return 0xFF
        lsb_first = self.regs[US_REG1] & _LSB_FIRST
        flen = 5 if self.regs[US_REG1] & _CRC_EN else 4
        i = self._txi
        out = self._tx[i] if i < flen else 0xFF
        self._txi = i + 1
        if lsb_first:
            out = REV8[out]
            b = REV8[b]
        n = self._rxn
        self._rx[n] = b
        n += 1
        if n >= flen:
            self._rxn = 0
            self._process(n)
        else:
            self._rxn = n
        return out

    def spi_next_reply(self, rx, n):
        """What spi_byte will return during the next frame of n bytes if nothing reaches
        the chip first: the reply was loaded at the end of the previous frame. Changes no
        state. False when it cannot tell (n longer than a frame). The board bridge
        (sim/bridge.py) uses it to answer the firmware a frame ahead."""
        flen = 5 if self.regs[US_REG1] & _CRC_EN else 4
        if n > flen:
            return False
        if self.dead or not self.powered or self.interface != "spi":
            v = self.dead_byte if self.dead else 0xFF
            for i in range(n):
                rx[i] = v
            return True
        lsb_first = self.regs[US_REG1] & _LSB_FIRST
        for i in range(n):
            rx[i] = REV8[self._tx[i]] if lsb_first else self._tx[i]
        return True

    def spi_frame(self, tx, rx):
        """One whole SPI frame (SCS low, len(tx) bytes, SCS high); reply into rx."""
        self.set_scs(0)
        for i in range(len(tx)):
            rx[i] = self.spi_byte(tx[i])
        self.set_scs(1)

    # --- UART -------------------------------------------------------------------------
    def baud(self):
        """Baud rate the chip's UART uses now (from US_REG2)."""
        return reg_baud(self.regs[US_REG2])

    def uart_gap(self):
        """The line was idle longer than the RX timeout: drop a partial frame."""
        if self._rxn:
            self._rxn = 0
            self.regs[US_REG3] |= US3_TIMEOUT

    def uart_garbled(self):
        """A byte arrived at the wrong baud rate: framing error, byte lost."""
        if self.powered and self.interface == "uart" and not self.dead:
            self.regs[US_REG3] |= US3_FRAME

    def uart_rx(self, b):
        """One byte received by the chip's UART. A complete frame queues its reply."""
        if self.dead or self.hung or not self.powered or self.interface != "uart":
            if self.dead and self.dead_byte == 0:
                self._uq_push(0)     # a shorted line reads as zeros / breaks
            return
        n = self._rxn
        self._rx[n] = b
        n += 1
        flen = 5 if self.regs[US_REG1] & _CRC_EN else 4
        if n >= flen:
            self._rxn = 0
            # The reply loaded at the end of the previous frame goes out now (the
            # bus checks the baud rate after processing: a frame that changes
            # US_REG2 gets its reply at the new rate).
            tx = self._tx
            for i in range(flen):
                self._uq_push(tx[i])
            self._process(n)
        else:
            self._rxn = n

    def _uq_push(self, b):
        q = self._uq
        if self._uq_n < len(q):
            q[(self._uq_head + self._uq_n) % len(q)] = b
            self._uq_n += 1

    def uart_any(self):
        return self._uq_n

    def uart_read_byte(self):
        """Next reply byte the chip transmits, or -1."""
        if not self._uq_n:
            return -1
        b = self._uq[self._uq_head]
        self._uq_head = (self._uq_head + 1) % len(self._uq)
        self._uq_n -= 1
        return b

    # --- physics ----------------------------------------------------------------------
    def advance_to(self, now_us, load=None, t0_us=0):
        """Integrate the physics up to now_us (may allocate). `load` is a profile
        (sim/loads.py) whose time 0 is t0_us; channels pick their phase from it."""
        self.phys.advance_to(now_us, load, t0_us)

    def exact_energy_wh(self, ch=0):
        return self.phys.exact_energy_wh(ch)
