"""Data of `evaluation.benchmarks.bench_search`: base vectors, held-out queries and exact ground truth."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from evaluation.benchmarks import synthetic
from evaluation.benchmarks.search_report import K

DATASETS = ("structured", "gaussian")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Base vectors, held-out queries and their exact top-K (row indices into base)."""
    name: str
    base: np.ndarray
    queries: np.ndarray
    true_ids: np.ndarray


# --------------------------------------------------------------------------------------------- exact


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, *, block: int = 65_536) -> np.ndarray:
    """Exact top-k by dot product: int64 [nq, k] row indices, largest dot first.

    One BLAS matmul per block of base rows for the whole query batch. Selection uses ``np.partition``
    (SIMD-accelerated in numpy 2) to find each row's k-th largest score in the block, then gathers the
    entries at or above it; only rows with ties at that threshold fall back to a stable sort.
    Per-block winners are merged with one final sort.
    """
    base = np.ascontiguousarray(base, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    nq, n = q.shape[0], base.shape[0]
    if n < k:
        raise ValueError(f"exact_topk needs at least k={k} base rows, got {n}")
    scores = np.empty((nq, min(block, n)), dtype=np.float32)
    cand_idx, cand_val = [], []
    for start in range(0, n, block):
        rows = base[start:start + block]
        kb = min(k, rows.shape[0])
        out = scores[:, :rows.shape[0]]
        np.matmul(q, rows.T, out=out)
        kth = np.partition(out, -kb, axis=1)[:, -kb]
        mask = out >= kth[:, None]
        counts = mask.sum(axis=1)
        r, c = np.nonzero(mask)
        idx = np.empty((nq, kb), dtype=np.int64)
        ok = counts == kb
        if ok.all():
            idx[:] = c.reshape(nq, kb)
        else:
            # Ties at the threshold: more than kb entries pass; pick exactly kb for those rows.
            keep = ok[r]
            idx[ok] = c[keep].reshape(-1, kb)
            bad = np.flatnonzero(~ok)
            # A stable sort keeps tied entries in ascending row order (ScaNN's tie order).
            idx[bad] = np.argsort(-out[bad], axis=1, kind="stable")[:, :kb]
        cand_idx.append(idx + start)
        cand_val.append(np.take_along_axis(out, idx, axis=1))
    all_idx = np.concatenate(cand_idx, axis=1)
    all_val = np.concatenate(cand_val, axis=1)
    # Ties broken by ascending row, matching ScaNN's order.
    order = np.lexsort((all_idx, -all_val), axis=-1)[:, :k]
    return np.take_along_axis(all_idx, order, axis=1)


# --------------------------------------------------------------------------------------------- data


def make_dataset(name: str, settings: Any, *, real_path: str | None = None) -> Dataset:
    """Generates (or loads) base + held-out queries and computes exact ground truth once."""
    s = settings
    if name == "structured":
        base = synthetic.structured_unit_vectors(s.n, s.dim, centres=s.centres, noise_ratio=s.noise_ratio,
                                                 seed=s.seed)
        queries = synthetic.structured_unit_vectors(s.queries, s.dim, centres=s.centres,
                                                    noise_ratio=s.noise_ratio, seed=s.seed, draw=1)
    elif name == "gaussian":
        base = synthetic.gaussian_unit_vectors(s.n, s.dim, seed=s.seed)
        queries = synthetic.gaussian_unit_vectors(s.queries, s.dim, seed=s.seed + 1)
    elif name == "real":
        if real_path is None:
            raise ValueError("dataset 'real' needs --real-embeddings PATH")
        base, queries = _load_real(real_path, s)
    else:
        raise ValueError(f"unknown dataset {name!r}; allowed: {list(DATASETS) + ['real']}")
    return Dataset(name=name, base=base, queries=queries, true_ids=exact_topk(base, queries, K))


def load_embeddings(path: str) -> np.ndarray:
    """float32 [n, d] rows from a ``.npy`` file or a built memory (its live stored embeddings).

    ``path`` may list several sources separated by commas (same d); their rows are concatenated.
    """
    parts = []
    for source in [p for p in path.split(",") if p]:
        if source.endswith(".npy"):
            parts.append(np.asarray(np.load(source, mmap_mode="r"), dtype=np.float32))
            continue
        from memory import storage  # pylint: disable=g-import-not-at-top
        from memory.store.mutations import read_forgotten  # pylint: disable=g-import-not-at-top
        from memory.store.shard import read_shard_data  # pylint: disable=g-import-not-at-top
        from memory.store.versions import latest_version, read_version  # pylint: disable=g-import-not-at-top
        root = source.rstrip("/")
        manifest = read_version(root, latest_version(root))  # Raises "not a visual memory: ..." otherwise.
        forgotten = read_forgotten(root, manifest)
        for info in manifest.all_shards:
            data = read_shard_data(storage.join(root, info.path), info)
            live = ~np.isin(data.ids.astype(str), forgotten) if forgotten.size else slice(None)
            parts.append(np.asarray(data.embeddings, dtype=np.float32).reshape(-1, manifest.dim)[live])
    if not parts:
        raise ValueError(f"--real-embeddings {path!r} names no .npy file or memory")
    dims = {p.shape[1] for p in parts if p.ndim == 2}
    if len(dims) != 1 or any(p.ndim != 2 for p in parts):
        raise ValueError(f"--real-embeddings {path!r}: sources must all be [n, d] with one d, got "
                         f"{[p.shape for p in parts]}")
    return np.concatenate(parts)


def _load_real(path: str, s: Any) -> tuple[np.ndarray, np.ndarray]:
    emb = load_embeddings(path)
    if emb.shape[0] <= s.queries + K:
        raise ValueError(f"{path}: expected [n, d] embeddings with n > queries + {K} = {s.queries + K}, "
                         f"got shape {emb.shape}")
    # A seeded permutation: files are often sorted by class, and queries must be held out at random.
    order = np.random.default_rng(s.seed).permutation(emb.shape[0])
    q_rows, b_rows = np.sort(order[:s.queries]), np.sort(order[s.queries:s.queries + s.n])
    from memory.vectors import l2_normalize  # pylint: disable=g-import-not-at-top
    return l2_normalize(emb[b_rows]), l2_normalize(emb[q_rows])
