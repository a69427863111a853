"""Command parser and HMAC authorisation, on micropython: good commands, every kind of
bad command, replay, and a seeded fuzz of thousands of mutated requests."""
import hashlib
import hmac
import json
import random

import pytest

from comm_harness import run_mp

KEY = bytes(range(32))

RUNNER = r"""
import json, sys, asyncio, binascii
from comm.commands import Commands, hmac_sha256, sign
from comm_fakemeter import FakeMeter
m = FakeMeter()
c = Commands(m, key=bytes(range(32)), state_path=STATE)
async def main(reqs):
    for r in reqs:
        p = None if r is None else binascii.unhexlify(r)
        rid, rep = await c.handle(p)
        print(rep.decode())
reqs = json.loads(sys.stdin.read())
asyncio.run(main(reqs))
print(json.dumps({"regs": m.regs, "log": m.log, "t": m.t, "ctr": c.last_ctr,
                  "cfg": m.cfg, "after": c.after is not None}))
"""


def mp_commands(reqs, state="/tmp/lipari-test-ctr"):
    import subprocess
    from comm_harness import MP, MPPATH
    import os
    code = RUNNER.replace("STATE", repr(state))
    p = subprocess.run([MP, "-X", "heapsize=32M", "-c", code], input=json.dumps(
        [None if r is None else r.hex() for r in reqs]), capture_output=True, text=True,
        timeout=60, env=dict(os.environ, MICROPYPATH=MPPATH))
    assert p.returncode == 0, p.stderr + p.stdout[-2000:]
    lines = p.stdout.splitlines()
    r = json.loads(lines[-1])
    r["replies"] = [json.loads(x) for x in lines[:-1]]
    return r


def signed(rid, ctr, body, key=KEY):
    body = json.dumps(body)
    mac = hmac.new(key, ("%s\n%d\n%s" % (rid, ctr, body)).encode(), hashlib.sha256).hexdigest()
    return json.dumps({"id": rid, "ctr": ctr, "body": body, "mac": mac}).encode()


def plain(rid, cmd, args=None):
    d = {"id": rid, "cmd": cmd}
    if args is not None:
        d["args"] = args
    return json.dumps(d).encode()


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "ctr")


def test_hmac_matches_python_hmac():
    out = run_mp("from comm.commands import hmac_sha256\nimport binascii\n"
                 "for k in (b'', b'k'*20, b'k'*64, b'k'*100):\n"
                 "    print(binascii.hexlify(hmac_sha256(k, b'message')).decode())\n")
    want = [hmac.new(k, b"message", hashlib.sha256).hexdigest()
            for k in (b"", b"k" * 20, b"k" * 64, b"k" * 100)]
    assert out.split() == want


