"""The ingest bench (headend/loadtest_ingest.py, bench/headend_bench.py): one publish pass
reaches both consumers and the database holds exactly the published stream; a time-out
is an error, not a rate; the scaling run really spreads the stream over both workers."""
import pytest

from headend import loadtest_ingest as li
from headend.codec import decode


def test_stream_is_firmware_records_in_sequence_per_meter():
    items = li.stream(60, 6)
    seqs = {}
    for mid, payload in items:
        kind, rec = decode(payload, "interval")
        assert kind == "interval" and rec["dur_s"] == 900
        seqs.setdefault(mid, []).append(rec["seq"])
    assert len(seqs) == 6 and all(v == list(range(1, 11)) for v in seqs.values())


def test_one_pass_reaches_both_consumers_and_the_database_holds_the_stream(tmp_path):
    r = li.ingest_vs_broker(n=1200, meters=12, workdir=str(tmp_path), timeout_s=120)
    assert r["n"] == 1200 and r["ingest_lost"] == 0 and r["duplicates"] == 0
    assert r["stored_equals_stream"] is True
    assert r["ingest_records_per_s"] > 0 and r["broker_records_per_s"] > 0


def test_a_time_out_is_an_error_not_a_rate(tmp_path):
    class Stalled:                       # a worker that commits nothing
        procs = {1: None}

        def log_path(self, k):
            return str(tmp_path / "none.log")

        def check(self):
            pass
    with pytest.raises(RuntimeError, match="time-out is a failure"):
        li._commits_until(Stalled(), 10, 0.5, "ingest")


def test_scaling_run_spreads_the_stream_over_both_workers(tmp_path):
    r = li.workers_scaling(n=4000, meters=40, workers=2, pg=False, workdir=str(tmp_path))
    assert r["lost_1"] == 0 and r["lost_2"] == 0
    assert sum(r["stored_by_worker_2"]) == 4000 and min(r["stored_by_worker_2"]) > 1000
    assert r["stored_by_worker_1"] == [4000]
