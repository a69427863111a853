# Commands from the head-end (topic lipari/v1/<id>/cmd) and their replies (.../resp).
# Specified in docs/protocol.md ("Commands"): JSON requests matched by "id"; every request
# gets exactly one reply, an error reply names the problem; nothing here raises.
#
# Commands that touch money or safety (counters, calibration, tariff, clock, reboot) need an HMAC-SHA256 over id, a counter that must increase, and the exact body
# text, with a per-meter key; the counter is stored before the command runs, so a replay
# is refused even after a reboot. A signature is checked before anything else, the cache
# of replies to redelivered requests included: an unsigned request reusing the id of a
# signed one gets "bad_signature", never the signed one's cached reply.
#
# What this module needs from the meter (the lead wires a Meter to it; methods may be
# plain functions or coroutines):
#   readings() -> dict                 latest live reading (rt record)
#   counters() -> dict                 energy registers and diagnostic counters
#   config_get() -> dict               current settings
#   config_set(key, value)             apply one validated setting (ValueError if refused)
#   preset_counters(values, phase)     set energy registers (values: {"ai_wh": n, ...})
#   calibrate(args) -> dict            calibrate against reference values
#   raw_rows(chip, rows) -> [int]      raw STPM3x register rows
#   set_time(epoch_s)                  set the wall clock
#   reboot()                           restart (called after the reply was sent)
import json
import hashlib

from util import lookup, sleep_ms

try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

MAX_CMD_BYTES = const(1024)
_CACHE = const(8)
# The redelivery cache holds the replies themselves: a reply to `get` is up to ~1 KB, so
# eight of them would hold 8 KB of the heap for good (issue 7). Beyond this many bytes
# of replies the oldest entries go (the newest always stays: a redelivery follows its
# original closely, at the next reconnect).
_CACHE_BYTES = const(1536)
# Requests that only read (no state changes, no counter beyond the one saved): their
# replies are not kept - a `get` reply is the cache's largest entry (~0.5 to 1 KiB with its
# parts, ~1.6 KiB of the heap for the two of a day's run, docs/ram.md). A redelivered read
# is run again and answered afresh: its id and digest stay in the cache, so it is known as
# a redelivery (the counter of a signed one is not checked again, nor its exp).
_READ_CMDS = ("ping", "get")
# A reply is written in parts of this many bytes (answer()): a ~1 KiB `get` reply as one
# string needs a free block of its size, which a fragmented heap of 64 KiB did not have
# while it had 6 KiB free in smaller blocks (docs/ram.md)
# 255, not 256: a bytes object holds one byte more than its length (a terminating NUL),
# so 256 bytes of reply took 17 blocks of 16 bytes and 255 take 16
_PART_B = const(255)
_REPLY_TRIES = const(3)         # a reply that meets a MemoryError: tries, this far apart
_REPLY_WAIT_MS = const(200)
# meter calls that set or read a state (the same result when made twice): tried again
# after a MemoryError; calibrate and reboot are not
_AGAIN_CALLS = ("readings", "counters", "config_get", "config_set", "raw_rows", "set_time",
                "preset_counters")

