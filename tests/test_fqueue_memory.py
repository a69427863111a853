"""The flash queue keeps billing records whatever the heap does (issue 7), and a flash
failure is never silent.

On the 32-bit build with the firmware frozen (as on a board): appends with the heap
locked (no allocation at all) and with the rest of the heap exhausted, across a segment
change; the CRC-32 computed in 16-bit halves equals binascii.crc32. A flash that fails
for a while: bounded retries, QueueError and the `errors` counter, then recovery. And the
session on a real Mosquitto: records the flash refused wait in RAM and are delivered in
order, the status the head-end shows counts the failure (q_errors), a queue_error event
is raised."""
import json
import os
import subprocess
import time

import paho.mqtt.client as paho

from comm_harness import MP, MPPATH, ROOT
from conftest_broker import mosquitto  # noqa: F401  (fixture)
from fw32_harness import run_fw32

FLAKY = r"""
import os
from sim.flash import FlashDev

class FlakyDev(FlashDev):
    # a flash whose programs and erases fail (-EIO) while .failing is set
    failing = False
    def writeblocks(self, block, buf, offset=None):
        if self.failing:
            return -5
        return FlashDev.writeblocks(self, block, buf, offset)
    def ioctl(self, op, arg):
        if op == 6 and self.failing:
            return -5
        return FlashDev.ioctl(self, op, arg)

def mount(dev, point):
    try:
        os.umount(point)
    except OSError:
        pass
    os.mount(os.VfsLfs2(dev), point)
"""

HEAP = FLAKY + r"""
import gc, json, micropython, binascii
from array import array
from comm.fqueue import FlashQueue, QueueError, crc_halves

out = {}
# the CRC in halves is binascii's CRC-32
bad = 0
for n in range(0, 300, 7):
    data = bytes((i * 37 + n) & 0xFF for i in range(n))
    st = array("H", [0xFFFF, 0xFFFF])
    crc_halves(st, data, n)
    if ((st[0] << 16 | st[1]) ^ 0xFFFFFFFF) != binascii.crc32(data) & 0xFFFFFFFF:
        bad += 1
out["crc_mismatch"] = bad

dev = FlakyDev(1024, 32)                                 # 32 KiB of (RAM) flash
os.VfsLfs2.mkfs(dev)
mount(dev, "/fl")
q = FlashQueue("/fl/q", seg_bytes=600, max_segs=8)      # 8 records of 68 bytes a segment
recs = [b"L%03d" % i + bytes(60) for i in range(40)]     # made before the heap is taken
q.append(1, recs[0])                                     # warm up (first-call caches)

res = [0, None]      # appends done, exception: preallocated (globals would allocate)

def appends(a, b):
    res[0] = 0
    res[1] = None
    try:
        for i in range(a, b):
            q.append(1, recs[i])
            res[0] += 1
    except Exception as e:
        res[1] = e           # repr() would allocate: after the unlock

# 1. heap locked: 11 appends, across the change to the spare segment
micropython.heap_lock()
appends(1, 12)
micropython.heap_unlock()
out["locked_done"] = res[0]
out["locked_err"] = None if res[1] is None else repr(res[1])
out["locked_spare_error"] = type(q.last_error).__name__   # the new spare could not be opened
out["segments_after_locked"] = q.stats()["segments"]

# 2. the rest of the heap exhausted (not locked: the GC runs and finds nothing)
q.append(1, recs[12])                                    # reopens the spare
hog = [None] * 8000                                      # room for every piece of heap
free = [0]

def exhaust():
    i = 0
    for size in (1024, 256, 64, 1):
        try:
            while True:
                hog[i] = bytearray(size)
                i += 1
        except MemoryError:
            pass

def exhausted():
    exhaust()
    free[0] = gc.mem_free()
    appends(13, 24)

exhausted()
hog = None
gc.collect()
out["exhausted_done"] = res[0]
out["exhausted_err"] = None if res[1] is None else repr(res[1])
out["exhausted_free_b"] = free[0]

# 3. the flash fails for a while: bounded retries, then QueueError and the counter
dev.failing = True
try:
    q.append(1, recs[24])
    out["fail_raised"] = None
except QueueError as e:
    out["fail_raised"] = str(e)
out["fail_stats"] = q.stats()
dev.failing = False
q.append(1, recs[25])                                    # recovers, in a new segment
out["recovered"] = q.stats()

# everything that was stored is on flash, in order, with a good CRC (read back with
# binascii.crc32 after a remount)
dev2 = dev.reboot()
mount(dev2, "/fl")
q2 = FlashQueue("/fl/q", seg_bytes=600, max_segs=8)
got = []
while len(q2):
    got.append(q2.peek()[1][:4].decode())
    q2.ack()
out["got"] = got
print(json.dumps(out))
"""


