"""Ingest's batched hot path (docs/decisions/0018): interval columns straight from the
payload with decode()'s checks, duplicates found by the database inside a commit group and
across groups, a bad record among good ones, and the hand-over of one socket read's
messages to the writer with each PUBACK only after the commit."""
import asyncio
import json

from comm_harness import SAMPLE_INTERVAL, SAMPLE_INTERVAL_USUAL, SAMPLE_RT, mp_encode
from headend.codec import INTERVAL_COLUMNS, DecodeError, _p_w, decode, interval_row, rt_row
from headend.ingest import Ingest
from headend.loadtest_ingest import stream
from headend.store import Store


def _columns(rec):
    tot = [sum(v) if isinstance(v, list) else v for v in (rec["sags"], rec["swells"])]
    return tuple(rec[k] for k in INTERVAL_COLUMNS[:-2]) + tuple(tot)


def _outcome(f, p):
    try:
        return "ok", f(p)
    except DecodeError as e:
        return "error", str(e)


def test_interval_row_is_decode_without_the_dict():
    pays = [p for _, p in stream(40, 8)]                   # 1 and 3 phases, load generator
    recs = [dict(SAMPLE_INTERVAL, seq=3), SAMPLE_INTERVAL_USUAL,
            dict(SAMPLE_INTERVAL, sags=[2, 0, 1], swells=[0, 3, 0]),      # per phase
            dict(SAMPLE_INTERVAL, sags=4, swells=1)]                      # one count
    pays += mp_encode([("interval", r, "bin") for r in recs] +
                      [("interval", r, "json") for r in recs])
    assert pays[-1][:1] == b"{"                            # a JSON interval is in the set
    for p in pays:
        assert interval_row(p) == _columns(decode(p, expect="interval")[1])
    # every truncation, a byte too many and each byte flipped: the same outcome as decode
    # (the same error message, or the same columns)
    for p in pays[:3] + pays[-8:]:
        variants = [p[:k] for k in range(len(p))] + [p + b"\x00"]
        variants += [p[:k] + bytes([p[k] ^ 0x80]) + p[k + 1:] for k in range(len(p))]
        for v in variants:
            want = _outcome(lambda x: _columns(decode(x, expect="interval")[1]), v)
            assert _outcome(interval_row, v) == want, v


def test_rt_row_is_decode_without_the_dict():
    recs = [SAMPLE_RT, dict(SAMPLE_RT, p_mw=[-1500, 2500, 7]), {"t": 9, "v_mv": [230000]},
            {"t": 0}]
    pays = mp_encode([("rt", r, f) for r in recs for f in ("bin", "json")])
    pays.append(json.dumps({"v": 1, "k": "rt", "t": 3, "p_w": 12.5}).encode())
    for p in pays:
        rec = decode(p, expect="rt")[1]
        assert rt_row(p) == (rec["t"], _p_w(rec))
    assert (-1500 + 2500 + 7) / 1000 in {rt_row(p)[1] for p in pays}
    for p in pays[:4] + pays[-1:]:
        variants = [p[:k] for k in range(len(p))] + [p + b"\x00"]
        variants += [p[:k] + bytes([p[k] ^ 0x80]) + p[k + 1:] for k in range(len(p))]
        for v in variants:
            want = _outcome(lambda x: (lambda r: (r["t"], _p_w(r)))(decode(x, expect="rt")[1]), v)
            assert _outcome(rt_row, v) == want, v


def test_a_group_with_duplicates_and_a_bad_record_loses_no_good_one(tmp_path):
    s = Store("sqlite:///%s/b.db" % tmp_path)
    ing = Ingest(s, client_id="unit")
    items = stream(12, 3)                                  # bm000..bm002, seq 1..4
    t = "lipari/v1/%s/interval"
    bad = items[4][1][:-2]                                 # truncated
    first = [(t % m, p, k) for k, (m, p) in enumerate(items[:8])]
    first.insert(4, (t % items[4][0], bad, 100))           # a bad one in the middle
    first.insert(2, first[1])                              # a duplicate in the group
    out, _ = ing._write(first)
    s.commit()
    assert out == dict(out, stored=8, duplicate=1, quarantined=1), out
    # the next group: re-sent records (the broker redelivers, a meter re-sends) and new
    second = [(t % m, p, k) for k, (m, p) in enumerate(items[5:], 50)]
    out, _ = ing._write(second)
    s.commit()
    assert out == dict(out, stored=4, duplicate=3, quarantined=0), out
    for m in ("bm000", "bm001", "bm002"):
        want = [p for x, p in items if x == m]
        rows = s._rows("SELECT raw FROM intervals WHERE meter_id = ? ORDER BY seq", (m,))
        assert [bytes(r["raw"]) for r in rows] == want
        assert [r["seq"] for r in s.intervals(m)] == [1, 2, 3, 4]
    q = s.quarantined()
    assert len(q) == 1 and q[0]["payload"] == bad and q[0]["topic"] == t % items[4][0]
    assert q[0]["reason"] == _outcome(lambda x: decode(x, expect="interval"), bad)[1]


