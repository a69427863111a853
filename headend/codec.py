"""Head-end payload decoder (docs/protocol.md, "Payloads").

A separate implementation of the specification, checked against payloads that the firmware
codec (firmware/comm/codec.py) produced on micropython. Anything that does not follow the
specification exactly raises DecodeError with the reason; ingest quarantines it.

    kind, rec = decode(payload)              # kind: "interval" | "event" | "rt"
"""
import json
import struct

VERSION = 1
TYPES = {1: "interval", 2: "event", 3: "rt"}
EVENT_NAMES = {
    1: "sag", 2: "swell", 3: "power_fail", 4: "power_restore", 5: "tamper",
    6: "reverse_power", 7: "calibration", 8: "ota", 9: "counter_preset", 10: "clock_set",
    11: "overcurrent", 12: "chip_error", 13: "queue_drop", 14: "boot",
}
MAX_PAYLOAD = 4096

# OBIS codes (IEC 62056-61) of the record fields, for JSON consumers and docs/protocol.md.
# Per-phase list fields give the code of L1, L2, L3.
OBIS = {
    "ai_wh": "1-0:1.8.0", "ae_wh": "1-0:2.8.0",
    "rq_varh": ["1-0:5.8.0", "1-0:6.8.0", "1-0:7.8.0", "1-0:8.8.0"],
    "ap_vah": "1-0:9.8.0",
    "ai_ph_wh": ["1-0:21.8.0", "1-0:41.8.0", "1-0:61.8.0"],
    "ae_ph_wh": ["1-0:22.8.0", "1-0:42.8.0", "1-0:62.8.0"],
    "v_avg_mv": ["1-0:32.24.0", "1-0:52.24.0", "1-0:72.24.0"],
    "v_min_mv": ["1-0:32.23.0", "1-0:52.23.0", "1-0:72.23.0"],
    "v_max_mv": ["1-0:32.25.0", "1-0:52.25.0", "1-0:72.25.0"],
    "pmax_w": "1-0:1.6.0", "sags": "1-0:32.32.0", "swells": "1-0:32.36.0",
    "tariff_wh": "1-0:1.8.x", "tariff": "0-0:96.14.0", "t_end": "0-0:1.0.0",
    "t": "0-0:1.0.0",
    "v_mv": ["1-0:32.7.0", "1-0:52.7.0", "1-0:72.7.0"],
    "i_ma": ["1-0:31.7.0", "1-0:51.7.0", "1-0:71.7.0"],
    "p_mw": ["1-0:36.7.0", "1-0:56.7.0", "1-0:76.7.0"],
    "q_mvar": ["1-0:23.7.0", "1-0:43.7.0", "1-0:63.7.0"],
    "s_mva": ["1-0:29.7.0", "1-0:49.7.0", "1-0:69.7.0"],
    "pf_milli": ["1-0:33.7.0", "1-0:53.7.0", "1-0:73.7.0"],
    "f_mhz": "1-0:14.7.0",
    "f_ph_mhz": ["1-0:34.7.0", "1-0:54.7.0", "1-0:74.7.0"],
    "angle_mdeg": ["1-0:81.7.40", "1-0:81.7.51", "1-0:81.7.62"],
    "p_mw_total": "1-0:16.7.0", "q_mvar_total": "1-0:3.7.0", "s_mva_total": "1-0:9.7.0",
}


class DecodeError(ValueError):
    """The payload does not follow docs/protocol.md; the message says where."""