def test_append_allocates_nothing_and_survives_an_exhausted_heap():
    r = json.loads(run_fw32(HEAP, heap_kib=128, timeout=120).strip().splitlines()[-1])
    assert r["crc_mismatch"] == 0, r
    # heap locked: every append stored, including the one that moved to the spare
    # segment; only opening the next spare failed (after the record was safe)
    assert r["locked_done"] == 11 and r["locked_err"] is None, r
    assert r["locked_spare_error"] == "MemoryError", r
    assert r["segments_after_locked"] == 2, r
    # heap exhausted: the same, with a few bytes left at most
    assert r["exhausted_done"] == 11 and r["exhausted_err"] is None, r
    assert r["exhausted_free_b"] < 128, r     # a few stray 16-byte blocks at most
    # a failing flash: three tries, then a clear error and the counter
    assert r["fail_raised"] and "not stored after 3 tries" in r["fail_raised"], r
    assert r["fail_stats"]["errors"] == 1, r
    assert r["recovered"]["appended"] == 25 and r["recovered"]["errors"] == 1, r
    want = ["L%03d" % i for i in range(24)] + ["L025"]
    assert r["got"] == want, r


SESSION = FLAKY + r"""
import sys, json, asyncio
from comm.fqueue import FlashQueue
from comm.session import Session
import comm_sockconn as sc
from comm_fakemeter import FakeMeter
from comm_harness_mp import INTERVAL

PORT = int(sys.argv[1])

class Meter(FakeMeter):
    ev_seq = 0
    def event(self, kind, phase=0, value=0):
        self.ev_seq += 1
        for s in self.sinks:
            s("event", {"seq": self.ev_seq, "t": 1767225600, "kind": kind, "phase": phase,
                        "value": value})

dev = FlakyDev(4096, 64)
os.VfsLfs2.mkfs(dev)
mount(dev, "/fl")
q = FlashQueue("/fl/q")
m = Meter()
s = Session("m1", {"host": "127.0.0.1", "port": PORT, "password": "m1-pw", "keepalive_s": 2,
                   "backoff_min_ms": 300, "backoff_max_ms": 1000, "ack_timeout_ms": 3000},
            sc.connect, q, cfg={"rt_s": 0, "backlog_per_s": 50, "ack_timeout_ms": 3000},
            info={"fw": "test", "board": "sim"})
s.attach(m)

def interval(i):
    rec = dict(INTERVAL)
    rec["seq"] = i
    rec["t_end"] = INTERVAL["t_end"] + 900 * i
    for sink in m.sinks:
        sink("interval", rec)

async def drained(ms):
    for _ in range(ms // 100):
        if not len(q) and not s._held:
            return True
        await asyncio.sleep_ms(100)
    return False

async def main():
    task = asyncio.create_task(s.run())
    for _ in range(100):
        if s.client.isconnected():
            break
        await asyncio.sleep_ms(100)
    for i in range(1, 4):
        interval(i)
    await drained(10000)
    dev.failing = True                   # the flash stops taking writes
    for i in range(4, 8):                # one metering step: no await in between
        interval(i)
    out = {"during": dict(s.stats), "held_during": len(s._held), "q_errors": q.errors}
    out["sent_from_ram"] = await drained(15000)   # sent from RAM while the flash fails
    dev.failing = False
    for i in range(8, 11):
        interval(i)
    out["drained"] = await drained(15000)
    out["status"] = s.status()
    await asyncio.sleep_ms(500)
    out["after"] = dict(s.stats)
    print(json.dumps(out))
    task.cancel()

asyncio.run(main())
"""


def test_session_keeps_and_reports_what_the_flash_refused(mosquitto, tmp_path):
    from headend.codec import decode
    got = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="fq-watch", clean_session=True)
    c.username_pw_set("headend", "headend-pw")
    c.on_message = lambda cl, ud, msg: got.append((msg.topic, msg.payload))
    c.connect("127.0.0.1", mosquitto.port, 30)
    c.subscribe("lipari/v1/m1/#", 1)
    c.loop_start()
    try:
        script = tmp_path / "fq_session.py"
        script.write_text(SESSION)
        p = subprocess.run([MP, "-X", "heapsize=4M", str(script), str(mosquitto.port)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env=dict(os.environ, MICROPYPATH=MPPATH))
        assert p.returncode == 0, p.stdout + p.stderr
        r = json.loads(p.stdout.strip().splitlines()[-1])
        time.sleep(0.5)
    finally:
        c.loop_stop()
        c.disconnect()
    # the flash refused records 4..7 and the event about them: counted, held in RAM
    # (and sent from there while the flash kept failing)
    assert r["during"]["queue_errors"] == 1, r  # the first; those after it wait behind it
    assert r["q_errors"] >= 1, r                 # the queue's own count of failed appends
    assert r["held_during"] == 4, r
    assert r["sent_from_ram"] and r["drained"], r
    assert r["status"]["q_errors"] >= 1, r
    assert r["status"]["held"] == 0, r
    assert r["after"]["held_dropped"] == 0, r
    seqs = [decode(pl)[1]["seq"] for t, pl in got if t.endswith("/interval")]
    assert seqs == list(range(1, 11)), seqs              # every record, once, in order
    events = [decode(pl)[1] for t, pl in got if t.endswith("/event")]
    assert [e["kind"] for e in events] == ["queue_error"] and events[0]["value"] == 5, events
    status = [json.loads(pl) for t, pl in got if t.endswith("/status")]
    assert any(st.get("q_errors", 0) >= 1 for st in status), status
