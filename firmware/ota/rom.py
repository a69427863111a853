# Staging a ROMFS release (manifest kind "romfs", docs/ota.md) into the inactive slot's
# ROMFS store; the bootstrap mounts the chosen slot's image at /rom (boot.slot_path).
#
#   - on a board: ROMFS partition <slot>, through MicroPython's vfs.rom_ioctl: 1 number of
#     segments, 2 the segment (a memoryview of the flash), 3 prepare (erase) a range,
#     4 write, 5 complete, 6 the smallest range prepare takes (the erase unit). Written to
#     that documented API; not tested on hardware (docs/ota.md, "Limits"): the tests run it
#     against an emulated partition with NOR-flash semantics and power cuts.
#   - on the unix port (the virtual board): the file fw/<slot>.rom, written in order.
#
# The block table and every check of it are Stage's. What differs is where the body goes
# and how progress is found after a reboot: a partition has no file size, so it is the
# run of blocks from the start that match their signed hash (a torn or erased block does
# not), rounded down to the erase unit on a partition (a unit is erased whole before its
# first write).
import sys
import hashlib

from ota.manifest import Refused, HASH
from ota.stage import Stage, size


class FileRom:
    """The unix board's ROMFS slot: a file. Writes at the first byte missing."""

    def __init__(self, path):
        self.path = path
        self.on_fs = True

    def resume_at(self, have, n):
        return have

    def write(self, off, data):
        n = size(self.path)
        if n == off or n < 0:                   # in order: an append (littlefs: cheap)
            with open(self.path, "ab") as f:
                f.write(data)
        else:                                   # a resumed block over a stale one
            with open(self.path, "r+b") as f:
                f.seek(off)
                f.write(data)

    def read(self, off, buf):
        try:
            with open(self.path, "rb") as f:
                f.seek(off)
                return f.readinto(buf) or 0
        except OSError:
            return 0

    def complete(self):
        pass


class PartRom:
    """ROMFS partition `slot` of a board (vfs.rom_ioctl, see the top)."""

    def __init__(self, slot, io, n):
        nseg = io(1)
        if nseg <= slot:
            raise Refused("kind", "a ROMFS release needs 2 ROMFS partitions; this board has %d"
                          % max(nseg, 0))
        self.io = io
        self.id = slot
        self.mem = io(2, slot)
        try:
            len(self.mem)
        except TypeError:           # an error code, or a block device object (not handled)
            raise Refused("kind", "ROMFS partition %d is not memory-mapped" % slot)
        self.on_fs = False
        if n > len(self.mem):
            raise Refused("space", "ROMFS partition %d holds %d bytes, the image is %d"
                          % (slot, len(self.mem), n))
        u = io(6, slot)
        self.unit = u if 0 < u < len(self.mem) else 0   # 0: erased whole, from the start
        self.n = n
        self.erased = 0             # bytes from the start prepared (erased) for writing
        self.min_write = 1

    def resume_at(self, have, n):
        if have < n:                # the unit of the first missing block is erased again
            have = have // self.unit * self.unit if self.unit else 0
            self.erased = have
        return have

    def _prepare(self, end):
        while self.erased < end:
            if self.unit:
                r = self.io(3, self.id, self.erased, self.unit)
                step = self.unit
            else:
                r = self.io(3, self.id, self.n)
                step = self.n
            if r < 0:
                raise OSError(-r)
            self.min_write = max(self.min_write, r)
            self.erased += step

    def write(self, off, data):
        self._prepare(off + len(data))
        pad = -len(data) % self.min_write      # the last block, padded as mpremote does
        if pad or off % self.min_write:
            if off % self.min_write:
                raise OSError(22)               # blocks are powers of two >= 256
            data = bytes(data) + bytes(pad)
        r = self.io(4, self.id, off, data)
        if isinstance(r, int) and r < 0:
            raise OSError(-r)

    def read(self, off, buf):
        k = min(len(buf), len(self.mem) - off)
        buf[:k] = self.mem[off:off + k]
        return k

    def complete(self):
        self.io(5, self.id)


def device(d, slot, n, io=None):
    """The ROMFS store of `slot` (0 = a, 1 = b) for an n-byte image."""
    if io is None:
        try:
            import vfs
            io = vfs.rom_ioctl
        except (ImportError, AttributeError):
            io = None
    if io is not None:
        return PartRom(slot, io, n)
    if sys.platform in ("linux", "darwin"):      # the unix port: the virtual board
        return FileRom("%s/%s.rom" % (d, "ab"[slot]))
    raise Refused("kind", "this board has no ROMFS partitions (vfs.rom_ioctl)")


class RomStage(Stage):
    """One download of a ROMFS image into slot `slot` under the OTA directory d."""

    def __init__(self, d, m, slot, io=None):
        self.dev = device(d, slot, m["body_size"], io)
        self.have = None            # body bytes in the slot (found once the table is in)
        Stage.__init__(self, d, m, None)

    def _load_dir(self):
        self.files = []             # an image has no directory

    def next_offset(self):
        t = size(self._tab())
        if t < self.tsize:
            return max(t, 0)
        if self.have is None:
            self.have = self.dev.resume_at(self._run(), self.m["body_size"])
        return self.tsize + self.have

    def _blocks(self):
        """(block index, memoryview of it as read from the slot), from the start."""
        blk, n = self.block, self.m["body_size"]
        buf = bytearray(blk)
        mv = memoryview(buf)
        j = 0
        while j * blk < n:
            k = min(blk, n - j * blk)
            yield j, mv[:self.dev.read(j * blk, mv[:k])], k
            j += 1

    def _run(self):
        """Body bytes from the start whose blocks match the signed table."""
        have = 0
        with open(self._tab(), "rb") as tab:
            for j, data, k in self._blocks():
                tab.seek(HASH * j)
                if len(data) < k or hashlib.sha256(data).digest()[:HASH] != tab.read(HASH):
                    break
                have += k
        return have

    def _write_body(self, boff, data, have):
        skip = have - boff                  # accept() passes whole, checked blocks
        self.dev.write(have, data[skip:])
        self.have = boff + len(data)
        self.stats["written"] += len(data) - skip
        return len(data) - skip

    def check_files(self):
        """Generator: the image read back from the slot, every block checked against the
        signed table again; yields after each block; raises Refused("flash")."""
        self.dev.complete()
        with open(self._tab(), "rb") as tab:
            for j, data, k in self._blocks():
                if len(data) < k:
                    raise Refused("flash", "the ROMFS slot is shorter than the image")
                self._check_block(tab, j, data, "ROMFS image")
                yield
