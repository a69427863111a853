"""OTA in the web API: a meter's update state (what the dashboard's "Firmware and OTA"
card shows), the rollouts, and starting one (admin only, written to the audit log).
The work is headend/ota_store.py (state) and headend/ota_server.py (push)."""
import os
import threading
from typing import List, Optional

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from headend import ROOT, ota, ota_store
from headend.web.auth import Who
from headend.web.errors import ApiError
from headend.web.hub import jsonable
from headend.web.meters import Mid
from headend.web.state import WebState, get_state

router = APIRouter(tags=["ota"])


def releases_dir():
    return os.environ.get("LIPARI_OTA_RELEASES", os.path.join(ROOT, "var", "ota", "releases"))


def pub_path():
    return os.environ.get("LIPARI_OTA_PUB", os.path.join(ROOT, "var", "ota", "ota.pub"))


def card(store, mid):
    """The card's content: the meter's last OTA report (running version, state, progress,
    target, reason) and its open or last rollout target."""
    s = ota_store.meter_state(store, mid)
    return {"state": s["state"], "target": s["target"], "log": s["log"][:5]}


@router.get("/meters/{meter}/ota", summary="The meter's OTA state: running version, slot, "
                                           "download progress, trial, confirmed or rolled "
                                           "back with the reason, and its history")
def meter_ota(meter: Mid, st: WebState = Depends(get_state)):
    return jsonable(ota_store.meter_state(st.store, meter))


@router.get("/ota/rollouts", summary="The latest rollouts with their meters and outcomes")
def rollouts(who: Who, st: WebState = Depends(get_state)):
    out = ota_store.rollouts(st.store)
    for r in out:
        r["targets"] = [t for t in r["targets"] if who.sees(t["meter_id"])]
    return jsonable(out)


class PushRequest(BaseModel):
    release: str = Field(..., description="version under the releases directory",
                         pattern=r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$")
    meters: List[str] = Field(..., min_length=1, max_length=100000)
    stages: List[float] = Field([100.0], min_length=1, max_length=20)
    max_fail: float = Field(0.0, ge=0, le=1)
    stage_timeout_s: float = Field(3600, gt=0, le=7 * 86400)


@router.post("/ota/rollouts", status_code=202,
             summary="Push a signed release to meters in stages (admin; audited)",
             responses={400: {"description": "release missing or not fit"},
                        403: {"description": "needs the admin role"},
                        503: {"description": "no broker configured"}})
def push(body: PushRequest, who: Who, st: WebState = Depends(get_state)):
    args = body.model_dump()
    if not who.can("admin"):
        why = "an OTA push needs the admin role; %s is %s" % (who.name, who.role)
        st.audit.denied(who, None, "ota_push", args, why, action="ota")
        raise ApiError(403, why)
    c = st.commander
    if not getattr(c, "broker", None):
        raise ApiError(503, "OTA needs the broker: start the web server with --broker")
    d = os.path.join(releases_dir(), body.release)
    try:
        probs = ota.check_release(d, ota.load_pub(pub_path()))
    except ota.OtaError as e:
        raise ApiError(400, str(e))
    if probs:
        raise ApiError(400, "release %s is not fit to push: %s" % (body.release, "; ".join(probs)))
    from headend.ota_server import OtaServer, push as run_push
    host, _, port = c.broker.rpartition(":")
    srv = OtaServer(st.store, host or "127.0.0.1", int(port), c.user, c.password)
    try:
        srv.start()
    except ota.OtaError as e:
        raise ApiError(503, str(e))
    ref = st.audit.sent(who, None, "ota_push", args, action="ota")
    rid = ota_store.new_rollout(st.store, body.release, d, body.stages, body.max_fail, who.name)

    def work():
        outcome = "failed"
        try:
            run_push(st.store, srv, d, body.meters, body.stages, body.max_fail,
                     body.stage_timeout_s, rid=rid, log=lambda *a: None)
            r = ota_store.rollout(st.store, rid)
            outcome = "ok" if r["state"] == "done" else "refused"
            answer = {"rollout": rid, "state": r["state"], "reason": r["reason"]}
        except Exception as e:
            answer = {"rollout": rid, "error": repr(e)}
        finally:
            srv.stop()
        st.audit.outcome(ref, who, None, "ota_push", args, outcome, answer, action="ota")
    threading.Thread(target=work, daemon=True, name="ota-push-%d" % rid).start()
    return {"rollout": rid, "state": "running"}
