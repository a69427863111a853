# NB-IoT uplink through a Quectel BG95/BG96 modem on a UART, using the modem's own
# TCP stack in buffer access mode (Quectel "TCP/IP Application Note", AT+QIOPEN /
# AT+QISEND / AT+QIRD / +QIURC) and, for TLS, the modem's own SSL stack (Quectel "SSL
# Application Note": AT+QSSLCFG / AT+QSSLOPEN / AT+QSSLSEND / AT+QSSLRECV / +QSSLURC)
# with the CA uploaded to the modem's file system (AT+QFUPL). The AT subset used is
# listed in docs/transports.md.
#
# The UART is any object with readinto(buf) -> n or None without blocking (machine.UART
# built with timeout=0, or sim.modem.PtyUart on the unix port) and write(buf).
# Nothing here waits on the UART: reads are polled every poll_ms with an asyncio sleep,
# so a hung modem costs the metering task nothing but a few polls.
try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio

from util import deadline_ms as _deadline
from comm.transport import TransportError, ticks_ms, ticks_diff, sleep_ms, remaining_ms

_DEBUG = const(False)
_MAX_CHUNK = const(1460)      # AT+QISEND / AT+QIRD limit is 1460 / 1500 bytes
# A socket read asks for at most _RD_MAX bytes, so that the AT buffer, which must hold a
# whole AT+QIRD answer, stays small (issue 7: every byte of it is heap for good). A larger
# MQTT packet (a 1 KB command, an OTA chunk) comes in two or three reads.
_RD_MAX = const(512)
_RXBUF = const(768)           # _RD_MAX of data + its "+QIRD: n" line + URC lines
_CTX = const(1)               # PDP context id
_MAX_SOCK = const(12)         # connectID 0..11
# const() is folded at compile time, and merge / lookup / epoch_s / NetTime are imported
# where they are used (once each): the module's table stays at 23 slots, not 29
del const

_DEFAULTS = (
    ("apn", ""), ("user", ""), ("password", ""), ("auth", 0), ("pin", None),
    ("cmd_ms", 1000),        # ordinary command reply (BG95: 300 ms; slack for slow UARTs)
    ("attach_ms", 140000),   # AT+CGATT=1 worst case per the manual
    ("act_ms", 150000),      # AT+QIACT worst case
    ("open_ms", 150000),     # +QIOPEN URC worst case
    ("close_ms", 10000),     # AT+QICLOSE
    ("send_ms", 10000),      # > prompt and SEND OK
    ("reg_poll_ms", 1000),   # AT+CEREG? polling period while attaching
    ("rd_poll_ms", 1000),    # read with AT+QIRD even without a "recv" URC (lost URCs)
    ("state_poll_ms", 5000), # AT+QISTATE while idle (lost "closed" URCs)
    ("poll_ms", 5),          # UART polling period
    ("max_timeouts", 3),     # consecutive unanswered commands before the modem is "hung"
    ("ssl_ctx", 1),          # SSL context of the modem used for TLS (0..5)
    ("ssl_version", 3),      # AT+QSSLCFG="sslversion": 3 = TLS 1.2 only, 4 = any
    ("negotiate_s", 60),     # TLS handshake limit in the modem (10..300 s)
    ("tls_check_time", False),  # certificate dates checked against the modem's clock
    ("upload_ms", 10000),    # AT+QFUPL of one certificate file
    ("pwrkey_ms", 800),      # PWRKEY press: BG95 turns on after >= 500 ms, off after >= 650 ms
    ("rdy_ms", 15000),       # wait for RDY after a power-on press
)

def _load():
    """comm.nbiot_up (the bring-up and TLS set-up), imported and at once dropped from
    sys.modules and the package: the caller's running coroutine keeps the module's
    globals until it returns, then they are freed. A running meter, which only sends and
    checks the link, holds none of it; a link loss or a TLS reconnect loads it again."""
    from util import unload         # a local name: no slot in this module's globals
    import comm.nbiot_up
    m = comm.nbiot_up
    unload("comm.nbiot_up")
    return m