class _R:
    def __init__(self, b):
        self.b = b
        self.i = 0

    def u8(self, name):
        if self.i >= len(self.b):
            raise DecodeError("truncated at %s (byte %d)" % (name, self.i))
        self.i += 1
        return self.b[self.i - 1]

    def u16(self, name):
        if self.i + 2 > len(self.b):
            raise DecodeError("truncated at %s (byte %d)" % (name, self.i))
        self.i += 2
        return struct.unpack_from("<H", self.b, self.i - 2)[0]

    def u32(self, name):
        if self.i + 4 > len(self.b):
            raise DecodeError("truncated at %s (byte %d)" % (name, self.i))
        self.i += 4
        return struct.unpack_from("<I", self.b, self.i - 4)[0]

    def uv(self, name):
        # one-byte values first, and no method call per byte (interval records: _uvs)
        b, i = self.b, self.i
        if i < len(b) and b[i] < 0x80:
            self.i = i + 1
            return b[i]
        n = 0
        for k in range(5):
            if i >= len(b):
                self.i = i
                raise DecodeError("truncated at %s (byte %d)" % (name, i))
            c = b[i]
            i += 1
            n |= (c & 0x7F) << (7 * k)
            if not c & 0x80:
                self.i = i
                if k and not c:
                    raise DecodeError("over-long varint at %s (byte %d)" % (name, i - 1))
                return n
        self.i = i
        raise DecodeError("varint longer than 5 bytes at %s (byte %d)" % (name, i))

    def sv(self, name):
        n = self.uv(name)
        return -((n + 1) >> 1) if n & 1 else n >> 1

    def s8(self, name):
        n = self.u8(name)
        if self.i + n > len(self.b):
            raise DecodeError("string %s runs past the end" % name)
        self.i += n
        try:
            return bytes(self.b[self.i - n:self.i]).decode()
        except UnicodeError:
            raise DecodeError("string %s is not UTF-8" % name)


def _uvs(b, i, names):
    """The varints named by names, one after the other from byte i -> (values, next i).
    The ingest's hot path (about 17 varints per interval record, most of them in three
    runs): one call per run, one-byte values first."""
    nb = len(b)
    out = []
    for name in names:
        if i < nb:
            c = b[i]
            if c < 0x80:
                out.append(c)
                i += 1
                continue
        n = sh = 0
        while True:
            if i >= nb:
                raise DecodeError("truncated at %s (byte %d)" % (name, i))
            c = b[i]
            i += 1
            n |= (c & 0x7F) << sh
            if c < 0x80:
                break
            sh += 7
            if sh == 35:
                raise DecodeError("varint longer than 5 bytes at %s (byte %d)" % (name, i))
        if not c:
            raise DecodeError("over-long varint at %s (byte %d)" % (name, i - 1))
        out.append(n)
    return out, i


def _zz(n):
    return -((n + 1) >> 1) if n & 1 else n >> 1


_U32 = struct.Struct("<I").unpack_from
# the names of each run of varints, by whether ai_wh is sent and the phase count
_MID = {(a, nph): (("ai_wh",) if a else ()) + ("ae_wh",) + ("rq_varh",) * 4 + ("ap_vah",)
        + ("ai_ph_wh", "ae_ph_wh") * nph for a in (0, 1) for nph in range(4)}
_TAIL = {}                                 # (sags layout, phases, tariff registers) -> names


