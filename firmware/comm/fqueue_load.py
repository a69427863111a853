# The flash queue's boot side: the directory scanned, each segment's records counted and
# their CRCs checked, orphan release files and foreign segments removed, the cursor set
# to the head; and the meta file (the dropped count) a full queue writes. FlashQueue
# imports this module for the call and drops it at once (comm/fqueue.py _load), so that a
# running meter, which only appends, peeks, acknowledges and releases, holds none of its
# functions (docs/ram.md, decision 0020).
import os

try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

from comm.fqueue import _size

_HDR = const(8)            # record header bytes (comm/fqueue.py _HDR)


def _scan(q, n):
    """-> (good records, file size, end of the good part) of segment n."""
    p = q._f(n, "q")
    size = _size(p)
    count = off = 0
    if size:
        hdr = bytearray(_HDR)
        with open(p, "rb") as f:
            while True:
                ln = q._check(f, off, size, hdr)
                if ln < 0:
                    break
                count += 1
                off += _HDR + ln
    return count, size, off


def open_queue(q):
    segs = []
    acks = []
    for name in os.listdir(q.path):
        if name.startswith("s") and len(name) == 11:
            try:
                n = int(name[1:9])
            except ValueError:
                continue
            (segs if name.endswith(".q") else acks).append(n)
        elif name == "meta":
            try:
                with open(q.path + "/meta") as f:
                    q.dropped = int(f.read().split("=")[1])
            except (OSError, ValueError, IndexError):
                q.dropped = 0
    for n in acks:
        if n not in segs:                        # orphan from a cut during a delete
            os.remove(q._f(n, "a"))
    segs.sort()
    q._total = 0            # records in segments _first.._last (released ones included)
    q._held = 0             # acknowledged, not released: head .. cursor
    q._sealed = False
    q._tail_bytes = 0
    q._head_idx = 0         # released records of the head segment (= its .a size)
    if not segs:
        q._first = 0
        q._last = -1                          # no segment yet
        q._rewind()
        return
    while segs[-1] - segs[0] + 1 > q.max_segs + 1:       # foreign files: keep the newest
        n = segs.pop(0)
        os.remove(q._f(n, "q"))
        try:
            os.remove(q._f(n, "a"))
        except OSError:
            pass
    q._first = segs[0]
    q._last = segs[-1]
    for n in range(q._first, q._last + 1):
        c = 0
        if n in segs:
            c, size, valid = _scan(q, n)
            if n == q._last:
                q._tail_bytes = valid
                q._sealed = valid != size         # damaged tail: append to a new segment
        q._cnt[n % q._ring] = c
        q._total += c
    q._head_idx = min(_size(q._f(q._first, "a")), q._cnt[q._first % q._ring])
    q._trim()
    q._rewind()             # after a reset, what was held goes out again


def save_meta(q):
    tmp = q.path + "/meta.t"
    with open(tmp, "w") as f:
        f.write("dropped=%d" % q.dropped)
    os.rename(tmp, q.path + "/meta")
