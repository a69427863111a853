"""`lipari loadtest` (headend/loadtest*.py): its meters are the firmware's as far as the
head-end can tell, and a small fleet through broker crashes, a network outage, an ingest
outage with a broker SIGKILL, reboots and an event burst loses nothing.

Faithfulness: the load generator's records (interval, event, live reading) are encoded by
firmware/comm/codec.py under CPython; the same dicts encoded by the micropython build must
give the same bytes, and the firmware's payloads and the load generator's go through the
same ingest checks with the same outcome and the same stored rows."""
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import time

import paho.mqtt.client as paho
import pytest

from comm_harness import SAMPLE_EVENT, SAMPLE_INTERVAL, SAMPLE_RT, mp_encode
from headend import loadtest
from headend.codec import decode
from headend.ingest import Ingest
from headend.loadtest_meter import CODEC, RecordModel
from headend.loadtest_report import analyse
from headend.store import Store

pytest.importorskip("gmqtt")


def _records():
    out = []
    for phases in (1, 3):
        m = RecordModel(random.Random(phases), phases)
        for k in range(1, 4):
            out.append(("interval", m.interval(k, 1767225600 + 900 * k, 900)))
        out.append(("rt", m.rt(1767225611)))     # bytes already (pool + t)
    out.append(("event", {"seq": 7, "t": 1767225605, "kind": "sag", "phase": 1, "value": 183000}))
    out.append(("event", {"seq": 8, "t": 1767225606, "kind": "boot", "phase": 0, "value": None}))
    return out


def test_load_generator_bytes_equal_the_firmware_codec_on_micropython():
    recs = _records()
    mine = []
    items = []
    for kind, r in recs:
        if kind == "rt":
            # the pooled reading with its own t: rebuild the dict from the head-end decoder
            _, d = decode(r)
            mine.append(r)
            items.append(("rt", d, "bin"))
        else:
            mine.append(CODEC.encode(kind, r, "bin"))
            items.append((kind, r, "bin"))
    fw = mp_encode(items)
    assert fw == mine
    assert len(mine) == 10 and all(mine)


def test_firmware_and_load_generator_payloads_get_the_same_ingest_outcome(tmp_path):
    """The firmware's own payloads (micropython) and the load generator's for the same
    records: same decode, same outcome, same stored record."""
    store = Store("sqlite:///%s/h.db" % tmp_path)
    ing = Ingest(store, client_id="unit")
    iv = dict(SAMPLE_INTERVAL, seq=11)
    ev = dict(SAMPLE_EVENT, seq=12)
    rt = dict(SAMPLE_RT)
    fw = mp_encode([("interval", iv, "bin"), ("event", ev, "bin"), ("rt", rt, "bin")])
    lt = [CODEC.encode("interval", iv, "bin"), CODEC.encode("event", ev, "bin"),
          CODEC.encode("rt", rt, "bin")]
    assert fw == lt
    topics = ("interval", "event", "rt")
    out_fw = [ing.handle("lipari/v1/fw-meter/%s" % k, p) for k, p in zip(topics, fw)]
    out_lt = [ing.handle("lipari/v1/lt-meter/%s" % k, p) for k, p in zip(topics, lt)]
    assert out_fw == out_lt == ["stored", "stored", "rt"]
    assert store.intervals("fw-meter")[0]["ai_wh"] == store.intervals("lt-meter")[0]["ai_wh"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("meter_id", "received")}  # noqa: E731
                          for r in rows]
    assert strip(store.intervals("fw-meter")) == strip(store.intervals("lt-meter"))
    assert strip(store.events("fw-meter")) == strip(store.events("lt-meter"))
    assert strip(store.rt("fw-meter")) == strip(store.rt("lt-meter"))


def _args(tmp_path, **kw):
    a = loadtest.parser().parse_args([])
    a.out = str(tmp_path)
    a.quiet = True
    for k, v in kw.items():
        setattr(a, k, v)
    if a.fleet:
        a.speed = a.fleet / a.meters
    return a


