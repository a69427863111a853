"""Read-side queries for the dashboard and the REST API, on top of headend.store.Store.

Interval records carry *cumulative* registers (`ai_wh`, `ae_wh`, ...). Energy in a time
bucket is the difference between consecutive records, attributed to the bucket that holds
the later record's `t_end`. A register that goes backwards (meter replaced, counters
reconciled, flag bit 3) contributes nothing rather than a negative spike: spikes after an
outage are what users of other systems complain about most (docs/architecture.md, field.md).

Virtual meters run faster than real time, so "now" for charts and the bill is the time of
the newest record, not the wall clock (`anchor`).

Time-of-use tariff (JSON file given with `lipari web --tariff FILE`; DEFAULT_TARIFF
otherwise):

    {"name": "...", "currency": "EUR", "billing_day": 1, "utc_offset_min": 60,
     "standing_per_day": 0.30,
     "rates": [{"name": "peak", "per_kwh": 0.34}, {"name": "off-peak", "per_kwh": 0.19}],
     "schedule": [{"days": [0,1,2,3,4], "from": "07:00", "to": "23:00", "rate": 0}],
     "default_rate": 1}

`days` are 0 = Monday .. 6 = Sunday in local time (UTC + utc_offset_min); the first
schedule entry that contains an interval's mid-point gives its rate, else `default_rate`.
"""
import calendar
import csv
import io
import json
import time

DEFAULT_TARIFF = {
    "name": "Two-rate time of use (example; configure with --tariff)",
    "currency": "EUR",
    "billing_day": 1,
    "utc_offset_min": 0,
    "standing_per_day": 0.30,
    "rates": [{"name": "peak", "per_kwh": 0.34}, {"name": "off-peak", "per_kwh": 0.19}],
    "schedule": [{"days": [0, 1, 2, 3, 4], "from": "07:00", "to": "23:00", "rate": 0}],
    "default_rate": 1,
}

PERIODS = {                      # chart span and bucket size
    "day": (86400, 900),
    "week": (7 * 86400, 3600),
    "month": (30 * 86400, 86400),
}

# CSV export for billing: one row per interval record, cumulative registers in Wh.
CSV_COLUMNS = ("meter_id", "seq", "t_end_utc", "t_end", "dur_s", "flags", "tariff", "ai_wh",
               "ae_wh", "ap_vah", "rq1_varh", "rq2_varh", "rq3_varh", "rq4_varh", "pmax_w",
               "import_wh", "export_wh")


EVENTS_KEPT = 200


class QueryError(ValueError):
    """A request the queries cannot answer (bad period, bad tariff file); says what to fix."""


def _hm(s, what):
    try:
        h, m = s.split(":")
        v = int(h) * 60 + int(m)
    except (AttributeError, ValueError):
        raise QueryError("tariff: %s %r must be HH:MM" % (what, s))
    if not 0 <= v <= 24 * 60:
        raise QueryError("tariff: %s %r is outside 00:00..24:00" % (what, s))
    return v


def check_tariff(t):
    """Validate a tariff dict (raises QueryError with what to fix); returns it with defaults."""
    if not isinstance(t, dict):
        raise QueryError("tariff must be a JSON object")
    out = dict(DEFAULT_TARIFF)
    out.update(t)
    rates = out["rates"]
    if not isinstance(rates, list) or not rates:
        raise QueryError("tariff: 'rates' must be a non-empty list of {name, per_kwh}")
    for r in rates:
        if not isinstance(r, dict) or not isinstance(r.get("per_kwh"), (int, float)):
            raise QueryError("tariff: every rate needs a numeric 'per_kwh': %r" % (r,))
    for e in out["schedule"]:
        _hm(e.get("from"), "schedule 'from'")
        _hm(e.get("to"), "schedule 'to'")
        if not 0 <= int(e.get("rate", -1)) < len(rates):
            raise QueryError("tariff: schedule rate %r is not an index into 'rates'" % e.get("rate"))
    if not 0 <= int(out["default_rate"]) < len(rates):
        raise QueryError("tariff: default_rate must index 'rates'")
    if not 1 <= int(out["billing_day"]) <= 28:
        raise QueryError("tariff: billing_day must be 1..28 so that every month has it")
    return out


