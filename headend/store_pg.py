"""PostgreSQL for the head-end store (large fleets): `PgStore(url)` is a headend.store.Store
on a PostgreSQL server, with the same schema, migrations and queries.

    s = open_store("postgresql://user:pw@db.example:5432/lipari")   # PgStore
    s = open_store("sqlite:///var/lipari.db")                        # Store

Store's SQL is written for SQLite; a thin connection adapter translates it (placeholders,
INSERT OR IGNORE -> ON CONFLICT DO NOTHING, column types) and hands back rows that behave
like sqlite3.Row, so Store's methods run unchanged. Migrations run under a transaction
advisory lock, so several ingest workers can start at once. Needs psycopg 3 (pinned in
requirements.txt).
"""
import re
import threading
import time

from headend.store import MIGRATIONS, Store, StoreError

_MIGRATION_LOCK = 0x4C495041      # "LIPA": pg_advisory_xact_lock key for migrations


class Row:
    """sqlite3.Row look-alike: r[0], r["col"], tuple(r) (values), dict(r), r.keys()."""
    __slots__ = ("_k", "_v")

    def __init__(self, keys, values):
        self._k = keys
        self._v = values

    def keys(self):
        return list(self._k)

    def __getitem__(self, i):
        if isinstance(i, str):
            return self._v[self._k.index(i)]
        return self._v[i]

    def __iter__(self):
        return iter(self._v)

    def __len__(self):
        return len(self._v)


def _row_factory(cursor):
    keys = [d.name for d in cursor.description] if cursor.description else []

    def make(values):
        return Row(keys, tuple(bytes(v) if isinstance(v, memoryview) else v for v in values))
    return make


_TYPES = [
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", re.I), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.I), "BYTEA"),
]
_IGNORE = re.compile(r"\bINSERT OR IGNORE INTO\b", re.I)
_ROWID = re.compile(r",\s*rowid\b", re.I)


def translate(sql, ddl=False):
    """SQLite SQL as Store writes it -> PostgreSQL."""
    if ddl:
        for rx, rep in _TYPES:
            sql = rx.sub(rep, sql)
        sql = re.sub(r"--[^\n]*", "", sql)
        sql = re.sub(r"\)\s*WITHOUT ROWID", ")", sql, flags=re.I)   # SQLite's storage hint
        return sql
    ignore = bool(_IGNORE.search(sql))
    if ignore:
        sql = _IGNORE.sub("INSERT INTO", sql)
    sql = _ROWID.sub("", sql)            # status_log's tie-break; PG has no rowid
    sql = sql.replace("%", "%%").replace("?", "%s")
    if ignore:
        sql = sql.rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    return sql


# Migrations PostgreSQL does otherwise than SQLite: 5 drops a NOT NULL, which SQLite can
# only do by rebuilding the table (a rebuild here would also undo a TimescaleDB hypertable
# or a Citus distribution, docs/scaling.md).
_PG_MIGRATIONS = {
    5: "ALTER TABLE intervals ALTER COLUMN rec DROP NOT NULL; "
       "ALTER TABLE intervals ADD CHECK (rec IS NOT NULL OR raw IS NOT NULL)",
    6: "ALTER TABLE rt ALTER COLUMN rec DROP NOT NULL; ALTER TABLE rt ADD COLUMN raw BYTEA; "
       "ALTER TABLE rt ADD CHECK (rec IS NOT NULL OR raw IS NOT NULL)",
}


class PgConnection:
    """The part of sqlite3.Connection that Store uses, on a psycopg connection."""

    def __init__(self, conninfo, timeout_s=10):
        try:
            import psycopg
        except ImportError:
            raise StoreError("PostgreSQL needs the psycopg package: pip install -r "
                             "requirements.txt (make setup does it)")
        self.psycopg = psycopg
        try:
            self.conn = psycopg.connect(conninfo, connect_timeout=timeout_s,
                                        row_factory=_row_factory)
        except psycopg.Error as e:
            raise StoreError("cannot connect to PostgreSQL (%s): %s -- check host, port, user, "
                             "password and that the database exists (createdb)"
                             % (_redact(conninfo), str(e).strip()))
        self._cache = {}
        self.dirty = False          # a write is waiting for commit()

    def execute(self, sql, args=()):
        head = sql.lstrip()[:6].upper()
        if head.startswith("PRAGMA"):
            return self.conn.cursor()
        q = self._cache.get(sql)
        if q is None:
            q = self._cache[sql] = translate(sql)
        cur = self.conn.cursor()
        cur.execute(q, tuple(args) if args else None)
        if head == "SELECT":
            if not self.dirty:
                # a reader (the web server) must not sit "idle in transaction" for hours;
                # the rows are already on the client, so ending the transaction is free
                self.conn.commit()
        else:
            self.dirty = True
        return cur

    def executemany(self, sql, rows):
        """One statement for many rows: psycopg sends them pipelined (one round trip)."""
        q = self._cache.get(sql)
        if q is None:
            q = self._cache[sql] = translate(sql)
        cur = self.conn.cursor()
        cur.executemany(q, [tuple(r) for r in rows])
        self.dirty = True
        return cur

    def executescript(self, script):
        # Store's migrations wrap themselves in BEGIN/COMMIT; psycopg already opened a
        # transaction, so those two are dropped and commit() ends it.
        body = re.sub(r"^\s*BEGIN\s*;", "", script.strip(), flags=re.I)
        body = re.sub(r";\s*COMMIT\s*;\s*$", ";", body, flags=re.I)
        self.conn.execute(translate(body, ddl=True))
        self.conn.commit()

    def commit(self):
        self.conn.commit()
        self.dirty = False

    def rollback(self):
        self.conn.rollback()
        self.dirty = False

    def close(self):
        self.conn.close()


