# PLC concentrator bridge (CPython): the meter's PLC modem appears as a pty; tunnelled
# connections (framing in docs/transports.md, meter side firmware/comm/plc.py) become
# real TCP connections to the broker. The power line is simulated by dropping and
# corrupting frames in both directions.
#
#   python -m sim.plc --pty-link /tmp/plc [--loss 0.1] [--corrupt 0.05] [--seed 1]
# prints the pty path; stdin control lines: "loss 0.2", "corrupt 0.1", "cut", "uncut".
#
# Written independently of the firmware side (CRC via binascii.crc_hqx) so that the two
# check each other against the documented format.
import binascii
import os
import random
import select
import socket
import ssl
import struct
import threading
import time

from sim.ptyhost import PtyHost

SYNC = b"\xa5\x5a"
MAX_PAYLOAD = 200
(T_JOIN, T_JOIN_ACK, T_OPEN, T_OPEN_ACK, T_DATA, T_ACK, T_CLOSE, T_PING,
 T_PONG) = range(1, 10)


def crc16(data):
    return binascii.crc_hqx(bytes(data), 0xFFFF)   # CRC-16/CCITT-FALSE


def frame(ftype, cid, seq, payload=b""):
    body = bytes([len(payload), ftype, cid, seq]) + bytes(payload)
    return SYNC + body + struct.pack("<H", crc16(body))


class _Tunnel:
    def __init__(self, cid, sock):
        self.cid = cid
        self.s = sock
        self.down = bytearray()     # from the broker, not yet acknowledged by the meter
        self.seq = 0                # seq of the DATA frame in flight / next
        self.inflight = None        # (frame bytes, sent_at, tries)
        self.rx_seq = 0             # next DATA seq expected from the meter
        self.broker_closed = False
        self.close_tries = 0
        self.close_at = 0.0


