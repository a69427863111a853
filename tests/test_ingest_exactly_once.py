"""Head-end ingest: duplicates stored once, undecodable payloads quarantined without
stopping, and no acknowledgement before the commit (redelivered after a failed commit)."""
import threading
import time

import paho.mqtt.client as paho

from comm_harness import SAMPLE_EVENT, SAMPLE_INTERVAL, mp_encode
from conftest_broker import mosquitto  # noqa: F401
from headend.ingest import Ingest
from headend.store import Store


def _ingest(store):
    # handle() only: no broker needed
    return Ingest(store, client_id="unit")


def test_duplicates_are_stored_once_and_garbage_is_quarantined(tmp_path):
    store = Store("sqlite:///%s/h.db" % tmp_path)
    ing = _ingest(store)
    recs = [dict(SAMPLE_INTERVAL, seq=i) for i in range(5)]
    pay = mp_encode([("interval", r, "bin") for r in recs] +
                    [("event", SAMPLE_EVENT, "json"), ("rt", {"t": 5, "v_mv": [1]}, "bin")])
    out = [ing.handle("lipari/v1/m9/interval", p) for p in pay[:5]]
    out += [ing.handle("lipari/v1/m9/interval", p) for p in pay[:5]]   # redelivered
    out.append(ing.handle("lipari/v1/m9/event", pay[5]))
    out.append(ing.handle("lipari/v1/m9/event", pay[5]))
    out.append(ing.handle("lipari/v1/m9/rt", pay[6]))
    assert out == ["stored"] * 5 + ["duplicate"] * 5 + ["stored", "duplicate", "rt"]
    assert [r["seq"] for r in store.intervals("m9")] == list(range(5))
    bad = [("lipari/v1/m9/interval", b""), ("lipari/v1/m9/interval", b"\x99garbage"),
           ("lipari/v1/m9/event", pay[0]),                    # interval on the event topic
           ("lipari/v1/m9/interval", pay[0][:-3]),            # truncated
           ("lipari/v1/m9/status", b"\xff\xfe"), ("lipari/v1/m9/interval", b"{]")]
    assert [ing.handle(t, p) for t, p in bad] == ["quarantined"] * len(bad)
    q = store.quarantined()
    assert len(q) == len(bad) and all(x["reason"] for x in q)
    assert "topic says event" in " ".join(x["reason"] for x in q)
    assert ing.handle("lipari/v1/m9/interval", pay[1]) == "duplicate"   # still going
    assert ing.handle("other/topic", b"x") == "ignored"


class FlakyStore(Store):
    """Fails the first `fail` commits that carry an interval, as a full disk would."""

    def __init__(self, url, fail):
        super().__init__(url)
        self.fail = fail
        self.pending = False

    def add_interval_rows(self, items, *a, **k):     # what ingest writes intervals with
        self.pending = self.pending or bool(items)
        return super().add_interval_rows(items, *a, **k)

    def commit(self):
        if self.pending and self.fail > 0:
            self.fail -= 1
            self.pending = False
            raise OSError("disk full")
        self.pending = False
        super().commit()


def test_no_ack_before_commit_redelivers_after_failure(mosquitto, tmp_path):
    url = "sqlite:///%s/h.db" % tmp_path
    store = FlakyStore(url, fail=1)
    ing = Ingest(store, port=mosquitto.port, user="headend", password="headend-pw",
                 client_id="worker-1", db_retry_s=0).start()
    assert ing.connected.wait(5)
    time.sleep(0.3)
    payload = mp_encode([("interval", dict(SAMPLE_INTERVAL, seq=77), "bin")])[0]
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="m1")
    pub.username_pw_set("m1", "m1-pw")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    pub.publish("lipari/v1/m1/interval", payload, 1).wait_for_publish(5)
    t0 = time.monotonic()
    while not ing.failed and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert ing.failed and "database unavailable" in ing.failed
    ing.stop()
    assert Store(url).intervals("m1") == []              # nothing committed, nothing acked
    # the same worker comes back (persistent session): the broker redelivers
    store2 = Store(url)
    ing2 = Ingest(store2, port=mosquitto.port, user="headend", password="headend-pw",
                  client_id="worker-1").start()
    t0 = time.monotonic()
    while not store2.intervals("m1") and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    ing2.stop()
    pub.disconnect()
    pub.loop_stop()
    assert [r["seq"] for r in store2.intervals("m1")] == [77]
    assert ing2.counts["stored"] == 1


