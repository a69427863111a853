# Wi-Fi uplink: network.WLAN where the port has it, the host's network on the unix port.
# Sockets are non-blocking and polled with short asyncio sleeps (select.poll with a zero
# timeout), so a stalled peer never holds up the metering task. TLS through `ssl` with
# server verification against a CA file and an optional per-meter client certificate.
try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

import binascii
import select
import socket
import sys

from util import merge, deadline_ms as _deadline
from comm.transport import TransportError, sleep_ms, remaining_ms

_DEBUG = const(False)
# errno values meaning "not yet" on the unix port, lwIP ports and CPython
_AGAIN = (11, 35, 115, 119, 36, 150)

_DEFAULTS = {
    "ssid": None, "password": None,
    "poll_ms": 5,          # socket polling period
    "connect_ms": 15000,   # TCP connect (+ TLS handshake)
    "send_ms": 10000,      # a send that makes no progress for this long fails
}


class WifiError(TransportError):
    pass


_MPY = sys.implementation.name == "micropython"


def _der(path):
    """File contents as DER. The unix port's mbedtls rejects PEM ("invalid cert"), so a
    PEM file is decoded here (its first certificate or key block)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise WifiError("cannot read TLS file %s (%s): copy it to the meter" % (path, e))
    if not data.startswith(b"-----BEGIN"):
        return data
    lines = data.split(b"\n")
    body = []
    for ln in lines[1:]:
        ln = ln.strip()
        if ln.startswith(b"-----END"):
            break
        body.append(ln)
    return binascii.a2b_base64(b"".join(body))


def _again(e):
    if e.args and e.args[0] in _AGAIN:
        return True
    return type(e).__name__ in ("SSLWantReadError", "SSLWantWriteError", "BlockingIOError")


class SockConn:
    """Conn over a non-blocking (TLS) socket."""

    def __init__(self, sock, raw, name, cfg):
        self.s = sock
        self.raw = raw              # the TCP socket under TLS (same as s without TLS)
        self.name = name
        self.cfg = cfg
        self.closed = False
        self._wr = getattr(sock, "write", None) or sock.send
        self._rd = getattr(sock, "readinto", None) or sock.recv_into
        self.pending_buf = bytearray(0)   # bytes read while driving a TLS handshake
        self.pending = 0


    async def send(self, buf):
        if self.closed:
            raise WifiError("connection closed: reconnect")
        mv = memoryview(buf)
        off = 0
        deadline = _deadline(self.cfg["send_ms"])
        while off < len(mv):
            try:
                n = self._wr(mv[off:])
            except (OSError, ValueError) as e:  # ValueError: mbedtls (TLS) failure
                if isinstance(e, ValueError) or not _again(e):
                    self.close()
                    raise WifiError("send failed (%s): reconnect" % (e,))
                n = None
            if n:
                off += n
                deadline = _deadline(self.cfg["send_ms"])
                continue
            if remaining_ms(deadline) <= 0:
                self.close()
                raise WifiError("send stalled for %d ms: the peer or the link is gone"
                                % self.cfg["send_ms"])
            await sleep_ms(self.cfg["poll_ms"])

    async def recv_into(self, buf, timeout_ms):
        if self.closed:
            raise WifiError("connection closed: reconnect")
        if self.pending:
            n = min(len(buf), self.pending)
            buf[:n] = self.pending_buf[:n]
            self.pending_buf = self.pending_buf[n:self.pending]
            self.pending -= n
            return n
        deadline = _deadline(timeout_ms)
        while True:
            try:
                n = self._rd(buf)
            except (OSError, ValueError) as e:
                if isinstance(e, ValueError) or not _again(e):
                    self.close()
                    raise WifiError("receive failed (%s): reconnect" % (e,))
                n = None
            if n is not None:
                if n == 0 and len(buf):
                    self.close()
                    raise WifiError("connection closed by the peer: reconnect")
                return n
            if remaining_ms(deadline) <= 0:
                return 0
            await sleep_ms(min(self.cfg["poll_ms"], max(1, remaining_ms(deadline))))

    def close(self):
        if not self.closed:
            self.closed = True
            try:
                self.s.close()
            except OSError:
                pass


async def open_tcp(host, port, cfg, tls=None, name="wifi"):
    """Non-blocking TCP (+TLS) connection; used by Wi-Fi (and anything with sockets).

    tls: None, or a dict: ca (CA file path; server verified against it), cert / key
    (client certificate files, per meter), server_hostname (default host),
    insecure=True to skip verification (tests only)."""
    try:
        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    except OSError as e:
        raise WifiError("cannot resolve %s (%s): check the broker name and DNS" % (host, e))
    s = socket.socket(ai[0], socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(ai[-1])
    except OSError as e:
        if not _again(e):
            s.close()
            raise WifiError("connect to %s:%d failed (%s): check the broker" % (host, port, e))
    p = select.poll()
    p.register(s, select.POLLOUT)
    deadline = _deadline(cfg["connect_ms"])
    while True:
        ev = p.poll(0)
        if ev:
            flags = ev[0][1]
            if flags & (select.POLLERR | select.POLLHUP):
                s.close()
                raise WifiError("connect to %s:%d refused: is the broker running on that "
                                "port?" % (host, port))
            if flags & select.POLLOUT:
                break
        if remaining_ms(deadline) <= 0:
            s.close()
            raise WifiError("connect to %s:%d timed out after %d ms: check the network "
                            "path to the broker" % (host, port, cfg["connect_ms"]))
        await sleep_ms(cfg["poll_ms"])
    p.unregister(s)
    if hasattr(s, "getsockopt") and hasattr(socket, "SO_ERROR"):  # CPython
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            s.close()
            raise WifiError("connect to %s:%d failed (errno %d)" % (host, port, err))
    if tls is None or tls is False:
        return SockConn(s, s, name, cfg)
    return await _wrap_tls(s, host, tls, cfg, name)


async def _wrap_tls(s, host, tls, cfg, name):
    import ssl
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if tls.get("insecure"):
            if hasattr(ctx, "check_hostname"):
                ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            if not tls.get("ca"):
                raise WifiError("TLS needs a CA file (tls ca) to verify the broker")
            if _MPY:
                ctx.load_verify_locations(cadata=_der(tls["ca"]))
            else:
                ctx.load_verify_locations(cafile=tls["ca"])
            ctx.verify_mode = ssl.CERT_REQUIRED
        if tls.get("cert"):
            if _MPY:
                # ssl.SSLContext.load_cert_chain reads the files as they are (PEM is
                # rejected); the underlying context takes DER bytes (cert, key).
                ctx._context.load_cert_chain(_der(tls["cert"]), _der(tls["key"]))
            else:
                ctx.load_cert_chain(tls["cert"], tls.get("key"))
        ss = ctx.wrap_socket(s, server_hostname=tls.get("server_hostname", host),
                             do_handshake_on_connect=False)
    except (OSError, ValueError) as e:
        s.close()
        if isinstance(e, WifiError):
            raise
        raise WifiError("TLS setup failed (%s): check the CA / certificate / key files" % (e,))
    conn = SockConn(ss, s, name, cfg)
    conn.pending_buf = bytearray(256)
    # Drive the handshake now so that a bad certificate shows up here, not at the first
    # MQTT packet. CPython has do_handshake(). MicroPython's mbedtls socket has none and
    # no way to ask whether the handshake finished: reads drive it (a verify failure
    # raises ValueError); once the server's flight came and the socket went quiet, the
    # certificate was checked. Anything later still surfaces from send / recv_into.
    deadline = _deadline(cfg["connect_ms"])
    p = select.poll()
    p.register(s, select.POLLIN)
    seen = False
    quiet = 0
    while True:
        try:
            if hasattr(ss, "do_handshake"):
                ss.do_handshake()
                break
            readable = bool(p.poll(0))
            n = ss.readinto(conn.pending_buf)
            if n is not None:
                if n == 0:
                    raise OSError(104)
                conn.pending = n
                conn.pending_buf = conn.pending_buf[:n]
                break
            if _DEBUG:
                print("hs", readable, n, seen, quiet)
            if readable:
                seen = True
                quiet = 0
            elif seen:
                quiet += 1
                if quiet >= 3:
                    conn.pending_buf = bytearray(0)
                    break
        except (OSError, ValueError) as e:
            if _DEBUG:
                print("hs exc", repr(e))
            if isinstance(e, ValueError) or not _again(e):
                conn.close()
                raise WifiError("TLS handshake with %s failed (%s): check the CA file and "
                                "the broker certificate / the meter certificate"
                                % (host, str(e).strip()))
        if remaining_ms(deadline) <= 0:
            conn.close()
            raise WifiError("TLS handshake with %s timed out" % host)
        await sleep_ms(cfg["poll_ms"])
    return conn


class WifiTransport:
    name = "wifi"

    def __init__(self, cfg=None, wlan=None):
        self.cfg = merge("wifi config", _DEFAULTS, cfg)
        if wlan is None:
            try:
                import network
                wlan = network.WLAN(network.STA_IF)
            except (ImportError, AttributeError):
                wlan = None     # unix port: the host's network
        self.wlan = wlan
        self.ok = False
        self.signal_dbm = None
        self.detail = "not started"

    async def up(self, deadline_ms):
        w = self.wlan
        if w is None:
            self.ok = True
            self.detail = "host network"
            return True
        deadline = _deadline(deadline_ms)
        try:
            w.active(True)
            if not w.isconnected():
                if not self.cfg["ssid"]:
                    self.ok = False
                    self.detail = "no Wi-Fi SSID configured: set wifi ssid / password"
                    return False
                w.connect(self.cfg["ssid"], self.cfg["password"])
            while not w.isconnected():
                if remaining_ms(deadline) <= 0:
                    self.ok = False
                    self.detail = "Wi-Fi %r not joined in %d ms (status %s): check SSID, " \
                        "password and distance to the access point" % (
                            self.cfg["ssid"], deadline_ms, self._status())
                    return False
                await sleep_ms(100)
        except OSError as e:
            self.ok = False
            self.detail = "Wi-Fi error %s" % (e,)
            return False
        self.ok = True
        self.detail = "joined %s" % (self.cfg["ssid"] or "")
        await self.check()
        return self.ok

    def _status(self):
        try:
            return self.wlan.status()
        except (OSError, AttributeError, TypeError):
            return None

    async def check(self):
        w = self.wlan
        if w is None:
            return
        try:
            self.ok = bool(w.isconnected())
        except OSError:
            self.ok = False
        if not self.ok:
            self.detail = "Wi-Fi link lost (status %s)" % (self._status(),)
        try:
            self.signal_dbm = int(w.status("rssi"))
        except (OSError, ValueError, TypeError, AttributeError):
            self.signal_dbm = None

    def health(self):
        return {"ok": self.ok, "signal": self.signal_dbm, "detail": self.detail}

    def time(self):
        return None   # Wi-Fi has no network time of its own (NTP is the clock's job)

    async def connect(self, host, port, tls=None):
        if not self.ok:
            raise WifiError("Wi-Fi is down (%s)" % self.detail)
        return await open_tcp(host, port, self.cfg, tls, self.name)

    async def down(self):
        self.ok = False
        self.detail = "down"
        if self.wlan is not None:
            try:
                self.wlan.disconnect()
            except (OSError, AttributeError):
                pass
