"""`lipari meter --broker HOST:PORT --transport wifi|nbiot|plc --id ID --creds FILE`:
the real firmware (compiled by mpy-cross, as `lipari meter` runs it) on a real Mosquitto
with per-meter credentials, one process per transport, into the head-end database; and
the wiring's configuration errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from comm_harness import MP, ROOT
from conftest_broker import Mosquitto
from headend import meter_net
from headend.ingest import Ingest
from headend.store import Store

needs_broker = pytest.mark.skipif(not shutil.which("mosquitto"), reason="mosquitto not installed")
FW_PATH = ":".join([os.path.join(ROOT, "firmware"), os.path.join(ROOT, "boards"), ROOT, ".frozen"])


@needs_broker
def test_lipari_meter_over_each_transport(tmp_path):
    users = {"headend": "headend-pw", "mw": "mw-pw", "mn": "mn-pw"}
    broker = Mosquitto(tmp_path / "broker", users=users)
    # the PLC meter gets its credentials the way an installer does: add-meter.sh
    out = subprocess.run(["sh", os.path.join(ROOT, "conf", "mosquitto", "add-meter.sh"), "mp",
                          broker.passwd, str(tmp_path / "keys")], capture_output=True,
                         text=True, check=True).stdout
    (tmp_path / "mp.creds").write_text(out)
    broker.start()
    creds = {"mw": meter_net.write_creds(str(tmp_path / "mw.creds"), "mw", "mw-pw", os.urandom(32)),
             "mn": meter_net.write_creds(str(tmp_path / "mn.creds"), "mn", "mn-pw"),
             "mp": str(tmp_path / "mp.creds")}
    store = Store("sqlite:///%s/h.db" % tmp_path)
    ing = Ingest(store, port=broker.port, user="headend", password="headend-pw",
                 client_id="cli-ingest", anchor=True).start()
    procs = {}
    try:
        assert ing.connected.wait(5)
        for mid, tr in (("mw", "wifi"), ("mn", "nbiot"), ("mp", "plc")):
            procs[mid] = subprocess.Popen(
                [sys.executable, "-m", "headend.cli", "meter", "--broker",
                 "127.0.0.1:%d" % broker.port, "--transport", tr, "--id", mid, "--creds",
                 creds[mid], "--days", "0.01", "--speed", "240", "--interval", "60",
                 "--start", "1767225600", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        outs = {mid: p.communicate(timeout=100)[0] for mid, p in procs.items()}
        import time
        time.sleep(1.0)
        for mid, tr in (("mw", "wifi"), ("mn", "nbiot"), ("mp", "plc")):
            lines = [json.loads(ln) for ln in outs[mid].splitlines() if ln.startswith("{")]
            made = [r for r in lines if r.get("type") == "interval"]
            summ = [r for r in lines if r.get("type") == "summary"]
            assert procs[mid].returncode == 0 and summ, outs[mid][-2000:]
            # 0.01 days of 60 s intervals: 14 whole ones, less what a forward clock_set
            # skipped (a loaded machine lets the meter's clock fall behind network time)
            jump_s = sum(max(0, r["value"]) for r in lines
                         if r.get("type") == "event" and r.get("kind") == "clock_set")
            want = 14 - -(-jump_s // 60)
            assert len(made) >= want and summ[0]["unsent"] == 0, outs[mid][-2000:]
            stored = store.intervals(mid)
            assert [r["seq"] for r in stored] == [r["seq"] for r in made], (mid, outs[mid][-800:])
            assert [r["ai_wh"] for r in stored] == [r["ai_wh"] for r in made]
            assert stored[-1]["ai_wh"] == summ[0]["ai_wh"]
            # the status the meter published names the transport that carried it
            st = [s for s in store.status_log(mid) if s.get("online")]
            assert st and st[-1]["status"]["transport"] == tr, (mid, st)
            assert [e["kind"] for e in store.events(mid)][:1] == ["boot"]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        ing.stop()
        broker.stop()
        store.close()


def _run_fw(args, tmp_path):
    env = dict(os.environ, MICROPYPATH=FW_PATH)
    p = subprocess.run([MP, "-X", "heapsize=1M", os.path.join(ROOT, "firmware", "main.py"),
                        "--board", "unix_sim_3ph", "--step", "--days", "0.001"] + args,
                       capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path))
    errs = [json.loads(ln) for ln in p.stdout.splitlines() if '"type": "error"' in ln]
    return p.returncode, errs, p.stdout + p.stderr


@pytest.mark.parametrize("args,creds,expect", [
    (["--transport", "nbiot"], None, "pass --modem"),
    (["--transport", "lora"], None, "use wifi, nbiot or plc"),
    (["--transport", "wifi,wifi"], None, "listed twice"),
    (["--broker", "127.0.0.1:notaport"], None, "is not a number"),
    ([], {"user": "other", "password": "x"}, "is for meter 'other'"),
    ([], {"user": "m1", "cmd_key": "abcd"}, "64 hex digits"),
    ([], {"user": "m1", "pasword": "typo"}, "unknown key 'pasword'"),
    (["--creds", "/nonexistent/m1.creds"], None, "cannot read the credentials file"),
    (["--modem", "/nonexistent/tty", "--transport", "nbiot"], None, "cannot open the NB-IoT"),
])
def test_wiring_config_errors_say_what_to_fix(tmp_path, args, creds, expect):
    base = ["--broker", "127.0.0.1:1", "--id", "m1"]
    if creds is not None:
        p = tmp_path / "c.json"
        p.write_text(json.dumps(creds))
        base += ["--creds", str(p)]
    rc, errs, out = _run_fw(base + args, tmp_path)
    assert rc == 2 and errs and expect in errs[0]["msg"], out[-1500:]
