"""create_app(): the FastAPI application of the head-end.

    app = create_app(store, tariff=None, commander=Commander("127.0.0.1:1883", store))

Routers, one per area, are mounted here: pages (/, /meter/{id}, /vendor/chart.js), login
(/login, /logout), health (/healthz), and under /api/v1 me, fleet, meters, commands,
audit, users and the live stream. A new area adds its router to ROUTERS (or calls
app.include_router(router, prefix=API)) and declares the role each route needs with
Depends(auth.require("operator")); AuthGate already keeps out whoever is not logged in.
"""
import contextlib
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from headend.web import audit_api, auth, commands, fleet, meters, ota, pages, stream, users_api
from headend.web.errors import API, error_response, install
from headend.web.state import WebState

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
MAX_BODY = 65536                 # commands are < 1 KiB on the wire; users, tokens smaller
DESCRIPTION = ("Fleet, interval data (billing), events, live readings, projected bill and "
               "commands for Lipari meters. Energies in Wh, power in W; per-phase live values "
               "keep the meter's integer units (v_mv, i_ma, p_mw, pf_milli, f_mhz). Errors are "
               "JSON {\"error\": \"...what to do...\", \"status\": N}.")

# (router, prefix) in the order they are matched
ROUTERS = [(pages.router, ""), (auth.router, ""), (pages.health, ""), (auth.me_router, API),
           (fleet.router, API), (meters.router, API), (ota.router, API), (commands.router, API),
           (audit_api.router, API), (users_api.router, API), (stream.router, API)]


class Guard:
    """Keeps other web sites out (pure ASGI middleware, so streams are not buffered):
    on a loopback server only loopback host names (DNS rebinding); state-changing API
    requests only as JSON (a cross-site form cannot send application/json without a CORS
    preflight, which this server never grants) and never from another origin. HEAD is
    answered as GET without the body."""

    def __init__(self, app, loopback):
        self.app = app
        self.loopback = loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}
        host_hdr = headers.get("host", "")
        host = host_hdr.rsplit(":", 1)[0].strip("[]").lower() if not host_hdr.startswith(
            "[") else host_hdr[1:].split("]")[0].lower()
        method = scope["method"]
        refuse = None
        if self.loopback and host not in LOOPBACK_NAMES:
            refuse = error_response(403, "this server answers only as http://127.0.0.1/ "
                                         "(host %r refused); start it with --host to serve "
                                         "other names" % host)
        elif method in STATE_CHANGING:
            origin = headers.get("origin")
            length = headers.get("content-length", "0")
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if origin and origin != "null" and urlsplit(origin).netloc != host_hdr:
                refuse = error_response(403, "cross-site request from %s refused" % origin)
            elif not length.isdigit() or int(length) > MAX_BODY:
                refuse = error_response(413, "request body too large (at most %d bytes)"
                                        % MAX_BODY)
            elif scope["path"].startswith(API + "/") and ctype != "application/json":
                refuse = error_response(415, "send the request body as Content-Type: "
                                             "application/json")
        if refuse is not None:
            return await refuse(scope, receive, send)
        if method != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                message = dict(message, body=b"")
            await send(message)
        return await self.app(dict(scope, method="GET"), receive, send_headers_only)


def create_app(store, tariff=None, commander=None, poll_s=1.0, cmd_timeout_s=10.0,
               host="127.0.0.1", accounts=None, cookie_secure=False):
    """accounts: an AccountsDB (default: one on the store's database URL);
    cookie_secure: mark the session cookie Secure even when uvicorn sees plain HTTP (a
    TLS proxy that does not say so)."""
    st = WebState(store, tariff, commander or commands.NoBroker(), poll_s, cmd_timeout_s,
                  accounts, cookie_secure)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        st.hub.start()
        try:
            yield
        finally:
            await st.hub.stop()

    app = FastAPI(title="Lipari head-end API", version="1", description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.web = st
    install(app)
    for router, prefix in ROUTERS:
        app.include_router(router, prefix=prefix)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    document_security(app)
    app.add_middleware(auth.AuthGate, users=st.users)
    app.add_middleware(Guard, loopback=host in ("127.0.0.1", "localhost", "::1"))
    return app


def document_security(app):
    """The generated document says how to authenticate: an API token as a bearer header, or
    the session cookie of POST /login (with X-CSRF-Token on state changes)."""
    generate = app.openapi

    def openapi():
        if app.openapi_schema is None:
            doc = generate()
            doc.setdefault("components", {})["securitySchemes"] = {
                "token": {"type": "http", "scheme": "bearer",
                          "description": "an API token: lipari user token NAME"},
                "session": {"type": "apiKey", "in": "cookie", "name": auth.SESSION_COOKIE,
                            "description": "POST /login; state changes also need the "
                                           "X-CSRF-Token header from GET /api/v1/me"}}
            doc["security"] = [{"token": []}, {"session": []}]
            for path in auth.PUBLIC:
                for op in doc["paths"].get(path, {}).values():
                    op["security"] = []
            app.openapi_schema = doc
        return app.openapi_schema
    app.openapi = openapi


def route_table(app):
    """Every route as (path, methods, endpoint), walked through included routers (what the
    tests iterate so that no new route escapes a check)."""
    from fastapi.routing import iter_route_contexts
    out = []
    for rc in iter_route_contexts(app.routes):
        if rc.methods:
            out.append((rc.path, frozenset(rc.methods), rc.endpoint))
    return out
