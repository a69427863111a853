# Flash queue for store-and-forward: interval and event payloads wait here until the
# broker acknowledges them (PUBACK), across outages and power cuts, and stay here for
# `hold_ms` more after it, so that they can be sent again after a reconnect.
#
# Why the hold: a broker that crashes (SIGKILL, power) loses the QoS 1 messages it
# acknowledged since its last save (Mosquitto: autosave_interval 5 s). Records the broker
# acknowledged in the last hold_ms (the session's resend_s) are therefore kept on flash
# and sent again after every reconnect (rewind()); the head-end stores each seq once.
# Keeping them here, not as RAM copies, makes the window a time, whatever the drain rate,
# survives a reset, and costs no heap per record (issue 7, docs/decisions/0016).
#
# Three positions, oldest to newest:
#   head    the release point, persisted: records before it are gone for good
#   cursor  (RAM) the next record to send; head..cursor are acknowledged and held
#   tail    where append() writes
# ack() moves the cursor and notes (ticks, cursor) in a few RAM marks (_MARKS, not one per
# record); release() moves the head to a mark once it is hold_ms old. After a reset the
# cursor starts at the head: what was held but not released is sent again.
#
# Layout in `path` (a directory on littlefs):
#   s<n>.q   a segment: records appended one after the other, each
#            [0xA5][kind u8][len u16 LE][crc32 u32 LE of kind,len,payload][payload]
#   s<n>.a   the release point in segment n: one byte per released record (the head
#            segment's only; a later segment is removed whole once released)
#   meta     "dropped=<n>" (unacknowledged records lost to a full queue, device life)
# Segment numbers are consecutive, oldest (head) to newest (tail).
#
# Power-fail safety comes from littlefs: a file's data is committed atomically when it is
# synced (flush) or closed (copy on write), so an append or a release either happened or
# did not. A record whose CRC fails (another filesystem, a torn write) ends its segment;
# that segment is then sealed and the next append starts a new one. Delete order: a
# segment is removed before its .a file, so a cut in between leaves an orphan .a (cleaned
# at start) and never a segment with its release point lost; the worst a power cut can do
# is send held records again (the head-end drops them by sequence).
#
# Full queue: a new segment is needed and max_segs are in use. The head segment is
# removed; what it held is released early (acknowledged already: counted in `early`,
# nothing lost) and only records of it the broker never acknowledged are lost (counted
# in `dropped`, persisted in meta before the segment goes). Releasing never waits on the
# hold: appending always wins.
#
# Memory (issue 7): append() is the path that keeps billing records, so it allocates
# nothing once the queue is open: the tail segment stays open (write + flush = one
# littlefs commit per record), the next segment is created and opened ahead (the spare),
# the header and the CRC state are preallocated and the CRC-32 is computed in 16-bit
# halves (on a 32-bit port an int of 31 bits or more is a heap object). Only opening a
# new spare after a segment fills up allocates; that happens after the record is stored,
# and a failure there is retried at the next append. A record that cannot be stored after
# `tries` attempts (flash error, or a segment that cannot be opened) raises QueueError and
# is counted in `errors`; the session keeps it in RAM and says so (comm/session.py).
# peek(), ack(), release() and rewind() (the sending side) may allocate: a failure there
# only delays sending or releasing.
import os
from array import array

from util import ticks_ms as _ticks, ticks_diff as _diff

try:
    from binascii import crc32 as _crc
except ImportError:  # pragma: no cover - ports without crc32
    _crc = None

try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

_MAGIC = const(0xA5)
_HDR = const(8)
_MAX_LEN = const(0xFFFF)
_MARKS = const(8)          # (ticks, cursor) marks of acknowledgements kept in RAM
_ONES = b"\x01" * 32      # release bytes for the .a file, written in chunks of this

# CRC-32 (IEEE 802.3, reflected 0xEDB88320: the same value as binascii.crc32), four bits
# at a time: table entry i is the 32-bit value of nibble i, little endian. A bytes
# constant (in flash when frozen): a tuple of ints above 8191 would be frozen as big-int
# objects, and XOR with one of those allocates.
_T = (b"\x00\x00\x00\x00\x64\x10\xb7\x1d\xc8\x20\x6e\x3b\xac\x30\xd9\x26"
      b"\x90\x41\xdc\x76\xf4\x51\x6b\x6b\x58\x61\xb2\x4d\x3c\x71\x05\x50"
      b"\x20\x83\xb8\xed\x44\x93\x0f\xf0\xe8\xa3\xd6\xd6\x8c\xb3\x61\xcb"
      b"\xb0\xc2\x64\x9b\xd4\xd2\xd3\x86\x78\xe2\x0a\xa0\x1c\xf2\xbd\xbd")


