# The meter's OTA agent (docs/ota.md): takes a signed offer from the head-end, checks it,
# downloads the release into the inactive slot over MQTT (or HTTP on Wi-Fi) while the
# meter keeps metering, switches the boot record to a trial of it and reboots; in the
# new firmware it confirms the trial once metering runs and the broker answered, or rolls
# back when the health deadline passes. It reports every step on .../ota/state.
#
#   agent = attach(session, meter, clock, board, boot)   # main.py, when the bootstrap
#                                                          # started us (main.BOOT)
#
# Pacing: one chunk in flight per `window` (link dependent), each written to flash and
# followed by a pause, and nothing is requested while interval/event records wait in the
# flash queue: billing data goes first, metering is never held up (the signature check
# yields to the loop too).
try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio
import gc
import json
import binascii

import boot as _boot
from version import VERSION, number
from ota import manifest as _man
from ota.manifest import Refused
from ota.stage import Stage, ChunkError, rmtree, remove, makedirs, free_bytes, DL
from comm.mqtt import MqttError, packet_bytes
from util import (ticks_ms as _ticks, ticks_diff as _diff, sleep_ms as _sleep_ms,
                  wait_event as _wait, merge)

DEFAULTS = {
    "window": {"nbiot": 4, "plc": 2, "wifi": 8},   # chunks asked for at once, per link
    "report_pct": 20,        # a progress report every this share of the image
    "gap_ms": 20,            # pause after each chunk written (flash + radio pacing)
    "chunk_wait_ms": 8000,   # no chunk for this long: ask again
    "bad_chunk_limit": 4,    # the same chunk failing its check this often: give up
    "stall_s": 1800,         # no progress at all for this long: give up
    "queue_max": 4,          # records waiting in the flash queue above which we pause
    "confirm_cycles": 3,     # metering cycles seen in the trial before confirming
    "reserve_bytes": 65536,  # free flash left for metering and the queue after staging
    "http": True,            # use the offer's url when the active link is Wi-Fi
}
MAX_REQ_BYTES = 16384        # the head-end answers at most this much per request
PUBKEY = "ota.pub"           # the meter's public key (64 hex digits), beside boot.py


def load_pub(path=PUBKEY):
    try:
        with open(path) as f:
            b = binascii.unhexlify(f.read().strip())
    except (OSError, ValueError):
        return None
    return b if len(b) == 32 else None


