"""Memory pruning by reliability counts (Geirhos et al. 2024, "Memory pruning"), pure numpy.

Every memory entry queries the memory with its own stored embedding, leaving itself out, and looks at its
top-k (k = 100) neighbours. The reliability count of entry j is

    v(j) = number of queries q that have j among their k neighbours and label(j) != label(q),

i.e. how often j would have voted for a wrong class had q been a query. Two uses:

* **hard pruning**: remove (forget) every entry with ``v >= T`` (the paper: T = 128, 26,257 of 1.28M
  ImageNet entries for DINOv2-L);
* **soft pruning**: multiply neighbour j's vote by ``gamma(j) = 1.75 / (1 + v(j))`` when ``v(j) >= 1``,
  and by 1 otherwise.

Leave-one-out is by *id*, not by distance 0: a dataset can hold exact duplicates (distance 0 to each
other), and those must count each other. The query's own row is removed from its neighbour list wherever
it appears; the lists are retrieved with k + 1 neighbours so that k remain. Should the query itself not be
among its k + 1 (only possible with more than k exact duplicates that sort before it by id, or with an
approximate index), the first k are kept, which is still the top-k of the memory without the query.

The distributed job is ``pipelines/prune.py``; this module holds the math so that it is the same
everywhere (the job calls :func:`leave_one_out` and :func:`mislabelled_hits` per query batch).
"""

from __future__ import annotations

import enum
import io
import json
from typing import Any, NamedTuple

import numpy as np

from memory import storage
from memory.enums import parse_enum

__all__ = ["PAPER_K", "PAPER_THRESHOLD", "PruningCounts", "PruningMode", "bucket_counts_path", "counts_dir",
           "counts_summary", "format_summary", "hard_prune_ids", "leave_one_out", "mislabelled_hits", "read_all_counts",
           "read_counts", "reliability_counts", "soft_weights", "summary_path", "write_counts", "write_summary"]

PAPER_K = 100
PAPER_THRESHOLD = 128
SOFT_RULE = "1.75/(1+v)"
PRUNING_DIR = "pruning"


class PruningMode(enum.Enum):
    """What a prune publishes."""

    HARD = "hard"  # Forget every entry with v >= threshold (a tombstone version).
    SOFT = "soft"  # Publish entry weights gamma = 1.75 / (1 + v) for v >= 1.

    @classmethod
    def parse(cls, name: "str | PruningMode") -> "PruningMode":
        return parse_enum(cls, name, "pruning mode")