def load_tariff(path):
    if not path:
        return dict(DEFAULT_TARIFF)
    try:
        with open(path) as f:
            return check_tariff(json.load(f))
    except OSError as e:
        raise QueryError("cannot read tariff file %s: %s" % (path, e))
    except ValueError as e:
        if isinstance(e, QueryError):
            raise
        raise QueryError("tariff file %s is not valid JSON: %s" % (path, e))


def rate_at(tariff, t):
    """Index of the rate in force at epoch second t."""
    lt = time.gmtime(t + 60 * int(tariff.get("utc_offset_min", 0)))
    minute = lt.tm_hour * 60 + lt.tm_min
    for e in tariff.get("schedule", ()):
        if lt.tm_wday not in e.get("days", range(7)):
            continue
        a, b = _hm(e["from"], "from"), _hm(e["to"], "to")
        if (a <= minute < b) if a <= b else (minute >= a or minute < b):
            return int(e["rate"])
    return int(tariff.get("default_rate", 0))


def billing_period(tariff, t):
    """(start, end) epoch seconds of the billing period holding t (local month boundaries)."""
    off = 60 * int(tariff.get("utc_offset_min", 0))
    day = int(tariff.get("billing_day", 1))
    lt = time.gmtime(t + off)
    y, m = lt.tm_year, lt.tm_mon
    if lt.tm_mday < day:
        y, m = (y, m - 1) if m > 1 else (y - 1, 12)
    start = calendar.timegm((y, m, day, 0, 0, 0)) - off
    y2, m2 = (y, m + 1) if m < 12 else (y + 1, 1)
    return start, calendar.timegm((y2, m2, day, 0, 0, 0)) - off


# -- records -----------------------------------------------------------------------
def rows(x):
    """Store results as plain dicts (the store may hand back dicts or sqlite3.Row)."""
    out = []
    for r in x or ():
        if isinstance(r, dict):
            out.append(r)
        else:
            try:
                out.append(dict(r))
            except (TypeError, ValueError):
                out.append({"value": r})
    return out


def with_deltas(intervals):
    """Sort by t_end, drop duplicates, add import_wh / export_wh (energy since the previous
    record; None for the first one, 0 where a register went backwards)."""
    recs = sorted(rows(intervals), key=lambda r: (r.get("t_end", 0), r.get("seq", 0)))
    out = []
    prev = None
    for r in recs:
        if prev is not None and r.get("t_end") == prev.get("t_end") and r.get("seq") == prev.get("seq"):
            continue
        r = dict(r)
        if prev is None:
            r["import_wh"] = r["export_wh"] = None
        else:
            r["import_wh"] = max(0, int(r.get("ai_wh", 0)) - int(prev.get("ai_wh", 0)))
            r["export_wh"] = max(0, int(r.get("ae_wh", 0)) - int(prev.get("ae_wh", 0)))
        out.append(r)
        prev = r
    return out


