"""The MQTT client's receive buffer (firmware/comm/mqtt.py, issue 7): at rest it holds the
largest command and no more; an OTA download asks for a larger one (rx_buffer) and gives
it back; the swap happens at a packet boundary, keeping what the buffer holds; no memory
for the larger buffer leaves the client as it was. Run on the MicroPython unix port and
on the 32-bit build with the firmware frozen in (tests/fw32_harness.py)."""
import json
import os
import re

import pytest

from comm_harness import MP_FAKE_CONN, run_mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = MP_FAKE_CONN + r"""
import asyncio, json, gc
from comm.mqtt import MQTTClient, packet_bytes

def acks(sent):
    return [sent[k + 3] for k in range(len(sent) - 3) if sent[k] == 0x40 and sent[k + 1] == 2]

ID = "m" * 32                                   # the longest meter id (comm/session.py)
CMD_T = ("lipari/v1/%s/cmd" % ID).encode()
D_T = ("lipari/v1/%s/ota/d" % ID).encode()
conn = FakeConn()
got = []
async def opener(h, p, t): return conn
c = MQTTClient({"client_id": ID, "host": "x"}, opener,
               on_message=lambda t, p, d: got.append((t[-5:], None if p is None else len(p),
                                                      c.oversized_head[:12] if p is None else p[:12])))
res = {"rest": c.rx_rest, "size0": len(c._rx),
       "short_id": MQTTClient({"client_id": "m1", "host": "x"}, opener).rx_rest,
       "prefix": MQTTClient({"client_id": "m1", "host": "x",
                             "cmd_topic": "utility-x/meters/v1/m1/cmd"}, opener).rx_rest}

def cmd(rid, size):
    head = b'{"id": "' + rid + b'", "cmd": "ping", "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'

big_cmd = pub(CMD_T, cmd(b"max1", 1024), 5)      # the largest command: must fit
over_cmd = pub(CMD_T, cmd(b"over1", 1025), 6)    # one byte more: discarded, reported
chunk = pub(D_T, b"\x01TAG!\x00\x00\x00\x00" + bytes(range(256)) * 4)  # block 1024, QoS 0
res["big_cmd"] = len(big_cmd)
res["chunk"] = len(chunk)
res["chunk_calc"] = packet_bytes(len(D_T), 9 + 1024, 0)

async def until(f, ms=3000):
    for _ in range(ms // 2):
        if f(): return True
        await asyncio.sleep_ms(2)
    return False

async def main():
    task = asyncio.create_task(c.run())
    await until(c.isconnected)
    # 1. at rest: the largest command fits, one byte more and a chunk do not
    conn.data.extend(big_cmd + over_cmd + chunk + pub(CMD_T, cmd(b"s1", 40), 7))
    await until(lambda: len(got) >= 4)
    res["rest_got"] = [[g[0], g[1], g[2].decode()] for g in got]
    res["rest_acks"] = acks(conn.sent)
    res["rest_over"] = c.stats["oversized"]
    got.clear()
    # 2. a download: the larger buffer, swapped in by the run task, chunks received whole
    c.rx_buffer(len(chunk))
    res["pending_size"] = len(c._rx)             # not yet: the run task swaps it
    conn.data.extend(chunk + big_cmd.replace(b"\x00\x05{", b"\x00\x08{") + chunk)
    await until(lambda: len(got) >= 3)
    res["dl_size"] = len(c._rx)
    res["dl_got"] = [[g[0], g[1]] for g in got]
    got.clear()
    # 3. the end of the download while half a chunk is in the buffer: kept, not cut
    half = len(chunk) // 2
    conn.data.extend(chunk[:half])
    await until(lambda: conn.i >= len(conn.data))
    await asyncio.sleep_ms(20)
    c.rx_buffer()                                  # back to the resting size
    await asyncio.sleep_ms(50)                     # polls go by: the half packet stays
    res["half_size"] = len(c._rx)
    conn.data.extend(chunk[half:] + pub(CMD_T, cmd(b"s2", 40), 9))
    await until(lambda: len(got) >= 2)
    await asyncio.sleep_ms(20)
    res["after_got"] = [[g[0], g[1]] for g in got]
    res["after_size"] = len(c._rx)
    got.clear()
    # 4. no memory for the larger buffer: MemoryError to the caller, nothing changed
    for k in ("oom", "oom_size", "oom_pending"):
        res[k] = None                              # no allocation below while full
    gc.collect()
    fill = []
    try:                                           # no free block of 1 KiB is left
        while True:
            fill.append(bytearray(1024))
    except MemoryError:
        pass
    try:
        c.rx_buffer(len(chunk))
        res["oom"] = "no error"
    except MemoryError:
        res["oom"] = "MemoryError"
    res["oom_size"] = len(c._rx)
    res["oom_pending"] = c._rx_next is not None
    fill = None
    gc.collect()
    conn.data.extend(pub(CMD_T, cmd(b"s3", 40), 10) + chunk)   # the task lives on
    await until(lambda: len(got) >= 2)
    res["oom_got"] = [[g[0], g[1]] for g in got]
    res["alive"] = not task.done()
    try:
        c.rx_buffer(5000)
    except ValueError as e:
        res["too_big"] = str(e)
    res["stats"] = c.stats
    c.stop()

asyncio.run(main())
print(json.dumps(res))
"""