def _watch(port, password, seen, stop):
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="watcher")
    c.username_pw_set("headend", password)

    def on_msg(cl, u, m):
        seen.append((m.topic, m.qos, m.retain, bytes(m.payload)))
    c.on_message = on_msg
    c.connect("127.0.0.1", port)
    c.subscribe("lipari/v1/#", 1)
    c.loop_start()
    while not stop.is_set():
        time.sleep(0.1)
    c.disconnect()
    c.loop_stop()


def test_small_fleet_through_crashes_outages_reboots_and_bursts_loses_nothing(tmp_path):
    # reboots stop before the broker is killed with the ingest away (churn and the crash
    # apart; the resend window survives a reboot since it is on flash: test_comm_resend.py)
    a = _args(tmp_path, meters=60, fleet=60 * 300, duration=24.0, warmup=2.0, drain_s=60.0,
              skew_s=30.0, churn_pct=30.0, churn_until_s=5.0, rt_share=0.1,
              fault=[(12.0, "broker", 2.0), (8.0, "burst", 0.0), (3.0, "net", 2.0),
                     (14.0, "brokerkill_ingest", 4.5)])
    r = loadtest.Run(a)
    try:
        rep = loadtest.run_main(r)
    finally:
        r.cleanup()
    s = json.dumps({k: v for k, v in rep.items() if k != "series"}, indent=1)
    assert rep["passed"], s
    assert rep["meters_connected"] == 60 and rep["unsent"] == 0, s
    assert rep["records_lost"] == 0 and rep["duplicates_stored"] == 0, s
    made = rep["made"]
    # speed 300: a 15-minute interval every 3 s, 8 in 24 s
    assert made["interval"] >= 60 * 7 and made["event"] >= 60 and made["rt"] > 0, s
    assert rep["stored"]["interval"] == made["interval"], s
    # the faults hit: reconnects after the broker kill and the network outage, reboots,
    # resends after reconnects absorbed as duplicates
    st = rep["meter_stats"]
    assert st["connects"] >= 3 * 60 and st["reboots"] >= 1 and st["drops"] >= 2 * 60, s
    assert rep["resent_after_reconnect"] > 0 and rep["redeliveries_absorbed"] > 0, s
    assert [f["kind"] for f in rep["faults"]] == ["net", "burst", "broker", "brokerkill_ingest"]
    assert rep["latency_ms"]["p99"] is not None and rep["latency_ms"]["n"] > 1000, s
    assert os.path.getsize(os.path.join(a.out, "report.png")) > 10000
    assert json.load(open(os.path.join(a.out, "report.json")))["passed"] is True
    # the checker can fail: rows removed from the database are counted as lost
    db = os.path.join(a.out, "lipari.db")
    con = sqlite3.connect(db)
    con.execute("DELETE FROM intervals WHERE rowid IN (SELECT rowid FROM intervals "
                "WHERE meter_id LIKE 'lt-%' LIMIT 5)")
    con.commit()
    con.close()
    a.no_plot = True
    rep2 = analyse(r, True, time.time())
    assert rep2["records_lost"] == 5 and not rep2["passed"]
    assert "5 interval/event records lost" in rep2["why_failed"][0]


def test_meters_speak_the_protocol_on_the_wire(tmp_path):
    """Retained birth with the status fields, records on the meter's own topics with the
    QoS the protocol gives them, and the retained last will when the links drop."""
    import threading
    a = _args(tmp_path, meters=5, fleet=5 * 900, duration=6.0, warmup=0.0, rt_share=0.4,
              no_plot=True, fault=[(1.0, "burst", 0.0), (2.0, "net", 1.0)])
    seen, stop = [], threading.Event()
    r = loadtest.Run(a)
    th = []

    def ready(run):                 # broker up, meters not yet connected
        t = threading.Thread(target=_watch, args=(run.broker.port, run.headend_password,
                                                  seen, stop), daemon=True)
        t.start()
        th.append(t)
        time.sleep(0.5)
    r.on_ready = ready
    try:
        rep = loadtest.run_main(r)
    finally:
        stop.set()
        r.cleanup()
    assert rep["passed"], rep["why_failed"]
    topics = {}
    for topic, qos, retain, payload in seen:
        parts = topic.split("/")
        assert len(parts) == 4 and parts[0:2] == ["lipari", "v1"] and parts[2].startswith("lt-")
        topics.setdefault(parts[3], []).append((qos, retain, payload))
    assert {"status", "interval", "rt", "event"} <= set(topics), sorted(topics)
    assert all(q == 1 for q, _, _ in topics["interval"] + topics["event"])
    assert all(q == 0 for q, _, _ in topics["rt"])
    births = [json.loads(p) for _, _, p in topics["status"] if json.loads(p).get("online")]
    assert len(births) >= 10 and set(births[0]) >= {
        "online", "fw", "board", "transport", "queued", "dropped", "reconnects", "signal", "t"}
    assert any(b["reconnects"] >= 1 for b in births)
    wills = [p for _, _, p in topics["status"] if json.loads(p) == {"online": False}]
    assert len(wills) >= 5          # the net outage: every meter's will