class ModemError(TransportError):
    """The NB-IoT modem refused or did not answer. `code` is the +CME code or None."""

    def __init__(self, msg, code=None):
        super().__init__(msg)
        self.code = code


class ModemTimeout(ModemError):
    pass


# +CME codes the user can act on (3GPP 27.007 9.2 and Quectel 5xx TCP/IP codes).
_CME_HINT = (
    (10, "SIM not inserted: insert the SIM card"),
    (11, "SIM PIN required: set nbiot pin"),
    (12, "SIM PUK required: unlock the SIM in a phone"),
    (13, "SIM failure: replace the SIM"),
    (405, "file not found in the modem"),
    (407, "file already exists in the modem"),
    (550, "unknown error (over TLS: the handshake failed; check the CA file, the broker's "
          "TLS port and its certificate)"),
    (16, "incorrect SIM PIN: fix nbiot pin (3 wrong PINs lock the SIM)"),
    (30, "no network service: check antenna and coverage"),
    (561, "PDP context activation failed: check the APN"),
    (563, "socket id in use"),
    (565, "DNS failed: use an IP address or check the APN's DNS"),
    (566, "socket connect failed: check broker address and port"),
    (567, "socket closed"),
    (569, "operation timeout: check coverage"),
    (570, "PDP context broken: the modem lost the network"),
    (573, "APN not configured: set nbiot apn"),
)


def _hint(code):
    from util import lookup
    return lookup(_CME_HINT, code, "see the Quectel error code list")


def _csq_dbm(rssi):
    # 27.007 +CSQ: 0 -> -113 dBm or less, 1 -> -111, 2..30 -> -109..-53, 31 -> -51, 99 unknown
    if rssi == 99 or rssi < 0:
        return None
    return -113 + 2 * rssi


def parse_clock(s):
    """Epoch seconds (UTC) from "yy/MM/dd,hh:mm:ss+zz" (27.007 +CCLK, local time with
    the offset in quarter hours) or "yyyy/MM/dd,hh:mm:ss+zz,dst" (Quectel +QLTS=1, GMT).
    None when the string is not a time."""
    s = s.strip().strip('"')
    try:
        date, rest = s.split(",", 1)
        y, mo, d = [int(x) for x in date.split("/")]
        hms = rest[:8]
        h, mi, se = [int(x) for x in hms.split(":")]
        tz = rest[8:].split(",")[0]
        tzq = int(tz) if tz else 0
    except (ValueError, IndexError):
        return None
    if y < 100:
        y += 2000
    from util import epoch_s
    return epoch_s(y, mo, d, h, mi, se), tzq


