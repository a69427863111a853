# Ed25519 signature verification (RFC 8032, section 5.1.7) for MicroPython: Python's
# arbitrary-precision ints for the field, our own SHA-512 (ota/sha512.py). Why our own and
# why Ed25519: docs/decisions/0010-ota-ed25519.md.
#
#   ok = verify(pub32, sig64, msg)                 # one call, blocks ~1 s on an MCU
#   async: await verify_async(pub32, sig64, msg)   # yields to the loop every few steps,
#                                                  # so metering keeps its cycle
#
# Strict rules (each is a test in tests/test_ota_crypto.py, against `cryptography`):
#   - S must be below the group order L (no malleable S + L signatures);
#   - A must be a canonical encoding (y < p) of a point on the curve, not of small order
#     (a small-order key would accept forged signatures for many messages);
#   - the check is the cofactorless [S]B - [k]A == R, compared by canonical encoding, so a
#     non-canonical R never verifies.
# Points use extended twisted Edwards coordinates (X:Y:Z:T) with the complete addition
# law of Hisil et al. 2008 ("add-2008-hwcd-3", a = -1): no exceptional cases to get wrong.
from ota.sha512 import sha512

P = (1 << 255) - 19
L = (1 << 252) + 27742317777372353535851937790883648493
D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
D2 = (2 * D) % P
SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
B = (_BX, _BY, 1, (_BX * _BY) % P)
IDENT = (0, 1, 1, 0)


class Counts:
    """Work done by the last verify: point doublings and additions (each one is a fixed
    number of field multiplications: 4 squarings + 4 multiplications for a doubling, 9 for
    an addition), SHA-512 blocks. A board's time is estimated from these."""
    dbl = 0
    add = 0
    sha_blocks = 0


def _add(p, q):
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * D2 * t2 % P
    d = 2 * z1 * z2 % P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _dbl(p):
    x1, y1, z1, _ = p
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    xy = x1 + y1
    e = h - xy * xy % P
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _neg(p):
    x, y, z, t = p
    return ((P - x) % P, y, z, (P - t) % P)


def decode_point(s):
    """32 bytes -> extended point, or None when not a canonical point encoding."""
    if len(s) != 32:
        return None
    v = int.from_bytes(s, "little")
    sign = v >> 255
    y = v & ((1 << 255) - 1)
    if y >= P:
        return None
    u = (y * y - 1) % P
    w = (D * y * y + 1) % P
    # x = u w^3 (u w^7)^((p-5)/8), then fix the square root (RFC 8032 5.1.3)
    w3 = w * w % P * w % P
    x = u * w3 % P * pow(u * w3 % P * w3 % P * w % P, (P - 5) // 8, P) % P
    wx2 = w * x % P * x % P
    if wx2 == u:
        pass
    elif wx2 == (P - u) % P:
        x = x * SQRT_M1 % P
    else:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = P - x
    return (x, y, 1, x * y % P)


def encode_point(p):
    x, y, z, _ = p
    zi = pow(z, P - 2, P)
    x = x * zi % P
    y = y * zi % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def is_small_order(p):
    """True when 8P is the neutral element (the 8 points of order 1, 2, 4 or 8)."""
    q = _dbl(_dbl(_dbl(p)))
    return q[0] % P == 0 and (q[1] - q[2]) % P == 0


def _verify_steps(pub, sig, msg, every=8):
    """Generator: the verification in steps (yields None every `every` bits of the scalar
    loop and after each SHA-512 block); its return value (StopIteration.value) is the
    result. Both entry points below drive it."""
    Counts.dbl = Counts.add = 0
    if len(sig) != 64 or len(pub) != 32:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= L:
        return False                      # malleable: S + L would verify too
    a = decode_point(pub)
    if a is None or is_small_order(a):
        return False
    yield
    h = sha512(sig[:32])
    h.update(pub)
    mv = memoryview(msg)
    for i in range(0, len(msg), 512):
        h.update(mv[i:i + 512])
        yield
    k = int.from_bytes(h.digest(), "little") % L
    Counts.sha_blocks = h.blocks
    # Straus / Shamir: one pass over the bits of s and k computes [s]B + [k](-A)
    na = _neg(a)
    bna = _add(B, na)
    table = (None, B, na, bna)
    q = IDENT
    nd = na_ = 0
    for i in range(252, -1, -1):        # s, k < L < 2^253 (MicroPython has no bit_length)
        q = _dbl(q)
        nd += 1
        sel = (s >> i & 1) | (k >> i & 1) << 1
        if sel:
            q = _add(q, table[sel])
            na_ += 1
        if i % every == 0:
            yield
    Counts.dbl = nd + 3
    Counts.add = na_ + 1
    return encode_point(q) == bytes(sig[:32])


def verify(pub, sig, msg):
    """True when sig is a valid Ed25519 signature of msg by the 32-byte public key pub."""
    g = _verify_steps(pub, sig, msg)
    try:
        while True:
            next(g)
    except StopIteration as e:
        return bool(e.value)


async def verify_async(pub, sig, msg, every=8):
    """verify(), giving the event loop a turn every `every` scalar bits (about 10 ms of
    work on a Cortex-M4 class MCU: metering's cycle is never held up for long)."""
    from util import sleep_ms
    g = _verify_steps(pub, sig, msg, every)
    try:
        while True:
            next(g)
            await sleep_ms(0)
    except StopIteration as e:
        return bool(e.value)