def test_lipari_loadtest_command_line(tmp_path):
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "headend.cli", "loadtest", "--meters", "20",
                        "--fleet", "6000", "--duration", "5", "--out", str(out), "-q",
                        "--max-p99-ms", "0.001"], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # a p99 limit no system meets: the run must say FAIL and exit 1, with its figures
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL: p99 latency" in p.stdout and "committed records/s" in p.stdout
    rep = json.load(open(out / "report.json"))
    assert rep["records_lost"] == 0 and rep["made"]["interval"] >= 20    # one per 3 s each


class _FakeFleet:
    interval_s = 900

    def __init__(self):
        self.ack_timeouts = loadtest.AckTimeouts()
        self.timers = loadtest.FleetTimers()

    def sim_now(self):
        return 1767225600


class _FakeClient:
    """Acknowledges each QoS 1 PUBLISH on the next loop turn (or never: ack=False), as
    gmqtt's PUBACK handling does: meter.acked(mid)."""

    def __init__(self, meter, ack=True):
        self.meter, self.sent, self.ack = meter, [], ack

    def publish_acked(self, topic, payload, retain=False):
        loop = asyncio.get_running_loop()
        mid = len(self.sent) + 1
        self.sent.append((loop.time(), topic, payload))
        if self.ack:
            loop.call_soon(self.meter.acked, mid)
        return mid


def _publish_for(meter, seconds, during=None):
    async def main():
        meter.up = True
        meter.pump()
        if during:
            await asyncio.sleep(seconds / 2)
            during()
            await asyncio.sleep(seconds / 2)
        else:
            await asyncio.sleep(seconds)
        meter.up = False
    with asyncio.Runner(loop_factory=loadtest.new_loop) as r:
        r.run(main())


def test_meter_paces_its_backlog_and_sends_again_after_the_ack_timeout(monkeypatch):
    """The meter's sending without a task or a timer per record keeps the firmware's
    behaviour: one QoS 1 record in flight, 1000/backlog_per_s ms between records of a
    backlog, a record whose PUBACK does not come within ack_timeout_ms sent again (same
    bytes, same seq), a record made while idle sent at once."""
    from headend import loadtest_meter
    m = loadtest_meter.Meter(_FakeFleet(), 0, "lt-00000", "pw", 1, False, 0.0, 1)
    m.client = _FakeClient(m)
    for k in range(6):
        m.close_interval(1767225600 + 900 * (k + 1), time.time())
    _publish_for(m, 0.9)
    t = [s[0] for s in m.client.sent]
    assert 4 <= len(t) <= 5, t                    # 0, 0.2, 0.4, 0.6, (0.8) s
    assert all(b - a >= 0.19 for a, b in zip(t, t[1:])), t
    # in seq order, each once, and only the acknowledged ones left the queue
    assert [decode(s[2])[1]["seq"] for s in m.client.sent] == list(range(1, len(t) + 1))
    assert all(s[1] == "lipari/v1/lt-00000/interval" for s in m.client.sent)
    assert m.stats["sent_interval"] + len(m.queue) == 6
    # an idle meter sends a new record (and a due status before it) at once, paced
    m3 = loadtest_meter.Meter(_FakeFleet(), 3, "lt-00003", "pw", 1, False, 0.0, 3)
    m3.client = _FakeClient(m3)

    def make():
        m3.status_tick()
        m3.event("sag", 1767225605, 1, 183000)
    _publish_for(m3, 0.2, during=make)
    assert [s[1].rsplit("/", 1)[1] for s in m3.client.sent] == ["status", "event"]
    assert m3.client.sent[1][0] - m3.client.sent[0][0] < 0.05
    assert m3.stats["sent_event"] == 1 and not m3.queue and m3.inflight is None
    # no PUBACK: the record goes again after the timeout, nothing is dropped
    monkeypatch.setitem(loadtest_meter.SESSION_DEFAULTS, "ack_timeout_ms", 300)
    m2 = loadtest_meter.Meter(_FakeFleet(), 1, "lt-00001", "pw", 1, False, 0.0, 2)
    m2.client = _FakeClient(m2, ack=False)
    m2.close_interval(1767225600 + 900, time.time())
    _publish_for(m2, 1.6)
    sent = m2.client.sent
    assert len(sent) >= 2 and len({s[2] for s in sent}) == 1, sent
    assert m2.stats["ack_timeouts"] >= 1 and len(m2.queue) == 1
    # a late PUBACK of the first send after its timeout is not taken for the second's
    m2.acked(1)
    assert len(m2.queue) == 1


