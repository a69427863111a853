"""Issue 4 and 11 figures (the head-end's ingest), for bench/run.py; the test bed is
headend/loadtest_ingest.py (Mosquitto on conf/mosquitto, `lipari headend` processes,
binary interval records made by the firmware's codec, each meter on its own account).

    ingest         ONE publish pass of 20,000 records queued by the broker for both a
                   plain subscriber and the ingest (anchor worker, SQLite), then taken by
                   both at once: the two rates over the same messages and their ratio;
                   five rounds, the median round reported with the spread; then three
                   rounds with two workers without anchor. A time-out fails it.
    workers        the same recorded stream of 60,000 records, queued in the broker while
                   the workers are away, drained by 1 and by 2 workers on the shared
                   subscription into PostgreSQL (and into SQLite): commit rates, ratio.
"""
from benchlib import ROOT  # noqa: F401  (sys.path)


def ingest():
    from headend.loadtest_ingest import ingest_vs_broker
    rounds = [ingest_vs_broker(n=20000, meters=50) for _ in range(5)]
    rounds.sort(key=lambda r: r["ingest_vs_broker_ratio"])
    r = rounds[len(rounds) // 2]
    out = {k: r[k] for k in ("ingest_records_per_s", "broker_records_per_s",
                             "ingest_vs_broker_ratio")}
    out["ingest_lost"] = sum(x["ingest_lost"] for x in rounds)
    out["ingest_vs_broker_ratio_range"] = [rounds[0]["ingest_vs_broker_ratio"],
                                           rounds[-1]["ingest_vs_broker_ratio"]]
    out["ingest_broker"] = "mosquitto"
    # the scale-out configuration: two workers without anchor on the shared subscription
    two = sorted(ingest_vs_broker(n=20000, meters=50, workers=2)["ingest_vs_broker_ratio"]
                 for _ in range(3))
    out["ingest_vs_broker_ratio_2_workers"] = two[1]
    return out


def workers():
    from headend.loadtest_ingest import workers_scaling
    pg = workers_scaling(n=60000, meters=200, workers=2, pg=True)
    lite = workers_scaling(n=60000, meters=200, workers=2, pg=False)
    lost = sum(v for k, v in list(pg.items()) + list(lite.items()) if k.startswith("lost_"))
    if lost:
        raise RuntimeError("the worker runs lost %d records" % lost)
    return {"ingest_workers_scaling": pg["scaling"],
            "ingest_pg_records_per_s_1": pg["rate_1"], "ingest_pg_records_per_s_2": pg["rate_2"],
            "ingest_workers_scaling_sqlite": lite["scaling"],
            "ingest_sqlite_records_per_s_1": lite["rate_1"],
            "ingest_sqlite_records_per_s_2": lite["rate_2"]}


MEASUREMENTS = [
    ("ingest", ingest, ("ingest_records_per_s", "broker_records_per_s", "ingest_vs_broker_ratio",
                        "ingest_lost", "ingest_vs_broker_ratio_range", "ingest_broker",
                        "ingest_vs_broker_ratio_2_workers")),
    ("workers", workers, ("ingest_workers_scaling", "ingest_pg_records_per_s_1",
                          "ingest_pg_records_per_s_2", "ingest_workers_scaling_sqlite",
                          "ingest_sqlite_records_per_s_1", "ingest_sqlite_records_per_s_2")),
]
