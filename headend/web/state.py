"""What one web app shares between requests: the store, the queries (with their caches,
one caller at a time), the live hub and the commander."""
import threading

from fastapi import Request

from headend.queries import Queries
from headend.web.hub import Hub


class WebState:
    def __init__(self, store, tariff=None, commander=None, poll_s=1.0, cmd_timeout_s=10.0):
        self.store = store
        self.q = Queries(store, tariff)
        self.lock = threading.RLock()      # Queries keeps caches: one caller at a time
        self.hub = Hub(self, poll_s)
        self.commander = commander
        self.cmd_timeout_s = cmd_timeout_s


def get_state(request: Request) -> WebState:
    return request.app.state.web
