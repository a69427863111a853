"""The host runner of one virtual meter (CPython): its simulated board and its MCU.

The board (sim/bridge.py: chips, physics, the board's time, the hardware watchdog and the
shutdown line) lives in this process; the firmware runs on the MicroPython unix port in a
child process and reaches the board over the bridge. As a board outlives its MCU, the
host restarts the firmware when

  * the board's watchdog expires (the firmware stopped feeding it): the process is killed
    at once, as a reset stops an MCU, and started again;
  * the firmware resets itself (machine.reset: exit status 3 on the unix port).

The chips keep counting through the restart, the board's time runs on and the meter's
flash file (--state) is kept, so the meter resumes as a board does after a reset.

Signals: SIGTERM and SIGINT (Ctrl-C) become a clean stop. The board raises its shutdown
line, the firmware says offline, disconnects and checkpoints; one that has not ended
after grace_s gets SIGINT (KeyboardInterrupt: best effort), then SIGKILL. The firmware
runs in its own session (a terminal's Ctrl-C reaches only this process) and dies with
this process (PR_SET_PDEATHSIG) should it be killed outright. Nothing is left behind.

    host = BoardHost(board_module, argv, env, profile="household", seed=1)
    rc = host.run(on_line)          # on_line(str) for every line the firmware prints
"""
import ctypes
import json
import os
import signal
import subprocess
import threading
import time

from sim.bridge import BridgeServer

RESET_EXIT = 3          # main.py / metering: machine.reset() on the unix port


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def _die_with_parent():
    # in the child before exec: SIGKILL when the host dies (Linux; prctl resolved before fork)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)          # PR_SET_PDEATHSIG


class BoardHost:
    """Runs the firmware command line `argv` (without --bridge, which is added) against a
    simulated `board` module, restarting it on watchdog expiry and on reset."""

    def __init__(self, board, argv, env=None, profile="household", seed=0,
                 sensor_errors=False, grace_s=8.0, kill_s=3.0, silence_s=None, cwd=None):
        kw = {} if silence_s is None else {"silence_s": silence_s}
        self.server = BridgeServer(board, profile=profile, seed=seed,
                                   sensor_errors=sensor_errors, on_reset=self._on_reset, **kw)
        self.argv = list(argv) + ["--bridge", self.server.path]
        self.env = env
        self.cwd = cwd
        self.grace_s = grace_s
        self.kill_s = kill_s
        self.proc = None
        self.resets = []             # (reason, board time us, last feed us) per restart
        self.signal = None           # the signal that asked us to stop
        self._reset = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="boardhost")

    # ---- the MCU ----
    def _spawn(self):
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    def _on_reset(self, reason, at_us, fed_us=None):
        # the board's watchdog expired (bridge thread or monitor): reset the MCU now,
        # unless we are stopping (the stop's own escalation ends a stuck firmware)
        if self.signal is not None:
            return
        with self._lock:
            self._reset = (reason, at_us, fed_us)
            p = self.proc
        if p is not None and p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass

    def run(self, on_line=print):
        """Run until the firmware ends for good (exit status other than a reset, or a
        stop); returns that status, 128 + signal number after a stop request."""
        self.server.start()
        self._monitor.start()
        try:
            while True:
                with self._lock:
                    self._reset = None
                    if self.signal is not None:
                        return 128 + self.signal
                    self._spawn()
                for line in self.proc.stdout:
                    on_line(line.rstrip("\n"))
                rc = self.proc.wait()
                with self._lock:
                    reset = self._reset
                if self.signal is not None:
                    return 128 + self.signal
                if reset is None and rc == RESET_EXIT:
                    reset = ("reset", self.server.now_us(), None)
                if reset is None:
                    return rc
                self.resets.append(reset)
                on_line(json.dumps({"type": "info", "msg": "%s: MCU reset at board time %.3f s,"
                                    " restarting" % (reset[0], reset[1] / 1e6)}))
        finally:
            self._done.set()
            self._end_process()
            self.server.stop()

    # ---- stopping ----
    def request_stop(self, signum=signal.SIGTERM):
        """Clean stop: the board's shutdown line rises; escalation after grace_s. A second
        request skips the grace."""
        first = self.signal is None
        self.signal = signum
        self.server.request_stop()
        if first:
            self._stop_at = time.monotonic()
        else:
            self._stop_at = time.monotonic() - self.grace_s

    def install_signals(self):
        """SIGTERM / SIGINT / SIGHUP -> request_stop (call from the main thread)."""
        def handler(signum, frame):
            self.request_stop(signum)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, handler)

    def _watch(self):
        # real-time duties: the watchdog of a firmware that reports no time (hung in a
        # busy loop), and the stop escalation
        sent_int = False
        while not self._done.wait(0.1):
            self.server.check_watchdog()
            if self.signal is None:
                continue
            p = self.proc
            if p is None or p.poll() is not None:
                continue
            waited = time.monotonic() - self._stop_at
            if waited >= self.grace_s + self.kill_s:
                p.kill()
            elif waited >= self.grace_s and not sent_int:
                sent_int = True
                try:
                    p.send_signal(signal.SIGINT)
                except OSError:
                    pass

    def _end_process(self):
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if p.stdout is not None:
            p.stdout.close()
