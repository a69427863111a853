"""Issue 4 figures (the head-end's ingest), for bench/run.py."""
from benchlib import ROOT  # noqa: F401  (puts tests/ on sys.path)


def ingest():
    """Interval records into SQLite through the real broker vs the broker alone."""
    from headend_harness import bench_ingest
    # Five rounds, each measuring the broker alone and then the ingest through the same
    # broker; the round with the median ratio is reported (a shared machine moves single
    # rounds by +-0.07), with the spread. Losses count over every round.
    rounds = [bench_ingest(n=20000, meters=50, broker="auto") for _ in range(5)]
    rounds.sort(key=lambda r: r["ingest_vs_broker_ratio"])
    r = rounds[len(rounds) // 2]
    out = {k: r[k] for k in ("ingest_records_per_s", "broker_records_per_s", "ingest_vs_broker_ratio")}
    out["ingest_lost"] = sum(x["ingest_lost"] for x in rounds)
    out["ingest_vs_broker_ratio_range"] = [rounds[0]["ingest_vs_broker_ratio"],
                                           rounds[-1]["ingest_vs_broker_ratio"]]
    out["ingest_broker"] = r["broker"]
    return out


MEASUREMENTS = [
    ("ingest", ingest, ("ingest_records_per_s", "broker_records_per_s", "ingest_vs_broker_ratio",
                        "ingest_lost", "ingest_vs_broker_ratio_range", "ingest_broker")),
]
