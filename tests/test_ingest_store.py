"""headend.store: schema, duplicates, queries, migrations."""
import json
import sqlite3

from headend.store import MIGRATIONS, Store, StoreError

REC = {"seq": 5, "t_end": 1700000900, "dur_s": 900, "flags": 0, "tariff": 1, "ai_wh": 1234,
       "ae_wh": 0, "ai_ph_wh": [400, 400, 434]}


def test_interval_unique_on_meter_and_seq(tmp_path):
    s = Store("sqlite:///%s/x.db" % tmp_path)
    assert s.add_interval("m1", 5, REC, b"\x11") is True
    assert s.add_interval("m1", 5, dict(REC, ai_wh=9), b"\x11") is False
    assert s.add_interval("m2", 5, REC, None) is True
    s.commit()
    s.close()
    s = Store("sqlite:///%s/x.db" % tmp_path)
    got = s.intervals("m1", 0, 2 ** 40)
    assert len(got) == 1 and got[0]["ai_wh"] == 1234 and got[0]["ai_ph_wh"] == [400, 400, 434]
    assert s.intervals("m1", 1700000901, 2 ** 40) == []
    assert s.schema_version() >= 2
    ids = [m["id"] for m in s.meters()]
    assert ids == ["m1", "m2"]


def test_uncommitted_is_lost(tmp_path):
    s = Store("sqlite:///%s/x.db" % tmp_path)
    s.add_interval("m1", 1, REC)
    s.db.close()       # crash before commit
    s = Store("sqlite:///%s/x.db" % tmp_path)
    assert s.intervals("m1") == []


def test_events_rt_status_quarantine(tmp_path):
    s = Store("sqlite:///%s/x.db" % tmp_path, rt_min_s=10)
    assert s.add_event("m1", 1, {"seq": 1, "t": 100, "kind": "sag", "phase": 2, "value": 180000})
    assert not s.add_event("m1", 1, {"seq": 1, "t": 100, "kind": "sag", "phase": 2, "value": 1})
    assert s.events("m1", 0, 200)[0]["kind"] == "sag"
    assert s.events(None)[0]["meter_id"] == "m1"
    assert s.add_rt("m1", {"t": 100, "p_mw": [1000, 2000, 3000]})
    assert not s.add_rt("m1", {"t": 105, "p_mw": [1000, 2000, 3000]})   # down-sampled
    assert s.add_rt("m1", {"t": 110, "p_mw": [1000, 2000, 4000]})
    assert [r["t"] for r in s.rt("m1", 0, 1000)] == [100, 110]
    s.set_status("m1", {"online": True, "fw": "1.0", "board": "b", "transport": "wifi"})
    s.set_status("m1", {"online": True, "fw": "1.0", "board": "b", "transport": "wifi"})
    s.set_status("m1", {"online": False})
    m = s.meters()[0]
    assert m["online"] is False and m["fw"] == "1.0" and m["p_w"] == 7.0
    assert [x["online"] for x in s.status_log("m1")] == [True, False]
    s.quarantine("lipari/v1/m1/interval", b"\xff", "bad version")
    q = s.quarantined()
    assert q[0]["reason"] == "bad version" and q[0]["payload"] == b"\xff"