def _interval(b, full=True):
    """An interval record from byte 1 of b -> (record, the index after it). full=False:
    the same checks, but instead of the record dict the tuple of the columns the store
    keeps beside the payload (interval_row): the ingest's hot path builds no dict nor the
    voltage lists."""
    nb = len(b)
    (seq,), i = _uvs(b, 1, ("seq",))
    if i + 4 > nb:
        raise DecodeError("truncated at t_end (byte %d)" % i)
    t_end = _U32(b, i)[0]
    (dur_s, flags), i = _uvs(b, i + 4, ("dur_s", "flags"))
    if i + 2 > nb:
        raise DecodeError("truncated at %s (byte %d)" % ("options" if i < nb else "layout", nb))
    layout, opt = b[i], b[i + 1]
    i += 2
    if opt & 0xF8:
        raise DecodeError("unknown option bits 0x%02x" % opt)
    nph = layout & 3
    nt = (layout >> 2) & 15
    if layout & 0x40 and not nph:
        raise DecodeError("ai_wh marked as sum of phases but no phases")
    if layout & 0x80 and not nt:
        raise DecodeError("last tariff marked implied but no tariffs")
    if opt & 1 and not nph:
        raise DecodeError("per-phase sags without phases")
    if i >= nb:
        raise DecodeError("truncated at tariff (byte %d)" % i)
    tariff = b[i]
    i += 1
    ph_invalid = 0
    if opt & 2:
        if i >= nb:
            raise DecodeError("truncated at ph_invalid (byte %d)" % i)
        ph_invalid = b[i]
        i += 1
        if not ph_invalid:
            raise DecodeError("ph_invalid present but 0")
    if ph_invalid >> nph:
        raise DecodeError("ph_invalid 0x%02x names a phase beyond the %d of the record"
                          % (ph_invalid, nph))
    sent = not layout & 0x40
    v, i = _uvs(b, i, _MID[sent, nph])
    j = 1 if sent else 0
    aph, aeph = v[j + 6::2], v[j + 7::2]
    vmin, vmax, vavg = [], [], []
    for _ in range(nph):
        if i + 2 > nb:
            raise DecodeError("truncated at v_avg (byte %d)" % i)
        a = b[i] | b[i + 1] << 8
        (lo, hi), i = _uvs(b, i + 2, ("v_min", "v_max"))
        lo = a - _zz(lo)
        hi = a + _zz(hi)
        if lo < 0 or hi < 0:
            raise DecodeError("negative voltage")
        if full:
            vavg.append(a * 100)
            vmin.append(lo * 100)
            vmax.append(hi * 100)
    ai = v[0] if sent else sum(aph)
    ntw = nt - 1 if layout & 0x80 else nt
    key = (opt & 5, nph, ntw)
    names = _TAIL.get(key)
    if names is None:
        sg = () if opt & 4 else ("sags", "swells") * (nph if opt & 1 else 1)
        names = _TAIL[key] = ("pmax_w",) + sg + ("tariff_wh",) * ntw
    t, i = _uvs(b, i, names)
    if opt & 4:                            # no sags nor swells in this interval
        sags = [0] * nph if opt & 1 else 0
        swells = [0] * nph if opt & 1 else 0
        tw = t[1:]
    elif opt & 1:
        k = 1 + 2 * nph
        sags, swells, tw = t[1:k:2], t[2:k:2], t[k:]
    else:
        sags, swells, tw = t[1], t[2], t[3:]
    if layout & 0x80:
        last = ai - sum(tw)
        if last < 0:
            raise DecodeError("tariff registers exceed ai_wh")
        tw.append(last)
    if not full:                           # store.INTERVAL_COLUMNS, sags/swells summed
        return (seq, t_end, dur_s, flags, tariff, ai, v[j], v[j + 5], t[0],
                sags if type(sags) is int else sum(sags),
                swells if type(swells) is int else sum(swells)), i
    return {"seq": seq, "t_end": t_end, "dur_s": dur_s, "flags": flags, "tariff": tariff,
            "ph_invalid": ph_invalid, "ae_wh": v[j], "rq_varh": v[j + 1:j + 5],
            "ap_vah": v[j + 5], "ai_wh": ai, "pmax_w": t[0], "sags": sags, "swells": swells,
            "ai_ph_wh": aph, "ae_ph_wh": aeph, "v_min_mv": vmin, "v_max_mv": vmax,
            "v_avg_mv": vavg, "tariff_wh": tw}, i


def _event(r):
    rec = {"seq": r.uv("seq"), "t": r.u32("t")}
    code = r.u8("kind")
    if code == 0:
        rec["kind"] = r.s8("kind")
        if not rec["kind"]:
            raise DecodeError("empty event kind")
    elif code in EVENT_NAMES:
        rec["kind"] = EVENT_NAMES[code]
    else:
        raise DecodeError("unknown event code %d" % code)
    rec["phase"] = r.u8("phase")
    tag = r.u8("value tag")
    if tag == 0:
        rec["value"] = None
    elif tag == 1:
        rec["value"] = r.sv("value")
    elif tag == 2:
        rec["value"] = r.s8("value")
    else:
        raise DecodeError("unknown event value tag %d" % tag)
    return rec


_RT_PH = ("v_mv", "i_ma", "p_mw", "q_mvar", "s_mva", "pf_milli", "angle_mdeg", "f_ph_mhz")
_RT_PH_SIGNED = (False, False, True, True, False, True, True, False)
_RT_TAIL = ("f_mhz", "ai_wh", "ae_wh", "p_mw_total", "q_mvar_total", "s_mva_total")
_RT_NAMES = {nph: _RT_PH * nph + _RT_TAIL for nph in range(4)}


