"""One meter's reads: detail, live reading, intervals (JSON and CSV), energy, events,
status history and the projected bill."""
from typing import Annotated

from fastapi import APIRouter, Depends

from headend.web.auth import Who
from headend.web.errors import API, ApiError
from headend.web.fleet import csv_response
from headend.web.hub import jsonable, meter_snapshot
from headend.web.params import (AtArg, FromArg, LimitArg, MeterId, PeriodArg, ToArg, limit,
                                parse_time, period)
from headend.web.state import WebState, get_state

router = APIRouter(prefix="/meters/{meter}", tags=["meter"],
                   responses={404: {"description": "unknown meter"}})


def known(st, mid, who=None):
    """404 with what to do for a meter the store does not know, or that `who` may not see
    (the same answer, so that a restricted account learns nothing of other meters). Call
    with st.lock held."""
    if (who is not None and not who.sees(mid)) or st.q.meter(mid) is None:
        raise ApiError(404, "unknown meter %r; GET %s/meters lists the fleet" % (mid, API))
    return mid


def visible_meter(meter: MeterId, who: Who, st: WebState = Depends(get_state)) -> str:
    """Dependency: the path's meter id, when it exists and `who` may see it."""
    with st.lock:
        return known(st, meter, who)


Mid = Annotated[str, Depends(visible_meter)]


@router.get("", summary="One meter with its newest live reading, newest interval, recent "
                        "events and status")
def meter(meter: Mid, st: WebState = Depends(get_state)):
    with st.lock:
        return jsonable(meter_snapshot(st.q, meter))


@router.get("/rt", summary="Newest live reading (per phase V, I, P, PF, f)")
def rt(meter: Mid, st: WebState = Depends(get_state)):
    with st.lock:
        return jsonable(st.q.rt(meter))


@router.get("/intervals", summary="Interval records in [from, to) with the energy since the "
                                  "previous record (import_wh, export_wh)")
def intervals(meter: Mid, from_: FromArg = None, to: ToArg = None,
              st: WebState = Depends(get_state)):
    t0, t1 = parse_time(from_, "from"), parse_time(to, "to")
    with st.lock:
        return jsonable(st.q.intervals(meter, t0, t1))


@router.get("/intervals.csv", responses={200: {"content": {"text/csv": {}}}},
            summary="Interval data for billing as CSV (UTC, cumulative registers and deltas "
                    "in Wh)")
def intervals_csv(meter: Mid, from_: FromArg = None, to: ToArg = None,
                  st: WebState = Depends(get_state)):
    t0, t1 = parse_time(from_, "from"), parse_time(to, "to")
    with st.lock:
        text = st.q.csv(meter, t0, t1)
    return csv_response(text, "%s-intervals.csv" % meter)


@router.get("/energy", summary="Energy per bucket: day = 15 min, week = 1 h, month = 1 day "
                               "buckets, ending at the newest record")
def energy(meter: Mid, period_: PeriodArg = "day", at: AtArg = None,
           st: WebState = Depends(get_state)):
    p = period(period_)
    with st.lock:
        return st.q.energy(meter, p, parse_time(at, "at"))


@router.get("/events", summary="Events, newest first")
def events(meter: Mid, limit_: LimitArg = "100", st: WebState = Depends(get_state)):
    with st.lock:
        return jsonable(st.q.events(meter, limit=limit(limit_)))


@router.get("/status", summary="Status changes (online, transport, firmware, OTA), oldest "
                               "first")
def status(meter: Mid, st: WebState = Depends(get_state)):
    with st.lock:
        return jsonable(st.q.status_log(meter))


@router.get("/bill", summary="Projected bill for the current billing period from the "
                             "time-of-use tariff")
def bill(meter: Mid, at: AtArg = None, st: WebState = Depends(get_state)):
    with st.lock:
        return st.q.bill(meter, parse_time(at, "at"))
