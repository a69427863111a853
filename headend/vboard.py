"""`lipari vboard`: a virtual meter board on a pty that mpremote can flash.

    lipari vboard --dir var/vboard --link /tmp/lipari-vm0 &
    make mpy && lipari deploy --port /tmp/lipari-vm0 --board unix_sim_3ph --no-reset
    mpremote connect /tmp/lipari-vm0 resume exec "import main; main.main(['--step', '--days', '1'])"

The MicroPython unix port runs its REPL on the pty (through socat) with `--dir` as its
filesystem root, like a board's flash: what `lipari deploy` copies lands there and is
imported from there. The board's hardware - the simulated chips of `--board`, its watchdog -
runs in this process behind the bridge (sim/bridge.py; the firmware finds it through
LIPARI_BRIDGE), so only the bridge's link objects are taken from the repository. When the
board's watchdog expires, the REPL process is restarted (the board resets; its port comes
back on the same link). SIGTERM and Ctrl-C stop everything it started.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from headend import ROOT
from headend.meter import micropython_path
from sim.boardhost import _die_with_parent   # socat dies with us; its REPL with it (SIGHUP)

BRIDGE_ENV = "LIPARI_BRIDGE"       # read by sim/bridgelink.py when --bridge is not given


def _spawn(directory, link, heap, env):
    socat = shutil.which("socat")
    if not socat:
        raise SystemExit("lipari vboard: socat is missing (apt-get install socat; `make setup` does it as root)")
    mp = micropython_path()
    try:
        os.unlink(link)
    except OSError:
        pass
    proc = subprocess.Popen(
        [socat, "PTY,link=%s,raw,echo=0" % link,
         "EXEC:%s -X heapsize=%s -i,pty,raw,echo=0,setsid,ctty" % (mp, heap)],
        cwd=directory, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 10
    while not os.path.exists(link):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("lipari vboard: socat did not create %s" % link)
        time.sleep(0.05)
    return proc


class VBoard:
    """socat + the unix port's REPL on a pty, and the board's simulated hardware."""

    def __init__(self, directory, link, heap="256k", board="unix_sim_3ph", profile="household",
                 seed=1):
        from sim.bridge import BridgeServer
        os.makedirs(directory, exist_ok=True)
        self.dir = os.path.abspath(directory)
        self.link = link
        self.heap = heap
        sys.path.insert(0, os.path.join(ROOT, "boards"))
        self.server = BridgeServer(__import__(board), profile=profile, seed=seed,
                                   on_reset=self._on_reset).start()
        env = dict(os.environ)
        env["MICROPYPATH"] = ":".join([self.dir, self.dir + "/lib", ROOT, ".frozen"])
        env[BRIDGE_ENV] = self.server.path
        self.env = env
        self.resets = 0
        self._lock = threading.Lock()
        self.proc = _spawn(self.dir, link, heap, env)

    def _on_reset(self, reason, at_us, fed_us=None):
        # the board's watchdog expired: the MCU resets (its pty goes away and comes back)
        with self._lock:
            self.resets += 1
            _killpg(self.proc)
            self.proc = _spawn(self.dir, self.link, self.heap, self.env)

    def wait(self):
        while True:
            p = self.proc
            rc = p.wait()
            with self._lock:
                if p is self.proc:
                    return rc

    def stop(self):
        with self._lock:
            _killpg(self.proc)
        self.server.stop()
        try:
            os.unlink(self.link)
        except OSError:
            pass


def _killpg(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def start(directory, link, heap="256k", board="unix_sim_3ph"):
    """Start the virtual board; returns it (stop it with stop())."""
    return VBoard(directory, link, heap, board)


def stop(vb):
    vb.stop()


class _Stop(Exception):
    pass


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari vboard", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=os.path.join("var", "vboard"), help="the board's filesystem")
    p.add_argument("--link", default="/tmp/lipari-vm0", help="pty path to give mpremote")
    p.add_argument("--heap", default="256k")
    p.add_argument("--board", default="unix_sim_3ph", help="the simulated hardware (boards/unix_sim_*)")
    p.add_argument("--profile", default="household")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)

    def on_signal(signum, frame):
        raise _Stop(signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    vb = VBoard(a.dir, a.link, a.heap, a.board, a.profile, a.seed)
    print("virtual board on %s (filesystem %s); Ctrl-C stops it" % (a.link, vb.dir), flush=True)
    try:
        return vb.wait()
    except KeyboardInterrupt:
        return 130
    except _Stop as e:
        return 128 + e.args[0]
    finally:
        vb.stop()


if __name__ == "__main__":
    sys.exit(main())
