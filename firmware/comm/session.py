# The meter's MQTT session: wires a Meter's sinks to the broker (docs/protocol.md).
#
#   s = Session("m1", {"host": ..., "user": "m1", "password": ...}, transport.connect,
#               FlashQueue(fs + "/q"), info={"fw": "0.1", "board": board.NAME})
#   s.attach(meter, key=cmd_key, state_path=fs + "/cmdctr")   # sinks + commands
#   asyncio.create_task(s.run())
#
# Interval and event records go to the flash queue inside the sink (durable before the
# sink returns) and are sent oldest first, rate-limited; the queue moves past a record at
# its PUBACK and keeps it resend_s more, sent again after a reconnect (fqueue.rewind()).
# Live readings keep only the latest one and are sent with QoS 0 at most every rt_s of the meter's
# clock (the record's own time), like everything else the meter times. Commands are answered on
# .../resp. Nothing here blocks: each task waits with a deadline.
try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio

import gc
import json
import time

from comm import codec
from util import (unload as _unload, merge, sleep_ms as _sleep_ms, wait_event as _wait,
                  ticks_ms as _ticks, ticks_diff as _diff)
from comm.mqtt import MQTTClient, MqttError

DEFAULTS = (
    ("prefix", "lipari/v1"),
    ("payload", "bin"),           # interval/event/rt payload format: "bin" or "json"
    ("rt_s", 10),                 # live reading period (meter clock), 0 = off
    ("backlog_per_s", 5),         # queued records per second after an outage
    ("ack_timeout_ms", 15000),    # wait for a PUBACK before trying the record again
    ("status_s", 3600),           # republish the retained status this often (meter clock)
    ("ha_discovery", False),      # Home Assistant MQTT discovery (rt then goes as JSON)
    ("ha_prefix", "homeassistant"),
    ("cmd_queue", 4),             # commands waiting to be handled; more are dropped
    ("resend_s", 10),             # records acknowledged this recently are sent again after
                                  # a reconnect (kept in the flash queue: fqueue hold_ms)
    ("hold_records", 16),         # records kept in RAM while the flash queue fails
)


# Keys older firmware had: a stored config that still holds one is not refused (a meter
# must boot after an update); the key is ignored and said so (Session.retired).
RETIRED = ("resend_bytes",)       # the resend window's RAM bound (flash now: 0016)


# The session is misconfigured; the message says which setting to fix. A ValueError, no
# class of its own (~100 bytes of heap for the meter's lifetime; docs/ram.md).
SessionError = ValueError


def _valid_id(s):
    if not isinstance(s, str) or not 1 <= len(s) <= 32:
        return False
    for ch in s:
        if not (ch.isalpha() or ch.isdigit() or ch in "-_"):
            return False
    return True


# Settings the session applies itself (set over the cmd topic); also passed on to the
# meter's config_set, when it has one, so that it can persist them.
SESSION_SETTINGS = ("rt_s", "payload", "ha_discovery", "backlog_per_s")


class _MeterView:
    """What comm.commands sees: the meter, with the session's own settings routed here."""

    def __init__(self, session, meter):
        self._s = session
        self._m = meter

    def __getattr__(self, name):
        return getattr(self._m, name)

    def config_get(self):
        f = getattr(self._m, "config_get", None)
        d = f() if f else {}
        for k in SESSION_SETTINGS:
            d[k] = self._s.cfg[k]
        tr = getattr(self._s, "transport", None)
        if tr is not None:
            d["transport"] = tr()
        return d

    def config_set(self, key, value):
        if key == "transport":
            # the uplink's priority order: applied by the session's transport Selector
            f = getattr(self._s, "set_transport", None)
            if f is None:
                raise ValueError("this meter's uplink is fixed")
            return f(value)
        if key not in SESSION_SETTINGS:
            return self._m.config_set(key, value)
        f = getattr(self._m, "config_set", None)
        if f is not None:
            try:
                f(key, value)
            except ValueError:
                pass                    # the meter does not keep this one: fine
        self._s.cfg[key] = value
        if key == "ha_discovery" and value:
            self._s._ha_done = False    # announced at the next connect


def _drop_commands():
    # comm.commands is loaded per command (Session.commands): forget it, the package's
    # attribute too, so that its functions and tables are freed
    _unload("comm.commands")


