"""Logins, sessions, API tokens, CSRF and roles for the web server.

Who is asking (AuthGate, pure ASGI middleware in front of every route):
  * `Authorization: Bearer lip_...`: a user's API token (`lipari user token`), for scripts;
  * the `lipari_session` cookie set by POST /login (HttpOnly, SameSite=Strict, Secure when
    the request came over TLS, directly or through a proxy uvicorn trusts).
Without either, only PUBLIC paths answer (the login page, static assets, /healthz,
/openapi.json): the API says 401, a page redirects to /login.
CSRF: a state-changing request on a session must carry the session's token in the
`X-CSRF-Token` header (the pages read it from GET /api/v1/me); bearer tokens are not sent
by browsers on their own and need none. The login form has its own double-submit token.
Roles: routes declare what they need with Depends(require("operator")); commands also
need the role of headend.policy for the command itself.
Login attempts are rate-limited per client address and per user name (LoginLimiter).
"""
import html
import os
import secrets
import threading
import time
from collections import deque
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from headend.users import Principal, same
from headend.web.errors import API, ApiError, error_response
from headend.web.state import WebState, get_state

SESSION_COOKIE = "lipari_session"
LOGIN_COOKIE = "lipari_login"
PUBLIC = ("/login", "/healthz", "/openapi.json", "/vendor/chart.js", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def is_public(path):
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)


class AuthGate:
    """Resolves the principal of every request into scope["state"]["principal"] and turns
    away what needs a login, or a CSRF token it lacks."""

    def __init__(self, app, users):
        self.app = app
        self.users = users

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        who = self.principal(headers)
        scope.setdefault("state", {})["principal"] = who
        path = scope["path"]
        if who is None and not is_public(path):
            if path.startswith("/api/") or scope["method"] != "GET":
                resp = error_response(401, "log in first: POST /login with a user name and "
                                           "password (a session cookie), or send an API token "
                                           "as 'Authorization: Bearer <token>' (lipari user "
                                           "token NAME)", {"WWW-Authenticate": "Bearer"})
            else:
                q = scope.get("query_string", b"").decode("latin-1")
                target = path + ("?" + q if q else "")
                resp = RedirectResponse("/login?next=" + quote(target, safe=""), 303)
            return await resp(scope, receive, send)
        if (who is not None and who.via == "session" and scope["method"] in STATE_CHANGING
                and path != "/login" and not same(headers.get("x-csrf-token"), who.csrf)):
            resp = error_response(403, "missing or wrong X-CSRF-Token header: a request on a "
                                       "session must carry the token GET /api/v1/me gives")
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)

    def principal(self, headers):
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return self.users.token(auth[7:].strip())
        cookie = headers.get("cookie")
        if cookie:
            for part in cookie.split(";"):
                k, _, v = part.strip().partition("=")
                if k == SESSION_COOKIE:
                    return self.users.session(v)
        return None


def principal(request: Request) -> Principal:
    who = request.scope.get("state", {}).get("principal")
    if who is None:                       # AuthGate lets only public paths through
        raise ApiError(401, "log in first")
    return who


Who = Annotated[Principal, Depends(principal)]


def require(role):
    """Dependency: the principal, when it has at least `role` (else 403 saying so)."""
    def dep(who: Who) -> Principal:
        if not who.can(role):
            raise ApiError(403, "this needs the %s role; %s is %s" % (role, who.name, who.role))
        return who
    dep.role = role
    return dep


