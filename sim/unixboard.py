# What the unix simulation boards build: simulated chips on fake buses, a virtual clock,
# and a littlefs filesystem on a simulated flash (RAM, or a file that keeps the meter's
# flash across runs). Runs on the MicroPython unix port and under CPython.
import os

from sim.loads import DEFAULT_EPOCH

FS_BLOCK = 4096
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
        self._ff = b"\xff" * block_size
        try:
            self.f = open(path, "r+b")
        except OSError:
            self.f = open(path, "w+b")
            for _ in range(blocks):
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


def clock_from(opts):
    from sim.vclock import ScaledClock, StepClock
    start = opts.get("start")
    if opts.get("step"):
        return StepClock(int(start) if start else DEFAULT_EPOCH)
    speed = float(opts.get("speed", 1))
    if start:
        return ScaledClock(speed=speed, start_epoch=int(start))
    import time
    now = int(time.time())
    if now < 1700000000:          # a port whose epoch is 2000
        now += 946684800
    return ScaledClock(speed=speed, start_epoch=now)


def build(board, opts=None):
    from sim.bus import SimBoard
    from drivers.stpm3x import SpiLink, UartLink
    from hw import Hardware
    opts = opts or {}
    clock = clock_from(opts)
    sb = SimBoard(board.CHIPS, interface=board.INTERFACE, mains_hz=board.MAINS_HZ,
                  profile=opts.get("profile", "household"), seed=int(opts.get("seed", 0)),
                  clock=clock, errors=bool(opts.get("sensor_errors")))
    n = len(sb.chips)
    if board.INTERFACE == "spi":
        links = [SpiLink(sb.spi, sb.scs[i]) for i in range(n)]
    else:
        links = [UartLink(sb.uarts[i], sb.scs[i]) for i in range(n)]
    fs = mount(opts.get("state"))
    return Hardware(links, syn=sb.syn, en=sb.en, clock=clock, fs=fs, sim=sb)
