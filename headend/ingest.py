"""`lipari headend`: take meters' MQTT traffic into the database, exactly once.

Each QoS 1 message is acknowledged to the broker only after the database committed it
(gmqtt with its PUBACK held until the commit, persistent session; docs/decisions/
0011-ingest-on-gmqtt.md), and interval/event records are unique
on (meter, sequence number), so a redelivered record is stored once. Several workers can
share the load: they join the same shared subscription ($share/<group>/...). Payloads that
cannot be decoded go to the quarantine table with the reason; ingest goes on.

    lipari headend --host 127.0.0.1 --port 1883 --user headend --password ... \
                   --db sqlite:///var/lipari.db
"""
import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import socket
import ssl
import struct
import sys
import threading
import time

import gmqtt
import gmqtt.mqtt.handler
from gmqtt.mqtt.connection import MQTTConnection
from gmqtt.mqtt.constants import MQTTv311
from gmqtt.mqtt.protocol import BaseMQTTProtocol, MQTTProtocol

from headend.codec import DecodeError, decode, interval_row, rt_row
from headend.store import Store, StoreError

log = logging.getLogger("lipari.ingest")
PREFIX = "lipari/v1"
_ROOT, _VER = PREFIX.split("/")
RECORD_KINDS = ("interval", "event", "rt")
_PUBACK = struct.Struct("!BBH")         # MQTT 3.1.1 PUBACK: 0x40, remaining length 2, id
CONNECT_TIMEOUT_S = 10


def new_loop():
    """An asyncio event loop on uvloop (libuv; pinned in requirements.txt, uvicorn's loop)
    when it is there, else the default one. Receiving thousands of MQTT messages a second
    is mostly event-loop work (socket reads, callbacks, timers), which uvloop does in C;
    the packets are gmqtt's either way."""
    try:
        import uvloop
    except ImportError:                     # pragma: no cover (pinned)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class IngestError(Exception):
    """Ingest cannot run; the message says what to fix."""


class DirectProtocol(MQTTProtocol):
    """gmqtt's protocol without its StreamReader and read-loop task: the packets of each
    socket read are parsed (gmqtt's own _read_packet) and handled in data_received. Per
    read that saves a future, a task step and a copy of the buffer: at a trickle (the
    fleet mix: a few messages per read) that is per message. The bytes and the handling
    are gmqtt's; the load generator's meters use it too (headend/loadtest_meter.py)."""

    def connection_made(self, transport):
        BaseMQTTProtocol.connection_made(self, transport)
        self._buf = b""

    def data_received(self, data):
        buf = self._buf + data if self._buf else data
        n = self._read_packet(buf)
        if n == -1:                         # a malformed length: as gmqtt, drop the link
            self._transport.close()
            return
        self._buf = buf[n:] if n < len(buf) else b""

    def eof_received(self):
        # the broker closed the link (a killed broker's sockets send FIN): close ours, as
        # gmqtt's read loop does on an empty read. StreamReaderProtocol's answer (True)
        # would keep the link half open until a write failed or the keepalive ran out
        return False


class DirectClient(gmqtt.Client):
    """gmqtt.Client whose connections use `protocol` (DirectProtocol)."""
    protocol = DirectProtocol

    async def _create_connection(self, host, port, ssl, clean_session, keepalive):
        # gmqtt 0.8.0's Client._create_connection and MQTTConnection.create_connection
        # (pinned), with our protocol class
        self._exit_reconnecting_state()
        self._package_handler.clear_topics_aliases()
        self._connack_received.clear()
        self._connection_lost.clear()
        factory = functools.partial(self.protocol, connection_state=self._connection_state,
                                    id_generator=self._package_handler.id_generator)
        transport, protocol = await asyncio.get_running_loop().create_connection(
            factory, host, port, ssl=ssl)
        return MQTTConnection(transport, protocol, clean_session, keepalive,
                              package_handler=self._package_handler, logger=self._logger)


