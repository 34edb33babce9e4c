"""The synthetic dataset bench_scale builds memories from, in clip-retrieval's on-disk layout, with exact ground truth.

``img_emb/img_emb_<i>.npy`` (float16 [rows, DIM]) and row-aligned ``metadata/metadata_<i>.parquet`` (``key``,
``label``, ``image_path``), streamed block by block; ``queries.npy`` and the exact top-K ``gt_ids.npy`` over
the vectors as a memory stores them. Cached per spec under a work directory (`ensure_dataset`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np

from evaluation import synthetic_data
from evaluation.benchmarks import synthetic

K = 10
DIM = 256
ENCODER_ID = "synthetic-structured-256"
# The key of a row is its global row number, zero-padded so that string order (the shard row order) is
# numeric order at every size up to 10^10, and ids parse back to ground-truth rows.
KEY_WIDTH = 10
# Ground-truth rows scored per matmul: bounds the float32 scores to queries x this x 4 bytes.
_GT_BLOCK = 65_536
_DATA_MARKER = synthetic_data.DATASET_JSON


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Everything that decides a generated data set's bytes (its cache key)."""
    n: int
    seed: int = 0
    dim: int = DIM
    centres: int = 2000
    noise_ratio: float = 0.9
    num_classes: int = 1000
    rows_per_file: int = 1_000_000
    dtype: str = "float16"
    queries: int = 1000

    def dirname(self) -> str:
        return (f"data-n{self.n}-d{self.dim}-seed{self.seed}-c{self.centres}-noise{self.noise_ratio:g}"
                f"-cls{self.num_classes}-rpf{self.rows_per_file}-{self.dtype}-q{self.queries}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def num_files(n: int, rows_per_file: int) -> int:
    return max(1, math.ceil(n / rows_per_file))


def emb_path(data_dir: str, i: int) -> str:
    return os.path.join(data_dir, "img_emb", f"img_emb_{i}.npy")


def metadata_path(data_dir: str, i: int) -> str:
    return os.path.join(data_dir, "metadata", f"metadata_{i}.parquet")


def row_keys(start: int, stop: int) -> np.ndarray:
    """The ``key`` of rows [start, stop): zero-padded row numbers."""
    return np.char.zfill(np.arange(start, stop).astype(str), KEY_WIDTH)


def _chunks(spec: DataSpec) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
    """(global start row, metadata columns, vectors) per generator block."""
    uri_prefix = f"gs://vmem-synthetic/{ENCODER_ID}/seed-{spec.seed}/"
    row = 0
    for centre, block in synthetic.iter_structured_blocks(spec.n, spec.dim, centres=spec.centres,
                                                          noise_ratio=spec.noise_ratio, seed=spec.seed):
        keys = row_keys(row, row + block.shape[0])
        labels = np.char.add("class-", np.char.zfill((centre % spec.num_classes).astype(str), 4))
        uris = np.char.add(np.char.add(uri_prefix, keys), ".jpg")
        yield row, {"key": keys, "label": labels, "image_path": uris}, block
        row += block.shape[0]


def write_clip_dataset(data_dir: str, spec: DataSpec) -> None:
    """Streams the memory's vectors and metadata to ``data_dir`` in clip-retrieval's layout.

    Memory stays at one generator block (`evaluation.synthetic_data.write_clip_layout`); an interrupted run
    leaves no half data set behind.
    """
    synthetic_data.write_clip_layout(data_dir, _chunks(spec), rows=spec.n, dim=spec.dim,
                                     rows_per_file=spec.rows_per_file, dtype=spec.dtype, info=spec.to_dict())


def memory_vectors(x: np.ndarray) -> np.ndarray:
    """Rows as the memory stores them: float32, L2-normalised by the build (norm in float64)."""
    from memory.vectors import l2_normalize  # pylint: disable=g-import-not-at-top
    return l2_normalize(np.asarray(x, dtype=np.float32))


def exact_topk_files(paths: Sequence[str], queries: np.ndarray, k: int, *, block: int = _GT_BLOCK
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product over the rows of several .npy files, in file order, in bounded memory.

    Each file is memory-mapped and scored ``block`` rows at a time (converted with `memory_vectors`), so
    memory is ~nq x block x 4 bytes of scores plus one converted block, whatever the total. Once k rows are
    known, a block's candidates are only the scores above each query's current k-th best: one comparison
    pass instead of a selection, and few survivors once many rows have been seen.

    Returns:
      (int64 [nq, k] global row indices, float32 [nq, k] dot products), largest first, ties by ascending row.
    """
    q = memory_vectors(queries)
    nq = q.shape[0]
    best_idx = np.zeros((nq, 0), dtype=np.int64)
    best_val = np.zeros((nq, 0), dtype=np.float32)
    scores = np.empty((nq, block), dtype=np.float32)
    base = 0
    for path in paths:
        mm = np.load(path, mmap_mode="r")
        for start in range(0, mm.shape[0], block):
            rows = memory_vectors(mm[start:start + block])
            out = scores[:, :rows.shape[0]]
            np.matmul(q, rows.T, out=out)
            if best_idx.shape[1] < k:
                # No threshold yet (first block): each query's kb best of this block are its candidates.
                # argpartition may cut exact float32 ties at the kb-th score arbitrarily; distinct random
                # vectors do not produce them in practice, and recall compares id sets.
                kb = min(k, rows.shape[0])
                c = (np.argpartition(-out, kb - 1, axis=1)[:, :kb] if kb < rows.shape[0]
                     else np.broadcast_to(np.arange(kb), (nq, kb))).ravel()
                r = np.repeat(np.arange(nq), kb)
            else:
                # Strictly above the k-th best: a tie with it loses anyway (these rows come later, and ties
                # go to the smaller row).
                r, c = np.nonzero(out > best_val[:, -1:])
            best_idx, best_val = _merge_candidates(best_idx, best_val, r, c + (base + start), out[r, c], k)
        base += mm.shape[0]
        del mm
    if base < k:
        raise ValueError(f"exact_topk_files needs at least k={k} rows, got {base}")
    return best_idx, best_val


def _merge_candidates(best_idx: np.ndarray, best_val: np.ndarray, rows: np.ndarray, idx: np.ndarray,
                      val: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's current best plus new (query row, index, value) candidates -> its new best (<= k)."""
    nq, have = best_idx.shape
    all_rows = np.concatenate([np.repeat(np.arange(nq), have), rows])
    all_idx = np.concatenate([best_idx.ravel(), idx])
    all_val = np.concatenate([best_val.ravel(), val])
    # Grouped by query, then largest value first, ties by ascending row index.
    order = np.lexsort((all_idx, -all_val, all_rows))
    counts = np.bincount(all_rows, minlength=nq)
    keep = min(k, int(counts.min()))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    take = order[first[:, None] + np.arange(keep)]
    return all_idx[take], all_val[take]


def ensure_dataset(work_dir: str, spec: DataSpec, *, log) -> tuple[str, float]:
    """The data directory of ``spec`` (generated unless cached), and the seconds spent generating (0 if cached)."""
    data_dir = os.path.join(work_dir, spec.dirname())
    marker = os.path.join(data_dir, _DATA_MARKER)
    gt_path = os.path.join(data_dir, "gt_ids.npy")
    if os.path.exists(marker) and os.path.exists(gt_path):
        with open(marker) as f:
            if json.load(f) == spec.to_dict():
                log(f"n={spec.n:,}: cached data at {data_dir}")
                return data_dir, 0.0
    start = time.perf_counter()
    write_clip_dataset(data_dir, spec)
    gen_s = time.perf_counter() - start
    queries = synthetic.structured_unit_vectors(spec.queries, spec.dim, centres=spec.centres,
                                                noise_ratio=spec.noise_ratio, seed=spec.seed, draw=1)
    np.save(os.path.join(data_dir, "queries.npy"), queries)
    gt_ids, gt_scores = exact_topk_files([emb_path(data_dir, i) for i in range(num_files(spec.n, spec.rows_per_file))],
                                         queries, K)
    np.save(os.path.join(data_dir, "gt_scores.npy"), gt_scores)
    np.save(gt_path, gt_ids)  # Last: its presence marks the ground truth complete.
    total_s = time.perf_counter() - start
    log(f"n={spec.n:,}: data written in {gen_s:.1f} s, ground truth {total_s - gen_s:.1f} s, "
        f"{dir_bytes(data_dir) / 1e9:.2f} GB at {data_dir}")
    return data_dir, total_s


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
