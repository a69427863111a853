"""Head-end users: roles, passwords (argon2id via argon2-cffi), sessions, API tokens.

Roles, each including the ones before it:
  viewer    reads (a viewer can be limited to its own meters: a customer's account)
  operator  + ping, get, time, reboot and the reporting settings (headend/policy.py)
  admin     + calibrate, preset, reset, every other setting, OTA, users

`lipari user` manages them on the server:

    lipari user add alice --role operator          # prints a generated password once
    lipari user add shop --role viewer --meters meter-1,meter-4
    lipari user passwd alice                       # a new generated password (or --stdin)
    lipari user token alice --label nightly-export [--role viewer]   # prints the token once
    lipari user list | disable NAME | enable NAME | revoke TOKEN_ID
"""
import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from headend.accounts_db import AccountsDB

ROLES = ("viewer", "operator", "admin")
RANK = {r: k for k, r in enumerate(ROLES)}
NAME_RX = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
SESSION_S = 12 * 3600
TOKEN_PREFIX = "lip_"
_ph = PasswordHasher()


class UserError(ValueError):
    """A user operation that cannot be done; the message says why."""


def at_least(role, need):
    return RANK.get(role, -1) >= RANK[need]


def _sha(s):
    return hashlib.sha256(s.encode()).hexdigest()


def new_password():
    return secrets.token_urlsafe(15)


class Principal:
    """Who makes a request: user name, role, the meters it may see (None = all), how it
    authenticated ("session" or "token"), and for a session its CSRF token."""

    def __init__(self, name, role, meters=None, via="session", csrf=None, session=None):
        self.name = name
        self.role = role
        self.meters = meters
        self.via = via
        self.csrf = csrf
        self.session = session

    def can(self, role):
        return at_least(self.role, role)

    def sees(self, meter_id):
        return self.meters is None or meter_id in self.meters


