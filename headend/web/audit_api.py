"""The audit log over the API: per meter (shown on the meter page), the whole log, and its
CSV export. An account limited to its own meters sees only their entries; user
administration entries (no meter) only an admin."""
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from headend.web.auth import Who
from headend.web.meters import Mid, known
from headend.web.params import METER_ID_RX, LimitArg, limit
from headend.web.state import WebState, get_state

router = APIRouter(tags=["audit"])


@router.get("/meters/{meter}/audit", summary="Audit log of one meter, newest first: who "
                                               "sent which command, when, and the answer")
def meter_audit(meter: Mid, limit_: LimitArg = "100", st: WebState = Depends(get_state)):
    return st.audit.entries(meter_id=meter, limit=limit(limit_))


MeterFilter = Annotated[Optional[str], Query(pattern=METER_ID_RX,
                                             description="only this meter's entries")]


def _scope(st, who, meter):
    if meter is not None:
        with st.lock:
            known(st, meter, who)
        return {"meter_id": meter}
    return {"meters": who.meters, "include_global": who.can("admin")}


@router.get("/audit", summary="The audit log, newest first")
def audit(who: Who, meter: MeterFilter = None, limit_: LimitArg = "200",
          st: WebState = Depends(get_state)):
    return st.audit.entries(limit=limit(limit_), **_scope(st, who, meter))


@router.get("/audit.csv", responses={200: {"content": {"text/csv": {}}}},
            summary="The audit log as CSV, oldest first (an export for the records)")
def audit_csv(who: Who, meter: MeterFilter = None, st: WebState = Depends(get_state)):
    name = "lipari-audit%s.csv" % ("-" + meter if meter else "")
    return Response(st.audit.csv(**_scope(st, who, meter)).encode(),
                    media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="%s"' % name})

