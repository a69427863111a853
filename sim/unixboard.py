# What the unix simulation boards build: the chips' buses and pins, a virtual clock, a
# littlefs filesystem on a simulated flash (a host file, kept across runs with --state),
# and the UARTs of the modems behind a pty. Runs on the MicroPython unix port and CPython.
#
# Two ways to the chips (docs/decisions/0004):
#  --bridge PATH  the simulated board runs in a host process (sim/bridge.py, started by
#                 `lipari meter`); the firmware gets link objects that speak the bridge
#                 (sim/bridgelink.py): only they sit in the MicroPython heap, with the
#                 board's watchdog and shutdown line. What RAM figures are measured on.
#  otherwise      the chips run in this process behind fake buses (sim/bus.py): fast
#                 tests that look inside the chips, the heap-locked acquire test.
import os

FS_BLOCK = 4096
_ERASE_CHUNK = 256       # an erase writes 0xFF in pieces: the buffer sits in the MCU's heap
FS_BLOCKS = 256          # 1 MiB, the smallest filesystem the issues size the queue for
MOUNT = "/flash"


class FileDev:
    """Block device on a host file, for `lipari meter --state FILE`: a restart of the
    virtual meter finds its flash as it left it, like a board after a power cycle."""

    # Nothing here may allocate after __init__: littlefs can call in from a file's
    # finaliser, which the GC runs with the heap locked.
    def __init__(self, path, block_size=FS_BLOCK, blocks=FS_BLOCKS):
        self.bs = block_size
        self.n = blocks
        self.fresh = False
        self._ff = b"\xff" * _ERASE_CHUNK
        try:
            self.f = open(path, "r+b")
        except OSError:
            self.f = open(path, "w+b")
            for _ in range(blocks * block_size // _ERASE_CHUNK):
                self.f.write(self._ff)
            self.f.flush()
            self.fresh = True

    def readblocks(self, block, buf, offset=0):
        self.f.seek(block * self.bs + offset)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, offset=None):
        if offset is None:
            offset = 0
        self.f.seek(block * self.bs + offset)
        self.f.write(buf)
        self.f.flush()

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:
            self.f.seek(arg * self.bs)
            for _ in range(self.bs // _ERASE_CHUNK):
                self.f.write(self._ff)
            return 0
        return 0


def mount(state=None, point=MOUNT):
    """Mount littlefs at `point` (formatting a blank device) and return the path."""
    # A file, not a RAM device, even when nothing is kept: the simulated flash must not
    # live in the MicroPython heap, whose size stands for the MCU's RAM.
    if not state:
        state = "/tmp/lipari-flash-%s.img" % "".join("%02x" % b for b in os.urandom(6))
        dev = FileDev(state)
        os.remove(state)        # the open file stays usable; nothing is left behind
    else:
        dev = FileDev(state)
    try:
        vfs = os.VfsLfs2(dev)
    except OSError:
        os.VfsLfs2.mkfs(dev)
        vfs = os.VfsLfs2(dev)
    try:
        os.umount(point)
    except (OSError, AttributeError):
        pass
    os.mount(vfs, point)
    return point


def clock_from(opts, start_us=0, epoch=None, offset_s=0):
    """The board's virtual clock from the options (--step, --speed, --start); a bridged
    board continues the time its host kept across a reset (start_us, epoch, offset_s)."""
    from sim.vclock import ScaledClock, StepClock, DEFAULT_EPOCH
    start = epoch if epoch is not None else opts.get("start")
    if opts.get("step"):
        c = StepClock(int(start) if start else DEFAULT_EPOCH, start_us=start_us)
    else:
        c = ScaledClock(speed=float(opts.get("speed", 1)), start_epoch=_epoch_now(start),
                        start_us=start_us)
    c.offset_s = offset_s
    return c


def _epoch_now(start):
    if start:
        return int(start)
    import time
    now = int(time.time())
    if now < 1700000000:          # a port whose epoch is 2000
        now += 946684800
    return now


def pty_uart(path, what, opt):
    """The UART of a modem behind a pty (the emulators in sim/), for Hardware."""
    if not path:
        return None
    from sim.ptyuart import PtyUart
    try:
        return PtyUart(path)
    except OSError as e:
        raise ValueError("cannot open the %s tty %s (%s): start the emulator first "
                         "(lipari meter does) or fix --%s" % (what, path, e, opt))


# Time from power-up until the firmware first touches the chips (MicroPython boot, the
# board module, mounting the filesystem): the chips integrate all along. A ScaledClock
# takes it from real time; a StepClock is moved on by this much.
MCU_BOOT_MS = 800


def mcu_boot(clock, opts):
    ms = int(opts.get("boot_ms", MCU_BOOT_MS))
    if hasattr(clock, "advance"):
        clock.advance(ms * 1000)
    elif hasattr(clock, "step"):
        clock.step()            # the host's start-up, scaled: the firmware's ticks see it


def build(board, opts=None):
    opts = opts or {}
    modem = pty_uart(opts.get("modem"), "NB-IoT modem", "modem")
    plc = pty_uart(opts.get("plc"), "PLC modem", "plc")
    bridge = opts.get("bridge") or os.getenv("LIPARI_BRIDGE")   # `lipari vboard` sets it
    if bridge:
        hw = _bridged(board, opts, bridge)
    else:
        hw = _in_process(board, opts)
    hw.modem_uart = modem
    hw.plc_uart = plc
    return hw


def _bridged(board, opts, path):
    from sim import bridgelink as bl
    from drivers.stpm3x import SpiLink, UartLink
    from hw import Hardware
    br = bl.Bridge(path)
    step = bool(opts.get("step"))
    speed = float(opts.get("speed", 1))
    epoch0 = opts.get("start")
    if not epoch0:
        from sim.vclock import DEFAULT_EPOCH
        epoch0 = DEFAULT_EPOCH if step else _epoch_now(None)
    now_us, epoch, off, _synced, _boots = br.hello(step, speed, int(epoch0))
    clock = clock_from(opts, now_us, epoch, off)
    br.attach(clock)
    mcu_boot(clock, opts)
    n = len(board.CHIPS)
    scs = [bl.LinkPin(br, bl.PIN_SCS, i) for i in range(n)]
    # one pin per EN line (CHIPS "en": chips with the same number share one)
    lines = 1 + max(c.get("en", i) for i, c in enumerate(board.CHIPS))
    en = [bl.LinkPin(br, bl.PIN_EN, k) for k in range(lines)]
    if board.INTERFACE == "spi":
        spi = bl.LinkSPI(br)
        links = [SpiLink(spi, scs[i]) for i in range(n)]
    else:
        links = [UartLink(bl.LinkUART(br, i), scs[i]) for i in range(n)]

    def wdt(timeout=5000, id=0):
        return bl.LinkWDT(br, timeout)
    fs = mount(opts.get("state"))
    return Hardware(links, syn=bl.LinkPin(br, bl.PIN_SYN, 0), en=en, clock=clock, fs=fs,
                    wdt=wdt, stop=bl.LinkPin(br, bl.PIN_STOP, 0, 0), sim=br)


def sim_board(board, clock, profile="household", seed=0, sensor_errors=False):
    """The board's simulated hardware (sim/bus.py SimBoard), in this process or in the
    bridge's host (sim/bridge.py): one place that turns a board module into chips."""
    from sim.bus import SimBoard
    return SimBoard(board.CHIPS, interface=board.INTERFACE,
                    mains_hz=getattr(board, "MAINS_HZ", 50), profile=profile,
                    seed=int(seed), clock=clock, errors=bool(sensor_errors),
                    scs_powerup=getattr(board, "SCS_POWERUP", None))


def _in_process(board, opts):
    from drivers.stpm3x import SpiLink, UartLink
    from hw import Hardware
    clock = clock_from(opts)
    sb = sim_board(board, clock, opts.get("profile", "household"), opts.get("seed", 0),
                   opts.get("sensor_errors"))
    mcu_boot(clock, opts)
    n = len(sb.chips)
    if board.INTERFACE == "spi":
        links = [SpiLink(sb.spi, sb.scs[i]) for i in range(n)]
    else:
        links = [UartLink(sb.uarts[i], sb.scs[i]) for i in range(n)]
    fs = mount(opts.get("state"))
    return Hardware(links, syn=sb.syn, en=sb.en, clock=clock, fs=fs, sim=sb)
