"""bench_serve at a small scale: no request fails while a writer publishes, and new versions are served."""

from evaluation.benchmarks.bench_serve import run_serve_load, synthetic_memory


def test_serve_load_small_run(tmp_path):
    root = str(tmp_path / "mem")
    queries = synthetic_memory(root, entries=400, dim=16)
    result = run_serve_load(root, queries, requests=300, clients=4, publish_every_s=0.1, baseline_queries=20,
                            time_bound_s=60)
    assert result.errors == 0, result.first_errors
    assert result.requests == 300 and result.within_time_bound
    assert result.versions_published >= 1 and len(result.versions_seen) >= 2  # Swapped in without a restart.
    assert 0 < result.p50_ms <= result.p99_ms and result.server_peak_rss_mb > 0
    assert result.in_process_p50_ms > 0 and result.http_to_in_process_ratio > 0