def _rt(b, full=True):
    """A live reading from byte 1 of b -> (record, the index after it). One _uvs call for
    all its varints (8 per phase and 6 after them), as _interval: a live reading is ~40 %
    of a fleet's messages. full=False: the same checks, but (t, p_w) instead of the
    record (rt_row)."""
    nb = len(b)
    if 5 > nb:
        raise DecodeError("truncated at t (byte 1)")
    t = _U32(b, 1)[0]
    if 5 >= nb:
        raise DecodeError("truncated at phases (byte 5)")
    nph = b[5]
    if nph > 3:
        raise DecodeError("%d phases (at most 3)" % nph)
    v, i = _uvs(b, 6, _RT_NAMES[nph])
    n8 = 8 * nph
    if not full:
        if i + 1 >= nb:
            raise DecodeError("truncated at %s (byte %d)" % (("tariff", i) if i >= nb
                                                            else ("valid", i + 1)))
        return (t, sum([_zz(x) for x in v[2:n8:8]]) / 1000), i + 2
    rec = {"t": t}
    for k in range(8):
        col = v[k:n8:8]
        rec[_RT_PH[k]] = [_zz(x) for x in col] if _RT_PH_SIGNED[k] else col
    rec["f_mhz"], rec["ai_wh"], rec["ae_wh"] = v[n8], v[n8 + 1], v[n8 + 2]
    rec["p_mw_total"], rec["q_mvar_total"] = _zz(v[n8 + 3]), _zz(v[n8 + 4])
    rec["s_mva_total"] = v[n8 + 5]
    if i >= nb:
        raise DecodeError("truncated at tariff (byte %d)" % i)
    rec["tariff"] = b[i]
    if i + 1 >= nb:
        raise DecodeError("truncated at valid (byte %d)" % (i + 1))
    rec["valid"] = b[i + 1]
    return rec, i + 2


_REQUIRED = {"interval": ("seq", "t_end"), "event": ("seq", "t", "kind"), "rt": ("t",)}
# JSON records: the fields the binary format defines must have its types (the store puts
# several of them in columns); integers are kept within 64 bits, signed.
_INT = {"interval": ("dur_s", "flags", "tariff", "ai_wh", "ae_wh", "ap_vah", "pmax_w",
                     "ph_invalid"),
        "event": ("phase",),
        "rt": ("valid", "f_mhz", "ai_wh", "ae_wh", "p_mw_total", "q_mvar_total",
               "s_mva_total", "tariff")}
_INTS = {"interval": ("rq_varh", "ai_ph_wh", "ae_ph_wh", "v_min_mv", "v_max_mv", "v_avg_mv",
                      "tariff_wh"),
         "event": (),
         "rt": ("v_mv", "i_ma", "p_mw", "q_mvar", "s_mva", "pf_milli", "angle_mdeg",
                "f_ph_mhz")}
_I64 = 1 << 63


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _int64(v, where):
    # every integer anywhere in a JSON record fits a signed 64-bit integer, and every
    # string is Unicode text (no lone surrogate from a \uD800 escape): the store needs both
    if _is_int(v):
        if not -_I64 <= v < _I64:
            raise DecodeError("%s: %d does not fit 64 bits" % (where, v))
    elif isinstance(v, str):
        _text(v, where)
    elif isinstance(v, list):
        for x in v:
            _int64(x, where)
    elif isinstance(v, dict):
        for k, x in v.items():
            _text(k, where)
            _int64(x, "%s.%s" % (where, k))


def _text(s, where):
    try:
        s.encode("utf-8")
    except UnicodeError:
        raise DecodeError("%s: a string with a lone surrogate escape (\\uD800-\\uDFFF)"
                          % where)


def _check_json(kind, rec):
    for k in _REQUIRED[kind]:
        if k not in rec:
            raise DecodeError("%s record without %s" % (kind, k))
    for k, v in rec.items():
        _text(k, "key")
        _int64(v, k)
    for k in ("seq", "t_end", "t"):
        if k in rec and (not _is_int(rec[k]) or rec[k] < 0):
            raise DecodeError("%s must be a non-negative integer" % k)
    for k in _INT[kind]:
        if k in rec and not _is_int(rec[k]):
            raise DecodeError("%s must be an integer" % k)
    for k in _INTS[kind] + (("sags", "swells") if kind == "interval" else ()):
        if k not in rec:
            continue
        v = rec[k]
        if k in ("sags", "swells") and _is_int(v):
            continue
        if not isinstance(v, list) or not all(_is_int(x) for x in v):
            raise DecodeError("%s must be a list of integers" % k)
    if kind == "event":
        if not isinstance(rec["kind"], str) or not rec["kind"]:
            raise DecodeError("event kind must be a non-empty string")
        v = rec.get("value")
        if v is not None and not _is_int(v) and not isinstance(v, str):
            raise DecodeError("event value must be an integer, a string or null")


def _no_constant(name):
    raise ValueError("%s is not JSON (RFC 8259)" % name)


