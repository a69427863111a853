"""Serving the app with uvicorn: WebServer (in a thread, for tests and embedding) and
main(), the `lipari web` command line."""
import argparse
import asyncio
import os
import socket
import sys
import threading
import time

import uvicorn

from headend.queries import QueryError, load_tariff
from headend.web.app import create_app
from headend.web.commands import Commander


def listen(host, port):
    """A bound, listening socket (port 0: a free one); OSError when it is taken."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s


class WebServer:
    """uvicorn serving an app on a socket we bound (so port 0 works and a taken port is a
    clear error before anything starts). .url, .server_address, .state (WebState), .stop()."""

    def __init__(self, app, host="127.0.0.1", port=8000, verbose=False, **uvicorn_kw):
        uvicorn_kw.setdefault("proxy_headers", False)     # trust no proxy unless told
        self.app = app
        self.state = app.state.web
        self.sock = listen(host, port)
        self.server_address = self.sock.getsockname()[:2]
        self.config = uvicorn.Config(app, log_level="info" if verbose else "warning",
                                     access_log=verbose, timeout_graceful_shutdown=3,
                                     lifespan="on", **uvicorn_kw)
        self.server = uvicorn.Server(self.config)
        self._thread = None

    @property
    def url(self):
        host, port = self.server_address
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def start(self, timeout_s=10):
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="lipari-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web server did not start")
            time.sleep(0.02)
        return self

    def run(self):
        """Serve in this thread until SIGINT / SIGTERM (uvicorn's handlers)."""
        self.server.run(sockets=[self.sock])

    def stop(self):
        hub = self.state.hub
        if hub.loop is not None and not hub.loop.is_closed():
            # open streams end with the hub, so the graceful shutdown does not wait for them
            try:
                asyncio.run_coroutine_threadsafe(hub.stop(), hub.loop).result(5)
            except Exception:
                pass
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.sock.close()


def serve(store, host="127.0.0.1", port=8000, tariff=None, broker=None, poll_s=1.0,
          verbose=False, commander=None):
    """Build and start a web server on a Store in a thread; returns it (.url, .stop())."""
    app = create_app(store, tariff, commander or Commander(broker, store), poll_s, host=host)
    return WebServer(app, host, port, verbose).start()


def parser():
    p = argparse.ArgumentParser(prog="lipari web", description="The Lipari dashboard, REST API "
                                "(OpenAPI at /openapi.json) and live updates")
    p.add_argument("--db", default=os.environ.get("LIPARI_DB", "sqlite:///var/lipari.db"),
                   help="database URL: sqlite:///path or postgresql://user:pw@host/db "
                        "(default sqlite:///var/lipari.db, or $LIPARI_DB)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--broker", help="HOST:PORT of the MQTT broker, for commands")
    p.add_argument("--user", default=os.environ.get("LIPARI_MQTT_USER"),
                   help="MQTT user for commands (default $LIPARI_MQTT_USER)")
    p.add_argument("--password", default=os.environ.get("LIPARI_MQTT_PASSWORD"),
                   help="MQTT password (default $LIPARI_MQTT_PASSWORD)")
    p.add_argument("--keys", default=os.environ.get("LIPARI_KEYS", "var/keys"),
                   help="directory of meters' command keys (<meter>.key), as lipari cmd")
    p.add_argument("--tls-ca", help="CA file: send commands to the broker over TLS")
    p.add_argument("--tariff", help="time-of-use tariff, JSON (see headend/queries.py)")
    p.add_argument("--poll-s", type=float, default=1.0, help="how often live views re-read the "
                                                              "database (default 1 s)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM; with --tls-key)")
    p.add_argument("--tls-key", help="the certificate's private key")
    p.add_argument("--forwarded-allow", metavar="IPS", help="behind a TLS proxy: the proxy "
                   "addresses whose X-Forwarded-Proto/For are trusted (e.g. 127.0.0.1), so that "
                   "the session cookie is Secure and the login limit sees the client address")
    p.add_argument("--cookie-secure", action="store_true", help="always mark the session "
                   "cookie Secure (a TLS proxy that sends no X-Forwarded-Proto)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    from headend.store import StoreError
    from headend.store_pg import open_store
    try:
        tariff = load_tariff(a.tariff)
    except QueryError as e:
        print("lipari web: %s" % e, file=sys.stderr)
        return 2
    try:
        store = open_store(a.db)
    except StoreError as e:
        print("lipari web: %s" % e, file=sys.stderr)
        return 2
    cmd = Commander(a.broker, store, a.user, a.password, a.keys, a.tls_ca)
    app = create_app(store, tariff, cmd, a.poll_s, host=a.host, cookie_secure=a.cookie_secure)
    password = app.state.web.users.ensure_first_admin()
    if password:
        print("lipari web: no users yet: created 'admin' with password %s (shown this once; "
              "lipari user passwd admin sets a new one)" % password, flush=True)
    try:
        tls = {"ssl_certfile": a.tls_cert, "ssl_keyfile": a.tls_key} if a.tls_cert else {}
        srv = WebServer(app, a.host, a.port, a.verbose, proxy_headers=bool(a.forwarded_allow),
                        forwarded_allow_ips=a.forwarded_allow or None, **tls)
    except OSError as e:
        print("lipari web: cannot listen on %s:%d: %s. Use --port to pick another port."
              % (a.host, a.port, e), file=sys.stderr)
        return 2
    url = srv.url.replace("http://", "https://") if a.tls_cert else srv.url
    print("lipari web: dashboard at %s/  (API: %s/openapi.json)" % (url, url), flush=True)
    try:
        srv.run()
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
    return 0
