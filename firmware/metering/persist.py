# Persistence of the metering state: checkpoint pack / unpack, boot-time restore and
# reconciliation of the chips' raw counters after an MCU reset, and boot() (chip bring-up
# without losing energy). Mixed into engine.Meter; see docs/metering.md "Persistence".
import struct

try:
    from micropython import const
except ImportError:  # CPython, host tests
    def const(x):
        return x

FLAG_UNSYNCED = const(1)
FLAG_PARTIAL = const(2)
FLAG_INVALID = const(4)
FLAG_RECONCILED = const(8)
FLAG_LOST = const(16)

from drivers.stpm3x_map import DFE_CR2, DSP_CR3, CR3_NOT_COMPARED

_CFG_ROWS = DFE_CR2 + 1  # rows DSP_CR1..DFE_CR2: configuration, fingerprinted at checkpoints
_CKPT_VERSION = 1


class Persist:
    def _pack(self, smax=0):
        nph, nr, nch = self.nph, self.nreg, len(self.board.CHIPS)
        out = bytearray(struct.pack("<BBBBIIIIB", _CKPT_VERSION, nph, nr, nch, self.iv_seq,
                                    self.ev_seq, self.clock.time() & 0xFFFFFFFF, smax,
                                    1 if self.clock.synced else 0))
        for p in range(nph):
            out.extend(struct.pack("<IB", self._cpw[p], 1 if self._based & (1 << p) else 0))
            for k in range(6):
                out.extend(struct.pack("<H", self._raw[6 * p + k]))
            for r in range(nr):
                out.extend(struct.pack("<II", self._wh[p * nr + r], self._rem[p * nr + r]))
        for ci in range(nch):
            out.extend(struct.pack("<I", self._fp[ci]))
        return bytes(out)

    def _unpack(self, data):
        """-> dict or None. Tolerates a changed cpw (rescales rem) and tariff count."""
        try:
            ver, nph, nr, nch, ivs, evs, t, smax, syn = struct.unpack_from("<BBBBIIIIB",
                                                                           data, 0)
            if ver != _CKPT_VERSION or nph != self.nph or nch != len(self.board.CHIPS):
                return None
            o = 21
            ph = []
            for p in range(nph):
                cpw, based = struct.unpack_from("<IB", data, o)
                o += 5
                raw = struct.unpack_from("<6H", data, o)
                o += 12
                regs = []
                for r in range(nr):
                    regs.append(struct.unpack_from("<II", data, o))
                    o += 8
                ph.append((cpw, based, raw, regs))
            fps = struct.unpack_from("<%dI" % nch, data, o)
        except (ValueError, TypeError, struct.error if hasattr(struct, "error") else ValueError):
            return None
        return {"iv_seq": ivs, "ev_seq": evs, "t": t, "ph": ph, "fp": fps, "nreg": nr,
                "smax": smax, "synced": syn}

    def checkpoint(self):
        """Save totals + raw counters; returns True if saved. Never raises."""
        self._ck_ticks = self.clock.ticks_ms()
        self._ck_e = 0
        self._ck_s = 0
        smax = self._smax
        self._smax = 0
        for p in range(self.nph):
            if self._sreg[p] > self._smax:
                self._smax = self._sreg[p]
        if self.store is None:
            return False
        try:
            self.store.save(self._pack(smax))
            return True
        except Exception:
            self.ckpt_errors += 1
            return False

    def _fingerprint(self, chip):
        return fingerprint(chip)

    def start(self, configure=None, assume_kept=None):
        """Boot: restore totals, find out per chip whether it kept its state across the MCU
        reset (its configuration fingerprint still matches the checkpoint) and reconcile its
        counters; configure the chips that lost it. `configure(ci)` (default: chip.start()
        + chip.configure(board cfg with saved calibration)) runs only for those.
        boot() decided already (and re-configured the kept chips, which changes no
        value): it passes assume_kept so the fingerprints are read after configure."""
        st = None
        if self.store is not None:
            data = self.store.load()
            st = self._unpack(data) if data else None
        chips = getattr(self.group, "chips", ())
        kept = 0
        cold = 0
        if st:
            self.iv_seq, self.ev_seq = st["iv_seq"], st["ev_seq"]
            nr = min(st["nreg"], self.nreg)
            for p, (cpw, based, raw, regs) in enumerate(st["ph"]):
                for r in range(nr):
                    wh, rem = regs[r]
                    if cpw != self._cpw[p]:          # board scale changed: keep the value
                        rem = rem * self._cpw[p] // cpw
                    self._wh[p * self.nreg + r] = wh
                    self._rem[p * self.nreg + r] = rem
        for ci in range(len(chips)):
            chip = chips[ci]
            fp = None
            try:
                fp = self._fingerprint(chip)
            except Exception:
                fp = None
            if assume_kept is not None:
                same = assume_kept and st is not None
            else:
                same = st and fp is not None and fp == st["fp"][ci]
            if same:
                kept += 1
                self._fp[ci] = fp or 0
                for p in range(self.nph):
                    if self._chip[p] == ci and st["ph"][p][1]:
                        raw = st["ph"][p][2]
                        for k in range(6):
                            self._raw[6 * p + k] = raw[k]
                        self._based |= 1 << p
                        self._skip |= 1 << p
                        self._t_ok[p] = self.clock.ticks_ms()
                self.lost |= FLAG_RECONCILED
                # exact only if < 2**31 counts passed since the checkpoint; with a clock
                # that kept time, bound it by the largest recent apparent power
                if not (st["synced"] and self.clock.synced) or (
                        st["smax"] * 2 * (self.clock.time() - st["t"]) * 3.815
                        >= 2147483648.0):
                    if not st["synced"] or not self.clock.synced:
                        self.uncertain = True
                    else:
                        self.lost |= FLAG_LOST
                continue
            cold += 1
            try:
                if configure is not None:
                    configure(ci)
                else:
                    self._configure(ci)
                self._fp[ci] = self._fingerprint(chip)
                # a global reset zeroes the energy rows: count from 0, not from the
                # first read, so the energy between reset and first read is not lost
                for p in range(self.nph):
                    if self._chip[p] == ci:
                        for k in range(6):
                            self._raw[6 * p + k] = 0
                        self._based |= 1 << p
                        self._t_ok[p] = self.clock.ticks_ms()
            except Exception as e:
                self.fail_mask |= 1 << ci
                self._fp[ci] = 0
                self._start_error = e
            if st:
                self.lost |= FLAG_LOST
        self.started = True
        self._synced = bool(self.clock.synced)
        self.event("boot", 0, kept)
        if st and cold:
            t = self.clock.time()
            self.event("power_restore", 0, (t - st["t"]) if self.clock.synced else 0)
        self._ck_ticks = self.clock.ticks_ms()
        return {"restored": st is not None, "kept": kept, "cold": cold}

    def _chip_health(self):
        """After a cycle: repair chips whose counters restarted (supply glitch: the
        configuration is back to reset values) and restart chips silent for restart_s."""
        clock = self.clock
        now = clock.ticks_ms()
        chips = getattr(self.group, "chips", ())
        for ci in range(len(chips)):
            bit = 1 << ci
            if self.reset_mask & bit:
                self.reset_mask &= ~bit
                try:
                    chips[ci].verify_config(True)     # rewrite rows that differ
                except Exception:
                    pass
                self._phase_event(ci, "chip_error", 2)
                self.checkpoint()
            if not self.fail_mask & bit:
                self._fail_on &= ~bit
                continue
            if not self._fail_on & bit:
                self._fail_on |= bit
                self._fail_t[ci] = now
                continue
            if clock.ticks_diff(now, self._fail_t[ci]) < int(self.cfg["restart_s"]) * 1000:
                continue
            self._fail_t[ci] = now                     # next attempt in restart_s
            try:
                c = chips[ci]
                if hasattr(c, "restore"):       # start() + the shadow (incl. calibration)
                    c.restore()
                else:
                    c.start()
                    c.configure(_saved_cal(self.board.CHIPS[ci], ci, self.hw),
                                getattr(self.board, "MAINS_HZ", 50))
                self._fp[ci] = fingerprint(c)
            except Exception:
                continue
            for p in range(self.nph):                  # counters restarted at 0
                if self._chip[p] == ci:
                    for k in range(6):
                        self._raw[6 * p + k] = 0
                    self._based |= 1 << p
                    self._t_ok[p] = clock.ticks_ms()
            self.lost |= FLAG_LOST
            self._phase_event(ci, "chip_error", 3)
            self.checkpoint()

    def _phase_event(self, ci, kind, value):
        for p in range(self.nph):
            if self._chip[p] == ci:
                self.event(kind, p + 1, value)

    def _configure(self, ci):
        chip = self.group.chips[ci]
        cfg = self.board.CHIPS[ci]
        chip.start()
        chip.configure(_saved_cal(cfg, ci, self.hw), getattr(self.board, "MAINS_HZ", 50))


