"""The append-only audit log: who did what to which meter, when, and what the meter said.

Every command, setting, preset, calibration and OTA push through the web server or the
API is written twice: `sent` before it leaves (so that a crash in between still leaves
the trace) and then its outcome (`ok`, `refused` by the meter, `timeout`, `failed`) with
the meter's answer, tied by `ref`. A request the head-end refuses (role too small) is
written once as `denied`. User administration is written with action `user`. The table
refuses UPDATE and DELETE (triggers, headend/accounts_db.py).

    log = Audit(accounts_db)
    ref = log.sent(principal, "meter-1", "calibrate", {...})
    log.outcome(ref, principal, "meter-1", "calibrate", {...}, "ok", reply)
"""
import csv
import io
import json
import time
import uuid

from headend.policy import command_action

COLUMNS = ("id", "t", "t_utc", "user_name", "role", "via", "meter_id", "action", "cmd", "args",
           "ref", "outcome", "answer")


def _j(v):
    return None if v is None else json.dumps(v, sort_keys=True, default=str)


class Audit:
    def __init__(self, db):
        self.db = db

    def write(self, who, meter_id, action, cmd, args, outcome, answer=None, ref=None):
        self.db.execute("INSERT INTO audit (t, user_name, role, via, meter_id, action, cmd, args, "
                        "ref, outcome, answer) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (time.time(), who.name, who.role, who.via, meter_id, action, cmd,
                         _j(args), ref, outcome, _j(answer)))
        return ref

    def sent(self, who, meter_id, cmd, args, action=None):
        ref = uuid.uuid4().hex[:16]
        return self.write(who, meter_id, action or command_action(cmd), cmd, args, "sent",
                          None, ref)

    def outcome(self, ref, who, meter_id, cmd, args, outcome, answer, action=None):
        return self.write(who, meter_id, action or command_action(cmd), cmd, args, outcome,
                          answer, ref)

    def denied(self, who, meter_id, cmd, args, why, action=None):
        return self.write(who, meter_id, action or command_action(cmd), cmd, args, "denied",
                          {"error": why})

    def entries(self, meter_id=None, meters=None, limit=200, include_global=True):
        """Newest first. meter_id: that meter only; meters: only these (a restricted
        user); include_global: also entries without a meter (user administration)."""
        sql = ("SELECT id, t, user_name, role, via, meter_id, action, cmd, args, ref, outcome, "
               "answer FROM audit")
        args = []
        if meter_id is not None:
            sql += " WHERE meter_id = ?"
            args.append(meter_id)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit) if meters is None and include_global else 100000)
        out = []
        for r in self.db.rows(sql, args):
            if meters is not None and r["meter_id"] not in meters:
                continue
            if not include_global and r["meter_id"] is None:
                continue
            r["args"] = json.loads(r["args"]) if r["args"] else None
            r["answer"] = json.loads(r["answer"]) if r["answer"] else None
            out.append(r)
            if len(out) >= limit:
                break
        return out

    def csv(self, **kw):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(COLUMNS)
        for r in reversed(self.entries(limit=10 ** 9, **kw)):
            w.writerow([r["id"], r["t"], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["t"])),
                        r["user_name"], r["role"], r["via"], r["meter_id"] or "", r["action"],
                        r["cmd"] or "", _j(r["args"]) or "", r["ref"] or "", r["outcome"],
                        _j(r["answer"]) or ""])
        return buf.getvalue()