def test_good_and_bad_commands(state):
    reqs = [
        plain("1", "ping"),
        plain("2", "get", {"what": "readings"}),
        plain("3", "get", {"what": "raw", "chip": 0, "rows": [16, 17]}),
        plain("4", "set", {"rt_s": 30, "transport": ["nbiot", "wifi"]}),
        plain("5", "set", {"rt_s": 0}),                         # out of range
        plain("6", "set", {"rt_s": "10"}),                      # wrong type
        plain("7", "set", {"colour": 1}),                       # unknown setting
        plain("8", "frobnicate"),                               # unknown command
        b"{not json",                                           # malformed
        None,                                                   # oversized
        plain("9", "reset"),                                    # needs auth
        signed("10", 5, {"cmd": "reset", "args": {}}),          # ok
        signed("11", 5, {"cmd": "preset", "args": {"ai_wh": 7}}),   # replayed counter
        signed("12", 6, {"cmd": "preset", "args": {"ai_wh": 7}}, key=b"x" * 32),  # bad key
        signed("13", 7, {"cmd": "preset", "args": {"ai_wh": 123456}}),
        plain("13", "ping"),                                    # same id: cached reply
        plain("14", "set", {"interval_s": 60}),                 # meter refuses
        plain("14b", "set", {"interval_s": 59}),                # out of range
        signed("15", 8, {"cmd": "time", "args": {"t": 1767225600}}),
        plain("16", "set", {"tariff": {"registers": 2, "rules": [["mon-fri", 7, 22, 1]]}}),
        json.dumps({"cmd": "ping"}).encode(),                   # no id
        plain("17", "reboot"),                                  # needs auth
        json.dumps({"id": "18", "body": "{\"cmd\": \"ping\"}"}).encode(),  # unsigned body
        plain("19", "calibrate", {"phase": 1, "v_mv": 230000}),  # needs auth
        signed("20", 9, {"cmd": "calibrate", "args": {"phase": 4}}),
        signed("21", 10, {"cmd": "calibrate", "args": {"phase": 1, "v_mv": 230000}}),
        signed("21", 10, {"cmd": "calibrate", "args": {"phase": 1, "v_mv": 230000}}),  # again
        signed("21", 12, {"cmd": "preset", "args": {"ai_wh": 1}}, key=b"x" * 32),  # forged
        signed("21", 10, {"cmd": "calibrate", "args": {"phase": 1, "v_mv": 230000}}),  # again
        signed("22", 11, {"cmd": "reboot", "args": {}}),
    ]
    r = mp_commands(reqs, state)
    rep = r["replies"]
    codes = [x["ok"] or x["error"] for x in rep]
    assert codes == [True, True, True, True, "out_of_range", "bad_type", "unknown_setting",
                     "unknown_cmd", "malformed", "oversized", "unauthorized", True, "replay",
                     "bad_signature", True, "bad_signature", "refused", "out_of_range", True,
                     "unauthorized", "malformed", "unauthorized", True, "unauthorized",
                     "out_of_range", True, True, "bad_signature", True, True]
    assert rep[2]["result"]["values"] == [16 * 0x01010101, 17 * 0x01010101]
    # an unsigned request reusing a signed command's id gets no cached reply
    assert rep[15]["id"] == "13" and "signed" in rep[15]["msg"], rep[15]
    assert rep[26] == rep[25] and rep[28] == rep[25]   # redeliveries answered the same
    assert rep[27]["error"] == "bad_signature"          # a forged one in between did not
    assert "rt_s" in rep[4]["msg"] and "1..3600" in rep[4]["msg"]
    assert r["regs"]["ai_wh"] == 123456 and r["regs"]["ae_wh"] == 0
    assert r["t"] == 1767225600 and r["ctr"] == 11 and rep[29]["result"] == {"reboot": True}
    assert r["after"]                                   # the signed reboot is scheduled
    assert r["cfg"]["rt_s"] == 30 and r["cfg"]["transport"] == ["nbiot", "wifi"]
    assert r["log"].count(["cal", 1]) == 1              # ... without running again
    # the counter survives a restart: replaying request 15 is refused
    r2 = mp_commands([signed("30", 8, {"cmd": "time", "args": {"t": 1767225600}})], state)
    assert r2["replies"][0]["error"] == "replay"


READ_AGAIN = r"""
import json, sys, asyncio, binascii
from comm.commands import Commands, entry_key
from comm_fakemeter import FakeMeter
m = FakeMeter()
calls = []
_readings, _counters = m.readings, m.counters
def readings():
    calls.append("readings")
    r = _readings()
    r["n"] = len(calls)               # a fresh answer differs from the first
    return r
def counters():
    calls.append("counters")
    return _counters()
m.readings, m.counters = readings, counters
c = Commands(m, key=bytes(range(32)), state_path=STATE)
async def main(reqs):
    for r in reqs:
        rid, rep = await c.handle(binascii.unhexlify(r))
        print(rep.decode())
reqs = json.loads(sys.stdin.read())
asyncio.run(main(reqs))
ids = []
for r in reqs:
    try:
        ids.append(json.loads(binascii.unhexlify(r))["id"])
    except Exception:
        pass
def id_of(k):                       # an entry keeps a hash of its id (entry_key)
    for i in ids:
        if entry_key(i, b"")[:8] == k[:8]:
            return i
print(json.dumps({"calls": calls, "log": m.log, "regs": m.regs, "ctr": c.last_ctr,
                  "cache": [[id_of(e[0]), e[2] is not None, e[3], len(e[0])]
                            for e in c._kept[1]],
                  "dup": c.stats["dup"]}))
"""