class _Client(DirectClient):
    """gmqtt (on DirectProtocol) with the two things ingest needs that it leaves to its user:
    - a QoS 1 PUBLISH is handed over with its packet id and NOT acknowledged: the ingest
      sends the PUBACK after the commit (acks()). gmqtt 0.8.0 either acknowledges on
      arrival or, at MQTT 5 only, runs one asyncio task per message and acknowledges when
      it ends; its per-message QoS 1 hook is replaced instead (docs/decisions/0011);
    - reconnects with a delay doubling from min_s to max_s (gmqtt's own delay is fixed)."""

    def __init__(self, client_id, on_qos1, reconnect_s):
        super().__init__(client_id, clean_session=False)
        self.reconnect_s = reconnect_s
        # the handler looks its per-QoS method up on itself: the instance attribute wins
        self._package_handler._handle_qos_1_publish_packet = on_qos1
        self._on_qos1 = on_qos1
        self._package_handler._handle_publish_packet = self._publish_packet

    def _publish_packet(self, cmd, raw):
        """gmqtt's _handle_publish_packet for MQTT 3.1.1 QoS 0 and 1 (what the ingest
        subscribes with; no properties, no topic aliases), without its three struct format
        strings, its properties dict and its debug line per message: topic, packet id and
        payload sliced as gmqtt slices them, then the same hand-over (on_qos1, or
        on_message for QoS 0). Anything else goes to gmqtt's own."""
        qos = (cmd >> 1) & 3
        n = len(raw)
        if qos > 1 or n < 2 or self._connection_state.protocol_version != MQTTv311:
            return gmqtt.mqtt.handler.MqttPackageHandler._handle_publish_packet(
                self._package_handler, cmd, raw)
        end = 2 + (raw[0] << 8 | raw[1])
        if end + (2 if qos else 0) > n:
            log.warning("ingest: a PUBLISH shorter than its topic length; skipped")
            return
        topic = raw[2:end]
        if not topic:
            log.warning("ingest: a PUBLISH without a topic; skipped")
            return
        try:
            topic = topic.decode("utf-8")
        except UnicodeDecodeError:         # handed over as bytes, as gmqtt does
            pass
        props = {"dup": (cmd & 0x08) >> 3, "retain": cmd & 0x01}
        if qos:
            self._on_qos1(raw[end] << 8 | raw[end + 1], raw[end + 2:], topic, props)
        else:
            self.on_message(topic, raw[end:], 0, props)    # partial(callback, client)

    def acks(self, mids):
        """PUBACK each packet id, in one write; False if there is no live connection (the
        broker then redelivers them after the reconnect)."""
        conn = self._connection
        if conn is None or conn.is_closing() or not self._connack_received.is_set():
            return False
        conn.send_package(b"".join([_PUBACK.pack(0x40, 2, m) for m in mids]))
        return True

    async def reconnect(self, delay=False):
        lo, hi = self.reconnect_s
        n = min(self._connection_state.failed_connections, 16)
        self.set_config({"reconnect_delay": min(hi, lo * 2 ** n)})
        await super().reconnect(delay)


