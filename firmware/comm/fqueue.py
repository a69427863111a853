# Flash queue for store-and-forward: interval and event payloads wait here until the
# broker acknowledges them (PUBACK), across outages and power cuts.
#
# Layout in `path` (a directory on littlefs):
#   s<n>.q   a segment: records appended one after the other, each
#            [0xA5][kind u8][len u16 LE][crc32 u32 LE of kind,len,payload][payload]
#   s<n>.a   the acknowledgements of segment n: one byte per acknowledged record
#   meta     "dropped=<n>" (records lost to a full queue, over the device's life)
# Power-fail safety comes from littlefs: a file write is committed atomically when the
# file is closed (copy on write), so an append or an acknowledgement either happened or
# did not. A record whose CRC fails (another filesystem, a torn write) ends its segment;
# that segment is then sealed and the next append starts a new one.
# Delete order: a segment is removed before its .a file, so a cut in between leaves an
# orphan .a (cleaned at start) and never a segment with its acknowledgements lost; the
# worst a power cut can do is send one record twice (the head-end drops it by sequence).
import os
import struct

try:
    import binascii
    _crc = binascii.crc32
except (ImportError, AttributeError):  # pragma: no cover - ports without crc32
    def _crc(data, crc=0):
        crc = ~crc & 0xFFFFFFFF
        for b in data:
            crc ^= b
            for _ in range(8):
                crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
        return ~crc & 0xFFFFFFFF

try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

_MAGIC = const(0xA5)
_HDR = const(8)


class QueueError(Exception):
    """The flash queue cannot store or read a record; the message says what to do."""


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def _size(p):
    try:
        return os.stat(p)[6]
    except OSError:
        return 0


