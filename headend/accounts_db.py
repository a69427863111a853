"""The head-end's accounts database: users, their meters, sessions, API tokens and the
audit log, in the same database as the meter data (SQLite or PostgreSQL) but in tables of
their own with their own ordered migrations (table accounts_schema_version), so that the
store's migrations (headend/store.py) and these never collide.

    db = AccountsDB("sqlite:///var/lipari.db")
    db.execute("SELECT ...", (args,)); db.commit()

It opens its own connection (one per process, serialised by a lock). The audit table is
append-only: triggers refuse UPDATE and DELETE on both databases.
"""
import sqlite3
import threading
import time

from headend.store import StoreError, _path_from_url

# (version, SQLite, PostgreSQL). Never edit a released one: append.
MIGRATIONS = [
    (1, """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,                  -- viewer, operator, admin
        pw_hash TEXT NOT NULL,               -- argon2id
        meters TEXT,                         -- JSON list of meter ids it may see; NULL = all
        disabled INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL
    );
    CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY,            -- sha256 of the cookie value
        user_name TEXT NOT NULL,
        csrf TEXT NOT NULL,
        created REAL NOT NULL, expires REAL NOT NULL
    );
    CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        token_hash TEXT NOT NULL UNIQUE,     -- sha256 of the token
        user_name TEXT NOT NULL,
        role TEXT NOT NULL,                  -- at most the user's role
        label TEXT, created REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        t REAL NOT NULL,
        user_name TEXT NOT NULL, role TEXT NOT NULL, via TEXT,
        meter_id TEXT, action TEXT NOT NULL, cmd TEXT, args TEXT,
        ref TEXT,                            -- ties a request to its outcome
        outcome TEXT NOT NULL, answer TEXT
    );
    CREATE INDEX audit_meter ON audit (meter_id, id);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """, """
    CREATE TABLE users (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, pw_hash TEXT NOT NULL, meters TEXT,
        disabled BIGINT NOT NULL DEFAULT 0, created DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY, user_name TEXT NOT NULL, csrf TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE api_tokens (
        id BIGSERIAL PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, user_name TEXT NOT NULL,
        role TEXT NOT NULL, label TEXT, created DOUBLE PRECISION NOT NULL,
        revoked BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY, t DOUBLE PRECISION NOT NULL,
        user_name TEXT NOT NULL, role TEXT NOT NULL, via TEXT,
        meter_id TEXT, action TEXT NOT NULL, cmd TEXT, args TEXT, ref TEXT,
        outcome TEXT NOT NULL, answer TEXT
    );
    CREATE INDEX audit_meter ON audit (meter_id, id);
    CREATE FUNCTION lipari_audit_append_only() RETURNS trigger AS $$
        BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$ LANGUAGE plpgsql;
    CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION lipari_audit_append_only();
    """),
]

_PG_LOCK = 0x4C495042      # pg_advisory_xact_lock key for these migrations


class AccountsDB:
    def __init__(self, url):
        self.url = url
        self.lock = threading.RLock()
        self.pg = url.startswith(("postgres://", "postgresql://"))
        if self.pg:
            from headend.store_pg import PgConnection
            self.db = PgConnection(url)
        else:
            path = _path_from_url(url)
            try:
                import os
                d = os.path.dirname(path) if path != ":memory:" else ""
                if d:
                    os.makedirs(d, exist_ok=True)
                self.db = sqlite3.connect(path, check_same_thread=False, timeout=10)
                self.db.row_factory = sqlite3.Row
                if path != ":memory:":
                    self.db.execute("PRAGMA journal_mode=WAL")
            except (sqlite3.Error, OSError) as e:
                raise StoreError("cannot open the accounts database %s: %s" % (path, e))
        self._migrate()

    def _migrate(self):
        with self.lock:
            if self.pg:
                c = self.db.conn
                c.execute("SELECT pg_advisory_xact_lock(%d)" % _PG_LOCK)
                c.execute("CREATE TABLE IF NOT EXISTS accounts_schema_version "
                          "(version BIGINT PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
                have = {r[0] for r in c.execute("SELECT version FROM accounts_schema_version")}
                for version, _, sql in MIGRATIONS:
                    if version not in have:
                        c.execute(sql)
                        c.execute("INSERT INTO accounts_schema_version VALUES (%s, %s)",
                                  (version, time.time()))
                c.commit()
                return
            self.db.execute("CREATE TABLE IF NOT EXISTS accounts_schema_version "
                            "(version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
            self.db.commit()
            have = {r[0] for r in self.db.execute("SELECT version FROM accounts_schema_version")}
            for version, sql, _ in MIGRATIONS:
                if version in have:
                    continue
                try:
                    self.db.executescript("BEGIN;" + sql + ";INSERT INTO accounts_schema_version "
                                          "VALUES (%d, %f); COMMIT;" % (version, time.time()))
                except sqlite3.Error:
                    self.db.rollback()
                    again = {r[0] for r in self.db.execute(
                        "SELECT version FROM accounts_schema_version")}
                    if version not in again:        # not another process racing us
                        raise

    def rows(self, sql, args=()):
        with self.lock:
            return [dict(zip(r.keys(), tuple(r))) for r in self.db.execute(sql, args)]

    def execute(self, sql, args=(), commit=True):
        """One write, committed (a failed one is rolled back and re-raised)."""
        with self.lock:
            try:
                cur = self.db.execute(sql, args)
                if commit:
                    self.db.commit()
                return cur
            except Exception:
                self.db.rollback()
                raise

    def close(self):
        with self.lock:
            self.db.close()