class Ingest:
    def __init__(self, store, host="127.0.0.1", port=1883, user=None, password=None,
                 client_id=None, group="lipari", tls_ca=None, keepalive_s=30,
                 db_retry_s=30, anchor=False, group_commit=True, commit_log=None,
                 reconnect_s=(1, 30)):
        """anchor: also subscribe without sharing (this worker then gets every interval
        and event; the database drops the copies). Mosquitto 2.0 does not restore shared
        subscriptions after a restart, so what meters send before a worker re-subscribes
        would be lost; an anchor's plain persistent subscription is restored and keeps it.
        Run exactly one anchor worker (docs/protocol.md, "Broker").
        group_commit: a writer thread commits whatever arrived while the previous commit
        was on disk, then acknowledges those messages (batches grow with the load; a
        message waits for at most one commit). False: commit each message in the MQTT
        thread.
        reconnect_s: (first, longest) delay between reconnect attempts, doubling.
        commit_log: a file (path or open text file) that gets one line per commit:
        `<received stamp> <commit time> <stored> <duplicate> <rt> <other> <cpu s>` (epoch
        s; cpu: this process's CPU time at the commit). The rows of that commit carry the
        stamp in `received`; `lipari loadtest` maps them to their commit time with it, the
        benches read the CPU per record off it."""
        self.anchor = anchor
        self.group_commit = group_commit
        self._pending = []                 # (topic, payload, packet id or None) received,
        self._plock = threading.Lock()     # not yet committed
        self._inbox = []                   # the same, received by the loop thread and not
        #                                    yet handed to _pending (_hand_over)
        self._gen = 0                      # connection generation: a PUBACK is only sent
        #                                    on the connection its PUBLISH came on
        self._wake = threading.Event()
        self._flock = threading.Lock()     # one flush at a time (its rollback is global)
        self._stop = threading.Event()
        self.store = store
        self.host, self.port = host, port
        self.group = group
        self.db_retry_s = db_retry_s
        self.counts = {"stored": 0, "duplicate": 0, "quarantined": 0, "status": 0, "rt": 0,
                       "ignored": 0, "db_errors": 0, "commits": 0}
        self.connected = threading.Event()
        self.failed = None
        if isinstance(commit_log, str):
            commit_log = open(commit_log, "a", buffering=1)
        self.commit_log = commit_log
        self.client_id = client_id or "lipari-ingest-%s" % socket.gethostname()
        self.tls_ca = tls_ca
        self.user, self.password = user, password
        # MQTT 3.1.1, persistent session. Not MQTT 5: Mosquitto would send the anchor one
        # copy per matching subscription. How many unacknowledged messages the broker sends
        # a worker (so the largest commit group) is the broker's max_inflight_messages
        # (conf/mosquitto: 1000).
        self.c = _Client(self.client_id, self._on_qos1, reconnect_s)
        if user:
            self.c.set_auth_credentials(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message     # QoS 0 (nothing to acknowledge)
        self.keepalive_s = keepalive_s
        self._loop = None
        self._thread = None

    # -- MQTT ----------------------------------------------------------------------------
    # (these run in the MQTT thread, on its asyncio loop)
    def _on_connect(self, c, session_present, rc, props=None):
        subs = [("$share/%s/%s/+/%s" % (self.group, PREFIX, k)) for k in RECORD_KINDS]
        # status is retained: a plain subscription gets the current state of every meter
        subs.append("%s/+/status" % PREFIX)
        if self.anchor:
            subs += ["%s/+/%s" % (PREFIX, k) for k in ("interval", "event")]
        c.subscribe([gmqtt.Subscription(t, qos=1) for t in subs])
        self.connected.set()
        log.info("ingest connected to %s:%s (session present: %s)", self.host, self.port,
                 bool(session_present))

    def _on_disconnect(self, c, packet=None, exc=None):
        self.connected.clear()
        with self._plock:                  # not committed, not acknowledged: the broker
            self._pending = []             # redelivers them after the reconnect
            self._inbox = []
            self._gen += 1
        if not self._stop.is_set():
            log.warning("ingest lost the broker; reconnecting")

    # gmqtt hands over the packets of one socket read one after the other without
    # returning to the loop: they are collected in _inbox (this thread only, no lock) and
    # handed to the writer at once by one callback the loop runs after them (one lock
    # and one wake-up per read instead of per message).
    def _on_qos1(self, mid, payload, topic, properties):
        inbox = self._inbox
        inbox.append((topic, payload, mid))
        if len(inbox) == 1:
            self._loop.call_soon(self._hand_over)

    def _on_message(self, c, topic, payload, qos, properties):
        self._on_qos1(None, payload, topic, properties)
        return 0

    def _hand_over(self):
        # the loop thread, as _on_disconnect: a disconnect in between emptied the inbox
        inbox, self._inbox = self._inbox, []
        if inbox:
            self._received_many(inbox)

    def _received(self, topic, payload, mid):
        """One message received (any thread)."""
        self._received_many([(topic, payload, mid)])

    def _received_many(self, msgs):
        with self._plock:
            self._pending += msgs
        if not self.group_commit:
            self._flush()
        elif not self._wake.is_set():      # set() takes a lock and notifies: once a group
            self._wake.set()

    def _send_acks(self, gen, mids):
        # the loop thread: the generation cannot change under it
        if gen == self._gen:
            self.c.acks(mids)

    # A commit costs the same CPU whether it holds 50 messages or 1,000 (the WAL pages of
    # the indexes and the meters table it touched are written once per commit): at a
    # fleet's 8,000 messages/s, committing each few hundred as soon as the last commit
    # was done cost ~24 us a message against ~8 at 1,000 (docs/benchmarks.md). So a
    # commit waits until GROUP_MIN messages are there or COMMIT_GAP_S passed since the
    # last one; a message waits at most that long more, and nothing is acknowledged before
    # its commit either way.
    COMMIT_GAP_S = 0.05
    GROUP_MIN = 1000

    def _writer(self):
        last = 0.0
        while not self._stop.is_set():
            if self._wake.wait(0.2):
                wait = last + self.COMMIT_GAP_S - time.monotonic()
                if wait > 0 and len(self._pending) < self.GROUP_MIN:
                    self._stop.wait(wait)
                self._wake.clear()
                last = time.monotonic()
                try:
                    self._flush()
                except Exception:          # a bug here must not stop ingest silently
                    log.exception("ingest writer")

    def _flush(self):
        """Store the pending messages, commit, then acknowledge them (never before)."""
        with self._flock:
            with self._plock:
                batch, self._pending = self._pending, []
                gen = self._gen
            if not batch:
                return
            t0 = time.monotonic()
            while True:
                try:
                    outcomes, stamp = self._write(batch)
                    self.store.commit()
                    t_commit = time.time()
                    break
                except Exception as e:      # the database, not the messages
                    self.counts["db_errors"] += 1
                    try:
                        self.store.rollback()
                    except Exception:
                        pass
                    if time.monotonic() - t0 >= self.db_retry_s:
                        self.failed = "database unavailable: %r" % (e,)
                        log.error("%s; stopping without acknowledging %d messages",
                                  self.failed, len(batch))
                        self._disconnect()
                        return
                    log.warning("database error: %r; retrying", e)
                    time.sleep(1)
            for k, n in outcomes.items():
                self.counts[k] += n
            self.counts["commits"] += 1
            mids = [m[2] for m in batch if m[2] is not None]
            if mids and self._loop is not None:  # only now: the records are committed
                self._loop.call_soon_threadsafe(self._send_acks, gen, mids)
            if self.commit_log is not None:
                o = outcomes
                self.commit_log.write("%.6f %.6f %d %d %d %d %.4f\n" % (
                    stamp, t_commit, o["stored"], o["duplicate"], o["rt"],
                    sum(o.values()) - o["stored"] - o["duplicate"] - o["rt"],
                    time.process_time()))

    # -- the work --------------------------------------------------------------------------
    def handle(self, topic, payload, commit=True):
        """Decode and store one message (and commit, unless commit=False). Returns the
        outcome: stored, duplicate, quarantined, status, rt, ignored. Raises only for
        database errors."""
        outcomes, _ = self._write([(topic, payload, None)])
        if commit:
            self.store.commit()
        return next(k for k, n in outcomes.items() if n)

    def _write(self, msgs):
        """Decode a group of (topic, payload, packet id) and write it, one statement per
        table.
        Returns ({outcome: count}, the group's received stamp); nothing is committed."""
        out = dict.fromkeys(("stored", "duplicate", "quarantined", "status", "rt", "ignored"), 0)
        ivs, evs, rts = [], [], []
        add_iv = ivs.append
        for topic, payload, _ in msgs:
            if type(topic) is not str:     # gmqtt hands a topic that is not UTF-8 over as
                topic = topic.decode("utf-8", "replace")   # bytes (Mosquitto refuses them)
            parts = topic.split("/")
            if len(parts) != 4 or parts[0] != _ROOT or parts[1] != _VER:
                out["ignored"] += 1
                continue
            meter, kind = parts[2], parts[3]
            if kind == "interval":         # most messages: their columns, no record dict
                try:
                    add_iv((meter, interval_row(payload), bytes(payload)))
                except DecodeError as e:
                    self._quarantine(topic, payload, e, out)
                continue
            if kind == "rt":               # stored as its payload: (t, p_w) of it only
                try:
                    rts.append((meter,) + rt_row(payload) + (bytes(payload),))
                except DecodeError as e:
                    self._quarantine(topic, payload, e, out)
                continue
            if kind == "status":
                out[self._status(topic, meter, payload)] += 1
                continue
            if kind not in RECORD_KINDS:
                out["ignored"] += 1
                continue
            try:
                kind, rec = decode(payload, expect=kind)
            except DecodeError as e:
                self._quarantine(topic, payload, e, out)
                continue
            evs.append((meter, rec["seq"], rec))
        stamp = time.time()
        new = (self.store.add_interval_rows(ivs, stamp)
               + self.store.add_events(evs, stamp))
        self.store.add_rt_rows(rts, stamp)
        out["stored"] += new
        out["duplicate"] += len(ivs) + len(evs) - new
        out["rt"] += len(rts)
        return out, stamp

    def _quarantine(self, topic, payload, err, out):
        self.store.quarantine(topic, payload, str(err))
        log.warning("quarantined %s: %s", topic, err)
        out["quarantined"] += 1

    def _status(self, topic, meter, payload):
        try:
            st = json.loads(bytes(payload).decode())
            if not isinstance(st, dict):
                raise ValueError("status is not a JSON object")
        except (ValueError, UnicodeError) as e:
            self.store.quarantine(topic, payload, "bad status: %s" % e)
            return "quarantined"
        self.store.set_status(meter, st)
        return "status"

    def start(self):
        """Connect (IngestError if the broker cannot be reached or refuses) and run the
        MQTT loop in a background thread."""
        self._loop = new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ingest-mqtt",
                                        daemon=True)
        self._thread.start()
        ctx = ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else False
        try:
            asyncio.run_coroutine_threadsafe(
                self.c.connect(self.host, self.port, ssl=ctx, keepalive=self.keepalive_s,
                               version=MQTTv311), self._loop).result(CONNECT_TIMEOUT_S)
        except Exception as e:
            self._stop_loop()
            if isinstance(e, OSError):
                raise IngestError("cannot reach the broker at %s:%s: %s (is it running? "
                                  "check --host/--port)" % (self.host, self.port, e))
            raise IngestError("broker at %s:%s refused ingest: %r (check --user/--password "
                              "and the ACL)" % (self.host, self.port, e))
        if self.group_commit:
            threading.Thread(target=self._writer, name="ingest-writer", daemon=True).start()
        return self

    def _disconnect(self):
        """Leave the broker (from any thread; does not wait)."""
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.c.disconnect(), self._loop)

    def _stop_loop(self):
        if self._loop is not None and self._loop.is_running():
            # tasks still pending (gmqtt's reconnect while the broker is away) are
            # cancelled and awaited first: a stopped loop that still holds them prints
            # "Task was destroyed but it is pending" when they are collected
            try:
                asyncio.run_coroutine_threadsafe(_cancel_others(), self._loop).result(5)
            except Exception as e:
                log.info("ingest stop: tasks left: %r", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def stop(self):
        self._stop.set()
        self._flush()                      # commit and acknowledge what is here
        if self._loop is not None and self._loop.is_running():
            try:                           # the PUBACKs queued above go out first
                asyncio.run_coroutine_threadsafe(self.c.disconnect(),
                                                 self._loop).result(5)
            except Exception as e:         # already gone: nothing left to tell the broker
                log.info("ingest disconnect: %r", e)
        self._stop_loop()
        if self.commit_log is not None:
            self.commit_log.flush()


async def _cancel_others():
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _open_store(url, **kw):
    # PostgreSQL (headend/store_pg.py) for postgresql:// URLs, SQLite otherwise
    if url.startswith(("postgres://", "postgresql://")):
        from headend.store_pg import open_store
        return open_store(url, **kw)
    return Store(url, **kw)


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari headend", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=os.environ.get("LIPARI_MQTT_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("LIPARI_MQTT_PORT", 1883)))
    p.add_argument("--user", default=os.environ.get("LIPARI_MQTT_USER"),
                   help="broker user (the shipped ACL calls it headend)")
    p.add_argument("--password", default=os.environ.get("LIPARI_MQTT_PASSWORD"),
                   help="broker password (better: LIPARI_MQTT_PASSWORD in the environment)")
    p.add_argument("--db", default=os.environ.get("LIPARI_DB", "sqlite:///var/lipari.db"),
                   help="sqlite:///path.db or postgresql://user:pw@host/db")
    p.add_argument("--group", default="lipari", help="shared subscription group")
    p.add_argument("--client-id", default=None,
                   help="unique per worker and stable across restarts (persistent session)")
    p.add_argument("--tls-ca", default=None, help="CA file: connect with TLS")
    p.add_argument("--no-anchor", action="store_true", help="only the shared subscription "
                   "(run exactly one worker without this flag: it keeps what arrives while "
                   "a restarted broker has no shared subscribers)")
    p.add_argument("--rt-min-s", type=int, default=0, help="store at most one live reading "
                   "per meter per this many seconds")
    p.add_argument("--commit-log", default=None, help="append one line per commit (received "
                   "stamp, commit time, counts) to this file; lipari loadtest reads it")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        store = _open_store(a.db, rt_min_s=a.rt_min_s)
        ing = Ingest(store, a.host, a.port, a.user, a.password, a.client_id, a.group, a.tls_ca,
                     anchor=not a.no_anchor, commit_log=a.commit_log)
        ing.start()
    except (StoreError, IngestError) as e:
        print("lipari headend: %s" % e, file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("lipari headend: ingesting from %s:%d into %s" % (a.host, a.port, a.db), flush=True)
    try:
        while not stop.wait(1):
            if ing.failed:
                print("lipari headend: %s" % ing.failed, file=sys.stderr)
                return 3
    except KeyboardInterrupt:
        pass
    finally:
        ing.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
