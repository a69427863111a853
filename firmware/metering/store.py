# Power-fail-safe checkpoint store: two files (A/B), each one complete record
#   magic "LPM1" | seq u32 | length u32 | payload | crc32 u32 (over everything before it)
# optionally padded with 0xFF to a fixed size. A save always overwrites the *older*
# slot, so a write torn at any block (power cut, reset) leaves the newest good record
# untouched; load() returns the valid record with the highest sequence. littlefs commits
# a file atomically at sync; the A/B pair keeps the guarantee on any filesystem (FAT) and
# against a record torn by the flash itself, and the CRC catches bit rot. Wear: one save
# = one file rewrite (docs/metering.md "Persistence").
#
# prepare(max_len) takes, at boot, everything a save needs: the record and read-back
# buffers and both files open. A save then allocates nothing (littlefs writes through the
# open files' own caches), so a heap exhausted by something else cannot stop the
# checkpoint (tests/test_metering_persist.py runs it with the heap locked).
import struct

try:
    from binascii import crc32 as _crc32
except ImportError:  # ports built without binascii.crc32
    _crc32 = None

_MAGIC = b"LPM1"
_HDR = "<4sII"
_HDR_LEN = 12


class StoreError(Exception):
    pass


def crc32(data, crc=0):
    if _crc32 is not None:
        return _crc32(data, crc) & 0xFFFFFFFF
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


class Store:
    """A/B record store in directory `fs` (e.g. hw.fs). save(payload bytes), load()."""

    def __init__(self, fs="/", name="meter", max_len=4096):
        fs = fs.rstrip("/")
        self.paths = (fs + "/" + name + ".a", fs + "/" + name + ".b")
        self.max_len = max_len
        self.seq = 0          # sequence of the newest good record
        self._good = None     # its slot (0/1), None = none yet
        self.saves = 0
        self.failures = 0
        self.last_error = None
        self._files = None    # both slots open (prepare)
        self._rec = None
        self._back = None
        self._crc_view = None
        self._plen = 0

    def load(self):
        """Payload of the newest valid record, or None (first boot / both slots bad).
        The reading side is metering/store_load.py, imported for the call and dropped
        after it: a running meter loads a record at boot only (docs/ram.md)."""
        from metering.store_load import load
        try:
            return load(self)
        finally:
            _drop_load()

    def prepare(self, max_len):
        """Take the buffers and open the files a save needs, once (call after load()).
        Records are then padded to a fixed size of max_len payload bytes."""
        if max_len > self.max_len:
            raise StoreError("checkpoint of %d bytes exceeds max_len %d"
                             % (max_len, self.max_len))
        size = _HDR_LEN + max_len + 4
        self._rec = bytearray(b"\xff" * size)
        self._back = bytearray(size)
        self._crc_view = memoryview(self._rec)[:_HDR_LEN + max_len]
        self._plen = max_len
        files = []
        for p in self.paths:
            try:
                f = open(p, "r+b")           # keep what is there until it is rewritten
            except OSError:
                f = open(p, "w+b")
            files.append(f)
        self._files = files

    def close(self):
        if self._files:
            for f in self._files:
                try:
                    f.close()
                except OSError:
                    pass
        self._files = None

    def save(self, payload, n=None):
        """Write payload[:n] to the older slot; raises StoreError (the previous record
        stays). Prepared: no allocation."""
        if n is None:
            n = len(payload)
        if n > self.max_len:
            raise StoreError("checkpoint of %d bytes exceeds max_len %d" % (n, self.max_len))
        slot = 0 if self._good is None else 1 - self._good
        seq = (self.seq + 1) & 0xFFFFFFFF
        if self._files is None:
            return self._save_unprepared(payload, n, slot, seq)
        rec = self._rec
        if _HDR_LEN + n + 4 > len(rec):
            raise StoreError("checkpoint of %d bytes exceeds the %d prepared"
                             % (n, len(rec) - _HDR_LEN - 4))
        struct.pack_into(_HDR, rec, 0, _MAGIC, seq, n)
        for i in range(n):
            rec[_HDR_LEN + i] = payload[i]
        # the prepared view when the payload has the prepared size (the checkpoint
        # always does): slicing a memoryview would allocate
        view = self._crc_view if n == self._plen else memoryview(rec)[:_HDR_LEN + n]
        struct.pack_into("<I", rec, _HDR_LEN + n, crc32(view))
        for i in range(_HDR_LEN + n + 4, len(rec)):
            rec[i] = 0xFF
        f = self._files[slot]
        try:
            f.seek(0)
            f.write(rec)
            f.flush()                           # littlefs: the file is committed here
            f.seek(0)
            got = f.readinto(self._back)
        except OSError as e:
            return self._failed(slot, e)
        if got != len(rec) or self._back != rec:
            return self._failed(slot, None)
        self.seq = seq
        self._good = slot
        self.saves += 1
        return seq

    def _failed(self, slot, e):
        self.failures += 1
        self.last_error = e
        if e is not None:
            raise StoreError("checkpoint write to %s failed (%s): check that the filesystem"
                             " is mounted and not full" % (self.paths[slot], e))
        raise StoreError("checkpoint read-back of %s failed: flash worn or full, "
                         "reformat the data partition" % self.paths[slot])

    def _save_unprepared(self, payload, n, slot, seq):
        rec = bytearray(_HDR_LEN + n + 4)
        struct.pack_into(_HDR, rec, 0, _MAGIC, seq, n)
        rec[_HDR_LEN:_HDR_LEN + n] = payload[:n]
        struct.pack_into("<I", rec, _HDR_LEN + n, crc32(memoryview(rec)[:-4]))
        try:
            with open(self.paths[slot], "wb") as f:
                f.write(rec)
            from metering.store_load import read_back
            ok = read_back(self, slot)
            _drop_load()
        except OSError as e:
            return self._failed(slot, e)
        if ok is None or ok[0] != seq:
            return self._failed(slot, None)
        self.seq = seq
        self._good = slot
        self.saves += 1
        return seq


def _drop_load():
    from util import unload
    unload("metering.store_load")
