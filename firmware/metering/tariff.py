# Time-of-use tariff: (local weekday, hour) -> register index, from config.
#
# cfg = {"registers": 2,            # number of registers (tariff_wh has this many entries)
#        "default": 0,              # register for every hour no rule covers
#        "unsynced": 0,             # register while the wall clock is NOT synced (rule below)
#        "tz_s": 3600,              # standard-time offset from UTC in seconds
#        "dst": "eu",               # None or "eu" (last Sunday Mar..Oct, 01:00 UTC)
#        "holidays": ["01-01", "12-25"],   # MM-DD, follow the "hol" rules (default: Sunday)
#        "rules": [["mon-fri", 7, 22, 1]]} # [days, from_h, to_h, register]; to_h exclusive;
#                                          # from_h > to_h: [from_h, 24) and [0, to_h) of
#                                          # the listed days; from_h == to_h: whole day;
#                                          # later rules win
# days: "mon".."sun", ranges "mon-fri", lists "sat,sun", "all", "hol".
#
# Unsynced clock rule: until the clock is synced (NTP, modem, command) the local hour is
# unknown, so energy is booked to cfg["unsynced"] (default: the default register) and the
# interval carries flag bit 0; the head-end can re-book those intervals once it knows the
# time. Booking by a guessed hour would silently put energy in the wrong register.
from util import civil_from_days as civil, days_from_civil, weekday  # noqa: F401

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun", "hol")


# A tariff that cannot be parsed: a ValueError, no class of its own (a class costs ~100
# bytes of heap on the meter for as long as it runs; docs/ram.md, 2026-11-30).
TariffError = ValueError


def _last_sunday(y, m):
    nd = days_from_civil(y + (m == 12), m % 12 + 1, 1) - 1  # last day of month
    return nd - (weekday(nd) - 6) % 7


def eu_dst(epoch_s):
    """True if EU summer time is in force at UTC epoch_s."""
    y = civil(epoch_s // 86400)[0]
    start = _last_sunday(y, 3) * 86400 + 3600
    end = _last_sunday(y, 10) * 86400 + 3600
    return start <= epoch_s < end


def _parse_days(spec):
    out = []
    for part in str(spec).lower().replace(" ", "").split(","):
        if part == "all":
            out.extend(range(7))
        elif "-" in part:
            a, b = part.split("-", 1)
            if a not in _DAYS[:7] or b not in _DAYS[:7]:
                raise TariffError("tariff days %r: use mon..sun, ranges like mon-fri" % spec)
            i, j = _DAYS.index(a), _DAYS.index(b)
            while True:
                out.append(i)
                if i == j:
                    break
                i = (i + 1) % 7
        elif part in _DAYS:
            out.append(_DAYS.index(part))
        else:
            raise TariffError("tariff days %r: use mon..sun, ranges like mon-fri, lists like"
                              " sat,sun, all or hol" % spec)
    return out


class Tariff:
    def __init__(self, cfg=None):
        cfg = cfg or {}
        self.n = int(cfg.get("registers", 1))
        self.default = int(cfg.get("default", 0))
        self.unsynced = int(cfg.get("unsynced", self.default))
        self.tz_s = int(cfg.get("tz_s", 0))
        self.dst = cfg.get("dst")
        self._dst_win = [0, 0, 0]     # [from, to, in summer time] of the last lookup
        if self.dst not in (None, "eu"):
            raise TariffError("tariff dst %r: use None or 'eu'" % (self.dst,))
        if not 1 <= self.n <= 16:
            raise TariffError("tariff registers must be 1..16")
        for r in (self.default, self.unsynced):
            if not 0 <= r < self.n:
                raise TariffError("tariff register %d out of 0..%d" % (r, self.n - 1))
        self.holidays = []
        for h in cfg.get("holidays", ()):
            try:
                m, d = str(h).split("-")
                self.holidays.append((int(m), int(d)))
            except ValueError:
                raise TariffError("holiday %r: use MM-DD" % (h,))
        t = bytearray(8 * 24)
        for i in range(8 * 24):
            t[i] = self.default
        rules = list(cfg.get("rules", ()))
        for pass_hol in (False, True):
            if pass_hol:
                t[7 * 24:8 * 24] = t[6 * 24:7 * 24]   # holidays follow Sunday ...
            for r in rules:
                if isinstance(r, dict):
                    r = (r.get("days"), r.get("from"), r.get("to"), r.get("reg"))
                try:
                    days, h0, h1, reg = r
                    h0, h1, reg = int(h0), int(h1), int(reg)
                except (TypeError, ValueError):
                    raise TariffError("tariff rule %r: use [days, from_h, to_h, register]"
                                      % (r,))
                if not (0 <= h0 <= 23 and 0 <= h1 <= 24 and 0 <= reg < self.n):
                    raise TariffError("tariff rule %r: hours 0..24, register 0..%d"
                                      % (r, self.n - 1))
                dl = _parse_days(days)
                if (7 in dl) != pass_hol:       # ... unless a rule names "hol"
                    continue
                if h0 < h1:
                    hours = list(range(h0, h1))
                elif h0 > h1:
                    hours = list(range(h0, 24)) + list(range(0, h1))
                else:                           # from == to: the whole day
                    hours = list(range(24))
                for day in dl:
                    for h in hours:
                        t[day * 24 + h] = reg
        self.table = bytes(t)

    def local(self, epoch_s):
        """(days since epoch, hour) in local time."""
        s = epoch_s + self.tz_s
        if self.dst == "eu" and eu_dst(epoch_s):
            s += 3600
        return s // 86400, (s % 86400) // 3600

    def _dst(self, epoch_s):
        """eu_dst() with the year's switch instants cached: no allocation per call."""
        w = self._dst_win
        if w[0] <= epoch_s < w[1]:
            return w[2] == 1
        y = civil(epoch_s // 86400)[0]
        start = _last_sunday(y, 3) * 86400 + 3600
        end = _last_sunday(y, 10) * 86400 + 3600
        if epoch_s < start:
            w[0], w[1], w[2] = days_from_civil(y, 1, 1) * 86400, start, 0
        elif epoch_s < end:
            w[0], w[1], w[2] = start, end, 1
        else:
            w[0], w[1], w[2] = end, days_from_civil(y + 1, 1, 1) * 86400, 0
        return w[2] == 1

    def index(self, epoch_s, synced=True):
        """Register for the instant epoch_s; the unsynced register if the clock is not."""
        if not synced:
            return self.unsynced
        # local() inlined: its tuple would be the only allocation of a steady-state poll
        s = epoch_s + self.tz_s
        if self.dst == "eu" and self._dst(epoch_s):
            s += 3600
        days = s // 86400
        hour = (s % 86400) // 3600
        row = weekday(days)
        if self.holidays:
            y, m, d = civil(days)
            if (m, d) in self.holidays:
                row = 7
        return self.table[row * 24 + hour]
