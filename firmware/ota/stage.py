# Staging a release into the inactive slot, chunk by chunk (docs/ota.md, "Image").
#
# The transferred object is  table || body : the table holds SHA-256 of every `block` of
# the body (truncated to manifest.HASH = 16 bytes each) and is checked as a whole against the signed manifest; then
# every body block is checked against its table entry before a byte of it is written.
# The body is the directory (JSON [[path, size, sha256], ...], dir_size bytes) followed by
# the files in that order; blocks are split across files as they come.
#
# Nothing is held in RAM beyond one chunk: each piece is appended to its file and the
# file closed (littlefs commits on close), so the files on flash ARE the progress: after
# a reboot, next_offset() finds the first byte missing and the download resumes there.
import os
import json
import hashlib

from ota.manifest import Refused, nblocks, table_size, wire_size, HASH

DL = "dl.json"        # the download in progress: offer id, manifest, signature, slot
TAB = "dl.tab"        # the block hash table
DIRF = "dl.dir"       # the body's directory part
_PATH_OK = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./"


def size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


def makedirs(path):
    p = "/" if path.startswith("/") else ""
    for part in path.split("/"):
        if not part:
            continue
        p = p + part if p in ("", "/") else p + "/" + part
        if size(p) < 0:
            try:
                os.mkdir(p)
            except OSError:
                pass


def rmtree(path):
    """Remove a directory tree (or a file); missing is fine."""
    try:
        mode = os.stat(path)[0]
    except OSError:
        return
    if mode & 0x4000:
        for ent in list(os.ilistdir(path)):
            rmtree(path + "/" + ent[0])
        os.rmdir(path)
    else:
        os.remove(path)


def remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def free_bytes(path):
    try:
        st = os.statvfs(path)
        return st[0] * st[4]
    except (OSError, AttributeError):
        return None


def check_dir(entries, body_size, dir_size):
    """The directory must be a list of [path, size] that exactly fills the body; paths
    are relative, plain, and never the bootstrap."""
    if not isinstance(entries, list) or not entries:
        raise Refused("malformed", "directory is empty or not a list")
    total = dir_size
    seen = {}
    for e in entries:
        if not isinstance(e, list) or len(e) != 2 or not isinstance(e[0], str) or \
                not isinstance(e[1], int) or isinstance(e[1], bool) or e[1] < 0:
            raise Refused("malformed", "bad directory entry %r" % (e,))
        p = e[0]
        if not p or p[0] == "/" or ".." in p or "//" in p or p in seen or \
                any(c not in _PATH_OK for c in p) or p.split("/")[0] in ("boot.py", "boot.mpy"):
            raise Refused("malformed", "bad path %r in the directory" % (p,))
        seen[p] = 1
        total += e[1]
    if total != body_size:
        raise Refused("malformed", "directory sizes do not add up to the body size")
    if "main.mpy" not in seen and "main.py" not in seen:
        raise Refused("malformed", "the release has no main module")
    return entries