def test_redelivered_read_runs_again_and_its_reply_is_not_kept(state):
    """Reads (ping, get) keep their id and digest in the redelivery cache but not their
    reply (docs/ram.md: the two `get` replies of a day held ~1.6 KiB): a redelivery is run
    again and answered afresh - a signed one is not refused as a replay - while a command
    that changes state is still answered from the cache without running twice."""
    import os
    import subprocess
    from comm_harness import MP, MPPATH
    reqs = [plain("g1", "get", {"what": "readings"}),
            plain("g1", "get", {"what": "readings"}),                 # redelivered
            signed("g2", 5, {"cmd": "get", "args": {"what": "counters"}}),
            signed("g2", 5, {"cmd": "get", "args": {"what": "counters"}}),  # redelivered
            signed("p1", 6, {"cmd": "preset", "args": {"ai_wh": 42}}),
            signed("p1", 6, {"cmd": "preset", "args": {"ai_wh": 42}}),     # redelivered
            plain("g2", "get", {"what": "counters"}),   # unsigned, the signed read's id
            signed("g3", 6, {"cmd": "get", "args": {"what": "counters"}}),  # stale counter
            plain("g1", "ping")]                        # same id, other bytes: a new one
    p = subprocess.run([MP, "-X", "heapsize=32M", "-c", READ_AGAIN.replace("STATE", repr(state))],
                       input=json.dumps([r.hex() for r in reqs]), capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, MICROPYPATH=MPPATH))
    assert p.returncode == 0, p.stderr + p.stdout[-2000:]
    lines = p.stdout.splitlines()
    r = json.loads(lines[-1])
    rep = [json.loads(x) for x in lines[:-1]]
    codes = [x["ok"] or x["error"] for x in rep]
    assert codes == [True, True, True, True, True, True, "bad_signature", "replay", True]
    assert rep[0]["result"]["n"] == 1 and rep[1]["result"]["n"] == 2   # run again, fresh
    assert rep[2] == rep[3] and rep[3]["result"]["ai_wh"] == 5000     # not a "replay"
    assert rep[5] == rep[4]                                            # from the cache
    assert r["log"].count(["preset", None]) == 1                       # ... not run twice
    assert r["calls"] == ["readings", "readings", "counters", "counters"]
    assert r["ctr"] == 6 and r["regs"]["ai_wh"] == 42
    assert r["dup"] == 3
    # the cache: one entry per id and bytes, the reads without their reply
    kept = {(e[0], e[1], e[2]) for e in r["cache"]}
    assert ("g1", False, 0) in kept and ("g2", False, 0) in kept, r["cache"]
    assert any(e[0] == "p1" and e[1] and e[2] > 0 for e in r["cache"]), r["cache"]
    assert len([e for e in r["cache"] if e[0] == "g2"]) == 1, r["cache"]
    # an entry's key is 24 bytes: 8 of the id's hash, 16 of the request's (docs/ram.md)
    assert all(e[3] == 24 for e in r["cache"]), r["cache"]


LOST = r"""
import json, sys, asyncio, binascii
import comm.commands as cc
from comm.commands import Commands, entry_key
from comm_fakemeter import FakeMeter
m = FakeMeter()
c = Commands(m, key=bytes(range(32)), state_path=STATE)
_reply = cc._reply
short = [0]
def reply(rep):                      # the heap short for the next `short` replies
    if short[0]:
        short[0] -= 1
        raise MemoryError("no heap")
    return _reply(rep)
cc._reply = reply
async def main(reqs):
    for n, r in reqs:
        short[0] = n
        try:
            rid, rep = await c.handle(binascii.unhexlify(r))
            print(rep.decode())
        except MemoryError as e:
            print(json.dumps({"raised": str(e)}))
asyncio.run(main(json.loads(sys.stdin.read())))
print(json.dumps({"log": m.log, "regs": m.regs, "ctr": c.last_ctr, "stats": c.stats}))
"""


