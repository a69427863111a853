"""The simulated meters of `lipari loadtest`: one asyncio object per meter, speaking what
the firmware speaks (docs/protocol.md), over gmqtt (docs/decisions/0006-loadtest-client.md).

What each meter does, as firmware/comm/session.py and comm/mqtt.py do it:
- CONNECT as its meter id (client id = user name, its own password), clean session 0,
  keepalive 60 s, last will `{"online": false}` retained on .../status;
- after each CONNACK: in-flight QoS 1 messages again (gmqtt's session replay), a retained
  birth on .../status (the Session.status() fields), SUBSCRIBE .../cmd; commands get a
  reply on .../resp (ping answers, the rest `unsupported`);
- interval and event records, binary v1 encoded by the firmware's own codec
  (firmware/comm/codec.py), go through a per-meter queue (the flash queue): one QoS 1
  PUBLISH in flight, removed only at PUBACK, then 1000/backlog_per_s ms of pause (the
  firmware's backlog rate limit); a record not acknowledged within ack_timeout_ms is sent
  again as a new PUBLISH (same seq);
- what the broker acknowledged in the last resend_s is sent again after a reconnect
  (the firmware keeps it in its flash queue and rewinds, fqueue.rewind(): a crashed
  broker loses what it acknowledged since its last save); no byte bound, and a reboot
  keeps it (flash);
- live readings (QoS 0) every rt_s while connected, for the meters in the rt share;
- reconnects back off from 1 s doubling to 120 s with +-25 % jitter (comm/mqtt.py);
- a reboot (churn) loses RAM (the in-flight packet) but not the queue nor the resend
  window, and raises a `boot` event.

Time: the fleet runs on a simulated clock `speed` times faster than the wall clock (see
headend/loadtest.py); a meter's clock is that plus its skew. Interval records close when
the meter's clock crosses a multiple of interval_s, as metering/engine.py closes them.
"""
import asyncio
import collections
import heapq
import importlib.util
import json
import os
import random
import time

import gmqtt
from gmqtt.mqtt.constants import MQTTv311

from headend import ROOT
from headend.ingest import DirectClient, DirectProtocol

PREFIX = "lipari/v1"
FW = "0.3.0"
BOARDS = {1: "unix_sim_1ph", 3: "unix_sim_3ph"}
QKIND = {"interval": 1, "event": 2}
QNAME = {1: "interval", 2: "event"}
# firmware defaults (comm/mqtt.py DEFAULTS, comm/session.py DEFAULTS)
MQTT_DEFAULTS = {"keepalive_s": 60, "ack_timeout_ms": 10000, "backoff_min_ms": 1000,
                 "backoff_max_ms": 120000, "connect_timeout_ms": 20000}
SESSION_DEFAULTS = {"backlog_per_s": 5, "ack_timeout_ms": 15000, "resend_s": 10}