class Stage:
    """One download into `slot_dir` (d/a or d/b) under the OTA directory d.
    m: the parsed manifest. Methods return quickly: one chunk at a time."""

    def __init__(self, d, m, slot_dir):
        self.d = d
        self.m = m
        self.slot_dir = slot_dir
        self.block = m["block"]
        self.tsize = table_size(m)
        self.total = wire_size(m)
        self.files = None             # [(path on flash, size)], once the directory is in
        self.stats = {"bad_chunks": 0, "table_restarts": 0, "written": 0}
        self._load_dir()

    # -- where things are ------------------------------------------------------------
    def _tab(self):
        return self.d + "/" + TAB

    def _dirf(self):
        return self.d + "/" + DIRF

    def _load_dir(self):
        if size(self._dirf()) != self.m["dir_size"]:
            return
        with open(self._dirf()) as f:
            try:
                ent = json.loads(f.read())
            except ValueError:
                ent = None
        try:
            ent = check_dir(ent, self.m["body_size"], self.m["dir_size"])
        except Refused:
            remove(self._dirf())     # written from verified blocks, so only a flash fault
            raise
        self.entries = ent
        self.files = [(self._dirf(), self.m["dir_size"])] + \
            [(self.slot_dir + "/" + e[0], e[1]) for e in ent]

    def next_offset(self):
        """First wire byte not yet on flash (== total when the download is complete)."""
        t = size(self._tab())
        if t < self.tsize:
            return max(t, 0)
        done = 0
        for path, n in (self.files or [(self._dirf(), self.m["dir_size"])]):
            s = max(size(path), 0)
            done += min(s, n)
            if s < n:
                break
        return self.tsize + done

    def done(self):
        return self.next_offset() >= self.total

    # -- accepting a chunk --------------------------------------------------------------
    def accept(self, off, data):
        """A chunk of the wire object at offset `off`. Returns the number of new bytes
        written (0: not the one we need, or already there). Raises ChunkError when it
        fails its check (the caller asks for it again)."""
        want = self.next_offset()
        if off > want or off + len(data) <= want:
            return 0
        if off < self.tsize:
            return self._table(off, data, want)
        if (off - self.tsize) % self.block:
            return 0
        j = (off - self.tsize) // self.block
        exp = self.block if j < nblocks(self.m) - 1 else \
            self.m["body_size"] - j * self.block
        if len(data) < exp:
            raise ChunkError("chunk at %d is short (%d of %d bytes)" % (off, len(data), exp))
        data = memoryview(data)[:exp]
        with open(self._tab(), "rb") as f:
            f.seek(HASH * j)
            h = f.read(HASH)
        if hashlib.sha256(data).digest()[:HASH] != h:
            self.stats["bad_chunks"] += 1
            raise ChunkError("block %d does not match its signed hash" % j)
        return self._write_body(off - self.tsize, data, want - self.tsize)

    def _table(self, off, data, want):
        if off != want and off % self.block:
            return 0
        skip = want - off
        n = min(len(data) - skip, self.tsize - want)
        with open(self._tab(), "ab") as f:
            f.write(memoryview(data)[skip:skip + n])
        self.stats["written"] += n
        if want + n == self.tsize:
            # the whole table is in: it must be the one the signature covers
            h = hashlib.sha256()
            with open(self._tab(), "rb") as f:
                buf = bytearray(256)
                while True:
                    k = f.readinto(buf)
                    if not k:
                        break
                    h.update(memoryview(buf)[:k])
            if h.digest() != self.m["table_sha"]:
                remove(self._tab())
                self.stats["table_restarts"] += 1
                self.stats["bad_chunks"] += 1
                raise ChunkError("block table does not match the signed manifest")
        return n

    def _write_body(self, boff, data, have):
        """Write data (at body offset boff) from body offset `have` on, file by file;
        the directory comes first, and once it is complete the files it names follow."""
        end_data = boff + len(data)
        written = 0
        while True:
            loaded = self.files is not None
            base = 0
            for path, n in (self.files or [(self._dirf(), self.m["dir_size"])]):
                end = base + n
                a = max(have, base)
                b = min(end, end_data)
                if b > a and a == have:
                    self._append(path, data[a - boff:b - boff])
                    written += b - a
                    have = b
                elif n == 0 and have >= base and size(path) < 0:
                    self._append(path, b"")          # an empty file exists too
                base = end
            if loaded or have < self.m["dir_size"]:
                break
            self._load_dir()                         # the directory is in: now the files
        self.stats["written"] += written
        return written

    def _append(self, path, piece):
        if size(path) < 0 and "/" in path:
            makedirs(path.rsplit("/", 1)[0])
        with open(path, "ab") as f:
            f.write(piece)

    # -- after the last chunk ------------------------------------------------------------
    def check_files(self):
        """Generator: read the staged body back from flash (the directory, then every
        file) and check each block against the signed table again: catches a flash that
        did not keep what was written. Yields after each block; raises Refused("flash")."""
        blk = self.block
        buf = bytearray(blk)
        mv = memoryview(buf)
        fill = 0
        j = 0
        tab = open(self._tab(), "rb")
        try:
            for path, n in self.files:
                with open(path, "rb") as f:
                    left = n
                    while left:
                        k = f.readinto(mv[fill:fill + min(blk - fill, left)])
                        if not k:
                            raise Refused("flash", "%s on flash is shorter than the release" % path)
                        fill += k
                        left -= k
                        if fill == blk:
                            self._check_block(tab, j, mv[:fill], path)
                            j += 1
                            fill = 0
                            yield
            if fill:
                self._check_block(tab, j, mv[:fill], "the last file")
        finally:
            tab.close()

    def _check_block(self, tab, j, data, path):
        tab.seek(HASH * j)
        if hashlib.sha256(data).digest()[:HASH] != tab.read(HASH):
            raise Refused("flash", "block %d (%s) on flash does not match the release" % (j, path))

    def cleanup(self):
        for p in (DL, TAB, DIRF):
            remove(self.d + "/" + p)


class ChunkError(Exception):
    """One chunk failed its check; ask for it again."""