def test_ack_timeouts_fail_only_the_unacknowledged():
    class M:
        def __init__(self):
            self.out = []

        def ack_timeout(self, token):
            self.out.append(token)

    async def main():
        loop = asyncio.get_running_loop()
        t = loadtest.AckTimeouts()
        a, b = M(), M()
        t.add(loop, loop.time() + 0.1, a, 1)
        t.add(loop, loop.time() + 0.1, a, 2)
        t.add(loop, loop.time() + 30, b, 3)
        await asyncio.sleep(0.1 + t.CHECK_S + 0.2)
        assert a.out == [1, 2] and b.out == [] and len(t.due) == 1
        t.due.clear()
    with asyncio.Runner(loop_factory=loadtest.new_loop) as r:
        r.run(main())


def test_fleet_timers_call_in_due_order():
    async def main():
        loop = asyncio.get_running_loop()
        t, out = loadtest.FleetTimers(), []
        now = loop.time()
        for d, k in ((0.15, "c"), (0.05, "a"), (0.10, "b"), (5.0, "late")):
            t.at(loop, now + d, lambda k=k: out.append((k, loop.time() - now)))
        await asyncio.sleep(0.3)
        assert [k for k, _ in out] == ["a", "b", "c"], out
        assert all(dt >= d - 0.002 for (_, dt), d in zip(out, (0.05, 0.10, 0.15))), out
        assert len(t.heap) == 1 and t.when == now + 5.0
        t.handle.cancel()
    with asyncio.Runner(loop_factory=loadtest.new_loop) as r:
        r.run(main())


def test_load_generator_publish_packets_are_gmqtts_bytes():
    """The meters' pre-built PUBLISH packets are what gmqtt would have built: QoS 0 and 1,
    retained or not, short and long (two-byte remaining length) payloads."""
    import gmqtt
    from gmqtt.mqtt.package import PublishPacket
    from headend.loadtest_meter import publish_packet

    class Proto:
        proto_ver = 4

        class id_generator:
            @staticmethod
            def next_id():
                return 0x1234

    for topic in ("lipari/v1/lt-00001/interval", "lipari/v1/lt-00001/rt", "x"):
        for payload in (b"", b"\x11\x02", bytes(range(200)), bytes(4000)):
            for qos in (0, 1):
                for retain in (False, True):
                    mid, want = PublishPacket.build_package(
                        gmqtt.Message(topic, payload, qos=qos, retain=retain), Proto)
                    got = publish_packet(topic, payload, qos, retain, mid)
                    assert got == bytes(want), (topic, len(payload), qos, retain)


