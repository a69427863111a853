"""Head-end storage: meters, billing intervals, events, live readings, status history.

SQLite now (WAL mode, so a dashboard can read while ingest writes); the schema is applied
by ordered migrations recorded in `schema_version`, which is how PostgreSQL will be added.

    s = Store("sqlite:///var/lipari.db")
    s.add_interval("m1", 17, rec, raw)      # False = (meter, seq) already stored
    s.commit()                              # nothing is durable before commit()

Writes are not committed by themselves: ingest commits, and only then acknowledges the
MQTT message (exactly once at the head-end). One Store may be shared between threads (the
ingest's MQTT and writer threads and a web server); calls are serialised by a lock.
"""
import json
import os
import sqlite3
import threading
import time

from headend.codec import _p_w, decode


class StoreError(Exception):
    """The database cannot be opened or used; the message says what to do."""


# Ordered migrations: never edit a released one, append a new one.
MIGRATIONS = [
    (1, """
    CREATE TABLE meters (
        id TEXT PRIMARY KEY,
        online INTEGER NOT NULL DEFAULT 0,
        transport TEXT, fw TEXT, board TEXT, signal INTEGER,
        last_seen REAL, p_w REAL,
        status TEXT                      -- last status message, JSON
    );
    CREATE TABLE intervals (
        meter_id TEXT NOT NULL, seq INTEGER NOT NULL,
        t_end INTEGER, dur_s INTEGER, flags INTEGER, tariff INTEGER,
        ai_wh INTEGER, ae_wh INTEGER, ap_vah INTEGER, pmax_w INTEGER,
        sags INTEGER, swells INTEGER,
        rec TEXT NOT NULL,               -- the full decoded record, JSON
        raw BLOB,                        -- the payload as received
        received REAL NOT NULL,
        UNIQUE (meter_id, seq)
    );
    CREATE INDEX intervals_t ON intervals (meter_id, t_end);
    CREATE TABLE events (
        meter_id TEXT NOT NULL, seq INTEGER NOT NULL,
        t INTEGER, kind TEXT, phase INTEGER, value TEXT,
        rec TEXT NOT NULL, received REAL NOT NULL,
        UNIQUE (meter_id, seq)
    );
    CREATE INDEX events_t ON events (meter_id, t);
    CREATE TABLE rt (
        meter_id TEXT NOT NULL, t INTEGER NOT NULL, p_w REAL,
        rec TEXT NOT NULL
    );
    CREATE INDEX rt_t ON rt (meter_id, t);
    CREATE TABLE status_log (
        meter_id TEXT NOT NULL, t REAL NOT NULL, online INTEGER,
        status TEXT NOT NULL
    );
    CREATE INDEX status_log_m ON status_log (meter_id, t);
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        t REAL NOT NULL, topic TEXT, payload BLOB, reason TEXT NOT NULL
    );
    """),
    (2, """
    CREATE TABLE cmd_counter (           -- last HMAC counter used per meter (lipari cmd)
        meter_id TEXT PRIMARY KEY, ctr INTEGER NOT NULL
    );
    """),
    (3, """
    -- when ingest wrote a live reading (as for intervals and events): latency measurements
    ALTER TABLE rt ADD COLUMN received REAL;
    """),
    (4, """
    CREATE TABLE ota_rollouts (          -- one `lipari ota push` (headend/ota_store.py)
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        version TEXT NOT NULL, release_dir TEXT NOT NULL, created REAL NOT NULL,
        state TEXT NOT NULL,             -- running, done, halted
        stages TEXT NOT NULL,            -- JSON list of cumulative shares (percent)
        max_fail REAL NOT NULL, reason TEXT, by_user TEXT
    );
    CREATE TABLE ota_targets (           -- one meter of a rollout
        rollout_id INTEGER NOT NULL, meter_id TEXT NOT NULL, stage INTEGER NOT NULL,
        offer_id TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,             -- waiting, offered, then what the meter reports
        outcome TEXT,                    -- ok, failed (final), NULL while open
        reason TEXT, done INTEGER, total INTEGER, updated REAL,
        UNIQUE (rollout_id, meter_id)
    );
    CREATE TABLE ota_state (             -- the last ota/state message of each meter
        meter_id TEXT PRIMARY KEY, t REAL NOT NULL, state TEXT NOT NULL
    );
    CREATE TABLE ota_log (               -- every state change a meter reported
        meter_id TEXT NOT NULL, t REAL NOT NULL, state TEXT NOT NULL
    );
    CREATE INDEX ota_log_m ON ota_log (meter_id, t);
    """),
    (5, """
    -- An interval keeps its payload (raw) and no longer a JSON copy of the decoded record
    -- beside it: rec is NULL where raw is there, and Store.intervals decodes raw (building
    -- the copy cost the ingest ~8 us a record, docs/decisions/0015). Rows stored before
    -- keep theirs. SQLite cannot drop a NOT NULL: the table is rebuilt (PostgreSQL:
    -- headend/store_pg.py alters the column instead).
    CREATE TABLE intervals_v5 (
        meter_id TEXT NOT NULL, seq INTEGER NOT NULL,
        t_end INTEGER, dur_s INTEGER, flags INTEGER, tariff INTEGER,
        ai_wh INTEGER, ae_wh INTEGER, ap_vah INTEGER, pmax_w INTEGER,
        sags INTEGER, swells INTEGER,
        rec TEXT,                        -- the decoded record, JSON; NULL: decode raw
        raw BLOB,                        -- the payload as received
        received REAL NOT NULL,
        UNIQUE (meter_id, seq),
        CHECK (rec IS NOT NULL OR raw IS NOT NULL)
    );
    INSERT INTO intervals_v5 (meter_id, seq, t_end, dur_s, flags, tariff, ai_wh, ae_wh,
        ap_vah, pmax_w, sags, swells, rec, raw, received)
        SELECT meter_id, seq, t_end, dur_s, flags, tariff, ai_wh, ae_wh, ap_vah, pmax_w,
        sags, swells, rec, raw, received FROM intervals;
    DROP TABLE intervals;
    ALTER TABLE intervals_v5 RENAME TO intervals;
    CREATE INDEX intervals_t ON intervals (meter_id, t_end);
    """),
    (6, """
    -- A live reading is stored as its payload too (docs/decisions/0015, addendum): rec is
    -- NULL where raw is there and Store.rt decodes raw into what the JSON copy read back
    -- as (keys sorted, lists). Rows stored before keep their JSON. SQLite rebuilds the
    -- table (PostgreSQL: headend/store_pg.py alters it).
    CREATE TABLE rt_v6 (
        meter_id TEXT NOT NULL, t INTEGER NOT NULL, p_w REAL,
        rec TEXT,                        -- the decoded record, JSON; NULL: decode raw
        received REAL,
        raw BLOB,                        -- the payload as received
        CHECK (rec IS NOT NULL OR raw IS NOT NULL)
    );
    INSERT INTO rt_v6 (meter_id, t, p_w, rec, received)
        SELECT meter_id, t, p_w, rec, received FROM rt;
    DROP TABLE rt;
    ALTER TABLE rt_v6 RENAME TO rt;
    CREATE INDEX rt_t ON rt (meter_id, t);
    """),
    (7, """
    -- Each meter's last_seen and p_w as ingest sets them at every commit, in a narrow table
    -- of their own: in a large fleet nearly every record of a commit group is another
    -- meter, and the upsert rewrote a page of the wide meters table (its rows carry the
    -- status JSON) per meter touched: ~4 of the ~11 us a message the commit took in the
    -- fleet mix (docs/decisions/0019). meters.last_seen is still set by a status message;
    -- Store.meters() reads the later of the two, and p_w from here.
    CREATE TABLE meter_seen (
        meter_id TEXT PRIMARY KEY,
        last_seen REAL, p_w REAL
    ) WITHOUT ROWID;
    INSERT INTO meter_seen (meter_id, last_seen, p_w)
        SELECT id, last_seen, p_w FROM meters WHERE p_w IS NOT NULL;
    """),
]


