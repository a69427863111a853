"""PostgreSQL store (headend/store_pg.py) against a real PostgreSQL server: a throwaway
cluster that this test starts with initdb/pg_ctl in a temp dir (as user postgres when the
tests run as root). The same fleet history through PgStore and through the SQLite Store
must give the same answers, through the queries and through the web API."""
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import urllib.request

import pytest

from headend_harness import T0, fill, interval_record

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -r "
                                                 "requirements.txt)")

from headend.queries import Queries
from headend.store import Store
from headend.store_pg import PgStore, open_store, translate


def _pg_bin(name):
    found = shutil.which(name) or sorted(glob.glob("/usr/lib/postgresql/*/bin/" + name))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def pg_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server is not installed (apt-get install postgresql)")
    demote = None
    d = tempfile.mkdtemp(prefix="lipari-pg-")
    if os.geteuid() == 0:                      # initdb refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(d)
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(d, pw.pw_uid, pw.pw_gid)

        def demote():
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
    data = os.path.join(d, "data")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    run = dict(preexec_fn=demote, capture_output=True, text=True, timeout=60)
    r = subprocess.run([initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], **run)
    if r.returncode:
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip("initdb failed: %s" % r.stderr[-500:])
    r = subprocess.run([pg_ctl, "-D", data, "-l", os.path.join(d, "log"), "-w", "-t", "30", "-o",
                        "-c listen_addresses=127.0.0.1 -p %d -k %s -c fsync=off" % (port, d),
                        "start"], **run)
    if r.returncode:
        log = open(os.path.join(d, "log")).read()[-800:] if os.path.exists(os.path.join(d, "log")) else ""
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip("PostgreSQL did not start: %s %s" % (r.stderr[-300:], log))
    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:%d/postgres" % port,
                             autocommit=True) as c:
            c.execute("CREATE DATABASE lipari")
        yield "postgresql://postgres@127.0.0.1:%d/lipari" % port
    finally:
        subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], **run)
        shutil.rmtree(d, ignore_errors=True)


def test_translation():
    assert translate("INSERT OR IGNORE INTO t (a) VALUES (?)") == \
        "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING"
    assert translate("SELECT 1 FROM s ORDER BY t, rowid") == "SELECT 1 FROM s ORDER BY t"
    assert "BIGSERIAL PRIMARY KEY" in translate("id INTEGER PRIMARY KEY AUTOINCREMENT", ddl=True)
    assert translate("x BLOB, y REAL", ddl=True) == "x BYTEA, y DOUBLE PRECISION"


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("last_seen", "received", "t")
             or not isinstance(v, float)} for r in rows]


def test_same_answers_as_sqlite(pg_url, tmp_path):
    pg = open_store(pg_url)
    assert isinstance(pg, PgStore)
    lite = Store("sqlite:///%s" % (tmp_path / "l.db"))
    fill(pg, days=2)
    fill(lite, days=2)
    assert pg.schema_version() == lite.schema_version()
    assert not pg.add_interval("m-pv-2", 5, interval_record(5, 1, 1, 1))       # duplicate
    pg.quarantine("lipari/v1/x/interval", b"\x00\xffbad", "CRC mismatch")
    pg.commit()
    assert pg.quarantined()[0]["payload"] == b"\x00\xffbad"
    qp, ql = Queries(pg), Queries(lite)
    assert _strip(qp.meters()) == _strip(ql.meters())
    for mid in ("m-house-1", "m-plant-3"):
        assert _strip(pg.intervals(mid, T0, T0 + 86400)) == _strip(lite.intervals(mid, T0, T0 + 86400))
        assert len(pg.intervals(mid)) == 192
        assert qp.energy(mid, "week") == ql.energy(mid, "week")
        assert qp.bill(mid) == ql.bill(mid)
        assert _strip(qp.events(mid)) == _strip(ql.events(mid))
        assert qp.rt(mid)["p_mw"] == ql.rt(mid)["p_mw"]
        assert [s["status"] for s in pg.status_log(mid)] == [s["status"] for s in lite.status_log(mid)]
    assert qp.csv("m-pv-2", None, None) == ql.csv("m-pv-2", None, None)
    # a second process opening the same database finds the schema in place
    again = PgStore(pg_url)
    assert again.schema_version() == pg.schema_version()
    assert len(again.meters()) == 3
    again.close()
    pg.close()
    lite.close()


def test_web_and_ingest_on_postgres(pg_url):
    from headend.ingest import Ingest
    from headend.web import serve
    store = PgStore(pg_url)
    ing = Ingest(store)                        # decode + store + commit, no broker needed
    rec = interval_record(1, T0 + 900, 250, 0)
    rec.update(v=1, k="interval")
    assert ing.handle("lipari/v1/pg-1/interval", json.dumps(rec).encode()) == "stored"
    assert ing.handle("lipari/v1/pg-1/interval", json.dumps(rec).encode()) == "duplicate"
    assert ing.handle("lipari/v1/pg-1/interval", b"\x99junk") == "quarantined"
    srv = serve(PgStore(pg_url), port=0, poll_s=0.2)     # a second connection, as a reader
    srv.state.users.add("pg-admin", "admin", "pg-admin-password")
    auth = {"Authorization": "Bearer " + srv.state.users.new_token("pg-admin")[1]}
    try:
        with urllib.request.urlopen(urllib.request.Request(srv.url + "/api/v1/meters",
                                                           headers=auth), timeout=10) as r:
            ids = [m["id"] for m in json.loads(r.read())]
        assert "pg-1" in ids
        with urllib.request.urlopen(urllib.request.Request(
                srv.url + "/api/v1/meters/pg-1/intervals", headers=auth), timeout=10) as r:
            assert [x["seq"] for x in json.loads(r.read())] == [1]
        # the reader is not left idle in a transaction
        with psycopg.connect(pg_url.replace("/lipari", "/postgres"), autocommit=True) as c:
            n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'lipari' "
                          "AND state = 'idle in transaction'").fetchone()[0]
        assert n == 0
    finally:
        srv.stop()
        store.close()


