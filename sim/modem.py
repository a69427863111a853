# Quectel BG95 NB-IoT modem emulator on a pty, plus `PtyUart`, the UART the firmware
# uses on the unix port to talk to it.
#
# ModemEmu (CPython only) speaks the AT subset listed in docs/transports.md with the
# BG95's reply formats, and opens real TCP connections (to the broker on 127.0.0.1).
# Faults are switched at run time: detach(), slow_ms, mute (missing replies), cme
# (+CME ERROR replies), late (one command answered after the driver gave up on it),
# lose_urc (URCs never sent), hang (dead modem).
#
#   python -m sim.modem --pty-link /tmp/modem [--faults slow_ms=300,cme=QIOPEN:566:1]
# prints the pty path and then reads control lines on stdin ("detach", "attach",
# "hang", "unhang", "slow_ms 300", "mute QIRD 2", "cme QIOPEN 566 1",
# "lose_urc recv 3", "clear").
#
# PtyUart runs under MicroPython (unix port) and CPython: open(path), raw mode with
# VMIN=0/VTIME=0 so that readinto never blocks, like machine.UART(timeout=0).
import os
import sys
import time


class PtyUart:
    """machine.UART look-alike over a tty path: readinto(buf) -> n or None, write(buf),
    any(). Non-blocking: a read returns at once with what the tty holds."""

    def __init__(self, path):
        self.f = open(path, "r+b", buffering=0) if sys.implementation.name != "micropython" \
            else open(path, "r+b")
        fd = self.f.fileno()
        import termios
        if hasattr(termios, "setraw"):
            termios.setraw(fd)
        else:
            import tty
            tty.setraw(fd)
        a = termios.tcgetattr(fd)
        cc = a[6]
        cc[6] = 0  # VMIN: return at once ...
        cc[5] = 0  # VTIME: ... without waiting for more
        termios.tcsetattr(fd, termios.TCSANOW, a)
        try:
            import select
            self._poll = select.poll()
            self._poll.register(self.f, select.POLLIN)
        except (ImportError, AttributeError):
            self._poll = None

    def readinto(self, buf, nbytes=None):
        if nbytes is not None:
            buf = memoryview(buf)[:nbytes]
        n = self.f.readinto(buf)
        return n or None

    def read(self, n=256):
        b = bytearray(n)
        k = self.readinto(b)
        return bytes(b[:k]) if k else None

    def any(self):
        if self._poll is None:
            return 0
        return 1 if self._poll.poll(0) else 0

    def write(self, buf):
        n = self.f.write(buf)
        return len(buf) if n is None else n

    def close(self):
        self.f.close()


# ---------------------------------------------------------------------------------
# Everything below is the emulator: CPython only.