class AtPort:
    """Line-oriented AT channel with URC dispatch. One command at a time (lock)."""

    def __init__(self, uart, cfg, on_urc):
        self.uart = uart
        self.cfg = cfg
        self.on_urc = on_urc
        self._rx = bytearray(_RXBUF)
        self._mv = memoryview(self._rx)
        self._n = 0
        self.lock = asyncio.Lock()
        self.timeouts = 0          # consecutive commands without a final result
        # After a timeout the modem may still answer the abandoned command: its late
        # "OK" would be taken for the next command's answer. The next command therefore
        # resynchronises first (comm/nbiot_up.py resync).
        self.stale = False
        self.stats = {"cmds": 0, "timeouts": 0, "errors": 0, "urcs": 0, "resyncs": 0}

    # -- byte level -------------------------------------------------------------
    def _fill(self):
        if self._n >= _RXBUF:
            return 0
        try:
            n = self.uart.readinto(self._mv[self._n:])
        except OSError:
            n = 0
        if n:
            self._n += n
            return n
        return 0

    def _consume(self, k):
        rem = self._n - k
        if rem > 0:
            self._rx[0:rem] = self._rx[k:self._n]
        self._n = rem

    def _take_line(self):
        # Skip blank line ends; return a complete line (str) or ">" for the data prompt.
        while self._n and self._rx[0] in (13, 10):
            self._consume(1)
        if self._n >= 1 and self._rx[0] == 62:  # ">" of AT+QISEND, not newline terminated
            self._consume(2 if self._n >= 2 and self._rx[1] == 32 else 1)
            return ">"
        i = self._rx.find(b"\n", 0, self._n)
        if i < 0:
            if self._n >= _RXBUF:  # garbage without line end: drop it, do not stall
                self._n = 0
            return None
        try:
            line = bytes(self._mv[:i]).decode()
        except UnicodeError:  # line noise: treat as a blank line
            line = ""
        self._consume(i + 1)
        return line.strip()

    async def _readline(self, deadline):
        while True:
            line = self._take_line()
            if line is not None:
                if _DEBUG:
                    print("AT<", line)
                return line
            if not self._fill():
                if remaining_ms(deadline) <= 0:
                    raise ModemTimeout("modem did not answer in time")
                await sleep_ms(self.cfg["poll_ms"])

    async def _read_exact(self, n, deadline, dst):
        # QIRD payload: exactly n raw bytes after "+QIRD: n\r\n"
        while self._n < n:
            if not self._fill():
                if remaining_ms(deadline) <= 0:
                    raise ModemTimeout("modem stopped in the middle of AT+QIRD data")
                await sleep_ms(self.cfg["poll_ms"])
        dst[:n] = self._mv[:n]
        self._consume(n)

    async def _write(self, data):
        mv = memoryview(data)
        off = 0
        deadline = _deadline(self.cfg["send_ms"])
        while off < len(mv):
            k = self.uart.write(mv[off:off + 256])
            off += k or 0
            if not k:
                if remaining_ms(deadline) <= 0:
                    raise ModemTimeout("UART to the modem does not accept data")
                await sleep_ms(self.cfg["poll_ms"])
            elif off < len(mv):
                await sleep_ms(0)

    # -- URCs --------------------------------------------------------------------
    def pump(self):
        """Dispatch every complete line already received (URCs between commands).
        Call with the lock held."""
        self._fill()
        while True:
            line = self._take_line()
            if line is None:
                return
            if line and line != ">":
                self.stats["urcs"] += 1
                self.on_urc(line)

    # -- commands ----------------------------------------------------------------
    async def cmd(self, at, timeout_ms=None, prefix=None, data=None, final_send=False):
        """Send one command, return its information lines (list of str).

        prefix: lines starting with it are answers, not URCs (e.g. "+CEREG:").
        data: payload for AT+QISEND after the ">" prompt; the final result is then
        SEND OK / SEND FAIL. Raises ModemError (+CME text) or ModemTimeout."""
        async with self.lock:
            return await self._cmd(at, timeout_ms, prefix, data, None)

    async def _cmd(self, at, timeout_ms, prefix, data, qird_into):
        # qird_into: a read command (AT+QIRD / AT+QSSLRECV) whose answer line starts
        # with prefix and is followed by that many raw bytes, read into qird_into.
        self.pump()
        deadline = _deadline(timeout_ms or self.cfg["cmd_ms"])
        if self.stale:
            try:
                await _load().resync(self, deadline)   # rare: comm/nbiot_up.py
            except ModemTimeout:
                self.timeouts += 1
                self.stats["timeouts"] += 1
                raise ModemTimeout("modem did not answer ATI (resynchronising before %s) "
                                   "within %d ms: check power and the UART wiring, or reset "
                                   "the modem" % (at, timeout_ms or self.cfg["cmd_ms"]))
            deadline = _deadline(timeout_ms or self.cfg["cmd_ms"])
        if _DEBUG:
            print("AT>", at)
        self.stats["cmds"] += 1
        await self._write(at.encode() + b"\r")
        lines = []
        got = 0
        try:
            while True:
                line = await self._readline(deadline)
                if not line or line == at:
                    continue  # blank or echo (before ATE0)
                if line == ">" or line == "CONNECT":   # QISEND / QSSLSEND / QFUPL data
                    if data is None:
                        continue
                    if isinstance(data, tuple):     # parts of one send (send_parts)
                        for part in data:
                            await self._write(part)
                    else:
                        await self._write(data)
                    data = None
                    continue
                if line == "OK" or line == "SEND OK":
                    self.timeouts = 0
                    if qird_into is not None:
                        return got
                    return lines
                if line == "ERROR" or line == "SEND FAIL" or line.startswith("+CME ERROR") \
                        or line.startswith("+CMS ERROR"):
                    self.timeouts = 0
                    self.stats["errors"] += 1
                    code = None
                    if ":" in line:
                        try:
                            code = int(line.split(":", 1)[1])
                        except ValueError:
                            pass
                    raise ModemError("modem answered %s to %s%s" % (
                        line, at, (": " + _hint(code)) if code is not None else ""), code)
                if qird_into is not None and line.startswith(prefix):
                    got = int(line[len(prefix):].split(",")[0])
                    if got > len(qird_into):
                        raise ModemError("modem announced %d bytes for a %d byte read"
                                         % (got, len(qird_into)))
                    if got:
                        await self._read_exact(got, deadline, qird_into)
                    continue
                if prefix and line.startswith(prefix):
                    lines.append(line)
                elif self._is_urc(line):
                    self.stats["urcs"] += 1
                    self.on_urc(line)
                else:
                    lines.append(line)
        except ModemTimeout:
            self.timeouts += 1
            self.stats["timeouts"] += 1
            self.stale = True
            raise ModemTimeout("modem did not answer %s within %d ms: check power and the "
                               "UART wiring, or reset the modem" % (at, timeout_ms or self.cfg["cmd_ms"]))

    @staticmethod
    def _is_urc(line):
        return (line.startswith("+QIURC:") or line.startswith("+QIOPEN:")
                or line.startswith("+QSSLURC:") or line.startswith("+QSSLOPEN:")
                or line.startswith("+CEREG:") or line.startswith("+CPIN:")
                or line in ("RDY", "APP RDY", "POWERED DOWN") or line.startswith("+QIND:")
                or line.startswith("+CGEV:") or line.startswith("+QNTP"))

    async def read_sock(self, ops, cid, buf, timeout_ms):
        """AT+QIRD / AT+QSSLRECV = cid,len into buf; returns the number of bytes read
        (0 = empty). ops: the socket's command set (_TCP or _SSL)."""
        n = min(len(buf), _RD_MAX)
        async with self.lock:
            return await self._cmd("%s=%d,%d" % (ops[2], cid, n), timeout_ms,
                                   ops[3], None, qird_into=memoryview(buf)[:n])