def firmware_codec():
    """firmware/comm/codec.py itself, imported under CPython: the load generator encodes
    records with the meter's own encoder (tests/test_loadtest.py checks it against the
    micropython build byte for byte)."""
    path = os.path.join(ROOT, "firmware", "comm", "codec.py")
    spec = importlib.util.spec_from_file_location("lipari_fw_codec", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CODEC = firmware_codec()


class RecordModel:
    """Deterministic records of one meter: a household-like load around a base power,
    per-phase energies that add up, voltages near 230 V, two tariff registers."""

    def __init__(self, rng, phases):
        self.rng = rng
        self.nph = phases
        self.base_w = rng.uniform(150, 900) * phases
        self.ai_ph = [rng.randrange(0, 5_000_000) for _ in range(phases)]
        self.ae_ph = [0] * phases
        self.rq = [0, 0, 0, 0]
        self.ap = sum(self.ai_ph)
        self.tw = [self.ap // 2, 0]
        self.tw[1] = sum(self.ai_ph) - self.tw[0]
        self.p_w = self.base_w
        self._rt_pool = None
        self._var = None

    def interval(self, seq, t_end, dur_s):
        # variation from a small per-meter table (a dozen random draws per record cost
        # more than encoding it)
        k = seq & 15
        if self._var is None:
            r = self.rng
            self._var = [(r.uniform(0.3, 2.0), [r.randrange(-2500, 2500) for _ in range(3)],
                          r.randrange(500, 4000), r.randrange(500, 4000)) for _ in range(16)]
        f, dv, lo, hi = self._var[k]
        self.p_w = self.base_w * f
        wh = int(self.p_w * dur_s / 3600)
        n = self.nph
        per = [wh // n] * n
        per[0] += wh - sum(per)
        for i in range(n):
            self.ai_ph[i] += per[i]
        self.rq[0] += wh // 8
        self.ap += wh + wh // 20
        tariff = 1 if (t_end // 3600) % 24 >= 7 else 0
        self.tw[tariff] += wh
        vavg = [230000 + dv[i] for i in range(n)]
        return {"seq": seq, "t_end": t_end, "dur_s": dur_s, "flags": 0, "tariff": tariff,
                "ai_wh": sum(self.ai_ph), "ae_wh": sum(self.ae_ph), "rq_varh": list(self.rq),
                "ap_vah": self.ap, "ai_ph_wh": list(self.ai_ph), "ae_ph_wh": list(self.ae_ph),
                "v_min_mv": [v - lo for v in vavg], "v_max_mv": [v + hi for v in vavg],
                "v_avg_mv": vavg, "pmax_w": int(self.p_w * 1.3), "sags": [0] * n,
                "swells": [0] * n, "tariff_wh": list(self.tw), "ph_invalid": 0}

    def rt(self, t):
        """A live reading at meter time t. The values come from a pool of 8 readings per
        meter (encoding one costs ~25 us); t is the reading's own."""
        if self._rt_pool is None:
            r = self.rng
            pool = []
            for _ in range(8):
                p = [int(self.base_w / self.nph * r.uniform(0.3, 2.0) * 1000)
                     for _ in range(self.nph)]
                v = [230000 + r.randrange(-2500, 2500) for _ in range(self.nph)]
                i = [pp // 230 for pp in p]
                rec = {"t": 0, "valid": (1 << self.nph) - 1, "v_mv": v, "i_ma": i, "p_mw": p,
                       "q_mvar": [pp // 10 for pp in p], "s_mva": [pp * 21 // 20 for pp in p],
                       "pf_milli": [952] * self.nph, "angle_mdeg": [17800] * self.nph,
                       "f_ph_mhz": [50012] * self.nph, "f_mhz": 50012,
                       "ai_wh": sum(self.ai_ph), "ae_wh": 0, "tariff": 1}
                pool.append(CODEC.encode("rt", rec, "bin"))
            self._rt_pool = pool
        b = bytearray(self._rt_pool[t % 8])
        b[1:5] = (t & 0xFFFFFFFF).to_bytes(4, "little")   # u32 t right after the type byte
        return bytes(b)


class AckTimeouts:
    """The firmware's ack timeout for every meter's in-flight record, with one timer for
    the whole fleet instead of one per record: the timeout is the same for every record,
    so deadlines arrive in send order and a deque holds them sorted. Checked every
    CHECK_S by one loop callback (no task), so a PUBACK that did not come is given up on
    within ack_timeout_ms + CHECK_S; an entry names the meter and its send token, and a
    meter whose record was acknowledged (or whose link dropped) ignores it (a timer per
    record cost the load generator a heap entry, a handle and a cancel on every message)."""
    CHECK_S = 0.25

    def __init__(self):
        self.due = collections.deque()      # (deadline loop time, meter, token)
        self.handle = None

    def add(self, loop, deadline, meter, token):
        self.due.append((deadline, meter, token))
        if self.handle is None:
            self.handle = loop.call_later(self.CHECK_S, self._check, loop)

    def _check(self, loop):
        due = self.due
        now = loop.time()
        while due and due[0][0] <= now:
            _, meter, token = due.popleft()
            meter.ack_timeout(token)
        self.handle = loop.call_later(self.CHECK_S, self._check, loop) if due else None


class FleetTimers:
    """Every meter's pauses (the backlog pacing after a PUBACK, the retry after a failed
    send or an ack timeout) on one heap with one loop timer for the earliest, instead of a
    sleeping task per meter and record: a meter's sending is a state machine driven by
    its queue, its PUBACKs and these calls (Meter.pump)."""

    def __init__(self):
        self.heap = []                      # (due loop time, n, fn)
        self.n = 0
        self.handle = None
        self.when = float("inf")

    def at(self, loop, due, fn):
        self.n += 1
        heapq.heappush(self.heap, (due, self.n, fn))
        if due < self.when:
            if self.handle is not None:
                self.handle.cancel()
            self.when = due
            self.handle = loop.call_at(due, self._fire, loop)

    def _fire(self, loop):
        heap = self.heap
        now = loop.time()
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2]()
        if heap:
            self.when = heap[0][0]
            self.handle = loop.call_at(self.when, self._fire, loop)
        else:
            self.when, self.handle = float("inf"), None


_TOPICS = {}                                # topic -> its PUBLISH topic field


def publish_packet(topic, payload, qos, retain, mid=None):
    """An MQTT 3.1.1 PUBLISH, byte for byte what gmqtt's PublishPacket.build_package makes
    of gmqtt.Message(topic, payload, qos, retain) (tests/test_ingest_loadtest.py compares
    them), without building a Message and the packet a field at a time for each of the
    fleet's thousands of messages a second: the topic field is made once per topic."""
    tf = _TOPICS.get(topic)
    if tf is None:
        t = topic.encode()
        tf = _TOPICS[topic] = len(t).to_bytes(2, "big") + t
    rl = len(tf) + len(payload) + (2 if qos else 0)
    head = [0x30 | qos << 1 | (1 if retain else 0)]
    while True:                              # remaining length, variable byte integer
        rl, b = rl >> 7, rl & 0x7F
        head.append(b | 0x80 if rl else b)
        if not rl:
            break
    if qos:
        return b"".join((bytes(head), tf, mid.to_bytes(2, "big"), payload))
    return b"".join((bytes(head), tf, payload))


class _MeterProtocol(DirectProtocol):
    """The direct protocol (headend/ingest.py) with a meter's common read made cheap."""

    def data_received(self, data):
        if len(data) == 4 and data[0] == 0x40 and data[1] == 2 and not self._buf:
            # one PUBACK, what nearly every read of a meter's link is: gmqtt's handling of
            # it (connection check, keepalive stamp, free the id, drop the stored packet,
            # Client._remove_message_from_queue) without its generic dispatch
            conn = self._connection
            handler = conn._handler
            if handler.current_connection is conn:
                conn._last_data_in = time.monotonic()
                mid = data[2] << 8 | data[3]
                handler.id_generator.free_id(mid)
                handler._remove_message_from_queue(mid)
            return
        DirectProtocol.data_received(self, data)


class _Client(DirectClient):
    """gmqtt (on the direct protocol, headend/ingest.py DirectClient) plus two things the firmware does that gmqtt leaves to its user: each QoS 1
    PUBLISH's PUBACK handed to the meter (Meter.acked), and reconnects on the firmware's
    backoff (gmqtt's own reconnect uses a fixed delay, so it is handed to the meter)."""

    def __init__(self, meter, *a, **kw):
        super().__init__(*a, **kw)
        self.meter = meter

    protocol = _MeterProtocol

    def publish_acked(self, topic, payload, retain=False):
        """QoS 1 PUBLISH -> its packet id; the PUBACK calls meter.acked(mid) (gmqtt's
        publish() returns nothing; this is its body with the packet id kept, the packet
        built by publish_packet). Kept in gmqtt's store until the PUBACK: sent again, DUP
        set, on the next connection, as gmqtt does."""
        proto = self._connection._protocol
        mid = proto.id_generator.next_id()
        package = publish_packet(topic, payload, 1, retain, mid)
        proto.write_data(package)
        self._persistent_storage.push_message(mid, package)
        return mid

    def publish0(self, topic, payload):
        """QoS 0 PUBLISH (a live reading): the packet of publish_packet, written."""
        self._connection._protocol.write_data(publish_packet(topic, payload, 0, False))

    def _remove_message_from_queue(self, mid):
        super()._remove_message_from_queue(mid)
        self.meter.acked(mid)

    async def reconnect(self, delay=False):
        # called by gmqtt when the link is lost: the meter reconnects with backoff
        self.meter.link_lost()


class Meter:
    def __init__(self, fleet, index, meter_id, password, phases, rt, skew_s, seed):
        self.fleet = fleet
        self.i = index
        self.id = meter_id
        self.password = password
        self.base = "%s/%s/" % (PREFIX, meter_id)
        self.rt_on = rt
        self.skew_s = skew_s
        self.rng = random.Random(seed)
        self.model = RecordModel(self.rng, phases)
        self.phases = phases
        self.seq = {1: 0, 2: 0}
        self.queue = collections.deque()    # (qkind, payload, seq, made_wall): flash
        self.recent = []                    # [qkind, payload, seq, made, acked_at]
        self.resend = []
        self.client = None
        self.up = False
        self.dropped_at = 0.0
        self.offline_until = 0.0            # rebooting or its network is down
        self.connects = 0
        self.topics = {qk: self.base + name for qk, name in QNAME.items()}
        self.inflight = None                # (mid, token, again, t_pub): one QoS 1 record
        self.token = 0                      # per send: a stale ack timeout is told apart
        self.next_ok = 0.0                  # the backlog rate limit: no record before this
        self.paced = False                  # a FleetTimers call to pump() is pending
        self.lost = asyncio.Event()
        self.stats = collections.Counter()
        self.stopping = False
        self.task = None
        self.status_due = False             # status_s passed: a new retained status

    # -- records ------------------------------------------------------------------
    def clock(self, sim_t):
        return sim_t + self.skew_s

    def close_interval(self, t_end, made_wall):
        self.seq[1] += 1
        rec = self.model.interval(self.seq[1], t_end, self.fleet.interval_s)
        self._queue(1, CODEC.encode("interval", rec, "bin"), made_wall)

    def event(self, kind, t, phase=0, value=None, made_wall=None):
        self.seq[2] += 1
        rec = {"seq": self.seq[2], "t": int(t), "kind": kind, "phase": phase, "value": value}
        self._queue(2, CODEC.encode("event", rec, "bin"), made_wall or time.time())

    def _queue(self, qk, payload, made_wall):
        self.queue.append((qk, payload, self.seq[qk], made_wall))
        self.stats["made_" + QNAME[qk]] += 1
        if self.inflight is None and self.up:
            self.pump()

    def status_tick(self):
        """status_s of meter time passed: the retained status again (comm/session.py)."""
        self.status_due = True
        if self.inflight is None and self.up:
            self.pump()

    def send_rt(self, t):
        if not self.up:
            self.stats["rt_skipped"] += 1      # the firmware sends none while offline
            return
        try:
            self.client.publish0(self.base + "rt", self.model.rt(int(t)))
        except Exception:
            self.stats["rt_skipped"] += 1
            return
        self.stats["rt_sent"] += 1

    # -- link ---------------------------------------------------------------------
    def link_lost(self):
        if self.up:
            self.stats["drops"] += 1
            self.dropped_at = time.monotonic()
        self.up = False
        self.inflight = None                # its PUBACK will not come on this link
        self.lost.set()

    def _status(self, sim_t):
        return json.dumps({"online": True, "fw": FW, "board": BOARDS[self.phases],
                           "transport": "wifi", "signal": -60 - self.i % 30,
                           "queued": len(self.queue), "dropped": 0,
                           "reconnects": max(0, self.connects - 1),
                           "t": int(self.clock(sim_t))}).encode()

    def _on_message(self, client, topic, payload, qos, properties):
        if topic != self.base + "cmd":
            return 0
        try:
            req = json.loads(payload)
            rid = req.get("id")
            cmd = req.get("cmd") or json.loads(req.get("body", "{}")).get("cmd")
        except (ValueError, AttributeError):
            rid, cmd = None, None
        if cmd == "ping":
            rep = {"id": rid, "ok": True, "result": {"t": int(self.clock(self.fleet.sim_now()))}}
        else:
            rep = {"id": rid, "ok": False, "error": "unsupported",
                   "msg": "the load generator's meter answers ping only"}
        if self.up:
            client.publish(self.base + "resp", json.dumps(rep).encode(), qos=1)
        return 0

    async def _connect(self):
        f = self.fleet
        will = gmqtt.Message(self.base + "status", b'{"online": false}', qos=1, retain=True)
        c = _Client(self, self.id, clean_session=False, will_message=will)
        c.set_auth_credentials(self.id, self.password)
        c.set_config({"reconnect_retries": 0})
        c.on_message = self._on_message
        self.client = c
        await asyncio.wait_for(c.connect(f.host, f.port, keepalive=MQTT_DEFAULTS["keepalive_s"],
                                         version=MQTTv311),
                               MQTT_DEFAULTS["connect_timeout_ms"] / 1000)

    async def run(self):
        """Connect, keep connected with the firmware's backoff, and publish the queue."""
        backoff = MQTT_DEFAULTS["backoff_min_ms"]
        while not self.stopping:
            wait = self.offline_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.fleet.net_down():
                ok = False
            else:
                try:
                    self.lost.clear()
                    if self.client is None:
                        await self._connect()
                    else:
                        await asyncio.wait_for(
                            self.client.connect(self.fleet.host, self.fleet.port,
                                                keepalive=MQTT_DEFAULTS["keepalive_s"],
                                                version=MQTTv311),
                            MQTT_DEFAULTS["connect_timeout_ms"] / 1000)
                    ok = not self.lost.is_set()
                except Exception:          # refused, reset, timed out: back off, retry
                    ok = False
            if not ok:
                self.stats["connect_failures"] += 1
                j = backoff // 4
                await asyncio.sleep((backoff - j + self.rng.randint(0, 2 * j)) / 1000)
                backoff = min(backoff * 2, MQTT_DEFAULTS["backoff_max_ms"])
                continue
            backoff = MQTT_DEFAULTS["backoff_min_ms"]
            self.connects += 1
            self.stats["connects"] += 1
            self.up = True
            # what the old link may have lost: acknowledged within resend_s before the drop
            self.resend += [e for e in self.recent
                            if self.dropped_at - e[4] <= SESSION_DEFAULTS["resend_s"]]
            self.recent = []
            self.fleet.connected(self)
            try:
                self.client.publish(self.base + "status", self._status(self.fleet.sim_now()),
                                    qos=1, retain=True)
                self.client.subscribe(self.base + "cmd", qos=1)
            except Exception:
                pass
            self.inflight = None
            self.pump()
            await self.lost.wait()
            self.up = False
            self.inflight = None
            self.fleet.disconnected(self)

    # -- sending: the flash queue's head, one QoS 1 record in flight ------------------
    # No task per meter and no future or sleep per record: pump() sends what is due and
    # returns; the PUBACK (acked), the fleet's ack-timeout check (ack_timeout) and the
    # fleet's timers (the backlog pause) call it again. Same order and pacing as the
    # firmware's Session: the periodic status first, then the resend window, then the
    # queue; 1000/backlog_per_s ms after each PUBACK before the next record.
    def pump(self):
        if not self.up or self.inflight is not None or self.stopping:
            return
        c = self.client
        if self.status_due:
            # the periodic status goes first, acknowledged, as Session.publish_status
            self.status_due = False
            try:
                c.publish_acked(self.base + "status", self._status(self.fleet.sim_now()),
                                retain=True)
                self.stats["status_sent"] += 1
            except Exception:
                pass
        if self.resend:
            again, item = True, self.resend[0]
        elif self.queue:
            again, item = False, self.queue[0]
        else:
            return                          # idle: the next record calls pump()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self.next_ok:              # the backlog pause, on the fleet's timers
            self._pace(loop, self.next_ok)
            return
        try:
            mid = c.publish_acked(self.topics[item[0]], item[1])
        except Exception:
            self._pace(loop, now + 0.5)
            return
        # the PUBACK within ack_timeout_ms, else the record goes again as a new PUBLISH
        # (same seq): the fleet's one timeout check, AckTimeouts
        self.token += 1
        self.inflight = (mid, self.token, again, now)
        self.fleet.ack_timeouts.add(loop, now + SESSION_DEFAULTS["ack_timeout_ms"] / 1000,
                                    self, self.token)

    def _pace(self, loop, due):
        if not self.paced:
            self.paced = True
            self.fleet.timers.at(loop, due, self._paced)

    def _paced(self):
        self.paced = False
        self.pump()

    def acked(self, mid):
        """The broker's PUBACK for packet id mid (a status's, or a replayed packet's of
        an earlier link, is not the record in flight: nothing to do)."""
        f = self.inflight
        if f is None or f[0] != mid:
            return
        self.inflight = None
        now = asyncio.get_running_loop().time()
        self.next_ok = now + 1 / SESSION_DEFAULTS["backlog_per_s"]
        self.stats["puback_wait_ms"] += int((now - f[3]) * 1000)
        if f[2]:
            item = self.resend.pop(0)
            self.stats["resent"] += 1
        else:
            item = self.queue.popleft()
            self.stats["sent_" + QNAME[item[0]]] += 1
        self._remember(item[0], item[1], item[2], item[3])
        if self.status_due or self.resend or self.queue:
            self.pump()

    def ack_timeout(self, token):
        """No PUBACK within ack_timeout_ms: the record goes again, after 0.5 s."""
        f = self.inflight
        if f is None or f[1] != token:
            return                          # acknowledged, or its link is gone
        self.inflight = None
        self.stats["ack_timeouts"] += 1
        loop = asyncio.get_running_loop()
        self._pace(loop, loop.time() + 0.5)

    def _remember(self, qk, payload, seq, made):
        # what the broker acknowledged in the last resend_s (on flash in the firmware:
        # no byte bound)
        now = time.monotonic()
        r = self.recent
        r.append([qk, payload, seq, made, now])
        while r and now - r[0][4] > SESSION_DEFAULTS["resend_s"]:
            r.pop(0)

    # -- faults -------------------------------------------------------------------
    def cut(self, down_s, reboot=False):
        """Drop the link at once (no DISCONNECT: the broker publishes the will) and stay
        offline for down_s. reboot: RAM is lost too (the in-flight packet; the resend
        window is on flash and goes out after the reconnect)."""
        self.offline_until = time.monotonic() + down_s
        c = self.client
        if reboot:
            self.client = None              # a new client: gmqtt's in-flight store is RAM
            self.stats["reboots"] += 1
        if c is not None and c._connection is not None:
            try:
                c._connection._transport.abort()
            except Exception:
                pass
        self.link_lost()

    async def close(self):
        """Clean shutdown as comm.wiring.finish does: offline status, DISCONNECT."""
        self.stopping = True
        c = self.client
        if c is not None and self.up:
            try:
                c.publish(self.base + "status", b'{"online": false}', qos=1, retain=True)
                await asyncio.sleep(0)
                await c.disconnect()
            except Exception:
                pass
        self.up = False
        self.lost.set()