class Users:
    def __init__(self, db):
        self.db = db if isinstance(db, AccountsDB) else AccountsDB(db)

    # -- users ----------------------------------------------------------------------------
    def get(self, name):
        r = self.db.rows("SELECT name, role, pw_hash, meters, disabled, created FROM users "
                         "WHERE name = ?", (name,))
        if not r:
            return None
        u = r[0]
        u["meters"] = json.loads(u["meters"]) if u["meters"] else None
        u["disabled"] = bool(u["disabled"])
        return u

    def list(self):
        out = []
        for u in self.db.rows("SELECT name, role, meters, disabled, created FROM users "
                              "ORDER BY name"):
            u["meters"] = json.loads(u["meters"]) if u["meters"] else None
            u["disabled"] = bool(u["disabled"])
            out.append(u)
        return out

    def count(self):
        return self.db.rows("SELECT COUNT(*) AS n FROM users")[0]["n"]

    @staticmethod
    def check(name, role, meters):
        if not isinstance(name, str) or not NAME_RX.match(name):
            raise UserError("user name %r: 1..64 of A-Z a-z 0-9 _ . @ -" % (name,))
        if role not in ROLES:
            raise UserError("role %r: one of %s" % (role, ", ".join(ROLES)))
        if meters is not None:
            if not isinstance(meters, (list, tuple)) or not all(
                    isinstance(m, str) and 0 < len(m) <= 64 for m in meters):
                raise UserError("meters must be a list of meter ids")

    def add(self, name, role, password=None, meters=None):
        """Create a user; -> the password (generated when none is given)."""
        self.check(name, role, meters)
        if self.get(name) is not None:
            raise UserError("user %r exists (lipari user passwd %s sets a new password)"
                            % (name, name))
        password = password or new_password()
        if len(password) < 10:
            raise UserError("a password needs at least 10 characters")
        self.db.execute("INSERT INTO users (name, role, pw_hash, meters, disabled, created) "
                        "VALUES (?, ?, ?, ?, 0, ?)",
                        (name, role, _ph.hash(password),
                         json.dumps(sorted(set(meters))) if meters is not None else None,
                         time.time()))
        return password

    def update(self, name, role=None, meters=False, disabled=None):
        """Change role, meters (None = all; False = leave) or disabled. A disabled user's
        sessions and tokens stop working at once."""
        u = self.get(name)
        if u is None:
            raise UserError("no user %r" % name)
        role = role or u["role"]
        meters = u["meters"] if meters is False else meters
        self.check(name, role, meters)
        self.db.execute("UPDATE users SET role = ?, meters = ?, disabled = ? WHERE name = ?",
                        (role, json.dumps(sorted(set(meters))) if meters is not None else None,
                         int(u["disabled"] if disabled is None else bool(disabled)), name))
        if disabled:
            self.db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))

    def set_password(self, name, password=None):
        if self.get(name) is None:
            raise UserError("no user %r" % name)
        password = password or new_password()
        if len(password) < 10:
            raise UserError("a password needs at least 10 characters")
        self.db.execute("UPDATE users SET pw_hash = ? WHERE name = ?", (_ph.hash(password), name))
        self.db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
        return password

    def verify(self, name, password):
        """The user dict when name and password match an enabled user, else None (the
        hash is computed either way, so the time does not tell whether the user exists)."""
        u = self.get(name) if isinstance(name, str) else None
        h = u["pw_hash"] if u else _DUMMY
        try:
            ok = _ph.verify(h, password or "")
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or u is None or u["disabled"]:
            return None
        if _ph.check_needs_rehash(h):
            self.db.execute("UPDATE users SET pw_hash = ? WHERE name = ?",
                            (_ph.hash(password), name))
        return u

    def ensure_first_admin(self, name="admin"):
        """On a database without users: create an admin; -> its password (else None)."""
        if self.count():
            return None
        try:
            return self.add(name, "admin")
        except UserError:          # another process created it at the same moment
            return None

    # -- sessions ---------------------------------------------------------------------------
    def new_session(self, name):
        """-> (cookie value, csrf token)."""
        sid = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = time.time()
        self.db.execute("DELETE FROM sessions WHERE expires < ?", (now,), commit=False)
        self.db.execute("INSERT INTO sessions (id_hash, user_name, csrf, created, expires) "
                        "VALUES (?, ?, ?, ?, ?)", (_sha(sid), name, csrf, now, now + SESSION_S))
        return sid, csrf

    def session(self, sid):
        """The Principal of a live session cookie, or None."""
        if not sid or len(sid) > 200:
            return None
        r = self.db.rows("SELECT user_name, csrf, expires FROM sessions WHERE id_hash = ?",
                         (_sha(sid),))
        if not r or r[0]["expires"] < time.time():
            return None
        u = self.get(r[0]["user_name"])
        if u is None or u["disabled"]:
            return None
        return Principal(u["name"], u["role"], u["meters"], "session", r[0]["csrf"], sid)

    def end_session(self, sid):
        if sid:
            self.db.execute("DELETE FROM sessions WHERE id_hash = ?", (_sha(sid),))

    # -- API tokens ---------------------------------------------------------------------
    def new_token(self, name, label=None, role=None):
        """-> (token id, token). The token acts with `role` (default: the user's), never
        more than the user's role at the time of use."""
        u = self.get(name)
        if u is None:
            raise UserError("no user %r" % name)
        role = role or u["role"]
        if role not in ROLES:
            raise UserError("role %r: one of %s" % (role, ", ".join(ROLES)))
        if not at_least(u["role"], role):
            raise UserError("a token of %s cannot have role %s (above the user's %s)"
                            % (name, role, u["role"]))
        tok = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.db.execute("INSERT INTO api_tokens (token_hash, user_name, role, label, created, "
                        "revoked) VALUES (?, ?, ?, ?, ?, 0)",
                        (_sha(tok), name, role, label, time.time()))
        tid = self.db.rows("SELECT id FROM api_tokens WHERE token_hash = ?", (_sha(tok),))[0]["id"]
        return tid, tok

    def token(self, tok):
        """The Principal of a bearer token, or None."""
        if not tok or not tok.startswith(TOKEN_PREFIX) or len(tok) > 200:
            return None
        r = self.db.rows("SELECT user_name, role, revoked FROM api_tokens WHERE token_hash = ?",
                         (_sha(tok),))
        if not r or r[0]["revoked"]:
            return None
        u = self.get(r[0]["user_name"])
        if u is None or u["disabled"]:
            return None
        role = r[0]["role"] if at_least(u["role"], r[0]["role"]) else u["role"]
        return Principal(u["name"], role, u["meters"], "token")

    def tokens(self, name=None):
        sql = "SELECT id, user_name, role, label, created, revoked FROM api_tokens"
        return self.db.rows(sql + (" WHERE user_name = ? ORDER BY id" if name else " ORDER BY id"),
                            (name,) if name else ())

    def revoke(self, token_id):
        cur = self.db.execute("UPDATE api_tokens SET revoked = 1 WHERE id = ?", (int(token_id),))
        if cur.rowcount != 1:
            raise UserError("no token %s" % token_id)


