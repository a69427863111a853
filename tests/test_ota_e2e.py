"""OTA end to end through a real Mosquitto, from `lipari ota push` to virtual meters that
the bootstrap starts from their own directory (tests/ota_harness.py). Every scenario
ends with the meter running a good signed firmware, its energy registers intact, and the
outcome in the head-end store that the dashboard's API reads.

Several meters run side by side in one test (one scenario each) to keep `make test` short.
"""
import os
import shutil
import time

import pytest

from ota_harness import OtaFleet, patched_tree, wait_for, START

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                reason="mosquitto not installed (make setup installs it)")


def energy_intact(f, mid):
    """The meter's own interval records across all its boots: cumulative registers never
    go down, sequence numbers go on, and the head-end stored every one of them. Energy
    lost (flags bit 4) only on the first interval after a restart: on the virtual meter
    a restart is a power cycle of the simulated chips too, and the engine flags the
    seconds the meter was off; the registers it restored are checked by the monotony."""
    m = f.meters[mid]
    iv = m.intervals()
    assert len(iv) >= 2, "meter made too few intervals: %s" % iv
    for a, b in zip(iv, iv[1:]):
        assert b["ai_wh"] >= a["ai_wh"] and b["ae_wh"] >= a["ae_wh"], (a, b)
        assert b["ap_vah"] >= a["ap_vah"], (a, b)
        assert b["seq"] == a["seq"] + 1, (a["seq"], b["seq"])
        assert not b["flags"] & 16 or b["boot"] != a["boot"], b
    wait_for(lambda: {r["seq"] for r in f.store.intervals(mid)} >= {r["seq"] for r in iv},
             30, "%s's intervals at the head-end" % mid)
    return iv


def settled(f, mid, state):
    st = f.ota_state(mid)["state"]
    return st is not None and st["state"] == state and st


@pytest.fixture
def fleet(tmp_path):
    f = OtaFleet(tmp_path, ["m1", "m2", "m3", "m4", "m5", "m6"])
    yield f
    f.close()


def test_good_update_then_crashing_and_unreachable_releases_roll_back(fleet, tmp_path):
    f = fleet
    good = f.meter("m1")
    crash = f.meter("m2", transport="wifi", profile="pv")
    deaf = f.meter("m3", profile="motor")
    rel = f.release("0.2.0")
    rel_crash = f.release("0.2.1", src=patched_tree(tmp_path, "crash", {
        "main.py": ("import sys\n", "import sys\nraise RuntimeError('release 0.2.1 is broken')\n")}))
    # boots, meters, but its MQTT port is wrong: it never reaches the broker
    rel_deaf = f.release("0.2.2", src=patched_tree(tmp_path, "deaf", {
        "comm/wiring_boot.py": ('mq = {"host": host, "port": port,', 'mq = {"host": host, "port": port + 1,')}))
    wait_for(lambda: all(len(m.intervals()) >= 2 for m in (good, crash, deaf)), 60, "metering")
    procs = [f.push_bg(rel, "m1"), f.push_bg(rel_crash, "m2"), f.push_bg(rel_deaf, "m3")]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    rcs = [p.returncode for p in procs]
    assert rcs == [0, 1, 1], outs
    s1 = wait_for(lambda: settled(f, "m1", "confirmed"), 30, "m1 confirmed")
    assert s1["fw"] == "0.2.0" and s1["slot"] == "b"
    s2 = wait_for(lambda: settled(f, "m2", "rolled_back"), 30, "m2 rolled back")
    assert s2["fw"] == "0.1.0" and "crashed at boot" in s2["reason"] and s2["target"] == "0.2.1"
    s3 = wait_for(lambda: settled(f, "m3", "rolled_back"), 30, "m3 rolled back")
    assert s3["fw"] == "0.1.0" and "health deadline" in s3["reason"], s3
    # what runs now, from the meters' own flash
    assert good.running_version() == "0.2.0" and good.record()["state"] == 0
    assert crash.running_version() == "0.1.0" and crash.record()["slot"] == 0
    assert deaf.running_version() == "0.1.0" and deaf.record()["last"] == 4
    # the rolled-back meters keep metering on the old firmware and reach the broker
    n2, n3 = len(crash.intervals()), len(deaf.intervals())
    wait_for(lambda: len(crash.intervals()) > n2 + 1 and len(deaf.intervals()) > n3 + 1, 60,
             "metering after the rollback")
    for mid in ("m1", "m2", "m3"):
        energy_intact(f, mid)
    # the rollouts as the head-end recorded them
    assert f.ota_state("m2")["target"]["outcome"] == "failed"
    assert f.ota_state("m1")["target"]["outcome"] == "ok"


