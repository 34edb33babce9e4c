"""Planning a re-index (compaction) of a living memory: pure functions over a manifest, no Beam.

A re-index folds the delta shards into the main shards and drops forgotten rows physically. It rewrites
only what changed: with an unchanged shard count, a main shard that holds no forgotten row and receives no
delta row is *reused* as it is (same directory, same ShardInfo) in the new version; every other target
shard is *rebuilt* into a fresh directory. The Beam job (pipelines/reindex/) executes the plan.

Why reuse is exact: main shards are hash partitions (entry ``id`` lives in shard
``shard_for_id(id, num_shards)``), so target shard ``t`` of the new version is exactly the live rows of old
main shard ``t`` plus the delta rows hashing to ``t``. `plan_reindex` verifies the partition invariant
before it reuses anything, and rebuilds every shard when a shard holds an id that hashes elsewhere.

A partition-routed memory (memory.search.routing) keeps its router and its shard count: every live main row stays
in the shard it is in, and each delta row goes to the shard its router assigns it (``delta_targets``).

The plan needs only a few counts per stored shard (`ShardSummary`: rows, forgotten rows, ids that hash
elsewhere, delta rows per target shard), never the ids themselves in one place: the Beam job computes each
summary on the worker that reads that shard and plans from the combined summaries (`plan_from_summaries`);
`plan_reindex` does the same from ids held in memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from memory.store.manifest import Manifest, ShardInfo
from memory.store.sharding import shard_for_id, shard_name

__all__ = ["ReindexPlan", "ShardSummary", "TargetShard", "check_shard_count", "count_forgotten", "delta_fraction",
           "forgotten_fraction", "needs_reindex", "orphan_reindex_dirs", "plan_from_summaries",
           "plan_reindex", "reindex_dir", "summarize_delta_shard", "summarize_main_shard", "target_shard_count"]

REINDEX_SHARDS_DIR = "shards"
# shards/r000007-1a2b3c4d: the directory of the shards a re-index to version 7 rebuilt (job token after '-').
_REINDEX_DIR_RE = re.compile(r"^r(\d{6,})-[A-Za-z0-9]+$")


def target_shard_count(live: int, *, target_shard_size: int | None, current: int) -> int:
    """Number of main shards after the re-index.

    Args:
      live: Live entries (Manifest.total).
      target_shard_size: Desired entries per shard; None keeps ``current``.
      current: The current number of main shards.

    Returns:
      ``max(1, ceil(live / target_shard_size))``, or ``current`` when no size is given.
    """
    if target_shard_size is None:
        return max(1, int(current))
    if isinstance(target_shard_size, bool) or not isinstance(target_shard_size, int) or target_shard_size < 1:
        raise ValueError(f"target_shard_size must be None or an int >= 1, got {target_shard_size!r}")
    return max(1, math.ceil(int(live) / target_shard_size))


def delta_fraction(manifest: Manifest) -> float:
    """Rows in delta shards / live entries (inf when there are delta rows but no live entry)."""
    delta = sum(s.count for s in manifest.delta_shards)
    if delta == 0:
        return 0.0
    return delta / manifest.total if manifest.total else math.inf


def forgotten_fraction(manifest: Manifest) -> float:
    """Forgotten rows still stored / rows stored (main + delta)."""
    forgotten = manifest.forgotten.count if manifest.forgotten else 0
    return forgotten / manifest.physical_total if manifest.physical_total else 0.0


def needs_reindex(manifest: Manifest, *, delta_threshold: float, forgotten_threshold: float,
                  target_shards: int | None = None, purge_requested: bool = False) -> tuple[bool, str]:
    """Whether a re-index is worth running now, and why (or why not).

    A re-index is needed when the delta fraction (delta rows / live entries) exceeds ``delta_threshold``,
    when the forgotten fraction (forgotten rows / stored rows) exceeds ``forgotten_threshold``, when the
    shard count must change, or when a forget asked for physical deletion (``--purge-history``) and
    forgotten rows are still stored: that request is only honoured by a re-index, so waiting for a
    threshold would keep the embeddings indefinitely.

    Args:
      manifest: The latest version.
      delta_threshold: Fraction in [0, inf).
      forgotten_threshold: Fraction in [0, 1].
      target_shards: The shard count the re-index would produce (None: unchanged).
      purge_requested: memory.store.mutations.purge_requested_since_reindex(root).

    Returns:
      (needed, human-readable reason naming the measured fractions and the thresholds).
    """
    for name, value in (("delta_threshold", delta_threshold), ("forgotten_threshold", forgotten_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    delta = sum(s.count for s in manifest.delta_shards)
    forgotten = manifest.forgotten.count if manifest.forgotten else 0
    df, ff = delta_fraction(manifest), forgotten_fraction(manifest)
    measured = (f"delta fraction {df:.4f} ({delta} delta rows / {manifest.total} live entries; threshold "
                f"{delta_threshold:g}), forgotten fraction {ff:.4f} ({forgotten} forgotten rows / "
                f"{manifest.physical_total} stored rows; threshold {forgotten_threshold:g})")
    reasons = []
    if df > delta_threshold:
        reasons.append("delta fraction above its threshold")
    if ff > forgotten_threshold:
        reasons.append("forgotten fraction above its threshold")
    if target_shards is not None and target_shards != len(manifest.shards):
        reasons.append(f"shard count changes from {len(manifest.shards)} to {target_shards}")
    if purge_requested and forgotten:
        reasons.append("a forget requested --purge-history and forgotten rows are still stored")
    if reasons:
        return True, "; ".join(reasons) + f": {measured}"
    return False, f"nothing to do: {measured}"


@dataclasses.dataclass(frozen=True)
class TargetShard:
    """One main shard of the new version.

    Attributes:
      index: Shard index in [0, num_shards).
      name: ``shard-IIIII-of-NNNNN``.
      reused: The old ShardInfo kept as it is, or None when the shard is rebuilt.
      reasons: Why a rebuilt shard is rebuilt (e.g. ``"3 forgotten rows"``, ``"12 delta rows"``).
    """
    index: int
    name: str
    reused: ShardInfo | None
    reasons: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ReindexPlan:
    """What a re-index of one version does.

    Attributes:
      version: The version the plan was computed from (the publish expects it as parent).
      num_shards: Main shards after the re-index.
      targets: One TargetShard per index, in order.
      sources: Old shards whose rows feed rebuilt targets: changed main shards (all main shards when the
        shard count changes) and every delta shard.
      forgotten_rows: Forgotten rows stored in the source shards (all of them: reused shards hold none).
      delta_rows: Rows of the delta shards (forgotten ones included) folded into the main shards.
      note: Why every shard is rebuilt even though some could have been reused, or "".
    """
    version: int
    num_shards: int
    targets: tuple[TargetShard, ...]
    sources: tuple[ShardInfo, ...]
    forgotten_rows: int
    delta_rows: int
    note: str = ""

    @property
    def rebuilt(self) -> tuple[int, ...]:
        return tuple(t.index for t in self.targets if t.reused is None)

    @property
    def reused(self) -> tuple[int, ...]:
        return tuple(t.index for t in self.targets if t.reused is not None)


def _hash_many(ids: Iterable[str], num_shards: int) -> np.ndarray:
    ids = list(ids)
    return np.fromiter((shard_for_id(i, num_shards) for i in ids), dtype=np.int64, count=len(ids))


@dataclasses.dataclass(frozen=True)
class ShardSummary:
    """What the planner needs to know about one stored shard: a few counts, computed where the shard is read.

    Attributes:
      path: ShardInfo.path of the shard.
      rows: Rows stored in it.
      forgotten: Forgotten (tombstoned) rows stored in it.
      misplaced: Main shards of a hash memory: rows whose id hashes to another main shard (0 when routed,
        where rows never move and there is no partition to verify).
      targets: Delta shards: ``((target shard, rows), ...)``, sorted, the rows (forgotten ones included) the
        re-index sends to each target shard. Empty for main shards.
    """
    path: str
    rows: int
    forgotten: int = 0
    misplaced: int = 0
    targets: tuple[tuple[int, int], ...] = ()


def count_forgotten(ids: np.ndarray, forgotten_sorted: np.ndarray) -> int:
    """How many of ``ids`` are in ``forgotten_sorted`` (a sorted unicode array, e.g. read_forgotten's)."""
    ids = np.asarray(ids, dtype=str)
    if not forgotten_sorted.size or not ids.size:
        return 0
    pos = np.minimum(np.searchsorted(forgotten_sorted, ids), forgotten_sorted.size - 1)
    return int((forgotten_sorted[pos] == ids).sum())


def summarize_main_shard(path: str, index: int, ids: np.ndarray, forgotten_sorted: np.ndarray, *,
                         num_main: int, routed: bool) -> ShardSummary:
    """The ShardSummary of main shard ``index`` of ``num_main`` from its stored ids (no embedding needed)."""
    ids = np.asarray(ids, dtype=str)
    misplaced = 0 if routed or not ids.size else int((_hash_many(ids.tolist(), num_main) != index).sum())
    return ShardSummary(path=path, rows=int(ids.size), forgotten=count_forgotten(ids, forgotten_sorted),
                        misplaced=misplaced)


def summarize_delta_shard(path: str, ids: np.ndarray, targets: np.ndarray, forgotten_sorted: np.ndarray
                          ) -> ShardSummary:
    """The ShardSummary of a delta shard from its ids and the target shard of each row."""
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (len(ids),):
        raise ValueError(f"delta shard {path}: {targets.shape[0]} targets for {len(ids)} rows")
    uniq, counts = np.unique(targets, return_counts=True)
    return ShardSummary(path=path, rows=int(len(ids)), forgotten=count_forgotten(ids, forgotten_sorted),
                        targets=tuple(zip(uniq.tolist(), counts.tolist())))


def check_shard_count(manifest: Manifest, num_shards: int) -> None:
    """Raises ValueError when ``num_shards`` is invalid for the memory (a routed memory keeps its count)."""
    old_n = len(manifest.shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards!r}")
    if manifest.router is not None and num_shards != old_n:
        raise ValueError(
            f"a partition-routed memory keeps its shard count on re-index (its router owns {old_n} shards), got "
            f"num_shards={num_shards}; re-index without --target-shard-size, or rebuild with `vmem build "
            f"--sharding partition --shards {num_shards}`")


def plan_reindex(manifest: Manifest, *, main_ids: Mapping[str, np.ndarray], forgotten: np.ndarray,
                 delta_ids: Sequence[np.ndarray] = (), num_shards: int | None = None,
                 index_config_changed: bool = False,
                 delta_targets: Sequence[np.ndarray] | None = None) -> ReindexPlan:
    """Decides which main shards are reused and which are rebuilt, from every shard's ids.

    A convenience over `plan_from_summaries` for callers holding all ids in memory (tests, small memories);
    the Beam job computes the same ShardSummary per shard on the worker that reads it instead.

    Args:
      manifest: The version to re-index.
      main_ids: ``{ShardInfo.path: ids stored in that main shard}`` for every main shard.
      forgotten: The version's tombstoned ids (memory.store.mutations.read_forgotten).
      delta_ids: Ids of each delta shard.
      num_shards: Main shards after the re-index (None: unchanged; see target_shard_count).
      index_config_changed: The re-index builds with another IndexConfig than the memory's.
      delta_targets: For a partition-routed memory (required there), the main shard its router assigns to
        each row of each delta shard (memory.search.routing.Router.assign), aligned with ``delta_ids``.

    Returns:
      The ReindexPlan.

    Raises:
      ValueError: bad arguments, or a shard count change of a partition-routed memory.
    """
    old_n = len(manifest.shards)
    new_n = old_n if num_shards is None else int(num_shards)
    check_shard_count(manifest, new_n)
    routed = manifest.router is not None
    if routed and (delta_targets is None or len(delta_targets) != len(delta_ids)
                   or any(len(t) != len(d) for t, d in zip(delta_targets, delta_ids))):
        raise ValueError("a partition-routed memory needs delta_targets: one router shard per delta row")
    missing = [s.path for s in manifest.shards if s.path not in main_ids]
    if missing:
        raise ValueError(f"main_ids lacks the ids of main shard(s) {missing}")
    gone = np.sort(np.asarray(forgotten, dtype=str)) if len(forgotten) else np.zeros((0,), "<U1")
    main = [summarize_main_shard(s.path, i, main_ids[s.path], gone, num_main=old_n, routed=routed)
            for i, s in enumerate(manifest.shards)]
    deltas = []
    for j, ids in enumerate(delta_ids):
        ids = np.asarray(ids, dtype=str)
        targets = delta_targets[j] if routed else _hash_many(ids.tolist(), new_n)
        deltas.append(summarize_delta_shard(f"delta#{j}", ids, targets, gone))
    return plan_from_summaries(manifest, main + deltas, num_shards=new_n, index_config_changed=index_config_changed)


def plan_from_summaries(manifest: Manifest, summaries: Iterable[ShardSummary], *, num_shards: int | None = None,
                        index_config_changed: bool = False) -> ReindexPlan:
    """Decides which main shards are reused and which are rebuilt, from one ShardSummary per stored shard.

    A target shard is reused iff the shard count is unchanged, the index config is unchanged, the old main
    shard at that index holds no forgotten row, no delta row goes to it, and (hash memories) every old main
    shard is a proper hash partition (otherwise a rebuilt shard could hold an id that belongs to a reused one).

    Args:
      manifest: The version to re-index.
      summaries: One summary per main shard (matched by path; every main shard needs one) and one per
        delta shard (any summary whose path is not a main shard's; ``targets`` computed for ``num_shards``).
      num_shards: Main shards after the re-index (None: unchanged).
      index_config_changed: The re-index builds with another IndexConfig than the memory's.

    Raises:
      ValueError: a main shard lacks its summary, a delta row targets a shard >= num_shards, or a shard count
        change of a partition-routed memory.
    """
    old_n = len(manifest.shards)
    new_n = old_n if num_shards is None else int(num_shards)
    check_shard_count(manifest, new_n)
    routed = manifest.router is not None
    main_paths = {s.path for s in manifest.shards}
    by_path, deltas = {}, []
    for summary in summaries:
        if summary.path in main_paths:
            if summary.path in by_path:
                raise ValueError(f"two summaries of main shard {summary.path}")
            by_path[summary.path] = summary
        else:
            deltas.append(summary)
    missing = [s.path for s in manifest.shards if s.path not in by_path]
    if missing:
        raise ValueError(f"no summary of main shard(s) {missing}")
    forgotten_in = {p: by_path[p].forgotten for p in main_paths}
    deltas_to = np.zeros(new_n, np.int64)
    for d in deltas:
        for t, rows in d.targets:
            if not 0 <= t < new_n:
                raise ValueError(f"delta shard {d.path} sends rows to shard {t}, not in [0, {new_n})")
            deltas_to[t] += rows
    delta_rows = int(sum(d.rows for d in deltas))

    note = ""
    if new_n != old_n:
        note = f"shard count changes from {old_n} to {new_n}"
    elif index_config_changed:
        note = "index config changes"
    elif not routed:  # Routed main rows never move, so there is no partition to verify.
        misplaced = [s.name for s in manifest.shards if by_path[s.path].misplaced]
        if misplaced:
            note = (f"main shard(s) {misplaced} hold ids that hash to another shard (not a hash partition), so no "
                    "shard can be reused safely")

    targets = []
    for t in range(new_n):
        name = shard_name(t, new_n)
        if note:
            targets.append(TargetShard(index=t, name=name, reused=None, reasons=(note,)))
            continue
        old = manifest.shards[t]
        reasons = []
        if forgotten_in[old.path]:
            reasons.append(f"{forgotten_in[old.path]} forgotten rows")
        if deltas_to[t]:
            reasons.append(f"{int(deltas_to[t])} delta rows")
        targets.append(TargetShard(index=t, name=name, reused=None if reasons else old, reasons=tuple(reasons)))
    rebuilt = {t.index for t in targets if t.reused is None}
    main_sources = [s for i, s in enumerate(manifest.shards) if note or i in rebuilt]
    sources = tuple(s for s in main_sources + list(manifest.delta_shards) if s.count)
    total_forgotten = manifest.forgotten.count if manifest.forgotten else 0
    reused_forgotten = sum(forgotten_in[t.reused.path] for t in targets if t.reused is not None)
    assert reused_forgotten == 0, "a reused shard must hold no forgotten row"  # By construction above.
    return ReindexPlan(version=manifest.version, num_shards=new_n, targets=tuple(targets), sources=sources,
                       forgotten_rows=total_forgotten, delta_rows=delta_rows, note=note)


def reindex_dir(version: int, job_token: str) -> str:
    """``shards/r000007-<token>``: where a re-index publishing ``version`` writes its rebuilt shards."""
    if not re.fullmatch(r"[A-Za-z0-9]+", job_token or ""):
        raise ValueError(f"job_token must be letters and digits, got {job_token!r}")
    return f"{REINDEX_SHARDS_DIR}/r{version:06d}-{job_token}"


def orphan_reindex_dirs(children: Iterable[str], *, referenced_paths: Iterable[str], latest: int) -> list[str]:
    """Re-index directories under ``shards/`` that no version references and no writer can still publish.

    ``shards/rNNNNNN-<token>`` is written by a re-index that publishes version NNNNNN. If NNNNNN <= the
    latest version and no existing version references a path under it, its re-index crashed or lost a race:
    version NNNNNN is published by someone else (versions are created exclusively), so nothing will ever
    reference that directory. Directories for later versions may belong to a re-index still running.

    Args:
      children: Names directly under ``shards/`` (e.g. storage.list_dir(root/shards)).
      referenced_paths: Every shard path referenced by an existing version (relative to the root).
      latest: The latest version number, read before ``referenced_paths``.

    Returns:
      Sorted root-relative directory paths (``shards/r...``) safe to delete.
    """
    used = {p.split("/")[1] for p in referenced_paths
            if p.startswith(REINDEX_SHARDS_DIR + "/") and p.count("/") >= 2}
    out = []
    for name in children:
        m = _REINDEX_DIR_RE.match(name)
        if m and int(m.group(1)) <= latest and name not in used:
            out.append(f"{REINDEX_SHARDS_DIR}/{name}")
    return sorted(out)
