"""bench_build's measurement and frontier helpers (the builds themselves are too slow for tests)."""

import sys

import numpy as np
import pytest

from evaluation.benchmarks import bench_build


def test_measure_reports_wall_cpu_and_rss_of_the_child(tmp_path):
    # The child allocates ~200 MB and spins a little: its RSS and CPU must show in the figures.
    code = "import numpy as np, time; a = np.ones(50_000_000); t = time.time()\nwhile time.time() - t < 0.5: pass"
    wall, cpu, rss, tree = bench_build.measure([sys.executable, "-c", code], log_path=str(tmp_path / "log"))
    assert wall >= 0.5
    assert 5 <= cpu <= 100 * 2 + 50  # The child spins one thread; a shared machine gives it less.
    assert rss >= 0.35  # 400 MB of float64 ones, in GiB.
    assert tree <= rss + 0.1


def test_measure_refuses_a_failed_command(tmp_path):
    with pytest.raises(RuntimeError, match="exited with status 3; see .*log"):
        bench_build.measure([sys.executable, "-c", "raise SystemExit(3)"], log_path=str(tmp_path / "log"))


def test_best_qps_and_ids_to_rows():
    trials = [bench_build.Trial("a", 0.94, 900.0), bench_build.Trial("b", 0.96, 500.0),
              bench_build.Trial("c", 0.995, 200.0), bench_build.Trial("d", 0.97, 400.0)]
    assert bench_build.best_qps(trials, 0.95).params == "b"
    assert bench_build.best_qps(trials, 0.99).params == "c"
    assert bench_build.best_qps(trials, 0.999) is None
    ids = np.array([["d0-0000000012", ""], ["d0-0000000003", "d0-0000001000"]])
    np.testing.assert_array_equal(bench_build._row_of_ids(ids), [[12, -1], [3, 1000]])  # pylint: disable=protected-access


def test_autofaiss_is_skipped_without_its_python():
    assert not bench_build.autofaiss_available(None)
    assert not bench_build.autofaiss_available("/nonexistent/python")