if sys.implementation.name != "micropython":
    import select
    import socket
    import threading

    _NUM_SOCK = 12

    class _Sock:
        def __init__(self, cid, host, port):
            self.cid = cid
            self.host = host
            self.port = port
            self.s = None
            self.state = 1          # 1 opening, 2 connected, 4 closing (peer closed)
            self.buf = bytearray()  # received, not yet read by AT+QIRD
            self.total = 0
            self.read = 0
            self.sent = 0
            self.urc_armed = True

    from sim.ptyhost import PtyHost

    class ModemEmu(PtyHost):
        """BG95 look-alike on a pty. `path` is the tty the firmware opens."""

        def __init__(self, pin=None, apn=None, reg_delay_ms=200, rssi=20,
                     tz_quarters=4, pty_link=None, host_map=None):
            self.pin = pin
            self.pin_ok = pin is None
            self.want_apn = apn
            self.apn = None
            self.reg_delay_ms = reg_delay_ms
            self.rssi = rssi
            self.tz_q = tz_quarters
            self.host_map = host_map or {}
            self.echo = True
            self.cereg_n = 0
            self.reg = 2
            self._reg_at = time.monotonic() + reg_delay_ms / 1000
            self.time_synced = False
            self.attached_wanted = True
            self.pdp = False
            self.socks = {}
            # faults
            self.slow_ms = 0
            self.mute = {}       # cmd name -> remaining count (-1 forever)
            self.cme = {}        # cmd name -> [code, remaining]
            self.lose_urc = {}   # urc kind -> remaining count
            self.late = {}       # cmd name -> [extra ms, remaining count]: a late reply
            self._late_ms = 0
            self.hung = False
            self.detached = False
            # i/o
            self._open_pty(pty_link)
            self._inbuf = bytearray()
            self._send_cid = None
            self._send_len = None
            self._out = []       # [due_monotonic, bytes]
            self._last_due = 0.0
            self._lock = threading.RLock()
            self.log = []        # commands seen, for tests

        # -- control --------------------------------------------------------------
        def _close_conns(self):
            for s in list(self.socks.values()):
                self._drop(s)

        def detach(self):
            """Network drops the meter: +CEREG: 0, +QIURC: "pdpdeact", sockets gone."""
            with self._lock:
                self.detached = True
                self.reg = 0
                if self.cereg_n:
                    self._urc("cereg", "+CEREG: 0")
                if self.pdp:
                    self.pdp = False
                    self._urc("pdpdeact", '+QIURC: "pdpdeact",1')
                for s in list(self.socks.values()):
                    if s.s:
                        s.s.close()
                        s.s = None
                    s.state = 4

        def attach(self):
            with self._lock:
                self.detached = False
                self._reg_at = time.monotonic() + self.reg_delay_ms / 1000

        def set_fault(self, name, *args):
            with self._lock:
                if name == "slow_ms":
                    self.slow_ms = int(args[0])
                elif name == "mute":
                    self.mute[args[0].upper()] = int(args[1]) if len(args) > 1 else -1
                elif name == "cme":
                    self.cme[args[0].upper()] = [int(args[1]),
                                                 int(args[2]) if len(args) > 2 else -1]
                elif name == "lose_urc":
                    self.lose_urc[args[0]] = int(args[1]) if len(args) > 1 else -1
                elif name == "late":
                    self.late[args[0].upper()] = [int(args[1]),
                                                  int(args[2]) if len(args) > 2 else -1]
                elif name == "hang":
                    self.hung = True
                elif name == "unhang":
                    self.hung = False
                elif name == "detach":
                    self.detach()
                elif name == "attach":
                    self.attach()
                elif name == "rssi":
                    self.rssi = int(args[0])
                elif name == "clear":
                    self.slow_ms = 0
                    self.mute.clear()
                    self.cme.clear()
                    self.lose_urc.clear()
                    self.late.clear()
                    self.hung = False
                else:
                    raise ValueError("unknown modem fault %r" % name)

        def faults(self, spec):
            """"slow_ms=300,cme=QIOPEN:566:1,mute=QIRD:2,lose_urc=recv,hang,detach"."""
            for item in (spec or "").split(","):
                item = item.strip()
                if not item:
                    continue
                name, _, val = item.partition("=")
                self.set_fault(name, *(val.split(":") if val else ()))

        # -- output -----------------------------------------------------------------
        def _emit(self, data):
            if self.hung:
                return
            now = time.monotonic()
            due = max(now + (self.slow_ms + self._late_ms) / 1000, self._last_due)
            self._last_due = due
            self._out.append([due, data])

        def _reply(self, *lines):
            self._emit(b"".join(b"\r\n" + ln.encode() + b"\r\n" for ln in lines))

        def _urc(self, kind, line):
            n = self.lose_urc.get(kind, 0)
            if n:
                if n > 0:
                    self.lose_urc[kind] = n - 1
                return
            self._reply(line)

        # -- main loop -------------------------------------------------------------
        def _loop(self):
            while not self._stop:
                with self._lock:
                    rl = [self.master] + [s.s for s in self.socks.values()
                                          if s.s is not None and len(s.buf) < 16384]
                    now = time.monotonic()
                    wait = 0.02
                    if self._out:
                        wait = max(0.0, min(wait, self._out[0][0] - now))
                try:
                    r, _, _ = select.select(rl, [], [], wait)
                except (OSError, ValueError):
                    r = []
                with self._lock:
                    for fd in r:
                        if fd == self.master:
                            try:
                                data = os.read(self.master, 4096)
                            except OSError:
                                data = b""
                            if data and not self.hung:
                                self._input(data)
                        else:
                            self._sock_readable(fd)
                    self._tick()
                    now = time.monotonic()
                    while self._out and self._out[0][0] <= now:
                        data = self._out.pop(0)[1]
                        try:
                            os.write(self.master, data)
                        except OSError:
                            pass

        def _tick(self):
            if not self.detached and self.reg not in (1, 5) and self.attached_wanted \
                    and time.monotonic() >= self._reg_at:
                self.reg = 1
                self.time_synced = True
                if self.cereg_n:
                    self._urc("cereg", "+CEREG: 1")

        def _sock_readable(self, so):
            for s in list(self.socks.values()):
                if s.s is so:
                    try:
                        data = so.recv(4096)
                    except OSError:
                        data = b""
                    if data:
                        was_empty = not s.buf
                        s.buf += data
                        s.total += len(data)
                        if was_empty and s.urc_armed:
                            s.urc_armed = False
                            self._urc("recv", '+QIURC: "recv",%d' % s.cid)
                    else:
                        so.close()
                        s.s = None
                        s.state = 4
                        self._urc("closed", '+QIURC: "closed",%d' % s.cid)

        def _input(self, data):
            self._inbuf += data
            while self._inbuf:
                if self._send_cid is not None:
                    if not self._take_send_data():
                        return
                    continue
                i = -1
                for k, ch in enumerate(self._inbuf):
                    if ch in (13, 10):
                        i = k
                        break
                if i < 0:
                    return
                line = bytes(self._inbuf[:i]).decode("latin-1")
                del self._inbuf[:i + 1]
                if self.echo and line:
                    self._emit(line.encode() + b"\r")
                if line.strip():
                    self._command(line.strip())

        def _take_send_data(self):
            s = self.socks.get(self._send_cid)
            if self._send_len is None:       # Ctrl-Z terminated (AT+QISEND=<cid>)
                j = self._inbuf.find(b"\x1a")
                k = self._inbuf.find(b"\x1b")
                if k >= 0 and (j < 0 or k < j):
                    del self._inbuf[:k + 1]
                    self._send_cid = None
                    self._reply("OK")
                    return True
                if j < 0:
                    return False
                payload = bytes(self._inbuf[:j])
                del self._inbuf[:j + 1]
            else:
                if len(self._inbuf) < self._send_len:
                    return False
                payload = bytes(self._inbuf[:self._send_len])
                del self._inbuf[:self._send_len]
            self._send_cid = None
            if s is None or s.s is None or s.state != 2:
                self._reply("SEND FAIL")
                return True
            try:
                s.s.sendall(payload)
                s.sent += len(payload)
                self._reply("SEND OK")
            except OSError:
                self._reply("SEND FAIL")
            return True

        # -- commands ---------------------------------------------------------------
        @staticmethod
        def _name(line):
            u = line.upper()
            if not u.startswith("AT"):
                return ""
            body = u[2:]
            if body.startswith("+"):
                body = body[1:]
            for i, ch in enumerate(body):
                if ch in "=?":
                    return body[:i]
            return body or "AT"

        def _command(self, line):
            name = self._name(line)
            self.log.append(line)
            if not name:
                return
            n = self.mute.get(name, 0)
            if n:
                if n > 0:
                    self.mute[name] = n - 1
                return
            c = self.cme.get(name)
            if c and c[1]:
                if c[1] > 0:
                    c[1] -= 1
                self._reply("+CME ERROR: %d" % c[0])
                return
            arg = line[line.find("=") + 1:] if "=" in line else None
            query = line.endswith("?")
            fn = getattr(self, "_c_" + name.replace("&", "_"), None)
            if fn is None:
                self._reply("ERROR")
                return
            lt = self.late.get(name)
            if lt and lt[1]:
                if lt[1] > 0:
                    lt[1] -= 1
                self._late_ms = lt[0]   # this reply (and, in order, all after it) is late
            try:
                fn(arg, query)
            except (ValueError, IndexError):
                self._reply("ERROR")
            finally:
                self._late_ms = 0

        @staticmethod
        def _args(arg):
            out = []
            for a in arg.split(","):
                a = a.strip()
                out.append(a[1:-1] if a.startswith('"') and a.endswith('"') else a)
            return out

        def _c_AT(self, arg, q):
            self._reply("OK")

        def _c_E0(self, arg, q):
            self.echo = False
            self._reply("OK")

        def _c_E1(self, arg, q):
            self.echo = True
            self._reply("OK")

        def _c_I(self, arg, q):
            self._reply("Quectel", "BG95-M3", "Revision: BG95M3LAR02A03 (lipari sim)", "OK")

        def _c_CMEE(self, arg, q):
            self._reply("OK")

        def _c_CPIN(self, arg, q):
            if q:
                self._reply("+CPIN: " + ("READY" if self.pin_ok else "SIM PIN"), "OK")
            elif self._args(arg)[0] == self.pin:
                self.pin_ok = True
                self._reply("OK")
                self._reply("+CPIN: READY")
            else:
                self._reply("+CME ERROR: 16")

        def _need_sim(self):
            if not self.pin_ok:
                self._reply("+CME ERROR: 11")
                return True
            return False

        def _c_QICSGP(self, arg, q):
            a = self._args(arg)
            if len(a) == 1:
                self._reply('+QICSGP: 1,"%s","","",0' % (self.apn or ""), "OK")
                return
            self.apn = a[2]
            self._reply("OK")

        def _c_CEREG(self, arg, q):
            if q:
                self._reply("+CEREG: %d,%d" % (self.cereg_n, self.reg), "OK")
            else:
                self.cereg_n = int(arg)
                self._reply("OK")

        def _c_CGATT(self, arg, q):
            if q:
                self._reply("+CGATT: %d" % (1 if self.reg in (1, 5) else 0), "OK")
                return
            if self._need_sim():
                return
            if int(arg) == 1:
                self.attached_wanted = True
                if self.detached:       # no network: the real modem gives up after 140 s
                    return
                if self.reg not in (1, 5):
                    self._reg_at = min(self._reg_at, time.monotonic() + self.reg_delay_ms / 1000)
            else:
                self.attached_wanted = False
                self.reg = 0
                self.pdp = False
            self._reply("OK")

        def _c_QIACT(self, arg, q):
            if q:
                if self.pdp:
                    self._reply('+QIACT: 1,1,1,"10.64.0.17"', "OK")
                else:
                    self._reply("OK")
                return
            if self._need_sim():
                return
            if self.reg not in (1, 5) or (self.want_apn and self.apn != self.want_apn):
                self._reply("ERROR")
                return
            self.pdp = True
            self._reply("OK")

        def _c_QIDEACT(self, arg, q):
            self.pdp = False
            for s in list(self.socks.values()):
                self._drop(s)
            self._reply("OK")

        def _c_CSQ(self, arg, q):
            self._reply("+CSQ: %d,99" % (self.rssi if self.reg in (1, 5) else 99), "OK")

        def _c_QCSQ(self, arg, q):
            if self.reg in (1, 5):
                dbm = -113 + 2 * self.rssi
                self._reply('+QCSQ: "NBIoT",%d,%d,60,-10' % (dbm, dbm - 20), "OK")
            else:
                self._reply('+QCSQ: "NOSERVICE"', "OK")

        def _c_CCLK(self, arg, q):
            if not self.time_synced:
                self._reply('+CCLK: "80/01/06,00:00:12+00"', "OK")
                return
            t = time.gmtime(time.time() + self.tz_q * 900)
            self._reply('+CCLK: "%02d/%02d/%02d,%02d:%02d:%02d%+03d"' % (
                t.tm_year % 100, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec,
                self.tz_q), "OK")

        def _c_QLTS(self, arg, q):
            if not self.time_synced:
                self._reply('+QLTS: ""', "OK")
                return
            mode = int(arg) if arg else 0
            t = time.gmtime(time.time() + (self.tz_q * 900 if mode == 2 else 0))
            self._reply('+QLTS: "%04d/%02d/%02d,%02d:%02d:%02d%+03d,0"' % (
                t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, self.tz_q), "OK")

        def _c_QIOPEN(self, arg, q):
            a = self._args(arg)
            cid = int(a[1])
            host, port = a[3], int(a[4])
            if not 0 <= cid < _NUM_SOCK:
                self._reply("ERROR")
                return
            if cid in self.socks:
                self._reply("+CME ERROR: 563")
                return
            self._reply("OK")
            if not self.pdp:
                self._urc("qiopen", "+QIOPEN: %d,561" % cid)
                return
            s = _Sock(cid, host, port)
            h, p = self.host_map.get((host, port), (host, port))
            try:
                s.s = socket.create_connection((h, p), timeout=2)
                s.s.setblocking(False)
                s.state = 2
                self.socks[cid] = s
                self._urc("qiopen", "+QIOPEN: %d,0" % cid)
            except OSError:
                self._urc("qiopen", "+QIOPEN: %d,566" % cid)

        def _c_QISTATE(self, arg, q):
            sel = list(self.socks.values())
            if arg:
                a = self._args(arg)
                if a[0] == "1":
                    sel = [s for s in sel if s.cid == int(a[1])]
            lines = ['+QISTATE: %d,"TCP","%s",%d,%d,%d,1,%d,0,"uart1"' % (
                s.cid, s.host, s.port, 40000 + s.cid, s.state, s.cid) for s in sel]
            self._reply(*(lines + ["OK"]))

        def _c_QISEND(self, arg, q):
            a = self._args(arg)
            cid = int(a[0])
            s = self.socks.get(cid)
            if len(a) > 1 and int(a[1]) == 0:
                if s is None:
                    self._reply("ERROR")
                else:
                    self._reply("+QISEND: %d,%d,0" % (s.sent, s.sent), "OK")
                return
            if s is None or s.state != 2:
                self._reply("ERROR")
                return
            ln = int(a[1]) if len(a) > 1 else None
            if ln is not None and not 0 < ln <= 1460:
                self._reply("ERROR")
                return
            self._send_cid = cid
            self._send_len = ln
            self._emit(b"\r\n> ")

        def _c_QIRD(self, arg, q):
            a = self._args(arg)
            cid = int(a[0])
            s = self.socks.get(cid)
            if s is None:
                self._reply("ERROR")
                return
            ln = int(a[1]) if len(a) > 1 else 1500
            if ln == 0:
                self._reply("+QIRD: %d,%d,%d" % (s.total, s.read, len(s.buf)), "OK")
                return
            ln = min(ln, 1500)
            data = bytes(s.buf[:ln])
            del s.buf[:ln]
            s.read += len(data)
            if not s.buf:
                s.urc_armed = True
            if data:
                self._emit(b"\r\n+QIRD: %d\r\n" % len(data) + data + b"\r\n\r\nOK\r\n")
            else:
                self._reply("+QIRD: 0", "OK")

        def _c_QICLOSE(self, arg, q):
            cid = int(self._args(arg)[0])
            s = self.socks.pop(cid, None)
            if s is not None:
                self._drop(s)
            self._reply("OK")

        def _drop(self, s):
            if s.s is not None:
                try:
                    s.s.close()
                except OSError:
                    pass
                s.s = None
            self.socks.pop(s.cid, None)

    def main(argv=None):
        import argparse
        ap = argparse.ArgumentParser(prog="python -m sim.modem",
                                     description="BG95 NB-IoT modem emulator on a pty")
        ap.add_argument("--pty-link", help="symlink to create pointing at the pty")
        ap.add_argument("--faults", default="", help="e.g. slow_ms=300,cme=QIOPEN:566:1")
        ap.add_argument("--pin", default=None, help="SIM PIN the emulated SIM asks for")
        ap.add_argument("--apn", default=None, help="APN the network insists on")
        ap.add_argument("--rssi", type=int, default=20, help="+CSQ rssi (0..31)")
        o = ap.parse_args(argv)
        emu = ModemEmu(pin=o.pin, apn=o.apn, rssi=o.rssi, pty_link=o.pty_link)
        emu.faults(o.faults)
        emu.start()
        emu.serve_stdin(emu.set_fault)

    if __name__ == "__main__":
        main()
