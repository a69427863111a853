# Helpers for the metering tests and the benchmark. Importable under MicroPython
# (MICROPYPATH=<repo>/firmware:<repo>/boards:<repo>:<repo>/tests) and CPython.
import gc
import os

# The harness runs the meter and the simulated chips on heaps of 8 to 16 MiB. MicroPython
# collects only when the heap is full, and allocating in a large, nearly full heap is slow:
# 1,200 simulated seconds of the energy reference run took 22 s at 16 MiB, 2.7 s with a
# collection after every MiB allocated. Nothing run through the harness measures the heap
# by its fill level (allocation figures come from gc.mem_alloc around a locked or collected
# step), so collect early.
if hasattr(gc, "threshold"):
    gc.threshold(1 << 20)

try:
    import json
except ImportError:  # pragma: no cover
    import ujson as json


def _mount(dev, mkfs=False, point="/lfs"):
    if mkfs:
        os.VfsLfs2.mkfs(dev)
    vfs = os.VfsLfs2(dev)
    os.mount(vfs, point)
    return point


def _umount(point="/lfs"):
    try:
        os.umount(point)
    except Exception:
        pass


def _payload(n):
    # distinct, length-varying payloads so that a mixed-up record cannot pass
    return bytes(((n * 7 + i) & 0xFF) for i in range(40 + (n % 5) * 37))


def store_powercut(saves=20, block_size=4096, blocks=16, tear="half", prepared=True,
                   size=None):
    """Cut power at every write (every program and every erase) of a store's life from a
    freshly formatted filesystem: opening the files at boot (prepared=True, as the meter
    does; they are created then) and `saves` consecutive checkpoints of the meter's size
    (`size`, default the three-phase checkpoint), including the first save of both slots
    and the metadata compactions littlefs does on the way. After each cut: reboot, load()
    returns the newest completed save or the one in progress (None before the first),
    never garbage or an older one, and saving works again."""
    from sim.flash import FlashDev, PowerCut
    from metering.store import Store, StoreError
    from metering.persist import ckpt_size
    size = size or ckpt_size(3, 8, 2)

    def payload(n):
        return bytes(((n * 7 + i) & 0xFF) for i in range(size - (n % 3)))

    def life(st, upto):
        done = 0
        st.load()
        if prepared:
            st.prepare(size)
        for n in range(1, upto + 1):
            st.save(payload(n))
            done = n
        return done
    dev = FlashDev(block_size, blocks)
    os.VfsLfs2.mkfs(dev)
    base = bytearray(dev.data)
    # ops of a clean life
    dev.ops = 0
    p = _mount(dev)
    life(Store(p), saves)
    total_ops = dev.ops
    kinds = {"program": 0, "erase": 0}
    _umount(p)
    res = {"ops": total_ops, "cuts": 0, "bad": [], "outcomes": {}, "cut_kinds": kinds,
           "cut_ops": []}
    for k in range(1, total_ops + 2):
        dev = dev.reboot()
        dev.data[:] = base
        dev.tear = tear
        dev.cut_at = k
        p = _mount(dev)
        st = Store(p)
        done = 0
        try:
            done = life(st, saves)
        except (PowerCut, StoreError, OSError) as e:
            # MicroPython's block-device glue turns the PowerCut into EIO
            if not dev.dead:
                res["bad"].append((k, "error-without-cut", repr(e)))
            done = st.saves
            res["cuts"] += 1
            res["cut_ops"].append(k)
            kinds[dev.cut_kind] += 1
        try:
            st.close()
        except Exception:
            pass
        _umount(p)
        dev = dev.reboot()
        p = _mount(dev)
        st = Store(p)
        got = st.load()
        which = 0 if got is None else None
        for n in range(1, saves + 1):
            if got == payload(n):
                which = n
        if which is None or not (done <= which <= done + 1):
            res["bad"].append((k, done, which))
        else:
            key = "%d" % (which - done)
            res["outcomes"][key] = res["outcomes"].get(key, 0) + 1
        try:
            if prepared:
                st.prepare(size)
            st.save(payload(99))
            st.close()
            if Store(p).load() != payload(99):
                res["bad"].append((k, "resave"))
        except Exception as e:
            res["bad"].append((k, "resave-exc", repr(e)))
        _umount(p)
    return res


def store_wear(saves=200, block_size=4096, blocks=32):
    """Programs / erases per checkpoint on littlefs (for the docs' writes-per-day)."""
    from sim.flash import FlashDev
    from metering.store import Store
    dev = FlashDev(block_size, blocks)
    p = _mount(dev, mkfs=True)
    st = Store(p)
    st.load()
    p0, e0, b0 = dev.programs, dev.erases, dev.prog_bytes
    for n in range(saves):
        st.save(_payload(n) * 4)
    _umount(p)
    return {"saves": saves, "programs_per_save": (dev.programs - p0) / saves,
            "erases_per_save": (dev.erases - e0) / saves,
            "bytes_per_save": (dev.prog_bytes - b0) / saves,
            "max_block_erases": max(dev.block_erases)}


def dump(obj):
    print("RESULT " + json.dumps(obj))