class Agent:
    def __init__(self, session, meter, clock, board, boot, cfg=None):
        self.s = session
        self.meter = meter
        self.clock = clock
        self.board = getattr(board, "NAME", "?")
        self.boot = boot
        self.d = boot.get("dir", _boot.DIR)
        self.cfg = merge("ota config", DEFAULTS, cfg)
        self.pub = load_pub()
        self.offer = None              # the latest offer payload, not yet handled
        self.seen = {}                 # offer id -> refusal code, this boot
        self.inbox = []                # (offset, bytes) chunks received, not yet written
        self.tag = None
        self.wake = asyncio.Event()
        self.data = asyncio.Event()
        self._state_ev = asyncio.Event()
        self.state = {"state": "idle", "fw": VERSION, "slot": _boot.SLOTS[boot["slot"]]}
        self._published = None
        self._connects = -1
        self.stats = {"chunks": 0, "bad_chunks": 0, "dropped_chunks": 0, "requests": 0,
                      "timeouts": 0, "rx_mem_errors": 0, "oversized_offers": 0}
        self.s.add_topic("ota/offer", 1, self._on_offer)
        self.s.add_topic("ota/d", 0, self._on_data)

    # -- paths ---------------------------------------------------------------------------
    def slot_dir(self, slot):
        return "%s/%s" % (self.d, _boot.SLOTS[slot])

    def _slot_info(self, slot):
        try:
            with open("%s/%s.json" % (self.d, _boot.SLOTS[slot])) as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return {}

    # -- MQTT handlers (must not block) ---------------------------------------------------
    def _on_offer(self, payload):
        if payload is None:
            # larger than the client's resting receive buffer (an offer must fit beside
            # the largest command: docs/ota.md): discarded by the client, refused aloud
            self.stats["oversized_offers"] += 1
            self.set_state(state="refused", reason="oversized: the offer is larger than "
                           "the %d-byte receive buffer" % self.s.client.rx_rest)
            return
        if payload:
            self.offer = payload
            self.wake.set()

    def _on_data(self, payload):
        if not payload or len(payload) < 9 or payload[0] != 1 or self.tag is None:
            return
        if payload[1:5] != self.tag:
            return                      # a chunk of another offer
        if len(self.inbox) >= 16:
            self.stats["dropped_chunks"] += 1
            return
        off = payload[5] | payload[6] << 8 | payload[7] << 16 | payload[8] << 24
        self.inbox.append((off, memoryview(payload)[9:]))
        self.data.set()

    # -- reporting -----------------------------------------------------------------------
    def set_state(self, **kw):
        st = {"state": kw.pop("state", self.state["state"]), "fw": VERSION,
              "slot": self.state["slot"]}
        for k in ("id", "target", "done", "total"):
            if k in self.state and k not in kw and st["state"] == self.state["state"]:
                st[k] = self.state[k]
        st.update(kw)
        self.state = st
        self._kick()

    def _kick(self):
        self._state_ev.set()             # one task publishes, so reports never reorder

    async def publish_state(self):
        st = dict(self.state)
        if self.clock is not None:
            st["t"] = self.clock.time()
        body = json.dumps(st)
        if body == self._published or not self.s.client.isconnected():
            return
        try:
            await self.s.client.publish(self.s.base + "ota/state", body.encode(), 1, True,
                                        self.s.cfg["ack_timeout_ms"])
            self._published = body
        except MqttError:
            pass                        # published again at the next connect

    async def _reporter(self):
        """The only publisher of ota/state: the current state after each change, and
        again after every reconnect (retained: the head-end sees it whenever it looks)."""
        while True:
            await _wait(self._state_ev, 500)
            c = self.s.client.stats["connects"]
            if c != self._connects and self.s.client.isconnected():
                self._connects = c
                self._published = None
            await self.publish_state()

    # -- boot: trial, rollback report, resume -------------------------------------------------
    def _boot_state(self):
        r = self.boot
        last = r.get("last", 0)
        if r["state"] == _boot.TRIAL:
            info = self._slot_info(r["slot"])
            self.set_state(state="trial", id=info.get("id"), target=VERSION)
            return info
        if last >= 2:
            info = self._slot_info(r["slot"] ^ 1)
            self.set_state(state="rolled_back", id=info.get("id"), target=info.get("version"),
                           reason=_boot.RESULTS[last] if last < len(_boot.RESULTS) else "rolled back")
        elif last == 1:
            info = self._slot_info(r["slot"])
            self.set_state(state="confirmed", id=info.get("id"), target=VERSION)
        return None

    async def _trial(self, info):
        """The new firmware on trial: confirm when healthy, roll back at the deadline."""
        deadline_ms = int(info.get("trial_s", 600)) * 1000
        t0 = self.clock.ticks_ms()
        c0 = self.meter.cycles
        while True:
            healthy = (self.meter.cycles - c0 >= self.cfg["confirm_cycles"] and
                       self.s.client.isconnected() and not self.s._status_dirty)
            if healthy:
                r = _boot.read_record(self.d) or self.boot
                r = dict(r)
                r["state"] = _boot.CONFIRMED
                r["tries"] = 0
                r["last"] = 1
                try:
                    r["floor"] = max(r["floor"], number(info.get("min_version", "0.0.0")))
                except ValueError:
                    pass
                self.boot = _boot.write_record(r, self.d)
                self.set_state(state="confirmed", id=info.get("id"), target=VERSION)
                return
            if self.clock.ticks_diff(self.clock.ticks_ms(), t0) > deadline_ms:
                why = "metering not running" if self.meter.cycles - c0 < \
                    self.cfg["confirm_cycles"] else "broker not reached"
                self.boot = _boot.rollback(self.boot, 4, self.d)
                self.set_state(state="rolling_back", reason="health deadline passed: " + why)
                await _sleep_ms(300)
                self.meter.reboot()
                return
            await _sleep_ms(250)

    def _resume(self):
        """A download interrupted by a reboot: its offer (already verified before the
        first byte was written, and kept on our own flash) -> offer dict, or None."""
        try:
            with open(self.d + "/" + DL) as f:
                dl = json.loads(f.read())
            o = _man.parse_offer(json.dumps(dl["offer"]))
        except (OSError, ValueError, KeyError, Refused):
            self._abandon()
            return None
        if dl.get("slot") != self.boot["slot"] ^ 1 or self.boot["state"] == _boot.TRIAL:
            self._abandon()            # stale: that release is installed or was replaced
            return None
        return o

    def _abandon(self):
        for n in (DL, "dl.tab", "dl.dir"):
            remove(self.d + "/" + n)

    # -- the task ---------------------------------------------------------------------------
    async def run(self):
        asyncio.create_task(self._reporter())
        info = self._boot_state()
        if info is not None:
            await self._trial(info)
        if self.pub is None:
            self.set_state(state="disabled", reason="no public key (%s) on this meter" % PUBKEY)
        o = self._resume() if self.boot["state"] != _boot.TRIAL else None
        if o is not None:
            await self._install(o, resumed=True)
        while True:
            await _wait(self.wake, 5000)
            p, self.offer = self.offer, None
            if p is None or self.pub is None:
                continue
            try:
                o = _man.parse_offer(p)
            except Refused as e:
                self.set_state(state="refused", reason="%s: %s" % (e.code, e))
                continue
            if o["id"] in self.seen or o["id"] == self.state.get("id"):
                continue
            await self._install(o)

    async def _install(self, o, resumed=False):
        m = o["m"]
        new = self.boot["slot"] ^ 1
        try:
            if self.state["state"] == "trial":
                raise Refused("busy", "a trial is running")
            if not resumed and o["id"] == self._slot_info(new).get("id") and \
                    self.boot.get("last", 0) >= 2:
                raise Refused("rolled_back", "this offer was installed and rolled back")
            self.set_state(state="verifying", id=o["id"], target=m["version"])
            await _man.verify(o, self.pub)
            self._check(m)
            st = self._prepare(o, new, resumed)
            await self._fetch(st, o)
            self.set_state(state="verifying", id=o["id"], target=m["version"])
            for _ in st.check_files():
                await _sleep_ms(0)
            self._check(m)                       # expiry again, just before the switch
            self._switch(st, o, new)
        except Refused as e:
            self.seen[o["id"]] = e.code
            if e.code not in ("installed",):
                self._abandon()
            self.set_state(state="refused" if e.code not in ("fetch", "flash") else "failed",
                           id=o["id"], target=m["version"], reason="%s: %s" % (e.code, e))
            return
        self.set_state(state="rebooting", id=o["id"], target=m["version"])
        await _sleep_ms(500)                     # let the state message out
        self.meter.reboot()                      # checkpoint, then reset

    def _check(self, m):
        c = self.clock
        _man.check_install(m, self.board, VERSION, self.boot.get("floor", 0), c.time(),
                           getattr(c, "synced", True))

    def _prepare(self, o, new, resumed):
        m = o["m"]
        sd = self.slot_dir(new)
        st = None
        if m["kind"] == "romfs":
            if not hasattr(_boot, "slot_path"):
                raise Refused("kind", "this meter's bootstrap cannot start a ROMFS slot "
                              "(it predates them): redeploy it with lipari deploy")
            from ota.rom import RomStage
            st = RomStage(self.d, m, new)        # Refused (kind, space) without a slot for it
        if not resumed:
            self._abandon()
            rmtree(sd)                           # the bootstrap prefers a slot's directory
            remove(sd + ".rom")                  # to its image: neither may be stale
            remove("%s/%s.json" % (self.d, _boot.SLOTS[new]))
            free = free_bytes(self.d)
            need = _man.wire_size(m) + self.cfg["reserve_bytes"]
            if st is None or st.dev.on_fs:
                need += m["body_size"]
            if free is not None and free < need:
                raise Refused("space", "%d bytes free, the release needs %d" % (free, need))
            makedirs(sd)
            dl = {"offer": {"id": o["id"], "manifest": o["raw"].decode(),
                            "sig": binascii.hexlify(o["sig"]).decode(), "url": o["url"]},
                  "slot": new}
            with open(self.d + "/" + DL, "w") as f:
                f.write(json.dumps(dl))
        return st or Stage(self.d, m, sd)

    def _switch(self, st, o, new):
        m = o["m"]
        info = {"id": o["id"], "version": m["version"], "min_version": m["min_version"],
                "trial_s": m["trial_s"]}
        with open("%s/%s.json" % (self.d, _boot.SLOTS[new]), "w") as f:
            f.write(json.dumps(info))
        r = dict(self.boot)
        r["slot"] = new
        r["state"] = _boot.TRIAL
        r["tries"] = 0
        r["last"] = 0
        self.boot = _boot.write_record(r, self.d)     # the commit point
        st.cleanup()

    # -- transfer ---------------------------------------------------------------------------
    def _link(self):
        return self.s.client.transport_name() or "nbiot"

    async def _fetch(self, st, o):
        if o["url"] and self.cfg["http"] and self._link() == "wifi":
            try:
                from ota.http import fetch
                await fetch(self, st, o)
            except (OSError, ValueError, ChunkError, asyncio.TimeoutError) as e:
                self.stats["http_error"] = repr(e)   # the rest comes over MQTT
        await self._fetch_mqtt(st, o)

    def _progress(self, st, o):
        self.set_state(state="downloading", id=o["id"], target=o["m"]["version"],
                       done=st.next_offset(), total=st.total)

    async def _next_chunk(self, wait_ms):
        """True once a chunk is in the inbox; False after wait_ms without one."""
        t0 = _ticks()
        while not self.inbox:
            left = wait_ms - _diff(_ticks(), t0)
            if left <= 0:
                return False
            await _wait(self.data, left)
        return True

    def chunk_packet_bytes(self, m):
        """Bytes of the largest ota/d packet of a release: a piece of `block` bytes after
        the 9-byte chunk header, QoS 0 (subscribed at 0) on this meter's ota/d topic."""
        return packet_bytes(len((self.s.base + "ota/d").encode()), 9 + m["block"], 0)

    async def _fetch_mqtt(self, st, o):
        c = self.cfg
        cl = self.s.client
        self.tag = _man.tag(o)
        bad_at, bad_n = -1, 0
        last_progress = _ticks()
        reported = -1
        need = self.chunk_packet_bytes(st.m)
        grown = False                   # the client's receive buffer takes our chunks
        oom = 0                         # the buffer last refused for want of memory
        try:
            while True:
                off = st.next_offset()
                if off >= st.total:
                    return
                # progress on the wire every `report_pct` of the image (not every chunk:
                # a report costs a tenth of a chunk, ota_overhead_ratio counts it)
                if reported < 0 or off - reported >= st.total * c["report_pct"] // 100:
                    self._progress(st, o)
                    reported = off
                if not grown:
                    # The client keeps a buffer for commands only; a chunk needs `need`
                    # bytes, asked for while this download runs (the finally below gives
                    # it back on every exit). No room: counted, collected, tried again
                    # each chunk_wait_ms until stall_s ends the download (failed, fetch).
                    try:
                        cl.rx_buffer(need)
                        grown = True
                        oom = 0
                    except ValueError as e:      # chunks above mqtt max_packet
                        raise Refused("fetch", str(e))
                    except MemoryError:
                        self.stats["rx_mem_errors"] += 1
                        oom = need              # no allocation in here: reported below
                        gc.collect()
                if _diff(_ticks(), last_progress) > c["stall_s"] * 1000:
                    raise Refused("fetch", "no progress for %d s at byte %d%s" % (
                        c["stall_s"], off,
                        "; no room for a %d-byte receive buffer" % oom if oom else ""))
                if not grown:
                    await _sleep_ms(c["chunk_wait_ms"])
                    continue
                if not self.s.client.isconnected() or len(self.s.queue) > c["queue_max"]:
                    await _sleep_ms(500)
                    continue
                w = c["window"].get(self._link(), 1)
                n = min(w * st.block, MAX_REQ_BYTES)
                end = _man.answer_end(st.m, off, n)   # the pieces the head-end answers with
                self.inbox = []
                self.data.clear()
                req = json.dumps({"id": o["id"], "o": off, "n": n})
                try:
                    await self.s.client.publish(self.s.base + "ota/req", req.encode(), 0)
                    self.stats["requests"] += 1
                except MqttError:
                    await _sleep_ms(1000)
                    continue
                # Wait for exactly this answer's pieces (they come in order: one TCP
                # stream). Only chunk_wait_ms without any chunk is a timeout: the data event
                # may still be set by a chunk that came while we were writing (it once ended
                # the window at once, and the pieces still on their way were asked again).
                nxt = off
                while nxt < end:
                    if not await self._next_chunk(c["chunk_wait_ms"]):
                        self.stats["timeouts"] += 1
                        break                       # lost on the way: ask again
                    coff, data = self.inbox.pop(0)
                    self.stats["chunks"] += 1
                    if coff == nxt:
                        nxt = _man.piece_end(st.m, coff)
                    try:
                        if st.accept(coff, data):
                            last_progress = _ticks()
                            bad_n = 0
                    except ChunkError as e:
                        self.stats["bad_chunks"] += 1
                        bad_n = bad_n + 1 if coff == bad_at else 1
                        bad_at = coff
                        if bad_n >= c["bad_chunk_limit"]:
                            raise Refused("fetch", str(e))
                        break
                    await _sleep_ms(c["gap_ms"])
        finally:
            self.tag = None
            self.inbox = []
            if grown:
                cl.rx_buffer()          # back to the resting size (allocates nothing here)


async def _guard(a):
    # A bug in the agent must never take metering down: report it and stop OTA only.
    try:
        await a.run()
    except Exception as e:
        a.stats["error"] = repr(e)
        a.set_state(state="error", reason="agent stopped: %r" % (e,))
        print('{"type": "error", "msg": "ota agent: %s"}' % repr(e).replace('"', "'"))


def attach(session, meter, clock, board, boot, cfg=None):
    """Start the agent when the bootstrap started us (boot) and a session runs; None
    otherwise. Explicit parts, as comm/wiring takes them: no main.Run object."""
    if boot is None or session is None:
        return None
    a = Agent(session, meter, clock, board, boot, cfg)
    asyncio.create_task(_guard(a))
    return a
