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
                  "recs": [r[:4] for r in recs], "empty": empty_err, "big": big,
                  "kept": [k for k in sys.modules if k.startswith("comm.fqueue_")]}))
""", heapsize="2M")
    r = json.loads(out.strip().splitlines()[-1])
    # 600-byte segments hold 8 records of 68 bytes; 3 segments: the oldest 16 were dropped
    assert r["a"]["dropped"] == 16 and r["a"]["queued"] == 24
    assert r["first"] == [1, "r016"]
    assert r["b"]["queued"] == 22 and r["b"]["dropped"] == 16      # persisted
    # the boot side and the meta writer (comm/fqueue_load.py) were loaded for the opens
    # and the drops, and are not kept (docs/ram.md)
    assert r["kept"] == [], r
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


HOLD = PRELUDE + r"""
import comm.fqueue as fq
T = [0]
fq._ticks = lambda: T[0]                 # the queue's clock, driven by the test

def recs(n0, n1):
    return [b'r%03d' % i + b'.' * 60 for i in range(n0, n1)]   # 68 bytes: 8 a segment

def names(q):
    return [r[:4] for r in contents(q)]

def fresh(n, max_segs, hold_ms, dev_class=FlashDev):
    # a new filesystem whose queue (600-byte segments) holds records r000..r<n-1>
    dev = dev_class(4096, 64)
    os.VfsLfs2.mkfs(dev)
    mount(dev)
    q = FlashQueue('/fl/q', seg_bytes=600, max_segs=max_segs, hold_ms=hold_ms)
    for r in recs(0, n):
        q.append(1, r)
    return dev, q
"""


def test_acknowledged_records_are_held_for_hold_ms_rewound_and_survive_a_reset():
    out = run_mp(HOLD + r"""
out = {}
dev, q = fresh(20, 8, 10000)
for i in range(12):                      # 12 acknowledged over 1.1 s
    T[0] = 100 * i
    q.peek()
    q.ack()
out['after_ack'] = q.stats()
out['next'] = q.peek()[1][:4].decode()
out['early_release'] = q.release(9999)   # none before hold_ms after its acknowledgement
# a reset now: the held records come back (the cursor is RAM, the head is on flash)
snap = FlashDev(dev.bs, dev.n, bytearray(dev.data))
# rewind (a reconnect): the held records are sent again, from the oldest
out['rewound'] = q.rewind()
out['after_rewind'] = [len(q), q.peek()[1][:4].decode()]
for i in range(12):
    T[0] = 20000 + 100 * i
    q.peek()
    q.ack()
