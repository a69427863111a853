"""`lipari web`: the dashboard, the REST API and live updates, on FastAPI served by uvicorn.

Where things are (one module per concern; a router per area, so that a new area such as
OTA adds its own router in app.py):

    app.py       create_app(): the FastAPI app, middleware, error answers, routers
    state.py     WebState: the store, queries, live hub and commander one app shares
    errors.py    ApiError and the JSON error body {"error": "...what to do...", "status": N}
    params.py    query parameters: time (epoch s or UTC date), period, limit, meter id
    models.py    request and response models (validated; they make the OpenAPI document)
    hub.py       Hub: one poller re-reads the fleet and watched meters for every stream
    pages.py     /, /meter/{id}, /static, /vendor/chart.js, /healthz
    fleet.py     /api/v1/meters, /fleet/energy, /intervals.csv, /events, /quarantine, /tariff
    meters.py    /api/v1/meters/{id}[/rt|/intervals|/intervals.csv|/energy|/events|...]
    commands.py  POST /api/v1/meters/{id}/commands and the Commander (headend.mqttcmd)
    stream.py    GET /api/v1/stream: server-sent events (sse-starlette)
    server.py    serve() (tests: uvicorn in a thread) and main() (the command line)

The OpenAPI document is generated from the routes and models at /openapi.json.
"""
from headend.web.app import create_app
from headend.web.commands import Commander
from headend.web.server import WebServer, main, serve

__all__ = ["create_app", "Commander", "WebServer", "main", "serve"]