def test_migrations_are_recorded_once(tmp_path):
    Store("sqlite:///%s/x.db" % tmp_path).close()
    Store("sqlite:///%s/x.db" % tmp_path).close()
    db = sqlite3.connect(str(tmp_path / "x.db"))
    assert [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version")] == \
        [v for v, _ in MIGRATIONS]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_url_says_what_to_do():
    try:
        Store("mysql://x")
    except StoreError as e:
        assert "sqlite:///" in str(e)
    else:
        raise AssertionError("no error")


def test_interval_gaps(tmp_path):
    s = Store("sqlite:///%s/x.db" % tmp_path)
    for q in (3, 4, 5, 8, 9, 12):
        s.add_interval("m1", q, dict(REC, seq=q))
    s.add_interval("m2", 1, REC)
    assert s.interval_gaps("m1") == [(6, 7), (10, 11)]
    assert s.interval_gaps("m2") == [] and s.interval_gaps("nobody") == []


def _payload(seq):
    from headend.loadtest_ingest import stream
    return stream(seq, 1)[seq - 1][1]


def test_ingest_keeps_the_payload_and_no_json_copy(tmp_path):
    # migration 5: an interval from ingest is stored as its payload (rec NULL) and read
    # back decoded, equal to what the decoder made of it; the columns are still filled
    from headend.codec import decode
    from headend.ingest import Ingest
    s = Store("sqlite:///%s/x.db" % tmp_path)
    pay = _payload(3)
    assert Ingest(s).handle("lipari/v1/m1/interval", pay) == "stored"
    row = s.db.execute("SELECT rec, raw, ai_wh, t_end FROM intervals").fetchone()
    want = decode(pay)[1]
    assert row["rec"] is None and bytes(row["raw"]) == pay
    assert (row["ai_wh"], row["t_end"]) == (want["ai_wh"], want["t_end"])
    got = s.intervals("m1")
    assert len(got) == 1 and got[0]["received"] > 0
    assert {k: v for k, v in got[0].items() if k not in ("meter_id", "received")} == want
    # an interval without its payload keeps the JSON copy (from_raw or not)
    s.add_interval("m2", 5, REC, b"not a payload")
    assert s.intervals("m2")[0]["ai_ph_wh"] == [400, 400, 434]
    assert s.add_intervals([("m3", 5, REC, None)], from_raw=True) == 1
    assert s.intervals("m3")[0]["ai_ph_wh"] == [400, 400, 434]
    # the schema refuses a row with neither
    try:
        s.db.execute("INSERT INTO intervals (meter_id, seq, received) VALUES ('m4', 1, 0)")
    except sqlite3.IntegrityError as e:
        assert "CHECK" in str(e)
    else:
        raise AssertionError("an interval with neither rec nor raw was stored")


def test_migration_5_keeps_the_rows_stored_before(tmp_path):
    # a database at version 4 (rec NOT NULL, a JSON copy in every row) is rebuilt with
    # every row, column and index kept, and the old rows read back as before
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
    for v, sql in MIGRATIONS[:4]:
        assert v <= 4
        db.executescript(sql)
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (v,))
    import json
    db.execute("INSERT INTO intervals (meter_id, seq, t_end, ai_wh, rec, raw, received) "
               "VALUES ('m1', 5, 1700000900, 1234, ?, X'11', 7.5)", (json.dumps(REC),))
    db.commit()
    db.close()
    s = Store("sqlite:///" + path)
    assert s.schema_version() == MIGRATIONS[-1][0]
    assert s.intervals("m1") == [dict(REC, meter_id="m1", received=7.5)]
    assert s.add_interval("m1", 5, REC, b"\x11") is False          # still unique
    idx = {r[1] for r in s.db.execute("PRAGMA index_list(intervals)")}
    assert "intervals_t" in idx
    assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _rt_payloads():
    # the same live reading as binary v1 and as JSON, and a JSON one with extra fields
    from comm_harness import SAMPLE_RT
    from headend.loadtest_meter import CODEC
    extra = dict(SAMPLE_RT, t=SAMPLE_RT["t"] + 2, z_note={"b": [1, 2], "a": 0.5}, note="x")
    return [CODEC.encode("rt", SAMPLE_RT, "bin"),
            CODEC.encode("rt", dict(SAMPLE_RT, t=SAMPLE_RT["t"] + 1), "json"),
            json.dumps(dict(extra, v=1, k="rt")).encode()]


def test_rt_from_ingest_is_its_payload_and_reads_as_the_json_copy(tmp_path):
    # migration 6: a live reading from ingest is stored as its payload (rec NULL) and
    # Store.rt (the dashboard, the API, the CLI and exports read through it) returns
    # exactly what the JSON copy gave: same keys in the same (sorted) order, lists
    from headend.codec import decode
    from headend.ingest import Ingest
    pays = _rt_payloads()
    new = Store("sqlite:///%s/new.db" % tmp_path)
    old = Store("sqlite:///%s/old.db" % tmp_path)
    ing = Ingest(new)
    for p in pays:
        assert ing.handle("lipari/v1/m1/rt", p) == "rt"
        old.add_rts([("m1", decode(p, expect="rt")[1])], 5.0)    # the JSON copy, as before
    new.commit()
    old.commit()
    rows = new.db.execute("SELECT rec, raw FROM rt ORDER BY t").fetchall()
    assert [(r["rec"], bytes(r["raw"])) for r in rows] == [(None, p) for p in pays]
    got, want = new.rt("m1"), old.rt("m1")
    assert len(got) == 3
    assert got == want
    assert [list(d) for d in got] == [list(d) for d in want]          # key order too
    assert json.dumps(got) == json.dumps(want)                        # what the API sends
    assert got[2]["z_note"] == {"a": 0.5, "b": [1, 2]} and list(got[2]["z_note"]) == ["a", "b"]
    assert new.rt("m1", got[1]["t"], None) == want[1:]
    from headend.queries import Queries
    assert Queries(new).rt("m1") == Queries(old).rt("m1") == want[2]
    assert new.meters()[0]["p_w"] == old.meters()[0]["p_w"] == 1300.0
    # a reading added without a payload keeps its JSON copy, from_raw or not
    assert new.add_rts([("m2", decode(pays[0])[1], None)], from_raw=True) == 1
    assert new.rt("m2") == [dict(want[0], meter_id="m2")]
    try:
        new.db.execute("INSERT INTO rt (meter_id, t) VALUES ('m4', 1)")
    except sqlite3.IntegrityError as e:
        assert "CHECK" in str(e)
    else:
        raise AssertionError("a live reading with neither rec nor raw was stored")