def same(a, b):
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


_DUMMY = _ph.hash("not a password of anyone")


# -- command line ---------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari user", description="Manage head-end users, "
                                "passwords and API tokens")
    p.add_argument("--db", default=os.environ.get("LIPARI_DB", "sqlite:///var/lipari.db"),
                   help="database URL (default sqlite:///var/lipari.db or $LIPARI_DB)")
    sub = p.add_subparsers(dest="op", required=True)
    a = sub.add_parser("add", help="create a user; prints its password once")
    a.add_argument("name")
    a.add_argument("--role", default="viewer", choices=ROLES)
    a.add_argument("--meters", help="comma-separated meter ids it may see (default: all)")
    a.add_argument("--stdin", action="store_true", help="read the password from stdin")
    pw = sub.add_parser("passwd", help="set a new password (generated and printed, or --stdin)")
    pw.add_argument("name")
    pw.add_argument("--stdin", action="store_true")
    t = sub.add_parser("token", help="create an API token; prints it once")
    t.add_argument("name")
    t.add_argument("--label")
    t.add_argument("--role", choices=ROLES, help="act with this role (at most the user's)")
    sub.add_parser("list", help="users and their tokens")
    for op in ("disable", "enable"):
        sub.add_parser(op).add_argument("name")
    sub.add_parser("revoke", help="revoke an API token").add_argument("token_id", type=int)
    args = p.parse_args(argv)
    from headend.store import StoreError
    try:
        users = Users(args.db)
    except StoreError as e:
        print("lipari user: %s" % e, file=sys.stderr)
        return 2

    def stdin_pw():
        return sys.stdin.readline().rstrip("\n") if args.stdin else None
    try:
        if args.op == "add":
            meters = [m for m in args.meters.split(",") if m] if args.meters else None
            given = stdin_pw()
            pw_ = users.add(args.name, args.role, given, meters)
            print("user %s (%s%s) created" % (args.name, args.role,
                                              ", meters " + ",".join(meters) if meters else ""))
            if not given:
                print("password: %s" % pw_)
        elif args.op == "passwd":
            given = stdin_pw()
            pw_ = users.set_password(args.name, given)
            print("password of %s changed; its sessions ended" % args.name)
            if not given:
                print("password: %s" % pw_)
        elif args.op == "token":
            tid, tok = users.new_token(args.name, args.label, args.role)
            print("token %d for %s (send it as 'Authorization: Bearer <token>'; shown once):"
                  % (tid, args.name))
            print(tok)
        elif args.op == "list":
            for u in users.list():
                print("%-20s %-8s %s%s" % (u["name"], u["role"],
                                          ",".join(u["meters"]) if u["meters"] else "all meters",
                                          "  (disabled)" if u["disabled"] else ""))
                for tk in users.tokens(u["name"]):
                    print("    token %d %s%s%s" % (tk["id"], tk["role"],
                                                   " " + tk["label"] if tk["label"] else "",
                                                   " (revoked)" if tk["revoked"] else ""))
        elif args.op in ("disable", "enable"):
            users.update(args.name, disabled=args.op == "disable")
            print("user %s %sd" % (args.name, args.op))
        elif args.op == "revoke":
            users.revoke(args.token_id)
            print("token %d revoked" % args.token_id)
    except UserError as e:
        print("lipari user: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