class Concentrator(PtyHost):
    """Bridge between a meter's PLC pty and TCP. Attributes loss / corrupt (0..1) and
    cut (line dead) may be changed at any time."""

    def __init__(self, loss=0.0, corrupt=0.0, seed=None, ack_ms=150, retries=40,
                 signal_db=12, pty_link=None, host_map=None, upstream_ca=None):
        self.loss = loss
        self.corrupt = corrupt
        self.cut = False
        self.rng = random.Random(seed)
        self.ack_ms = ack_ms
        self.retries = retries
        self.signal_db = signal_db
        self.host_map = host_map or {}
        # upstream_ca: the concentrator's TCP connections to the broker are TLS, the
        # broker verified against this CA (the meter's MQTT runs inside; see
        # docs/transports.md "PLC: trust boundary")
        self.upstream = None
        if upstream_ca:
            self.upstream = ssl.create_default_context(cafile=upstream_ca)
        self._open_pty(pty_link)
        self.tunnels = {}
        self.buf = bytearray()
        self.stats = {"rx_frames": 0, "rx_bad": 0, "dropped_up": 0, "dropped_down": 0,
                      "corrupted_down": 0, "retx_down": 0, "joins": 0, "opens": 0,
                      "open_errors": 0}
        self.last_error = None
        self.joined = set()
        self._lock = threading.RLock()

    def _close_conns(self):
        for t in list(self.tunnels.values()):
            self._drop(t)

    # -- line ------------------------------------------------------------------------
    def _send(self, fr):
        if self.cut:
            return
        if self.rng.random() < self.loss:
            self.stats["dropped_down"] += 1
            return
        fr = bytearray(fr)
        if self.rng.random() < self.corrupt:
            i = self.rng.randrange(len(fr))
            fr[i] ^= 1 << self.rng.randrange(8)
            self.stats["corrupted_down"] += 1
        try:
            os.write(self.master, fr)
        except OSError:
            pass

    def _frames(self):
        b = self.buf
        while True:
            i = b.find(SYNC)
            if i < 0:
                del b[:max(0, len(b) - 1)]
                return
            del b[:i]
            if len(b) < 6:
                return
            n = b[2]
            if n > MAX_PAYLOAD:
                self.stats["rx_bad"] += 1
                del b[:2]
                continue
            if len(b) < 8 + n:
                return
            (crc,) = struct.unpack_from("<H", b, 6 + n)
            if crc != crc16(b[2:6 + n]):
                self.stats["rx_bad"] += 1
                del b[:2]
                continue
            f = (b[3], b[4], b[5], bytes(b[6:6 + n]))
            del b[:8 + n]
            if self.cut:
                continue
            if self.rng.random() < self.loss:     # lost on the way up
                self.stats["dropped_up"] += 1
                continue
            self.stats["rx_frames"] += 1
            yield f

    # -- main loop -----------------------------------------------------------------
    def _loop(self):
        while not self._stop:
            with self._lock:
                rl = [self.master] + [t.s for t in self.tunnels.values()
                                      if t.s is not None and len(t.down) < 8192]
            try:
                r, _, _ = select.select(rl, [], [], 0.01)
            except (OSError, ValueError):
                r = []
            with self._lock:
                for fd in r:
                    if fd == self.master:
                        try:
                            self.buf += os.read(self.master, 4096)
                        except OSError:
                            pass
                        for f in list(self._frames()):
                            self._handle(*f)
                    else:
                        self._tcp_readable(fd)
                self._timers()

    def _status_payload(self):
        return struct.pack("<bI", self.signal_db, int(time.time()))

    def _handle(self, ftype, cid, seq, payload):
        if ftype == T_JOIN:
            self.stats["joins"] += 1
            self.joined.add(payload.decode("latin-1"))
            self._send(frame(T_JOIN_ACK, 0, seq, self._status_payload()))
        elif ftype == T_PING:
            self._send(frame(T_PONG, 0, seq, self._status_payload()))
        elif ftype == T_OPEN:
            t = self.tunnels.get(cid)
            if t is None:
                (port,) = struct.unpack_from("<H", payload)
                host = payload[2:].decode("latin-1")
                h, p = self.host_map.get((host, port), (host, port))
                self.stats["opens"] += 1
                try:
                    s = socket.create_connection((h, p), timeout=2)
                    if self.upstream is not None:
                        s = self.upstream.wrap_socket(s, server_hostname=h)
                    s.setblocking(False)
                except (OSError, ssl.SSLError) as e:
                    self.stats["open_errors"] += 1
                    self.last_error = str(e)
                    self._send(frame(T_OPEN_ACK, cid, seq, b"\x01"))
                    return
                t = self.tunnels[cid] = _Tunnel(cid, s)
            self._send(frame(T_OPEN_ACK, cid, seq, b"\x00"))  # again if the ACK was lost
        elif ftype == T_DATA:
            t = self.tunnels.get(cid)
            if t is None or t.s is None:
                self._send(frame(T_CLOSE, cid, 0))
                return
            if seq == t.rx_seq:
                try:
                    t.s.sendall(payload)
                except OSError:
                    self._send(frame(T_CLOSE, cid, 0))
                    return
                t.rx_seq = (seq + 1) & 0xFF
            self._send(frame(T_ACK, cid, seq))
        elif ftype == T_ACK:
            t = self.tunnels.get(cid)
            if t is not None and t.inflight is not None and seq == t.seq:
                n = len(t.inflight[0]) - 8     # sync 2 + header 4 + crc 2
                del t.down[:n]
                t.inflight = None
                t.seq = (t.seq + 1) & 0xFF
            elif t is not None and t.broker_closed and not t.down:
                self._drop(t)             # ACK of our CLOSE
        elif ftype == T_CLOSE:
            self._send(frame(T_ACK, cid, seq))
            t = self.tunnels.get(cid)
            if t is not None:
                self._drop(t)

    def _tcp_readable(self, so):
        for t in list(self.tunnels.values()):
            if t.s is so:
                while True:
                    try:
                        d = so.recv(4096)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        return               # a partial TLS record: more to come
                    except OSError:
                        d = b""
                    if not d:
                        t.broker_closed = True
                        so.close()
                        t.s = None
                        return
                    t.down += d
                    # TLS may hold decrypted bytes select() does not see
                    if not isinstance(so, ssl.SSLSocket) or not so.pending():
                        return

    def _timers(self):
        now = time.monotonic()
        for t in list(self.tunnels.values()):
            if t.inflight is None and t.down:
                fr = frame(T_DATA, t.cid, t.seq, t.down[:MAX_PAYLOAD])
                t.inflight = [fr, now, 1]
                self._send(fr)
            elif t.inflight is not None and now - t.inflight[1] >= self.ack_ms / 1000:
                if t.inflight[2] >= self.retries:
                    self._drop(t)         # meter gone
                    continue
                t.inflight[1] = now
                t.inflight[2] += 1
                self.stats["retx_down"] += 1
                self._send(t.inflight[0])
            elif t.broker_closed and not t.down and t.inflight is None:
                # broker hung up and everything was delivered: CLOSE until acknowledged
                if t.close_tries >= 10:
                    self._drop(t)
                elif now - t.close_at >= self.ack_ms / 1000:
                    t.close_tries += 1
                    t.close_at = now
                    self._send(frame(T_CLOSE, t.cid, 0))

    def _drop(self, t):
        if t.s is not None:
            try:
                t.s.close()
            except OSError:
                pass
            t.s = None
        self.tunnels.pop(t.cid, None)

    def set(self, name, *args):
        with self._lock:
            if name == "loss":
                self.loss = float(args[0])
            elif name == "corrupt":
                self.corrupt = float(args[0])
            elif name == "cut":
                self.cut = True
            elif name == "uncut":
                self.cut = False
            else:
                raise ValueError("unknown PLC fault %r (loss, corrupt, cut, uncut)" % name)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m sim.plc",
                                 description="PLC concentrator bridge on a pty")
    ap.add_argument("--pty-link", help="symlink to create pointing at the pty")
    ap.add_argument("--loss", type=float, default=0.0, help="frame loss probability")
    ap.add_argument("--corrupt", type=float, default=0.0, help="frame corruption probability")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--upstream-ca", default=None,
                    help="TLS to the broker, verified against this CA file")
    o = ap.parse_args(argv)
    c = Concentrator(o.loss, o.corrupt, o.seed, pty_link=o.pty_link,
                     upstream_ca=o.upstream_ca).start()
    c.serve_stdin(c.set)


if __name__ == "__main__":
    main()