def buckets(intervals, t0, t1, bucket_s):
    """Energy per bucket in [t0, t1): list of {t, import_wh, export_wh} with every bucket
    present (zeros where there is no data), so the chart's time axis has no gaps."""
    n = max(0, (t1 - t0 + bucket_s - 1) // bucket_s)
    out = [{"t": t0 + i * bucket_s, "import_wh": 0, "export_wh": 0} for i in range(n)]
    for r in with_deltas(intervals):
        if r["import_wh"] is None:
            continue
        # a record ending exactly on a boundary belongs to the bucket before it
        i = (int(r["t_end"]) - 1 - t0) // bucket_s
        if 0 <= i < n:
            out[i]["import_wh"] += r["import_wh"]
            out[i]["export_wh"] += r["export_wh"]
    return out


def span(period, anchor):
    """(t0, t1, bucket_s) for a chart period ending with the bucket that holds anchor (a
    record's t_end on a boundary belongs to the bucket before it)."""
    if period not in PERIODS:
        raise QueryError("period must be one of %s, not %r" % (", ".join(PERIODS), period))
    length, b = PERIODS[period]
    t1 = -(-int(anchor) // b) * b
    return t1 - length, t1, b


class Queries:
    """Everything the dashboard and the API read, on one Store."""

    def __init__(self, store, tariff=None):
        self.store = store
        self.tariff = check_tariff(tariff) if tariff else dict(DEFAULT_TARIFF)
        self._last_iv = {}           # meter id -> newest interval record seen
        self._last_rt = {}           # meter id -> newest live reading seen
        self._events = {}            # meter id -> newest events, oldest first

    # fleet
    def meters(self):
        return rows(self.store.meters())

    def meter(self, meter_id):
        for m in self.meters():
            if str(m.get("id")) == str(meter_id):
                return m
        return None

    def last_interval(self, meter_id):
        """Newest interval record of a meter (cached: only newer rows are read each time)."""
        last = self._last_iv.get(meter_id)
        recs = rows(self.store.intervals(meter_id, last["t_end"] if last else None, None))
        for r in recs:
            if last is None or (r.get("t_end", 0), r.get("seq", 0)) >= (last.get("t_end", 0), last.get("seq", 0)):
                last = r
        if last is not None:
            self._last_iv[meter_id] = last
        return last

    def anchor(self, meter_id=None):
        """The newest t_end (of one meter, or of the fleet); wall clock when there is none."""
        ids = [meter_id] if meter_id is not None else [m["id"] for m in self.meters()]
        best = 0
        for mid in ids:
            r = self.last_interval(mid)
            if r:
                best = max(best, int(r.get("t_end", 0)))
        return best or int(time.time())

    def energy(self, meter_id, period="day", anchor=None):
        if anchor is None:
            anchor = self.anchor(meter_id)
        t0, t1, b = span(period, anchor)
        recs = self.store.intervals(meter_id, t0 - max(b, 86400), t1 + 1)
        return {"meter": meter_id, "period": period, "t0": t0, "t1": t1, "bucket_s": b,
                "buckets": buckets(recs, t0, t1, b)}

    def fleet_energy(self, period="day", anchor=None, meter_ids=None):
        """meter_ids: only these meters (an account limited to its own)."""
        ids = [m["id"] for m in self.meters() if meter_ids is None or m["id"] in meter_ids]
        if anchor is None:
            ends = [int(r.get("t_end", 0)) for r in map(self.last_interval, ids) if r]
            anchor = max(ends) if ends else int(time.time())
        t0, t1, b = span(period, anchor)
        total = buckets((), t0, t1, b)
        per_meter = {}
        for mid in ids:
            m = {"id": mid}
            bs = buckets(self.store.intervals(m["id"], t0 - max(b, 86400), t1 + 1), t0, t1, b)
            per_meter[m["id"]] = sum(x["import_wh"] for x in bs)
            for acc, x in zip(total, bs):
                acc["import_wh"] += x["import_wh"]
                acc["export_wh"] += x["export_wh"]
        return {"period": period, "t0": t0, "t1": t1, "bucket_s": b, "buckets": total,
                "per_meter_import_wh": per_meter}

    def intervals(self, meter_id, t0=None, t1=None):
        """Records with t0 <= t_end < t1 and their deltas; the record before t0 is read too
        so that the first one in range has its energy."""
        recs = with_deltas(self.store.intervals(meter_id, None if t0 is None else t0 - 2 * 86400,
                                                t1))
        return [r for r in recs if t0 is None or r.get("t_end", 0) >= t0]

    def csv(self, meter_id, t0, t1, meter_ids=None):
        """Interval data for billing as CSV text (UTC times, Wh); meter_id None = every
        meter (or every one of meter_ids), one after the other."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(CSV_COLUMNS)
        ids = [meter_id] if meter_id is not None else [
            m["id"] for m in self.meters() if meter_ids is None or m["id"] in meter_ids]
        for mid in ids:
            self._csv_rows(w, mid, t0, t1)
        return buf.getvalue()

    def _csv_rows(self, w, meter_id, t0, t1):
        for r in self.intervals(meter_id, t0, t1):
            rq = list(r.get("rq_varh") or []) + [""] * 4
            w.writerow([meter_id, r.get("seq"),
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(r.get("t_end", 0)))),
                        r.get("t_end"), r.get("dur_s"), r.get("flags", 0), r.get("tariff", ""),
                        r.get("ai_wh"), r.get("ae_wh"), r.get("ap_vah", "")] + rq[:4] +
                       [r.get("pmax_w", ""),
                        "" if r["import_wh"] is None else r["import_wh"],
                        "" if r["export_wh"] is None else r["export_wh"]])

    def bill(self, meter_id, anchor=None):
        """Projected bill for the billing period holding anchor (default: newest record).

        Cost so far = energy per rate x price + standing charge for the days covered;
        projection = energy cost scaled from the covered part of the period to all of it,
        plus the standing charge for the whole period."""
        tf = self.tariff
        if anchor is None:
            anchor = self.anchor(meter_id)
        p0, p1 = billing_period(tf, anchor)
        recs = with_deltas(self.store.intervals(meter_id, p0 - 86400, p1 + 1))
        nrates = len(tf["rates"])
        kwh = [0.0] * nrates
        first = None
        last = None
        prev = None
        # the meter's own time-of-use registers when it has one per rate (billing grade)
        use_regs = bool(recs) and all(isinstance(r.get("tariff_wh"), list) and
                                      len(r["tariff_wh"]) == nrates for r in recs)
        for r in recs:
            te = int(r.get("t_end", 0))
            p, prev = prev, r
            if r["import_wh"] is None or te <= p0 or te > p1 or te > anchor:
                continue
            if use_regs:
                for k in range(nrates):
                    kwh[k] += max(0, r["tariff_wh"][k] - p["tariff_wh"][k]) / 1000.0
            else:
                mid = te - int(r.get("dur_s") or 0) // 2
                kwh[rate_at(tf, mid)] += r["import_wh"] / 1000.0
            first = te - int(r.get("dur_s") or 0) if first is None else first
            last = te
        covered_s = max(0, (last or p0) - max(p0, first or p0))
        period_s = p1 - p0
        energy_cost = sum(k * r["per_kwh"] for k, r in zip(kwh, tf["rates"]))
        standing = tf["standing_per_day"]
        so_far = energy_cost + standing * covered_s / 86400.0
        projected = None
        if covered_s >= 3600:              # less than an hour of data projects nonsense
            projected = energy_cost * period_s / covered_s + standing * period_s / 86400.0
        return {
            "meter": meter_id, "tariff": tf["name"], "currency": tf["currency"],
            "booked_by": "meter registers" if use_regs else "head-end schedule",
            "period_start": p0, "period_end": p1, "covered_s": covered_s,
            "covered_fraction": round(covered_s / period_s, 4),
            "rates": [{"name": r["name"], "per_kwh": r["per_kwh"], "kwh": round(k, 3),
                       "cost": round(k * r["per_kwh"], 2)} for k, r in zip(kwh, tf["rates"])],
            "standing_per_day": standing,
            "cost_so_far": round(so_far, 2),
            "projected_total": None if projected is None else round(projected, 2),
        }

    def events(self, meter_id, limit=100):
        """Newest events of a meter (or of the fleet with meter_id None), newest first.
        A meter's newest EVENTS_KEPT are cached; later calls read only newer rows."""
        if meter_id is None or limit > EVENTS_KEPT:
            ev = rows(self.store.events(meter_id))
        else:
            old = self._events.get(meter_id)
            t0 = old[-1].get("t", 0) if old else None
            seen = {(e.get("seq"), e.get("t")) for e in old or ()}
            new = [e for e in rows(self.store.events(meter_id, t0, None))
                   if (e.get("seq"), e.get("t")) not in seen]
            ev = (old or []) + new
            ev.sort(key=lambda e: (e.get("t", 0), e.get("seq", 0)))
            self._events[meter_id] = ev = ev[-EVENTS_KEPT:]
        ev = sorted(ev, key=lambda e: (e.get("t", 0), e.get("seq", 0)), reverse=True)
        return ev[:limit]

    def rt(self, meter_id):
        """Newest real-time record of a meter (per-phase V, I, P, PF, f) or None."""
        last = self._last_rt.get(meter_id)
        for r in rows(self.store.rt(meter_id, last["t"] if last else None, None)):
            if last is None or r.get("t", 0) >= last.get("t", 0):
                last = r
        if last is not None:
            self._last_rt[meter_id] = last
        return last

    def status_log(self, meter_id):
        return rows(self.store.status_log(meter_id))

    def quarantined(self):
        return rows(self.store.quarantined())