class Session:
    def __init__(self, meter_id, mqtt_cfg, connect, queue, cfg=None, info=None, clock=None):
        if not _valid_id(meter_id):
            raise SessionError("meter id %r: use 1..32 letters, digits, '-' or '_' (it is "
                               "also the MQTT user name the broker's ACL checks)" % (meter_id,))
        self.retired = [k for k in RETIRED if cfg and k in cfg]
        if self.retired:
            cfg = dict(cfg)
            for k in self.retired:
                del cfg[k]
                print('{"type": "info", "msg": "session config: %s is no longer used '
                      '(firmware %s); ignored"}' % (k, (info or {}).get("fw")))
        c = merge("session config", DEFAULTS, cfg)
        if c["payload"] not in ("bin", "json"):
            raise SessionError("payload must be 'bin' or 'json'")
        self.cfg = c
        self.id = meter_id
        self.base = "%s/%s/" % (c["prefix"], meter_id)
        self.info = dict(info or {})
        self.clock = clock
        self.queue = queue
        # A broker that crashes loses what it acknowledged since its last save
        # (Mosquitto: autosave_interval, docs/protocol.md): the queue keeps acknowledged
        # records for resend_s and the publisher rewinds to them after a reconnect (same
        # seq: the head-end stores them once).
        queue.hold_ms = c["resend_s"] * 1000
        self._cmd = None               # (meter view, key, state path, clock, kept state)
        self._cmd_obj = None           # a commands object given in place of comm.commands
        self.meter = None
        self._rt = None
        self._cmds = []
        self._wake = asyncio.Event()
        self._rt_wake = asyncio.Event()
        self._cmd_wake = asyncio.Event()
        self._status_dirty = True
        self._ha_done = False
        self._again = 0                # records rewound at the last reconnect, not resent yet
        self.topics = {}               # extra topic suffix -> (qos, handler): add_topic()
        self.beats = 0                  # publisher loop turns (the watchdog's sign of life)
        self.stats = {"queued": 0, "sent": 0, "encode_errors": 0, "cmd_dropped": 0,
                      "rt_sent": 0, "queue_errors": 0, "resent": 0, "held_dropped": 0,
                      "task_errors": 0}
        self._held = []                # (kind, payload) the flash queue could not take
        self._q_error = None           # a failure not yet raised as a queue_error event
        self._q_failing = False        # the last attempt to store on flash failed
        self._held_retry = _ticks()
        m = dict(mqtt_cfg)
        m["client_id"] = meter_id
        m.setdefault("user", meter_id)
        m["will"] = (self.base + "status", json.dumps({"online": False}).encode(), 1, True)
        m["cmd_topic"] = self.base + "cmd"     # sizes the client's resting receive buffer
        self.client = MQTTClient(m, connect, on_message=self._on_message,
                                 on_connect=self._on_connect)

    def add_topic(self, suffix, qos, handler):
        """Subscribe to <base><suffix> at every connect; handler(payload) gets its
        messages (payload None when oversized). Used by the OTA agent (ota/agent.py)."""
        self.topics[self.base + suffix] = (qos, handler)

    # -- wiring ----------------------------------------------------------------------
    def attach(self, meter, key=None, state_path=None, add_sink=True):
        """Listen to meter.sinks and answer commands with comm.commands.Commands.
        add_sink=False when session.sink was already given to the meter at boot (so that
        the events the meter raises while booting - boot, power_restore - are sent too)."""
        from comm.commands import state
        self.meter = meter
        if add_sink and self.sink not in meter.sinks:
            meter.sinks.append(self.sink)
        self._cmd = (_MeterView(self, meter), key, state_path, self.clock, state())
        _drop_commands()
        ev = getattr(meter, "event", None)
        if ev is not None:
            for k in self.retired:       # the head-end sees the stale stored config too
                ev("config_ignored", 0, k)
        return self

    @property
    def commands(self):
        """A comm.commands.Commands over the session's kept state (counter, redelivery
        cache, stats), or None before attach(). The module is imported for it; the
        command task drops it again after each command: between two commands the meter
        holds its state, not its ~1.6 KiB of functions and tables (docs/ram.md)."""
        if self._cmd_obj is not None:
            return self._cmd_obj
        if self._cmd is None:
            return None
        from comm.commands import Commands
        v, key, path, clock, kept = self._cmd
        return Commands(v, key=key, state_path=path, clock=clock, kept=kept)

    @commands.setter
    def commands(self, obj):
        self._cmd_obj = obj

    def sink(self, kind, rec):
        """Meter sink: interval/event -> flash queue (durable on return); rt -> latest."""
        if kind == "rt":
            self._rt = rec
            self._rt_wake.set()
            return
        # flash queue record kinds: 1 interval, 2 event
        qk = 1 if kind == "interval" else (2 if kind == "event" else None)
        if qk is None:
            return
        try:
            payload = codec.encode(kind, rec, self.cfg["payload"])
        except codec.CodecError:
            # never lose a billing record to a codec limit: JSON carries anything
            self.stats["encode_errors"] += 1
            try:
                payload = codec.encode(kind, rec, "json")
            except codec.CodecError:
                return
        self._store(qk, payload)

    def _store(self, qk, payload):
        # Flash first (the queue retries a few times itself). When it still fails, the
        # record is never dropped silently: it waits in RAM (bounded, oldest dropped and
        # counted), the status says so (q_errors, held), the publisher raises a
        # queue_error event, retries the flash and, while the flash fails, sends the
        # held records straight from RAM. Held records keep their order: once one is
        # held, the ones after it are held too until the flash takes them again.
        held = self._held
        if not held:
            before = self.queue.dropped + self.queue.early
            try:
                self.queue.append(qk, payload)
            except Exception as e:
                self.stats["queue_errors"] += 1
                if not self._q_failing:      # one event per failure episode
                    self._q_failing = True
                    self._q_error = e
                self._status_dirty = True
            else:
                self._q_failing = False
                self.stats["queued"] += 1
                if self.queue.dropped + self.queue.early != before:
                    self._status_dirty = True
                self._wake.set()
                return
        if len(held) >= self.cfg["hold_records"]:
            held.pop(0)
            self.stats["held_dropped"] += 1
        held.append((qk, payload))
        self._wake.set()

    def _flush_held(self):
        """Put RAM-held records on flash, oldest first, at most every 5 s."""
        if not self._held or _diff(_ticks(), self._held_retry) < 5000:
            return
        self._held_retry = _ticks()
        while self._held:
            qk, payload = self._held[0]
            try:
                self.queue.append(qk, payload)
            except Exception:
                return
            self._held.pop(0)
            self._q_failing = False
            self.stats["queued"] += 1
        self._status_dirty = True

    def _raise_queue_error(self):
        e = self._q_error
        self._q_error = None
        cause = getattr(self.queue, "last_error", None)   # what the flash said
        if isinstance(cause, (OSError, MemoryError)):
            e = cause
        ev = getattr(self.meter, "event", None)
        if ev is not None:
            code = 12 if isinstance(e, MemoryError) else (e.args[0] if isinstance(e, OSError)
                                                           and e.args else 0)
            ev("queue_error", 0, code if isinstance(code, int) else 0)

    # -- MQTT callbacks ----------------------------------------------------------------
    def _on_message(self, topic, payload, dup):
        if topic != self.base + "cmd":
            t = self.topics.get(topic)
            if t is not None:
                t[1](payload)
            return
        if len(self._cmds) >= self.cfg["cmd_queue"]:
            self._cmds.pop(0)
            self.stats["cmd_dropped"] += 1
        self._cmds.append(payload if payload is not None else
                          (None, self.client.oversized_head))
        self._cmd_wake.set()

    async def _on_connect(self, session_present):
        try:
            await self.publish_status()
            await self.client.subscribe(self.base + "cmd", 1)
            for topic in self.topics:
                await self.client.subscribe(topic, self.topics[topic][0])
            if self.cfg["ha_discovery"] and not self._ha_done:
                await self.publish_discovery()
                self._ha_done = True
        except MqttError:
            pass                       # the link dropped again; the next connect retries
        except MemoryError:
            # the heap is at its tightest right after a reconnect: without the status and
            # the subscriptions the session would stay deaf to commands; drop the link
            # and connect again after a collection (counted: the status' task_errors)
            self.client._oom()
        self._wake.set()

    def status(self):
        q = self.queue.stats()
        s = {"online": True, "fw": self.info.get("fw"), "board": self.info.get("board"),
             "transport": self.client.transport_name(), "queued": q["queued"],
             "dropped": q["dropped"], "reconnects": self.client.stats["connects"] - 1,
             "q_errors": self.stats["queue_errors"], "held": len(self._held),
             "held_dropped": self.stats["held_dropped"], "early": q["early"],
             "task_errors": self.stats["task_errors"] + self.client.stats["mem_errors"]}
        sig = self.info.get("signal")
        s["signal"] = sig() if callable(sig) else sig
        if self.clock:
            s["t"] = self.clock.time()
        return s

    async def publish_status(self):
        # Clear the flag first: the publisher task must not send a second copy while
        # this one waits for its PUBACK (one status per connect, not two).
        self._status_dirty = False
        try:
            await self.client.publish(self.base + "status",
                                      json.dumps(self.status(), separators=(",", ":")
                                                 ).encode(), 1, True,
                                      self.cfg["ack_timeout_ms"])
        except MqttError:
            self._status_dirty = True
            raise

    async def publish_discovery(self):
        """Home Assistant MQTT discovery: energy import/export, power, voltage, frequency
        from the JSON rt payload, availability from the status topic."""
        dev = {"identifiers": ["lipari_" + self.id], "name": "Lipari " + self.id,
               "manufacturer": "Lipari", "model": self.info.get("board") or "meter",
               "sw_version": self.info.get("fw") or "?"}
        avail = {"topic": self.base + "status",
                 "value_template": "{{ 'online' if value_json.online else 'offline' }}"}
        sensors = (
            ("energy_import", "Energy import", "energy", "Wh", "total_increasing",
             "{{ value_json.ai_wh }}"),
            ("energy_export", "Energy export", "energy", "Wh", "total_increasing",
             "{{ value_json.ae_wh }}"),
            ("power", "Power", "power", "W", "measurement",
             "{{ (value_json.p_mw | sum) / 1000 }}"),
            ("voltage_l1", "Voltage L1", "voltage", "V", "measurement",
             "{{ value_json.v_mv[0] / 1000 }}"),
            ("frequency", "Frequency", "frequency", "Hz", "measurement",
             "{{ value_json.f_mhz / 1000 }}"),
        )
        for obj, name, dc, unit, sc, tpl in sensors:
            cfg = {"name": name, "unique_id": "lipari_%s_%s" % (self.id, obj),
                   "state_topic": self.base + "rt", "device_class": dc,
                   "unit_of_measurement": unit, "state_class": sc, "value_template": tpl,
                   "availability": [avail], "device": dev}
            await self.client.publish("%s/sensor/%s/%s/config" % (self.cfg["ha_prefix"],
                                                                  self.id, obj),
                                      json.dumps(cfg).encode(), 1, True,
                                      self.cfg["ack_timeout_ms"])

    # -- tasks ---------------------------------------------------------------------------
    async def _publisher(self):
        while True:
            try:
                await self._publish_loop()
            except Exception as e:             # flash trouble or a bug: log, retry later
                self.stats["queue_errors"] += 1
                self.client.stats["last_error"] = "publisher: %r" % (e,)
                await _sleep_ms(5000)

    async def _publish_loop(self):
        c = self.cfg
        gap_ms = 1000 // c["backlog_per_s"]
        connects = self.client.stats["connects"]
        while True:
            self.beats += 1               # alive: firmware/watchdog.py feeds on it
            if self._q_error is not None:
                self._raise_queue_error()
            self._flush_held()
            if not self.client.isconnected():
                await self.client.wait_connected(1000)
                continue
            if self.client.stats["connects"] != connects:
                # a new connection: first what the broker may have lost with the old one
                connects = self.client.stats["connects"]
                self._again += self.queue.rewind()   # + what the last rewind had left
            if self._status_dirty:
                try:
                    await self.publish_status()
                except MqttError:
                    await _sleep_ms(1000)
                    continue
            try:
                item = self.queue.peek()
            except Exception:             # the flash fails: what is held in RAM can go
                item = None
            held = item is None and bool(self._held)
            if held:
                item = self._held[0]      # newer than anything on flash: order kept
            if item is None:
                self.queue.release()      # age out while connected and idle
                await _wait(self._wake, 1000)
                continue
            kind, payload = item
            try:
                await self.client.publish(self.base + ("interval" if kind == 1 else "event"), payload, 1,
                                          False, c["ack_timeout_ms"])
            except MqttError:
                await _sleep_ms(500)
                continue
            if not held:
                self.queue.ack()          # only after PUBACK; kept resend_s for a rewind
                if self._again:
                    self._again -= 1
                    self.stats["resent"] += 1
                else:
                    self.stats["sent"] += 1
            else:
                if self._held and self._held[0] is item:
                    self._held.pop(0)
                self.stats["sent"] += 1
            await _sleep_ms(gap_ms)       # backlog rate limit

    async def _rt_task(self):
        """Live readings and the periodic status, both timed by the meter's clock: an rt
        record goes out when its own time "t" is at least rt_s after the last one sent
        (the meter emits one every rt_s; a faster source is thinned, a link slower than
        the meter sends the latest)."""
        last_t = None
        # the meter's clock (virtual on the simulated boards), else the MCU's ticks (not
        # a method: a 24th entry would grow the class's table from 23 to 29 slots)
        clock = self.clock
        last_status = clock.time() if clock is not None else time.time()
        while True:
            await _wait(self._rt_wake, 1000)
            now = clock.time() if clock is not None else time.time()
            st = self.cfg["status_s"]
            if st and now - last_status >= st:
                last_status = now
                self._status_dirty = True
                self._wake.set()
            rec = self._rt
            rt_s = self.cfg["rt_s"]
            if rec is None or not rt_s or not self.client.isconnected():
                continue
            t = rec.get("t")
            if not isinstance(t, int):
                t = now
            if last_t is not None and last_t <= t < last_t + rt_s:
                continue
            self._rt = None
            last_t = t
            fmt = "json" if self.cfg["ha_discovery"] else self.cfg["payload"]
            try:
                await self.client.publish(self.base + "rt", codec.encode("rt", rec, fmt), 0)
                self.stats["rt_sent"] += 1
            except (MqttError, codec.CodecError):
                pass

    async def _cmd_task(self):
        # One command per call of _cmd_one: its frame, and whatever its value stack held
        # (the request, the reply's parts, the comm.commands object and so its module), is
        # garbage once it returns. A frame that stays suspended in this loop would keep
        # them alive in stale stack slots (MicroPython's GC is conservative), about
        # 1 KiB until the next command (docs/ram.md, decision 0022).
        while True:
            if not self._cmds:
                await _wait(self._cmd_wake, 1000)
                continue
            await self._cmd_one(self._cmds.pop(0))

    async def _cmd_one(self, payload):
        cmds = self.commands              # comm.commands loaded for this command
        if cmds is None:
            return
        # the reply comes in parts (comm.commands.answer), published back to back
        try:
            if isinstance(payload, tuple):        # oversized: (None, first bytes)
                rid, reply = await cmds.answer(None, payload[1])
            else:
                rid, reply = await cmds.answer(payload)
            after = cmds.after
        finally:
            cmds = None
            _drop_commands()
        try:
            await self.client.publish(self.base + "resp", reply, 1, False,
                                      self.cfg["ack_timeout_ms"])
        except MqttError:
            pass                        # the head-end times out and may ask again
        if after:
            await _sleep_ms(200)
            try:
                after()
            except Exception as e:
                self.client.stats["last_error"] = "after command: %r" % (e,)

    async def _guard(self, name, body):
        # A task that ends on an exception nobody expected (a MemoryError while a reply
        # is published, a bug) would leave the meter deaf to commands or mute on live
        # readings until a reset, silently: restart it, counted in the status'
        # task_errors, the error kept as last_error. Cancellation is not an Exception.
        while True:
            try:
                await body()
            except Exception as e:
                self.stats["task_errors"] += 1
                self.client.stats["last_error"] = "%s task: %r" % (name, e)
                self._status_dirty = True
                self._wake.set()
                gc.collect()
                await _sleep_ms(1000)

    async def run(self):
        """Run the session (never returns; cancel the task to stop)."""
        tasks = [asyncio.create_task(self.client.run()), asyncio.create_task(self._publisher()),
                 asyncio.create_task(self._guard("rt", self._rt_task)),
                 asyncio.create_task(self._guard("commands", self._cmd_task))]
        try:
            await tasks[0]
        finally:
            for t in tasks:
                t.cancel()

    async def close(self):
        """Clean disconnect (the broker does not publish the will: say offline first)."""
        try:
            await self.client.publish(self.base + "status",
                                      json.dumps({"online": False}).encode(), 1, True, 2000)
        except MqttError:
            pass
        await self.client.disconnect()