def test_a_reply_lost_to_memory_is_not_run_again_nor_a_replay(state):
    """A command handled whose reply cannot be written (MemoryError on every try) leaves
    its entry: the head-end's repeat of a write is answered `reply_lost` (the preset is not
    done twice, the repeat is not refused as a replay), a repeated read is run again."""
    import os
    import subprocess
    from comm_harness import MP, MPPATH
    pre = signed("w1", 5, {"cmd": "preset", "args": {"ai_wh": 42}})
    get = signed("r1", 6, {"cmd": "get", "args": {"what": "counters"}})
    reqs = [(3, pre), (0, pre), (0, pre), (3, get), (0, get)]
    p = subprocess.run([MP, "-X", "heapsize=32M", "-c", LOST.replace("STATE", repr(state))],
                       input=json.dumps([(n, r.hex()) for n, r in reqs]), capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, MICROPYPATH=MPPATH))
    assert p.returncode == 0, p.stderr + p.stdout[-2000:]
    lines = p.stdout.splitlines()
    r = json.loads(lines[-1])
    rep = [json.loads(x) for x in lines[:-1]]
    assert "raised" in rep[0] and "raised" in rep[3], rep
    assert rep[1]["id"] == "w1" and rep[1]["error"] == "reply_lost", rep[1]
    assert rep[2] == rep[1]                                  # and so it stays
    assert r["log"].count(["preset", None]) == 1             # done once
    assert r["regs"]["ai_wh"] == 42 and r["ctr"] == 6
    assert rep[4]["ok"] is True and rep[4]["result"]["ai_wh"] == 42   # the read: run again
    assert r["stats"]["mem_errors"] == 6


def test_preset_argument_shapes(state):
    # totals are one integer, rq_varh / tariff_wh / *_ph_wh lists; a value that does not
    # fit a 32-bit register, or a shape the meter has no register for, is refused
    P = lambda i, a: signed(str(i), 100 + i, {"cmd": "preset", "args": a})  # noqa: E731
    reqs = [P(1, {"ai_wh": 2 ** 32 - 1}),
            P(2, {"ai_wh": 2 ** 32}),
            P(3, {"ai_wh": -1}),
            P(4, {"ai_wh": [1]}),
            P(5, {"rq_varh": 7}),
            P(6, {"rq_varh": [1, 2, 3, 4, 5]}),
            P(7, {"rq_varh": [1, 2, 3, 4]}),
            P(8, {"tariff_wh": []}),
            P(9, {"ai_ph_wh": [1, 2, 3], "phase": 2}),
            P(10, {"ai_ph_wh": [1, 2, 3, 4]}),
            P(11, {"ae_wh": 1.5}),
            P(12, {"tariff_wh": [1, 2 ** 32]})]
    r = mp_commands(reqs, state)
    codes = [x["ok"] or x["error"] for x in r["replies"]]
    assert codes == [True, "out_of_range", "out_of_range", "bad_type", "bad_type",
                     "out_of_range", True, "out_of_range", "bad_args", "out_of_range",
                     "bad_type", "out_of_range"], r["replies"]
    assert r["regs"]["ai_wh"] == 2 ** 32 - 1 and r["regs"]["rq_varh"] == [1, 2, 3, 4]


def test_fuzz_mutated_requests_never_crash(state):
    rng = random.Random(4242)
    seeds = [plain("a", "set", {"rt_s": 30, "transport": ["wifi"]}),
             plain("b", "get", {"what": "raw", "chip": 1, "rows": [16]}),
             signed("c", 100, {"cmd": "preset", "args": {"ai_wh": 1, "tariff_wh": [1, 2]}}),
             signed("d", 101, {"cmd": "set", "args": {"tariff": {"rules": [["all", 7, 22, 1]]}}}),
             plain("e", "calibrate", {"phase": 2, "i_ma": 5000})]
    reqs = []
    for n in range(3000):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 5)):
            op = rng.randrange(5)
            i = rng.randrange(len(b)) if b else 0
            if op == 0 and b:
                b[i] = rng.randrange(32, 127)
            elif op == 1 and b:
                del b[i:i + rng.randrange(1, 8)]
            elif op == 2:
                b[i:i] = rng.choice([b"[", b"]", b"{", b"}", b'"', b",", b"-1", b"1e9",
                                     b"null", b"true", b"\\u0000", b"9" * 30])
            elif op == 3:
                b = b * rng.randrange(2, 8) if len(b) < 2000 else b
            elif b:
                b[i] = rng.randrange(256)
        reqs.append(bytes(b))
    r = mp_commands(reqs, state)
    assert len(r["replies"]) == len(reqs)
    errors = {x.get("error") for x in r["replies"]}
    assert "internal" not in errors, [x for x in r["replies"] if x.get("error") == "internal"][:3]
    assert {"malformed", "oversized"} <= errors
    assert sum(1 for x in r["replies"] if x["ok"]) >= 3       # some mutations stay valid
    # nothing unsigned changed the counters
    assert r["regs"]["ai_wh"] in (5000, 1)


