"""The measurements of `lipari loadtest` (headend/loadtest.py): what the database holds
against what the meters made, latency per record from the meter's timestamp to the commit
of its transaction, CPU and memory per process group; a table, report.json, report.png."""
import json
import os
import sqlite3

QOS1 = ("interval", "event")


def _rows(url, prefix):
    """(kind, meter_id, seq or t, t, received) of every stored record of the fleet."""
    like = prefix.replace("%", "") + "%"
    queries = {
        "interval": "SELECT meter_id, seq, t_end, received FROM intervals WHERE meter_id LIKE ?",
        "event": "SELECT meter_id, seq, t, received FROM events WHERE meter_id LIKE ?",
        "rt": "SELECT meter_id, t, t, received FROM rt WHERE meter_id LIKE ?",
    }
    out = {}
    if url.startswith(("postgres://", "postgresql://")):
        import psycopg
        with psycopg.connect(url) as c:
            for k, q in queries.items():
                out[k] = c.execute(q.replace("?", "%s"), (like,)).fetchall()
    else:
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
        c = sqlite3.connect(path)
        try:
            for k, q in queries.items():
                out[k] = c.execute(q, (like,)).fetchall()
        finally:
            c.close()
    return out


def _pct(values, qs=(50, 90, 99, 99.9)):
    import numpy as np
    if not len(values):
        return {("p%g" % q).replace(".", "_"): None for q in qs} | {"max": None, "n": 0}
    a = np.asarray(values)
    d = {("p%g" % q).replace(".", "_"): round(float(np.percentile(a, q)) * 1000, 1) for q in qs}
    d["max"] = round(float(a.max()) * 1000, 1)
    d["n"] = int(a.size)
    return d


