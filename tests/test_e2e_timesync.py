"""A meter that boots without a valid clock (no RTC backup) takes the network's time from
its NB-IoT modem (AT+QLTS) once the link is up: the running interval closes as partial,
a clock_set event is raised, and later intervals carry real, synced timestamps."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from comm_harness import ROOT
from conftest_broker import Mosquitto
from headend import meter_net

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto"), reason="mosquitto not installed")


def test_unsynced_meter_takes_network_time_from_the_modem(tmp_path):
    broker = Mosquitto(tmp_path / "broker", users={"mt": "mt-pw"})
    broker.start()
    creds = meter_net.write_creds(str(tmp_path / "mt.creds"), "mt", "mt-pw")
    try:
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, "-m", "headend.cli", "meter", "--broker", "127.0.0.1:%d" % broker.port,
             "--transport", "nbiot", "--id", "mt", "--creds", creds, "--days", "0.01",
             "--speed", "120", "--interval", "60", "--start", "86400", "--json"],
            capture_output=True, text=True, timeout=150, cwd=ROOT)
        t1 = time.time()
    finally:
        broker.stop()
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-1000:]
    ivs = [r for r in lines if r.get("type") == "interval"]
    sets = [r for r in lines if r.get("type") == "event" and r.get("kind") == "clock_set"]
    assert sets, p.stdout[-2000:]
    # before the sync: 1970 timestamps flagged "clock not synced" (bit 0)
    early = [r for r in ivs if r["t_end"] < 1000000]
    assert all(r["flags"] & 1 for r in early)
    # after it: real time (the virtual meter then runs at 120x from there), synced
    late = [r for r in ivs if r["t_end"] > 1700000000]
    assert late, ivs[-3:]
    assert t0 - 60 <= late[0]["t_end"] <= t1 + 0.01 * 86400 + 120
    assert not late[-1]["flags"] & 1
