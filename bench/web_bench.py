"""Issue 10 figure (the head-end's web server), for bench/run.py."""
from benchlib import ROOT  # noqa: F401  (puts tests/ on sys.path)


def web_requests():
    """The fleet page's JSON (GET /api/v1/meters with an API token) from 50 concurrent
    keep-alive clients on a fleet of 1,000 meters; `lipari web` in its own process, the
    clients in this one (tests/web_load.py). Three rounds of 10 s; the median is reported
    with the spread (a shared machine moves single rounds)."""
    from web_load import bench_web
    rounds = [bench_web(meters=1000, clients=50, duration_s=10.0) for _ in range(3)]
    rounds.sort(key=lambda r: r["web_requests_per_s"])
    r = rounds[len(rounds) // 2]
    return {"web_requests_per_s": r["web_requests_per_s"],
            "web_requests_per_s_range": [rounds[0]["web_requests_per_s"],
                                         rounds[-1]["web_requests_per_s"]],
            "web_p50_ms": r["web_p50_ms"], "web_p99_ms": r["web_p99_ms"],
            "web_errors": sum(x["web_errors"] for x in rounds)}


MEASUREMENTS = [
    ("web_requests", web_requests, ("web_requests_per_s", "web_requests_per_s_range",
                                    "web_p50_ms", "web_p99_ms", "web_errors")),
]
