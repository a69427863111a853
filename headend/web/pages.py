"""The dashboard's pages and files, and the liveness check."""
import os

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from headend import ROOT
from headend.web.errors import ApiError
from headend.web.models import Health
from headend.web.params import MeterId
from headend.web.state import WebState, get_state

STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
CHART_JS = os.path.join(ROOT, "node_modules", "chart.js", "dist", "chart.umd.min.js")
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


def page(name):
    return FileResponse(os.path.join(STATIC, name), media_type="text/html; charset=utf-8",
                        headers=NO_CACHE)


@router.get("/")
def fleet_page():
    return page("fleet.html")


@router.get("/meter/{meter}")
def meter_page(meter: MeterId):
    return page("meter.html")


@router.get("/favicon.ico")
def favicon():
    return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})


@router.get("/vendor/chart.js")
def chart_js():
    if not os.path.exists(CHART_JS):
        raise ApiError(404, "chart.js is not installed: run `npm ci` in %s (make setup does "
                            "this)" % ROOT)
    return FileResponse(CHART_JS, media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "max-age=3600"})


health = APIRouter(tags=["health"])


@health.get("/healthz", response_model=Health, summary="Liveness: 200 when the database "
                                                       "answers")
def healthz(st: WebState = Depends(get_state)):
    with st.lock:
        n = len(st.q.meters())
    return {"ok": True, "meters": n, "hub_errors": st.hub.errors}
