"""The head-end's OTA service: offers releases to meters, serves their chunk requests over
MQTT (and HTTP, headend/ota_http.py), records what they report, and runs staged rollouts.

    srv = OtaServer(store, host, port, user, password).start()
    rid = push(store, srv, "var/ota/releases/0.2.0", ["m1", "m2"], stages=[50, 100],
               max_fail=0.1)                  # returns when the rollout ends or halts
    srv.stop()

Topics (docs/ota.md, docs/protocol.md): it publishes lipari/v1/<id>/ota/offer (retained,
QoS 1; an empty retained message withdraws it) and lipari/v1/<id>/ota/d (QoS 0: chunks),
and reads lipari/v1/+/ota/req and lipari/v1/+/ota/state.
"""
import json
import math
import struct
import threading
import time
import uuid

import paho.mqtt.client as paho

from headend import ota_store
from headend.ota import Release, OtaError

PREFIX = "lipari/v1"
MAX_REQ_BYTES = 16384          # one request is answered with at most this much


def publish_size(topic, payload, qos):
    """Bytes of an MQTT 3.1.1 PUBLISH packet on the wire."""
    n = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    k = 1
    while n >= 128 ** k:
        k += 1
    return 1 + k + n


class OtaServer:
    def __init__(self, store, host="127.0.0.1", port=1883, user=None, password=None,
                 client_id=None, http_base=None):
        self.store = store
        self.http_base = http_base       # e.g. http://10.0.0.5:8081: offers carry a URL
        self.releases = {}               # release dir -> Release
        self.changed = threading.Condition()
        self.stats = {"requests": 0, "chunks": 0, "chunk_bytes": 0, "wire_bytes": 0,
                      "states": 0, "bad_requests": 0}
        self.connected = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2,
                             client_id=client_id or "lipari-ota-%s" % uuid.uuid4().hex[:8])
        if user:
            self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.host, self.port = host, port

    def start(self, timeout_s=10):
        try:
            self.c.connect(self.host, self.port, 30)
        except OSError as e:
            raise OtaError("cannot reach the broker at %s:%s: %s" % (self.host, self.port, e))
        self.c.loop_start()
        if not self.connected.wait(timeout_s):
            self.stop()
            raise OtaError("no CONNACK from the broker at %s:%s within %s s (check --user/"
                           "--password)" % (self.host, self.port, timeout_s))
        return self

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()

    def _on_connect(self, c, ud, flags, rc, props=None):
        if rc.is_failure:
            return
        c.subscribe([("%s/+/ota/req" % PREFIX, 0), ("%s/+/ota/state" % PREFIX, 1)])
        self.connected.set()

    def release(self, d):
        r = self.releases.get(d)
        if r is None:
            r = self.releases[d] = Release(d)
        return r

    # -- messages -----------------------------------------------------------------------
    def _on_message(self, c, ud, msg):
        parts = msg.topic.split("/")
        if len(parts) != 5 or parts[3] != "ota":
            return
        meter = parts[2]
        # wire accounting (bench: ota_overhead_ratio): the meter's PUBLISH, and the broker's
        # PUBACK to it for a QoS 1 state message
        self.stats["wire_bytes"] += publish_size(msg.topic, msg.payload, msg.qos) + \
            (4 if msg.qos else 0)
        try:
            if parts[4] == "req":
                self._serve(meter, msg.payload)
            elif parts[4] == "state" and msg.payload:
                self._state(meter, msg.payload)
        except Exception as e:            # a bad message must not stop the service
            self.stats["bad_requests"] += 1
            self.stats["last_error"] = "%s from %s: %r" % (parts[4], meter, e)

    def _serve(self, meter, payload):
        req = json.loads(payload)
        t = ota_store.target_by_offer(self.store, str(req.get("id")))
        if t is None or t["meter_id"] != meter:
            self.stats["bad_requests"] += 1
            return
        rel = self.release(t["release_dir"])
        off, n = int(req["o"]), min(int(req["n"]), MAX_REQ_BYTES)
        if not 0 <= off < rel.total or n <= 0:
            self.stats["bad_requests"] += 1
            return
        self.stats["requests"] += 1
        topic = "%s/%s/ota/d" % (PREFIX, meter)
        tag = rel.tag()
        for o, data in rel.pieces(off, n):
            body = b"\x01" + tag + struct.pack("<I", o) + data
            self.c.publish(topic, body, qos=0)
            self.stats["chunks"] += 1
            self.stats["chunk_bytes"] += len(data)
            self.stats["wire_bytes"] += publish_size(topic, body, 0)

    def _state(self, meter, payload):
        st = json.loads(payload)
        if not isinstance(st, dict) or not isinstance(st.get("state"), str):
            raise ValueError("state message without a state")
        self.stats["states"] += 1
        ota_store.record_state(self.store, meter, st)
        if st.get("id"):
            t = ota_store.target_by_offer(self.store, st["id"])
            if t is not None and t["meter_id"] == meter:
                ota_store.set_target(self.store, st["id"], st["state"], st.get("reason"),
                                     st.get("done"), st.get("total"))
        with self.changed:
            self.changed.notify_all()

    # -- offering ---------------------------------------------------------------------------
    def offer_body(self, meter, offer_id, rel):
        url = "%s/ota/%s/image.bin" % (self.http_base, rel.version) if self.http_base else None
        return "%s/%s/ota/offer" % (PREFIX, meter), rel.offer(offer_id, url)

    def offer(self, meter, offer_id, rel):
        topic, body = self.offer_body(meter, offer_id, rel)
        info = self.c.publish(topic, body, qos=1, retain=True)
        info.wait_for_publish(10)
        self.stats["wire_bytes"] += publish_size(topic, body, 1) + 4     # to the meter, PUBACK

    def withdraw(self, meter):
        info = self.c.publish("%s/%s/ota/offer" % (PREFIX, meter), b"", qos=1, retain=True)
        info.wait_for_publish(10)

    def wait_change(self, timeout_s):
        with self.changed:
            self.changed.wait(timeout_s)