def crc_halves(st, buf, n):
    """Run the CRC-32 register st = array('H', [hi, lo]) (start: 0xFFFF, 0xFFFF; the
    CRC is the register inverted) over buf[:n]. Allocates nothing."""
    hi = st[0]
    lo = st[1]
    tb = _T
    for i in range(n):
        lo ^= buf[i]
        k = (lo & 0xF) << 2
        lo = ((lo >> 4) | ((hi & 0xF) << 12)) ^ (tb[k] | tb[k + 1] << 8)
        hi = (hi >> 4) ^ (tb[k + 2] | tb[k + 3] << 8)
        k = (lo & 0xF) << 2
        lo = ((lo >> 4) | ((hi & 0xF) << 12)) ^ (tb[k] | tb[k + 1] << 8)
        hi = (hi >> 4) ^ (tb[k + 2] | tb[k + 3] << 8)
    st[0] = hi
    st[1] = lo


def _crc32(data, crc):
    """binascii.crc32, or the same in Python (reading: allocation is fine there)."""
    if _crc is not None:
        return _crc(data, crc) & 0xFFFFFFFF
    st = array("H", [(~crc >> 16) & 0xFFFF, ~crc & 0xFFFF])
    crc_halves(st, data, len(data))
    return ((st[0] << 16) | st[1]) ^ 0xFFFFFFFF


def _load():
    """comm.fqueue_load (the boot side: scan, recovery, open; and the meta file a full
    queue writes), imported and at once dropped from sys.modules and the package: the
    functions the caller gets keep its globals until they return (docs/ram.md)."""
    from util import unload         # a local name: no slot in this module's globals
    import comm.fqueue_load
    m = comm.fqueue_load
    unload("comm.fqueue_load")
    return m


class QueueError(Exception):
    """The flash queue cannot store or read a record; the message says what to do."""


def _size(p):
    try:
        return os.stat(p)[6]
    except OSError:
        return 0


def _close(f):
    if f is not None:
        try:
            f.close()
        except OSError:
            pass