def test_one_reads_messages_are_handed_over_once_and_acked_after_their_commit(tmp_path):
    s = Store("sqlite:///%s/a.db" % tmp_path)
    ing = Ingest(s, client_id="unit")
    loop = ing._loop = asyncio.new_event_loop()
    order = []
    commit = s.commit
    s.commit = lambda: (order.append("commit"), commit())[1]
    ing.c.acks = lambda mids: order.append(("acks", list(mids)))
    items = stream(6, 2)
    t = "lipari/v1/%s/interval"
    try:
        for k, (m, p) in enumerate(items[:4], 1):            # one socket read's packets
            ing._on_qos1(k, p, t % m, {})
        assert ing._pending == [] and not ing._wake.is_set()
        loop.run_until_complete(asyncio.sleep(0))          # the loop's next turn
        assert [m[2] for m in ing._pending] == [1, 2, 3, 4] and ing._wake.is_set()
        ing._on_message(None, "lipari/v1/bm000/status", json.dumps(
            {"online": True}).encode(), 0, {})                # QoS 0: no packet id
        ing._on_qos1(5, b"\x11junk", t % "bm001", {})      # quarantined: acknowledged too
        loop.run_until_complete(asyncio.sleep(0))
        ing._flush()
        assert order == ["commit"]                         # no PUBACK yet
        loop.run_until_complete(asyncio.sleep(0))
        assert order == ["commit", ("acks", [1, 2, 3, 4, 5])]
        assert ing.counts["stored"] == 4 and ing.counts["quarantined"] == 1
        # received, then the connection drops before the hand-over: nothing is written or
        # acknowledged (the broker sends them again on the next connection)
        for k, (m, p) in enumerate(items[4:], 6):
            ing._on_qos1(k, p, t % m, {})
        ing._on_disconnect(None)
        loop.run_until_complete(asyncio.sleep(0))
        ing._flush()
        loop.run_until_complete(asyncio.sleep(0))
        assert order == ["commit", ("acks", [1, 2, 3, 4, 5])] and ing.counts["stored"] == 4
    finally:
        loop.close()


def test_publish_parsing_hands_over_what_gmqtts_own_does():
    """The ingest's PUBLISH parser (headend.ingest._Client._publish_packet) against
    gmqtt's _handle_publish_packet on the same packets: QoS 0 and 1, DUP and retain, an
    empty payload, a topic that is not UTF-8 (handed over as bytes), a truncated packet
    and one without a topic (both skipped)."""
    import struct
    from gmqtt.mqtt.handler import MqttPackageHandler
    from headend.ingest import _Client

    got = {"fast": [], "gmqtt": []}

    def client(key):
        c = _Client("t", lambda mid, payload, topic, props: got[key].append(
            ("q1", mid, bytes(payload), topic, props)), (1, 2))
        c.on_message = lambda cl, topic, payload, qos, props: got[key].append(
            ("q0", bytes(payload), topic, qos, props))
        c._connection_state.protocol_version = 4          # MQTT 3.1.1, as ingest connects
        return c
    fast, ref = client("fast"), client("gmqtt")
    pkts = []
    for topic in (b"lipari/v1/m1/interval", b"lipari/v1/m\xff/rt", b"x"):
        for payload in (b"", b"\x11\x02\x03", bytes(300)):
            for cmd in (0x30, 0x31, 0x32, 0x3a, 0x33):
                mid = b"\x12\x34" if cmd & 0x06 else b""
                pkts.append((cmd, struct.pack("!H", len(topic)) + topic + mid + payload))
    pkts += [(0x32, b"\x00\x09lipari"), (0x30, b"\x00\x00\x01\x02"), (0x32, b"\x00")]
    for cmd, raw in pkts:
        for h in (fast._package_handler._handle_publish_packet,
                  lambda cmd, raw: MqttPackageHandler._handle_publish_packet(
                      ref._package_handler, cmd, raw)):
            try:
                h(cmd, raw)
            except struct.error:         # gmqtt's __call__ logs it; nothing handed over
                pass
    assert len(got["fast"]) == 3 * 3 * 5 and got["fast"] == got["gmqtt"], (
        [x for x in got["fast"] if x not in got["gmqtt"]][:3])
