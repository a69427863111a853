"""The embedded broker (headend/broker.py) against a real MQTT client (paho-mqtt)."""
import queue
import socket
import time

import pytest

paho = pytest.importorskip("paho.mqtt.client")

from headend.broker import BrokerThread, topic_matches


@pytest.fixture
def broker():
    b = BrokerThread(port=0).start()
    yield b
    b.stop()


def client(port, cid, clean=True, will=None):
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean)
    q = queue.Queue()
    c.on_message = lambda _c, _u, m: q.put((m.topic, m.payload, m.qos, m.retain))
    if will:
        c.will_set(*will)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    c.q = q
    return c


def drain(q, n, timeout_s=5):
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(q.get(timeout=0.1))
        except queue.Empty:
            pass
    return out


def subscribe(c, *subs):
    r = c.subscribe(list(subs))
    time.sleep(0.2)
    return r


def stop(*cs):
    for c in cs:
        c.disconnect()
        c.loop_stop()


def test_topic_matching():
    assert topic_matches("lipari/+/up/#", "lipari/m1/up/interval")
    assert topic_matches("lipari/#", "lipari")
    assert not topic_matches("lipari/+/up", "lipari/m1/down")
    assert not topic_matches("+/x", "$SYS/x")
    assert not topic_matches("a/b", "a/b/c")


def test_qos1_wildcards_and_retained(broker):
    sub = client(broker.port, "sub")
    subscribe(sub, ("lipari/+/status", 1), ("lipari/m1/#", 0))
    pub = client(broker.port, "pub")
    pub.publish("lipari/m1/status", b"online", qos=1, retain=True).wait_for_publish(5)
    pub.publish("lipari/m2/rt", b"x", qos=1).wait_for_publish(5)   # matches nothing
    pub.publish("lipari/m1/rt", b"p", qos=1).wait_for_publish(5)
    got = drain(sub.q, 2)
    # one copy per message even when two filters match, at the higher granted QoS
    assert [(t, p, q) for t, p, q, _ in got] == [("lipari/m1/status", b"online", 1),
                                                 ("lipari/m1/rt", b"p", 0)]
    late = client(broker.port, "late")
    subscribe(late, ("lipari/+/status", 1))
    got = drain(late.q, 1)
    assert got and got[0][:2] == ("lipari/m1/status", b"online") and got[0][3]
    stop(sub, pub, late)


def test_will_on_abrupt_close_not_on_disconnect(broker):
    watch = client(broker.port, "watch")
    subscribe(watch, ("lipari/+/status", 1))
    m = client(broker.port, "m9", will=("lipari/m9/status", b"offline", 1, True))
    time.sleep(0.2)
    m.loop_stop()
    m._sock.close()                 # the meter vanishes without DISCONNECT
    got = drain(watch.q, 1)
    assert got and got[0][:2] == ("lipari/m9/status", b"offline")
    m2 = client(broker.port, "m8", will=("lipari/m8/status", b"offline", 1, True))
    time.sleep(0.2)
    stop(m2)
    assert drain(watch.q, 1, timeout_s=1) == []
    stop(watch)


def test_shared_subscription_round_robin(broker):
    a = client(broker.port, "ing-a")
    b = client(broker.port, "ing-b")
    for c in (a, b):
        subscribe(c, ("$share/ingest/lipari/+/up", 1))
    pub = client(broker.port, "pub")
    for i in range(20):
        pub.publish("lipari/m%d/up" % i, b"%d" % i, qos=1).wait_for_publish(5)
    got_a = drain(a.q, 10)
    got_b = drain(b.q, 10)
    assert len(got_a) == 10 and len(got_b) == 10
    assert sorted(int(p) for _, p, _, _ in got_a + got_b) == list(range(20))
    stop(a, b, pub)


def test_persistent_session_gets_what_was_sent_while_away(broker):
    ing = client(broker.port, "ingest", clean=False)
    subscribe(ing, ("lipari/+/up", 1))
    stop(ing)
    pub = client(broker.port, "pub")
    for i in range(5):
        pub.publish("lipari/m1/up", b"%d" % i, qos=1).wait_for_publish(5)
    ing = client(broker.port, "ingest", clean=False)
    got = drain(ing.q, 5)
    assert [p for _, p, _, _ in got] == [b"0", b"1", b"2", b"3", b"4"]
    stop(ing, pub)


def test_garbage_and_mqtt5_are_refused(broker):
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=2)
    s.sendall(b"\x10\x0a\x00\x04MQTT\x05\x02\x00\x3c")    # MQTT 5 CONNECT, no properties
    assert s.recv(4) == b"\x20\x02\x00\x01"                 # refused: protocol version
    s.close()
    s = socket.create_connection(("127.0.0.1", broker.port), timeout=2)
    s.sendall(b"\xff\xff\xff\xff\xff")
    assert s.recv(4) == b""                                 # closed, broker still serves
    s.close()
    c = client(broker.port, "after")
    subscribe(c, ("a", 0))
    c.publish("a", b"ok").wait_for_publish(5)
    assert drain(c.q, 1)[0][1] == b"ok"
    stop(c)
