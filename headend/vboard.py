"""`lipari vboard`: a virtual meter board on a pty that mpremote can flash.

    lipari vboard --dir var/vboard --link /tmp/lipari-vm0 &
    make mpy && lipari deploy --port /tmp/lipari-vm0 --board unix_sim_3ph --no-reset
    mpremote connect /tmp/lipari-vm0 resume exec "import main; main.main(['--step', '--days', '1'])"

The MicroPython unix port runs its REPL on the pty (through socat) with `--dir` as its
filesystem root, like a board's flash: what `lipari deploy` copies lands there and is
imported from there. Only `sim` is taken from the repository, since simulation boards need
the simulated chips.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

from headend import ROOT
from headend.meter import micropython_path


def start(directory, link, heap="256k"):
    """Start the virtual board; returns the socat process (stop it with stop())."""
    socat = shutil.which("socat")
    if not socat:
        raise SystemExit("lipari vboard: socat is missing (apt-get install socat; `make setup` does it as root)")
    os.makedirs(directory, exist_ok=True)
    env = dict(os.environ)
    d = os.path.abspath(directory)
    env["MICROPYPATH"] = ":".join([d, d + "/lib", ROOT, ".frozen"])
    mp = micropython_path()
    proc = subprocess.Popen(
        [socat, "PTY,link=%s,raw,echo=0" % link,
         "EXEC:%s -X heapsize=%s -i,pty,raw,echo=0,setsid,ctty" % (mp, heap)],
        cwd=d, env=env, start_new_session=True)
    deadline = time.monotonic() + 10
    while not os.path.exists(link):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("lipari vboard: socat did not create %s" % link)
        time.sleep(0.05)
    return proc


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari vboard", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=os.path.join("var", "vboard"), help="the board's filesystem")
    p.add_argument("--link", default="/tmp/lipari-vm0", help="pty path to give mpremote")
    p.add_argument("--heap", default="256k")
    a = p.parse_args(argv)
    proc = start(a.dir, a.link, a.heap)
    print("virtual board on %s (filesystem %s); Ctrl-C stops it" % (a.link, os.path.abspath(a.dir)), flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        return 130


if __name__ == "__main__":
    sys.exit(main())