REAL = r"""
import json, asyncio, binascii, sys
import main
from comm.commands import Commands
r = main.Run({"board": "unix_sim_3ph", "step": True, "print": "none"})
m = r.start()
c = Commands(m, key=bytes(range(32)), clock=r.clock)
async def go(reqs):
    for q in reqs:
        rid, rep = await c.handle(binascii.unhexlify(q))
        print(rep.decode())
asyncio.run(go(json.loads(sys.stdin.read())))
"""


def test_commands_against_the_real_metering_engine():
    import os
    import subprocess
    from comm_harness import MP, ROOT
    reqs = [plain("1", "get", {"what": "readings"}),
            plain("2", "get", {"what": "counters"}),
            plain("3", "get", {"what": "config"}),
            plain("4", "set", {"rt_s": 5, "demand_s": 900}),
            signed("5", 1, {"cmd": "set", "args": {"tariff": {"registers": 1, "rules": []}}}),
            signed("6", 2, {"cmd": "set", "args": {"tariff": {"registers": 1, "rules": [
                ["mon-fri", 7, 22, 5]]}}}),                      # register 5 of 1: refused
            signed("7", 3, {"cmd": "preset", "args": {"ai_wh": 123456}}),
            plain("8", "get", {"what": "counters"}),
            plain("9", "get", {"what": "raw", "chip": 0, "rows": [16, 17]}),
            signed("10", 4, {"cmd": "calibrate", "args": {"phase": 1, "action": "measure"}}),
            plain("11", "set", {"interval_s": 700}),              # not a divisor of a day
            plain("12", "reboot"),                                # unsigned: refused
            signed("14", 6, {"cmd": "preset", "args": {"tariff_wh": [1, 2, 3]}}),
            signed("15", 7, {"cmd": "preset", "args": {"ai_ph_wh": [1, 2], "rq_varh": [5]}}),
            plain("16", "get", {"what": "counters"}),
            signed("13", 8, {"cmd": "reboot", "args": {}})]
    p = subprocess.run([MP, "-X", "heapsize=8M", "-c", REAL],
                       input=json.dumps([r.hex() for r in reqs]), capture_output=True,
                       text=True, timeout=60, cwd=ROOT,
                       env=dict(os.environ, MICROPYPATH=".frozen:%s/firmware:%s/boards:%s"
                                % (ROOT, ROOT, ROOT)))
    assert p.returncode == 0, p.stderr
    rep = [json.loads(x) for x in p.stdout.splitlines() if x.startswith('{"')]
    rep = {x["id"]: x for x in rep if "id" in x}
    assert rep["1"]["ok"] and len(rep["1"]["result"]["v_mv"]) == 3
    assert rep["2"]["ok"] and "ai_wh" in rep["2"]["result"]
    assert rep["3"]["ok"] and "interval_s" in rep["3"]["result"]
    assert rep["4"]["ok"], rep["4"]
    assert rep["5"]["ok"], rep["5"]
    assert rep["6"]["error"] == "refused", rep["6"]
    assert rep["7"]["ok"] and rep["8"]["result"]["ai_wh"] == 123456, (rep["7"], rep["8"])
    assert rep["9"]["ok"] and len(rep["9"]["result"]["values"]) == 2
    assert rep["10"]["ok"] and "v_mv" in rep["10"]["result"], rep["10"]
    assert rep["11"]["error"] == "refused" and "day" in rep["11"]["msg"]
    # the meter restarts after the reply went out (metering/api.py reboot(); the harness
    # does not run the `after` step)
    assert rep["12"]["error"] == "unauthorized", rep["12"]
    # more tariff values than the meter has registers: refused, nothing changed
    assert rep["14"]["error"] == "refused" and "tariff_wh" in rep["14"]["msg"], rep["14"]
    assert rep["15"]["ok"], rep["15"]
    c = rep["16"]["result"]
    assert c["ai_ph_wh"][:2] == [1, 2] and c["rq_varh"][0] == 5, c
    assert rep["13"]["ok"] and rep["13"]["result"] == {"reboot": True}, rep["13"]
