"""Head-end test and bench helpers (not a test file itself).

- `fill(store, ...)`: a small deterministic fleet history written through the real Store
  (interval records as docs/architecture.md "Records" defines them, events, live readings,
  status), for the web tests and screenshots.
- `interval_record(...)`, `rt_record(...)`: one record of each kind.
- `bench_ingest(...)`: the load generator `make bench` calls (see its docstring).
"""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

T0 = 1767225600          # 2026-01-01T00:00:00Z, a Thursday


def load_w(profile, t):
    """Deterministic active power in W of a profile at epoch t (import > 0, export < 0)."""
    h = (t % 86400) / 3600.0
    if profile == "pv":                      # house with PV: exports at noon
        sun = max(0.0, math.sin(math.pi * (h - 6) / 12)) if 6 <= h <= 18 else 0.0
        return 400 + 300 * (h > 17) - 3500 * sun
    if profile == "motor":
        return 5500 if 7 <= h < 17 else 300
    if profile == "constant":
        return 1000
    return 250 + 1200 * math.exp(-((h - 19) ** 2) / 4) + 500 * math.exp(-((h - 7.5) ** 2) / 1)


def interval_record(seq, t_end, ai_wh, ae_wh, phases=1, dur_s=900, pmax_w=0, flags=0, tariff=0):
    return {"seq": seq, "t_end": t_end, "dur_s": dur_s, "flags": flags, "tariff": tariff,
            "ai_wh": ai_wh, "ae_wh": ae_wh, "rq_varh": [ai_wh // 10, 0, 0, ae_wh // 20],
            "ap_vah": ai_wh + ae_wh + ai_wh // 20,
            "ai_ph_wh": [ai_wh // phases] * phases, "ae_ph_wh": [ae_wh // phases] * phases,
            "v_min_mv": [226100] * phases, "v_max_mv": [234900] * phases,
            "v_avg_mv": [230400] * phases, "pmax_w": pmax_w, "sags": 0, "swells": 0,
            "tariff_wh": [ai_wh]}


def rt_record(t, p_w, phases=1, f_mhz=50012):
    per = p_w / phases
    v = [230100 + 700 * k for k in range(phases)]
    pf = 950 if p_w >= 0 else -990
    return {"t": t, "v_mv": v, "i_ma": [int(abs(per) / (vv / 1000) / (abs(pf) / 1000) * 1000) for vv in v],
            "p_mw": [int(per * 1000)] * phases, "q_mvar": [int(abs(per) * 300)] * phases,
            "pf_milli": [pf] * phases, "f_mhz": f_mhz}


FLEET = (  # id, transport, board, phases, profile
    ("m-house-1", "wifi", "unix_sim_1ph", 1, "household"),
    ("m-pv-2", "nbiot", "unix_sim_1ph", 1, "pv"),
    ("m-plant-3", "plc", "unix_sim_3ph", 3, "motor"),
)


def fill(store, days=3, t_start=T0, fleet=FLEET, interval_s=900):
    """Write `days` of history for every meter of `fleet` into store and commit.
    Returns {meter id: last interval record}."""
    last = {}
    for mid, transport, board, phases, profile in fleet:
        store.set_status(mid, {"online": True, "transport": transport, "fw": "0.3.1",
                               "board": board, "ota": "idle", "signal": -67})
        ai = ae = 0
        n = int(days * 86400 // interval_s)
        for k in range(1, n + 1):
            t = t_start + k * interval_s
            p = load_w(profile, t - interval_s // 2)
            e = p * interval_s / 3600.0
            if e >= 0:
                ai += int(round(e))
            else:
                ae += int(round(-e))
            rec = interval_record(k, t, ai, ae, phases, interval_s, int(abs(p) * 1.2))
            store.add_interval(mid, k, rec, b"raw")
            last[mid] = rec
        tl = t_start + n * interval_s
        store.add_rt(mid, rt_record(tl + 10, load_w(profile, tl), phases))
        store.add_event(mid, 1, {"seq": 1, "t": t_start + 3600, "kind": "power_up", "phase": None,
                                 "value": None})
        store.add_event(mid, 2, {"seq": 2, "t": t_start + 86400 + 4000, "kind": "sag", "phase": 1,
                                 "value": 195000})
    store.commit()
    return last


# -- stub process for the `lipari system` orchestration tests ------------------------------
def stub_main(argv):
    """python tests/headend_harness.py stub NAME PIDDIR [--ignore-term] [--grandchild]
    [--exit N]: writes PIDDIR/NAME.pid (and NAME.child.pid), then sleeps (at most 120 s)."""
    import signal
    import subprocess
    import time
    name, piddir = argv[0], argv[1]
    if "--ignore-term" in argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--grandchild" in argv:
        # like `lipari meter`, which runs micropython as its child in the same group
        c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        with open(os.path.join(piddir, name + ".child.pid"), "w") as f:
            f.write(str(c.pid))
    with open(os.path.join(piddir, name + ".pid"), "w") as f:
        f.write(str(os.getpid()))
    print("stub %s running, argv %s" % (name, argv), flush=True)
    if "--exit" in argv:
        return int(argv[argv.index("--exit") + 1])
    time.sleep(120)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["stub"]:
        sys.exit(stub_main(sys.argv[2:]))
    print(__doc__)
