# The firmware side of the fuzz suite (tests/fuzz_harness.py): runs on the micropython
# binary and serves batches of cases generated on the host by hypothesis.
#
#   micropython tests/fuzz_mp.py <target> [unguarded]   target: commands | mqtt | driver
#
# stdin: one JSON line per batch, a list of cases; stdout: one JSON line per batch, a
# list of results (same order). Every case runs the real firmware code; anything the code
# raises that it should not is reported as {"exc": "<type>: <text>"} for the host to
# count as a failure (the process itself only dies on a bug in this file).
import sys
import json
import binascii

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio

TARGET = sys.argv[1]
# "unguarded" (driver target): the driver's checks beyond the CRC switched off, as the
# driver was before them, to show the harness' undetected count can rise
UNGUARDED = "unguarded" in sys.argv[2:]


def _exc(e):
    return "%s: %s" % (type(e).__name__, e)


# ---- commands: comm/commands.py with a FakeMeter ---------------------------------------
def commands_setup():
    from comm.commands import Commands
    from comm_fakemeter import FakeMeter
    m = FakeMeter()
    c = Commands(m, key=bytes(range(32)), state_path=None)
    return m, c


async def commands_batch(state, cases):
    m, c = commands_setup()     # a fresh meter per batch: a batch replays the same way
    out = []
    for case in cases:
        p = None if case is None else binascii.unhexlify(case)
        n0 = len(m.log)
        t0 = m.t
        try:
            rid, rep = await c.handle(p)
            r = {"rep": rep.decode(), "log": [list(x) for x in m.log[n0:]],
                 "time": m.t != t0, "after": c.after is not None}
        except Exception as e:               # handle() must never raise
            r = {"exc": _exc(e)}
        out.append(r)
    return out


# ---- mqtt: the client's packet parser (comm/mqtt.py) ---------------------------------
class FakeConn:
    name = "fuzz"

    def __init__(self, data, chunk):
        self.data = data
        self.i = 0
        self.chunk = chunk
        self.sent = bytearray()

    async def send(self, b):
        self.sent.extend(b)

    async def recv_into(self, buf, t):
        if self.i >= len(self.data):
            return 0
        n = min(self.chunk, len(buf), len(self.data) - self.i)
        buf[0:n] = self.data[self.i:self.i + n]
        self.i += n
        return n

    def close(self):
        pass


async def mqtt_batch(state, cases):
    from comm.mqtt import MQTTClient, MqttError
    out = []
    for case in cases:
        data = binascii.unhexlify(case["data"])
        got = []
        c = MQTTClient({"client_id": "m1", "host": "x", "max_packet": case["max"]}, None,
                       on_message=lambda t, p, d: got.append(
                           [t, None if p is None else "%d:%08x" % (
                               len(p), binascii.crc32(p) & 0xFFFFFFFF), d]))
        conn = FakeConn(data, case["chunk"])
        c._conn = conn
        err = None
        exc = None
        try:
            idle = 0
            for _ in range(len(data) + 8):       # bounded: at least one byte per poll
                before = conn.i
                await c._poll()
                if conn.i == before:
                    idle += 1
                    if idle >= 2:
                        break
        except MqttError as e:
            err = str(e)
        except Exception as e:
            exc = _exc(e)
        acks = []
        s = conn.sent
        k = 0
        while k + 3 < len(s):                    # PUBACKs (the client sends only those)
            if s[k] == 0x40 and s[k + 1] == 2:
                acks.append(s[k + 2] << 8 | s[k + 3])
                k += 4
            else:
                k += 1
        r = {"got": got, "acks": acks, "err": err, "over": c.stats["oversized"]}
        if exc:
            r["exc"] = exc
        out.append(r)
    return out


# ---- driver: drivers/stpm3x.py against simulated chips, replies mutated ---------------
CH = {"r1": 810000, "r2": 470, "sensor": "ct", "ks": 0.0024, "gain": 16}
CHIPS = ({"part": "STPM34", "ch": (dict(CH, phase=1), dict(CH, phase=2))},)


