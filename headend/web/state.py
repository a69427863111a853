"""What one web app shares between requests: the store, the queries (with their caches,
one caller at a time), the live hub, the commander, and the accounts (users, audit log,
login limiter)."""
import threading
import time

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
        self.poll_s = poll_s
        self._fleet = None                 # (monotonic time, snapshot, meters as JSON bytes)
        self._fleet_lock = threading.Lock()

    def fleet_fresh(self):
        """The cached (snapshot, JSON bytes) while younger than the poll period, else None;
        never blocks (for the event loop)."""
        f = self._fleet
        if f is not None and time.monotonic() - f[0] < self.poll_s:
            return f[1], f[2]
        return None

    def fleet(self, max_age_s=None):
        """The fleet snapshot and its meter list as JSON bytes, computed at most once per
        max_age_s (default: the live poll period) for every client and the live hub: with
        a thousand meters one snapshot is about a thousand reads, and fifty dashboards
        must not multiply that."""
        from headend.web.models import METERS_JSON
        max_age_s = self.poll_s if max_age_s is None else max_age_s
        with self._fleet_lock:
            f = self._fleet
            if f is not None and time.monotonic() - f[0] < max_age_s:
                return f[1], f[2]
            t = time.monotonic()
            with self.lock:
                from headend.web.hub import fleet_snapshot
                snap = fleet_snapshot(self.q)
            body = METERS_JSON.dump_json(METERS_JSON.validate_python(snap["meters"]))
            self._fleet = (t, snap, body)
            return self._fleet[1], self._fleet[2]


def get_state(request: Request) -> WebState:
    return request.app.state.web