def decode(payload, expect=None):
    """Decode one payload (binary v1 or JSON) -> (kind, record dict).
    expect: the kind the topic says; a mismatch is an error."""
    b = bytes(payload)
    if not b:
        raise DecodeError("empty payload")
    if len(b) > MAX_PAYLOAD:
        raise DecodeError("payload of %d bytes exceeds %d" % (len(b), MAX_PAYLOAD))
    if b[:1] == b"{":
        try:
            d = json.loads(b.decode(), parse_constant=_no_constant)
        except (UnicodeError, ValueError, RecursionError) as e:
            raise DecodeError("bad JSON: %s" % e)
        if not isinstance(d, dict):
            raise DecodeError("JSON payload is not an object")
        v = d.pop("v", None)
        if v != VERSION or isinstance(v, bool) or not isinstance(v, int):
            raise DecodeError("JSON payload version is not %d" % VERSION)
        kind = d.pop("k", None)
        if kind not in _REQUIRED:
            raise DecodeError("JSON payload kind %r unknown" % (kind,))
        _check_json(kind, d)
        rec = d
    else:
        ver, t = b[0] >> 4, b[0] & 15
        if ver != VERSION:
            raise DecodeError("binary payload version %d (this head-end reads %d)" % (ver, VERSION))
        kind = TYPES.get(t)
        if kind is None:
            raise DecodeError("binary payload type %d unknown" % t)
        if t == 1:
            rec, end = _interval(b)
        elif t == 3:
            rec, end = _rt(b)
        else:
            r = _R(b)
            r.i = 1
            rec = _event(r)
            end = r.i
        if end != len(b):
            raise DecodeError("%d unexpected bytes after the %s record" % (len(b) - end, kind))
    if expect is not None and expect != kind:
        raise DecodeError("topic says %s but payload is %s" % (expect, kind))
    return kind, rec


# What the store keeps of an interval in columns beside its payload, in this order
# (headend/store.py, table intervals; sags and swells summed over the phases).
INTERVAL_COLUMNS = ("seq", "t_end", "dur_s", "flags", "tariff", "ai_wh", "ae_wh", "ap_vah",
                    "pmax_w", "sags", "swells")
_BIN_INTERVAL = VERSION << 4 | 1
_BIN_RT = VERSION << 4 | 3


def _total(v):
    return sum(v) if isinstance(v, (list, tuple)) else v


def _whole(b, part, kind):
    """The row of a binary record that must fill its payload (rt_row, interval_row)."""
    row, end = part(b, False)
    if end != len(b):
        raise DecodeError("%d unexpected bytes after the %s record" % (len(b) - end, kind))
    return row


def rt_row(payload):
    """A live reading's payload -> (t, p_w): its time and total active power in W (the
    store's columns, store._p_w of the record), with the checks and DecodeError of
    decode(payload, expect="rt"), as interval_row."""
    b = bytes(payload)
    if b and b[0] == _BIN_RT and len(b) <= MAX_PAYLOAD:
        return _whole(b, _rt, "rt")
    rec = decode(b, expect="rt")[1]
    return rec["t"], _p_w(rec)


def _p_w(rec):
    """Total active power in W of a live reading (p_mw per phase or total p_w)."""
    if rec.get("p_w") is not None:
        return rec["p_w"]
    p = rec.get("p_mw")
    if isinstance(p, (list, tuple)):
        return sum(x for x in p if isinstance(x, (int, float))) / 1000
    if isinstance(p, (int, float)):
        return p / 1000
    return None


def interval_row(payload):
    """An interval payload -> the tuple of INTERVAL_COLUMNS, with the checks of
    decode(payload, expect="interval") and its DecodeError for anything else (the same
    code: a binary record goes through _interval, a JSON one through decode). The
    ingest's hot path: no record dict is built for a record that is stored as its
    payload (docs/decisions/0018)."""
    b = bytes(payload)
    if b and b[0] == _BIN_INTERVAL and len(b) <= MAX_PAYLOAD:
        return _whole(b, _interval, "interval")
    rec = decode(b, expect="interval")[1]
    g = rec.get
    return (rec["seq"], rec["t_end"], g("dur_s"), g("flags"), g("tariff"), g("ai_wh"),
            g("ae_wh"), g("ap_vah"), g("pmax_w"), _total(g("sags")), _total(g("swells")))