class FlashQueue:
    def __init__(self, path, seg_bytes=4000, max_segs=64):
        """Bounded by max_segs segments of seg_bytes (default 256 KB: 40 days of 15-minute
        3-phase binary records). When full, the oldest segment is dropped and counted."""
        if seg_bytes < 64 or max_segs < 2:
            raise ValueError("fqueue needs seg_bytes >= 64 and max_segs >= 2")
        self.path = path.rstrip("/")
        self.seg_bytes = seg_bytes
        self.max_segs = max_segs
        self.dropped = 0
        self.appended = 0
        self.acked = 0
        try:
            os.mkdir(self.path)
        except OSError:
            pass
        self._open()

    def _f(self, n, ext):
        return "%s/s%08d.%s" % (self.path, n, ext)

    def _scan(self, n):
        """-> (list of (offset, length) of valid records, file size)."""
        recs = []
        p = self._f(n, "q")
        size = _size(p)
        with open(p, "rb") as f:
            off = 0
            hdr = bytearray(_HDR)
            while off + _HDR <= size:
                f.seek(off)
                if f.readinto(hdr) != _HDR or hdr[0] != _MAGIC:
                    break
                ln = hdr[2] | hdr[3] << 8
                if off + _HDR + ln > size:
                    break
                body = f.read(ln)
                crc = struct.unpack("<I", hdr[4:8])[0]
                if _crc(body, _crc(hdr[1:4])) & 0xFFFFFFFF != crc:
                    break
                recs.append((off, ln))
                off += _HDR + ln
        return recs, size, off

    def _open(self):
        segs = []
        acks = []
        for name in os.listdir(self.path):
            if name.startswith("s") and len(name) == 11:
                try:
                    n = int(name[1:9])
                except ValueError:
                    continue
                (segs if name.endswith(".q") else acks).append(n)
            elif name == "meta":
                try:
                    with open(self.path + "/meta") as f:
                        self.dropped = int(f.read().split("=")[1])
                except (OSError, ValueError, IndexError):
                    self.dropped = 0
        for n in acks:
            if n not in segs:                    # orphan from a cut during a delete
                os.remove(self._f(n, "a"))
        segs.sort()
        self._segs = segs
        self._count = {}
        self._sealed = False
        self._tail_bytes = 0
        for n in segs:
            recs, size, valid = self._scan(n)
            self._count[n] = len(recs)
            if n == segs[-1]:
                self._tail_bytes = valid
                self._sealed = valid != size     # damaged tail: append to a new segment
        self._head_recs = None
        self._head_idx = 0
        if segs:
            self._head_idx = min(_size(self._f(segs[0], "a")), self._count[segs[0]])
        self._trim()

    def _trim(self):
        # remove fully acknowledged segments, except the one being appended to
        while len(self._segs) > 1 and self._head_idx >= self._count[self._segs[0]]:
            self._remove(self._segs[0])

    def _remove(self, n):
        os.remove(self._f(n, "q"))
        try:
            os.remove(self._f(n, "a"))
        except OSError:
            pass
        self._segs.pop(0)
        self._count.pop(n, None)
        self._head_recs = None
        self._head_idx = 0
        if not self._segs:
            self._tail_bytes = 0
            self._sealed = False
        else:
            self._head_idx = min(_size(self._f(self._segs[0], "a")), self._count[self._segs[0]])

    def _save_meta(self):
        tmp = self.path + "/meta.t"
        with open(tmp, "w") as f:
            f.write("dropped=%d" % self.dropped)
        os.rename(tmp, self.path + "/meta")

    def __len__(self):
        n = 0
        for s in self._segs:
            n += self._count[s]
        return n - self._head_idx

    def stats(self):
        return {"queued": len(self), "dropped": self.dropped, "segments": len(self._segs),
                "appended": self.appended, "acked": self.acked}

    def append(self, kind, payload):
        """Store one record (kind: small int, payload: bytes) durably before returning."""
        ln = len(payload)
        if ln > 0xFFFF or _HDR + ln > self.seg_bytes:
            raise QueueError("record of %d bytes does not fit a %d-byte segment" %
                             (ln, self.seg_bytes))
        if not 0 <= kind <= 255:
            raise QueueError("record kind %r must be 0..255" % (kind,))
        if not self._segs or self._sealed or self._tail_bytes + _HDR + ln > self.seg_bytes:
            if len(self._segs) >= self.max_segs:
                h = self._segs[0]
                self.dropped += self._count[h] - self._head_idx
                self._save_meta()
                self._remove(h)
            n = self._segs[-1] + 1 if self._segs else 0
            self._segs.append(n)
            self._count[n] = 0
            self._tail_bytes = 0
            self._sealed = False
        n = self._segs[-1]
        hdr = bytearray(_HDR)
        hdr[0] = _MAGIC
        hdr[1] = kind
        hdr[2] = ln & 0xFF
        hdr[3] = ln >> 8
        struct.pack_into("<I", hdr, 4, _crc(payload, _crc(hdr[1:4])) & 0xFFFFFFFF)
        with open(self._f(n, "q"), "ab") as f:
            f.write(hdr)
            f.write(payload)
        self._tail_bytes += _HDR + ln
        self._count[n] += 1
        if len(self._segs) == 1:
            self._head_recs = None
        self.appended += 1
        self._trim()

    def peek(self):
        """-> (kind, payload) of the oldest unacknowledged record, or None."""
        if not len(self):
            return None
        h = self._segs[0]
        if self._head_recs is None:
            self._head_recs = self._scan(h)[0]
        off, ln = self._head_recs[self._head_idx]
        with open(self._f(h, "q"), "rb") as f:
            f.seek(off + 1)
            kind = f.read(1)[0]
            f.seek(off + _HDR)
            return kind, f.read(ln)

    def ack(self):
        """The oldest record was delivered: remove it (durably)."""
        if not len(self):
            raise QueueError("ack on an empty queue")
        h = self._segs[0]
        with open(self._f(h, "a"), "ab") as f:
            f.write(b"\x01")
        self._head_idx += 1
        self.acked += 1
        self._trim()