class Mutator:
    """Applies the case's mutations to the reply of frame k (counted per case) and says
    whether a mutated reply still carries a valid CRC (then no driver could notice)."""

    def __init__(self, uart):
        self.uart = uart
        self.k = 0
        self.muts = {}
        self.undetectable = False

    def start(self, muts):
        self.k = 0
        self.muts = {}
        self.undetectable = False
        for m in muts:
            self.muts.setdefault(m[0], []).append(m)

    def apply(self, buf, n):
        """Mutate buf[:n] for this frame; returns the number of bytes delivered."""
        from drivers.stpm3x import crc8
        ms = self.muts.get(self.k)
        self.k += 1
        if not ms:
            return n
        for _, kind, pos, val in ms:
            if n == 0:
                break                              # nothing left of this reply
            if kind == "flip":
                buf[pos % n] ^= 1 << (val & 7)
            elif kind == "byte":
                buf[pos % n] = val & 0xFF
            elif kind == "ff":
                for i in range(n):
                    buf[i] = 0xFF
            elif kind == "zero":
                for i in range(n):
                    buf[i] = 0
            elif kind == "short":
                n = pos % n                        # the rest never arrives
        if n == 5 and crc8(buf, self.uart) == buf[4]:
            # still a valid frame after mutation: the CRC cannot tell
            if any(k != "short" for _, k, _, _ in ms):
                self.undetectable = True
        return n


class FuzzSPI:
    def __init__(self, spi, mut):
        self.spi = spi
        self.mut = mut

    def write_readinto(self, wbuf, rbuf):
        self.spi.write_readinto(wbuf, rbuf)
        self.mut.apply(rbuf, len(rbuf))

    def __getattr__(self, k):
        return getattr(self.spi, k)


class FuzzUART:
    # mutates whole replies: the driver reads a reply after writing its frame
    def __init__(self, uart, mut):
        self.u = uart
        self.mut = mut
        self._pend = bytearray()

    def write(self, buf):
        r = self.u.write(buf)
        b = bytearray(8)
        n = self.u.readinto(b) or 0
        rep = bytearray(b[:n])
        if n:
            n = self.mut.apply(rep, n)
        self._pend = rep[:n]
        return r

    def any(self):
        return len(self._pend)

    def readinto(self, buf, nbytes=-1):
        n = min(len(buf), len(self._pend))
        if not n:
            return None
        buf[:n] = self._pend[:n]
        self._pend = self._pend[n:]
        return n

    def __getattr__(self, k):
        return getattr(self.u, k)


def driver_setup():
    from sim.bus import SimBoard
    from sim.vclock import StepClock
    from drivers.stpm3x import Stpm3x, SpiLink
    from drivers.stpm3x_uart import UartLink
    if UNGUARDED:
        Stpm3x._known_ok = lambda self, us1: True
        Stpm3x._zero_doubtful = lambda self, row, v: False
    boards = {}
    for iface in ("spi", "uart"):
        clk = StepClock()
        b = SimBoard(CHIPS, interface=iface, clock=clk)
        mut = Mutator(iface == "uart")
        if iface == "spi":
            link = SpiLink(FuzzSPI(b.spi, mut), b.scs[0])
        else:
            link = UartLink(FuzzUART(b.uarts[0], mut), scs=b.scs[0])
            link.sleep_us = lambda us: None        # the simulated UART answers at once
        chip = Stpm3x(link, "STPM34", syn=b.syn, en=b.en[0], clock=clk)
        chip.start()
        chip.configure(CHIPS[0], 50)
        clk.advance(1000000)
        b.latch()
        boards[iface] = (b, chip, mut)
    return boards


async def driver_batch(boards, cases):
    from drivers.stpm3x import Stpm3xError
    out = []
    for case in cases:
        b, chip, mut = boards[case["iface"]]
        sim = b.chips[0]
        mut.start(case["muts"])
        r = {}
        try:
            if case["op"] == "read":
                r["v"] = chip.read_row(case["row"])
            else:
                chip.write_row(case["row"], case["value"])
                r["v"] = case["value"]
        except Stpm3xError as e:
            r["err"] = str(e)
        except Exception as e:
            r["exc"] = _exc(e)
        r["undet"] = mut.undetectable
        mut.start(())                              # no mutation outside the case
        r["want"] = sim.regs[case["row"]]
        out.append(r)
    return out


SETUP = {"commands": lambda: None, "mqtt": lambda: None, "driver": driver_setup}
BATCH = {"commands": commands_batch, "mqtt": mqtt_batch, "driver": driver_batch}


def main():
    state = SETUP[TARGET]()
    print(json.dumps({"ready": TARGET}))
    k = 0
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        cases = json.loads(line)
        res = asyncio.run(BATCH[TARGET](state, cases))
        k += 1
        # tagged: a stray line printed by the code under test cannot pass for results
        print(json.dumps({"batch": k, "res": res}))


main()
