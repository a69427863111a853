"""GET /api/v1/stream: server-sent events `fleet` (always) and `meter` (with ?meter=ID)
whenever they change, through sse-starlette (keep-alive comments every 15 s)."""
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, Query, Request
from sse_starlette import EventSourceResponse

from headend.web.auth import Who
from headend.web.hub import dumps, summarise
from headend.web.meters import known
from headend.web.params import METER_ID_RX
from headend.web.state import WebState, get_state

router = APIRouter(tags=["live"])


@router.get("/stream", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}}},
            summary="Server-sent events: `fleet` (always) and `meter` (with ?meter=ID) "
                    "whenever they change")
async def stream(request: Request, who: Who,
                 meter: Annotated[Optional[str], Query(pattern=METER_ID_RX,
                                                       description="also stream this meter")]
                 = None,
                 st: WebState = Depends(get_state)):
    if meter is not None:
        with st.lock:
            known(st, meter, who)
    keys = ["fleet"] + (["meter:" + meter] if meter else [])
    hub = st.hub

    async def events():
        hub.add(meter)
        sent = {}
        seen = -1
        try:
            yield {"retry": 2000, "comment": "lipari"}
            while not hub.stopping:
                seen = hub.version
                for k in keys:
                    v = hub.snap.get(k)
                    if v and sent.get(k) != v[0]:
                        sent[k] = v[0]
                        text = v[2]
                        if k == "fleet" and who.meters is not None:     # only its meters
                            text = dumps(summarise([m for m in v[1]["meters"]
                                                    if m["id"] in who.meters]))
                        yield {"data": text, "event": k.split(":")[0], "id": str(v[0])}
                if await request.is_disconnected():
                    break
                await hub.wait(seen, 5)
        finally:
            hub.remove(meter)

    return EventSourceResponse(events(), ping=15, sep="\n", headers={"Cache-Control": "no-cache",
                                                           "X-Accel-Buffering": "no"})
