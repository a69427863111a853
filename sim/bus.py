# Fakes of machine.Pin / machine.SPI / machine.UART wired to simulated STPM3x chips.
# A board's CHIPS tuple (docs/architecture.md, Boards) describes the chips; the fakes
# behave like the wires: one shared SPI bus answered by the chip whose SCS is low,
# SYN pins tied together, one UART per chip. Byte exchange, pin edges and latching
# allocate nothing on MicroPython (UART.read() and SPI.read() return new bytes, as on
# a board: use readinto()).
from sim import stpm3x
from sim import loads
from sim.hwapi import PinBase, SPIBase, UARTBase, PIN_SCS, PIN_EN, PIN_SYN  # noqa: F401


class SimPin(PinBase):
    """machine.Pin look-alike. Output level changes are edges seen by the chips."""

    def __init__(self, board, kind, index, value=1):
        self._board = board
        self._kind = kind
        self._index = index
        self._v = value
        self.edges = 0                 # count of level changes, for tests

    def value(self, v=None):
        if v is None:
            return self._v
        v = 1 if v else 0
        if v != self._v:
            self._v = v
            self.edges += 1
            self._board._edge(self._kind, self._index, v)
        return None


class SimSPI(SPIBase):
    """machine.SPI look-alike on the shared bus. No SCS low: reads 0xFF."""

    def __init__(self, board):
        SPIBase.__init__(self)
        self._board = board
        self.bytes = 0

    def _xchg(self, b):
        out = 0xFF
        for c in self._board.chips:
            if not c._scs:
                out &= c.spi_byte(b)
        self.bytes += 1
        return out

    def write_readinto(self, wbuf, rbuf):
        for i in range(len(wbuf)):
            rbuf[i] = self._xchg(wbuf[i])

    def write(self, buf):
        for i in range(len(buf)):
            self._xchg(buf[i])

    def readinto(self, buf, write=0x00):
        for i in range(len(buf)):
            buf[i] = self._xchg(write)


class SimUART(UARTBase):
    """machine.UART look-alike wired to one chip. The chip hears bytes only when the
    host baud rate matches its US_REG2 rate, and its replies reach the host only at
    a matching rate; otherwise they are lost (counted in `lost`)."""

    def __init__(self, board, index, baudrate=9600):
        UARTBase.__init__(self, baudrate)
        self._board = board
        self._chip = board.chips[index]
        self.lost = 0

    def baud(self):
        """The chip's current baud rate (US_REG2): check it switched."""
        return self._chip.baud()

    def _match(self):
        # integer compare (no float boxing on the byte path): host baud * US_REG2
        # against 16 MHz, within BAUD_TOLERANCE_PCT percent
        reg = self._chip.regs[stpm3x.US_REG2] & 0xFFFF
        d = self.baudrate * reg - 16000000
        if d < 0:
            d = -d
        return reg != 0 and d * 100 <= 16000000 * stpm3x.BAUD_TOLERANCE_PCT

    def write(self, buf):
        chip = self._chip
        chip.uart_gap()                 # a new write() starts after an idle gap
        for i in range(len(buf)):
            if self._match():
                chip.uart_rx(buf[i])
            else:
                chip.uart_garbled()
            while chip.uart_any():
                b = chip.uart_read_byte()
                if not (self._match() and self.rx.put(b)):
                    self.lost += 1
        return len(buf)


# Lag (us) under which a latch may skip the physics catch-up: a latch sits on the
# firmware's allocation-free path, right after a sleep_ms whose hook brought physics up
# to date (the latch pulse itself is 10 us). Resets, EN / supply edges and
# configuration writes always catch up.
SYNC_MIN_US = 50


