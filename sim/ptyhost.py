# The host side of an emulated serial device (CPython only): the meter's firmware opens
# the pty's slave end (`path`, or the stable `link` to it) as its UART, while a thread
# here serves the master end. Shared by the NB-IoT modem (sim/modem.py) and the PLC
# concentrator (sim/plc.py).
import os
import threading
import tty


class PtyHost:
    def _open_pty(self, link=None):
        """Raw pty pair; `link`, if given, is (re)made a symlink to the slave."""
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.link = link
        if link:
            try:
                os.unlink(link)
            except OSError:
                pass
            os.symlink(self.path, link)
        self._stop = False
        self._th = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        raise NotImplementedError

    def _close_conns(self):
        """Drop the TCP connections the device holds (on stop)."""

    def start(self):
        self._th.start()
        return self

    def stop(self):
        self._stop = True
        self._th.join(2)
        self._close_conns()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.link:
            try:
                os.unlink(self.link)
            except OSError:
                pass

    def serve_stdin(self, control):
        """`python -m sim.modem` / `sim.plc`: print the pty path, then apply one control
        line from stdin at a time (`control(*words)`, answering ok / error), keep serving
        after stdin closes, stop on Ctrl-C, SIGTERM or SIGHUP (the pty link is removed)."""
        import signal
        import sys
        import time

        def on_signal(signum, frame):
            for sg in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sg, signal.SIG_IGN)      # once: let the clean-up finish
            raise KeyboardInterrupt
        try:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, on_signal)
            print(self.link or self.path, flush=True)
            for line in sys.stdin:
                parts = line.split()
                if not parts:
                    continue
                try:
                    control(*parts)
                    print("ok", flush=True)
                except (ValueError, IndexError) as e:
                    print("error:", e, flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