def test_bad_rt_payloads_are_still_quarantined_with_the_same_errors(tmp_path):
    from headend.ingest import Ingest
    s = Store("sqlite:///%s/q.db" % tmp_path)
    good = _rt_payloads()[0]
    bad = {good[:7]: "truncated", b"{\"v\":1,\"k\":\"rt\"}": "t",
           b"{\"v\":1,\"k\":\"rt\",\"t\":NaN}": "not JSON",
           good + b"\x00": "unexpected bytes after the rt record", b"": "empty payload"}
    ing = Ingest(s)
    for p in bad:
        assert ing.handle("lipari/v1/m1/rt", p) == "quarantined", p
    assert s.db.execute("SELECT COUNT(*) FROM rt").fetchone()[0] == 0
    got = {bytes(q["payload"]): q["reason"] for q in s.quarantined()}
    for p, words in bad.items():
        assert words in got[p], (p, got[p])


def test_migration_6_keeps_the_rt_rows_stored_before(tmp_path):
    # a database at version 5 (rt.rec NOT NULL, no raw) is rebuilt with every row kept;
    # old JSON rows and new payload rows read back alike
    from headend.codec import decode
    from headend.ingest import Ingest
    path = str(tmp_path / "v5.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
    for v, sql in MIGRATIONS[:5]:
        assert v <= 5
        db.executescript(sql)
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (v,))
    pays = _rt_payloads()
    recs = [decode(p)[1] for p in pays]
    for rec in recs[:2]:
        db.execute("INSERT INTO rt (meter_id, t, p_w, rec, received) VALUES ('m1', ?, 1300.0, "
                   "?, 7.5)", (rec["t"], json.dumps(rec, sort_keys=True)))
    db.commit()
    want = [dict(json.loads(json.dumps(r, sort_keys=True)), meter_id="m1") for r in recs]
    db.close()
    s = Store("sqlite:///" + path)
    assert s.schema_version() == MIGRATIONS[-1][0]
    assert s.rt("m1") == want[:2]
    assert s.db.execute("SELECT COUNT(*), MIN(received) FROM rt").fetchone()[:] == (2, 7.5)
    assert Ingest(s).handle("lipari/v1/m1/rt", pays[2]) == "rt"
    got = s.rt("m1")
    assert got == want and [list(d) for d in got] == [list(d) for d in want]
    assert "rt_t" in {r[1] for r in s.db.execute("PRAGMA index_list(rt)")}
    assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_ingest_writer_groups_a_steady_stream_into_few_commits(tmp_path):
    # a fleet's messages arrive a few at a time: the writer commits at most every
    # COMMIT_GAP_S (a commit's cost hardly depends on its size), and still stores all
    import threading
    import time
    from comm_harness import SAMPLE_RT
    from headend.ingest import Ingest
    from headend.loadtest_meter import CODEC
    s = Store("sqlite:///%s/g.db" % tmp_path)
    ing = Ingest(s)
    th = threading.Thread(target=ing._writer, daemon=True)
    th.start()
    pay = CODEC.encode("rt", SAMPLE_RT, "bin")
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 0.5:
        ing._received("lipari/v1/m%d/rt" % (n % 7), pay, None)
        n += 1
        time.sleep(0.002)
    time.sleep(Ingest.COMMIT_GAP_S + 0.3)
    ing._stop.set()
    th.join(2)
    assert n > 60 and ing.counts["rt"] == n
    assert s.db.execute("SELECT COUNT(*) FROM rt").fetchone()[0] == n
    # a commit per message (or per 2 ms) without the gap; at most one per gap with it
    assert 2 <= ing.counts["commits"] <= (time.monotonic() - t0) / Ingest.COMMIT_GAP_S + 2, \
        (ing.counts, n)


def test_as_json_is_what_a_sorted_json_copy_reads_back_as():
    from headend.store import _as_json
    for v in ({"b": (1, {"z": 1, "a": [2, (3,)]}), "a": [True, None, 1.5, "s", -1 << 63]},
              {"t": 5, "p_mw": [1, -2]}, [], {}):
        want = json.loads(json.dumps(v, sort_keys=True))
        got = _as_json(v)
        assert got == want and json.dumps(got) == json.dumps(want), (got, want)