def _en_for(hw, i, n):
    en = getattr(hw, "en", None) or ()
    if len(en) == n:
        return en[i]
    return en[0] if (en and i == 0) else None   # one shared EN: only the first chip


def saved_fingerprints(store):
    """Chip fingerprints in the newest checkpoint (or None): for boot()."""
    if store is None:
        return None
    data = store.load()
    if not data or len(data) < 21:
        return None
    try:
        ver, nph, nr, nch = struct.unpack_from("<BBBB", data, 0)
        if ver != _CKPT_VERSION:
            return None
        o = 21 + nph * (5 + 12 + 8 * nr)
        return struct.unpack_from("<%dI" % nch, data, o)
    except (ValueError, IndexError):
        return None


def fingerprint(chip):
    """CRC32 of configuration rows 0..13 as read from the chip (self-clearing latch /
    reset bits of DSP_CR3 masked). Equal to the checkpoint's: the chip kept its state."""
    from metering.store import crc32
    buf = bytearray(4 * _CFG_ROWS)
    for r in range(_CFG_ROWS):
        v = chip.read_row(r) & 0xFFFFFFFF
        if r == DSP_CR3:
            v &= ~CR3_NOT_COMPARED
        struct.pack_into("<I", buf, 4 * r, v)
    return crc32(buf) or 1


