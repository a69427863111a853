# Payload codec: records -> bytes for MQTT. Specified in docs/protocol.md ("Payloads");
# the head-end decoder (headend/codec.py) is a separate implementation of the same text
# and is tested against what this module produces on micropython.
#
# Binary v1 is the default (a 3-phase interval record fits in < 64 bytes); JSON is the
# option for links where size does not matter or for people reading mosquitto_sub.
import struct
import json

try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

VERSION = const(1)
_T_INTERVAL = const(1)
_T_EVENT = const(2)
_T_RT = const(3)
KINDS = (("interval", 1), ("event", 2), ("rt", 3))

# Event kinds with a one-byte code; anything else is sent as a string (code 0).
EVENT_CODES = (
    ("sag", 1), ("swell", 2), ("power_fail", 3), ("power_restore", 4), ("tamper", 5),
    ("reverse_power", 6), ("calibration", 7), ("ota", 8), ("counter_preset", 9),
    ("clock_set", 10), ("overcurrent", 11), ("chip_error", 12), ("queue_drop", 13),
    ("boot", 14),
)


def _lookup(pairs, key, default):
    # util.lookup, repeated: the head-end's load generator loads this file alone
    # (headend/loadtest_meter.py), so it imports nothing from the firmware
    for k, v in pairs:
        if k == key:
            return v
    return default


class CodecError(Exception):
    """A record cannot be encoded (a field has the wrong type or is out of range)."""


def _uv(out, n, name):
    # unsigned LEB128, at most 5 bytes (< 2**35)
    if not isinstance(n, int) or n < 0 or n >= 0x800000000:
        raise CodecError("field %s=%r: need an integer 0..2**35-1" % (name, n))
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _sv(out, n, name):
    # zigzag signed varint
    if not isinstance(n, int) or n < -0x400000000 or n >= 0x400000000:
        raise CodecError("field %s=%r: need an integer within +-2**34" % (name, n))
    _uv(out, (n << 1) if n >= 0 else ((-n) << 1) - 1, name)


def _u32(out, n, name):
    if not isinstance(n, int) or n < 0 or n > 0xFFFFFFFF:
        raise CodecError("field %s=%r: need an integer 0..2**32-1" % (name, n))
    out.extend(struct.pack("<I", n))


def _list(rec, key, n, name=None):
    v = rec.get(key)
    if v is None:
        return [0] * n
    if not isinstance(v, (list, tuple)) or len(v) < n:
        raise CodecError("field %s must be a list of %d integers" % (key, n))
    return v


def _dv(v_mv):
    # voltage in 0.1 V, rounded half up (binary carries 0.1 V, JSON carries mV)
    if not isinstance(v_mv, int) or v_mv < 0:
        raise CodecError("voltage %r: need a non-negative integer in mV" % (v_mv,))
    return (v_mv + 50) // 100


def _enc_interval(rec, out):
    g = rec.get
    _uv(out, g("seq"), "seq")
    _u32(out, g("t_end"), "t_end")
    _uv(out, g("dur_s", 0), "dur_s")
    _uv(out, g("flags", 0), "flags")
    aph = g("ai_ph_wh") or ()
    nph = len(aph)
    if nph > 3:
        raise CodecError("at most 3 phases, got %d in ai_ph_wh" % nph)
    tw = g("tariff_wh") or ()
    nt = len(tw)
    if nt > 15:
        raise CodecError("at most 15 tariff registers, got %d" % nt)
    ai = g("ai_wh", 0)
    layout = nph | (nt << 2)
    if nph and ai == sum(aph):
        layout |= 0x40                      # ai_wh is the sum of the phases: not sent
    if nt and ai == sum(tw) and tw[-1] >= 0:
        layout |= 0x80                      # last tariff register = ai_wh - the others
    sags = g("sags", 0)
    swells = g("swells", 0)
    per_ph = isinstance(sags, (list, tuple)) or isinstance(swells, (list, tuple))
    if per_ph and not nph:
        raise CodecError("sags/swells per phase need ai_ph_wh to give the phase count")
    none = not (sum(sags) if isinstance(sags, (list, tuple)) else sags) and \
        not (sum(swells) if isinstance(swells, (list, tuple)) else swells)
    inv = g("ph_invalid", 0)
    if not isinstance(inv, int) or not 0 <= inv < (1 << nph):
        raise CodecError("field ph_invalid=%r: need a mask of the %d phases" % (inv, nph))
    out.append(layout)
    # options: bit 0 sags/swells per phase, bit 1 ph_invalid follows, bit 2 no sags/swells
    out.append((1 if per_ph else 0) | (2 if inv else 0) | (4 if none else 0))
    t = g("tariff", 0)
    if not isinstance(t, int) or not 0 <= t <= 255:
        raise CodecError("field tariff=%r: need 0..255" % (t,))
    out.append(t)
    if inv:
        out.append(inv)
    if not layout & 0x40:
        _uv(out, ai, "ai_wh")
    _uv(out, g("ae_wh", 0), "ae_wh")
    rq = _list(rec, "rq_varh", 4)
    for i in range(4):
        _uv(out, rq[i], "rq_varh")
    _uv(out, g("ap_vah", 0), "ap_vah")
    aeph = _list(rec, "ae_ph_wh", nph)
    vmin = _list(rec, "v_min_mv", nph)
    vmax = _list(rec, "v_max_mv", nph)
    vavg = _list(rec, "v_avg_mv", nph)
    for i in range(nph):
        _uv(out, aph[i], "ai_ph_wh")
        _uv(out, aeph[i], "ae_ph_wh")
    for i in range(nph):
        a = _dv(vavg[i])
        if a > 0xFFFF:
            raise CodecError("v_avg_mv %d above 6553.5 V" % vavg[i])
        out.extend(struct.pack("<H", a))
        _sv(out, a - _dv(vmin[i]), "v_min_mv")
        _sv(out, _dv(vmax[i]) - a, "v_max_mv")
    _uv(out, g("pmax_w", 0), "pmax_w")
    if none:
        pass
    elif per_ph:
        sg = _list(rec, "sags", nph) if isinstance(sags, (list, tuple)) else [0] * nph
        sw = _list(rec, "swells", nph) if isinstance(swells, (list, tuple)) else [0] * nph
        for i in range(nph):
            _uv(out, sg[i], "sags")
            _uv(out, sw[i], "swells")
    else:
        _uv(out, sags, "sags")
        _uv(out, swells, "swells")
    for i in range(nt - 1 if layout & 0x80 else nt):
        _uv(out, tw[i], "tariff_wh")


