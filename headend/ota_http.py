"""Release images over HTTP for meters on Wi-Fi (docs/ota.md, HTTP pull): GET
/ota/<version>/image.bin with an optional `Range: bytes=a-[b]` (206 Partial Content).

    srv = serve("var/ota/releases", "0.0.0.0", 8081)    # ThreadingHTTPServer in a thread
    srv.shutdown()

The meter checks every piece against the signed block table, so plain HTTP is enough
for integrity; HTTPS (a TLS terminator in front) keeps the release private.
"""
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_PATH = re.compile(r"^/ota/([0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})/image\.bin$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def serve(root, host="127.0.0.1", port=0):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            pass

        def do_GET(self):
            m = _PATH.match(self.path)
            f = os.path.join(root, m.group(1), "image.bin") if m else None
            if not f or not os.path.isfile(f):
                self.send_error(404, "no such release image")
                return
            size = os.path.getsize(f)
            a, b = 0, size - 1
            r = self.headers.get("Range")
            if r:
                rm = _RANGE.match(r.strip())
                if not rm or int(rm.group(1)) >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", "bytes */%d" % size)
                    self.end_headers()
                    return
                a = int(rm.group(1))
                b = min(int(rm.group(2)), size - 1) if rm.group(2) else size - 1
            self.send_response(206 if r else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(b - a + 1))
            if r:
                self.send_header("Content-Range", "bytes %d-%d/%d" % (a, b, size))
            self.end_headers()
            with open(f, "rb") as fh:
                fh.seek(a)
                left = b - a + 1
                while left:
                    chunk = fh.read(min(left, 16384))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    srv = ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True, name="ota-http").start()
    return srv