def analyse(run, drained, t_end):
    """The report of one Run (headend/loadtest.py)."""
    a, fleet = run.a, run.fleet
    commit_of = {round(c[0], 6): c[1] for c in run.commits}
    rows = _rows(run.db, a.id_prefix)
    w0 = run.t_clock + a.warmup
    w1 = min(run.t_clock + a.duration, run.fleet.stop_at)
    lat = {"interval": [], "event": [], "rt": []}
    pairs = []                               # (made wall time, latency) of every record
    series_lat = {}
    stored = {k: {} for k in lat}
    seqs_bad = 0
    unmatched = 0
    for kind, rs in rows.items():
        for meter_id, key, t, received in rs:
            m = fleet.by_id.get(meter_id)
            if m is None:
                continue
            stored[kind][meter_id] = stored[kind].get(meter_id, 0) + 1
            if kind != "rt" and key > m.seq[1 if kind == "interval" else 2]:
                seqs_bad += 1                # a record nobody made
            tc = commit_of.get(round(received, 6)) if received is not None else None
            if tc is None:
                unmatched += 1
                continue
            made = fleet.wall_of(t, m.skew_s)
            pairs.append((made, tc - made))
            if made < w0 or made > w1:
                continue
            lat[kind].append(tc - made)
            b = int(tc - run.t_start)
            series_lat.setdefault(b, []).append(tc - made)
    made = {"interval": sum(m.seq[1] for m in fleet.meters),
            "event": sum(m.seq[2] for m in fleet.meters),
            "rt": sum(m.stats["rt_sent"] for m in fleet.meters)}
    have = {k: sum(v.values()) for k, v in stored.items()}
    lost = {k: sum(max(0, (m.seq[1] if k == "interval" else m.seq[2] if k == "event"
                           else m.stats["rt_sent"]) - stored[k].get(m.id, 0))
                   for m in fleet.meters) for k in lat}
    tot = fleet.totals()
    dup_absorbed = sum(c[3] for c in run.commits)
    # committed per second of the load window (intervals, events, readings)
    in_window = [c for c in run.commits if w0 <= c[1] <= w1]
    rate = sum(c[2] + c[3] + c[4] for c in in_window) / max(1e-9, w1 - w0)
    all_lat = lat["interval"] + lat["event"] + lat["rt"]
    p_all = _pct(all_lat)
    p1 = _pct(lat["interval"] + lat["event"])

    def cpu(group):
        xs = [s["proc"].get(group) for s in run.series
              if s["proc"].get(group) and w0 - run.t_start <= s["t"] <= w1 - run.t_start]
        if not xs:
            return None
        return {"cpu_pct_avg": round(sum(x["cpu_pct"] for x in xs) / len(xs), 1),
                "cpu_pct_max": max(x["cpu_pct"] for x in xs),
                "rss_mb_max": max(x["rss_mb"] for x in xs)}

    groups = ("broker", "ingest", "postgres", "loadgen")
    expected_rate = (a.meters * a.speed / a.interval_s +
                     round(a.meters * a.rt_share) * a.speed / a.rt_s)
    rep = {
        "config": {"meters": a.meters, "connections": a.meters, "speed": round(a.speed, 3),
                   "meter_equivalents": int(round(a.meters * a.speed)),
                   "interval_s": a.interval_s, "rt_share": a.rt_share, "rt_s": a.rt_s,
                   "skew_s": a.skew_s, "duration_s": a.duration, "warmup_s": a.warmup,
                   "workers": a.workers, "anchor": not a.no_anchor, "db": _kind(run.db),
                   "churn_pct_per_min": a.churn_pct, "faults": [list(f) for f in a.fault],
                   "ramp": a.ramp, "step_s": a.step_s if a.ramp else None,
                   "broker": "external" if a.broker else "mosquitto (conf/mosquitto)"},
        "meters_connected": max((s["conns"] for s in run.series), default=fleet.up),
        "offered_records_per_s": round(expected_rate, 1),
        "committed_records_per_s": round(rate, 1),
        "made": made, "stored": have, "lost": lost,
        "records_lost": lost["interval"] + lost["event"],
        "rt_lost": lost["rt"],
        "unsent": tot["queued"],
        "duplicates_stored": seqs_bad,
        "redeliveries_absorbed": dup_absorbed,
        "resent_after_reconnect": tot.get("resent", 0),
        "rows_without_commit": unmatched,
        "latency_ms": p_all, "latency_ms_qos1": p1, "latency_ms_rt": _pct(lat["rt"]),
        "processes": {g: cpu(g) for g in groups if cpu(g)},
        "meter_stats": {k: v for k, v in tot.items()},
        "drained": drained, "faults": run.faults_done,
        "wall_s": round(t_end - run.t_start, 1),
        "series": [dict(s, lat_p50_ms=_pct(series_lat.get(int(s["t"]), []))["p50"],
                        lat_p99_ms=_pct(series_lat.get(int(s["t"]), []))["p99"])
                   for s in run.series],
    }
    faulty = bool(a.fault or a.churn_pct)
    why = []
    if rep["records_lost"]:
        why.append("%d interval/event records lost" % rep["records_lost"])
    if rep["rt_lost"] and not faulty:
        why.append("%d live readings lost" % rep["rt_lost"])
    if rep["unsent"]:
        why.append("%d records never left the meters" % rep["unsent"])
    if rep["duplicates_stored"]:
        why.append("%d stored records that no meter made" % rep["duplicates_stored"])
    if rep["meters_connected"] < a.meters:
        why.append("only %d of %d meters connected" % (rep["meters_connected"], a.meters))
    # with injected faults the latency shows the outages: reported, not judged
    if p_all["p99"] is None or (p_all["p99"] >= a.max_p99_ms and not faulty):
        why.append("p99 latency %s ms (limit %g)" % (p_all["p99"], a.max_p99_ms))
    if not drained:
        why.append("the head-end did not catch up within --drain-s")
    if unmatched:
        why.append("%d rows without a commit-log entry" % unmatched)
    rep["passed"] = not why
    rep["why_failed"] = why
    if run.steps:
        rep["steps"] = _steps(run, pairs, a)
        ok = [st for st in rep["steps"] if st["passed"]]
        good = 0
        for st in rep["steps"]:              # the largest step with every one before it passed
            if not st["passed"]:
                break
            good = st["fleet"]
        lossless = not (rep["records_lost"] or rep["unsent"] or rep["duplicates_stored"]
                        or unmatched)
        rep["sustained_meter_equivalents"] = int(good) if lossless else 0
        rep["sustained_step"] = next((st for st in rep["steps"] if st["fleet"] == good), None)
        # a ramp passes when its first step does; the figure is the largest step
        rep["passed"] = lossless and bool(ok) and rep["steps"][0]["passed"] and drained
        rep["why_failed"] = [w for w in why if not w.startswith("p99 latency")] + \
            ([] if rep["steps"][0]["passed"] else ["the first step missed the latency limit"])
    path = os.path.join(run.dir, "report.json")
    if not a.no_plot:
        try:
            rep["plot"] = plot(rep, os.path.join(run.dir, "report.png"))
        except Exception as e:                 # a missing plot never hides the figures
            rep["plot_error"] = repr(e)
    with open(path, "w") as f:
        json.dump(rep, f, indent=1)
    return rep


