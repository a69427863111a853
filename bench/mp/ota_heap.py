# Bench (micropython): the live heap the OTA agent's work needs beside the meter: its modules,
# the signature check of a real manifest, and the staging of a whole real release chunk by
# chunk into littlefs (as the agent does, with a window of chunks held as received).
# gc.collect() before each sample: live objects only (garbage is the GC's, not a need).
# Arguments: release directory, pub hex, window (chunks in flight).
import sys
import os
import gc
import json
import binascii

gc.collect()
base = gc.mem_alloc()
peak = [0]
from sim.unixboard import FileDev       # the board's flash (not OTA's), outside the count
gc.collect()
base = gc.mem_alloc()


def sample():
    gc.collect()
    a = gc.mem_alloc() - base
    if a > peak[0]:
        peak[0] = a


from ota import manifest as man
from ota.stage import Stage, makedirs
from ota import ed25519
from ota import agent                  # noqa: F401 (its code counts too)
gc.collect()
code = gc.mem_alloc() - base
base = gc.mem_alloc()
rel, pub, window = sys.argv[1], binascii.unhexlify(sys.argv[2]), int(sys.argv[3])
raw = open(rel + "/manifest.json", "rb").read()
sig = binascii.unhexlify(open(rel + "/manifest.sig").read().strip())
g = ed25519._verify_steps(pub, sig, raw)
try:
    while True:
        next(g)
        sample()
except StopIteration as e:
    assert e.value
m = man.check_fields(json.loads(raw))
img = "/tmp/ota-heap-%d.img" % os.getpid() if hasattr(os, "getpid") else "/tmp/ota-heap.img"
dev = FileDev(img)                     # the flash outside the heap, as on a board
os.remove(img)
os.VfsLfs2.mkfs(dev)
os.mount(os.VfsLfs2(dev), "/fl")
makedirs("/fl/fw/b")
gc.collect()
base = gc.mem_alloc()                  # the mounted filesystem is the board's, not OTA's
st = Stage("/fl/fw", m, "/fl/fw/b")
f = open(rel + "/image.bin", "rb")
ts, b, tot = man.table_size(m), m["block"], man.wire_size(m)
off = 0
while off < tot:
    inbox = []
    for _ in range(window):              # a window of chunks as the MQTT client hands them
        if off >= tot:
            break
        end = min((off // b + 1) * b, ts) if off < ts else min(ts + ((off - ts) // b + 1) * b, tot)
        f.seek(off)
        inbox.append((off, f.read(end - off)))
        off = end
    sample()
    for o, d in inbox:
        st.accept(o, d)
    inbox = None
    sample()
for _ in st.check_files():
    pass
sample()
print(json.dumps({"ota_heap_peak_kib": round(peak[0] / 1024, 1),
                  "ota_code_kib": round(code / 1024, 1), "done": st.done()}))