def test_every_committed_record_is_acknowledged(mosquitto, tmp_path):
    """The PUBACK goes out after the commit, not never: a worker that comes back on the
    same persistent session gets nothing again (an unacknowledged record would be
    redelivered and counted as a duplicate)."""
    url = "sqlite:///%s/h.db" % tmp_path
    ing = Ingest(Store(url), port=mosquitto.port, user="headend", password="headend-pw",
                 client_id="worker-ack").start()
    assert ing.connected.wait(5)
    time.sleep(0.3)
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="m3")
    pub.username_pw_set("m3", "m3-pw")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    pays = mp_encode([("interval", dict(SAMPLE_INTERVAL, seq=s), "bin") for s in range(1, 6)])
    for p in pays:
        pub.publish("lipari/v1/m3/interval", p, 1).wait_for_publish(5)
    t0 = time.monotonic()
    while ing.counts["stored"] < 5 and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    time.sleep(0.3)                                   # the PUBACKs follow the commit
    ing.stop()
    assert ing.counts["stored"] == 5 and ing.counts["commits"] >= 1
    ing2 = Ingest(Store(url), port=mosquitto.port, user="headend", password="headend-pw",
                  client_id="worker-ack").start()
    assert ing2.connected.wait(5)
    time.sleep(1.0)
    ing2.stop()
    pub.disconnect()
    pub.loop_stop()
    assert ing2.counts["duplicate"] == 0 and ing2.counts["stored"] == 0, ing2.counts


def test_lipari_headend_command_line(mosquitto, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from comm_harness import ROOT
    db = "sqlite:///%s/cli.db" % tmp_path
    p = subprocess.Popen([sys.executable, "-m", "headend.ingest", "--port", str(mosquitto.port),
                          "--user", "headend", "--db", db, "--client-id", "cli-1"],
                         cwd=ROOT, env=dict(os.environ, LIPARI_MQTT_PASSWORD="headend-pw"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        payload = mp_encode([("interval", dict(SAMPLE_INTERVAL, seq=5), "bin")])[0]
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="m2")
        pub.username_pw_set("m2", "m2-pw")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pub.publish("lipari/v1/m2/interval", payload, 1).wait_for_publish(5)
        pub.publish("lipari/v1/m2/interval", b"\x1f", 1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        s = Store(db)
        t0 = time.monotonic()
        while (not s.intervals("m2") or not s.quarantined()) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert [r["seq"] for r in s.intervals("m2")] == [5] and len(s.quarantined()) == 1
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    assert p.returncode == 0, err
    assert "ingesting" in out


def test_stop_while_the_broker_is_away_leaves_no_task_pending(mosquitto, tmp_path):
    """Stopping an ingest whose client is reconnecting (the broker down) cancels and
    awaits its tasks: none is left pending on the stopped loop (it printed "Task was
    destroyed but it is pending" when collected)."""
    import asyncio
    ing = Ingest(Store("sqlite:///%s/h.db" % tmp_path), port=mosquitto.port, user="headend",
                 password="headend-pw", client_id="worker-stop", reconnect_s=(0.2, 0.5)).start()
    assert ing.connected.wait(5)
    mosquitto.stop()
    t0 = time.monotonic()
    while ing.connected.is_set() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not ing.connected.is_set()
    time.sleep(0.5)                     # the client is in its reconnect loop now
    ing.stop()
    assert not ing._loop.is_running()
    pending = [t for t in asyncio.all_tasks(ing._loop) if not t.done()]
    assert pending == [], pending
