"""Payload codec: firmware encoder on micropython -> head-end decoder on CPython, and a
seeded fuzz of the decoder."""
import json
import random
import sys

import pytest

from comm_harness import (ROOT, SAMPLE_EVENT, SAMPLE_INTERVAL, SAMPLE_RT, interval_bin_size,
                          mp_encode)
from headend.codec import DecodeError, decode

sys.path.insert(0, ROOT + "/firmware")
from comm import codec as fw_codec  # noqa: E402  (CPython import of the firmware module)


def _v01(mv):
    return [(x + 50) // 100 * 100 for x in mv]


ONE_PH = {"seq": 1, "t_end": 1700000900, "dur_s": 900, "flags": 3, "tariff": 0, "ai_wh": 10,
          "ae_wh": 7, "rq_varh": [1, 2, 3, 4], "ap_vah": 12, "ai_ph_wh": [9],
          "ae_ph_wh": [7], "v_min_mv": [200049], "v_max_mv": [250051], "v_avg_mv": [230000],
          "pmax_w": 0, "sags": [3], "swells": [1], "tariff_wh": [4, 5], "ph_invalid": 1}
TWO_PH = dict(ONE_PH, ai_ph_wh=[5, 5], ae_ph_wh=[3, 4], v_min_mv=[0, 1], v_max_mv=[0, 2],
              v_avg_mv=[0, 1], sags=[0, 0], swells=[0, 0], ph_invalid=0, flags=0)
RECORDS = [
    ("interval", SAMPLE_INTERVAL), ("interval", ONE_PH), ("interval", TWO_PH),
    ("interval", dict(SAMPLE_INTERVAL, sags=4, swells=0)),
    ("interval", {"seq": 0, "t_end": 0}),                       # minimal: defaults
    ("event", SAMPLE_EVENT),
    ("event", {"seq": 2, "t": 5, "kind": "ota", "phase": 0, "value": "downloading 40%"}),
    ("event", {"seq": 3, "t": 5, "kind": "fancy_new_kind", "phase": 1, "value": -5}),
    ("event", {"seq": 4, "t": 5, "kind": "power_fail", "phase": 0, "value": None}),
    ("rt", SAMPLE_RT), ("rt", {"t": 9, "v_mv": [230000]}),
]


@pytest.fixture(scope="module")
def encoded():
    items = [(k, r, f) for k, r in RECORDS for f in ("bin", "json")]
    return list(zip(items, mp_encode(items)))


def _expected(kind, rec):
    e = dict(rec)
    if kind == "interval":
        for k in ("v_min_mv", "v_max_mv", "v_avg_mv"):
            e[k] = _v01(e.get(k, []))
    return e


def test_firmware_payloads_decode_on_headend(encoded):
    for (kind, rec, fmt), payload in encoded:
        assert payload is not None, (kind, rec, fmt)
        k, got = decode(payload, expect=kind)
        assert k == kind
        want = _expected(kind, rec) if fmt == "bin" else rec
        for key, v in want.items():
            assert got[key] == v, (kind, fmt, key, got[key], v)


def test_cpython_and_micropython_encode_the_same_bytes(encoded):
    for (kind, rec, fmt), payload in encoded:
        if fmt == "bin":
            assert fw_codec.encode(kind, rec, fmt) == payload


def test_three_phase_interval_fits_64_bytes():
    assert interval_bin_size() <= 64
    # the usual case: ai_wh is sent (layout bit 6 off), 4 bytes more (docs/protocol.md)
    from comm_harness import interval_bin_size_usual, interval_wire_size, SAMPLE_INTERVAL_USUAL
    assert interval_bin_size_usual() == interval_bin_size() + 4
    assert interval_wire_size(rec=SAMPLE_INTERVAL_USUAL) == \
        25 + len("lipari-0001") + interval_bin_size_usual()


def test_encoder_names_the_bad_field():
    out = mp_encode([("interval", dict(SAMPLE_INTERVAL, ae_wh=-1), "bin"),
                     ("interval", dict(SAMPLE_INTERVAL, ai_ph_wh=[1, 2, 3, 4]), "bin"),
                     ("event", dict(SAMPLE_EVENT, value=1.5), "bin"),
                     ("bogus", {}, "bin")])
    assert out == [None] * 4
    with pytest.raises(fw_codec.CodecError, match="ae_wh"):
        fw_codec.encode("interval", dict(SAMPLE_INTERVAL, ae_wh=-1))


def test_topic_kind_mismatch_is_an_error(encoded):
    payload = encoded[0][1]
    with pytest.raises(DecodeError, match="topic says event"):
        decode(payload, expect="event")


def test_decoder_fuzz_random_and_mutated(encoded):
    rng = random.Random(20261126)
    seeds = [p for (_, _, f), p in encoded]
    ok = bad = 0
    for n in range(6000):
        if n % 3 == 0:
            b = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
            if n % 2:
                b = bytes([0x10 | rng.randrange(1, 4)]) + b
        else:
            b = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(4)
                if op == 0 and b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
                elif op == 1 and b:
                    del b[rng.randrange(len(b)):]
                elif op == 2:
                    b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
                elif b:
                    i = rng.randrange(len(b))
                    b[i] ^= 1 << rng.randrange(8)
            b = bytes(b)
        try:
            kind, rec = decode(b)
        except DecodeError:
            bad += 1
            continue
        ok += 1
        assert kind in ("interval", "event", "rt")
        json.dumps(rec)                     # storable
    assert bad > 1000 and ok > 100          # both paths were exercised


ENGINE = r"""
import sys, json, binascii, asyncio
import main
from comm import codec
class R(main.Run):
    def count(self, kind, rec):
        main.Run.count(self, kind, rec)
        if kind == "rt" and self.summary.get("rt", 0) % 40 != 1:
            return
        print(json.dumps({"k": kind, "rec": rec,
                          "bin": binascii.hexlify(codec.encode(kind, rec)).decode()}))
asyncio.run(R({"board": BOARD, "step": True, "days": 0.02, "interval": 300,
               "print": "none"}).run())
"""


@pytest.mark.parametrize("board", ["unix_sim_3ph", "unix_sim_1ph"])
def test_records_of_the_real_engine_round_trip(board):
    import os
    from comm_harness import run_mp
    if not os.path.exists(os.path.join(ROOT, "boards", board + ".py")):
        pytest.skip("board %s not there" % board)
    out = run_mp(ENGINE.replace("BOARD", repr(board)), heapsize="8M",
                 env={"MICROPYPATH": ".frozen:%s/firmware:%s/boards:%s" % (ROOT, ROOT, ROOT)})
    lines = [d for d in (json.loads(x) for x in out.splitlines() if x.startswith("{")) if "k" in d]
    kinds = {x["k"] for x in lines}
    assert {"interval", "event", "rt"} <= kinds, kinds
    for x in lines:
        kind, got = decode(bytes.fromhex(x["bin"]), expect=x["k"])
        want = _expected(kind, x["rec"])
        for key, v in want.items():
            assert got.get(key) == v, (kind, key, got.get(key), v)
        if kind == "interval":
            assert len(bytes.fromhex(x["bin"])) <= 64


@pytest.mark.parametrize("nph", [1, 2, 3])
def test_rt_decoder_signs_phases_and_every_truncation(nph):
    """The live-reading decoder (one varint pass, headend/codec.py _rt): every field back
    with its sign, for each phase count, and every truncated payload refused naming the
    field it stopped at (never a record from part of one)."""
    rec = {k: (v[:nph] if isinstance(v, list) else v) for k, v in SAMPLE_RT.items()}
    rec["valid"] = (1 << nph) - 1
    rec["p_mw_total"] = -rec["p_mw_total"]
    b = fw_codec.encode("rt", rec, "bin")
    kind, got = decode(b, expect="rt")
    assert kind == "rt"
    for key, v in rec.items():
        assert got[key] == v, (key, got[key], v)
    for cut in range(1, len(b)):
        with pytest.raises(DecodeError, match=r"truncated at \w+ \(byte \d+\)"):
            decode(b[:cut])
    with pytest.raises(DecodeError, match="4 phases"):
        decode(b[:5] + bytes([4]) + b[6:])
    with pytest.raises(DecodeError, match="1 unexpected bytes"):
        decode(b + b"\x00")
