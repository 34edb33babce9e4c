"""Seeded synthetic data and brute-force ground truth shared by the memory tests."""

from __future__ import annotations

import numpy as np

from memory.vectors import l2_normalize

ENCODER = {"name": "fake-encoder", "content_hash": "sha256:" + "0" * 64, "dim": 32,
           "preprocess": {"size": 28}}


def clustered(n: int, d: int, *, centres: int, noise: float, seed: int, nq: int = 0):
    """Unit vectors around random Gaussian centres; queries drawn from the same mixture."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    x = c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, d))
    q = c[rng.integers(0, centres, nq)] + noise * rng.normal(size=(nq, d))
    return l2_normalize(x), (l2_normalize(q) if nq else np.zeros((0, d), np.float32))


def exact_distances(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cosine distances in float64 (the reference the float32 searchers are compared against)."""
    return 1.0 - q.astype(np.float64) @ x.astype(np.float64).T


def recall_at_k(found: np.ndarray, q: np.ndarray, x: np.ndarray, k: int) -> float:
    """Tie-aware recall@k: a hit counts if its distance is within the true k-th distance (+1e-5)."""
    d = exact_distances(q, x)
    kth = np.sort(d, axis=1)[:, k - 1]
    hits = 0
    for row, idx in enumerate(found[:, :k]):
        idx = idx[idx >= 0]
        hits += min(k, int(np.sum(d[row, idx] <= kth[row] + 1e-5)))
    return hits / (k * len(found))


def assert_exact_topk(idx: np.ndarray, dist: np.ndarray, q: np.ndarray, x: np.ndarray, k: int) -> None:
    """Asserts (idx, dist) is an exact top-k (tie-aware: any order among equal distances)."""
    d = exact_distances(q, x)
    ref = np.sort(d, axis=1)[:, :k]
    np.testing.assert_allclose(dist, ref, atol=2e-6)
    # The reported distance of each returned row must be its true distance.
    np.testing.assert_allclose(dist, np.take_along_axis(d, idx, axis=1), atol=2e-6)
    assert all(len(set(r)) == k for r in idx.tolist()), "duplicate neighbours"
    assert recall_at_k(idx, q, x, k) == 1.0


def strip_file_records(root: str) -> None:
    """Makes the memory at ``root`` look like one written before per-file checksums were recorded: every version
    file and manifest.json without the shards' ``files``."""
    import glob
    import json
    import os

    from memory.store.manifest import Manifest
    for path in glob.glob(os.path.join(root, "versions", "*.json")) + [os.path.join(root, "manifest.json")]:
        with open(path) as f:
            d = json.load(f)
        for key in ("shards", "delta_shards"):
            for s in d.get(key) or ():
                s.pop("files", None)
        with open(path, "w") as f:
            f.write(Manifest.from_dict(d).to_json())