class FlashQueue:
    def __init__(self, path, seg_bytes=4000, max_segs=64, tries=3, hold_ms=0):
        """Bounded by max_segs segments of seg_bytes (default 256 KB: 40 days of 15-minute
        3-phase binary records) plus one empty spare. When full, the oldest segment is
        removed (held records in it released early, unacknowledged ones dropped and
        counted). An append is tried `tries` times before it fails. hold_ms: how long an
        acknowledged record stays for rewind() (0: released at ack)."""
        if seg_bytes < 64 or max_segs < 2 or tries < 1 or hold_ms < 0:
            raise ValueError("fqueue needs seg_bytes >= 64, max_segs >= 2, tries >= 1 and "
                             "hold_ms >= 0")
        self.path = path.rstrip("/")
        self.seg_bytes = seg_bytes
        self.max_segs = max_segs
        self.tries = tries
        self.hold_ms = hold_ms
        self.dropped = 0       # records lost to a full queue (device lifetime, in meta)
        self.early = 0         # held records released before hold_ms by a full queue
        self.appended = 0
        self.acked = 0
        self.released = 0
        self.errors = 0        # appends that failed every try (the record is not on flash)
        self.retries = 0       # tries that failed before a later one stored the record
        self.last_error = None
        self._hdr = bytearray(_HDR)
        self._kl = memoryview(self._hdr)[1:4]   # kind + length: the CRC's first bytes
        self._st = array("H", [0, 0])           # CRC register, two 16-bit halves
        self._ring = max_segs + 2               # per-segment record counts, by n % ring
        self._cnt = array("H", [0] * self._ring)
        # marks: [ticks, segment, index] x _MARKS, oldest first; _nm in use. Mark k says
        # "every record before (segment, index) was acknowledged at ticks or earlier".
        self._mk = array("i", [0] * (3 * _MARKS))
        self._nm = 0
        self._mk0 = 0          # ticks when the newest mark was opened (see _mark)
        self._cseg = -1        # the cursor: segment, index in it, byte offset (None:
        self._cidx = 0         # unknown, found again by peek()), length of the record
        self._coff = None      # peek() returned
        self._clen = -1
        self._tail = None      # the tail segment, open for appending
        self._spare = None     # segment _last + 1, created and opened ahead
        self._ackf = None      # .a file of the head segment, open for appending
        self._ackn = -1
        try:
            os.mkdir(self.path)
        except OSError:
            pass
        # the boot side (the directory scanned, each segment's records counted and
        # checked, orphans removed): comm/fqueue_load.py, imported for this call and
        # dropped after it, so that a running meter does not hold it (docs/ram.md)
        _load().open_queue(self)
        self._ready()

    def _f(self, n, ext):
        return "%s/s%08d.%s" % (self.path, n, ext)

    def _check(self, f, off, size, hdr):
        """Length of the good record at `off` of open segment f (header into hdr), or -1
        (no record there: end, torn write, CRC mismatch)."""
        if off + _HDR > size:
            return -1
        f.seek(off)
        if f.readinto(hdr) != _HDR or hdr[0] != _MAGIC:
            return -1
        ln = hdr[2] | hdr[3] << 8
        if off + _HDR + ln > size:
            return -1
        body = f.read(ln)
        crc = hdr[4] | hdr[5] << 8 | hdr[6] << 16 | hdr[7] << 24
        if len(body) != ln or _crc32(body, _crc32(hdr[1:4], 0)) != crc:
            return -1
        return ln

    def _ready(self):
        """Open the tail and the spare when they are not (allocates; errors are left for
        append() to meet, so a queue opens even when the flash is failing)."""
        try:
            if self._tail is None and self._last >= 0 and not self._sealed:
                self._tail = open(self._f(self._last, "q"), "ab")
            if self._spare is None:
                self._spare = open(self._f(self._last + 1, "q"), "ab")
        except Exception as e:          # OSError, MemoryError (one class: a tuple of
            self.last_error = e         # classes would be built, allocating, on a match)

    def _trim(self):
        # remove fully released segments, except the tail
        while self._first < self._last and self._head_idx >= self._cnt[self._first % self._ring]:
            self._remove_head()

    def _remove_head(self):
        """Remove the head segment (released, or given up by a full queue); the caller
        has accounted for what it held."""
        n = self._first
        if self._ackn == n:
            _close(self._ackf)
            self._ackf = None
            self._ackn = -1
        try:
            os.remove(self._f(n, "q"))
        except OSError:
            pass                                 # a segment that was never written
        try:
            os.remove(self._f(n, "a"))
        except OSError:
            pass
        self._total -= self._cnt[n % self._ring]
        self._cnt[n % self._ring] = 0
        self._first = n + 1
        self._head_idx = min(_size(self._f(self._first, "a")), self._cnt[self._first % self._ring])
        if self._cseg < self._first:             # a full queue took unsent records
            self._cseg = self._first
            self._cidx = self._head_idx
            self._coff = None
        mk = self._mk
        while self._nm and mk[1] < self._first:  # marks inside the removed segment
            self._pop_mark()

    def __len__(self):
        """Records not acknowledged yet (what peek() still has to return)."""
        return self._total - self._head_idx - self._held

    def stats(self):
        return {"queued": len(self), "kept": self._held, "dropped": self.dropped,
                "early": self.early, "segments": self._last - self._first + 1,
                "appended": self.appended, "acked": self.acked, "released": self.released,
                "errors": self.errors, "retries": self.retries}

    # -- appending (allocation-free once the tail and the spare are open) ----------------
    def append(self, kind, payload):
        """Store one record (kind: 0..255, payload: bytes-like) durably before returning.
        Raises QueueError when it could not, after `tries` attempts."""
        ln = len(payload)
        if ln > _MAX_LEN or _HDR + ln > self.seg_bytes:
            raise QueueError("record of %d bytes does not fit a %d-byte segment" %
                             (ln, self.seg_bytes))
        if not 0 <= kind <= 255:
            raise QueueError("record kind %r must be 0..255" % (kind,))
        for attempt in range(self.tries):
            try:
                self._append(kind, payload, ln)
            except Exception as e:               # OSError from the flash, MemoryError
                self.last_error = e
                # littlefs kept only what was committed: seal the segment, so the next
                # try (and every later append) writes to a fresh one
                _close(self._tail)
                self._tail = None
                self._sealed = True
                continue
            self.retries += attempt
            self.appended += 1
            if self._spare is None or self._tail is None:
                self._ready()                    # after the record is safe
            return
        self.errors += 1
        raise QueueError("flash queue: record not stored after %d tries (%s: %s)" %
                         (self.tries, type(self.last_error).__name__, self.last_error))

    def _append(self, kind, payload, ln):
        if self._tail is None or self._sealed or self._tail_bytes + _HDR + ln > self.seg_bytes:
            self._next_segment()
        h = self._hdr
        h[0] = _MAGIC
        h[1] = kind
        h[2] = ln & 0xFF
        h[3] = ln >> 8
        st = self._st
        st[0] = 0xFFFF
        st[1] = 0xFFFF
        crc_halves(st, self._kl, 3)
        crc_halves(st, payload, ln)
        lo = st[1] ^ 0xFFFF
        hi = st[0] ^ 0xFFFF
        h[4] = lo & 0xFF
        h[5] = lo >> 8
        h[6] = hi & 0xFF
        h[7] = hi >> 8
        f = self._tail
        f.write(h)
        f.write(payload)
        f.flush()                                # one littlefs commit: the record is stored
        self._tail_bytes += _HDR + ln
        self._cnt[self._last % self._ring] += 1
        self._total += 1

    def _next_segment(self):
        """The tail is full, sealed or missing: continue in segment _last + 1 (the spare
        when it is open: no allocation), giving up the head segment when full."""
        if self._last >= 0 and self._last - self._first + 1 >= self.max_segs:
            self._give_up_head()
        _close(self._tail)
        self._tail = None
        f = self._spare
        self._spare = None
        if f is None:
            f = open(self._f(self._last + 1, "q"), "ab")
        self._last += 1
        if self._first > self._last:
            self._first = self._last
        self._cnt[self._last % self._ring] = 0
        self._tail = f
        self._tail_bytes = 0
        self._sealed = False

    def _give_up_head(self):
        # The queue is full: the head segment goes. Held records in it are released early
        # (the broker has them); records from the cursor on were never acknowledged: lost,
        # counted, and the count is saved first (a cut in between counts them and keeps
        # them, rather than losing them uncounted).
        n = self._first
        c = self._cnt[n % self._ring]
        cur = self._cidx if self._cseg == n else c
        lost = c - cur
        self.early += cur - self._head_idx
        self._held -= cur - self._head_idx
        if lost:
            self.dropped += lost
            try:
                _load().save_meta(self)       # rare: comm/fqueue_load.py
            except Exception as e:      # the count stays in RAM, saved next time
                self.last_error = e
        self._remove_head()

    # -- sending side --------------------------------------------------------------------
    def _norm(self):
        # the cursor at the end of a segment that will get no more records: next segment
        while self._cseg < self._last and self._cidx >= self._cnt[self._cseg % self._ring]:
            self._cseg += 1
            self._cidx = 0
            self._coff = 0
            self._clen = -1

    def peek(self):
        """-> (kind, payload) of the record at the cursor (the oldest not acknowledged),
        or None. Reads that record alone (its offset is kept from one record to the next:
        no index of the segment is held in RAM)."""
        while len(self):
            self._norm()
            h = self._cseg
            p = self._f(h, "q")
            size = _size(p)
            hdr = bytearray(_HDR)
            try:
                with open(p, "rb") as f:
                    if self._coff is None:           # skip the records before the cursor
                        off = 0
                        for _ in range(self._cidx):
                            ln = self._check(f, off, size, hdr)
                            if ln < 0:
                                break
                            off += _HDR + ln
                        self._coff = off
                    ln = self._check(f, self._coff, size, hdr)
                    if ln >= 0:
                        f.seek(self._coff + _HDR)
                        self._clen = ln
                        return hdr[1], f.read(ln)
            except OSError:
                pass
            # fewer good records on flash than counted (a damaged or missing segment):
            # what is left of it cannot be sent; move on
            lost = self._cnt[h % self._ring] - self._cidx
            self._total -= lost
            self._cnt[h % self._ring] = self._cidx
            if h == self._last:
                self._sealed = True
                return None
            self._trim()
        return None

    def ack(self):
        """The record at the cursor was delivered: move the cursor past it. It stays on
        flash (held) until release() finds it hold_ms old."""
        if not len(self):
            raise QueueError("ack on an empty queue")
        self._norm()
        self._cidx += 1
        self._held += 1
        if self._coff is not None and self._clen >= 0:
            self._coff += _HDR + self._clen      # the record peek() returned
        else:
            self._coff = None                    # acked unseen: find it again
        self._clen = -1
        self.acked += 1
        self._norm()
        # Note (now, cursor). Within hold_ms // (_MARKS - 2) of when the newest mark was
        # opened, that mark is moved to (now, cursor) instead: records then wait up to
        # that much longer than hold_ms, and _MARKS entries always span more than the
        # hold. The window counts from the mark's opening (_mk0), not from its last move:
        # acknowledgements closer together than the window (a backlog drained at
        # backlog_per_s) would otherwise move one mark forever, and nothing acknowledged
        # would ever be released (a reconnect then sent everything again). Here, not a
        # method of its own: a 24th entry grows the class's table from 23 to 29 slots.
        now = _ticks()
        mk = self._mk
        k = self._nm
        if k and (k == _MARKS or _diff(now, self._mk0) < self.hold_ms // (_MARKS - 2)):
            k -= 1
        else:
            self._nm = k + 1
            self._mk0 = now
        mk[3 * k] = now
        mk[3 * k + 1] = self._cseg
        mk[3 * k + 2] = self._cidx
        self.release()

    def _pop_mark(self):
        mk = self._mk
        for i in range(3, 3 * self._nm):
            mk[i - 3] = mk[i]
        self._nm -= 1

    def release(self, now=None):
        """Release the held records acknowledged at least hold_ms ago (durably: the head
        moves). Called by ack() and, while nothing is sent, by the session. A flash error
        leaves them held (release() tries again next time). -> records released."""
        if now is None:
            now = _ticks()
        mk = self._mk
        done = 0
        while self._nm and _diff(now, mk[0]) >= self.hold_ms:
            seg = mk[1]
            idx = mk[2]
            try:
                done += self._release_to(seg, idx)
            except Exception as e:       # OSError, MemoryError: kept, retried later
                self.last_error = e
                _close(self._ackf)       # a new handle starts from what was committed
                self._ackf = None
                self._ackn = -1
                break
            # a mark at the end of its segment went with the segment (_remove_head pops
            # it): popping again here would drop the next mark unreleased
            if self._nm and mk[1] == seg and mk[2] == idx:
                self._pop_mark()
        return done

    def _release_to(self, seg, idx):
        done = 0
        while self._first < seg:                 # whole segments: removing them is the
            k = self._cnt[self._first % self._ring] - self._head_idx   # release
            self._remove_head()
            self._held -= k
            self.released += k
            done += k
        k = idx - self._head_idx
        if k > 0 and self._first == seg:
            n = k
            if self._ackn != seg:
                _close(self._ackf)
                self._ackf = None
                p = self._f(seg, "a")
                # after a failed release, part of it may have been committed: write
                # the rest only (never more: the bytes count records)
                n = idx - max(_size(p), self._head_idx)
                self._ackf = open(p, "ab")
                self._ackn = seg
            f = self._ackf
            while n > 0:                         # one commit (flush) for the lot
                w = n if n < 32 else 32
                f.write(_ONES[:w] if w < 32 else _ONES)
                n -= w
            f.flush()
            self._head_idx += k
            self._held -= k
            self.released += k
            done += k
            self._trim()
        return done

    def rewind(self):
        """After a reconnect: move the cursor back to the head, so that the held records
        (acknowledged by a broker that may have lost them) are sent again. -> how many."""
        n = self._held
        self._rewind()
        return n

    def _rewind(self):
        self._cseg = self._first
        self._cidx = self._head_idx
        self._coff = None
        self._clen = -1
        self._held = 0
        self._nm = 0           # the records get new marks when acknowledged again

    def close(self):
        """Close the open files (the queue object is not used afterwards)."""
        for f in (self._tail, self._spare, self._ackf):
            _close(f)
        self._tail = self._spare = self._ackf = None
        self._ackn = -1
