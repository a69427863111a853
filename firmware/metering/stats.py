# Statistics of the running interval: per-phase voltage min / max / mean, the phases
# that were invalid at some read, maximum demand (highest mean total import power over
# demand_s blocks), sag and swell counts. Updated every read without allocating; the
# interval record copies them out (records.py).
from array import array


class IntervalStats:
    def __init__(self, nph, clock):
        self.nph = nph
        self.clock = clock
        z = [0] * nph
        self.vmin = array("i", z)
        self.vmax = array("i", z)
        self.vsum_hi = array("i", z)    # sum = hi * 2**20 + lo: no int reaches 2**30
        self.vsum_lo = array("i", z)
        self.vn = array("i", z)
        self.sags = array("i", z)
        self.swells = array("i", z)
        self.invalid = 0                # phases invalid at some read of the interval
        self.pmax_w = 0
        self._dem_sum_w = 0
        self._dem_n = 0
        self._dem_t0 = 0

    def clear(self, now_ms):
        for p in range(self.nph):
            self.vmin[p] = 0
            self.vmax[p] = 0
            self.vsum_hi[p] = 0
            self.vsum_lo[p] = 0
            self.vn[p] = 0
            self.sags[p] = 0
            self.swells[p] = 0
        self.invalid = 0
        self.pmax_w = 0
        self._dem_sum_w = 0
        self._dem_n = 0
        self._dem_t0 = now_ms

    def add_voltage(self, p, v):
        if self.vn[p] == 0 or v < self.vmin[p]:
            self.vmin[p] = v
        if v > self.vmax[p]:
            self.vmax[p] = v
        lo = self.vsum_lo[p] + v
        if lo >= 0x100000:
            self.vsum_hi[p] += lo >> 20
            lo &= 0xFFFFF
        self.vsum_lo[p] = lo
        self.vn[p] += 1

    def add_demand(self, p_mw_total):
        if p_mw_total > 0:
            self._dem_sum_w += p_mw_total // 1000
        self._dem_n += 1

    def demand_tick(self, now_ms, demand_ms):
        """Close a demand block every demand_ms: its mean import raises pmax_w."""
        if self.clock.ticks_diff(now_ms, self._dem_t0) >= demand_ms:
            self._close_block()
            self._dem_t0 = now_ms

    def _close_block(self):
        if self._dem_n:
            d = self._dem_sum_w // self._dem_n
            if d > self.pmax_w:
                self.pmax_w = d
        self._dem_sum_w = 0
        self._dem_n = 0

    def close(self):
        """At the interval's end: the demand block in progress counts too."""
        self._close_block()

    def vavg(self, p):
        n = self.vn[p]
        return ((self.vsum_hi[p] << 20) + self.vsum_lo[p]) // n if n else 0

    def invalid_mask(self):
        """Phases invalid during the interval, including those never read."""
        inv = self.invalid
        for p in range(self.nph):
            if self.vn[p] == 0:
                inv |= 1 << p
        return inv
