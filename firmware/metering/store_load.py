# Reading a Store's newest record back (boot, calibration data): imported by Store.load
# for the call and dropped after it, so that a running meter, which only saves, does not
# hold these functions (docs/ram.md).
import struct

from metering.store import crc32, _HDR, _HDR_LEN, _MAGIC


def _decode(raw):
    if raw is None or len(raw) < _HDR_LEN + 4:
        return None
    magic, seq, n = struct.unpack_from(_HDR, raw, 0)
    if magic != _MAGIC or len(raw) < _HDR_LEN + n + 4:
        return None
    (crc,) = struct.unpack_from("<I", raw, _HDR_LEN + n)
    if crc32(memoryview(raw)[:_HDR_LEN + n]) != crc:
        return None
    return seq, bytes(raw[_HDR_LEN:_HDR_LEN + n])


def _read(store, path):
    try:
        with open(path, "rb") as f:
            return f.read(store.max_len + _HDR_LEN + 8)
    except OSError:
        return None


def read_back(store, slot):
    """(seq, payload) of the record in slot as written, or None (a save's check)."""
    return _decode(_read(store, store.paths[slot]))


def load(store):
    """Payload of the newest valid record, or None (first boot / both slots bad)."""
    best = None
    for slot in (0, 1):
        rec = _decode(_read(store, store.paths[slot]))
        if rec is not None and (best is None or _newer(rec[0], best[0])):
            best = (rec[0], rec[1], slot)
    if best is None:
        store._good = None
        return None
    store.seq, payload, store._good = best
    return payload


def _newer(a, b):
    # Sequence numbers compare modulo 2**32 (serial-number arithmetic).
    return a != b and ((a - b) & 0xFFFFFFFF) < 0x80000000
