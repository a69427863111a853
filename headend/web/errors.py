"""Every error is JSON {"error": "<what is wrong and what to do>", "status": N}; never a
bare 500 for bad input (validation errors are 400 and name the field)."""
import traceback

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from headend.queries import QueryError

API = "/api/v1"


class ApiError(Exception):
    def __init__(self, status, message, headers=None):
        Exception.__init__(self, message)
        self.status = status
        self.headers = headers


def error_response(status, message, headers=None):
    return JSONResponse({"error": message, "status": status}, status_code=status,
                        headers=headers)


def _field(loc):
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def validation_message(exc):
    """One readable sentence per problem: 'timeout_s: Input should be less than or equal
    to 120'. A body that is not JSON at all says so."""
    msgs = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            return "request body is not valid JSON"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        msgs.append("%s: %s" % (_field(e.get("loc", ())), msg))
    return "; ".join(msgs) or "invalid request"


def install(app):
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, str(exc), exc.headers)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError):
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(400, validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        path = request.url.path
        if exc.status_code == 404:
            return error_response(404, "no such page or API path: %s (the API is described "
                                       "at /openapi.json)" % path)
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "GET")
            return error_response(405, "use %s for %s" % (" or ".join(
                m.strip() for m in allow.split(",")), path), {"Allow": allow})
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        traceback.print_exc()
        return error_response(500, "internal error: %s: %s (see the head-end log)"
                              % (type(exc).__name__, exc))
