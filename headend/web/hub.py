"""Live updates: one poller re-reads the fleet and the meters someone watches and wakes
every open stream when something changed.

One poller for all clients keeps the database load independent of the number of open
dashboards. It runs as a task on the server's event loop; the reads themselves run in a
worker thread (the store is synchronous). Streams wait on an asyncio.Condition for the
version to move past what they sent.
"""
import asyncio
import base64
import json
import traceback


def _json_default(o):
    if isinstance(o, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(o)).decode()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def dumps(o):
    return json.dumps(o, default=_json_default, separators=(",", ":"))


def jsonable(o):
    """Store rows as JSON-ready values (bytes as base64), for JSON responses."""
    return json.loads(dumps(o))


def fleet_snapshot(q, meter_ids=None):
    """The fleet as the fleet page shows it; meter_ids limits it to those meters."""
    meters = q.meters()
    if meter_ids is not None:
        meters = [m for m in meters if m["id"] in meter_ids]
    newest = 0
    for m in meters:
        last = q.last_interval(m["id"])
        m["last_interval_t"] = last.get("t_end") if last else None
        m["last_interval_seq"] = last.get("seq") if last else None
        m["ai_wh"] = last.get("ai_wh") if last else None
        newest = max(newest, m["last_interval_t"] or 0)
    return summarise(meters, newest)


def summarise(meters, newest=None):
    if newest is None:
        newest = max([m.get("last_interval_t") or 0 for m in meters] or [0])
    online = sum(1 for m in meters if m.get("online"))
    p_w = sum(m.get("p_w") or 0 for m in meters if m.get("online"))
    return {"meters": meters, "count": len(meters), "online": online, "p_w": p_w,
            "newest_interval_t": newest or None}


def meter_snapshot(q, mid):
    m = q.meter(mid)
    last = q.last_interval(mid)
    log = q.status_log(mid)
    from headend.web.ota import card
    return {"meter": m, "rt": q.rt(mid), "last_interval": last,
            "events": q.events(mid, limit=20),
            "status": log[-1]["status"] if log else None, "ota": card(q.store, mid)}


class Hub:
    def __init__(self, state, poll_s=1.0):
        self.state = state
        self.poll_s = poll_s
        self.snap = {}            # key ("fleet", "meter:<id>") -> (version, object, json text)
        self.watch = {}           # meter id -> number of open streams
        self.version = 0
        self.errors = 0
        self.stopping = False
        self.loop = None
        self._cond = None
        self._kick = None
        self._task = None

    # -- life cycle (on the server's event loop) ----------------------------------------
    def start(self):
        self.loop = asyncio.get_running_loop()
        self._cond = asyncio.Condition()
        self._kick = asyncio.Event()
        self.stopping = False
        self._task = asyncio.create_task(self._run(), name="lipari-web-hub")
        return self

    async def stop(self):
        self.stopping = True
        if self._kick is not None:
            self._kick.set()
            async with self._cond:
                self._cond.notify_all()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def kick(self):
        """Poll now (after a command, so that its effect shows at once); any thread."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._kick.set)

    # -- streams --------------------------------------------------------------------------
    def add(self, meter_id):
        if meter_id:
            self.watch[meter_id] = self.watch.get(meter_id, 0) + 1
        self.kick()

    def remove(self, meter_id):
        if meter_id and meter_id in self.watch:
            self.watch[meter_id] -= 1
            if self.watch[meter_id] <= 0:
                del self.watch[meter_id]

    async def wait(self, seen_version, timeout_s):
        """Until the version moves past seen_version, the hub stops or timeout_s passes."""
        async with self._cond:
            if self.version == seen_version and not self.stopping:
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout_s)
                except asyncio.TimeoutError:
                    pass

    # -- polling -------------------------------------------------------------------------
    def read(self, watched):
        """In a worker thread: the fleet and each watched meter as (key, object, text)."""
        st = self.state
        out = []
        fleet, _ = st.fleet(0)                  # fresh, and shared with GET /meters
        out.append(("fleet", fleet, dumps(fleet)))
        for mid in watched:
            with st.lock:
                m = meter_snapshot(st.q, mid)
            out.append(("meter:" + mid, m, dumps(m)))
        return out

    async def poll_once(self):
        items = await asyncio.to_thread(self.read, list(self.watch))
        async with self._cond:
            changed = False
            for key, obj, text in items:
                old = self.snap.get(key)
                if old is None or old[2] != text:
                    self.version += 1
                    self.snap[key] = (self.version, obj, text)
                    changed = True
            if changed:
                self._cond.notify_all()

    async def _run(self):
        while not self.stopping:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                if self.errors <= 3:
                    traceback.print_exc()
            try:
                await asyncio.wait_for(self._kick.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