def _broken_copy(rel, name, damage):
    d = os.path.join(os.path.dirname(rel), name)
    shutil.copytree(rel, d)
    img = os.path.join(d, "image.bin")
    data = bytearray(open(img, "rb").read())
    with open(img, "wb") as fh:
        fh.write(damage(data))
    return d


def _flip(data):
    data[len(data) // 2] ^= 0x40          # one bit in the middle of the body
    return data


def test_refused_and_failed_releases_leave_the_old_firmware_running(fleet, tmp_path):
    f = fleet
    ms = {mid: f.meter(mid) for mid in ("m1", "m2", "m3", "m4", "m5", "m6")}
    from headend import ota
    other = os.path.join(str(tmp_path), "other-key")
    ota.keygen(other)
    good = f.release("0.2.0")
    cases = {
        "m1": (f.release("0.3.0", key=os.path.join(other, "ota.key")), "signature"),
        "m2": (f.release("0.3.1", boards=("stm32_stpm34_33_ct",)), "board"),
        "m3": (f.release("0.0.9"), "downgrade"),
        "m4": (f.release("0.3.2", expires=START - 86400), "expired"),
        "m5": (_broken_copy(good, "tampered", _flip), "fetch: block"),
        "m6": (_broken_copy(good, "truncated", lambda d: d[:len(d) * 2 // 3]), "fetch: chunk"),
    }
    # lipari ota push checks a release before it offers it ...
    for mid in ("m1", "m5", "m6"):
        rc, out, text = f.push(cases[mid][0], mid)
        assert rc == 2 and "not fit to push" in text, text
    # ... and the meters check it themselves (pushed with --no-verify)
    wait_for(lambda: all(len(m.intervals()) >= 2 for m in ms.values()), 60, "metering")
    procs = {mid: f.push_bg(cases[mid][0], mid, "--no-verify") for mid in cases}
    for mid, p in procs.items():
        out = p.communicate(timeout=240)[0]
        assert p.returncode == 1, out
    for mid, (rel, why) in cases.items():
        want = "failed" if why.startswith("fetch") else "refused"
        st = wait_for(lambda: settled(f, mid, want), 10, "%s %s" % (mid, want))
        assert st["state"] == want and st["reason"].startswith(why), (mid, st)
        assert st["fw"] == "0.1.0"
        assert f.ota_state(mid)["target"]["outcome"] == "failed"
        assert ms[mid].running_version() == "0.1.0" and ms[mid].boots == 1, mid
        assert not ms[mid].errors(), ms[mid].errors()
    # nothing of the tampered or truncated release is left to boot: slot b has no switch
    for mid in ("m5", "m6"):
        assert ms[mid].record() is None or ms[mid].record()["slot"] == 0
        assert not os.path.exists(os.path.join(ms[mid].dir, "fw", "dl.json"))
    n = {mid: len(m.intervals()) for mid, m in ms.items()}
    wait_for(lambda: all(len(m.intervals()) > n[mid] for mid, m in ms.items()), 60,
             "metering after the refusals")
    for mid in ms:
        energy_intact(f, mid)


def test_download_resumes_after_a_broker_restart_and_after_a_meter_reboot(fleet):
    f = fleet
    slow = {"gap_ms": 60}
    a = f.meter("m1", ota_cfg=slow)
    b = f.meter("m2", ota_cfg=slow)
    rel = f.release("0.2.0")
    wait_for(lambda: len(a.intervals()) >= 2 and len(b.intervals()) >= 2, 60, "metering")
    seen = {"m1": [], "m2": []}
    stop = []

    import threading

    def sample():
        while not stop:
            for mid in seen:
                st = f.ota_state(mid)["state"]
                if st and st["state"] == "downloading":
                    seen[mid].append(st["done"])
            time.sleep(0.05)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    pa, pb = f.push_bg(rel, "m1"), f.push_bg(rel, "m2")

    def past(mid, share):
        st = f.ota_state(mid)["state"]
        return st and st["state"] == "downloading" and st["done"] > share * st["total"]
    wait_for(lambda: past("m1", 0.3) and past("m2", 0.3), 120, "both downloads at 30 %")
    b.kill()                               # power cut of m2 in the middle of its download
    f.broker.restart(down_s=2)             # and the broker goes away for a while
    for p in (pa, pb):
        out = p.communicate(timeout=240)[0]
        assert p.returncode == 0, out
    stop.append(1)
    th.join(5)
    for mid, m in (("m1", a), ("m2", b)):
        st = wait_for(lambda: settled(f, mid, "confirmed"), 30, mid)
        assert st["fw"] == "0.2.0" and m.running_version() == "0.2.0"
        done = seen[mid]
        assert done and all(y >= x for x, y in zip(done, done[1:])), (mid, done)
    # m2 rebooted twice (the cut, then the update) and resumed rather than starting over
    assert b.boots == 3 and a.boots == 2
    for mid in ("m1", "m2"):
        energy_intact(f, mid)


def test_staged_rollout_from_the_web_api_halts_itself_and_is_admin_only(fleet, tmp_path):
    f = fleet
    ms = [f.meter(mid) for mid in ("m1", "m2", "m3")]
    f.release("0.2.2", src=patched_tree(tmp_path, "deaf", {
        "comm/wiring_boot.py": ('mq = {"host": host, "port": port,', 'mq = {"host": host, "port": port + 1,')}))
    wait_for(lambda: all(len(m.intervals()) >= 2 for m in ms), 60, "metering")
    wait_for(lambda: all(f.api("/meters/%s" % m)[0] == 200 for m in ("m1", "m2", "m3")), 30,
             "the meters known to the head-end")
    req = {"release": "0.2.2", "meters": ["m1", "m2", "m3"], "stages": [33, 66, 100],
           "max_fail": 0.0, "stage_timeout_s": 120}
    # an operator may not push (and the attempt is in the audit log)
    f.web.state.users.add("olga", "operator")
    olga = f.web.state.users.new_token("olga", "t")[1]
    st, body = f.api("/ota/rollouts", req, token=olga)
    assert st == 403 and "admin" in body["error"]
    st, body = f.api("/ota/rollouts", dict(req, release="9.9.9"))
    assert st == 400 and "9.9.9" in body["error"]
    st, body = f.api("/ota/rollouts", req)
    assert st == 202, body
    rid = body["rollout"]

    def rollout():
        s, rs = f.api("/ota/rollouts")
        return [r for r in rs if r["id"] == rid][0]
    r = wait_for(lambda: rollout()["state"] != "running" and rollout(), 120, "the rollout to end")
    # the first stage (one meter) rolled back: the rollout halted before the others
    assert r["state"] == "halted" and "1 of 1" in r["reason"], r
    assert [(t["meter_id"], t["outcome"]) for t in r["targets"]] == [("m1", "failed")]
    assert "health deadline" in f.ota_state("m1")["state"]["reason"]
    for mid in ("m2", "m3"):
        assert f.ota_state(mid)["state"]["state"] == "idle" or f.ota_state(mid)["state"]["fw"] == "0.1.0"
        assert f.meters[mid].boots == 1
    audit = f.web.state.audit.entries(limit=20)
    acts = [(a["user_name"], a["action"], a["outcome"]) for a in audit if a["action"] == "ota"]
    assert ("olga", "ota", "denied") in acts and ("root", "ota", "sent") in acts
    wait_for(lambda: ("root", "ota", "refused") in [
        (a["user_name"], a["action"], a["outcome"]) for a in f.web.state.audit.entries(limit=20)],
        30, "the rollout's outcome in the audit log")
    for mid in ("m1", "m2", "m3"):
        energy_intact(f, mid)


def test_wifi_meter_pulls_the_image_over_http(fleet):
    f = fleet
    m = f.meter("m1")
    rel = f.release("0.2.0")
    wait_for(lambda: len(m.intervals()) >= 2, 60, "metering")
    rc, out, text = f.push(rel, "m1", "--http", "0")
    assert rc == 0, text
    # every byte came over HTTP: the MQTT side served no chunk
    assert out["served"]["chunks"] == 0 and out["served"]["requests"] == 0, out
    st = wait_for(lambda: settled(f, "m1", "confirmed"), 30, "m1 confirmed")
    assert st["fw"] == "0.2.0" and m.running_version() == "0.2.0"
    energy_intact(f, "m1")