def _redact(url):
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


_INSERT = re.compile(r"INSERT (OR IGNORE )?INTO (\w+) \(([^)]*)\)", re.I)


class PgStore(Store):
    """Store on PostgreSQL: postgresql://user:password@host:port/dbname."""

    # A commit group of ingest (dozens to a thousand rows) goes in with COPY into a
    # temporary table and one INSERT ... SELECT ... ON CONFLICT DO NOTHING: measured on
    # 20,000 interval records, 71 us client + 43 us server per record for pipelined
    # INSERTs against COPY_NOTE. Small groups use the pipelined INSERTs.
    COPY_MIN_ROWS = 20

    def _insert_many(self, sql, rows):
        if len(rows) < self.COPY_MIN_ROWS:
            return super()._insert_many(sql, rows)
        m = _INSERT.match(sql)
        table, cols = m.group(2), m.group(3)
        tmp = "_in_" + table
        c = self.db.conn
        if tmp not in self._temp:
            c.execute("CREATE TEMP TABLE IF NOT EXISTS %s AS SELECT %s FROM %s WITH NO DATA"
                      % (tmp, cols, table))
            self._temp.add(tmp)
        cur = c.cursor()
        with cur.copy("COPY %s (%s) FROM STDIN" % (tmp, cols)) as cp:
            for r in rows:
                cp.write_row(r)
        cur.execute("INSERT INTO %s (%s) SELECT %s FROM %s%s" % (
            table, cols, cols, tmp, " ON CONFLICT DO NOTHING" if m.group(1) else ""))
        n = cur.rowcount
        cur.execute("TRUNCATE %s" % tmp)
        self.db.dirty = True
        return n

    def __init__(self, url, rt_min_s=0, rt_keep_s=7 * 86400):
        if not url.startswith(("postgres://", "postgresql://")):
            raise StoreError("PgStore needs a postgresql://user:password@host/db URL, not %r"
                             % url)
        self.url = url
        self.rt_min_s = rt_min_s
        self.rt_keep_s = rt_keep_s
        self._lock = threading.RLock()
        self._last_rt = {}
        self._touched = {}               # meter_id -> (last_seen, p_w) until commit()
        self._known = set()              # meters with a row in meters (Store._flush_touches)
        self._rt_prune_at = time.monotonic() + self.RT_PRUNE_S
        self._temp = set()               # temporary COPY tables made on this connection
        self.db = PgConnection(url)
        try:
            self._migrate()
        except self.db.psycopg.Error as e:
            raise StoreError("cannot prepare the PostgreSQL schema: %s (does the user own the "
                             "database?)" % str(e).strip())

    def _migrate(self):
        with self._lock:
            c = self.db.conn
            c.execute("SELECT pg_advisory_xact_lock(%s)" % _MIGRATION_LOCK)
            c.execute("CREATE TABLE IF NOT EXISTS schema_version "
                      "(version BIGINT PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
            have = {r[0] for r in c.execute("SELECT version FROM schema_version")}
            for version, sql in MIGRATIONS:
                if version in have:
                    continue
                c.execute(_PG_MIGRATIONS.get(version) or translate(sql, ddl=True))
                c.execute("INSERT INTO schema_version VALUES (%s, %s)", (version, time.time()))
            c.commit()                     # releases the advisory lock

    def rollback(self):
        with self._lock:
            self._touched = {}
            self._known = set()
            self.db.rollback()


def open_store(url, **kw):
    """Store for a sqlite URL (or bare path), PgStore for a postgresql:// URL."""
    if url.startswith(("postgres://", "postgresql://")):
        return PgStore(url, **kw)
    return Store(url, **kw)
