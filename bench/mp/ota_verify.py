# Bench (micropython): Ed25519 verification of a signed manifest by the meter's own code
# (firmware/ota/ed25519.py): time per verify (median of the runs) and the work counts a
# board's time can be estimated from. Argument: a JSON file [pub hex, sig hex, manifest hex].
import sys
import json
import time
import binascii
from ota import ed25519

pub, sig, msg = [binascii.unhexlify(x) for x in json.loads(open(sys.argv[1]).read())]
ts = []
for _ in range(5):
    t0 = time.ticks_us()
    ok = ed25519.verify(pub, sig, msg)
    ts.append(time.ticks_diff(time.ticks_us(), t0))
ts.sort()
c = ed25519.Counts
mults = 8 * c.dbl + 9 * c.add
print(json.dumps({"ok": ok, "ms": ts[len(ts) // 2] / 1000, "dbl": c.dbl, "add": c.add,
                  "sha512_blocks": c.sha_blocks, "field_mults": mults,
                  "manifest_bytes": len(msg)}))
