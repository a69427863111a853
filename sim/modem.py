# Quectel BG95 NB-IoT modem emulator on a pty (the firmware's side of the pty, `PtyUart`,
# is sim/ptyuart.py, which the unix boards hand over as the modem's UART).
#
# ModemEmu (CPython only) speaks the AT subset listed in docs/transports.md with the
# BG95's reply formats, and opens real TCP connections (to the broker on 127.0.0.1).
# TLS (AT+QSSLCFG / QSSLOPEN / QSSLSEND / QSSLRECV / QSSLSTATE / QSSLCLOSE, +QSSLURC)
# is a real TLS client (Python's ssl on memory BIOs, driven by the emulator's loop)
# configured only from what the firmware set up: the CA and client certificate files it
# uploaded into the emulated file system (AT+QFUPL / QFDEL / QFLST, a temporary
# directory) and the SSL context settings. seclevel 1 verifies the server's chain
# against that CA, as the modem does; a wrong CA fails the handshake.
# Faults are switched at run time: detach(), slow_ms, mute (missing replies), cme
# (+CME ERROR replies), late (one command answered after the driver gave up on it),
# lose_urc (URCs never sent), hang (dead modem).
#
#   python -m sim.modem --pty-link /tmp/modem [--faults slow_ms=300,cme=QIOPEN:566:1]
# prints the pty path and then reads control lines on stdin ("detach", "attach",
# "hang", "unhang", "slow_ms 300", "mute QIRD 2", "cme QIOPEN 566 1",
# "lose_urc recv 3", "clear").
import os
import sys
import time

from sim.ptyuart import PtyUart  # noqa: F401 (the firmware's side, kept importable here)


# ---------------------------------------------------------------------------------
# Everything below is the emulator: CPython only.

