# NOR-flash block device for os.VfsLfs2 (extended block protocol) that can cut power at
# any write. Runs under MicroPython (the point: littlefs is MicroPython's) and CPython.
#
# Flash semantics: erase sets a block to 0xFF; program can only clear bits (new = old AND
# data), as on real NOR flash, so a program over unerased data shows up as corruption.
# Power cut: count program + erase operations; when the count reaches `cut_at`, that
# operation is torn (a prefix of it lands, see `tear`) and PowerCut is raised. After that
# the device object is dead for good: every operation fails with -EIO without touching the
# data, so that a littlefs instance of the old "life" (e.g. a file finaliser run by the GC,
# with the heap locked) can never write after the cut. reboot() returns a fresh device on
# the same backing bytes: the next power-up.

_EIO = -5


class PowerCut(Exception):
    pass


class FlashDev:
    def __init__(self, block_size=4096, blocks=32, data=None):
        self.bs = block_size
        self.n = blocks
        self.data = bytearray(b"\xff" * (block_size * blocks)) if data is None else data
        self.cut_at = None    # cut power at this operation number (1-based), None = never
        self.tear = "half"    # "none": the cut operation does not land; "half": half does
        self.ops = 0          # program + erase operations since the last power-up
        self.dead = False
        self.cut_kind = None  # "program" / "erase": what the cut operation was
        self.programs = 0     # lifetime counters, for wear estimates
        self.erases = 0
        self.prog_bytes = 0
        self.block_erases = [0] * blocks

        self._ff = b"\xff" * block_size

    def reboot(self):
        """Power-up: a new device on the same bytes; this one stays dead."""
        self.dead = True
        return FlashDev(self.bs, self.n, self.data)

    def _op(self):
        self.ops += 1
        return self.cut_at is not None and self.ops >= self.cut_at

    def readblocks(self, block, buf, offset=0):
        if self.dead:
            return _EIO
        a = block * self.bs + offset
        n = len(buf)
        try:
            buf[:] = memoryview(self.data)[a:a + n]
        except MemoryError:
            # littlefs may read from a finaliser that runs with the heap locked
            d = self.data
            for i in range(n):
                buf[i] = d[a + i]

    def _program(self, a, buf, n):
        d = self.data
        for i in range(n):
            d[a + i] &= buf[i]

    def _erase(self, block, n=None):
        a = block * self.bs
        if n is None:
            self.data[a:a + self.bs] = self._ff
        else:
            self.data[a:a + n] = b"\xff" * n

    def writeblocks(self, block, buf, offset=None):
        if offset is None:  # simple protocol: erase then program whole blocks
            nb = len(buf) // self.bs
            for k in range(nb):
                if self.ioctl(6, block + k):
                    return _EIO
                self._write(block + k, memoryview(buf)[k * self.bs:(k + 1) * self.bs], 0)
            return 0
        return self._write(block, buf, offset)

    def _write(self, block, buf, offset):
        if self.dead:
            return _EIO
        cut = self._op()
        a = block * self.bs + offset
        n = len(buf)
        if cut:
            self._program(a, buf, n // 2 if self.tear == "half" else 0)
            self.dead = True
            self.cut_kind = "program"
            raise PowerCut("flash: power cut during program of block %d" % block)
        self._program(a, buf, n)
        self.programs += 1
        self.prog_bytes += n
        return 0

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.bs
        if op == 6:
            if self.dead:
                return _EIO
            cut = self._op()
            if cut:
                if self.tear == "half":
                    self._erase(arg, self.bs // 2)
                self.dead = True
                self.cut_kind = "erase"
                raise PowerCut("flash: power cut during erase of block %d" % arg)
            self._erase(arg)
            self.erases += 1
            self.block_erases[arg] += 1
            return 0
        return 0