# Per socket kind: open, send, read, read answer prefix, state, state answer, close,
# URC prefix, open URC prefix.
_TCP = ("AT+QIOPEN", "AT+QISEND", "AT+QIRD", "+QIRD:", "AT+QISTATE=1,", "+QISTATE:",
        "AT+QICLOSE", "+QIURC:", "+QIOPEN:")
_SSL = ("AT+QSSLOPEN", "AT+QSSLSEND", "AT+QSSLRECV", "+QSSLRECV:", "AT+QSSLSTATE=",
        "+QSSLSTATE:", "AT+QSSLCLOSE", "+QSSLURC:", "+QSSLOPEN:")


class ModemConn:
    """One TCP socket inside the modem (buffer access mode), plain or TLS (the modem's
    SSL stack: same shape, AT+QSSL* commands)."""

    def __init__(self, modem, cid, host, port, ops):
        self.modem = modem
        self.cid = cid
        self.ops = ops
        self.tls = ops is _SSL
        self.name = "nbiot"          # the transport name: the status topic shows it
        self.peer = "%s:%d#%d%s" % (host, port, cid, " tls" if self.tls else "")
        self.opened = None        # None while +QIOPEN pending, else the result code
        self.readable = True      # a "recv" URC came (or might have been lost)
        self.peer_closed = False
        self.closed = False
        self._last_rd = ticks_ms()
        self._last_st = ticks_ms()

    async def send(self, buf):
        if self.closed or self.peer_closed:
            raise ModemError("connection %s is closed: reconnect" % self.peer)
        mv = memoryview(buf)
        off = 0
        while off < len(mv):
            chunk = mv[off:off + _MAX_CHUNK]
            try:
                await self.modem.port.cmd("%s=%d,%d" % (self.ops[1], self.cid, len(chunk)),
                                          self.modem.cfg["send_ms"], data=chunk)
            except ModemError as e:
                self.peer_closed = True
                raise ModemError("send on %s failed (%s): reconnect" % (self.peer, e), e.code)
            off += len(chunk)

    async def send_parts(self, parts):
        """Send a tuple of buffers as one AT+QISEND when they fit one (comm.mqtt: a PUBLISH's
        header and its payload, which so needs no copy of the payload), else part by part."""
        n = 0
        for p in parts:
            n += len(p)
        if n > _MAX_CHUNK:
            for p in parts:
                await self.send(p)
            return
        if self.closed or self.peer_closed:
            raise ModemError("connection %s is closed: reconnect" % self.peer)
        try:
            await self.modem.port.cmd("%s=%d,%d" % (self.ops[1], self.cid, n),
                                      self.modem.cfg["send_ms"], data=parts)
        except ModemError as e:
            self.peer_closed = True
            raise ModemError("send on %s failed (%s): reconnect" % (self.peer, e), e.code)

    async def recv_into(self, buf, timeout_ms):
        deadline = _deadline(timeout_ms)
        m = self.modem
        while True:
            if self.closed:
                raise ModemError("connection %s was closed locally" % self.peer)
            if not m.pdp:
                self.peer_closed = True
            # Read when a URC said so, when the peer closed (drain first), or every
            # rd_poll_ms in case the "recv" URC was lost on the UART.
            urc = self.readable or self.peer_closed
            if urc or ticks_diff(ticks_ms(), self._last_rd) >= m.cfg["rd_poll_ms"]:
                self._last_rd = ticks_ms()
                try:
                    n = await m.port.read_sock(self.ops, self.cid, buf, None)
                except ModemError as e:
                    # ERROR to the read: the socket no longer exists in the modem
                    self.peer_closed = True
                    raise ModemError("connection %s lost (%s): reconnect" % (self.peer, e))
                if n:
                    return n
                self.readable = False
                if not urc and ticks_diff(ticks_ms(), self._last_st) >= m.cfg["state_poll_ms"]:
                    # A lost "closed" URC would leave us waiting forever: ask the state.
                    self._last_st = ticks_ms()
                    if await m.sock_state(self.cid, self.ops) != 2:
                        self.peer_closed = True
                if self.peer_closed:
                    raise ModemError("connection %s closed by the peer or the network: "
                                     "reconnect" % self.peer)
            if remaining_ms(deadline) <= 0:
                return 0
            if not m.port.lock.locked():
                async with m.port.lock:
                    m.port.pump()
            await sleep_ms(min(20, max(1, remaining_ms(deadline))))

    def close(self):
        # Synchronous per the contract: mark closed; the modem socket is released by
        # AT+QICLOSE / AT+QSSLCLOSE from the modem's next command or from up()/down().
        if not self.closed:
            self.closed = True
            self.modem._to_close.append((self.cid, self.ops))