# -- login rate limit ---------------------------------------------------------------------
class LoginLimiter:
    """At most per_ip attempts a minute from one address, and per_user failed attempts in
    window_s for one user name; then 429 with Retry-After. In memory (one web process)."""

    def __init__(self, per_ip=20, per_user=5, window_s=900):
        self.per_ip = per_ip
        self.per_user = per_user
        self.window_s = window_s
        self.ip = {}
        self.fails = {}
        self.lock = threading.Lock()

    @staticmethod
    def _trim(q, horizon):
        while q and q[0] < horizon:
            q.popleft()

    def check(self, ip, user):
        """-> seconds to wait (0 = go ahead); counts the attempt."""
        now = time.monotonic()
        with self.lock:
            q = self.ip.setdefault(ip, deque())
            self._trim(q, now - 60)
            if len(q) >= self.per_ip:
                return int(q[0] + 60 - now) + 1
            q.append(now)
            f = self.fails.get(user)
            if f:
                self._trim(f, now - self.window_s)
                if len(f) >= self.per_user:
                    return int(f[0] + self.window_s - now) + 1
            if len(self.ip) > 10000:              # bounded memory under a scan
                self.ip = {k: v for k, v in self.ip.items() if v}
        return 0

    def failed(self, user):
        with self.lock:
            self.fails.setdefault(user, deque()).append(time.monotonic())
            if len(self.fails) > 10000:
                self.fails = {k: v for k, v in self.fails.items() if v}

    def succeeded(self, user):
        with self.lock:
            self.fails.pop(user, None)


# -- pages and routes -----------------------------------------------------------------------
router = APIRouter(include_in_schema=False)
me_router = APIRouter(tags=["session"])
STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")


def secure(request):
    return request.url.scheme == "https" or request.app.state.web.cookie_secure


def safe_next(n):
    return n if isinstance(n, str) and n.startswith("/") and not n.startswith("//") else "/"


def login_page(request, message="", status=200, next_="/"):
    # one token per browser while it has one: two tabs (or a page and its favicon) must not
    # invalidate each other's form
    token = request.cookies.get(LOGIN_COOKIE)
    if not token or len(token) > 64:
        token = secrets.token_urlsafe(24)
    with open(os.path.join(STATIC, "login.html"), encoding="utf-8") as f:
        text = f.read()
    text = (text.replace("{{csrf}}", token).replace("{{next}}", html.escape(safe_next(next_)))
            .replace("{{message}}", html.escape(message)))
    resp = HTMLResponse(text, status, headers={"Cache-Control": "no-store"})
    resp.set_cookie(LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict",
                    secure=secure(request), path="/login")
    return resp


@router.get("/login")
def login_form(request: Request, next: str = "/"):
    return login_page(request, next_=next)


@router.post("/login")
def login(request: Request, username: Annotated[str, Form(max_length=64)],
          password: Annotated[str, Form(max_length=256)],
          csrf: Annotated[str, Form(max_length=100)], next: Annotated[str, Form()] = "/",
          st: WebState = Depends(get_state)):
    if not same(csrf, request.cookies.get(LOGIN_COOKIE)):
        return login_page(request, "The form expired; log in again.", 400, next)
    ip = request.client.host if request.client else "?"
    wait_s = st.limiter.check(ip, username)
    if wait_s:
        resp = login_page(request, "Too many attempts; try again in %d s." % wait_s, 429, next)
        resp.headers["Retry-After"] = str(wait_s)
        return resp
    u = st.users.verify(username, password)
    if u is None:
        st.limiter.failed(username)
        return login_page(request, "Wrong user name or password.", 401, next)
    st.limiter.succeeded(username)
    sid, _ = st.users.new_session(u["name"])
    resp = RedirectResponse(safe_next(next), 303)
    resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", secure=secure(request),
                    path="/")
    resp.delete_cookie(LOGIN_COOKIE, path="/login")
    return resp


@router.post("/logout")
def logout(who: Who, st: WebState = Depends(get_state)):
    st.users.end_session(who.session)
    resp = RedirectResponse("/login", 303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@me_router.get("/me", summary="Who is logged in: name, role, the meters it may see (null = "
                              "all), and for a session the CSRF token to send as X-CSRF-Token")
def me(who: Who):
    return {"name": who.name, "role": who.role, "meters": who.meters, "via": who.via,
            "csrf": who.csrf}


__all__ = ["API", "AuthGate", "LoginLimiter", "Who", "principal", "require", "router",
           "me_router"]