class SimBoard:
    """Simulated meter board: chips built from a board's CHIPS tuple, wired to fake
    pins and buses, driven by a load profile.

    Power-up is the instant the board is built (the clock's now): from then on the chips
    integrate with simulated time, through the MCU's boot, resets and configuration, at
    whatever gain their registers hold at each instant. EN lines: `CHIPS[i]["en"]` names
    the EN line of chip i (chips with the same number share one pin, as on the field
    board); without it each chip has its own. `scs_powerup`: the SCS level the chips see
    at power-up (1 = pulled up while the MCU boots: UART mode until an EN edge with SCS
    low); None = every chip starts in `interface`."""

    def __init__(self, chips_cfg, interface="spi", mains_hz=50, profile=None, seed=0,
                 clock=None, errors=False, scs_powerup=None):
        if interface not in ("spi", "uart"):
            raise ValueError("interface must be 'spi' or 'uart', not %r" % (interface,))
        self.interface = interface
        self.mains_hz = mains_hz
        self.chips = []
        self._phase_map = {}
        for i, cfg in enumerate(chips_cfg):
            chip = stpm3x.Chip(cfg.get("part", "STPM34"), seed=seed * 131 + i,
                               interface=interface, mains_hz=mains_hz)
            chs = cfg.get("ch", ())
            if len(chs) > chip.n_ch:
                raise ValueError("chip %d (%s) has %d channels, CHIPS gives %d"
                                 % (i, chip.part, chip.n_ch, len(chs)))
            for j, ch in enumerate(chs):
                chip.phys.set_channel(j, ch)
                ph = ch.get("phase")
                if ph is not None:
                    self._phase_map[ph] = (i, j)
            if errors:
                chip.phys.randomise_errors(seed * 131 + i)
            self.chips.append(chip)
        n = len(self.chips)
        # EN wiring: line of each chip; one pin per line
        self.en_line = [cfg.get("en", i) for i, cfg in enumerate(chips_cfg)]
        lines = sorted(set(self.en_line))
        if lines != list(range(len(lines))):
            raise ValueError("CHIPS 'en' numbers must be 0..%d, got %r"
                             % (len(lines) - 1, self.en_line))
        if scs_powerup is not None:
            for chip in self.chips:
                chip.interface = "spi" if scs_powerup == 0 else "uart"
        self.scs = [SimPin(self, PIN_SCS, i, 1) for i in range(n)]
        self.en = [SimPin(self, PIN_EN, k, 1) for k in range(len(lines))]
        self.syn = SimPin(self, PIN_SYN, 0, 1)
        self.spi = SimSPI(self)
        self.uarts = [SimUART(self, i) for i in range(n)]
        self.clock = clock
        t0 = clock.now_us() if clock is not None and hasattr(clock, "now_us") else 0
        epoch0 = clock.time() if clock is not None else loads.DEFAULT_EPOCH
        self.t0_us = t0
        if profile is None:
            profile = "constant"
        if isinstance(profile, str):
            kw = {}
            if profile == "fullscale":
                kw = self.fullscale()
            profile = loads.make(profile, phases=max([3] + list(self._phase_map)),
                                 seed=seed, mains_hz=mains_hz, epoch0=epoch0, **kw)
        self.load = profile
        for chip in self.chips:
            chip.phys.t_us = t0
            if clock is not None and hasattr(clock, "now_us"):
                chip._sync = self._sync
        if clock is not None and hasattr(clock, "hooks"):
            clock.hooks.append(self.advance_to)

    def _sync(self, force):
        """Physics up to the clock's present instant (a chip calls this before a reset,
        a configuration change or a latch). A ScaledClock first catches up with real
        time (its hooks integrate); a StepClock's time moved by sleep_us_busy."""
        clock = self.clock
        now = clock.now_us()
        if not force:
            lag = now - self.chips[0].phys.t_us
            if lag < SYNC_MIN_US:
                return
            try:
                self.advance_to(now)
            except MemoryError:
                # the firmware's heap is locked (its allocation-free latch path): physics
                # fails at its first allocation, before it changes any state; it catches
                # up at the next sleep_ms instead
                pass
            return
        step = getattr(clock, "step", None)
        if step is not None:
            step()                  # runs the hooks, advance_to among them
        else:
            self.advance_to(now)

    def _edge(self, kind, index, v):
        if kind == PIN_SCS:
            self.chips[index].set_scs(v)
        elif kind == PIN_SYN:
            for c in self.chips:
                c.set_syn(v)
        else:
            for i in range(len(self.chips)):    # every chip on this EN line
                if self.en_line[i] == index:
                    self.chips[i].set_en(v)

    def power(self, on):
        """Supply of the whole board on or off (a power cut): the chips lose
        configuration and counters; at power-up each chooses its interface from its SCS
        level (the MCU is down too, so the caller puts SCS where the board's pull-ups
        hold it)."""
        for c in self.chips:
            c.set_supply(on)

    def fullscale(self):
        """Voltage and current near the full scale of the first channel."""
        ch = self.chips[0].phys.ch[0]
        return {"v_rms": 0.9 * ch.v_full(), "i_rms": 0.9 * ch.i_full()}

    def advance_to(self, now_us):
        """Integrate every chip's physics up to now_us (absolute virtual us)."""
        for chip in self.chips:
            chip.phys.advance_to(now_us, self.load, self.t0_us)

    def set_load(self, profile):
        """Switch the load now: integrate up to the clock's present instant with the
        old load first (assigning `load` directly would apply the new load to the
        time since the last hook)."""
        if self.clock is not None and hasattr(self.clock, "now_us"):
            self.advance_to(self.clock.now_us())
        self.load = profile

    def channel(self, phase):
        """(chip index, channel index) measuring `phase`."""
        if phase not in self._phase_map:
            raise ValueError("no channel measures phase %r" % (phase,))
        return self._phase_map[phase]

    def exact_energy_wh(self, phase):
        """True physical energy of a phase: dict(ai, ae, rq1..rq4, ap) in Wh/varh/VAh."""
        i, j = self.channel(phase)
        return self.chips[i].phys.exact_energy_wh(j)

    def events(self):
        """Sag/swell events of every chip: (t_us, kind, phase, value), by time."""
        out = []
        for i, chip in enumerate(self.chips):
            for t, kind, j, value in chip.phys.events:
                out.append((t, kind, chip.phys.ch[j].phase, value))
        out.sort(key=lambda e: e[0])
        return out

    def pulse_syn(self):
        """One SYN pulse (low then high): latches every chip whose SCS is high and
        counts towards the 2-pulse (measurement reset) / 3-pulse (global reset)."""
        self.syn.value(0)
        self.syn.value(1)

    def latch(self):
        """What a driver does to latch: one SYN pulse, then an SCS pulse on every
        chip so that the next latch counts as a first pulse again."""
        self.pulse_syn()
        for p in self.scs:
            p.value(0)
            p.value(1)