def _steps(run, pairs, a):
    """Per --ramp step: offered and committed rates and latency of the records made in
    the step (its first quarter, at most 5 s, left out: the backlog of the step before)."""
    import bisect
    pairs.sort()
    made = [p[0] for p in pairs]
    commits = sorted(run.commits, key=lambda c: c[1])
    tcs = [c[1] for c in commits]
    out = []
    for k, st in enumerate(run.steps):
        t0 = st["t0"]
        t1 = run.steps[k + 1]["t0"] if k + 1 < len(run.steps) else min(
            run.t_clock + a.duration, run.fleet.stop_at)
        w0 = t0 + min(5.0, (t1 - t0) / 4)
        lo, hi = bisect.bisect_left(made, w0), bisect.bisect_right(made, t1)
        lats = [p[1] for p in pairs[lo:hi]]
        c0, c1 = bisect.bisect_left(tcs, w0), bisect.bisect_right(tcs, t1)
        n_commit = sum(c[2] + c[3] + c[4] for c in commits[c0:c1])
        pc = _pct(lats)
        offered = (a.meters * st["speed"] / a.interval_s +
                   round(a.meters * a.rt_share) * st["speed"] / a.rt_s)
        out.append({"fleet": int(st["fleet"]), "speed": round(st["speed"], 2),
                    "offered_records_per_s": round(offered, 1),
                    "committed_records_per_s": round(n_commit / max(1e-9, t1 - w0), 1),
                    "latency_ms": pc,
                    "passed": pc["p99"] is not None and pc["p99"] < a.max_p99_ms,
                    "t0_s": round(t0 - run.t_start, 2), "t1_s": round(t1 - run.t_start, 2)})
    return out


def _kind(url):
    return "postgresql" if url.startswith(("postgres://", "postgresql://")) else "sqlite"