def _as_2d(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [num_queries, K] array, got shape {a.shape}")
    return a


def leave_one_out(neighbor_ids: np.ndarray, neighbor_labels: np.ndarray, *, self_ids: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Removes each query's own entry (by id) from its neighbour list and keeps the first k.

    Args:
      neighbor_ids: unicode [n, K] neighbour ids, nearest first ("" = padding). K >= k + 1 makes sure k
        neighbours remain.
      neighbor_labels: int [n, K] neighbour labels (-1 = padding).
      self_ids: unicode [n] the id of each query's own entry.
      k: Neighbours to keep per query.

    Returns:
      ``(ids [n, k], labels [n, k], self_found [n] bool)``; rows shorter than k are padded with "" / -1.
    """
    ids = _as_2d("neighbor_ids", neighbor_ids).astype(str)
    labels = _as_2d("neighbor_labels", neighbor_labels)
    self_ids = np.asarray(self_ids).astype(str)
    if labels.shape != ids.shape or self_ids.shape != ids.shape[:1]:
        raise ValueError(f"shapes disagree: neighbor_ids {ids.shape}, neighbor_labels {labels.shape}, "
                         f"self_ids {self_ids.shape}; expected [n, K], [n, K], [n]")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    is_self = ids == self_ids[:, None]
    # Stable: the remaining neighbours keep their order; the query's own entry moves to the end.
    order = np.argsort(is_self, axis=1, kind="stable")
    kept_ids = np.take_along_axis(ids, order, axis=1)
    kept_labels = np.take_along_axis(labels, order, axis=1)
    kept_self = np.take_along_axis(is_self, order, axis=1)
    kept_ids = np.where(kept_self, "", kept_ids)
    kept_labels = np.where(kept_self, -1, kept_labels)
    n, width = ids.shape
    if width < k:
        kept_ids = np.concatenate([kept_ids, np.full((n, k - width), "", dtype=kept_ids.dtype)], axis=1)
        kept_labels = np.concatenate([kept_labels, np.full((n, k - width), -1, dtype=kept_labels.dtype)], axis=1)
    return kept_ids[:, :k], kept_labels[:, :k].astype(np.int64), is_self.any(axis=1)


def mislabelled_hits(query_labels: np.ndarray, neighbor_ids: np.ndarray, neighbor_labels: np.ndarray
                     ) -> np.ndarray:
    """Ids of the neighbours whose label differs from their query's (one entry per occurrence).

    Args:
      query_labels: int [n] label of each query.
      neighbor_ids: unicode [n, k] (after :func:`leave_one_out`); "" / label -1 is padding and never counts.
      neighbor_labels: int [n, k].

    Returns:
      unicode [m] ids, with repetitions (an entry hit by three queries appears three times).
    """
    ids = _as_2d("neighbor_ids", neighbor_ids)
    labels = _as_2d("neighbor_labels", neighbor_labels)
    query_labels = np.asarray(query_labels)
    if labels.shape != ids.shape or query_labels.shape != ids.shape[:1]:
        raise ValueError(f"shapes disagree: query_labels {query_labels.shape}, neighbor_ids {ids.shape}, "
                         f"neighbor_labels {labels.shape}")
    differ = (labels >= 0) & (labels != query_labels[:, None])
    return ids[differ].astype(str)


def reliability_counts(query_labels: np.ndarray, neighbor_ids: np.ndarray, neighbor_labels: np.ndarray, *,
                       self_ids: np.ndarray, k: int = PAPER_K, entry_ids: np.ndarray | None = None
                       ) -> np.ndarray:
    """The paper's reliability count v(j) for every memory entry.

    Args:
      query_labels: int [n] label of each query (= each memory entry, queried with its own embedding).
      neighbor_ids: unicode [n, K] its neighbours in the memory, nearest first, *including* itself
        (retrieve k + 1 so that k remain after leaving one out).
      neighbor_labels: int [n, K] their labels.
      self_ids: unicode [n] the id of each query's own entry.
      k: Neighbours per query after leaving itself out (paper: 100).
      entry_ids: unicode [m] the entries to count for (default: ``self_ids``); entries never hit get 0.

    Returns:
      int64 [m] v, aligned with ``entry_ids``.

    Raises:
      ValueError: on bad shapes, or a neighbour id that is not among ``entry_ids``.
    """
    self_ids = np.asarray(self_ids).astype(str)
    entry_ids = self_ids if entry_ids is None else np.asarray(entry_ids).astype(str)
    kept_ids, kept_labels, _ = leave_one_out(neighbor_ids, neighbor_labels, self_ids=self_ids, k=k)
    hits = mislabelled_hits(query_labels, kept_ids, kept_labels)
    hit_ids, hit_counts = np.unique(hits, return_counts=True)
    order = np.argsort(entry_ids, kind="stable")
    sorted_entries = entry_ids[order]
    if sorted_entries.size > 1 and (sorted_entries[1:] == sorted_entries[:-1]).any():
        raise ValueError("entry_ids hold duplicates; each memory entry must be listed once")
    safe = np.minimum(np.searchsorted(sorted_entries, hit_ids), max(sorted_entries.size - 1, 0))
    known = (sorted_entries[safe] == hit_ids) if sorted_entries.size else np.zeros(hit_ids.shape, dtype=bool)
    if not known.all():
        raise ValueError(f"{int((~known).sum())} neighbour id(s) are not memory entries (e.g. "
                         f"{hit_ids[~known][:5].tolist()}); pass every entry in entry_ids")
    v = np.zeros(entry_ids.shape, dtype=np.int64)
    np.add.at(v, order[safe], hit_counts)
    return v


def soft_weights(v: np.ndarray) -> np.ndarray:
    """Soft-pruning factors: ``gamma = 1.75 / (1 + v)`` where ``v >= 1``, else 1 (float64)."""
    v = np.asarray(v)
    if v.size and (v < 0).any():
        raise ValueError(f"reliability counts must be >= 0, got min {v.min()!r}")
    return np.where(v >= 1, 1.75 / (1.0 + v), 1.0)


def hard_prune_ids(ids: np.ndarray, v: np.ndarray, threshold: int) -> np.ndarray:
    """The ids to remove by hard pruning: exactly those with ``v >= threshold`` (sorted)."""
    ids, v = np.asarray(ids).astype(str), np.asarray(v)
    if ids.shape != v.shape:
        raise ValueError(f"ids shape {ids.shape} != v shape {v.shape}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1 (v >= 0 always; 0 would remove every entry), "
                         f"got {threshold!r}; the paper uses {PAPER_THRESHOLD}")
    return np.sort(ids[v >= threshold])


class PruningCounts(NamedTuple):
    """The reliability counts of one version: ``ids`` (sorted unicode) and ``v`` (int64), k and version."""
    ids: np.ndarray
    v: np.ndarray
    k: int
    version: int


def counts_dir(root: str, version: int) -> str:
    """``MEMORY/pruning/vNNNNNN-counts/``: the per-bucket counts files of the run on ``version``."""
    return storage.join(root, PRUNING_DIR, f"v{version:06d}-counts")


def bucket_counts_path(root: str, version: int, bucket: int, buckets: int) -> str:
    """``MEMORY/pruning/vNNNNNN-counts/bucket-BBBBB-of-NNNNN.npz``: the counts of the entries whose id hashes
    to ``bucket`` of ``buckets`` (``vmem prune --count-buckets``; pipelines/prune.py writes one per bucket)."""
    if not 0 <= bucket < buckets:
        raise ValueError(f"bucket must be in [0, {buckets}), got {bucket}")
    return storage.join(counts_dir(root, version), f"bucket-{bucket:05d}-of-{buckets:05d}.npz")


def summary_path(root: str, version: int) -> str:
    return storage.join(root, PRUNING_DIR, f"v{version:06d}-summary.json")


def write_counts(root: str, counts: PruningCounts, *, bucket: int = 0, buckets: int = 1) -> str:
    """Writes one bucket's counts file (sorted by id) and returns its path. Not referenced by any manifest.

    The file format of pipelines/prune.py's bucket files (ids, v, k, version); the defaults write the whole
    run as its one bucket.
    """
    order = np.argsort(counts.ids, kind="stable")
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(counts.ids).astype(str)[order], v=np.asarray(counts.v, np.int64)[order],
             k=np.int64(counts.k), version=np.int64(counts.version))
    path = bucket_counts_path(root, counts.version, bucket, buckets)
    storage.write_bytes(path, buf.getvalue())
    return path


def read_counts(path: str) -> PruningCounts:
    """One counts file (a bucket of a run: its entries only)."""
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
        return PruningCounts(z["ids"].astype(str), z["v"].astype(np.int64), int(z["k"]), int(z["version"]))


def read_all_counts(root: str, version: int, *, buckets: int) -> PruningCounts:
    """Every bucket file of the run on ``version`` with ``buckets`` buckets, as one PruningCounts sorted by id.

    Buckets that got no entry have no file. For inspection and tests: the result holds every entry's count,
    which the prune job itself never does.

    Raises:
      FileNotFoundError: no bucket file of that run.
    """
    import fnmatch  # pylint: disable=g-import-not-at-top

    directory = counts_dir(root, version)
    try:
        names = storage.list_dir(directory)
    except FileNotFoundError:
        names = []
    parts = [read_counts(storage.join(directory, name))
             for name in sorted(fnmatch.filter(names, f"bucket-*-of-{buckets:05d}.npz"))]
    if not parts:
        raise FileNotFoundError(f"no counts of version {version} in {directory} ({buckets} buckets)")
    ids = np.concatenate([c.ids for c in parts])
    v = np.concatenate([c.v for c in parts])
    order = np.argsort(ids, kind="stable")
    return PruningCounts(ids[order], v[order], parts[0].k, parts[0].version)


def counts_summary(v: np.ndarray, *, thresholds: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
                   ) -> dict[str, Any]:
    """A JSON-ready description of the v distribution: power-of-two histogram, entries at or above T."""
    v = np.asarray(v, dtype=np.int64)
    n = int(v.size)
    top = int(v.max()) if n else 0
    bins = [(0, 0)]
    lo = 1
    while lo <= top:
        bins.append((lo, 2 * lo - 1))
        lo *= 2
    histogram = [{"v_min": a, "v_max": b, "entries": int(((v >= a) & (v <= b)).sum())} for a, b in bins]
    return {
        "entries": n,
        "hit": int((v >= 1).sum()),
        "mean": float(v.mean()) if n else 0.0,
        "median": float(np.median(v)) if n else 0.0,
        "max": top,
        "histogram": histogram,
        "at_or_above": {str(t): int((v >= t).sum()) for t in thresholds},
        "total_mislabelled_hits": int(v.sum()),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines of :func:`counts_summary`."""
    n = max(summary["entries"], 1)
    lines = [f"reliability counts over {summary['entries']} entries: {summary['hit']} with v >= 1, "
             f"mean {summary['mean']:.2f}, median {summary['median']:.1f}, max {summary['max']}",
             "  v range        entries"]
    for b in summary["histogram"]:
        rng = f"{b['v_min']}" if b["v_min"] == b["v_max"] else f"{b['v_min']}-{b['v_max']}"
        lines.append(f"  {rng:<12} {b['entries']:>9}  ({100 * b['entries'] / n:.1f}%)")
    lines.append("  entries with v >= T: " + ", ".join(f"T={t}: {c}" for t, c in summary["at_or_above"].items()))
    return "\n".join(lines)


def write_summary(root: str, version: int, summary: dict[str, Any]) -> str:
    path = summary_path(root, version)
    storage.write_text(path, json.dumps(summary, indent=2) + "\n")
    return path