if sys.implementation.name != "micropython":
    import select
    import shutil
    import socket
    import ssl
    import tempfile
    import threading

    _NUM_SOCK = 12
    _X509_V_FLAG_NO_CHECK_TIME = 0x200000   # OpenSSL: AT+QSSLCFG="ignorelocaltime",x,1
    _SSL_DEFAULTS = {"sslversion": 4, "ciphersuite": "0xFFFF", "seclevel": 0,
                     "cacert": "", "clientcert": "", "clientkey": "", "ignorelocaltime": 1,
                     "negotiatetime": 300, "sni": 0}

    def qf_checksum(data):
        """+QFUPL checksum (FILE AT Commands Manual): XOR of big-endian 16-bit words,
        an odd last byte as the high byte. Written apart from the firmware's."""
        if len(data) % 2:
            data = data + b"\0"
        c = 0
        for i in range(0, len(data), 2):
            c ^= int.from_bytes(data[i:i + 2], "big")
        return c

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
            self.tls = None         # ssl.SSLObject for AT+QSSLOPEN sockets
            self.tin = self.tout = None
            self.hs_deadline = None  # TLS handshake still running until then

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
            self.ufs = tempfile.mkdtemp(prefix="bg95-ufs-")   # the modem's file system
            self.ssl_ctx = {}    # sslctxID -> settings (AT+QSSLCFG)
            self._upload = None  # [path, size, bytearray, deadline] during AT+QFUPL
            # faults
            self.slow_ms = 0
            self.mute = {}       # cmd name -> remaining count (-1 forever)
            self.cme = {}        # cmd name -> [code, remaining]
            self.lose_urc = {}   # urc kind -> remaining count
            self.late = {}       # cmd name -> [extra ms, remaining count]: a late reply
            self._late_ms = 0
            self.hung = False
            self.detached = False
            self.powered = True
            self.boot_ms = 300      # RDY this long after a power-on press
            self._pressed_at = None
            self._boot_at = None
            # i/o
            self._open_pty(pty_link)
            self._inbuf = bytearray()
            self._send_cid = None
            self._send_len = None
            self._out = []       # [due_monotonic, bytes]
            self._last_due = 0.0
            self._lock = threading.RLock()
            self.log = []        # commands seen, for tests
            self.tls_errors = []  # why handshakes failed, for tests

        # -- control --------------------------------------------------------------
        def _close_conns(self):
            for s in list(self.socks.values()):
                self._drop(s)

        def stop(self):
            PtyHost.stop(self)
            shutil.rmtree(self.ufs, ignore_errors=True)

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

        def pwrkey(self, pressed):
            """The PWRKEY line (True = pressed, i.e. pulled low). A press of >= 650 ms turns
            a running module off ("POWERED DOWN", whatever state it was in, a hang too);
            one of >= 500 ms turns an off module on ("RDY" after boot_ms)."""
            with self._lock:
                now = time.monotonic()
                if pressed:
                    self._pressed_at = now
                    return
                if self._pressed_at is None:
                    return
                held_ms = (now - self._pressed_at) * 1000
                self._pressed_at = None
                if self.powered and held_ms >= 650:
                    self.hung = False
                    self._reply("POWERED DOWN")
                    self._power_off()
                elif not self.powered and held_ms >= 500:
                    self._boot_at = now + self.boot_ms / 1000

        def _power_off(self):
            self.powered = False
            self._close_conns()
            self.pdp = False
            self.reg = 0
            self._upload = None
            self._send_cid = None
            self._inbuf = bytearray()

        def _power_on(self):
            self.powered = True
            self._boot_at = None
            self.echo = True
            self.cereg_n = 0
            self.reg = 2
            self.ssl_ctx = {}
            self.pin_ok = self.pin is None
            self._reg_at = time.monotonic() + self.reg_delay_ms / 1000
            self._reply("RDY")

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
                elif name == "pwrkey":
                    self.pwrkey(args[0] in ("1", "press", "down"))
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
            if self.hung or (not self.powered and data != b"\r\nPOWERED DOWN\r\n"):
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
                            if data and not self.hung and self.powered:
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
            now = time.monotonic()
            if self._boot_at is not None and now >= self._boot_at:
                self._power_on()
            if not self.powered:
                return
            if self._upload is not None and now > self._upload[3]:
                self._upload = None            # the data stopped coming: nothing stored
                self._reply("+CME ERROR: 420")
            for s in list(self.socks.values()):
                if s.hs_deadline is not None and now > s.hs_deadline:
                    self._ssl_fail(s, 569)     # handshake did not finish in negotiatetime
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
                    if s.tls is not None:
                        self._tls_input(s, data)
                        return
                    if data:
                        self._received(s, data)
                    else:
                        self._peer_closed(s)

        def _received(self, s, data):
            was_empty = not s.buf
            s.buf += data
            s.total += len(data)
            if was_empty and s.urc_armed:
                s.urc_armed = False
                self._urc("recv", '+%s: "recv",%d' % ("QSSLURC" if s.tls else "QIURC", s.cid))

        def _peer_closed(self, s):
            if s.s is not None:
                s.s.close()
                s.s = None
            s.state = 4
            self._urc("closed", '+%s: "closed",%d' % ("QSSLURC" if s.tls else "QIURC", s.cid))

        # -- TLS in the modem (memory BIOs: the loop feeds and drains the socket) -------
        def _tls_flush(self, s):
            out = s.tout.read()
            if out and s.s is not None:
                s.s.sendall(out)

        def _tls_input(self, s, data):
            if data:
                s.tin.write(data)
            else:
                s.tin.write_eof()
            if s.hs_deadline is not None:
                self._tls_handshake(s)
                if s.hs_deadline is not None or s.state != 2:
                    return
            got = bytearray()
            closed = not data
            while True:
                try:
                    chunk = s.tls.read(16384)
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    closed = True
                    break
                except ssl.SSLError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                got += chunk
            try:
                self._tls_flush(s)
            except OSError:
                closed = True
            if got:
                self._received(s, bytes(got))
            if closed:
                self._peer_closed(s)

        def _tls_handshake(self, s):
            try:
                s.tls.do_handshake()
            except ssl.SSLWantReadError:
                try:
                    self._tls_flush(s)
                except OSError:
                    self._ssl_fail(s, 566)
                return
            except (ssl.SSLError, ssl.CertificateError, OSError) as e:
                self.tls_errors.append(str(e))
                try:
                    self._tls_flush(s)       # the alert, as a real stack sends it
                except OSError:
                    pass
                self._ssl_fail(s, 550)
                return
            try:
                self._tls_flush(s)
            except OSError:
                self._ssl_fail(s, 566)
                return
            s.hs_deadline = None
            s.state = 2
            self._urc("qiopen", "+QSSLOPEN: %d,0" % s.cid)

        def _ssl_fail(self, s, err):
            s.hs_deadline = None
            self._drop(s)
            self._urc("qiopen", "+QSSLOPEN: %d,%d" % (s.cid, err))

        def _ssl_context(self, cfg):
            """An SSL client configured from the modem's SSL context settings and files."""
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False         # the modem verifies the chain, not the name
            ver = int(cfg["sslversion"])
            pick = {1: ssl.TLSVersion.TLSv1, 2: ssl.TLSVersion.TLSv1_1,
                    3: ssl.TLSVersion.TLSv1_2}
            if ver in pick:
                ctx.minimum_version = ctx.maximum_version = pick[ver]
            level = int(cfg["seclevel"])
            if level == 0:
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(cafile=self._ufs_path(cfg["cacert"]))
                if int(cfg["ignorelocaltime"]):
                    ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
            if level == 2:
                ctx.load_cert_chain(self._ufs_path(cfg["clientcert"]),
                                    self._ufs_path(cfg["clientkey"]))
            return ctx

        def _input(self, data):
            self._inbuf += data
            while self._inbuf:
                if self._upload is not None:
                    self._take_upload()
                    continue
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
                if s.tls is not None:
                    s.tls.write(payload)
                    self._tls_flush(s)
                else:
                    s.s.sendall(payload)
                s.sent += len(payload)
                self._reply("SEND OK")
            except (OSError, ssl.SSLError):
                self._reply("SEND FAIL")
            return True

        def _take_upload(self):
            up = self._upload
            need = up[1] - len(up[2])
            up[2] += self._inbuf[:need]
            del self._inbuf[:need]
            if len(up[2]) < up[1]:
                return
            self._upload = None
            with open(up[0], "wb") as f:
                f.write(up[2])
            self._reply("+QFUPL: %d,%x" % (len(up[2]), qf_checksum(bytes(up[2]))), "OK")

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

        def _open_start(self, cid, urc, valid=True):
            """What AT+QIOPEN and AT+QSSLOPEN share: a socket id in range and free (else
            ERROR / +CME ERROR: 563), OK, then a PDP context (else the URC with 561).
            True when the connection may be made."""
            if not valid or not 0 <= cid < _NUM_SOCK:
                self._reply("ERROR")
                return False
            if cid in self.socks:
                self._reply("+CME ERROR: 563")
                return False
            self._reply("OK")
            if not self.pdp:
                self._urc("qiopen", "%s: %d,561" % (urc, cid))
                return False
            return True

        def _c_QIOPEN(self, arg, q):
            a = self._args(arg)
            cid = int(a[1])
            host, port = a[3], int(a[4])
            if not self._open_start(cid, "+QIOPEN"):
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
            sel = [s for s in self.socks.values() if s.tls is None]
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
            if s is None or s.state != 2 or s.tls is not None:
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
            if s.tls is not None:
                self._reply("ERROR")
                return
            self._read_out(s, "+QIRD", int(a[1]) if len(a) > 1 else 1500)

        def _read_out(self, s, prefix, ln):
            if ln == 0:
                self._reply("%s: %d,%d,%d" % (prefix, s.total, s.read, len(s.buf)), "OK")
                return
            ln = min(ln, 1500)
            data = bytes(s.buf[:ln])
            del s.buf[:ln]
            s.read += len(data)
            if not s.buf:
                s.urc_armed = True
            if data:
                self._emit(b"\r\n%s: %d\r\n" % (prefix.encode(), len(data)) + data +
                           b"\r\n\r\nOK\r\n")
            else:
                self._reply("%s: 0" % prefix, "OK")

        def _c_QICLOSE(self, arg, q):
            cid = int(self._args(arg)[0])
            s = self.socks.get(cid)
            if s is not None and s.tls is None:
                self._drop(s)
            self._reply("OK")

        # -- file system (UFS) ----------------------------------------------------------
        def _ufs_path(self, name):
            """A modem file name ("UFS:x.pem" or "x.pem") -> the path that holds it."""
            if name.upper().startswith("UFS:"):
                name = name[4:]
            if not name or "/" in name or name.startswith(".") or len(name) > 80:
                raise ValueError("bad file name %r" % name)
            return os.path.join(self.ufs, name)

        def _c_QFUPL(self, arg, q):
            a = self._args(arg)
            try:
                path = self._ufs_path(a[0])
            except ValueError:
                self._reply("+CME ERROR: 406")     # invalid file name
                return
            size = int(a[1]) if len(a) > 1 else 10240
            tmo = int(a[2]) if len(a) > 2 else 5
            if os.path.exists(path):
                self._reply("+CME ERROR: 407")     # file already exists
                return
            if not 0 < size <= 65536:
                self._reply("+CME ERROR: 421")     # file too large
                return
            self._upload = [path, size, bytearray(), time.monotonic() + tmo]
            self._reply("CONNECT")

        def _c_QFDEL(self, arg, q):
            name = self._args(arg)[0]
            if name in ("*", "UFS:*"):
                for f in os.listdir(self.ufs):
                    os.unlink(os.path.join(self.ufs, f))
                self._reply("OK")
                return
            try:
                os.unlink(self._ufs_path(name))
            except (OSError, ValueError):
                self._reply("+CME ERROR: 405")     # file not found
                return
            self._reply("OK")

        def _c_QFLST(self, arg, q):
            lines = ['+QFLST: "UFS:%s",%d' % (f, os.path.getsize(os.path.join(self.ufs, f)))
                     for f in sorted(os.listdir(self.ufs))]
            self._reply(*(lines + ["OK"]))

        # -- SSL ----------------------------------------------------------------------
        def _c_QSSLCFG(self, arg, q):
            a = self._args(arg)
            what = a[0].lower()
            if what not in _SSL_DEFAULTS or len(a) < 2 or not 0 <= int(a[1]) <= 5:
                self._reply("ERROR")
                return
            cfg = self.ssl_ctx.setdefault(int(a[1]), dict(_SSL_DEFAULTS))
            if len(a) == 2:
                v = cfg[what]
                self._reply('+QSSLCFG: "%s",%s,%s' % (
                    what, a[1], '"%s"' % v if isinstance(v, str) and what != "ciphersuite"
                    else v), "OK")
                return
            v = a[2]
            if what in ("cacert", "clientcert", "clientkey"):
                self._ufs_path(v)                  # ValueError -> ERROR
            elif what == "ciphersuite":
                int(v, 16)
            else:
                v = int(v)
                lim = {"sslversion": (0, 4), "seclevel": (0, 2), "ignorelocaltime": (0, 1),
                       "negotiatetime": (10, 300), "sni": (0, 1)}[what]
                if not lim[0] <= v <= lim[1]:
                    self._reply("ERROR")
                    return
            cfg[what] = v
            self._reply("OK")

        def _c_QSSLOPEN(self, arg, q):
            a = self._args(arg)
            ctxid, cid = int(a[1]), int(a[2])
            host, port = a[3], int(a[4])
            if not self._open_start(cid, "+QSSLOPEN", 0 <= ctxid <= 5):
                return
            cfg = self.ssl_ctx.get(ctxid, dict(_SSL_DEFAULTS))
            try:
                ctx = self._ssl_context(cfg)
            except (OSError, ValueError, ssl.SSLError) as e:
                self.tls_errors.append("context: %s" % e)   # e.g. the CA file is missing
                self._urc("qiopen", "+QSSLOPEN: %d,550" % cid)
                return
            s = _Sock(cid, host, port)
            h, p = self.host_map.get((host, port), (host, port))
            try:
                s.s = socket.create_connection((h, p), timeout=2)
            except OSError:
                self._urc("qiopen", "+QSSLOPEN: %d,566" % cid)
                return
            s.tin, s.tout = ssl.MemoryBIO(), ssl.MemoryBIO()
            s.tls = ctx.wrap_bio(s.tin, s.tout, server_hostname=host if int(cfg["sni"])
                                 else None)
            s.state = 1
            s.hs_deadline = time.monotonic() + int(cfg["negotiatetime"])
            self.socks[cid] = s
            self._tls_handshake(s)

        def _c_QSSLSEND(self, arg, q):
            a = self._args(arg)
            s = self.socks.get(int(a[0]))
            if s is None or s.tls is None or s.state != 2:
                self._reply("ERROR")
                return
            ln = int(a[1]) if len(a) > 1 else None
            if ln is not None and not 0 < ln <= 1460:
                self._reply("ERROR")
                return
            self._send_cid = s.cid
            self._send_len = ln
            self._emit(b"\r\n> ")

        def _c_QSSLRECV(self, arg, q):
            a = self._args(arg)
            s = self.socks.get(int(a[0]))
            if s is None or s.tls is None:
                self._reply("ERROR")
                return
            self._read_out(s, "+QSSLRECV", int(a[1]) if len(a) > 1 else 1500)

        def _c_QSSLSTATE(self, arg, q):
            sel = [s for s in self.socks.values() if s.tls is not None]
            if arg:
                sel = [s for s in sel if s.cid == int(self._args(arg)[0])]
            lines = ['+QSSLSTATE: %d,"SSLClient","%s",%d,%d,%d,1,-1,0,"uart1",1' % (
                s.cid, s.host, s.port, 40000 + s.cid, s.state) for s in sel]
            self._reply(*(lines + ["OK"]))

        def _c_QSSLCLOSE(self, arg, q):
            s = self.socks.get(int(self._args(arg)[0]))
            if s is not None and s.tls is not None:
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
