"""Smoke-with-values test for the voting benchmark."""

from evaluation.benchmarks import bench_voting


def test_run_and_format():
    results = bench_voting.run(queries=50, k_max=5, repeats=1)
    assert set(results) == {"plurality", "distance", "softmax", "rank"}
    for by_c in results.values():
        assert set(by_c) == {10, 1000}
        assert all(qps > 0 for qps in by_c.values())
    table = bench_voting.format_table(results, queries=50, k_max=5)
    lines = table.splitlines()
    assert lines[2] == "| rule | 10 classes (q/s) | 1000 classes (q/s) | ratio 1000/10 |"
    assert len(lines) == 4 + 4


def test_synthetic_neighbors_seeded_and_sorted():
    a = bench_voting.synthetic_neighbors(queries=4, k_max=6, num_classes=3,
                                         seed=1)
    b = bench_voting.synthetic_neighbors(queries=4, k_max=6, num_classes=3,
                                         seed=1)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert (a[0] < 3).all()
    assert (a[1][:, 1:] >= a[1][:, :-1]).all()
