# HTTP(S) pull of a release image on Wi-Fi (docs/ota.md, "MQTT transfer" / HTTP pull): one
# GET with Range from the first byte missing, read piece by piece into one buffer, each
# piece checked and written by ota/stage.py exactly as a chunk that came over MQTT.
# Any failure raises (OSError / ValueError / ChunkError): the agent goes on over MQTT.
from ota.manifest import piece_end
from util import sleep_ms


def parse_url(url):
    """http[s]://host[:port]/path -> (host, port, path, tls)."""
    tls = url.startswith("https://")
    if not tls and not url.startswith("http://"):
        raise ValueError("not an http(s) URL: %r" % url)
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port) if port else (443 if tls else 80), "/" + path, tls


async def _read(conn, mv, wait_ms):
    n = await conn.recv_into(mv, wait_ms)
    if not n:
        raise OSError("HTTP: nothing received for %d ms" % wait_ms)
    return n


async def fetch(agent, st, o):
    url = o["url"]
    host, port, path, tls = parse_url(url)
    t = None
    for tr in agent.s.selector.order if getattr(agent.s, "selector", None) else ():
        if tr.name == "wifi":
            t = tr
    if t is None:
        raise OSError("no Wi-Fi transport for HTTP")
    wait = agent.cfg["chunk_wait_ms"]
    conn = await t.connect(host, port, {} if tls else None)
    try:
        off = st.next_offset()
        await conn.send(("GET %s HTTP/1.1\r\nHost: %s\r\nRange: bytes=%d-\r\n"
                         "Connection: close\r\n\r\n" % (path, host, off)).encode())
        buf = bytearray(max(st.block, 1024))
        mv = memoryview(buf)
        n = 0
        while True:                                  # the response head, at most 1 KiB
            n += await _read(conn, mv[n:1024], wait)
            end = bytes(buf[:n]).find(b"\r\n\r\n")
            if end >= 0:
                break
            if n >= 1024:
                raise ValueError("HTTP: response head too long")
        status = bytes(buf[:end]).split(b"\r\n", 1)[0].split(b" ")
        code = int(status[1]) if len(status) > 1 else 0
        if code != 206 and not (code == 200 and off == 0):
            raise OSError("HTTP: %s answered %d for bytes %d-" % (url, code, off))
        have = n - end - 4                           # body bytes already in buf
        buf[0:have] = buf[end + 4:n]
        pos = off
        rep = pos
        while pos < st.total:
            if pos - rep >= st.total * agent.cfg["report_pct"] // 100:
                agent._progress(st, o)
                rep = pos
            need = piece_end(st.m, pos) - pos
            while have < need:
                have += await _read(conn, mv[have:need], wait)
            st.accept(pos, mv[:need])
            buf[0:have - need] = buf[need:have]
            have -= need
            pos += need
            agent.stats["http_bytes"] = agent.stats.get("http_bytes", 0) + need
            await sleep_ms(agent.cfg["gap_ms"])
    finally:
        conn.close()
