"""The region experiment's pure parts (composites, hit tests) and one tiny seeded run with the bundled encoder."""

from __future__ import annotations

import json
import os

import numpy as np

from evaluation.experiments import regions
from memory.regions.pooling import region_boxes


def _items(n=12):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(1, 255, size=(28, 28, 3), dtype=np.uint8) for _ in range(n)]
    labels = ["a", "b", "c"] * (n // 3)
    return regions.Images(pixels, labels, [f"{i}" for i in range(n)], [""] * n)


def test_composites_paste_the_whole_item_where_their_box_says_and_are_seeded():
    items = _items()
    made = regions.composites(items, n=6, canvas=3, cluttered=False, crop_fraction=0.875,
                              rng=np.random.default_rng(1))
    again = regions.composites(items, n=6, canvas=3, cluttered=False, crop_fraction=0.875,
                               rng=np.random.default_rng(1))
    assert all((a.pixels == b.pixels).all() and a.box == b.box for a, b in zip(made, again))
    for c in made:
        assert c.pixels.shape == (84, 84, 3) and np.count_nonzero(c.pixels.any(axis=2)) == 28 * 28  # Blank around.
        top, left, bottom, right = c.box
        assert 0 <= top < bottom <= 1 and 0 <= left < right <= 1  # Inside the centre crop.
        # The box, mapped back to the canvas, is where the item's pixels are.
        ys, xs = np.nonzero(c.pixels.any(axis=2))
        lo = (1 - 0.875) / 2
        assert round((top * 0.875 + lo) * 84) == ys.min() and round((left * 0.875 + lo) * 84) == xs.min()
    cluttered = regions.composites(items, n=6, canvas=3, cluttered=True, crop_fraction=0.875,
                                   rng=np.random.default_rng(1))
    assert all(np.count_nonzero(c.pixels.any(axis=2)) > 28 * 28 for c in cluttered)


def test_hits_overlap_and_centre():
    boxes = region_boxes(7, 7, 2)  # Cells [0, 4/7) and [3/7, 1) on each axis.
    overlap, centre = regions.hits(boxes, (0.0, 0.0, 0.3, 0.3))  # In the top-left cell only.
    assert overlap.tolist() == [True, False, False, False] and centre.tolist() == [True, False, False, False]
    overlap, centre = regions.hits(boxes, (0.35, 0.35, 0.65, 0.65))  # The middle: every cell holds its centre.
    assert centre.all() and overlap.all()


def test_a_tiny_run_writes_every_measurement(fmnist_small, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert regions.main(["--memory-images", os.path.join(fmnist_small, "train"), "--queries",
                         os.path.join(fmnist_small, "test"), "--memory-per-class", "3", "--queries-per-class", "1",
                         "--composites", "4", "--grids", "2", "--k", "3", "--output", out]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert set(report["queries"]) == {"global", "regions-2x2-maxsim", "regions-2x2-maxsim+global",
                                      "regions-2x2-best-region", "regions-2x2-global"}
    # Five entries per image against one: about five times the bytes.
    ratio = report["queries"]["regions-2x2-maxsim"]["bytes_per_image"] / report["queries"]["global"]["bytes_per_image"]
    assert 4 < ratio < 6
    row = report["composites"]["cluttered"]["regions-2x2-maxsim"]
    assert 0 <= row["best_region_match_overlap_pct"] <= 100 and 0 < row["random_region_overlap_pct"] < 100
    assert "| regions-2x2-maxsim |" in capsys.readouterr().out


def test_the_latency_benchmark_times_every_memory_of_a_run(fmnist_small, tmp_path, capsys):
    from evaluation.benchmarks import bench_regions
    out = str(tmp_path / "out")
    assert regions.main(["--memory-images", os.path.join(fmnist_small, "train"), "--queries",
                         os.path.join(fmnist_small, "test"), "--memory-per-class", "2", "--queries-per-class", "1",
                         "--composites", "2", "--grids", "2", "3", "--k", "3", "--output", out]) == 0
    capsys.readouterr()
    assert bench_regions.main([out, "--queries", os.path.join(fmnist_small, "test"), "--per-class", "1",
                               "--runs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("global" in line and "2x2 maxsim" in line and "3x3 maxsim" in line
                                   for line in lines)
