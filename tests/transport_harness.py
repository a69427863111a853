# Helpers for tests/test_transport_*.py: a TCP echo server, and running a MicroPython
# script (firmware side) against emulators that run in this CPython process.
import json
import os
import socket
import subprocess
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPY = os.path.join(ROOT, ".venv", "bin", "micropython")
MICROPYPATH = os.pathsep.join([".frozen", os.path.join(ROOT, "firmware"), os.path.join(ROOT, "boards"), ROOT])


class EchoServer:
    """Echoes every byte back on each accepted connection; counts connections."""

    def __init__(self):
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(8)
        self.port = self.ls.getsockname()[1]
        self.conns = []
        self.accepted = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c):
        try:
            while True:
                d = c.recv(4096)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
        try:
            c.close()
        except OSError:
            pass

    def close_all(self):
        """Server side closes every connection (peer-closed path)."""
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def stop(self):
        self._stop = True
        try:
            self.ls.shutdown(socket.SHUT_RDWR)   # wakes the accept() thread
        except OSError:
            pass
        self.ls.close()
        self.close_all()


def run_mpy(script, args=(), timeout=40, heapsize="2M"):
    """Run MicroPython code; returns the JSON objects it printed, one per line,
    plus the raw output (for assertion messages)."""
    env = dict(os.environ)
    env["MICROPYPATH"] = MICROPYPATH
    p = subprocess.run([MPY, "-X", "heapsize=" + heapsize, "-c", script] + list(args),
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    out = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    raw = p.stdout + p.stderr
    return out, raw


def by_step(results):
    """{step: result} from objects that carry a "step" key."""
    return {r["step"]: r for r in results if "step" in r}


def run_mpy_live(script, args=(), on_obj=None, timeout=40, heapsize="2M"):
    """Like run_mpy, but calls on_obj(obj) for each JSON line as it is printed, so that
    the test can switch emulator faults at the moment the firmware reaches a step."""
    import time as _time
    env = dict(os.environ)
    env["MICROPYPATH"] = MICROPYPATH
    p = subprocess.Popen([MPY, "-X", "heapsize=" + heapsize, "-c", script] + list(args),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, cwd=ROOT)
    out, raw = [], []
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    t0 = _time.monotonic()
    try:
        for line in p.stdout:
            raw.append(line)
            s = line.strip()
            if s.startswith("{"):
                try:
                    obj = json.loads(s)
                except ValueError:
                    continue
                out.append(obj)
                if on_obj:
                    on_obj(obj)
        p.wait()
    finally:
        killer.cancel()
    if _time.monotonic() - t0 >= timeout:
        raw.append("\n[killed after %d s]" % timeout)
    return out, "".join(raw)
