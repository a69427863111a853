"""The meter's Ed25519 verifier (firmware/ota/ed25519.py, sha512.py) on the MicroPython unix
port, against the `cryptography` package on the host.

Vectors: `cryptography_vectors` (pinned in requirements.txt) ships the Ed25519 test set
of the reference implementation, asymmetric/Ed25519/sign.input (1024 lines of
sk:pk:message:signature+message; its first three lines are RFC 8032 section 7.1 TEST 1,
2 and 3). Malleability and small-order cases are built here, as RFC 8032 and the
"Taming the many EdDSAs" paper (Chalkias et al. 2020) describe them.
"""
import hashlib
import json
import os
import tempfile

import cryptography_vectors
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from comm_harness import run_mp

SIGN_INPUT = os.path.join(os.path.dirname(cryptography_vectors.__file__), "asymmetric",
                          "Ed25519", "sign.input")
L = (1 << 252) + 27742317777372353535851937790883648493
P = (1 << 255) - 19
# RFC 8032 7.1 TEST 1 (quoted from the RFC: secret key, public key, empty message, signature)
RFC_TEST1 = ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
             "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
             "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
# the encodings of the eight points of small order (RFC 7748 / libsodium's blocklist)
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",   # identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",   # order 2
    "0000000000000000000000000000000000000000000000000000000000000080",   # order 4
    "0000000000000000000000000000000000000000000000000000000000000000",   # order 4
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",   # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
]

MP_VERIFY = r"""
import json, binascii
from ota import ed25519
cases = json.loads(open(%r).read())
out = []
for pk, msg, sig in cases:
    out.append(ed25519.verify(binascii.unhexlify(pk), binascii.unhexlify(sig),
                              binascii.unhexlify(msg)))
print(json.dumps(out))
"""


def mp_verify(cases):
    """[(pk hex, msg hex, sig hex)] -> [bool] from the firmware's verifier on micropython."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cases, f)
    try:
        out = run_mp(MP_VERIFY % f.name, timeout=300)
    finally:
        os.remove(f.name)
    return json.loads(out.strip().splitlines()[-1])


def host_verify(pk, msg, sig):
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(pk)).verify(bytes.fromhex(sig),
                                                                     bytes.fromhex(msg))
        return True
    except (InvalidSignature, ValueError):
        return False


def vectors(step=16):
    out = []
    with open(SIGN_INPUT) as f:
        for i, line in enumerate(f):
            if i % step == 0 or i < 3:
                sk, pk, msg, sm, _ = line.strip().split(":")
                out.append((pk, msg, sm[:128]))
    return out


def test_sha512_matches_hashlib_at_every_padding_boundary():
    lengths = [0, 1, 55, 56, 63, 64, 111, 112, 113, 127, 128, 129, 239, 240, 255, 256, 1000]
    data = bytes(range(256)) * 4
    code = ("import binascii\nfrom ota.sha512 import sha512\nd = bytes(range(256)) * 4\n"
            "for n in %r:\n    h = sha512(d[:n // 2]); h.update(d[n // 2:n])\n"
            "    print(binascii.hexlify(h.digest()).decode())\n" % lengths)
    got = run_mp(code).split()
    assert got == [hashlib.sha512(data[:n]).hexdigest() for n in lengths]


def test_rfc8032_and_reference_vectors_agree_with_cryptography():
    vs = vectors()
    assert vs[0] == (RFC_TEST1[1], RFC_TEST1[2], RFC_TEST1[3])   # the file starts with RFC 8032 TEST 1
    cases = []
    for pk, msg, sig in vs:
        cases.append((pk, msg, sig))                             # valid
        bad_msg = msg[:-2] + "%02x" % (int(msg[-2:], 16) ^ 1) if msg else "00"
        cases.append((pk, bad_msg, sig))                         # other message
        bad_sig = sig[:10] + "%02x" % (int(sig[10:12], 16) ^ 4) + sig[12:]
        cases.append((pk, msg, bad_sig))                         # damaged R
        bad_s = sig[:70] + "%02x" % (int(sig[70:72], 16) ^ 1) + sig[72:]
        cases.append((pk, msg, bad_s))                           # damaged S
    got = mp_verify(cases)
    want = [host_verify(*c) for c in cases]
    assert want[0::4] == [True] * len(vs) and not any(want[1::4] + want[2::4] + want[3::4])
    assert got == want


def test_malleable_s_plus_l_is_refused_like_cryptography():
    cases = []
    for pk, msg, sig in vectors(64):
        s = int.from_bytes(bytes.fromhex(sig[64:]), "little")
        if s + L < 1 << 256:
            cases.append((pk, msg, sig[:64] + (s + L).to_bytes(32, "little").hex()))
    assert len(cases) >= 8
    assert mp_verify(cases) == [False] * len(cases)
    assert [host_verify(*c) for c in cases] == [False] * len(cases)


def test_small_order_keys_and_non_canonical_encodings_are_refused():
    """A small-order public key A makes [k]A vanish (times the cofactor), so that some
    forged (R, S) verify for every message under a lax verifier: R = identity, S = 0 with
    A = identity is the classic one. We refuse every small-order A. The host library is
    checked to accept valid signatures only; where it is laxer than us we say so."""
    ident = SMALL_ORDER[0]
    cases = []
    for a in SMALL_ORDER:
        for msg in ("", "6c6970617269"):
            cases.append((a, msg, ident + "00" * 32))
    # non-canonical encodings of y: y + p for y = 1 (identity) and y = 0 (order 4), and a
    # signature whose R is the identity encoded non-canonically
    noncanon = (P + 1).to_bytes(32, "little").hex()
    cases.append((noncanon, "", ident + "00" * 32))
    k = Ed25519PrivateKey.generate()
    pk = k.public_key().public_bytes_raw().hex()
    sig = k.sign(b"lipari").hex()
    cases.append((pk, "6c6970617269", sig))                                  # the control
    got = mp_verify(cases)
    assert got == [False] * (len(cases) - 1) + [True]
    # the host library (OpenSSL's Ed25519) is laxer: it accepts that forgery for the
    # identity key, for any message. A meter must not: its key is fixed in the field.
    assert host_verify(*cases[-1])
    assert host_verify(ident, "", ident + "00" * 32) is True
    assert host_verify(ident, "6c6970617269", ident + "00" * 32) is True


def test_the_async_verifier_gives_the_loop_a_turn_and_counts_its_work():
    pk, msg, sig = vectors()[1]
    code = r"""
import asyncio, binascii, json
from ota import ed25519
ticks = [0]
async def other():
    while True:
        ticks[0] += 1
        await asyncio.sleep_ms(0)
async def main():
    t = asyncio.create_task(other())
    ok = await ed25519.verify_async(binascii.unhexlify(%r), binascii.unhexlify(%r), binascii.unhexlify(%r))
    t.cancel()
    c = ed25519.Counts
    print(json.dumps([ok, ticks[0], c.dbl, c.add, c.sha_blocks]))
asyncio.run(main())
""" % (pk, sig, msg)
    ok, turns, dbl, add, blocks = json.loads(run_mp(code).strip())
    assert ok is True
    assert turns >= 253 // 8, turns            # a turn every 8 scalar bits at least
    assert 250 <= dbl <= 260 and 150 <= add <= 260 and blocks >= 1