def stage_sizes(n, stages):
    """Cumulative shares in percent -> the number of meters in each stage."""
    out, prev = [], 0
    for s in stages:
        upto = min(n, max(prev + (1 if n > prev else 0), math.ceil(n * s / 100.0)))
        out.append(upto - prev)
        prev = upto
    if prev < n:
        out[-1] += n - prev
    return out


def push(store, srv, release_dir, meters, stages=(100,), max_fail=0.0, stage_timeout_s=3600,
         by_user=None, log=print, rid=None):
    """Offer a release to meters in stages (cumulative percent of the list); after each
    stage (and whenever a result comes in) the share of failures among the meters offered
    so far is compared with max_fail: above it, the rollout halts: nobody else is
    offered the release, and the offers not yet taken are withdrawn.
    Returns the rollout id; its state is done or halted (ota_store.rollout)."""
    if not meters:
        raise OtaError("no meters to update")
    if list(stages) != sorted(stages) or not 0 < stages[-1] <= 100:
        raise OtaError("stages are cumulative percentages, increasing, ending at 100")
    rel = srv.release(release_dir)
    # every offer must fit a meter's receive buffer (OtaError otherwise): checked before
    # the rollout exists, with the longest offer id it will use
    srv.offer_body(max(meters, key=len), "r%d.%s" % (10 ** 9, max(meters, key=len)), rel)
    if rid is None:
        rid = ota_store.new_rollout(store, rel.version, release_dir, list(stages), max_fail,
                                    by_user)
    sizes = stage_sizes(len(meters), stages)
    offered = []
    start = 0
    for k, size in enumerate(sizes):
        batch = meters[start:start + size]
        start += size
        for m in batch:
            oid = "r%d.%s" % (rid, m)
            ota_store.add_target(store, rid, m, k, oid)
            srv.offer(m, oid, rel)
            ota_store.set_target(store, oid, "offered")
            offered.append((m, oid))
        log("rollout %d stage %d: offered %s %s to %s" % (rid, k + 1, rel.version,
                                                           rel.dir, ", ".join(batch)))
        t_end = time.monotonic() + stage_timeout_s
        withdrawn = set()
        while True:
            ts = {t["offer_id"]: t for t in ota_store.rollout(store, rid)["targets"]}
            for m, oid in offered:
                if ts[oid]["outcome"] and oid not in withdrawn:
                    srv.withdraw(m)
                    withdrawn.add(oid)
                    log("  %s: %s%s" % (m, ts[oid]["state"], (" (%s)" % ts[oid]["reason"])
                                       if ts[oid]["reason"] else ""))
            fails = sum(1 for _, oid in offered if ts[oid]["outcome"] == "failed")
            if fails > max_fail * len(offered):
                for m, oid in offered:
                    if not ts[oid]["outcome"]:
                        srv.withdraw(m)
                        ota_store.set_target(store, oid, "withdrawn", "rollout halted",
                                             final="failed")
                why = "%d of %d meters failed (limit %.0f %%)" % (fails, len(offered),
                                                                 100 * max_fail)
                ota_store.set_rollout(store, rid, "halted", why)
                log("rollout %d halted: %s" % (rid, why))
                return rid
            if all(ts[oid]["outcome"] for _, oid in offered):
                break
            if time.monotonic() > t_end:
                for m, oid in offered:
                    if not ts[oid]["outcome"]:
                        srv.withdraw(m)
                        ota_store.set_target(store, oid, "timeout", "no result within %d s"
                                             % stage_timeout_s, final="failed")
                continue                  # counted as failures above
            srv.wait_change(1.0)
    ota_store.set_rollout(store, rid, "done")
    log("rollout %d done" % rid)
    return rid
