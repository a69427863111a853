"""Process groups for `lipari system`: start children, watch them, stop every one of them.

    sup = Supervisor("var/system/logs")
    sup.spawn("web", [sys.executable, "-m", "headend.cli", "web", ...])
    sup.check()        # report children that exited; the first needed one that did
    sup.stop_all()     # SIGTERM each group newest first, SIGKILL after grace_s

Each child runs in its own process group (start_new_session) with its output in
<logdir>/<name>.log, and PR_SET_PDEATHSIG. A reaper process (`python -m headend.supervisor
--reaper`) holds a pipe from the supervisor and terminates every group it was told about
when that pipe closes, so nothing outlives a supervisor killed with SIGKILL.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

from headend import ROOT


class SystemError_(Exception):
    """Something `lipari system` needs is missing or failed; the message says what to do."""


def _pdeathsig():
    """In the child, before exec: die with SIGTERM when the parent dies (Linux only)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG
    except Exception:
        pass


def port_free(host, port):
    s = socket.socket()
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_port(host, want):
    """want if it is free, else (or with want 0) a free port chosen by the kernel."""
    if want and port_free(host, want):
        return want
    s = socket.socket()
    s.bind((host, 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(host, port, proc, timeout_s, name):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection((host, port), 0.3).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise SystemError_("%s did not listen on %s:%d within %s s" % (name, host, port, timeout_s))


class Child:
    def __init__(self, name, argv, proc, log, critical):
        self.name = name
        self.argv = argv
        self.proc = proc
        self.log = log
        self.critical = critical
        self.reported = False

    def tail(self, n=8):
        try:
            with open(self.log, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 4000))
                lines = f.read().decode(errors="replace").splitlines()
            return "\n".join("    " + x for x in lines[-n:])
        except OSError:
            return "    (no log)"


def reaper(grace_s):
    """`python -m headend.supervisor --reaper`: reads process group ids from stdin, one a line,
    until EOF, which comes when `lipari system` is gone however it ended (even SIGKILL);
    then terminates every group it was told about that is still alive."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is for the supervisor
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups = []
    for line in sys.stdin:
        if line.strip().isdigit():
            groups.append(int(line))
    live = [g for g in groups if _group_alive(g)]
    for g in live:
        _killpg(g, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_group_alive(g) for g in live):
        time.sleep(0.1)
    for g in live:
        _killpg(g, signal.SIGKILL)
    return 0


class Supervisor:
    """Starts processes in their own process groups and stops every one of them.

    Three layers, so that nothing outlives `lipari system`: stop_all() (normal exit, atexit,
    SIGTERM/SIGINT/SIGHUP), PR_SET_PDEATHSIG on each child, and a reaper process that
    terminates every group once the supervisor's pipe to it closes (SIGKILL, crash)."""

    def __init__(self, logdir, out=sys.stdout, grace_s=5.0, use_reaper=True):
        self.logdir = logdir
        self.out = out
        self.grace_s = grace_s
        self.children = []
        self._stopped = False
        os.makedirs(logdir, exist_ok=True)
        self.reaper = None
        if use_reaper:
            self.reaper = subprocess.Popen(
                [sys.executable, "-m", "headend.supervisor", "--reaper", "--grace-s", str(grace_s)],
                stdin=subprocess.PIPE, cwd=ROOT, start_new_session=True,
                env=dict(os.environ, PYTHONPATH=ROOT), text=True)

    def say(self, msg):
        print(msg, file=self.out, flush=True)

    def spawn(self, name, argv, critical=True, env=None):
        log = os.path.join(self.logdir, name + ".log")
        e = dict(os.environ)
        e["PYTHONUNBUFFERED"] = "1"
        e.update(env or {})
        pp = e.get("PYTHONPATH")
        e["PYTHONPATH"] = ROOT + (os.pathsep + pp if pp else "")
        try:
            with open(log, "ab") as f:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                        stderr=subprocess.STDOUT, cwd=ROOT, env=e,
                                        start_new_session=True, preexec_fn=_pdeathsig)
        except OSError as ex:
            raise SystemError_("cannot start %s (%s): %s" % (name, argv[0], ex))
        c = Child(name, argv, proc, log, critical)
        self.children.append(c)
        self._write_pids()
        if self.reaper is not None:
            try:
                self.reaper.stdin.write("%d\n" % proc.pid)
                self.reaper.stdin.flush()
            except (OSError, ValueError):
                pass
        return c

    def _write_pids(self):
        """<workdir>/pids.json: name -> pid (= process group id) of what is running."""
        pids = {c.name: c.proc.pid for c in self.children}
        if self.reaper is not None:
            pids["reaper"] = self.reaper.pid
        try:
            with open(os.path.join(os.path.dirname(self.logdir), "pids.json"), "w") as f:
                json.dump(pids, f)
        except OSError:
            pass

    def check(self):
        """Report children that exited; returns the first critical one that did."""
        dead = None
        for c in self.children:
            rc = c.proc.poll()
            if rc is not None and not c.reported:
                c.reported = True
                self.say("lipari system: %s exited with code %s; last lines of %s:\n%s"
                         % (c.name, rc, c.log, c.tail()))
                if c.critical and dead is None:
                    dead = c
        return dead

    def stop_all(self):
        """Stop every process group, newest first, one wave at a time: the non-critical
        children started one after another (the meters) together, then each needed part
        (web, ingest, broker last). SIGTERM to a wave, SIGKILL to what of it is left after
        grace_s, then the next: the meters say offline and disconnect while the broker
        still runs, and ingest takes what is in flight."""
        if self._stopped:
            return
        self._stopped = True
        waves = []
        for c in reversed(self.children):
            if not (_group_alive(c.proc.pid) or c.proc.poll() is None):
                continue
            if waves and not c.critical and not waves[-1][-1].critical:
                waves[-1].append(c)
            else:
                waves.append([c])
        for wave in waves:
            self._stop_wave(wave)
        if self.reaper is not None:              # everything is stopped: let it go
            try:
                self.reaper.stdin.close()
                self.reaper.wait(self.grace_s + 2)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass

    def _stop_wave(self, live):
        for c in live:
            _killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for c in live:
            left = max(0.0, deadline - time.monotonic())
            try:
                c.proc.wait(left)
            except subprocess.TimeoutExpired:
                pass
            while _group_alive(c.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for c in live:
            if c.proc.poll() is None or _group_alive(c.proc.pid):
                self.say("lipari system: %s did not stop within %s s: killed" % (c.name,
                                                                                 self.grace_s))
                _killpg(c.proc.pid, signal.SIGKILL)
                try:
                    c.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m headend.supervisor")
    p.add_argument("--reaper", action="store_true", help="read process groups from stdin, "
                   "terminate them at EOF")
    p.add_argument("--grace-s", type=float, default=5.0)
    a = p.parse_args(argv)
    if not a.reaper:
        p.error("only --reaper is a command")
    return reaper(a.grace_s)


if __name__ == "__main__":
    sys.exit(main())