def _path_from_url(url):
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return path or ":memory:"
    if url.startswith("sqlite:"):
        return url[len("sqlite:"):] or ":memory:"
    if url.startswith(("postgres:", "postgresql:")):
        raise StoreError("PostgreSQL is not supported yet; use a sqlite:///path URL")
    if "://" not in url:
        return url                        # a bare file name
    raise StoreError("unknown database URL %r; use sqlite:///relative/path.db or "
                     "sqlite:////absolute/path.db" % url)


def _count(v):
    """sags / swells: an int, or a list per phase (what the firmware sends) -> total."""
    return sum(v) if isinstance(v, (list, tuple)) else v


_SCALARS = frozenset((int, float, str, bool, type(None)))


def _as_json(v):
    """v as json.loads(json.dumps(v, sort_keys=True)) returns it (dict keys sorted, tuples
    as lists), without the text in between. A list of scalars is returned as it is: a
    decoded record's lists are its own."""
    t = type(v)
    if t is dict:
        return {k: _as_json(v[k]) for k in sorted(v)}
    if t is list or t is tuple:
        if t is list and all(type(x) in _SCALARS for x in v):
            return v
        return [_as_json(x) for x in v]
    return v


class Store:
    def __init__(self, url="sqlite:///var/lipari.db", rt_min_s=0, rt_keep_s=7 * 86400):
        """rt_min_s: keep at most one live reading per meter per rt_min_s seconds
        (down-sampling; 0 keeps all). rt_keep_s: live readings older than this are pruned."""
        self.url = url
        self.rt_min_s = rt_min_s
        self.rt_keep_s = rt_keep_s
        self._lock = threading.RLock()
        self._last_rt = {}
        self._touched = {}               # meter_id -> (last_seen, p_w) until commit()
        self._known = set()              # meters with a row in meters (committed or in
        #                                  this transaction; emptied by rollback())
        self._rt_prune_at = time.monotonic() + self.RT_PRUNE_S   # the next rt prune
        path = _path_from_url(url)
        if path != ":memory:":
            d = os.path.dirname(path)
            if d:
                try:
                    os.makedirs(d, exist_ok=True)
                except OSError as e:
                    raise StoreError("cannot create the database directory %s: %s" % (d, e))
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, timeout=10,
                                      isolation_level="DEFERRED")
            self.db.row_factory = sqlite3.Row
            if path != ":memory:":
                self._wal()
            self.db.execute("PRAGMA synchronous=FULL")   # committed = on disk before the ack
            self.db.execute("PRAGMA cache_size=-%d" % self.CACHE_KIB)
            self.db.execute("PRAGMA wal_autocheckpoint=%d" % self.WAL_CHECKPOINT_PAGES)
            self._migrate()
        except sqlite3.Error as e:
            raise StoreError("cannot open database %s: %s (check the path and permissions)"
                             % (path, e))

    # A large fleet's commit group touches two index leaves per interval record, each of
    # another meter (the indexes are by meter): ~20,000 hot pages at 10,000 meters. With
    # SQLite's default 2 MiB page cache nearly every insert read its leaves back from the
    # file, and with the default checkpoint every 1,000 WAL pages nearly every commit also
    # copied its pages into the database file. In process, the fleet mix on a database of
    # 600,000 intervals: 54 -> 39 us a message (docs/decisions/0019). The cache is a
    # bound (filled only as pages are read); the WAL grows to ~80 MB between checkpoints.
    CACHE_KIB = 128 * 1024
    WAL_CHECKPOINT_PAGES = 20000

    # -- schema ---------------------------------------------------------------------
    WAL_TRIES = 100                      # x 0.05 s

    def _wal(self):
        # Switching a new database to WAL needs it alone for a moment: a second process
        # opening it then (ingest workers starting together) gets "database is locked" at
        # once, without the busy timeout. Retried, bounded.
        for attempt in range(self.WAL_TRIES):
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == self.WAL_TRIES - 1:
                    raise
                time.sleep(0.05)

    def _migrate(self):
        with self._lock:
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_version "
                            "(version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
            self.db.commit()
            have = {r[0] for r in self.db.execute("SELECT version FROM schema_version")}
            for version, sql in MIGRATIONS:
                if version in have or self.db.execute(
                        "SELECT 1 FROM schema_version WHERE version = ?", (version,)).fetchall():
                    continue
                # IMMEDIATE: wait (busy timeout) for a process migrating at the same time
                # and read the schema after it; a migration it applied meanwhile fails
                # here as a whole (its version is taken) and is rolled back
                try:
                    self.db.executescript("BEGIN IMMEDIATE;" + sql + ";INSERT INTO schema_version "
                                          "VALUES (%d, %f); COMMIT;" % (version, time.time()))
                except sqlite3.Error:
                    self.db.rollback()
                    # another process may have migrated at the same time
                    again = {r[0] for r in self.db.execute("SELECT version FROM schema_version")}
                    if version not in again:
                        raise

    def schema_version(self):
        with self._lock:
            return self.db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]

    # -- writes ---------------------------------------------------------------------
    def _touch(self, meter_id, now, p_w=None):
        # Applied once per meter at commit(): ingest commits a group of records at a
        # time, and an upsert per record doubled the statements on its hot path.
        if p_w is None:
            prev = self._touched.get(meter_id)
            p_w = prev[1] if prev is not None else None
        self._touched[meter_id] = (now, p_w)

    _SEEN_SQL = ("INSERT INTO meter_seen (meter_id, last_seen, p_w) VALUES (?, ?, ?) "
                 "ON CONFLICT(meter_id) DO UPDATE SET last_seen = excluded.last_seen, "
                 "p_w = COALESCE(excluded.p_w, meter_seen.p_w)")

    def _flush_touches(self):
        t = self._touched
        if not t:
            return
        self._touched = {}
        # a meter first seen through a record gets its row in meters (the list of meters);
        # the ones known to have it cost nothing here
        new = [(m,) for m in t if m not in self._known]
        if new:
            self.db.executemany("INSERT OR IGNORE INTO meters (id) VALUES (?)", new)
            self._known.update(m for m, in new)
        # one statement for the group into the narrow table (migration 7): with a large
        # fleet nearly every record of a commit group is another meter
        self.db.executemany(self._SEEN_SQL,
                            [(meter_id, now, p_w) for meter_id, (now, p_w) in t.items()])

    # Ingest writes a whole group of messages per commit: one statement per table and
    # group (executemany; PgStore sends them pipelined) instead of one per record.
    # `received` is the group's stamp, taken just before the rows are written.
    _INTERVAL_SQL = ("INSERT OR IGNORE INTO intervals (meter_id, seq, t_end, dur_s, flags, "
                     "tariff, ai_wh, ae_wh, ap_vah, pmax_w, sags, swells, rec, raw, received) "
                     "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
    _EVENT_SQL = ("INSERT OR IGNORE INTO events (meter_id, seq, t, kind, phase, value, rec, "
                  "received) VALUES (?,?,?,?,?,?,?,?)")
    _RT_SQL = "INSERT INTO rt (meter_id, t, p_w, rec, raw, received) VALUES (?,?,?,?,?,?)"

    def _insert_many(self, sql, rows):
        """Insert rows with one statement; returns how many were new."""
        if not rows:
            return 0
        cur = self.db.executemany(sql, rows)
        n = cur.rowcount
        return len(rows) if n is None or n < 0 else n

    def add_intervals(self, items, received=None, from_raw=False):
        """Store billing intervals: items = [(meter_id, seq, rec, raw)]. Returns how many
        were new; the others were already stored (redeliveries: the stored copy is kept).
        from_raw: each rec is what headend.codec.decode made of its raw (as in ingest): no
        JSON copy of rec is stored beside a raw then, intervals() decodes raw."""
        now = time.time() if received is None else received
        rows = []
        add = rows.append
        with self._lock:
            touched = self._touched
            for meter_id, seq, rec, raw in items:
                g = rec.get
                sags, swells = g("sags"), g("swells")
                add((meter_id, int(seq), g("t_end"), g("dur_s"), g("flags"), g("tariff"),
                     g("ai_wh"), g("ae_wh"), g("ap_vah"), g("pmax_w"),
                     _count(sags), _count(swells),
                     None if from_raw and raw is not None
                     else json.dumps(rec, separators=(",", ":")),
                     raw, now))
                # _touch inlined (an interval carries no power reading: p_w is kept)
                prev = touched.get(meter_id)
                touched[meter_id] = (now, None if prev is None else prev[1])
            return self._insert_many(self._INTERVAL_SQL, rows)

    def add_interval_rows(self, items, received=None):
        """Store billing intervals as ingest has them: items = [(meter_id, columns, raw)],
        columns = headend.codec.interval_row(raw) (codec.INTERVAL_COLUMNS). The payload is
        the record: no JSON copy beside it (intervals() decodes raw). Returns how many
        were new; the others were already stored, (meter, seq) being UNIQUE (INSERT OR
        IGNORE: the database finds the duplicates, inside a group and across groups)."""
        now = time.time() if received is None else received
        rows = []
        add = rows.append
        with self._lock:
            touched = self._touched
            for meter_id, cols, raw in items:
                add((meter_id,) + cols + (None, raw, now))
                prev = touched.get(meter_id)       # _touch inlined, p_w kept
                touched[meter_id] = (now, None if prev is None else prev[1])
            return self._insert_many(self._INTERVAL_SQL, rows)

    def add_interval(self, meter_id, seq, rec, raw=None):
        """Store one billing interval. Returns False when (meter_id, seq) is already stored
        (a redelivery): the stored copy is kept."""
        return self.add_intervals([(meter_id, seq, rec, raw)]) == 1

    def add_events(self, items, received=None):
        """Store events: items = [(meter_id, seq, rec)]. Returns how many were new."""
        now = time.time() if received is None else received
        rows = []
        with self._lock:
            for meter_id, seq, rec in items:
                v = rec.get("value")
                rows.append((meter_id, int(seq), rec.get("t"), rec.get("kind"),
                             rec.get("phase"), None if v is None else str(v),
                             json.dumps(rec, sort_keys=True), now))
                self._touch(meter_id, now)
            return self._insert_many(self._EVENT_SQL, rows)

    def add_event(self, meter_id, seq, rec):
        """Store one event. Returns False for a duplicate (meter_id, seq)."""
        return self.add_events([(meter_id, seq, rec)]) == 1

    def add_rts(self, items, received=None, from_raw=False):
        """Store live readings: items = [(meter_id, rec)] or [(meter_id, rec, raw)],
        down-sampled to one per rt_min_s per meter, and update each meter's last_seen and
        p_w. Returns how many were stored. from_raw: each rec is what headend.codec.decode
        made of its raw (as in ingest): no JSON copy is stored beside a raw, rt() decodes
        raw (as for intervals, docs/decisions/0015)."""
        rows = []
        for item in items:
            meter_id, rec = item[0], item[1]
            raw = item[2] if len(item) > 2 else None
            rows.append((meter_id, rec.get("t"), _p_w(rec), raw,
                         None if from_raw and raw is not None
                         else json.dumps(rec, sort_keys=True)))
        return self.add_rt_rows(rows, received)

    def add_rt_rows(self, items, received=None):
        """Store live readings as ingest has them: items = [(meter_id, t, p_w, raw)] with
        (t, p_w) = headend.codec.rt_row(raw) (rt() decodes raw), or
        [(meter_id, t, p_w, raw, JSON copy of the record)]; down-sampled as add_rts, and
        each meter's last_seen and p_w updated. Returns how many were stored."""
        now = time.time() if received is None else received
        rows = []
        with self._lock:
            last_rt = self._last_rt
            for item in items:
                meter_id, t, p_w, raw = item[0], item[1], item[2], item[3]
                t = t or int(now)
                self._touch(meter_id, now, p_w)
                last = last_rt.get(meter_id)
                if last is not None and self.rt_min_s and t - last < self.rt_min_s and t >= last:
                    continue
                last_rt[meter_id] = t
                rows.append((meter_id, t, p_w, item[4] if len(item) > 4 else None, raw, now))
            n = self._insert_many(self._RT_SQL, rows)
            if n and self.rt_keep_s and time.monotonic() >= self._rt_prune_at:
                self._prune_rt(now)
            return n

    # The prune scans the rt table (its index is by meter): it ran every 1,000 readings,
    # i.e. several times a second at a fleet's rate, over a table that only grows between
    # prunes (the fleet bench's worker spent ~5 % of its samples there, py-spy). A reading
    # is kept rt_keep_s (a week): pruning once every RT_PRUNE_S keeps it within that.
    RT_PRUNE_S = 600

    def _prune_rt(self, now):
        self.db.execute("DELETE FROM rt WHERE t < ?", (int(now) - self.rt_keep_s,))
        self._rt_prune_at = time.monotonic() + self.RT_PRUNE_S

    def add_rt(self, meter_id, rec):
        """Store a live reading (down-sampled to one per rt_min_s per meter) and update the
        meter's last_seen and p_w. Returns True if the reading was stored."""
        return self.add_rts([(meter_id, rec)]) == 1

    def set_status(self, meter_id, status):
        """Record a status message (birth or last will). A change of online/transport/fw/
        board is appended to status_log."""
        now = time.time()
        online = 1 if status.get("online", status.get("state") == "online") else 0
        with self._lock:
            row = self.db.execute("SELECT online, transport, fw, board FROM meters WHERE id = ?",
                                  (meter_id,)).fetchone()
            new = (online, status.get("transport"), status.get("fw"), status.get("board"))
            changed = row is None or tuple(row) != new
            if row is None:
                self.db.execute("INSERT INTO meters (id) VALUES (?)", (meter_id,))
            # an offline will carries no transport/fw: keep what the birth said
            self.db.execute(
                "UPDATE meters SET online = ?, transport = COALESCE(?, transport), "
                "fw = COALESCE(?, fw), board = COALESCE(?, board), "
                "signal = COALESCE(?, signal), last_seen = ?, status = ? WHERE id = ?",
                (online, status.get("transport"), status.get("fw"), status.get("board"),
                 status.get("signal"), now, json.dumps(status, sort_keys=True), meter_id))
            if changed:
                self.db.execute("INSERT INTO status_log (meter_id, t, online, status) "
                                "VALUES (?,?,?,?)",
                                (meter_id, now, online, json.dumps(status, sort_keys=True)))

    def quarantine(self, topic, payload, reason):
        """Keep a message that could not be decoded or stored, with the reason."""
        if isinstance(payload, str):
            payload = payload.encode()
        with self._lock:
            self.db.execute("INSERT INTO quarantine (t, topic, payload, reason) VALUES (?,?,?,?)",
                            (time.time(), topic, bytes(payload) if payload is not None else None,
                             str(reason)))

    def next_cmd_counter(self, meter_id, floor=0):
        """A command counter larger than any used before for this meter (committed)."""
        with self._lock:
            row = self.db.execute("SELECT ctr FROM cmd_counter WHERE meter_id = ?",
                                  (meter_id,)).fetchone()
            ctr = max(int(floor), (row[0] + 1) if row else 1)
            self.db.execute("INSERT INTO cmd_counter (meter_id, ctr) VALUES (?, ?) "
                            "ON CONFLICT(meter_id) DO UPDATE SET ctr = excluded.ctr",
                            (meter_id, ctr))
            self.db.commit()
            return ctr

    def commit(self):
        with self._lock:
            self._flush_touches()
            self.db.commit()

    def rollback(self):
        with self._lock:
            self._touched = {}
            self._known = set()          # rows inserted in this transaction are gone
            self.db.rollback()

    def close(self):
        with self._lock:
            try:
                self._flush_touches()
                self.db.commit()
            finally:
                self.db.close()

    # -- queries --------------------------------------------------------------------
    def _rows(self, sql, args=()):
        with self._lock:
            return [dict(r) for r in self.db.execute(sql, args)]

    def meters(self):
        """[{id, online, transport, fw, board, signal, last_seen, p_w}] sorted by id."""
        with self._lock:
            self._flush_touches()
        # last_seen: the later of a status message's (meters) and a record's (meter_seen)
        rows = self._rows(
            "SELECT m.id AS id, m.online AS online, m.transport AS transport, m.fw AS fw, "
            "m.board AS board, m.signal AS signal, CASE WHEN s.last_seen IS NULL OR "
            "m.last_seen > s.last_seen THEN m.last_seen ELSE s.last_seen END AS last_seen, "
            "COALESCE(s.p_w, m.p_w) AS p_w FROM meters m LEFT JOIN meter_seen s "
            "ON s.meter_id = m.id ORDER BY m.id")
        for r in rows:
            r["online"] = bool(r["online"])
        return rows

    def _with_rec(self, rows, key="rec", as_json=False):
        """as_json: a record decoded from its payload is made what its JSON copy (stored
        with sort_keys) read back as, so old and new rows of a table read alike."""
        out = []
        for r in rows:
            d = r.pop(key)
            if d is None:                    # a record stored with its payload only
                d = decode(r.pop("raw"))[1]
                if as_json:
                    d = _as_json(d)
            else:
                r.pop("raw", None)
                d = json.loads(d)
            d.update({k: v for k, v in r.items() if v is not None and k not in d})
            out.append(d)
        return out

    def intervals(self, meter_id, t0=None, t1=None):
        """Interval records (full decoded dicts plus meter_id, received) with
        t0 <= t_end < t1, ordered by t_end then seq."""
        return self._with_rec(self._rows(
            "SELECT meter_id, seq, received, rec, raw FROM intervals WHERE meter_id = ? "
            "AND t_end >= ? AND t_end < ? ORDER BY t_end, seq",
            (meter_id, -1 << 62 if t0 is None else t0, 1 << 62 if t1 is None else t1)))

    def interval_gaps(self, meter_id):
        """Missing interval sequence numbers of a meter: [(first, last), ...]. Sequence
        numbers are contiguous per meter, so a gap is a record that never arrived."""
        rows = self._rows(
            "SELECT prev + 1 AS first, seq - 1 AS last FROM (SELECT seq, LAG(seq) OVER "
            "(ORDER BY seq) AS prev FROM intervals WHERE meter_id = ?) AS s "
            "WHERE seq - prev > 1 ORDER BY first", (meter_id,))
        return [(r["first"], r["last"]) for r in rows]

    def events(self, meter_id, t0=None, t1=None):
        """Event records with t0 <= t < t1 (meter_id None = all meters), ordered by t."""
        a = (-1 << 62 if t0 is None else t0, 1 << 62 if t1 is None else t1)
        if meter_id is None:
            rows = self._rows("SELECT meter_id, seq, received, rec FROM events WHERE t >= ? "
                              "AND t < ? ORDER BY t, meter_id, seq", a)
        else:
            rows = self._rows("SELECT meter_id, seq, received, rec FROM events WHERE "
                              "meter_id = ? AND t >= ? AND t < ? ORDER BY t, seq", (meter_id,) + a)
        return self._with_rec(rows)

    def rt(self, meter_id, t0=None, t1=None):
        """Live readings with t0 <= t < t1, ordered by t."""
        return self._with_rec(self._rows(
            "SELECT meter_id, t, rec, raw FROM rt WHERE meter_id = ? AND t >= ? AND t < ? "
            "ORDER BY t",
            (meter_id, -1 << 62 if t0 is None else t0, 1 << 62 if t1 is None else t1)),
            as_json=True)

    def status_log(self, meter_id):
        """Status changes of one meter, oldest first: [{t, online, status}]."""
        rows = self._rows("SELECT t, online, status FROM status_log WHERE meter_id = ? "
                          "ORDER BY t, rowid", (meter_id,))
        for r in rows:
            r["online"] = bool(r["online"])
            r["status"] = json.loads(r["status"])
        return rows

    def quarantined(self, limit=1000):
        """Quarantined messages, newest first: [{id, t, topic, payload, reason}]."""
        return self._rows("SELECT id, t, topic, payload, reason FROM quarantine "
                          "ORDER BY id DESC LIMIT ?", (limit,))
