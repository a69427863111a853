# The signed release manifest (docs/ota.md, "Manifest"): parse the offer the head-end
# sends, check its Ed25519 signature with the meter's public key, and check that this
# meter may install it. Every refusal has a code (what the head-end counts) and a text.
import json
import binascii

from version import number

# Payload kinds: "mpy", A/B directories of .mpy files (the body is a directory, then the
# files); "romfs", one ROMFS image per slot (the body is the image, dir_size 0).
KINDS = ("mpy", "romfs")
ROMFS_MAGIC = b"\xd2\xcd\x31"
# Bytes of each block's entry in the table: SHA-256 truncated to 128 bits. The table as
# a whole is bound by its full SHA-256 in the signed manifest; replacing a block then
# needs a second preimage of a 128-bit hash (2^128 work). Half the table of full hashes:
# 1.6 % less on the wire (ota_overhead_ratio).
HASH = 16
_MIN_TRIAL_S = 60


class Refused(Exception):
    """The offer is refused: .code is short and stable (docs/ota.md), str() says why."""

    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


def _hex(s, n, what):
    try:
        b = binascii.unhexlify(s)
    except (ValueError, TypeError):
        b = b""
    if len(b) != n:
        raise Refused("malformed", "%s must be %d hex digits" % (what, 2 * n))
    return b


def parse_offer(payload):
    """Offer JSON {"id", "manifest" (text), "sig" (hex), "url"?} -> dict with the
    manifest's exact bytes (what was signed) and the parsed manifest."""
    try:
        o = json.loads(payload)
    except ValueError:
        raise Refused("malformed", "offer is not JSON")
    if not isinstance(o, dict) or not isinstance(o.get("manifest"), str):
        raise Refused("malformed", "offer needs \"manifest\" (the signed JSON text)")
    oid = o.get("id")
    if not isinstance(oid, str) or not 1 <= len(oid) <= 40:
        raise Refused("malformed", "offer needs an \"id\" of 1..40 characters")
    url = o.get("url")
    if url is not None and (not isinstance(url, str) or not url.startswith("http")):
        raise Refused("malformed", "url must be an http:// or https:// URL")
    raw = o["manifest"].encode()
    sig = _hex(o.get("sig"), 64, "sig")
    try:
        m = json.loads(raw)
    except ValueError:
        raise Refused("malformed", "manifest is not JSON")
    return {"id": oid, "raw": raw, "sig": sig, "m": check_fields(m), "url": url}


def check_fields(m):
    """The manifest's shape (before its signature is even checked: cheap refusals of
    garbage). Returns m."""
    if not isinstance(m, dict) or m.get("v") != 1:
        raise Refused("malformed", "manifest version must be 1")
    for k, t in (("version", str), ("min_version", str), ("boards", list), ("kind", str),
                 ("expires", int), ("block", int), ("dir_size", int), ("body_size", int),
                 ("table_sha256", str), ("body_sha256", str), ("trial_s", int)):
        if not isinstance(m.get(k), t) or isinstance(m.get(k), bool):
            raise Refused("malformed", "manifest field %r missing or not a %s" % (k, t.__name__))
    try:
        number(m["version"])
        number(m["min_version"])
    except ValueError as e:
        raise Refused("malformed", str(e))
    if number(m["min_version"]) > number(m["version"]):
        raise Refused("malformed", "min_version is above version")
    if m["kind"] not in KINDS:
        raise Refused("kind", "payload kind %r is not supported by this firmware (%s)"
                      % (m["kind"], ", ".join(KINDS)))
    if not 256 <= m["block"] <= 4096 or m["block"] & (m["block"] - 1):
        raise Refused("malformed", "block must be a power of two, 256..4096")
    lo = 0 if m["kind"] == "romfs" else 1      # an image has no directory
    if not lo <= m["dir_size"] <= m["body_size"] or m["body_size"] > 16 * 1024 * 1024 or \
            (lo == 0 and (m["dir_size"] or m["body_size"] < 8)):
        raise Refused("malformed", "sizes out of range")
    if m["trial_s"] < _MIN_TRIAL_S:
        raise Refused("malformed", "trial_s below %d s" % _MIN_TRIAL_S)
    m["table_sha"] = _hex(m["table_sha256"], 32, "table_sha256")
    m["body_sha"] = _hex(m["body_sha256"], 32, "body_sha256")
    return m


def nblocks(m):
    return (m["body_size"] + m["block"] - 1) // m["block"]


def table_size(m):
    return HASH * nblocks(m)


def wire_size(m):
    """Bytes of the transferred object: the block hash table, then the body."""
    return table_size(m) + m["body_size"]


def tag(offer):
    """4 bytes naming an offer in every data chunk: the start of SHA-256(manifest)."""
    import hashlib
    return hashlib.sha256(offer["raw"]).digest()[:4]


async def verify(offer, pub):
    """Signature check (Ed25519, yields to the loop while it works)."""
    from ota.ed25519 import verify_async
    if not await verify_async(pub, offer["sig"], offer["raw"]):
        raise Refused("signature", "signature does not verify with this meter's public key")


def check_install(m, board, running, floor, now, synced):
    """May this meter install m? board: board.NAME; running: its version string; floor:
    the anti-rollback floor (0xMMmmpp) from the switch record; now/synced: its clock."""
    if board not in m["boards"]:
        raise Refused("board", "release is for %s, this meter is %s"
                      % (", ".join(m["boards"]), board))
    if not synced:
        raise Refused("clock", "the meter's clock is not synced: cannot check the expiry")
    if now > m["expires"]:
        raise Refused("expired", "manifest expired at %d (meter time %d)" % (m["expires"], now))
    v = number(m["version"])
    if v < floor:
        raise Refused("below_min", "version %s is below this meter's minimum %d.%d.%d"
                      % (m["version"], floor >> 16, floor >> 8 & 255, floor & 255))
    if v == number(running):
        raise Refused("installed", "version %s is already running" % running)
    if v < number(running) and not m.get("downgrade") is True:
        raise Refused("downgrade", "version %s is older than the running %s (a downgrade "
                      "needs a release signed with downgrade: true)" % (m["version"], running))


def piece_end(m, off):
    """End of the wire piece starting at off: pieces end at multiples of the block inside
    the table (the last one at its end), then at table_size + k * block."""
    b, ts = m["block"], table_size(m)
    if off < ts:
        return min((off // b + 1) * b, ts)
    return min(ts + ((off - ts) // b + 1) * b, wire_size(m))


def answer_end(m, off, nbytes):
    """End of the head-end's answer to a request {"o": off, "n": nbytes}: whole pieces
    from off while their total stays within nbytes (at least one), up to the image's end.
    The meter waits for exactly these pieces (docs/ota.md, "MQTT transfer")."""
    end = piece_end(m, off)
    total = wire_size(m)
    while end < total and piece_end(m, end) - off <= nbytes:
        end = piece_end(m, end)
    return end