class NbiotTransport:
    name = "nbiot"

    def __init__(self, uart, cfg=None, pwrkey=None):
        from util import merge
        from comm.transport import NetTime
        self.cfg = merge("nbiot config", _DEFAULTS, cfg)
        self.port = AtPort(uart, self.cfg, self._urc)
        # optional Pin-like: the modem's PWRKEY through the board's driver transistor,
        # value(1) = key pressed (PWRKEY low). Used to power-cycle a hung modem.
        self.pwrkey = pwrkey
        self._rdy = False           # "RDY" seen since the last PWRKEY press
        self.power_cycles = 0
        self.conns = {}             # cid -> ModemConn
        self._to_close = []
        self.reg = 0                # +CEREG stat (1 home, 5 roaming)
        self.pdp = False            # PDP context active
        self.ready = False          # AT dialogue established (ATE0 done)
        self.signal_dbm = None
        self.detail = "not started"
        self.ip = None
        self.clock = NetTime()
        self.pdp_losses = 0
        self._files = {}            # modem file name -> (size, checksum) uploaded since RDY
        self._ssl_applied = None    # the AT+QSSLCFG settings the SSL context holds

    # -- URCs ---------------------------------------------------------------------
    def _urc(self, line):
        if _DEBUG:
            print("URC", line)
        if line.startswith("+QIURC:") or line.startswith("+QSSLURC:"):
            ssl = line[2] == "S"
            args = line[line.find(":") + 1:].strip().split(",")
            kind = args[0].strip('"')
            cid = int(args[1]) if len(args) > 1 and args[1].strip().isdigit() else -1
            c = self.conns.get(cid)
            if c is not None and c.tls != ssl:
                c = None                 # a URC for the other kind of socket
            if kind == "recv" and c is not None:
                c.readable = True
            elif kind == "closed" and c is not None:
                c.peer_closed = True
                c.readable = True
            elif kind == "pdpdeact":
                self._lost_pdp("network deactivated the PDP context")
        elif line.startswith("+QIOPEN:") or line.startswith("+QSSLOPEN:"):
            a = line[line.find(":") + 1:].split(",")
            try:
                cid, err = int(a[0]), int(a[1])
            except (ValueError, IndexError):
                return
            c = self.conns.get(cid)
            if c is not None and c.tls == (line[2] == "S"):
                c.opened = err
        elif line.startswith("+CEREG:"):
            a = line[7:].split(",")
            try:
                # URC form "+CEREG: <stat>[,<tac>,...]" (answers are taken by prefix)
                self.reg = int(a[0])
            except ValueError:
                return
            if self.reg not in (1, 5):
                self._lost_pdp("network registration lost (+CEREG: %d)" % self.reg)
        elif line in ("RDY", "POWERED DOWN"):
            if line == "RDY":
                self._rdy = True
            self.ready = False
            self._files = {}
            self._ssl_applied = None
            self._lost_pdp("modem restarted")

    def _lost_pdp(self, why):
        self.pdp = False
        self.pdp_losses += 1
        self.detail = why
        for c in self.conns.values():
            c.peer_closed = True
            c.readable = True

    # -- bring-up: comm/nbiot_up.py, loaded for the call -----------------------------
    async def up(self, deadline_ms):
        """Sync with the modem, unlock the SIM, set the APN, attach, activate the PDP
        context. deadline_ms is the budget. False (with health()["detail"]) on failure.
        (comm/nbiot_up.py: loaded for the call, see _load.)"""
        return await _load().up(self, deadline_ms)

    async def _reg_state(self):
        r = await self.port.cmd("AT+CEREG?", prefix="+CEREG:")
        if r:
            a = r[0][7:].split(",")
            self.reg = int(a[1]) if len(a) > 1 else int(a[0])
        return self.reg

    async def check(self):
        """Refresh signal, registration and network time (three short commands)."""
        try:
            await self._close_pending()
            r = await self.port.cmd("AT+CSQ", prefix="+CSQ:")
            if r:
                self.signal_dbm = _csq_dbm(int(r[0][5:].split(",")[0]))
            await self._reg_state()
            if self.reg not in (1, 5):
                self._lost_pdp("not registered (+CEREG: %d)" % self.reg)
            await self._sync_time()
        except ModemError as e:
            self.detail = str(e)
            if isinstance(e, ModemTimeout):
                self.pdp = self.pdp and self.port.timeouts < self.cfg["max_timeouts"]

    async def _sync_time(self):
        # AT+QLTS=1 is GMT; fall back to the 27.007 AT+CCLK? (local time + zone).
        try:
            r = await self.port.cmd("AT+QLTS=1", prefix="+QLTS:")
            t = parse_clock(r[0][6:]) if r else None
            if t and self.clock.set(t[0]):
                return
        except ModemError:
            pass
        r = await self.port.cmd("AT+CCLK?", prefix="+CCLK:")
        t = parse_clock(r[0][6:]) if r else None
        if t:
            self.clock.set(t[0] - t[1] * 900)

    def health(self):
        ok = self.ready and self.pdp and self.reg in (1, 5) and \
            self.port.timeouts < self.cfg["max_timeouts"]
        return {"ok": ok, "signal": self.signal_dbm, "detail": self.detail}

    def time(self):
        return self.clock.get()

    async def _close_pending(self):
        while self._to_close:
            cid, ops = self._to_close.pop()
            self.conns.pop(cid, None)
            try:
                await self.port.cmd("%s=%d" % (ops[6], cid), self.cfg["close_ms"])
            except ModemError:
                pass

    async def sock_state(self, cid, ops):
        """<socket_state> from AT+QISTATE=1,cid / AT+QSSLSTATE=cid: 2 connected,
        4 closing, -1 no socket."""
        for line in await self.port.cmd("%s%d" % (ops[4], cid), prefix=ops[5]):
            a = line[len(ops[5]):].split(",")
            try:
                if int(a[0]) == cid:
                    return int(a[5])
            except (ValueError, IndexError):
                pass
        return -1

    # -- sockets -------------------------------------------------------------------
    async def connect(self, host, port, tls=None):
        """A TCP connection through the modem; with tls (a dict, docs/transports.md) a
        TLS connection made by the modem's SSL stack, the server verified against the
        CA in the modem."""
        if not self.pdp:
            raise ModemError("NB-IoT not attached: call up() first (%s)" % self.detail)
        await self._close_pending()
        ops = _TCP
        if tls is not None and tls is not False:
            if not isinstance(tls, dict):
                raise ModemError("tls must be a dict (ca, cert, key, modem_ca, ...)")
            await _load().ssl_setup(self, tls)
            ops = _SSL
        cid = None
        for i in range(_MAX_SOCK):
            if i not in self.conns:
                cid = i
                break
        if cid is None:
            raise ModemError("all 12 modem sockets in use: close connections")
        c = ModemConn(self, cid, host, port, ops)
        self.conns[cid] = c
        try:
            if ops is _SSL:
                await self.port.cmd('AT+QSSLOPEN=%d,%d,%d,"%s",%d,0' % (
                    _CTX, self.cfg["ssl_ctx"], cid, host, port))
                limit_ms = self.cfg["open_ms"] + self.cfg["negotiate_s"] * 1000
            else:
                await self.port.cmd('AT+QIOPEN=%d,%d,"TCP","%s",%d,0,0' % (_CTX, cid, host, port))
                limit_ms = self.cfg["open_ms"]
            deadline = _deadline(limit_ms)
            # Wait for +QIOPEN / +QSSLOPEN: cid,err; if the URC is lost, ask the socket's
            # state now and then.
            last_q = ticks_ms()
            while c.opened is None:
                if remaining_ms(deadline) <= 0:
                    raise ModemTimeout("no %s result within %d ms" % (ops[8], limit_ms))
                if ticks_diff(ticks_ms(), last_q) >= 2000:
                    last_q = ticks_ms()
                    if await self.sock_state(cid, ops) == 2:
                        c.opened = 0
                else:
                    async with self.port.lock:
                        self.port.pump()
                    await sleep_ms(20)
            if c.opened != 0:
                raise ModemError("modem could not open %s%s:%d (%s error %d: %s)" % (
                    "TLS to " if c.tls else "", host, port, ops[8], c.opened,
                    _hint(c.opened)), c.opened)
        except ModemError:
            self.conns.pop(cid, None)
            try:
                await self.port.cmd("%s=%d" % (ops[6], cid), self.cfg["close_ms"])
            except ModemError:
                pass
            raise
        return c

    async def down(self):
        for c in list(self.conns.values()):
            c.close()
        try:
            await self._close_pending()
            await self.port.cmd("AT+QIDEACT=%d" % _CTX, 40000)
        except ModemError:
            pass
        self.pdp = False
        self.detail = "down"
