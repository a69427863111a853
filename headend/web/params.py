"""Query and path parameters shared by the routers, checked with a clear 400."""
import calendar
import time
from typing import Annotated, Optional

from fastapi import Path, Query

from headend.queries import PERIODS
from headend.web.errors import ApiError

METER_ID_RX = r"^[A-Za-z0-9_.:-]{1,64}$"
MeterId = Annotated[str, Path(pattern=METER_ID_RX, description="meter id")]
_T = "epoch s or UTC date / date-time (2026-01-31, 2026-01-31T12:00:00Z)"
FromArg = Annotated[Optional[str], Query(alias="from", description="start, " + _T)]
ToArg = Annotated[Optional[str], Query(alias="to", description="end (exclusive), " + _T)]
AtArg = Annotated[Optional[str], Query(alias="at", description="anchor instead of the newest "
                                                               "record, " + _T)]
PeriodArg = Annotated[str, Query(alias="period", description="chart span: " +
                                 ", ".join(PERIODS) + " (15 min / 1 h / 1 day buckets)")]
LimitArg = Annotated[str, Query(alias="limit", description="how many, 1..10000")]


def parse_time(s, name):
    """Epoch seconds, or an ISO date / date-time in UTC (2026-01-31, 2026-01-31T12:00Z)."""
    if s is None or s == "":
        return None
    try:
        v = float(s)
        if v != v or abs(v) > 1e11:          # NaN, or beyond year 5000
            raise ValueError
        return int(v)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M",
                "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(s, fmt))
        except (ValueError, OverflowError):
            continue
    raise ApiError(400, "%s=%r: give epoch seconds or a UTC date like 2026-01-31 or "
                        "2026-01-31T12:00:00Z" % (name, s))


def period(p):
    if p not in PERIODS:
        raise ApiError(400, "period must be one of %s" % ", ".join(PERIODS))
    return p


def limit(s, name="limit"):
    try:
        return max(1, min(10000, int(s)))
    except (TypeError, ValueError):
        raise ApiError(400, "%s must be an integer" % name)
