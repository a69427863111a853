# Reading back what metering/persist.py keeps: the newest checkpoint (boot), the
# chips' configuration fingerprints (boot, chip restart, calibration) and the saved
# calibration. None of it runs in a running meter's cycle: metering.chips.boot drops this
# module after the start-up, a chip restart or a calibration imports it for the call and
# drops it after, so that a running meter does not hold its functions (docs/ram.md).
import struct

try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

from drivers.stpm3x_map import DFE_CR2, DSP_CR3, CR3_NOT_COMPARED
from metering.persist import _HEAD

_CFG_ROWS = DFE_CR2 + 1  # rows DSP_CR1..DFE_CR2: configuration, fingerprinted at checkpoints
_CKPT_VERSION = const(1)   # = metering/persist.py's
_HEAD_LEN = const(21)      # = metering/persist.py's


def load(persist):
    """The newest checkpoint of a Persistence as a dict (boot; allocates), or None."""
    if persist.store is None:
        return None
    data = persist.store.load()
    return unpack(data, persist.nph, persist.nch) if data else None


def unpack(data, nph, nch):
    """-> dict or None (a checkpoint of another board layout is not used)."""
    try:
        ver, n, nr, nc, ivs, evs, t, smax, syn = struct.unpack_from(_HEAD, data, 0)
        if ver != _CKPT_VERSION or n != nph or nc != nch:
            return None
        o = _HEAD_LEN
        ph = []
        for p in range(nph):
            cpw, based = struct.unpack_from("<IB", data, o)
            o += 5
            raw = struct.unpack_from("<6H", data, o)
            o += 12
            regs = []
            for r in range(nr):
                regs.append(struct.unpack_from("<II", data, o))
                o += 8
            ph.append((cpw, based, raw, regs))
        fps = struct.unpack_from("<%dI" % nch, data, o)
    except (ValueError, TypeError, IndexError):
        return None
    return {"iv_seq": ivs, "ev_seq": evs, "t": t, "ph": ph, "fp": fps, "nreg": nr,
            "smax": smax, "synced": syn}


def fingerprint_rows(rows):
    """CRC32 of configuration rows DSP_CR1..DFE_CR2 (DSP_CR3's self-clearing latch /
    reset bits masked). Equal to the checkpoint's: the chip kept its state."""
    from metering.store import crc32
    buf = bytearray(4 * _CFG_ROWS)
    for r in range(_CFG_ROWS):
        v = rows[r] & 0xFFFFFFFF
        if r == DSP_CR3:
            v &= ~CR3_NOT_COMPARED
        struct.pack_into("<I", buf, 4 * r, v)
    return crc32(buf) or 1


def fingerprint(chip):
    """fingerprint_rows() of what the chip holds now (reads it)."""
    return fingerprint_rows([chip.read_row(r) for r in range(_CFG_ROWS)])


def load_cal(fs):
    """Saved calibration {chip: [per channel {chv, chc, phc, phv, ofa, ofr, ...}]}."""
    from metering.store import Store
    try:
        import json
    except ImportError:  # pragma: no cover
        import ujson as json
    try:
        data = Store(fs, "cal").load()
        return json.loads(data) if data else {}
    except (ValueError, OSError):
        return {}


CAL_KEYS = ("chv", "chc", "phc", "phv", "ofa", "ofaf", "ofr", "ofs")


def apply_saved(chip_cfg, ci, hw):
    """chip_cfg with the saved calibration of chip `ci` merged into its channels."""
    fs = getattr(hw, "fs", None)
    if not fs:
        return chip_cfg
    saved = load_cal(fs).get(str(ci))
    if not saved:
        return chip_cfg
    out = dict(chip_cfg)
    chs = []
    for k, ch in enumerate(chip_cfg.get("ch", ())):
        c = dict(ch)
        if k < len(saved) and saved[k]:
            for key in CAL_KEYS:
                if key in saved[k]:
                    c[key] = saved[k][key]
        chs.append(c)
    out["ch"] = tuple(chs)
    return out
