"""What one web app shares between requests: the store, the queries (with their caches,
one caller at a time), the live hub, the commander, and the accounts (users, audit log,
login limiter)."""
import threading

from fastapi import Request

from headend.audit import Audit
from headend.queries import Queries
from headend.users import Users
from headend.web.hub import Hub


class WebState:
    def __init__(self, store, tariff=None, commander=None, poll_s=1.0, cmd_timeout_s=10.0,
                 accounts=None, cookie_secure=False):
        from headend.accounts_db import AccountsDB
        from headend.web.auth import LoginLimiter
        self.store = store
        self.q = Queries(store, tariff)
        self.lock = threading.RLock()      # Queries keeps caches: one caller at a time
        self.hub = Hub(self, poll_s)
        self.commander = commander
        self.cmd_timeout_s = cmd_timeout_s
        self.accounts = accounts if accounts is not None else AccountsDB(store.url)
        self.users = Users(self.accounts)
        self.audit = Audit(self.accounts)
        self.limiter = LoginLimiter()
        self.cookie_secure = cookie_secure


def get_state(request: Request) -> WebState:
    return request.app.state.web
