"""The meter's MQTT download loop (firmware/ota/agent.py) on the MicroPython unix port,
against a fake head-end that answers as headend/ota_server.py does
(tests/ota_fetch_mp.py): no piece is asked for twice unless it was really lost, and a
lost one is asked again after chunk_wait_ms.

`make bench` of 2026-11-30 01:57 sent pieces twice (ota_resent_ratio 1.0124) in a
download 1.4 s *shorter* than the runs without: no chunk_wait_ms (1.5 s in the bench)
had passed. The window had ended at once because the data event was still set by a piece
that came while the agent was writing the one before, and the pieces still on their way
were asked for again. "race" reproduces that order of arrival.
"""
import json
import os

from comm_harness import run_mp
from ota_harness import ROOT
from test_ota_powercut import powercut_inputs


def run_fetch(tmp_path, mode, oom=0, **cfg):
    inp = json.loads(open(powercut_inputs(tmp_path)).read())
    d = tmp_path / "fw"
    d.mkdir()
    cfg = dict({"window": {"nbiot": 4}, "gap_ms": 10, "chunk_wait_ms": 20000}, **cfg)
    path = tmp_path / "fetch.json"
    path.write_text(json.dumps({"manifest": inp["manifest"], "image": inp["image"],
                                "dir": str(d), "mode": mode, "cfg": cfg, "oom": oom}))
    code = "INPUT = %r\nexec(open(%r).read())\n" % (
        str(path), os.path.join(ROOT, "tests", "ota_fetch_mp.py"))
    return json.loads(run_mp(code, timeout=300).strip().splitlines()[-1])


def test_a_late_last_piece_is_waited_for_not_asked_again(tmp_path):
    r = run_fetch(tmp_path, "race")
    assert r["done"], r
    assert r["pieces"] >= 10, r                 # several windows, the last one short
    twice = [s for s in r["sent"] if s[1] != 1]
    assert not twice, "pieces sent more than once: %s (requests %s)" % (twice, r["requests"])
    assert len(r["sent"]) == r["pieces"]
    assert len(r["requests"]) == (r["pieces"] + 3) // 4, r["requests"]
    assert r["stats"]["timeouts"] == 0, r["stats"]
    # the last answer holds fewer pieces than the window: it is not waited on for
    # chunk_wait_ms (20 s here) as if pieces were missing
    assert r["ms"] < 20000, r["ms"]


def test_a_lost_piece_is_asked_again_after_chunk_wait(tmp_path):
    r = run_fetch(tmp_path, "lose", chunk_wait_ms=300)
    assert r["done"], r
    twice = [s[0] for s in r["sent"] if s[1] != 1]
    assert len(twice) == 1, r["sent"]            # the lost one, and only it
    assert r["requests"][2][0] == twice[0], r["requests"]
    assert r["stats"]["timeouts"] == 1, r["stats"]


# -- the client's receive buffer during a download (issue 7: comm/mqtt.py rx_buffer) ------
def test_the_receive_buffer_is_grown_for_the_download_and_given_back(tmp_path):
    r = run_fetch(tmp_path, "lose", chunk_wait_ms=300)
    assert r["done"] and r["refused"] is None, r
    # one chunk packet of this release: 1 + 2 (fixed header) + 2 + 18 (lipari/v1/m1/ota/d)
    # + 9 (chunk header) + the block
    assert r["need"] == 1 + 2 + 2 + len("lipari/v1/m1/ota/d") + 9 + r["block"], r
    assert r["rx"] == [r["need"], 0], r["rx"]        # asked once, given back once
    assert r["stats"]["rx_mem_errors"] == 0


def test_the_receive_buffer_is_given_back_after_a_failed_download(tmp_path):
    r = run_fetch(tmp_path, "bad", chunk_wait_ms=300, stall_s=3, bad_chunk_limit=2)
    assert not r["done"] and r["refused"].startswith("fetch: "), r
    assert r["rx"] == [r["need"], 0], r["rx"]
    assert r["stats"]["bad_chunks"] >= 1 or "no progress" in r["refused"], r


def test_no_memory_for_the_buffer_is_counted_and_tried_again(tmp_path):
    r = run_fetch(tmp_path, "lose", chunk_wait_ms=300, oom=2)
    assert r["done"] and r["refused"] is None, r
    assert r["stats"]["rx_mem_errors"] == 2, r["stats"]
    assert r["rx"] == [r["need"]] * 3 + [0], r["rx"]    # no give-back of what was not had
    assert r["requests"], r


def test_no_memory_for_the_buffer_at_all_fails_the_download_cleanly(tmp_path):
    r = run_fetch(tmp_path, "lose", chunk_wait_ms=300, stall_s=1, oom=-1)
    assert not r["done"] and r["requests"] == [], r     # nothing asked without a buffer
    assert r["refused"].startswith("fetch: no progress for 1 s at byte 0; no room for a "
                                   "%d-byte receive buffer" % r["need"]), r["refused"]
    assert r["stats"]["rx_mem_errors"] >= 2, r["stats"]
    assert 0 not in r["rx"], r["rx"]
