"""OTA state in the head-end store (tables of migration 3 in headend/store.py): rollouts,
their target meters, and what each meter last reported on lipari/v1/<id>/ota/state.

Functions take a Store (SQLite or PostgreSQL) and commit what they write themselves.
"""
import json
import time

FINAL_OK = ("confirmed",)
FINAL_FAIL = ("refused", "failed", "rolled_back")


def outcome(state, reason=None):
    """A meter's reported state -> "ok", "failed" or None (still going)."""
    if state in FINAL_OK:
        return "ok"
    if state == "refused" and (reason or "").startswith("installed"):
        return "ok"                      # it already runs that version
    if state in FINAL_FAIL:
        return "failed"
    return None


def _w(store, sql, args=()):
    with store._lock:
        cur = store.db.execute(sql, args)
        store.db.commit()
        return cur


def _rows(store, sql, args=()):
    with store._lock:
        return [dict(zip(r.keys(), tuple(r))) for r in store.db.execute(sql, args).fetchall()]


def new_rollout(store, version, release_dir, stages, max_fail, by_user=None):
    with store._lock:
        store.db.execute("INSERT INTO ota_rollouts (version, release_dir, created, state, "
                         "stages, max_fail, by_user) VALUES (?, ?, ?, 'running', ?, ?, ?)",
                         (version, release_dir, time.time(), json.dumps(stages), max_fail,
                          by_user))
        rid = store.db.execute("SELECT MAX(id) FROM ota_rollouts").fetchone()[0]
        store.db.commit()
    return rid


def add_target(store, rollout_id, meter_id, stage, offer_id):
    _w(store, "INSERT INTO ota_targets (rollout_id, meter_id, stage, offer_id, state, updated) "
       "VALUES (?, ?, ?, ?, 'waiting', ?)", (rollout_id, meter_id, stage, offer_id, time.time()))


def set_target(store, offer_id, state, reason=None, done=None, total=None, final=None):
    """Update a target from its meter's report (or the pusher: offered, timeout).
    Returns the target row, or None for an unknown offer id."""
    oc = final if final is not None else outcome(state, reason)
    _w(store, "UPDATE ota_targets SET state = ?, reason = COALESCE(?, reason), "
       "done = COALESCE(?, done), total = COALESCE(?, total), updated = ?, "
       "outcome = COALESCE(outcome, ?) WHERE offer_id = ?",
       (state, reason, done, total, time.time(), oc, offer_id))
    r = _rows(store, "SELECT * FROM ota_targets WHERE offer_id = ?", (offer_id,))
    return r[0] if r else None


def set_rollout(store, rollout_id, state, reason=None):
    _w(store, "UPDATE ota_rollouts SET state = ?, reason = ? WHERE id = ?",
       (state, reason, rollout_id))


def record_state(store, meter_id, st):
    """A meter's ota/state message (dict): kept as its current state, and in the log
    when it differs from the previous one."""
    text = json.dumps(st, sort_keys=True)
    now = time.time()
    with store._lock:
        prev = store.db.execute("SELECT state FROM ota_state WHERE meter_id = ?",
                                (meter_id,)).fetchone()
        store.db.execute("INSERT INTO ota_state (meter_id, t, state) VALUES (?, ?, ?) "
                         "ON CONFLICT (meter_id) DO UPDATE SET t = excluded.t, "
                         "state = excluded.state", (meter_id, now, text))
        if prev is None or _strip_t(prev[0]) != _strip_t(text):
            store.db.execute("INSERT INTO ota_log (meter_id, t, state) VALUES (?, ?, ?)",
                             (meter_id, now, text))
        store.db.commit()


def _strip_t(text):
    d = json.loads(text)
    d.pop("t", None)
    if d.get("state") == "downloading":
        d.pop("done", None)                # progress alone is not a change worth a row
    return d


def meter_state(store, meter_id):
    """What the dashboard shows: current state, history, and the open rollout target."""
    cur = _rows(store, "SELECT t, state FROM ota_state WHERE meter_id = ?", (meter_id,))
    log = _rows(store, "SELECT t, state FROM ota_log WHERE meter_id = ? ORDER BY t DESC "
                "LIMIT 20", (meter_id,))
    tg = _rows(store, "SELECT t.*, r.version FROM ota_targets t JOIN ota_rollouts r ON "
               "r.id = t.rollout_id WHERE t.meter_id = ? ORDER BY t.updated DESC LIMIT 1",
               (meter_id,))
    st = dict(json.loads(cur[0]["state"]), received=cur[0]["t"]) if cur else None
    return {"meter_id": meter_id, "state": st,
            "log": [dict(json.loads(r["state"]), received=r["t"]) for r in log],
            "target": tg[0] if tg else None}


def rollout(store, rollout_id):
    r = _rows(store, "SELECT * FROM ota_rollouts WHERE id = ?", (rollout_id,))
    if not r:
        return None
    r = r[0]
    r["stages"] = json.loads(r["stages"])
    r["targets"] = _rows(store, "SELECT * FROM ota_targets WHERE rollout_id = ? ORDER BY "
                         "stage, meter_id", (rollout_id,))
    return r


def rollouts(store, limit=20):
    return [rollout(store, r["id"]) for r in
            _rows(store, "SELECT id FROM ota_rollouts ORDER BY id DESC LIMIT ?", (limit,))]


def target_by_offer(store, offer_id):
    r = _rows(store, "SELECT t.*, r.release_dir FROM ota_targets t JOIN ota_rollouts r ON "
              "r.id = t.rollout_id WHERE t.offer_id = ?", (offer_id,))
    return r[0] if r else None