def test_migration_7_moves_last_seen_and_p_w_to_a_narrow_table(tmp_path):
    # a database at version 6 keeps what meters() said; then records update meter_seen
    # only (the wide meters row, with its status JSON, is not rewritten), status messages
    # the meters row, and meters() shows the later last_seen of the two
    path = str(tmp_path / "v6.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
    for v, sql in MIGRATIONS[:6]:
        db.executescript(sql)
        db.execute("INSERT INTO schema_version VALUES (?, 0)", (v,))
    db.execute("INSERT INTO meters (id, online, fw, last_seen, p_w, status) VALUES "
               "('m1', 1, '1.0', 100.0, 250.0, '{}'), ('m2', 0, '1.0', 90.0, NULL, '{}')")
    db.commit()
    db.close()
    s = Store("sqlite:///" + path)
    assert s.schema_version() == 7
    assert [(m["id"], m["last_seen"], m["p_w"], m["online"]) for m in s.meters()] == \
        [("m1", 100.0, 250.0, True), ("m2", 90.0, None, False)]
    s.add_interval_rows([("m2", (1, 1700000900) + (None,) * 9, b"\x11")], received=200.0)
    s.add_rt_rows([("m1", 1700000000, 7.5, b"\x13")], received=201.0)
    s.add_interval_rows([("m3", (1, 1700000900) + (None,) * 9, b"\x11")], received=202.0)
    s.commit()
    assert [(m["id"], m["last_seen"], m["p_w"]) for m in s.meters()] == \
        [("m1", 201.0, 7.5), ("m2", 200.0, None), ("m3", 202.0, None)]
    wide = {r[0]: tuple(r[1:]) for r in s.db.execute("SELECT id, last_seen, p_w FROM meters")}
    assert wide == {"m1": (100.0, 250.0), "m2": (90.0, None), "m3": (None, None)}
    s.set_status("m2", {"online": True, "fw": "1.1"})
    s.commit()
    m2 = s.meters()[1]
    assert m2["online"] is True and m2["last_seen"] > 200.0 and m2["fw"] == "1.1"
    s.close()


def test_a_meter_first_seen_in_a_rolled_back_group_is_listed_after_its_redelivery(tmp_path):
    s = Store("sqlite:///%s/r.db" % tmp_path)
    row = (1, 1700000900) + (None,) * 9
    s.add_interval_rows([("m9", row, b"\x11")], received=5.0)
    s.commit()
    s.add_interval_rows([("m8", row, b"\x11")], received=6.0)
    s._flush_touches()                     # as commit() does, then the commit fails
    s.rollback()
    assert [m["id"] for m in s.meters()] == ["m9"]
    s.add_interval_rows([("m8", row, b"\x11")], received=7.0)      # the redelivery
    s.commit()
    assert [(m["id"], m["last_seen"]) for m in s.meters()] == [("m8", 7.0), ("m9", 5.0)]
    s.close()


def test_live_readings_older_than_rt_keep_s_are_pruned_at_most_every_rt_prune_s(tmp_path):
    import time
    s = Store("sqlite:///%s/p.db" % tmp_path, rt_keep_s=100)
    now = time.time()
    s.add_rt_rows([("m1", int(now) - 500, 1.0, b"\x13")], received=now)
    s.commit()
    assert s.db.execute("SELECT COUNT(*) FROM rt").fetchone()[0] == 1    # not due yet
    s._rt_prune_at = time.monotonic() - 1                                # RT_PRUNE_S later
    s.add_rt_rows([("m1", int(now) - 10, 1.0, b"\x13")], received=now)
    s.commit()
    assert [r[0] for r in s.db.execute("SELECT t FROM rt")] == [int(now) - 10]
    s.add_rt_rows([("m1", int(now) - 400, 1.0, b"\x13")], received=now)
    s.commit()
    assert s.db.execute("SELECT COUNT(*) FROM rt").fetchone()[0] == 2    # not yet due
    s._rt_prune_at = time.monotonic() - 1                                # RT_PRUNE_S later
    s.add_rt_rows([("m1", int(now) - 5, 1.0, b"\x13")], received=now)
    s.commit()
    assert sorted(r[0] for r in s.db.execute("SELECT t FROM rt")) == [int(now) - 10,
                                                                      int(now) - 5]
    assert s._rt_prune_at > time.monotonic() + s.RT_PRUNE_S - 60
    s.close()


def test_a_file_store_keeps_a_large_page_cache_and_checkpoints_its_wal_rarely(tmp_path):
    # the fleet's hot index leaves stay in memory, and commits do not copy them into the
    # database file every 1,000 WAL pages (Store.CACHE_KIB, WAL_CHECKPOINT_PAGES)
    s = Store("sqlite:///%s/c.db" % tmp_path)
    assert s.db.execute("PRAGMA cache_size").fetchone()[0] == -Store.CACHE_KIB
    assert s.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == \
        Store.WAL_CHECKPOINT_PAGES >= 10000
    s.close()