# set: key -> (type, lo, hi) for numbers, or a validator name; "auth" marks money/safety
# (the meter checks further: e.g. interval_s must divide a day, read_ms stay below the
# wrap bound of its counters; its ValueError becomes a "refused" reply with its reason)
SETTINGS = (
    ("rt_s", ("int", 1, 3600)),
    ("read_ms", ("int", 50, 60000)),
    ("interval_s", ("int", 60, 86400)),
    ("demand_s", ("int", 60, 3600)),
    ("ckpt_s", ("int", 10, 86400)),
    ("ckpt_min_s", ("int", 1, 3600)),
    ("ckpt_wh", ("int", 1, 1000000)),
    ("reverse_w", ("num", 0, 1000000)),
    ("payload", ("choice", ("bin", "json"))),
    ("ha_discovery", ("bool",)),
    ("backlog_per_s", ("int", 1, 50)),
    ("sag_v", ("num", 0, 1000)),
    ("swell_v", ("num", 0, 1000)),
    ("swell_a", ("num", 0, 10000)),
    ("transport", ("transports",)),
    ("tariff", ("tariff",)),
)
AUTH_SETTINGS = ("tariff",)
AUTH_CMDS = ("preset", "reset", "calibrate", "time", "reboot")
# every command: one _c_<name> method of Commands each
CMDS = ("ping", "get", "set", "reset", "preset", "calibrate", "time", "reboot")
TRANSPORTS = ("wifi", "nbiot", "plc")
REGISTERS = ("ai_wh", "ae_wh", "ap_vah", "rq_varh", "ai_ph_wh", "ae_ph_wh", "tariff_wh")
# preset: registers given as lists, with their longest length (the meter refuses a list
# longer than it has phases or tariff registers); the others are one integer
PRESET_LISTS = (("rq_varh", 4), ("ai_ph_wh", 3), ("ae_ph_wh", 3), ("tariff_wh", 15))
REG_MAX = const(0xFFFFFFFF)     # a register is kept as 32 bits on flash (Wh, varh, VAh)


class CommandError(Exception):
    """A request is refused; code is machine-readable, the message tells the user why."""

    def __init__(self, code, msg, rid=None):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.rid = rid


