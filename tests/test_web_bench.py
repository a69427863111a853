"""The web bench's load generator (tests/web_load.py, `make bench` key web_requests_per_s):
it must measure real answers from the real `lipari web` process and count failures."""
from web_load import bench_web


def test_bench_web_small(tmp_path):
    r = bench_web(meters=30, clients=4, duration_s=2.0, tmpdir=str(tmp_path), warmup_s=0.5)
    assert r["web_errors"] == 0, r["web_error_samples"]
    assert r["web_requests"] > 20 and r["meters"] == 30 and r["clients"] == 4
    assert r["web_requests_per_s"] == round(r["web_requests"] / 2.0, 1)
    assert 0 < r["web_p50_ms"] <= r["web_p99_ms"]
