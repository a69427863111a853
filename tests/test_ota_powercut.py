"""A power cut at every flash write of an OTA update (tests/ota_powercut_mp.py on the
MicroPython unix port, littlefs on sim/flash.py): every cut leaves a meter that boots a
complete signed firmware with its energy checkpoint intact, and the update then
completes from where it stopped.

The release is small (a few files, 256-byte blocks, so that a block spans files and
files span blocks) to keep the run short: the writes it makes are of every kind a full
release makes (clearing the slot, the download note, the block table, the directory,
files, the switch record, the trial boot, the confirmation), and the checkpoints of the
metering in between. The full-size release goes through the same code (tests/
test_ota_e2e.py, with a meter power cut in the middle of its download).
"""
import json
import os

from comm_harness import run_mp
from ota_harness import ROOT

from headend import ota


def small_files(seed):
    def blob(n, k):
        return bytes((i * 7 + k * 13 + seed) & 0xFF for i in range(n))
    return [("main.mpy", blob(700, 1)), ("version.mpy", blob(90, 2)),
            ("ota/agent.mpy", blob(1500, 3)), ("ota/empty.mpy", b""),
            ("comm/x.mpy", blob(257, 4))]


def powercut_inputs(tmp_path, block=256):
    key_dir = tmp_path / "k"
    ota.keygen(str(key_dir))
    key = ota.load_key(str(key_dir / "ota.key"))
    files = small_files(1)
    dir_json, body = ota.make_body(files)
    table = ota.make_table(body, block)
    import hashlib
    m = {"v": 1, "version": "0.2.0", "min_version": "0.2.0", "boards": ["unix-sim-3ph"],
         "kind": "mpy", "created": 0, "expires": 1 << 40, "block": block,
         "dir_size": len(dir_json), "body_size": len(body), "files": len(files),
         "table_sha256": hashlib.sha256(table).hexdigest(),
         "body_sha256": hashlib.sha256(body).hexdigest(), "trial_s": 600}
    raw = json.dumps(m, sort_keys=True, separators=(",", ":"))
    key.sign(raw.encode())
    inp = {"manifest": raw, "image": (table + body).hex(),
           "base": [(p, d.hex()) for p, d in small_files(2)],
           "new": [(p, d.hex()) for p, d in files]}
    path = tmp_path / "in.json"
    path.write_text(json.dumps(inp))
    return str(path)


def run_powercut(path, timeout=600):
    code = "INPUT = %r\nexec(open(%r).read())\n" % (
        path, os.path.join(ROOT, "tests", "ota_powercut_mp.py"))
    out = run_mp(code, timeout=timeout, heapsize="8M")
    return json.loads(out.strip().splitlines()[-1])


def test_power_cut_at_every_write_of_an_update(tmp_path):
    res = run_powercut(powercut_inputs(tmp_path))
    cuts = res["cuts"]
    assert len(cuts) == res["writes"] and len(cuts) >= 40, len(cuts)
    bad = [c for c in cuts if not (c[2] and c[3] and c[4] is True)]
    assert not bad, bad
    # both outcomes happen: cuts before the switch boot the old slot, after it the new one
    assert {c[1] for c in cuts} == {0, 1}