def hmac_sha256(key, msg):
    """HMAC-SHA256 (RFC 2104) from hashlib.sha256, which every MicroPython port has."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = bytes(key) + bytes(64 - len(key))
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    inner.update(msg)
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    outer.update(inner.digest())
    return outer.digest()


def _hex(b):
    return "".join("%02x" % x for x in b)


def sign(key, rid, ctr, body):
    """The MAC of a signed request (hex), also used by the head-end (headend/mqttcmd.py)."""
    return _hex(hmac_sha256(key, ("%s\n%d\n%s" % (rid, ctr, body)).encode()))


def _eq(a, b):
    # Constant-time comparison of two strings, as bytes: indexing a str returns each
    # character as a qstr, interned for good (MicroPython), and `a` comes from the
    # network: every distinct character of a forged MAC stayed in the heap, and the
    # digits of a real one grew the qstr pool by ~0.6 KiB (docs/ram.md)
    a = a.encode()
    b = b.encode()
    if len(a) != len(b):
        return False
    r = 0
    for i in range(len(a)):
        r |= a[i] ^ b[i]
    return r == 0


def _id_from_head(head):
    # '{"id": "abc", ...' -> "abc": the id of a request whose body was discarded. Read
    # as bytes (a str indexed character by character interns each one: see _eq); only
    # the id itself is decoded
    h = bytes(head)
    i = h.find(b'"id"')
    if i < 0:
        return None
    i = h.find(b":", i) + 1
    while 0 < i < len(h) and h[i] == 32:           # spaces
        i += 1
    if i <= 0 or i >= len(h):
        return None
    if h[i] == 34:                                 # a string id
        j = h.find(b'"', i + 1)
        if j < 0:
            return None
        try:
            rid = h[i + 1:j].decode()
        except UnicodeError:
            return None
        return rid if 1 <= len(rid) <= 64 else None
    j = i
    while j < len(h) and 48 <= h[j] <= 57:         # an integer id
        j += 1
    return int(h[i:j]) if j > i else None


def _surrogate_escape(b):
    # True when the JSON text has a \u escape of a UTF-16 surrogate (D800..DFFF)
    i = 0
    n = len(b) - 5
    while i < n:
        if b[i] == 92:                          # backslash: an escape, skip it whole
            if b[i + 1] == 117 and b[i + 2] in b"dD" and b[i + 3] in b"89abAB":
                return True
            i += 2
        else:
            i += 1
    return False


def dump(obj, write):
    """json.dumps(obj, separators=(",", ":")), the same text, given to write(str) in
    small pieces: dicts, lists and tuples are walked here, every other value (and a dict
    with a key that is not a str: json would convert or refuse it) is json.dumps'd whole.
    A dict is walked in the order json.dumps itself iterates it. Compact: without the
    spaces after "," and ":" a `get counters` reply is ~0.2 KiB (one part) shorter."""
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                write(json.dumps(obj, separators=(",", ":")))
                return
        sep = "{"
        for k in obj:
            write(sep)
            write(json.dumps(k))
            write(":")
            dump(obj[k], write)
            sep = ","
        write("}" if sep == "," else "{}")
    elif isinstance(obj, (list, tuple)):
        sep = "["
        for v in obj:
            write(sep)
            dump(v, write)
            sep = ","
        write("]" if sep == "," else "[]")
    else:
        write(json.dumps(obj))


class _Parts:
    """Bytes written in _PART_B parts: a reply without one block of its whole size."""

    def __init__(self):
        self.parts = []
        self.buf = bytearray(_PART_B)
        self.n = 0
        self.size = 0

    def write(self, s):
        b = s.encode()                  # on MicroPython the str's own data, no copy
        ln = len(b)
        self.size += ln
        i = 0
        while i < ln:
            k = min(_PART_B - self.n, ln - i)
            self.buf[self.n:self.n + k] = b if k == ln else memoryview(b)[i:i + k]
            self.n += k
            i += k
            if self.n == _PART_B:
                self.parts.append(bytes(self.buf))
                self.n = 0

    def done(self):
        """-> (tuple of bytes, total length)"""
        if self.n:
            self.parts.append(bytes(memoryview(self.buf)[:self.n]))
        return tuple(self.parts), self.size


def _reply(rep):
    w = _Parts()
    dump(rep, w.write)
    return w.done()


def _int(v, name, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise CommandError("bad_type", "%s must be an integer, got %r" % (name, v))
    if not lo <= v <= hi:
        raise CommandError("out_of_range", "%s=%d is outside %d..%d" % (name, v, lo, hi))
    return v


def _check_setting(key, v):
    spec = lookup(SETTINGS, key, None)
    if spec is None:
        raise CommandError("unknown_setting", "no setting %r; settable: %s" %
                           (key, ", ".join(sorted(k for k, _ in SETTINGS))))
    kind = spec[0]
    if kind == "int":
        return _int(v, key, spec[1], spec[2])
    if kind == "num":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CommandError("bad_type", "%s must be a number, got %r" % (key, v))
        if not spec[1] <= v <= spec[2]:
            raise CommandError("out_of_range", "%s=%r is outside %r..%r" % (key, v, spec[1], spec[2]))
        return v
    if kind == "choice":
        if isinstance(v, bool) or v not in spec[1]:
            raise CommandError("out_of_range", "%s must be one of %s" %
                               (key, ", ".join(str(c) for c in spec[1])))
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise CommandError("bad_type", "%s must be true or false" % key)
        return v
    if kind == "transports":
        if not isinstance(v, list) or not 1 <= len(v) <= len(TRANSPORTS):
            raise CommandError("bad_type", "transport must be a list like [\"wifi\", \"nbiot\"]")
        for t in v:
            if t not in TRANSPORTS:
                raise CommandError("out_of_range", "transport %r unknown; one of %s" %
                                   (t, ", ".join(TRANSPORTS)))
            if v.count(t) > 1:
                raise CommandError("out_of_range", "transport %r listed twice" % t)
        return v
    # tariff: the schedule of metering/tariff.py ({"registers", "default", "tz_s", "dst",
    # "holidays", "rules": [[days, from_h, to_h, register], ...]}); the meter validates it
    if not isinstance(v, dict) or not isinstance(v.get("rules", []), list):
        raise CommandError("bad_type", "tariff must be an object like {\"registers\": 2, "
                           "\"rules\": [[\"mon-fri\", 7, 22, 1]]}")
    if len(v.get("rules", [])) > 32:
        raise CommandError("out_of_range", "tariff: at most 32 rules")
    return v


_ID_B = const(8)


def entry_key(rid, payload):
    """A redelivery cache entry's key: 8 bytes of the SHA-256 of the request's id, then 16
    of the SHA-256 of its bytes. One 24-byte object instead of the id (a str) and a
    32-byte digest: 80 bytes of heap an entry with its tuple, not 144, for as long as the
    entry stays (docs/ram.md). An id is "s" + its text or "i" + its digits: "7" and 7
    differ."""
    h = hashlib.sha256(b"s" + rid.encode() if isinstance(rid, str) else b"i%d" % rid)
    return h.digest()[:_ID_B] + hashlib.sha256(payload).digest()[:16]


def state():
    """What a Commands keeps from one request to the next: [last counter (None: not read
    from state_path yet), the redelivery cache, the stats]. The session keeps this list
    and builds a Commands over it per request, so that this module need not stay loaded
    between two commands (comm/session.py, docs/ram.md)."""
    return [None, [], {"ok": 0, "error": 0, "dup": 0, "mem_errors": 0}]


class Commands:
    def __init__(self, meter, key=None, state_path=None, clock=None, kept=None):
        """meter: see the interface above. key: per-meter HMAC key (bytes) or None
        (then signed commands are refused). state_path: file keeping the last counter.
        kept: a state() list shared with earlier Commands (a new one when None)."""
        self.meter = meter
        self.key = key
        self.state_path = state_path
        self.clock = clock
        self.after = None                   # callable to run once the reply is sent
        if kept is None:
            kept = state()
        self._kept = kept
        self._cache = kept[1]               # [(entry_key(), signed, reply parts - None
                                            #   for a read, False for a reply lost to a
                                            #   MemoryError -, reply bytes)]
        self.stats = kept[2]
        if kept[0] is None:
            kept[0] = 0
            if state_path:
                try:
                    with open(state_path) as f:
                        kept[0] = int(f.read())
                except (OSError, ValueError):
                    kept[0] = 0
        self.last_ctr = kept[0]

    def _save_ctr(self, ctr):
        self.last_ctr = ctr
        self._kept[0] = ctr
        if not self.state_path:
            return
        import os
        tmp = self.state_path + ".t"
        with open(tmp, "w") as f:
            f.write("%d" % ctr)
        os.rename(tmp, self.state_path)     # atomic on littlefs

    async def _call(self, name, *args):
        fn = getattr(self.meter, name, None)
        if fn is None:
            raise CommandError("unsupported", "this meter does not support %s" % name)
        tries = _REPLY_TRIES if name in _AGAIN_CALLS else 1
        for i in range(tries):
            try:
                r = fn(*args)
                if hasattr(r, "send"):              # a coroutine
                    r = await r
                return r
            except CommandError:
                raise
            except ValueError as e:
                raise CommandError("refused", "meter refused: %s" % e)
            except MemoryError as e:
                # the heap short for a moment (the call imports metering.api): a call
                # that gives the same result when made twice is tried again a little
                # later, counted; the last failure is the "failed" reply
                self.stats["mem_errors"] += 1
                if i + 1 >= tries:
                    raise CommandError("failed", "%s failed: %r" % (name, e))
                await sleep_ms(_REPLY_WAIT_MS)
            except Exception as e:
                raise CommandError("failed", "%s failed: %r" % (name, e))

    def _parse(self, payload):
        if payload is None or len(payload) > MAX_CMD_BYTES:
            rid = None
            if payload is not None:     # it did fit the receive buffer: answer by its id
                try:
                    rid = json.loads(payload).get("id")
                except Exception:
                    pass
            raise CommandError("oversized", "request larger than %d bytes" % MAX_CMD_BYTES,
                               rid)
        if _surrogate_escape(payload):
            # MicroPython's json keeps \uD800..\uDFFF as lone surrogates, which no UTF-8
            # reply (the id, a message quoting the request) could carry
            raise CommandError("malformed", "request has \\uD800-\\uDFFF escapes (a character "
                               "beyond U+FFFF): send such characters as UTF-8")
        try:
            req = json.loads(payload)
        except Exception:
            raise CommandError("malformed", "request is not JSON (UTF-8)")
        if not isinstance(req, dict):
            raise CommandError("malformed", "request must be a JSON object")
        return req

    def _verify(self, req, rid):
        """The MAC of a signed request, checked before anything else (the redelivery
        cache included). -> the request's counter, or 0 for an unsigned request.
        The counter's freshness (replay) is checked later, once the request is known
        not to be a redelivery."""
        if "mac" not in req:
            return 0
        if self.key is None:
            raise CommandError("unauthorized", "no command key provisioned on this meter")
        ctr = req.get("ctr")
        if isinstance(ctr, bool) or not isinstance(ctr, int) or ctr <= 0:
            raise CommandError("bad_signature", "ctr must be a positive integer")
        body = req.get("body")
        mac = req["mac"]
        if not isinstance(body, str) or not isinstance(mac, str) or \
                not _eq(mac, sign(self.key, rid, ctr, body)):
            raise CommandError("bad_signature", "bad signature (check the meter's command key)")
        return ctr

    def _unwrap(self, req, signed, again=False):
        """-> (cmd, args, signed). signed: the verified counter (0 = unsigned). again: the
        same bytes as a request accepted before (a redelivered read): its counter and exp
        were checked then."""
        if "body" in req:
            body = req["body"]
            if not isinstance(body, str):
                raise CommandError("bad_type", "body must be a JSON text (a string)")
            if signed and signed <= self.last_ctr and not again:
                raise CommandError("replay", "counter %d not above %d: replayed or stale "
                                   "request" % (signed, self.last_ctr))
            try:
                inner = json.loads(body)
            except Exception:
                raise CommandError("malformed", "body is not JSON")
            if not isinstance(inner, dict):
                raise CommandError("malformed", "body must be a JSON object")
            req = inner
        cmd = req.get("cmd")
        args = req.get("args", {})
        if not isinstance(cmd, str):
            raise CommandError("malformed", "request has no \"cmd\"")
        if not isinstance(args, dict):
            raise CommandError("bad_type", "args must be an object")
        exp = req.get("exp")
        if exp is not None and not again:
            if isinstance(exp, bool) or not isinstance(exp, int):
                raise CommandError("bad_type", "exp must be epoch seconds")
            c = self.clock
            if c is not None and getattr(c, "synced", True) and c.time() > exp:
                raise CommandError("expired", "request expired at %d (meter time %d)" %
                                   (exp, c.time()))
        return cmd, args, signed

    def _cached(self, rid, key, signed):
        """The cache's entry of a redelivered request (same id, same bytes: the same
        entry_key()), or None; its reply parts are None for a read (_READ_CMDS), which is
        run again. A request that reuses the id of a signed one without a valid signature
        is refused."""
        same_id = key[:_ID_B]
        for e in self._cache:
            k = e[0]
            if k == key:
                self.stats["dup"] += 1
                return e
            if e[1] and not signed and k.startswith(same_id):
                raise CommandError("bad_signature", "id %r belongs to a signed request: "
                                   "this unsigned one is refused" % (rid,))
        return None

    async def handle(self, payload, head=None):
        """payload (bytes, or None for a request too large to receive; head: its first
        bytes, to find the id) -> (id, reply bytes). Never raises. self.after is set when
        something must happen after replying."""
        rid, parts = await self.answer(payload, head)
        return rid, b"".join(parts)

    async def answer(self, payload, head=None):
        """handle(), with the reply as a tuple of bytes of at most _PART_B each, joined
        the JSON text handle() returns: what the session publishes (comm.mqtt sends the
        parts back to back), so that no free block of a whole reply's size is needed."""
        rid = None
        self.after = None
        signed = 0
        cache = True
        keep = True                 # the reply is kept for a redelivery (not for a read)
        digest = None
        try:
            req = self._parse(payload)
            rid = req.get("id")
            if isinstance(rid, bool) or not isinstance(rid, (str, int)) or \
                    (isinstance(rid, str) and not 1 <= len(rid) <= 64):
                rid = None
                raise CommandError("malformed", "request needs an \"id\" (string of 1..64 "
                                   "characters or integer)")
            try:
                signed = self._verify(req, rid)       # first: before the cache
            except CommandError:
                cache = False       # a forged request must not displace a real reply
                raise
            digest = entry_key(rid, payload)
            hit = self._cached(rid, digest, signed)
            if hit is not None:
                if hit[2] is False:
                    raise CommandError("reply_lost", "this request was handled but its reply "
                                       "did not fit the meter's memory; it is not run again "
                                       "(read the result with get)")
                if hit[2] is not None:
                    return rid, hit[2]
            again = hit is not None         # a read seen before: run again, not a replay
            cmd, args, signed = self._unwrap(req, signed, again)
            keep = cmd not in _READ_CMDS
            result = await self._run(cmd, args, signed, again and not keep)
            rep = {"id": rid, "ok": True, "result": result}
            self.stats["ok"] += 1
        except CommandError as e:
            if e.code == "bad_signature":
                cache = False
            if rid is None and payload is None and head:
                rid = _id_from_head(head)
            if rid is None and isinstance(e.rid, (str, int)) and not isinstance(e.rid, bool):
                rid = e.rid
            rep = {"id": rid, "ok": False, "error": e.code, "msg": e.msg}
            self.stats["error"] += 1
        except Exception as e:                    # a bug: still answer, never crash
            rep = {"id": rid, "ok": False, "error": "internal", "msg": repr(e)}
            self.stats["error"] += 1
        out = None
        for _ in range(_REPLY_TRIES):
            try:
                out, n = _reply(rep)
                break
            except MemoryError:
                # the heap is short for a moment (another task's transient): try again
                # a little later; after the last try the session's command task counts
                # it (task_errors) and the head-end, without a reply, asks again
                self.stats["mem_errors"] += 1
                await sleep_ms(_REPLY_WAIT_MS)
            except Exception:
                out, n = _reply({"id": rid, "ok": False, "error": "internal",
                                 "msg": "reply not serialisable"})
                break
        if rid is not None and cache and payload is not None and digest is not None:
            # a read keeps no reply (None: run again); a reply that could not be written
            # leaves False: the request was handled (a counter saved, an action done), so
            # the head-end's repeat is answered "reply_lost", never run twice nor "replay"
            if out is None:
                self._remember(digest, signed, None if not keep else False, 0)
            elif keep:
                self._remember(digest, signed, out, n)
            else:
                self._remember(digest, signed, None, 0)
        if out is None:
            raise MemoryError("command reply: no heap after %d tries" % _REPLY_TRIES)
        return rid, out

    def _remember(self, key, signed, parts, n):
        c = self._cache
        for i in range(len(c)):
            if c[i][0] == key:
                c.pop(i)                    # a read answered again: one entry, the newest
                break
        c.append((key, bool(signed), parts, n))
        size = 0
        for e in c:
            size += e[3]
        while len(c) > _CACHE or (len(c) > 1 and size > _CACHE_BYTES):
            size -= c.pop(0)[3]

    def _need_auth(self, cmd, args, signed):
        if cmd in AUTH_CMDS or (cmd == "set" and any(k in AUTH_SETTINGS for k in args)):
            if not signed:
                raise CommandError("unauthorized", "%s needs a signed request (lipari cmd "
                                   "signs with the meter's key)" % cmd)
            self._save_ctr(signed)            # before running: no replay after a reboot
        elif signed:
            self._save_ctr(signed)

    async def _run(self, cmd, args, signed, again=False):
        # The name is checked against CMDS before it is looked up: getattr() with a name
        # the firmware does not know interns it, a qstr that stays in the heap for good
        # (~19 bytes per distinct name), so unknown commands from the network would
        # exhaust the heap (docs/ram.md)
        if cmd not in CMDS:
            raise CommandError("unknown_cmd", "unknown command %r; one of: %s" %
                               (cmd, ", ".join(sorted(CMDS))))
        if not again:                         # a read run again: its counter is saved
            self._need_auth(cmd, args, signed)
        return await getattr(self, "_c_" + cmd)(args)

    def _no_extra(self, args, allowed):
        for k in args:
            if k not in allowed:
                raise CommandError("bad_args", "unexpected argument %r (allowed: %s)" %
                                   (k, ", ".join(allowed) or "none"))

    # -- the commands -----------------------------------------------------------------
    async def _c_ping(self, args):
        self._no_extra(args, ())
        return {"t": self.clock.time() if self.clock else None}

    async def _c_get(self, args):
        self._no_extra(args, ("what", "chip", "rows"))
        what = args.get("what", "readings")
        if what == "readings":
            return await self._call("readings")
        if what == "counters":
            return await self._call("counters")
        if what == "config":
            return await self._call("config_get")
        if what == "raw":
            chip = _int(args.get("chip", 0), "chip", 0, 7)
            rows = args.get("rows")
            if not isinstance(rows, list) or not 1 <= len(rows) <= 16:
                raise CommandError("bad_args", "rows must be a list of 1..16 row numbers")
            for r in rows:
                _int(r, "row", 0, 69)
            return {"chip": chip, "rows": rows, "values": await self._call("raw_rows", chip, rows)}
        raise CommandError("out_of_range", "get what=%r: one of readings, counters, config, "
                           "raw" % (what,))

    async def _c_set(self, args):
        if not args:
            raise CommandError("bad_args", "set needs at least one setting, e.g. {\"rt_s\": 10}")
        checked = [(k, _check_setting(k, args[k])) for k in args]   # all or nothing
        for k, v in checked:
            await self._call("config_set", k, v)
        return {"set": [k for k, _ in checked]}

    def _phase(self, args):
        ph = args.get("phase")
        return None if ph is None else _int(ph, "phase", 1, 3)

    async def _c_reset(self, args):
        self._no_extra(args, ("phase",))
        ph = self._phase(args)
        await self._call("preset_counters", {}, ph)
        return {"reset": ph or "all"}

    async def _c_preset(self, args):
        self._no_extra(args, REGISTERS + ("phase",))
        ph = self._phase(args)
        vals = {}
        for k in REGISTERS:
            if k not in args:
                continue
            v = args[k]
            n = lookup(PRESET_LISTS, k, None)
            if n is None:                        # a total: one integer
                vals[k] = _int(v, k, 0, REG_MAX)
                continue
            if not isinstance(v, list):
                raise CommandError("bad_type", "%s must be a list of 1..%d integers" % (k, n))
            if not 1 <= len(v) <= n:
                raise CommandError("out_of_range", "%s has %d values: give 1..%d" %
                                   (k, len(v), n))
            vals[k] = [_int(x, k, 0, REG_MAX) for x in v]
        if ph is not None and ("ai_ph_wh" in vals or "ae_ph_wh" in vals):
            raise CommandError("bad_args", "ai_ph_wh / ae_ph_wh set every phase in order: "
                               "do not combine them with phase")
        if not vals:
            raise CommandError("bad_args", "preset needs registers, e.g. {\"ai_wh\": 123456}")
        await self._call("preset_counters", vals, ph)
        return {"preset": sorted(vals)}

    async def _c_calibrate(self, args):
        self._no_extra(args, ("phase", "v_mv", "i_ma", "p_mw", "pf_milli", "action"))
        ph = self._phase(args)
        if ph is None:
            raise CommandError("bad_args", "calibrate needs phase 1..3")
        if "v_mv" in args:
            _int(args["v_mv"], "v_mv", 1000, 1000000)
        if "i_ma" in args:
            _int(args["i_ma"], "i_ma", 1, 1000000)
        if "p_mw" in args:
            _int(args["p_mw"], "p_mw", -1000000000, 1000000000)
        if "pf_milli" in args:
            _int(args["pf_milli"], "pf_milli", -1000, 1000)
        if "action" in args and args["action"] not in ("measure", "apply", "reset", "offset"):
            raise CommandError("out_of_range", "action: measure, apply, offset or reset")
        return await self._call("calibrate", args)

    async def _c_time(self, args):
        self._no_extra(args, ("t",))
        t = _int(args.get("t"), "t", 1600000000, 4102444800)
        await self._call("set_time", t)
        return {"t": t}

    async def _c_reboot(self, args):
        self._no_extra(args, ())
        self.after = getattr(self.meter, "reboot", None)
        if self.after is None:
            raise CommandError("unsupported", "this meter cannot reboot on command")
        return {"reboot": True}
