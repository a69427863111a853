"""Fleet-wide reads: the meter list, fleet energy, the billing CSV, events, quarantine and
the tariff."""
import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from headend.users import Principal
from headend.web.auth import Who, require
from headend.web.hub import jsonable
from headend.web.models import Meter
from headend.web.params import (AtArg, FromArg, LimitArg, PeriodArg, ToArg, limit,
                                parse_time, period)
from headend.web.state import WebState, get_state

router = APIRouter(tags=["fleet"])


def csv_response(text, filename):
    return Response(text.encode(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="%s"' % filename})


@router.get("/meters", response_model=list[Meter],
            summary="The fleet: every meter with online state, transport, firmware, board, "
                    "last seen (epoch s) and active power, sorted by id")
async def meters(who: Who, st: WebState = Depends(get_state)):
    """At most --poll-s old (the snapshot the live pages get, shared by every client);
    served on the event loop while fresh, computed in a worker thread when not."""
    fresh = st.fleet_fresh()
    snap, body = fresh if fresh is not None else await asyncio.to_thread(st.fleet)
    if who.meters is None:
        return Response(body, media_type="application/json")
    return [m for m in snap["meters"] if m["id"] in who.meters]


@router.get("/fleet/energy", summary="Energy of the whole fleet per bucket, and per meter")
def fleet_energy(who: Who, period_: PeriodArg = "day", at: AtArg = None,
                 st: WebState = Depends(get_state)):
    p = period(period_)
    with st.lock:
        return st.q.fleet_energy(p, parse_time(at, "at"), who.meters)


@router.get("/intervals.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}}},
            summary="Interval data of every meter as CSV, for a billing run")
def csv_all(who: Who, from_: FromArg = None, to: ToArg = None,
            st: WebState = Depends(get_state)):
    t0, t1 = parse_time(from_, "from"), parse_time(to, "to")
    with st.lock:
        text = st.q.csv(None, t0, t1, who.meters)
    return csv_response(text, "lipari-intervals.csv")


@router.get("/events", summary="Events of every meter, newest first")
def events(who: Who, limit_: LimitArg = "100", st: WebState = Depends(get_state)):
    n = limit(limit_)
    with st.lock:
        if who.meters is None:
            return jsonable(st.q.events(None, limit=n))
        ev = [e for m in who.meters for e in st.q.events(m, limit=n)]
    ev.sort(key=lambda e: (e.get("t", 0), e.get("seq", 0)), reverse=True)
    return jsonable(ev[:n])


@router.get("/quarantine", summary="Payloads that could not be decoded, with the reason "
                                   "(payload in base64); operator or admin")
def quarantine(who: Annotated[Principal, Depends(require("operator"))],
               st: WebState = Depends(get_state)):
    with st.lock:
        return jsonable(st.q.quarantined())


@router.get("/tariff", summary="The time-of-use tariff used for bills")
def tariff(st: WebState = Depends(get_state)):
    return st.q.tariff
