"""The ingest bench helper (tests/headend_harness.py bench_ingest) that `make bench` calls:
it must measure real traffic through a real broker into SQLite and count losses."""
import pytest

from headend_harness import bench_ingest

pytest.importorskip("paho.mqtt.client")


@pytest.mark.parametrize("broker", ["auto"])
def test_bench_ingest_small(tmp_path, broker):
    r = bench_ingest(n=600, meters=6, broker=broker, timeout_s=60, tmpdir=str(tmp_path))
    assert r["n"] == 600 and r["meters"] == 6
    assert r["ingest_lost"] == 0 and r["duplicates"] == 0
    assert r["broker_records_per_s"] > 50 and r["ingest_records_per_s"] > 50
    assert abs(r["ingest_vs_broker_ratio"] - r["ingest_records_per_s"] /
               r["broker_records_per_s"]) < 0.01
    assert r["broker"] == "mosquitto"