# ---------------------------------------------------------------- synthetic chips
class FakeClock:
    """Deterministic clock with the firmware clock's methods (ticks wrap at 2**30)."""

    def __init__(self, epoch=1767225600, synced=True):
        self.us = 0
        self.epoch0 = epoch
        self.synced = synced
        self.hooks = []

    def ticks_ms(self):
        return (self.us // 1000) & 0x3FFFFFFF

    def ticks_us(self):
        return self.us & 0x3FFFFFFF

    def ticks_diff(self, a, b):
        d = (a - b) & 0x3FFFFFFF
        return d - 0x40000000 if d & 0x20000000 else d

    def time(self):
        return self.epoch0 + self.us // 1000000

    def set_time(self, t):
        self.epoch0 += t - self.time()
        self.synced = True

    def advance_ms(self, ms):
        self.us += ms * 1000
        for h in self.hooks:
            h(self.us)

    async def sleep_ms(self, ms):
        self.advance_ms(ms)


class FakeChip:
    RESET = 0x040000A0

    def __init__(self):
        self.rows = [0] * 70
        self.rows[0] = self.RESET
        self.configured = 0
        self.dead = False

    def read_row(self, r):
        if self.dead:
            raise OSError("no answer")
        return self.rows[r]

    def start(self):
        self.rows = [0] * 70
        self.rows[0] = self.RESET

    def configure(self, cfg, hz):
        self.rows[0] = 0x040000A1           # anything but the reset value
        self.configured += 1


class FakeGroup:
    """Snapshot bytes from a load model per phase: v (V rms), i (A rms), phi (deg).
    step(ms) integrates energy into the counters exactly like the chip (P_reg / 2048
    per DCLK sample), prepares buf; latch()/snapshot() are no-ops so that cycle() can run
    under heap_lock."""

    def __init__(self, board, clock):
        from metering import scale
        import math
        self.math = math
        self.chans = scale.channels(board)
        self.board = board
        self.clock = clock
        self.chips = [FakeChip() for _ in board.CHIPS]
        self.base = []
        n = 0
        for c in board.CHIPS:
            self.base.append(n)
            n += 4 * (38 if len(c["ch"]) == 2 else 26)
        self.buf = bytearray(n)
        self.fail = 0
        self.load = [(230.0, 5.0, 0.0) for _ in self.chans]
        self.cnt = [[0.0, 0.0, 0.0] for _ in self.chans]     # exact counts (float)
        self.exact_wh = [[0.0, 0.0, 0.0, 0.0] for _ in self.chans]  # import, export, |q|, s
        self.off = [0, 0, 0]    # counter offsets (wrap tests start near 2**31)

    def set_load(self, p, v, i, phi_deg):
        self.load[p] = (float(v), float(i), float(phi_deg))

    def _put(self, o, val):
        val &= 0xFFFFFFFF
        b = self.buf
        b[o] = val & 0xFF
        b[o + 1] = (val >> 8) & 0xFF
        b[o + 2] = (val >> 16) & 0xFF
        b[o + 3] = (val >> 24) & 0xFF

    def step(self, ms):
        from drivers.stpm3x import snap_off
        m = self.math
        dt = ms / 1000.0
        for p, (ph, ci, k, s) in enumerate(self.chans):
            v, i, phi = self.load[p]
            pw = v * i * m.cos(phi * m.pi / 180)
            q = v * i * m.sin(phi * m.pi / 180)
            sva = v * i
            rate = 7812.5 / 2048 / s.p_lsb
            c = self.cnt[p]
            c[0] += pw * rate * dt
            c[1] += q * rate * dt
            c[2] += sva * rate * dt
            e = self.exact_wh[p]
            if pw >= 0:
                e[0] += pw * dt / 3600
            else:
                e[1] -= pw * dt / 3600
            e[2] += abs(q) * dt / 3600
            e[3] += sva * dt / 3600
            b = self.base[ci]
            vf = int(v / s.v_lsb + 0.5) & 0x7FFF
            iff = int(i / s.i_lsb + 0.5) & 0x1FFFF
            self._put(b + snap_off(36 + k), vf | iff << 15)
            per = int(125000 / 50 + 0.5)
            row23 = self.buf[b + snap_off(23):b + snap_off(23) + 4]
            cur = row23[0] | row23[1] << 8 | row23[2] << 16 | row23[3] << 24
            cur = (cur & ~(0xFFF << (16 * k))) | per << (16 * k)
            self._put(b + snap_off(23), cur)
            self._put(b + snap_off(39 + 2 * k), (int(phi * 125000 / 360 / 50) & 0xFFF) << 16)
            eo = b + snap_off(42 + 12 * k)
            self._put(eo, int(m.floor(c[0])) + self.off[0])
            self._put(eo + 8, int(m.floor(c[1])) + self.off[1])
            self._put(eo + 12, int(m.floor(c[2])) + self.off[2])
            po = b + snap_off(46 + 12 * k)
            self._put(po, int(pw / s.p_lsb) & 0x1FFFFFFF)
            self._put(po + 8, int(q / s.p_lsb) & 0x1FFFFFFF)
            self._put(po + 12, int(sva / s.p_lsb) & 0x1FFFFFFF)
        self.clock.advance_ms(ms)

    def latch(self):
        pass

    def snapshot(self):
        return self.fail


class Hw:
    def __init__(self, clock, fs=None):
        self.clock = clock
        self.fs = fs


def copy(rec):
    """A record as a sink must keep it: the meter refills its interval record in place."""
    out = {}
    for k in rec:
        v = rec[k]
        out[k] = list(v) if isinstance(v, list) else v
    return out


def fake_start(m):
    """Start-up of a meter on synthetic chips: counters counted from 0 (a fresh reset)."""
    now = m.clock.ticks_ms()
    for p in range(m.nph):
        m.energy.set_raw(p, (0, 0, 0, 0, 0, 0), now, skip=False)
    m.event("boot", 0, 0)
    m.started = True


def fake_meter(board, store=None, cfg=None, clock=None):
    from metering.engine import Meter
    clock = clock or FakeClock()
    g = FakeGroup(board, clock)
    m = Meter(Hw(clock), g, board, store, cfg)
    return m, g, clock


# ---------------------------------------------------------------- scenarios (synthetic)
def _board(name):
    return __import__(name)


def _rel_errors(m, g):
    out = []
    for p in range(m.nph):
        e = g.exact_wh[p]
        fw = (m.exact_wh(0, p), m.exact_wh(1, p), sum(m.exact_wh(2 + q, p) for q in range(4)),
              m.exact_wh(6, p))
        out.append([(fw[k] - e[k]) / e[k] if e[k] > 1e-9 else fw[k] for k in range(4)])
    return out


def alloc_cycle(board="stm32_stpm34_33_ct", n=200):
    """Bytes allocated by cycle() in steady state (gc.mem_alloc) and whether it survives
    heap_lock; counters start near 2**31 and wrap during the run."""
    import gc
    import micropython
    b = _board(board)
    m, g, c = fake_meter(b, cfg={"rt_s": 0})
    fake_start(m)
    g.off = [0x7FFF0000, 0xFFFFF000, 0x7FFFFFF0]
    m.energy.based = 0      # not a fresh reset: take the first read as the baseline
    for p in range(m.nph):
        g.set_load(p, 300, 60, 25 + 60 * p)
    for _ in range(5):
        g.step(1000)
        m.cycle()
    worst = 0
    locked_ok = 0
    for k in range(n):
        g.step(1000)
        gc.collect()
        a = gc.mem_alloc()
        if k % 2:
            micropython.heap_lock()
            try:
                m.cycle()
                locked_ok += 1
            finally:
                micropython.heap_unlock()
        else:
            m.cycle()
        d = gc.mem_alloc() - a
        if d > worst:
            worst = d
    return {"worst_bytes": worst, "locked_ok": locked_ok, "n": n,
            "err": _rel_errors(m, g)}


def wrap_run(board="stm32_stpm34_33_ct", seconds=7200, read_ms=1000, v=330.0, i=80.0):
    """Heavy load for `seconds`: counters wrap many times; firmware vs exact energy."""
    b = _board(board)
    m, g, c = fake_meter(b, cfg={"rt_s": 0, "read_ms": read_ms})
    fake_start(m)
    for p in range(m.nph):
        g.set_load(p, v, i, (10, 100, 200, 300)[p % 4])
    wraps = 0
    last = None
    from drivers.stpm3x import snap_off
    for _ in range(seconds * 1000 // read_ms):
        g.step(read_ms)
        m.cycle()
        o = g.base[0] + snap_off(42)
        hi = g.buf[o + 3]
        if last is not None and (hi ^ last) & 0x80 and hi < 0x40:
            wraps += 1
        last = hi
    return {"wraps": wraps, "err": _rel_errors(m, g),
            "fw": [[m.exact_wh(r, p) for r in range(7)] for p in range(m.nph)],
            "exact": g.exact_wh}


class _MemStore:
    def __init__(self):
        self.data = None
        self.saves = 0

    def load(self):
        return self.data

    def save(self, payload):
        self.data = bytes(payload)
        self.saves += 1


def fault_run(board="stm32_stpm34_33_ct"):
    """Chip 1 stops answering for 30 s then comes back; sag and swell on phase 1."""
    b = _board(board)
    m, g, c = fake_meter(b, cfg={"rt_s": 10, "interval_s": 60})
    recs = []
    m.sinks.append(lambda k, r: recs.append((k, copy(r))))
    fake_start(m)
    for p in range(m.nph):
        g.set_load(p, 230, 10, 0)
    valid_during = None
    v_during = None
    for s in range(240):
        if s == 30:
            g.fail = 2
        if s == 60:
            g.fail = 0
        if s == 100:
            g.set_load(0, 150, 10, 0)
        if s == 105:
            g.set_load(0, 230, 10, 0)
        if s == 110:
            g.set_load(0, 270, 10, 0)
        if s == 112:
            g.set_load(0, 230, 10, 0)
        g.step(1000)
        m.cycle()
        m.poll()
        if s == 45:
            valid_during = m.valid
            v_during = list(m.v_mv)
    ivs = [r for k, r in recs if k == "interval"]
    evs = [(r["kind"], r["phase"], r["value"]) for k, r in recs if k == "event"]
    rts = [r for k, r in recs if k == "rt"]
    return {"valid_during": valid_during, "v_during": v_during,
            "iv_flags": [r["flags"] for r in ivs], "iv_invalid": [r["ph_invalid"] for r in ivs],
            "sags": [r["sags"] for r in ivs], "swells": [r["swells"] for r in ivs],
            "events": evs, "rt_valid": [r["valid"] for r in rts],
            "err": _rel_errors(m, g), "vmin": [r["v_min_mv"] for r in ivs]}


# ---------------------------------------------------------------- virtual meter (sim)
def build_virtual(board="stm32_stpm34_33_ct", profile="fullscale", seed=0, errors=False,
                  store=None, cfg=None, clock=None, sb=None, fs=None, boot_ms=800, syn=True,
                  en=True, sinks=()):
    """SimBoard + real driver + Meter on a StepClock. Returns (meter, simboard, clock).
    The board powers up when the SimBoard is built; the MCU boots for `boot_ms` (the
    chips integrate meanwhile) before boot() first touches them. Pass `sb` (and its
    clock) to boot a new Meter on the same simulated chips (an MCU reset: no boot_ms
    then unless given). syn=False: no SYN line (software latch); en=False: EN tied high."""
    from sim.vclock import StepClock
    from sim.bus import SimBoard
    from drivers.stpm3x import SpiLink
    from drivers.stpm3x_uart import UartLink
    from hw import Hardware
    from metering.engine import boot
    b = _board(board) if isinstance(board, str) else board
    if sb is None:
        clock = clock or StepClock()
        sb = SimBoard(b.CHIPS, interface=getattr(b, "INTERFACE", "spi"),
                      mains_hz=getattr(b, "MAINS_HZ", 50), profile=profile, seed=seed,
                      clock=clock, errors=errors, scs_powerup=getattr(b, "SCS_POWERUP", None))
        if boot_ms:
            clock.advance(boot_ms * 1000)
    if sb.interface == "spi":
        links = [SpiLink(sb.spi, sb.scs[i]) for i in range(len(sb.chips))]
    else:
        links = [UartLink(sb.uarts[i], sb.scs[i]) for i in range(len(sb.chips))]
    hw = Hardware(links, syn=sb.syn if syn else None, en=sb.en if en else (), clock=clock,
                  fs=fs, sim=sb)
    m = boot(hw, b, store, cfg, sinks)
    return m, sb, clock


class Variant:
    """A board module with some attributes replaced (for start-up path tests)."""

    def __init__(self, board, **over):
        b = _board(board) if isinstance(board, str) else board
        for k in ("NAME", "PHASES", "MAINS_HZ", "INTERFACE", "CHIPS", "DEFAULTS",
                  "SCS_POWERUP"):
            if hasattr(b, k):
                setattr(self, k, getattr(b, k))
        for k in over:
            setattr(self, k, over[k])


def exact_totals(sb, nph):
    """Simulator's exact energies summed over phases: dict(ai, ae, rq1..rq4, ap)."""
    tot = {}
    for ph in range(1, nph + 1):
        e = sb.exact_energy_wh(ph)
        for k in e:
            tot[k] = tot.get(k, 0.0) + e[k]
    return tot


def firmware_totals(m):
    """Firmware registers (float Wh, exact in counts) summed over phases."""
    names = ("ai", "ae", "rq1", "rq2", "rq3", "rq4", "ap")
    out = {}
    for r, n in enumerate(names):
        out[n] = sum(m.exact_wh(r, p) for p in range(m.nph))
        out[n + "_wh"] = m.wh(r)          # what records carry (floor of the exact sum)
    return out


_KINDS = ("ai", "ae", "rq1", "rq2", "rq3", "rq4", "ap")


def run_virtual(seconds, board="stm32_stpm34_33_ct", profile="fullscale", seed=0,
                read_ms=1000, errors=False, cfg=None, use_run=False):
    """Benchmark helper: run a virtual meter for `seconds` of simulated time.
    Returns {"firmware": totals, "exact": simulator totals, "per_phase": [...],
    "records": {"interval": n, "event": n, "rt": n}, "cycles": n}. Works on micropython.
    Energies count from the first read on (the start-up before it is accounted and
    tested apart: test_metering_startup.py); "startup" has what boot booked / bounded."""
    c = {"read_ms": read_ms}
    c.update(cfg or {})
    m, sb, clock = build_virtual(board, profile, seed, errors, cfg=c)
    counts = {"interval": 0, "event": 0, "rt": 0}

    def sink(kind, rec):
        counts[kind] = counts.get(kind, 0) + 1
    m.sinks.append(sink)
    clock.advance(read_ms * 1000)            # the first read: the baseline of the run
    m.cycle()
    m.poll()
    ex0 = [sb.exact_energy_wh(m.chans[p][0]) for p in range(m.nph)]
    fw0 = [[m.exact_wh(r, p) for r in range(7)] for p in range(m.nph)]
    if use_run:
        try:
            import asyncio
        except ImportError:
            import uasyncio as asyncio

        async def main():
            t = asyncio.create_task(m.run())
            await clock.sleep_ms(seconds * 1000)
            t.cancel()
        asyncio.run(main())
    else:
        n = seconds * 1000 // read_ms
        for _ in range(n):
            clock.advance(read_ms * 1000)
            m.cycle()
            m.poll()
    per = []
    ft = {}
    et = {}
    for p in range(m.nph):
        ph = m.chans[p][0]
        ex = sb.exact_energy_wh(ph)
        exd = {k: ex[k] - ex0[p][k] for k in ex}
        fwd = [m.exact_wh(r, p) - fw0[p][r] for r in range(7)]
        per.append({"phase": ph, "exact": exd, "firmware": fwd})
        for r, k in enumerate(_KINDS):
            ft[k] = ft.get(k, 0.0) + fwd[r]
            et[k] = et.get(k, 0.0) + exd[k]
    fwt = firmware_totals(m)
    for k in _KINDS:
        fwt[k] = ft[k]
    return {"firmware": fwt, "exact": et, "per_phase": per, "records": counts,
            "cycles": m.cycles, "fail_mask": m.fail_mask, "startup": m.startup}


def alloc_virtual(board="stm32_stpm34_33_ct", profile="household", n=40):
    """cycle() with the real driver and simulated chips: bytes allocated (gc.mem_alloc)
    and how many cycles ran under micropython.heap_lock()."""
    import gc
    import micropython
    m, sb, clock = build_virtual(board, profile)
    for _ in range(5):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    ok = 0
    worst = 0
    for _ in range(n):
        clock.advance(1000000)     # the simulated chips integrate here (allocating)
        gc.collect()
        a = gc.mem_alloc()
        micropython.heap_lock()
        try:
            m.cycle()
            ok += 1
        finally:
            micropython.heap_unlock()
        d = gc.mem_alloc() - a
        if d > worst:
            worst = d
        m.poll()
    return {"locked_ok": ok, "worst_bytes": worst, "valid": m.valid, "n": n,
            "v_mv": list(m.v_mv), "p_mw": list(m.p_mw)}


def _iec_points(in_a, imax_a, export=False):
    """IEC 62053-22 class 0.2S points: (i_a, phi_deg, limit_pct). With export=True each
    point also in the export direction (phi + 180): PF 1 import / export, 0.5 inductive
    in Q1 and Q2, 0.8 capacitive in Q4 and Q3: every reactive quadrant."""
    pts = []
    for phi, lo, hi, start in ((0.0, 0.4, 0.2, 0.01), (60.0, 0.5, 0.3, 0.02),
                               (-36.86989764584402, 0.5, 0.3, 0.02)):
        cur = [f * in_a for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if f >= start]
        cur.append(imax_a)
        for i in cur:
            lim = lo if i < (0.05 if phi == 0.0 else 0.1) * in_a else hi
            pts.append((i, phi, lim))
            if export:
                pts.append((i, phi + 180.0, lim))
    return pts


def iec_errors(m, sb, clock, vn, in_a, imax_a, point_s=10, export=False):
    """Energy error (%) of every phase at every IEC 62053-22 point: (i, phi, limit, errs),
    on the import register (ai) or, for a point that exports, the export one (ae)."""
    from sim.loads import Constant
    import math
    out = []
    for i, phi, lim in _iec_points(in_a, imax_a, export):
        sb.set_load(Constant(v_rms=vn, i_rms=i, phi_deg=phi, mains_hz=sb.mains_hz))
        clock.advance(m.read_ms * 1000)     # settle: one read at the new load
        m.cycle()
        exp = math.cos(math.radians(phi)) < 0
        reg, key = (1, "ae") if exp else (0, "ai")
        f0 = [m.exact_wh(reg, p) for p in range(m.nph)]
        e0 = [sb.exact_energy_wh(m.chans[p][0])[key] for p in range(m.nph)]
        for _ in range(point_s * 1000 // m.read_ms):
            clock.advance(m.read_ms * 1000)
            m.cycle()
        errs = []
        for p in range(m.nph):
            de = sb.exact_energy_wh(m.chans[p][0])[key] - e0[p]
            df = m.exact_wh(reg, p) - f0[p]
            errs.append(100.0 * (df - de) / de)
        out.append((i, phi, lim, errs))
    return out


def worst_pct_of_class(points):
    """Largest |error| at the points as a percentage of its class limit."""
    w = 0.0
    for i, phi, lim, errs in points:
        for e in errs:
            r = abs(e) / lim * 100.0
            w = r if r > w else w
    return w


def calib_iec(board="stm32_stpm34_33_ct", seed=1, gain_err=0.03, phase_err=0.9, vn=230.0,
              in_a=5.0, imax_a=60.0, cal_s=10, point_s=10, fs=None, front_end=False,
              export=False, offset_s=30):
    """Hidden sensor errors (front_end=True: a real front end: offset, noise, low-current
    non-linearity too), the calibration procedure (with front_end: offset, gain, phase,
    offset again), then the IEC points. Returns errors before and after, the codes and
    the events."""
    import asyncio
    from sim.loads import Constant
    from metering.calibrate import Calibrator
    m, sb, clock = build_virtual(board, Constant(v_rms=vn, i_rms=in_a, phi_deg=0.0))
    m.hw.fs = fs
    evs = []
    m.sinks.append(lambda k, r: evs.append(copy(r)) if k == "event" else None)
    for n, chip in enumerate(sb.chips):
        if front_end:
            chip.phys.front_end(seed * 31 + n, gain=gain_err, phase_deg=phase_err)
        else:
            chip.phys.randomise_errors(seed * 31 + n, gain=gain_err, phase_deg=phase_err)
    hidden = [(c.phys.ch[j].gain_err_v, c.phys.ch[j].gain_err_i, c.phys.ch[j].phase_err_deg,
               c.phys.ch[j].p_offset_w, c.phys.ch[j].nl_gain)
              for c in sb.chips for j in range(2)]
    before = iec_errors(m, sb, clock, vn, in_a, imax_a, point_s, export)
    cal = Calibrator(m)
    res = {}

    async def procedure():
        if front_end:
            sb.set_load(Constant(v_rms=vn, i_rms=0.0, phi_deg=0.0, mains_hz=sb.mains_hz))
            res["offset0"] = await cal.offset(offset_s)
        sb.set_load(Constant(v_rms=vn, i_rms=in_a, phi_deg=0.0, mains_hz=sb.mains_hz))
        res["gain"] = await cal.gain(vn, in_a, cal_s)
        sb.set_load(Constant(v_rms=vn, i_rms=in_a, phi_deg=60.0, mains_hz=sb.mains_hz))
        res["phase"] = await cal.phase(cal_s)
        if front_end:
            sb.set_load(Constant(v_rms=vn, i_rms=0.0, phi_deg=0.0, mains_hz=sb.mains_hz))
            res["offset"] = await cal.offset(offset_s)
        if fs:
            res["saved"] = cal.save()
    asyncio.run(procedure())
    after = iec_errors(m, sb, clock, vn, in_a, imax_a, point_s, export)
    return {"hidden": hidden, "before": before, "after": after,
            "gain": res["gain"], "phase": res["phase"], "offset": res.get("offset"),
            "saved": res.get("saved"),
            "worst_before_pct": worst_pct_of_class(before),
            "worst_after_pct": worst_pct_of_class(after),
            "cal_events": [e for e in evs if e["kind"] == "calibration"]}


def sim_reset_run(kept=True, before_s=630, down_s=5, after_s=300, profile="household",
                  board="unix_sim_3ph"):
    """Virtual meter, then an MCU reset (chips keep power: kept=True) or a power cut
    (chips lose power for down_s). A new boot() on the same simulated chips."""
    st = _MemStore()
    m, sb, clock = build_virtual(board, profile, store=st, cfg={"rt_s": 0})
    recs = []
    clock.advance(1000000)                  # energies count from this first read
    m.cycle()
    fw0 = firmware_totals(m)
    ex0 = exact_totals(sb, m.nph)
    for _ in range(before_s - 1):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    fw_before = _minus(firmware_totals(m), fw0)
    if not kept:
        sb.power(False)            # power gone: configuration and counters wiped
    clock.advance(down_s * 1000000)
    if not kept:
        sb.power(True)             # back: the chips choose their interface from SCS
    m2, sb2, clock2 = build_virtual(board, profile, store=st, cfg={"rt_s": 0}, sb=sb,
                                    clock=clock)
    restored = _minus(firmware_totals(m2), fw0)
    m2.sinks.append(lambda k, r: recs.append((k, copy(r))))
    for _ in range(after_s):
        clock.advance(1000000)
        m2.cycle()
        m2.poll()
    m2.close_interval(clock.time(), 0)
    return {"before": fw_before, "restored": restored,
            "fw": _minus(firmware_totals(m2), fw0),
            "exact": _minus(exact_totals(sb, m2.nph), ex0),
            "flags": [r["flags"] for k, r in recs if k == "interval"],
            "events": [r["kind"] for k, r in recs if k == "event"], "ckpts": st.saves,
            "boot_events": m2.events.seq, "startup": m2.startup}


def _minus(a, b):
    return {k: a[k] - b.get(k, 0) for k in a}


def sim_silent_chip(board="unix_sim_3ph", silent_s=8):
    """Chip 1 (phase 3) stops answering (every reply corrupted) for silent_s seconds."""
    m, sb, clock = build_virtual(board, "household", cfg={"rt_s": 0})
    clock.advance(1000000)
    m.cycle()
    base = [(m.exact_wh(0, p), sb.exact_energy_wh(m.chans[p][0])["ai"]) for p in range(m.nph)]
    for _ in range(10):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    sb.chips[1].crc_error_rate = 1.0
    during = None
    for s in range(silent_s):
        clock.advance(1000000)
        m.cycle()
        m.poll()
        during = (m.valid, list(m.v_mv), list(m.p_mw))
    sb.chips[1].crc_error_rate = 0.0
    for _ in range(30):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    return {"during": during, "after_valid": m.valid, "fw": firmware_totals(m),
            "exact": exact_totals(sb, m.nph),
            "per_phase": [(m.exact_wh(0, p) - base[p][0],
                           sb.exact_energy_wh(m.chans[p][0])["ai"] - base[p][1])
                          for p in range(m.nph)]}


def sim_run_async(seconds=2000, board="unix_sim_3ph", interval_s=900, start_us=0):
    """meter.run() under asyncio on a StepClock: records as a sink sees them. start_us:
    the board's time at power-up (its ticks_ms wraps at 2**30 ms, 12.4 days)."""
    import asyncio
    from sim.vclock import StepClock
    m, sb, clock = build_virtual(board, "household", cfg={"interval_s": interval_s,
                                                          "rt_s": 60},
                                 clock=StepClock(start_us=start_us))
    recs = []
    m.sinks.append(lambda k, r: recs.append((k, copy(r))))

    async def main():
        t = asyncio.create_task(m.run())
        await clock.sleep_ms(seconds * 1000)
        t.cancel()
        await asyncio.sleep(0)
    asyncio.run(main())
    return {"intervals": [r for k, r in recs if k == "interval"],
            "rt": [r for k, r in recs if k == "rt"][:2],
            "events": [r for k, r in recs if k == "event"], "cycles": m.cycles,
            "fw": firmware_totals(m), "exact": exact_totals(sb, m.nph)}


def calib_persist(fs, board="unix_sim_3ph", seed=5):
    """Calibrate, save to `fs`, cut power to the chips, boot again: the saved codes must be
    back in the chips (boot() applies them when it configures)."""
    r = calib_iec(board, seed=seed, point_s=2, cal_s=5, fs=fs)
    return {"saved": r["saved"], "gain": r["gain"], "phase": r["phase"]}


def calib_reboot(fs, board="unix_sim_3ph", seed=5):
    """Calibrate (offset, gain, phase) a real front end, save, cut the power, boot again:
    the chips get the saved codes back, offsets included."""
    import asyncio
    from sim.loads import Constant
    from metering.calibrate import Calibrator
    m, sb, clock = build_virtual(board, Constant(v_rms=230.0, i_rms=5.0, phi_deg=0.0))
    m.hw.fs = fs
    for n, chip in enumerate(sb.chips):
        chip.phys.front_end(seed * 31 + n, gain=0.03, phase_deg=0.9)
    cal = Calibrator(m)

    async def proc():
        await cal.gain(230.0, 5.0, 5)
        sb.set_load(Constant(v_rms=230.0, i_rms=5.0, phi_deg=60.0, mains_hz=sb.mains_hz))
        await cal.phase(5)
        sb.set_load(Constant(v_rms=230.0, i_rms=0.0, phi_deg=0.0, mains_hz=sb.mains_hz))
        await cal.offset(10)
        cal.save()
    asyncio.run(proc())

    def codes(chips):
        out = []
        for c in chips:
            row = []
            for k in range(c.nch):
                d = c.get_calibration(k)
                d.update(c.get_offsets(k))
                row.append(d)
            out.append(row)
        return out
    want = codes(m.group.chips)
    sb.power(False)               # power cut: chips forget everything
    clock.advance(2000000)
    sb.power(True)
    m2, sb2, clock2 = build_virtual(board, None, sb=sb, clock=clock,
                                    store=None, cfg=None, fs=fs)
    got = codes(m2.group.chips)
    chip_rows = [[sb.chips[i].regs[r] for r in (3, 4, 5, 8, 9)] for i in range(len(sb.chips))]
    return {"want": want, "got": got, "rows": chip_rows}


def api_run(fs):
    """The command-facing methods while run() is going: calibrate (both steps), preset,
    settings, readings."""
    import asyncio
    from sim.loads import Constant
    m, sb, clock = build_virtual("unix_sim_3ph", Constant(v_rms=230.0, i_rms=5.0, phi_deg=0.0),
                                 store=_MemStore(), fs=fs, cfg={"rt_s": 0})
    for n, chip in enumerate(sb.chips):
        chip.phys.randomise_errors(77 + n, gain=0.03, phase_deg=0.8)
    evs = []
    m.sinks.append(lambda k, r: evs.append(r["kind"]) if k == "event" else None)
    out = {}

    async def main():
        t = asyncio.create_task(m.run())
        await clock.sleep_ms(3000)
        out["cal_gain"] = await m.calibrate({"phase": 1, "v_mv": 230000, "i_ma": 5000,
                                             "pf_milli": 1000})
        sb.load = Constant(v_rms=230.0, i_rms=5.0, phi_deg=60.0, mains_hz=50)
        await clock.sleep_ms(2000)
        out["cal_phase"] = await m.calibrate({"phase": 1, "pf_milli": 500})
        await clock.sleep_ms(3000)     # readings of reads after the new calibration
        out["measure"] = await m.calibrate({"phase": 1, "action": "measure"})
        try:
            m.config_set("read_ms", 5000)
            out["read_ms_err"] = None
        except ValueError as e:
            out["read_ms_err"] = str(e)
        try:
            m.config_set("tariff", {"registers": 2})
            out["tariff_err"] = None
        except ValueError as e:
            out["tariff_err"] = str(e)
        m.config_set("rt_s", 5)
        out["over_before"] = evs.count("overcurrent")
        m.config_set("swell_a", 4)          # 5 A flows: an overcurrent on every phase
        m.preset_counters({"ai_wh": 123456, "ai_ph_wh": [100000, 20000, 3456]})
        out["after_preset"] = [m.wh(0), m.wh(0, 0), m.wh(0, 1), m.wh(0, 2)]
        await clock.sleep_ms(10000)
        out["after_run"] = [m.wh(0), m.wh(0, 0)]
        out["readings"] = sorted(m.readings())
        out["counters"] = sorted(m.counters())
        out["config"] = m.config_get()
        t.cancel()
        await asyncio.sleep(0)
    asyncio.run(main())
    out["events"] = evs
    out["cal1"] = m.group.chips[0].get_calibration(0)
    out["cal2"] = m.group.chips[0].get_calibration(1)
    return out


def tariff_run():
    """Clock unsynced for 20 min (energy to the 'unsynced' register), then set to a
    weekday 06:50 UTC+1: peak register from 07:00 local. Intervals of 5 min."""
    from util import days_from_civil
    b = _board("stm32_stpm34_33_ct")
    clock = FakeClock(epoch=946684800, synced=False)      # RTC never set
    tcfg = {"registers": 3, "default": 0, "unsynced": 2, "tz_s": 3600,
            "rules": [["mon-fri", 7, 22, 1]]}
    m, g, c = fake_meter(b, cfg={"rt_s": 0, "interval_s": 300, "tariff": tcfg}, clock=clock)
    recs = []
    m.sinks.append(lambda k, r: recs.append((k, copy(r))))
    fake_start(m)
    for p in range(m.nph):
        g.set_load(p, 230, 10, 0)
    for _ in range(1200):
        g.step(1000)
        m.cycle()
        m.poll()
    unsynced_wh = m.wh(7 + 2)
    clock.set_time(days_from_civil(2026, 11, 26) * 86400 + 5 * 3600 + 50 * 60)  # Thu 06:50 CET
    for _ in range(1800):
        g.step(1000)
        m.cycle()
        m.poll()
    m.close_interval(clock.time(), 0)
    ivs = [r for k, r in recs if k == "interval"]
    return {"unsynced_wh": unsynced_wh, "tariff_wh": [m.wh(7 + t) for t in range(3)],
            "ai_wh": m.wh(0), "flags": [r["flags"] for r in ivs],
            "t_end": [r["t_end"] for r in ivs], "tariff": [r["tariff"] for r in ivs],
            "events": [(r["kind"], r["value"]) for k, r in recs if k == "event"]}


def sim_glitch(mode="reset", board="unix_sim_3ph"):
    """Chip 1 (phase 3) loses its state while the MCU runs on. mode "reset": the chip
    resets but still talks SPI (counters and configuration back to reset values);
    mode "counters": only the measurement rows reset (2 SYN pulses);
    mode "power": its supply drops (EN low/high with SCS high: it comes back in UART
    mode and stays silent until the engine restarts it)."""
    m, sb, clock = build_virtual(board, "household", cfg={"rt_s": 0, "interval_s": 300})
    recs = []
    m.sinks.append(lambda k, r: recs.append((k, copy(r))))
    clock.advance(1000000)
    m.cycle()
    base = [(m.exact_wh(0, p), sb.exact_energy_wh(p + 1)["ai"]) for p in range(2)]
    for _ in range(100):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    before = m.exact_wh(0, 2)
    ex_before = sb.exact_energy_wh(3)["ai"]
    chip = sb.chips[1]
    if mode == "reset":
        chip.reset()
    elif mode == "counters":
        chip.reset_measure()     # energy rows back to 0, configuration kept
    else:
        chip.set_en(0)
        chip.set_en(1)
    for _ in range(200):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    fw = m.exact_wh(0, 2) - before
    ex = sb.exact_energy_wh(3)["ai"] - ex_before
    # the other phases are not disturbed
    others = [(m.exact_wh(0, p) - base[p][0], sb.exact_energy_wh(p + 1)["ai"] - base[p][1])
              for p in range(2)]
    return {"fw": fw, "exact": ex, "others": others, "valid": m.valid,
            "gain": m.group.chips[1].get_calibration(0),
            "dfe": sb.chips[1].regs[12], "dfe_want": m.group.chips[1].shadow_row(12),
            "events": [(r["kind"], r["phase"], r["value"]) for k, r in recs if k == "event"],
            "flags": [r["flags"] for k, r in recs if k == "interval"]}


# ---------------------------------------------------------------- start-up paths
def cold_boot(board="unix_sim_3ph", over=None, v=230.0, i=20.0, phi=25.0, seconds=60,
              syn=True, en=True, boot_ms=800, hang=None):
    """Power-up under a constant load, boot without a checkpoint, read for `seconds`.
    `over`: board attributes to replace (SCS_POWERUP, CHIPS, ...); `hang`: chip index
    whose serial port is stuck until a reset (it answers nothing after power-up).
    Returns events, interval flags, validity of the first read, and per phase the
    energy: exact since power-up, firmware, and both at the first read."""
    from sim.loads import Constant
    b = Variant(board, **(over or {}))
    recs = []
    sink = lambda k, r: recs.append((k, copy(r)))     # noqa: E731
    prof = Constant(v_rms=v, i_rms=i, phi_deg=phi)
    from sim.vclock import StepClock
    from sim.bus import SimBoard
    clock = StepClock()
    sb = SimBoard(b.CHIPS, interface=b.INTERFACE, mains_hz=b.MAINS_HZ, profile=prof,
                  clock=clock, scs_powerup=getattr(b, "SCS_POWERUP", None))
    if hang is not None:
        sb.chips[hang].hung = True
    clock.advance(boot_ms * 1000)
    m, sb, clock = build_virtual(b, prof, sb=sb, clock=clock, cfg={"rt_s": 0,
                                 "interval_s": 300}, syn=syn, en=en, sinks=(sink,))
    t_boot_us = clock.now_us()
    clock.advance(m.read_ms * 1000)
    m.cycle()
    m.poll()
    first_valid = m.valid
    at_first = [(m.exact_wh(0, p), sb.exact_energy_wh(m.chans[p][0])["ai"])
                for p in range(m.nph)]
    for _ in range(seconds - 1):
        clock.advance(m.read_ms * 1000)
        m.cycle()
        m.poll()
    m.close_interval(clock.time(), 0)
    evs = [(r["kind"], r["phase"], r["value"]) for k, r in recs if k == "event"]
    per = []
    for p in range(m.nph):
        ph = m.chans[p][0]
        ex = sb.exact_energy_wh(ph)
        per.append({"phase": ph, "exact_ai": ex["ai"], "exact_ap": ex["ap"],
                    "fw_ai": m.exact_wh(0, p), "fw_ap": m.exact_wh(6, p),
                    "first_fw": at_first[p][0], "first_exact": at_first[p][1]})
    return {"events": evs, "flags": [r["flags"] for k, r in recs if k == "interval"],
            "first_valid": first_valid, "valid": m.valid, "per_phase": per,
            "boot_s": t_boot_us / 1e6, "t_total_s": clock.now_us() / 1e6,
            "resets": [c.resets for c in sb.chips],
            "sw_resets": [c.sw_resets for c in sb.chips],
            "diag": m.counters().get("diag", {})}


# ---------------------------------------------------------------- energy-keeping paths
def _exhaust():
    """Fill the heap: returns the blocks that hold it (free them with `del`)."""
    import gc
    gc.collect()
    hold = []
    size = 4096
    while size >= 16:
        try:
            hold.append(bytearray(size))
        except MemoryError:
            size //= 2
    return hold


def persist_under_pressure(saves=5):
    """Checkpoint and interval close of a real meter on littlefs (sim/flash.py) with the
    rest of the heap exhausted, then with the heap locked. A sink that copies the
    interval record into buffers it took beforehand stands for the session."""
    import micropython
    from sim.flash import FlashDev
    from metering.store import Store
    dev = FlashDev(4096, 32)
    p = _mount(dev, mkfs=True)
    st = Store(p)
    got = {"n": 0, "ai": 0}

    def sink(kind, rec):                 # allocation-free: ints into a dict's slots
        if kind == "interval":
            got["n"] += 1
            got["ai"] = rec["ai_wh"]
    m, sb, clock = build_virtual("unix_sim_3ph", "fullscale", store=st,
                                 cfg={"rt_s": 0, "interval_s": 60}, sinks=(sink,))
    for _ in range(5):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    out = {"exhausted": [], "locked": [], "closed_exhausted": 0, "closed_locked": 0}
    for mode in ("exhausted", "locked"):
        for k in range(saves):
            clock.advance(1000000)
            m.cycle()
            m.poll()
            hold = _exhaust()
            if mode == "locked":
                micropython.heap_lock()
            try:
                ok = m.checkpoint()
                n0 = got["n"]
                m.close_interval(clock.time())
                closed = got["n"] - n0
            except MemoryError:
                ok = "MemoryError"
                closed = 0
            finally:
                if mode == "locked":
                    micropython.heap_unlock()
                del hold
            out[mode].append(ok)
            out["closed_" + mode] += closed
    out["saves"] = m.persist.saves
    out["errors"] = m.persist.errors
    out["sink_errors"] = m.events.sink_errors
    out["ai_sink"] = got["ai"]
    out["ai_meter"] = m.wh(0)
    # what is on flash is the last save: a new boot from it has the same registers
    data = Store(p).load()
    from metering.persist_load import unpack
    ck = unpack(data, m.nph, len(sb.chips))
    out["ckpt_ai"] = sum(ck["ph"][q][3][0][0] for q in range(m.nph))
    out["ckpt_iv_seq"] = ck["iv_seq"]
    out["iv_seq"] = m.intervals.seq
    _umount(p)
    return out


class _FailingStore:
    """A store whose saves fail while `broken` (flash full, I/O error)."""

    def __init__(self):
        self.broken = False
        self.data = None
        self.saves = 0
        self.attempts = 0

    def load(self):
        return self.data

    def save(self, payload):
        self.attempts += 1
        if self.broken:
            raise OSError(28, "ENOSPC")
        self.data = bytes(payload)
        self.saves += 1


def ckpt_failure_run(broken_s=200, after_s=100):
    """Saves fail for broken_s seconds (an interval closes meanwhile), then work again:
    events, counters, the retry schedule and the held interval record."""
    st = _FailingStore()
    recs = []
    sink = lambda k, r: recs.append((k, copy(r), st.broken))     # noqa: E731
    m, sb, clock = build_virtual("unix_sim_3ph", "fullscale", store=st,
                                 cfg={"rt_s": 0, "interval_s": 60, "ckpt_min_s": 30},
                                 sinks=(sink,))
    for _ in range(10):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    st.broken = True
    a0 = st.attempts
    diag_during = None
    for s in range(broken_s):
        clock.advance(1000000)
        m.cycle()
        m.poll()
        if s == broken_s - 1:
            diag_during = m.counters()["diag"]
    attempts = st.attempts - a0
    st.broken = False
    for _ in range(after_s):
        clock.advance(1000000)
        m.cycle()
        m.poll()
    evs = [(r["kind"], r["value"], b) for k, r, b in recs if k == "event"]
    ivs = [(r["seq"], r["ai_wh"], b) for k, r, b in recs if k == "interval"]
    saved_ai = None
    if st.data:
        from metering.persist_load import unpack
        ck = unpack(st.data, m.nph, len(sb.chips))
        saved_ai = [ck["ph"][q][3][0][0] for q in range(m.nph)]
    return {"events": evs, "intervals": ivs, "attempts": attempts,
            "diag_during": diag_during, "diag_after": m.counters()["diag"],
            "saved_ai": saved_ai, "ai_ph": [m.wh(0, q) for q in range(m.nph)]}


def run_reference(seconds, board="unix_sim_3ph", profile="quadrants", seed=0, read_ms=1000,
                  cfg=None):
    """energy_error_ppm's run: a virtual meter on sensor-error-free chips for `seconds`
    from its first read; the firmware's registers (last read minus first read) against
    the physical energy of the load over exactly that span, integrated from the profile
    itself (sim/loads.py energy_wh: no chip model, no conversion shared with the
    firmware). Returns per phase {register: (firmware, reference)}."""
    from sim.loads import energy_wh
    c = {"read_ms": read_ms, "rt_s": 0}
    c.update(cfg or {})
    m, sb, clock = build_virtual(board, profile, seed, False, cfg=c)
    clock.advance(read_ms * 1000)
    t_first = clock.now_us()          # the latch of a read: the instant its hook ran
    m.cycle()
    m.poll()
    fw0 = [[m.exact_wh(r, p) for r in range(7)] for p in range(m.nph)]
    t_last = t_first
    for _ in range(seconds * 1000 // read_ms):
        clock.advance(read_ms * 1000)
        t_last = clock.now_us()
        m.cycle()
        m.poll()
    per = []
    for p in range(m.nph):
        ph = m.chans[p][0]
        ref = energy_wh(sb.load, ph, t_first - sb.t0_us, t_last - sb.t0_us)
        regs = {}
        for r, k in enumerate(_KINDS):
            regs[k] = (m.exact_wh(r, p) - fw0[p][r], ref[k])
        per.append({"phase": ph, "regs": regs})
    return {"per_phase": per, "seconds": (t_last - t_first) / 1e6, "cycles": m.cycles,
            "fail_mask": m.fail_mask, "events": m.events.seq}
