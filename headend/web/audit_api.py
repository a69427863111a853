"""The audit log over the API: per meter (shown on the meter page), the whole log, and its
CSV export. An account limited to its own meters sees only their entries; user
administration entries (no meter) only an admin."""
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from headend.web.auth import Who
from headend.web.meters import Mid
from headend.web.params import LimitArg, limit
from headend.web.state import WebState, get_state

router = APIRouter(tags=["audit"])


@router.get("/meters/{meter}/audit", summary="Audit log of one meter, newest first: who "
                                               "sent which command, when, and the answer")
def meter_audit(meter: Mid, limit_: LimitArg = "100", st: WebState = Depends(get_state)):
    return st.audit.entries(meter_id=meter, limit=limit(limit_))


def _scope(who):
    return {"meters": who.meters, "include_global": who.can("admin")}


@router.get("/audit", summary="The audit log, newest first")
def audit(who: Who, limit_: LimitArg = "200", st: WebState = Depends(get_state)):
    return st.audit.entries(limit=limit(limit_), **_scope(who))


@router.get("/audit.csv", responses={200: {"content": {"text/csv": {}}}},
            summary="The audit log as CSV, oldest first (an export for the records)")
def audit_csv(who: Who, st: WebState = Depends(get_state)):
    return Response(st.audit.csv(**_scope(who)).encode(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="lipari-audit.csv"'})


__all__ = ["router", "Annotated"]