def table(rep):
    c = rep["config"]
    L = rep["latency_ms"]
    rows = [
        ("meters (real MQTT connections)", "%d (%d connected)" % (c["meters"], rep["meters_connected"])),
        ("meter-equivalents (x speed)", "%d (speed %g)" % (c["meter_equivalents"], c["speed"])),
        ("offered records/s", "%.0f" % rep["offered_records_per_s"]),
        ("committed records/s", "%.0f" % rep["committed_records_per_s"]),
        ("latency p50 / p99 / p99.9 / max ms", "%s / %s / %s / %s" % (
            L["p50"], L["p99"], L["p99_9"], L["max"])),
        ("made interval / event / rt", "%d / %d / %d" % tuple(rep["made"][k] for k in ("interval", "event", "rt"))),
        ("lost interval / event / rt", "%d / %d / %d" % tuple(rep["lost"][k] for k in ("interval", "event", "rt"))),
        ("unsent, duplicates stored", "%d, %d" % (rep["unsent"], rep["duplicates_stored"])),
        ("status messages (hourly, retained)", "%d" % rep["meter_stats"].get("status_sent", 0)),
        ("redeliveries absorbed, resent", "%d, %d" % (rep["redeliveries_absorbed"],
                                                      rep["resent_after_reconnect"])),
        ("workers, database", "%d (%s), %s" % (c["workers"], "anchor" if c["anchor"] else "no anchor",
                                              c["db"])),
    ]
    for g, v in rep["processes"].items():
        rows.append(("%s cpu avg/max %%, rss MB" % g, "%.0f / %.0f, %.0f" % (
            v["cpu_pct_avg"], v["cpu_pct_max"], v["rss_mb_max"])))
    for f in rep["faults"]:
        rows.append(("fault", "%s at %.1f s for %.1f s" % (f["kind"], f["at_s"], f["dur_s"])))
    for st in rep.get("steps") or ():
        rows.append(("step %d meter-eq" % st["fleet"], "%.0f/%.0f rec/s, p99 %s ms %s" % (
            st["offered_records_per_s"], st["committed_records_per_s"],
            st["latency_ms"]["p99"], "ok" if st["passed"] else "MISSED")))
    if rep.get("steps"):
        rows.append(("sustained meter-equivalents", "%d" % rep["sustained_meter_equivalents"]))
    rows.append(("result", "PASS" if rep["passed"] else "FAIL: " + "; ".join(rep["why_failed"])))
    w = max(len(r[0]) for r in rows)
    line = "+" + "-" * (w + 2) + "+" + "-" * 44 + "+"
    out = [line]
    for k, v in rows:
        out.append("| %-*s | %-42s |" % (w, k, v))
    out.append(line)
    return "\n".join(out)


def plot(rep, path):
    """Throughput and latency over time, with the injected faults shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = rep["series"]
    t = [x["t"] for x in s]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    # per-second rates of each ~1 s sample (commits land in groups: the line is jagged)
    ax1.plot(t, [x["committed"] for x in s], label="committed to the database /s", color="C0")
    ax1.plot(t, [x["made"]["made_interval"] + x["made"]["made_event"] + x["made"]["rt_sent"]
                 for x in s], label="made by the meters /s", color="C1", alpha=0.7)
    ax1.set_ylabel("records per second")
    ax1b = ax1.twinx()
    ax1b.plot(t, [x["conns"] for x in s], color="C2", alpha=0.5, label="connected meters")
    ax1b.set_ylabel("connected meters")
    ax1.legend(loc="upper left", fontsize=8)
    ax1b.legend(loc="upper right", fontsize=8)
    for q, col in (("lat_p50_ms", "C0"), ("lat_p99_ms", "C3")):
        ax2.plot([x["t"] for x in s if x[q] is not None], [x[q] for x in s if x[q] is not None],
                 label=q.replace("lat_", "").replace("_ms", ""), color=col)
    ax2.set_yscale("log")
    ax2.set_ylabel("latency meter -> commit (ms)")
    ax2.set_xlabel("seconds since start")
    ax2.legend(loc="upper left", fontsize=8)
    for st in rep.get("steps") or ():
        for ax in (ax1, ax2):
            ax.axvline(st["t0_s"], color="grey", lw=0.6, ls=":")
        ax1.annotate("%.2gM" % (st["fleet"] / 1e6), (st["t0_s"], 0), fontsize=7, color="grey")
    for f in rep["faults"]:
        for ax in (ax1, ax2):
            ax.axvspan(f["at_s"], f["at_s"] + max(f["dur_s"], 0.5), color="red", alpha=0.15)
        ax1.annotate(f["kind"], (f["at_s"], 0), fontsize=7, color="red")
    c = rep["config"]
    fig.suptitle("lipari loadtest: %d meters, %d meter-equivalents, %s" % (
        c["meters"], c["meter_equivalents"], "PASS" if rep["passed"] else "FAIL"))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
