# Persistence of the metering state: the checkpoint (what it holds, when it is taken,
# what happens when a save fails) and reading it back at boot. docs/metering.md
# "Persistence".
#
# The checkpoint is packed into a buffer taken at boot and saved through a Store whose
# files are opened at boot (Store.prepare): no heap is needed, so a heap exhausted by
# something else cannot stop it. A save that fails anyway (flash full, I/O error) is
# never silent: ckpt_errors counts it (counters command, status), a `ckpt_error` event
# says when saving stops (value 1) and works again (0), and it is retried after 1, 2, 4,
# ... s (at most ckpt_min_s apart) until it succeeds.
import struct

try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

# Reading the checkpoint back, the chips' configuration fingerprints and the saved
# calibration are in metering/persist_load.py: boot, chip restart and calibration only,
# imported for them and dropped after (docs/ram.md).
_CKPT_VERSION = const(1)   # persist_load.py reads this layout: change both
_HEAD = "<BBBBIIIIB"
_HEAD_LEN = const(21)
_PH_LEN = const(17)      # cpw u32, based u8, raw 6 x u16
_RETRY_MS = const(1000)  # first retry of a failed save; doubles up to ckpt_min_s


def ckpt_size(nph, nreg, nch):
    return _HEAD_LEN + nph * (_PH_LEN + 8 * nreg) + 4 * nch


class Persistence:
    """Checkpoint buffer, schedule and error handling of one meter."""

    def __init__(self, store, nph, nreg, nch, cfg, clock):
        self.store = store
        self.cfg = cfg
        self.clock = clock
        self.nph = nph
        self.nreg = nreg
        self.nch = nch
        self.buf = bytearray(ckpt_size(nph, nreg, nch))
        self.fp = [0] * nch           # chip configuration fingerprints (chips.py)
        self.ticks = 0                # last successful save
        self.saves = 0
        self.errors = 0               # failed saves, total
        self.streak = 0               # failed saves since the last good one
        self.retry_ms = 0             # wait before the next retry (0 = none pending)
        self.last_error = None
        self._unreported = -1         # ckpt_error event value not raised yet (-1 = none)
        self.e_thr = 0                # active counts >> 10 that trigger a save
        self.s_thr = 1 << 26          # 2**30 apparent counts >> 4: half the ambiguity

    def prepare(self):
        """Buffers and files for heap-free saves (after the boot-time load)."""
        if self.store is not None and hasattr(self.store, "prepare"):
            self.store.prepare(len(self.buf))

    def set_threshold(self, ckpt_wh, cpw_min):
        self.e_thr = int(ckpt_wh) * (cpw_min >> 10)

    # ------------------------------------------------------------- content
    def pack(self, m, smax):
        """The checkpoint of meter m into self.buf (no allocation)."""
        e = m.energy
        buf = self.buf
        nph, nr = self.nph, self.nreg
        struct.pack_into(_HEAD, buf, 0, _CKPT_VERSION, nph, nr, self.nch, m.intervals.seq,
                         m.events.seq, self.clock.time() & 0xFFFFFFFF, smax,
                         1 if self.clock.synced else 0)
        o = _HEAD_LEN
        for p in range(nph):
            struct.pack_into("<IB", buf, o, e.cpw[p], 1 if e.based & (1 << p) else 0)
            o += 5
            for k in range(6):
                struct.pack_into("<H", buf, o, e.raw[6 * p + k])
                o += 2
            for r in range(nr):
                s = p * nr + r
                struct.pack_into("<II", buf, o, e.wh_[s], e.rem[s])
                o += 8
        for ci in range(self.nch):
            struct.pack_into("<I", buf, o, self.fp[ci])
            o += 4
        return buf

    # ------------------------------------------------------------- schedule
    def due(self, m, now_ms):
        """Whether poll() should save now: every ckpt_s at the latest; after ckpt_min_s
        when ckpt_wh of active energy or 2**30 apparent counts are not yet on flash; a
        failed save is retried after retry_ms."""
        el = self.clock.ticks_diff(now_ms, self.ticks)
        if self.retry_ms:
            return el >= self.retry_ms
        cfg = self.cfg
        e = m.energy
        return el >= int(cfg["ckpt_s"]) * 1000 or (
            el >= int(cfg["ckpt_min_s"]) * 1000 and (
                e.ck_e >= self.e_thr or e.ck_s >= self.s_thr))

    def checkpoint(self, m):
        """Save totals + raw counters now; True if saved. Never raises."""
        now = self.clock.ticks_ms()
        if self.store is None:
            self.ticks = now
            m.energy.since_checkpoint(_max(m.phases.sreg))
            return False
        smax = m.energy.smax
        try:
            self.store.save(self.pack(m, smax))
        except Exception as e:          # StoreError, OSError, MemoryError: never silent
            self.errors += 1
            self.streak += 1
            self.last_error = e
            # back off: 1, 2, 4, ... s after the last attempt, at most ckpt_min_s
            cap = int(self.cfg["ckpt_min_s"]) * 1000
            r = _RETRY_MS << (self.streak - 1 if self.streak < 16 else 15)
            self.retry_ms = r if r < cap else cap
            self.ticks = now
            if self.streak == 1:
                self._unreported = 1
            self.report(m)
            return False
        self.ticks = now
        self.saves += 1
        self.retry_ms = 0
        m.energy.since_checkpoint(_max(m.phases.sreg))
        if self.streak:
            self.streak = 0
            self._unreported = 0
        self.report(m)
        return True

    def report(self, m):
        """Raise a pending ckpt_error event (it may fail for want of memory too: then it
        is raised at a later read)."""
        if self._unreported < 0:
            return
        v = self._unreported
        try:
            m.events.event("ckpt_error", 0, v)
            self._unreported = -1
        except MemoryError:
            pass

    def counters(self):
        return {"ckpt_saves": self.saves, "ckpt_errors": self.errors,
                "ckpt_streak": self.streak,
                "ckpt_last_error": None if self.last_error is None else repr(self.last_error)}


def _max(arr):
    m = 0
    for v in arr:
        if v > m:
            m = v
    return m