def test_fleet_profile_sums_py_spy_stacks(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools.fleet_profile import top
    raw = tmp_path / "loadgen.txt"
    raw.write_text("run (a.py:1);write (b.py:2) 3\nrun (a.py:1);tick (c.py:3) 1\n")
    out = top(str(raw)).splitlines()
    assert out[0] == "samples 4"
    assert out[2] == " 75.0% write (b.py:2)" and out[3] == " 25.0% tick (c.py:3)"
    assert "100.0% run (a.py:1)" in out[out.index("-- inclusive") + 1]


def test_loadtest_leaves_the_garbage_collector_as_it_was(tmp_path):
    import gc
    before = gc.get_threshold()
    a = _args(tmp_path, meters=3, fleet=3 * 300, duration=2.0, warmup=0.0, rt_share=0.0,
              no_plot=True)
    r = loadtest.Run(a)
    try:
        loadtest.run_main(r)
    finally:
        r.cleanup()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_worker_stopped_on_purpose_is_not_reported_dead(tmp_path):
    """An ingest outage stops the workers from an executor thread while the sampler calls
    check(): a worker that exits on our SIGTERM before its slot is cleared failed a run
    once ("ingest worker 1 exited with 0"). One that dies on its own is still reported."""
    from headend.loadtest_infra import InfraError, Workers
    w = Workers(str(tmp_path), 1, 1883, "sqlite:///x.db", "pw")
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    w.procs[1] = p
    real_wait, seen = p.wait, []

    def wait(timeout=None):
        r = real_wait(timeout)
        w.check()                      # the sampler, between the exit and the slot cleared
        seen.append(r)
        return r
    p.wait = wait
    w.stop()
    assert seen and w.procs[1] is None and not w.stopping
    open(os.path.join(w.dir, "worker-2.err"), "w").write("boom")
    w.procs[2] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    w.procs[2].wait()
    with pytest.raises(InfraError, match="worker 2 exited with 3: boom"):
        w.check()


def test_meter_link_reads_split_packets_and_notices_a_closed_broker():
    """The meters' direct protocol (no StreamReader): a PUBACK split over two socket
    reads is handled once, and so is one in a read of its own (the fast path), and a broker that closes its end (FIN, as a killed
    Mosquitto's sockets do) drops the meter's link at once, not at its next failed write
    or ack timeout (the resend window counts from the drop)."""
    from headend.loadtest_meter import _Client

    class M:
        def __init__(self):
            self.acked_mids, self.lost_at = [], None

        def acked(self, mid):
            self.acked_mids.append(mid)

        def link_lost(self):
            self.lost_at = time.monotonic()

    async def main():
        closed = asyncio.Event()

        async def broker(reader, writer):
            await reader.read(1024)                  # CONNECT
            writer.write(b"\x20\x02\x00\x00")        # CONNACK, accepted
            await writer.drain()
            await reader.read(1024)                  # the PUBLISH (QoS 1, mid 1)
            writer.write(b"\x40\x02")                # PUBACK in two pieces
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"\x00\x01")
            await writer.drain()
            await reader.read(1024)                  # the second PUBLISH (mid 2)
            writer.write(b"\x40\x02\x00\x02")        # its PUBACK in one read
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()                           # FIN
            closed.set()
        srv = await asyncio.start_server(broker, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        m = M()
        c = _Client(m, "lt-x", clean_session=False)
        c.set_config({"reconnect_retries": 0})
        await asyncio.wait_for(c.connect("127.0.0.1", port, keepalive=60, version=4), 5)
        mids = [c.publish_acked("lipari/v1/lt-x/interval", b"\x01\x02")]
        while not m.acked_mids:
            await asyncio.sleep(0.01)
        mids.append(c.publish_acked("lipari/v1/lt-x/interval", b"\x01\x03"))
        await closed.wait()
        t_closed = time.monotonic()
        for _ in range(50):
            if m.lost_at is not None:
                break
            await asyncio.sleep(0.02)
        srv.close()
        assert m.acked_mids == mids == [1, 2]
        assert c._persistent_storage.is_empty          # both stored packets dropped
        assert m.lost_at is not None and m.lost_at - t_closed < 0.5
    with asyncio.Runner(loop_factory=loadtest.new_loop) as r:
        r.run(main())