def test_accounts_and_append_only_audit_on_postgres(pg_url):
    """Users, tokens and the audit log (headend/accounts_db.py) on PostgreSQL: the same
    migrations run once for two openers, and the audit table refuses UPDATE and DELETE."""
    from headend.accounts_db import AccountsDB
    from headend.audit import Audit
    from headend.users import Principal, Users
    db = AccountsDB(pg_url)
    AccountsDB(pg_url).close()                   # a second opener: migrations already done
    users = Users(db)
    users.add("pg-op", "operator", "operator-password")
    assert users.verify("pg-op", "operator-password")["role"] == "operator"
    _, tok = users.new_token("pg-op", "t", role="viewer")
    assert users.token(tok).role == "viewer"
    log = Audit(db)
    who = Principal("pg-op", "operator", via="token")
    ref = log.sent(who, "m1", "ping", {})
    log.outcome(ref, who, "m1", "ping", {}, "ok", {"ok": True})
    assert [e["outcome"] for e in log.entries(meter_id="m1")] == ["ok", "sent"]
    with psycopg.connect(pg_url, autocommit=True) as c:
        for sql in ("UPDATE audit SET user_name = 'x'", "DELETE FROM audit"):
            with pytest.raises(psycopg.Error, match="append-only"):
                c.execute(sql)
    assert len(log.entries(meter_id="m1")) == 2
    db.close()


def test_rt_stored_as_payload_on_postgres(pg_url, tmp_path):
    """Migration 6 on PostgreSQL: a database at version 5 (rt.rec NOT NULL, no raw) keeps
    its live readings, and readings the ingest stores as their payload read back (Store.rt,
    the queries, the web API) exactly as the JSON copies did."""
    from comm_harness import SAMPLE_RT
    from headend.codec import decode
    from headend.ingest import Ingest
    from headend.loadtest_meter import CODEC
    from headend.store import MIGRATIONS
    from headend.store_pg import _PG_MIGRATIONS
    from headend.web import serve
    admin = pg_url.replace("/lipari", "/postgres")
    url = pg_url.replace("/lipari", "/lipari_v5")
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute("CREATE DATABASE lipari_v5")
    pays = [CODEC.encode("rt", dict(SAMPLE_RT, t=SAMPLE_RT["t"] + k), fmt)
            for k, fmt in enumerate(("json", "bin", "bin"))]
    recs = [decode(p)[1] for p in pays]
    with psycopg.connect(url) as c:                  # the schema as version 5 left it
        c.execute("CREATE TABLE schema_version "
                  "(version BIGINT PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
        for v, sql in MIGRATIONS[:5]:
            c.execute(_PG_MIGRATIONS.get(v) or translate(sql, ddl=True))
            c.execute("INSERT INTO schema_version VALUES (%s, 0)", (v,))
        c.execute("INSERT INTO rt (meter_id, t, p_w, rec, received) VALUES ('pg-rt', %s, "
                  "1300.0, %s, 7.5)", (recs[0]["t"], json.dumps(recs[0], sort_keys=True)))
    pg = PgStore(url)
    lite = Store("sqlite:///%s/rt.db" % tmp_path)
    try:
        assert pg.schema_version() == MIGRATIONS[-1][0] == lite.schema_version()
        ing = Ingest(pg)
        for p in pays[1:]:
            assert ing.handle("lipari/v1/pg-rt/rt", p) == "rt"
        assert ing.handle("lipari/v1/pg-rt/rt", pays[1][:9]) == "quarantined"
        lite.add_rts([("pg-rt", r) for r in recs], 7.5)          # JSON copies, as before
        lite.commit()
        rows = pg.db.execute("SELECT rec, raw FROM rt ORDER BY t").fetchall()
        assert [(r[0] is None, r[1] and bytes(r[1])) for r in rows] == \
            [(False, None), (True, pays[1]), (True, pays[2])]
        got, want = pg.rt("pg-rt"), lite.rt("pg-rt")
        assert got == want and [list(d) for d in got] == [list(d) for d in want]
        srv = serve(PgStore(url), port=0, poll_s=0.2)
        srv.state.users.add("pg-rt-admin", "admin", "pg-rt-admin-password")
        auth = {"Authorization": "Bearer " + srv.state.users.new_token("pg-rt-admin")[1]}
        try:
            with urllib.request.urlopen(urllib.request.Request(
                    srv.url + "/api/v1/meters/pg-rt/rt", headers=auth), timeout=10) as r:
                body = json.loads(r.read())
        finally:
            srv.stop()
        assert body == want[-1] and list(body) == list(want[-1])
    finally:
        pg.close()
