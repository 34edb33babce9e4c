"""bench_concurrency at a small scale: readers never fail and always get their version's exact answer."""

from evaluation.benchmarks.bench_concurrency import run_load


def test_readers_while_writers_publish_small_run(tmp_path):
    result = run_load(str(tmp_path / "mem"), seconds=4, readers=2, entries=120, time_bound_s=40)
    assert result.reader_failures == [] and result.wrong_answers == 0
    assert result.queries_served > 0 and result.versions_published >= 4 and result.within_time_bound
    assert result.classifies >= result.opens > 0 and result.evaluations >= 1