def boot(hw, board, store=None, cfg=None, sinks=()):
    """Bring up the chips without losing energy, build the ChipGroup and the Meter.

    If the newest checkpoint's configuration fingerprints still match every chip, the
    chips kept their state across an MCU reset: they are NOT reset (a reset zeroes the
    energy rows), only re-configured (same values: the counters keep running) and the
    meter reconciles their counters against the checkpoint. Otherwise every chip is
    started (one shared global reset) and configured with any saved calibration."""
    from drivers.stpm3x import Stpm3x, ChipGroup
    n = len(board.CHIPS)
    chips = []
    for i in range(n):
        chips.append(Stpm3x(hw.links[i], board.CHIPS[i].get("part", "STPM34"),
                            syn=hw.syn, en=_en_for(hw, i, n), clock=hw.clock))
    fps = saved_fingerprints(store)
    kept = fps is not None and len(fps) == n
    if kept:
        for i in range(n):
            try:
                if fingerprint(chips[i]) != fps[i]:
                    kept = False
            except Exception:
                kept = False
            if not kept:
                break
    hz = getattr(board, "MAINS_HZ", 50)
    failed = 0
    for i in range(n):
        try:
            if not kept:
                chips[i].start()
            chips[i].configure(_saved_cal(board.CHIPS[i], i, hw), hz)
        except Exception as e:   # a dead chip must not stop the other phases
            failed |= 1 << i
            print("metering: chip %d: %s" % (i, e))
    group = ChipGroup(chips, syn=hw.syn, clock=hw.clock)
    from metering.engine import Meter
    m = Meter(hw, group, board, store, cfg)
    for s in sinks:
        m.sinks.append(s)
    m.start(configure=_noop, assume_kept=kept)
    m.fail_mask |= failed
    return m


def _noop(ci):
    pass


def _saved_cal(chip_cfg, ci, hw):
    return apply_saved(chip_cfg, ci, hw)


def load_cal(fs):
    """Saved calibration {chip: [per channel {chv, chc, phc, phv}]} (calibrate.py)."""
    from metering.store import Store
    try:
        import json
    except ImportError:  # pragma: no cover
        import ujson as json
    try:
        data = Store(fs, "cal").load()
        return json.loads(data) if data else {}
    except (ValueError, OSError):
        return {}


def apply_saved(chip_cfg, ci, hw):
    """chip_cfg with the saved calibration of chip `ci` merged into its channels."""
    fs = getattr(hw, "fs", None)
    if not fs:
        return chip_cfg
    saved = load_cal(fs).get(str(ci))
    if not saved:
        return chip_cfg
    out = dict(chip_cfg)
    chs = []
    for k, ch in enumerate(chip_cfg.get("ch", ())):
        c = dict(ch)
        if k < len(saved) and saved[k]:
            for key in ("chv", "chc", "phc", "phv"):
                if key in saved[k]:
                    c[key] = saved[k][key]
        chs.append(c)
    out["ch"] = tuple(chs)
    return out