out['rel_before'] = q.release(20000 + 1100 + 9999)
out['rel_after'] = q.release(20000 + 1100 + 10000 + 10000 // 6)   # within hold + hold/6
out['final'] = q.stats()
mount(snap)
q2 = FlashQueue('/fl/q', seg_bytes=600, max_segs=8, hold_ms=10000)
out['reset'] = [len(q2), q2.stats()['kept']]
out['reset_names'] = names(q2)
print(json.dumps(out))
""", heapsize="2M")
    r = json.loads(out.strip().splitlines()[-1])
    a = r["after_ack"]
    assert a["queued"] == 8 and a["kept"] == 12 and a["released"] == 0, r
    assert r["next"] == "r012" and r["early_release"] == 0, r
    assert r["rewound"] == 12 and r["after_rewind"] == [20, "r000"], r
    assert r["rel_before"] == 0 and r["rel_after"] == 12, r
    f = r["final"]
    assert f["queued"] == 8 and f["kept"] == 0 and f["released"] == 12, r
    assert f["segments"] == 2, r              # segment 0 (8 records) removed whole
    assert r["reset"] == [20, 0], r           # nothing released before the reset: all back
    assert r["reset_names"] == ["r%03d" % i for i in range(20)], r


def test_records_acknowledged_closer_together_than_the_mark_window_are_still_released():
    # A backlog drained at backlog_per_s (or a simulated month at speed 4320) acknowledges
    # a record every 100 ms, closer than a mark's window (hold_ms / 6). The newest mark
    # used to be moved to every acknowledgement and never aged: nothing was released, and
    # after the month's broker restart the rewind sent ~1,400 records again (a 250 s pause
    # of new records on NB-IoT). Each record must go once it is hold_ms + hold_ms / 6 old.
    out = run_mp(HOLD + r"""
dev, q = fresh(0, 64, 10000)
worst = 0
for i in range(300):                     # 30 s of records, one acknowledged every 100 ms
    T[0] = 100 * i
    q.append(1, b'r%03d' % i + b'.' * 60)
    q.peek()
    q.ack()
    worst = max(worst, q.stats()['kept'])
st = q.stats()
print(json.dumps({'worst': worst, 'final': st, 'rewound': q.rewind()}))
""", heapsize="2M")
    r = json.loads(out.strip().splitlines()[-1])
    bound = (10000 + 10000 // 6) // 100 + 1     # records acknowledged within hold x 7/6
    assert r["final"]["released"] >= 300 - bound, r
    assert r["worst"] <= bound, r
    assert r["rewound"] <= bound, r          # a reconnect re-sends the window, not all


def test_full_queue_releases_held_records_before_dropping_unacknowledged_ones():
    out = run_mp(HOLD + r"""
out = {}
dev, q = fresh(24, 3, 10000)             # full: 3 segments of 8
for i in range(20):                      # acknowledged, held (the clock stands still)
    q.peek()
    q.ack()
q.append(1, recs(24, 25)[0])             # a 4th segment: segment 0 (held) goes
out['one'] = q.stats()
for r in recs(25, 33):                   # segment 1 (held) goes
    q.append(1, r)
out['two'] = q.stats()
for r in recs(33, 41):                   # segment 2: 4 held, 4 never acknowledged
    q.append(1, r)
out['three'] = q.stats()
out['next'] = q.peek()[1][:4].decode()
dev2 = dev.reboot()
mount(dev2)
q2 = FlashQueue('/fl/q', seg_bytes=600, max_segs=3, hold_ms=10000)
out['reset'] = [q2.dropped, names(q2)]
print(json.dumps(out))
""", heapsize="2M")
    r = json.loads(out.strip().splitlines()[-1])
    assert r["one"]["early"] == 8 and r["one"]["dropped"] == 0, r
    assert r["one"]["kept"] == 12 and r["one"]["queued"] == 5, r
    assert r["two"]["early"] == 16 and r["two"]["dropped"] == 0, r
    # only once every held record of the head segment is released does the queue drop
    # what was never acknowledged (r020..r023): counted, in meta
    assert r["three"]["early"] == 20 and r["three"]["dropped"] == 4, r
    assert r["three"]["kept"] == 0 and r["three"]["queued"] == 17, r
    assert r["next"] == "r024", r
    assert r["reset"] == [4, ["r%03d" % i for i in range(24, 41)]], r


def test_power_cut_at_every_flash_operation_with_holds_releases_and_a_full_queue():
    out = run_mp(HOLD + r"""
import random
random.seed(11)
HOLD_MS = 1000
ops = []
nadd = 0
for k in range(70):                      # a fixed random workload
    x = random.getrandbits(4)
    if k < 6 or x < 6:
        ops.append(('add',))
        nadd += 1
    elif x < 12:
        ops.append(('ack',))
    elif x < 15:
        ops.append(('tick',))
    else:
        ops.append(('rewind',))
NAMES = ['r%03d' % i for i in range(nadd)]

def opq(path):
    return FlashQueue(path, seg_bytes=300, max_segs=4, hold_ms=HOLD_MS)   # 5 a segment

def snapshot(dev):
    # what a reset right now would find: the flash copied, mounted elsewhere
    d = FlashDev(dev.bs, dev.n, bytearray(dev.data))
    os.mount(os.VfsLfs2(d), '/snap')
    s = opq('/snap/q')
    got = [r.split('-')[0] for r in contents(s)]
    dropped = s.dropped
    s.close()
    os.umount('/snap')
    return got, dropped

def run(cut, snaps=None):
    dev = FlashDev(512, 64)
    os.VfsLfs2.mkfs(dev)
    mount(dev)
    dev.cut_at = None if cut is None else dev.ops + cut
    base = dev.ops
    T[0] = 0
    n = 0
    k = -1
    try:
        q = opq('/fl/q')
        if snaps is not None:
            snaps.append((snapshot(dev), q.early))
        for k, op in enumerate(ops):
            if op[0] == 'add':
                q.append(1, NAMES[n].encode() + b'-' * 40)
                n += 1
            elif op[0] == 'ack':
                if len(q):
                    q.peek()
                    q.ack()
            elif op[0] == 'tick':
                T[0] += 400
                q.release()
            else:
                q.rewind()
            if dev.dead:
                raise PowerCut()
            if snaps is not None:
                snaps.append((snapshot(dev), q.early, len(q), T[0]))
    except (PowerCut, OSError, QueueError):
        if not dev.dead:
            raise
        return dev, k, dev.ops - base
    return dev, None, dev.ops - base

# 1. the run without a cut, a snapshot after every operation, checked against a model
snaps = []
dev, _, total = run(None, snaps)
bad = []
X = 0            # release point (index into NAMES) of the previous snapshot
C = 0            # model cursor
n = 0
acked = {}       # record -> ticks of its (last) acknowledgement
lost = 0
early = 0
seen = set()
for k, op in enumerate(ops):
    (got, dropped), q_early, qlen, now = snaps[k + 1]
    if op[0] == 'add':
        n += 1
    elif op[0] == 'ack' and C < n:
        acked[C] = now
        C += 1
    elif op[0] == 'rewind':
        if X < C:
            seen.add('rewind')           # with held records to send again
        C = X
        acked = {i: t for i, t in acked.items() if i < X}
    X1 = n - len(got)
    if got != NAMES[X1:n]:
        bad.append({'k': k, 'why': 'not a contiguous tail', 'got': got})
        break
    if op[0] == 'add':                   # only a full queue moves the head here
        if X1 > C:
            lost += X1 - C
            C = X1
        if dropped != lost:
            bad.append({'k': k, 'why': 'dropped', 'dropped': dropped, 'lost': lost})
        if q_early - early != (X1 - X) - (dropped - snaps[k][0][1]):
            bad.append({'k': k, 'why': 'early', 'q_early': q_early, 'X': [X, X1]})
        early = q_early
        if X1 != X:
            seen.add('full_held' if dropped == snaps[k][0][1] else 'full_drop')
    else:
        for i in range(X, X1):           # released: acknowledged at least HOLD_MS ago
            if i not in acked or now - acked[i] < HOLD_MS:
                bad.append({'k': k, 'why': 'released too early', 'i': i})
        if X1 > X:
            seen.add('released')
        if op[0] == 'tick':              # ... and not much later than that
            for i, t in acked.items():
                if i >= X1 and now - t >= HOLD_MS + HOLD_MS // 6 + 400:
                    bad.append({'k': k, 'why': 'held too long', 'i': i})
        if dropped != lost or q_early != early:
            bad.append({'k': k, 'why': 'counts moved', 'dropped': dropped})
    if qlen != n - max(C, X1):
        bad.append({'k': k, 'why': 'len', 'qlen': qlen, 'model': n - max(C, X1)})
    X = X1

# 2. a power cut at every flash operation: after the reset, the state before or after
# the operation that was cut
cuts = 0
for cut in range(1, total + 1):
    dev, k, at = run(cut)
    if k is None:
        bad.append({'cut': cut, 'error': 'the workload ended before the cut'})
        continue
    cuts += 1
    dev2 = dev.reboot()
    mount(dev2)
    q2 = opq('/fl/q')
    got = [r.split('-')[0] for r in contents(q2)]
    (before, d0), (after, d1) = snaps[k][0], snaps[k + 1][0]
    # an append that needed a full queue's head segment may be cut after that segment
    # went (the new record not stored: the caller saw the failure), and after the drop
    # count was saved but before the segment went (counted, not lost: never the reverse)
    lists = (before, after, after[:-1]) if ops[k][0] == 'add' else (before, after)
    if got not in lists or q2.dropped not in (d0, d1) or (got == before and
                                                           ops[k][0] != 'add' and
                                                           q2.dropped != d0):
        bad.append({'cut': cut, 'op': k, 'got': got, 'before': snaps[k][0],
                    'after': snaps[k + 1][0]})
    q2.append(1, b'after')
    if [r.split('-')[0] for r in contents(q2)] != ['after']:
        bad.append({'cut': cut, 'error': 'not usable after the cut'})
print(json.dumps({'cuts': cuts, 'total': total, 'bad': bad[:3], 'nbad': len(bad),
                  'seen': sorted(seen), 'lost': lost, 'early': early}))
""", heapsize="4M", timeout=300)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["total"] > 120, r
    assert r["cuts"] == r["total"], r
    assert r["nbad"] == 0, r["bad"]
    # the workload went through every case: releases, rewinds, a full queue that
    # released held records early and one that had to drop unacknowledged records
    assert r["seen"] == ["full_drop", "full_held", "released", "rewind"], r
    assert r["lost"] > 0 and r["early"] > 0, r


def test_a_release_the_flash_refuses_is_retried_and_never_releases_more():
    from test_fqueue_memory import FLAKY         # FlakyDev: programs fail while .failing
    out = run_mp(FLAKY + HOLD + r"""
dev, q = fresh(10, 8, 0, FlakyDev)        # hold 0: released at the ack
dev.failing = True
for i in range(3):
    q.peek()
    q.ack()                                # delivered; the release cannot be written
out = {'failing': q.stats(), 'error': type(q.last_error).__name__}
dev.failing = False
q.peek()
q.ack()                                    # releases all four
out['ok'] = q.stats()
snap = FlashDev(dev.bs, dev.n, bytearray(dev.data))
mount(snap)
q2 = FlashQueue('/fl/q', seg_bytes=600, max_segs=8)
out['reset'] = names(q2)
print(json.dumps(out))
""", heapsize="2M")
    r = json.loads(out.strip().splitlines()[-1])
    assert r["failing"]["kept"] == 3 and r["failing"]["released"] == 0, r
    assert r["failing"]["queued"] == 7 and r["error"] == "OSError", r
    assert r["ok"]["kept"] == 0 and r["ok"]["released"] == 4 and r["ok"]["queued"] == 6, r
    assert r["reset"] == ["r%03d" % i for i in range(4, 10)], r
