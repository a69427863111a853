"""Flash queue on littlefs (os.VfsLfs2 over sim/flash.py): order, bounds, drop counting,
and power cuts at every flash operation of a random workload (run on micropython)."""
import json

from comm_harness import run_mp

PRELUDE = r"""
import os, sys, json
from sim.flash import FlashDev, PowerCut
from comm.fqueue import FlashQueue, QueueError

def mount(dev):
    try:
        os.umount('/fl')
    except OSError:
        pass
    os.mount(os.VfsLfs2(dev), '/fl')

def contents(q):
    # the queue's records in order, read by acknowledging them all
    out = []
    while len(q):
        out.append(q.peek()[1].decode())
        q.ack()
    return out
"""


def test_order_bound_and_drop_count_survive_remount():
    out = run_mp(PRELUDE + r"""
dev = FlashDev(4096, 64)
os.VfsLfs2.mkfs(dev)
mount(dev)
q = FlashQueue('/fl/q', seg_bytes=600, max_segs=3)
for i in range(40):
    q.append(1 + i % 2, b'r%03d' % i + b'.' * 60)
a = q.stats()
first = q.peek()
q.ack(); q.ack()
mount(dev)
q = FlashQueue('/fl/q', seg_bytes=600, max_segs=3)
b = q.stats()
recs = contents(q)
try:
    q.ack()
    empty_err = None
except QueueError as e:
    empty_err = str(e)
try:
    q.append(1, b'x' * 700)
    big = None
except QueueError as e:
    big = str(e)
print(json.dumps({"a": a, "b": b, "first": [first[0], first[1][:4].decode()],
                  "recs": [r[:4] for r in recs], "empty": empty_err, "big": big}))
""", heapsize="2M")
    r = json.loads(out.strip().splitlines()[-1])
    # 600-byte segments hold 8 records of 68 bytes; 3 segments: the oldest 16 were dropped
    assert r["a"]["dropped"] == 16 and r["a"]["queued"] == 24
    assert r["first"] == [1, "r016"]
    assert r["b"]["queued"] == 22 and r["b"]["dropped"] == 16      # persisted
    assert r["recs"] == ["r%03d" % i for i in range(18, 40)]
    assert "empty" in r["empty"] and "does not fit" in r["big"]


def test_thirty_days_of_15_minute_records_fit_in_1_mb():
    out = run_mp(PRELUDE + r"""
from comm import codec
sys.path.append('tests')
dev = FlashDev(4096, 256)          # 1 MB filesystem
os.VfsLfs2.mkfs(dev)
mount(dev)
q = FlashQueue('/fl/q')            # default bounds
import comm_harness_mp as h
n = 30 * 96
for i in range(n):
    rec = dict(h.INTERVAL)
    rec['seq'] = i
    q.append(1, codec.encode('interval', rec))
print(json.dumps(q.stats()))
""", heapsize="4M", timeout=120)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["queued"] == 30 * 96 and r["dropped"] == 0


def test_power_cut_at_every_flash_operation():
    out = run_mp(PRELUDE + r"""
import random
random.seed(7)
results = []
ops = []
nrec = 0
for k in range(30):                      # a fixed random workload
    if random.getrandbits(2) == 0 and k > 3:
        ops.append(('ack',))
    else:
        ops.append(('add', 'r%03d' % nrec))
        nrec += 1

def apply(model, op):
    if op[0] == 'add':
        return model + [op[1]]
    return model[1:] if model else model

def run(cut):
    # the workload from an empty filesystem, power cut at flash operation `cut` after
    # the mount (None: never) -> (device, model, pending, operation of the cut or None)
    dev = FlashDev(512, 64)
    os.VfsLfs2.mkfs(dev)
    mount(dev)
    dev.cut_at = None if cut is None else dev.ops + cut
    base = dev.ops
    model = []
    pending = None
    try:
        q = FlashQueue('/fl/q', seg_bytes=300, max_segs=8)    # opening writes too
        for op in ops:
            pending = apply(model, op)
            if op[0] == 'add':
                q.append(1, op[1].encode() + b'-' * 40)
            elif len(q):
                q.peek()
                q.ack()
            if dev.dead:                 # a cut the queue met and kept going (a release
                raise PowerCut()         # it retries later): the op may not have landed
            model = pending
        pending = None
    except (PowerCut, OSError, QueueError):
        # littlefs may turn the cut into EIO, the queue's retries into QueueError;
        # either way the device must be dead
        if not dev.dead:
            raise
        return dev, model, pending, dev.ops - base
    return dev, model, pending, None

dev, model, _, _ = run(None)
dev0 = FlashDev(512, 64)
os.VfsLfs2.mkfs(dev0)
mount(dev0)
total = dev.ops - dev0.ops               # operations of the whole workload after the mount
bad = []
cuts = 0
for cut in range(1, total + 1):          # every flash operation of the workload
    dev, model, pending, at = run(cut)
    if at is None:
        bad.append({'cut': cut, 'error': 'the workload ended before the cut'})
        continue
    cuts += 1
    dev2 = dev.reboot()
    mount(dev2)
    q2 = FlashQueue('/fl/q', seg_bytes=300, max_segs=8)
    got = [r.split('-')[0] for r in contents(q2)]
    if got != model and got != pending:
        bad.append({'cut': cut, 'got': got, 'model': model, 'pending': pending})
    q2.append(1, b'after')                 # still usable
    if [r.split('-')[0] for r in contents(q2)] != ['after']:
        bad.append({'cut': cut, 'error': 'not usable after the cut'})
print(json.dumps({'cuts': cuts, 'total': total, 'bad': bad[:3], 'nbad': len(bad)}))
""", heapsize="2M", timeout=120)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["total"] > 100, r               # the workload really writes (30 ops, 5 segments)
    assert r["cuts"] == r["total"], r        # a cut at every one of them
    assert r["nbad"] == 0, r["bad"]