def _short_str(out, s, name):
    b = s.encode() if isinstance(s, str) else None
    if b is None or len(b) > 255:
        raise CodecError("field %s=%r: need a string of at most 255 bytes" % (name, s))
    out.append(len(b))
    out.extend(b)


def _enc_event(rec, out):
    _uv(out, rec.get("seq"), "seq")
    _u32(out, rec.get("t"), "t")
    kind = rec.get("kind")
    code = _lookup(EVENT_CODES, kind, 0)
    out.append(code)
    if not code:
        _short_str(out, kind, "kind")
    ph = rec.get("phase") or 0
    if not isinstance(ph, int) or not 0 <= ph <= 255:
        raise CodecError("field phase=%r: need 0..255" % (ph,))
    out.append(ph)
    v = rec.get("value")
    if v is None:
        out.append(0)
    elif isinstance(v, bool) or not isinstance(v, (int, str)):
        raise CodecError("event value %r: need an integer or a string" % (v,))
    elif isinstance(v, int):
        out.append(1)
        _sv(out, v, "value")
    else:
        out.append(2)
        _short_str(out, v, "value")


def _enc_rt(rec, out):
    g = rec.get
    _u32(out, g("t"), "t")
    v = g("v_mv") or ()
    nph = len(v)
    if nph > 3:
        raise CodecError("at most 3 phases, got %d in v_mv" % nph)
    out.append(nph)
    i_ma = _list(rec, "i_ma", nph)
    p = _list(rec, "p_mw", nph)
    q = _list(rec, "q_mvar", nph)
    s = _list(rec, "s_mva", nph)
    pf = _list(rec, "pf_milli", nph)
    ang = _list(rec, "angle_mdeg", nph)
    fph = _list(rec, "f_ph_mhz", nph)
    for k in range(nph):
        _uv(out, v[k], "v_mv")
        _uv(out, i_ma[k], "i_ma")
        _sv(out, p[k], "p_mw")
        _sv(out, q[k], "q_mvar")
        _uv(out, s[k], "s_mva")
        _sv(out, pf[k], "pf_milli")
        _sv(out, ang[k], "angle_mdeg")
        _uv(out, fph[k], "f_ph_mhz")
    _uv(out, g("f_mhz", 0), "f_mhz")
    _uv(out, g("ai_wh", 0), "ai_wh")
    _uv(out, g("ae_wh", 0), "ae_wh")
    _sv(out, g("p_mw_total", sum(p[:nph])), "p_mw_total")
    _sv(out, g("q_mvar_total", sum(q[:nph])), "q_mvar_total")
    _uv(out, g("s_mva_total", sum(s[:nph])), "s_mva_total")
    t = g("tariff", 0)
    valid = g("valid", (1 << nph) - 1)
    if not isinstance(t, int) or not 0 <= t <= 255 or not isinstance(valid, int) \
            or not 0 <= valid <= 255:
        raise CodecError("rt tariff / valid must be 0..255")
    out.append(t)
    out.append(valid)


def encode(kind, rec, fmt="bin"):
    """Encode one record ("interval", "event" or "rt") as bytes. fmt "bin" or "json".
    Raises CodecError naming the field that is wrong."""
    t = _lookup(KINDS, kind, None)
    if t is None:
        raise CodecError("unknown record kind %r; one of interval, event, rt" % (kind,))
    if not isinstance(rec, dict):
        raise CodecError("a record must be a dict")
    if fmt == "json":
        d = {"v": VERSION, "k": kind}
        for key in rec:
            d[key] = rec[key]
        try:
            return json.dumps(d).encode()
        except (TypeError, ValueError) as e:
            raise CodecError("record cannot be written as JSON: %s" % e)
    if fmt != "bin":
        raise CodecError("unknown payload format %r; use 'bin' or 'json'" % (fmt,))
    out = bytearray()
    out.append((VERSION << 4) | t)
    try:
        if t == _T_INTERVAL:
            _enc_interval(rec, out)
        elif t == _T_EVENT:
            _enc_event(rec, out)
        else:
            _enc_rt(rec, out)
    except (TypeError, IndexError) as e:
        raise CodecError("%s record has a field of the wrong type: %s" % (kind, e))
    return bytes(out)