def check(r):
    # the bound: PUBLISH, QoS 1, topic lipari/v1/<32-char id>/cmd (46 bytes), payload 1024:
    # 1 (type) + 2 (remaining length 1074) + 2 (topic length) + 46 + 2 (packet id) + 1024
    assert r["rest"] == r["size0"] == r["big_cmd"] == 1 + 2 + 2 + 46 + 2 + 1024 == 1077, r
    assert r["short_id"] == 1077 - 30, r          # "m1": 30 bytes less of topic
    assert r["prefix"] == 1077 - 30 + len("utility-x/meters/v1") - len("lipari/v1"), r
    assert r["chunk"] == r["chunk_calc"] == 1 + 2 + 2 + 48 + 9 + 1024, r
    assert r["rest_got"] == [["m/cmd", 1024, '{"id": "max1'], ["m/cmd", None, '{"id": "over'],
                             ["ota/d", None, "\x01TAG!\x00\x00\x00\x00\x00\x01\x02"],
                             ["m/cmd", 40, '{"id": "s1",']], r["rest_got"]
    assert r["rest_acks"] == [5, 6, 7] and r["rest_over"] == 2, r
    assert r["pending_size"] == 1077 and r["dl_size"] == r["chunk"], r
    assert r["dl_got"] == [["ota/d", 1033], ["m/cmd", 1024], ["ota/d", 1033]], r
    assert r["half_size"] == r["chunk"], r          # not shrunk under half a packet
    assert r["after_got"] == [["ota/d", 1033], ["m/cmd", 40]], r
    assert r["after_size"] == 1077, r
    assert r["oom"] == "MemoryError" and r["oom_size"] == 1077 and not r["oom_pending"], r
    assert r["oom_got"] == [["m/cmd", 40], ["ota/d", None]], r      # at rest again
    assert r["alive"] and r["stats"]["drops"] == 0 and r["stats"]["oversized"] == 3, r
    assert r["too_big"] == "a 5000-byte packet is above mqtt max_packet (4160)", r


def test_receive_buffer_on_the_unix_port():
    out = run_mp(SCRIPT, heapsize="256k", timeout=60)
    check(json.loads(out.strip().splitlines()[-1]))


def test_receive_buffer_on_the_32bit_frozen_build():
    from fw32_harness import run_fw32
    out = run_fw32(SCRIPT, heap_kib=100, timeout=120)
    check(json.loads(out.strip().splitlines()[-1]))


def test_the_bound_follows_the_command_limit():
    # comm/mqtt.py cannot import comm/commands.py (the session loads it only to answer
    # a command): the two constants must stay equal
    src = open(os.path.join(ROOT, "firmware", "comm", "commands.py")).read()
    mq = open(os.path.join(ROOT, "firmware", "comm", "mqtt.py")).read()
    a = re.search(r"^MAX_CMD_BYTES = const\((\d+)\)", src, re.M)
    b = re.search(r"^_CMD_BYTES = const\((\d+)\)", mq, re.M)
    assert a and b and a.group(1) == b.group(1), (a, b)
