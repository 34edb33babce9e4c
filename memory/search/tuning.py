"""Decision-level autotuning: the cheapest search setting whose *votes* agree with exact search.

Recall@10 asks every neighbour to be right; a classifier only needs the vote to come out the same. `tune`
measures, for a grid of search settings of a built memory (tree+AH leaves probed, re-rank depth, and the
router's probes for a partition-routed memory), the query rate, recall@k against exact search, the share of
queries whose vote equals the exact-search vote, and the accuracy; and picks the fastest setting whose votes
agree on at least ``min_agreement`` of the queries and whose accuracy is within ``max_accuracy_drop`` points of
exact search's. `publish_search_defaults` records it in the memory (manifest ``search_defaults``, change kind
``tune``); `VisualMemory.open` and the evaluate job then search with it unless told otherwise.

Exact search is brute force over the memory's stored (live) embeddings in float64-accumulated float32 blocks,
ties by ascending id, as `VisualMemory.search` breaks them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import numpy as np

from memory.decide.voting import VotingParams, VotingRule, vote
from memory.search.setting import SearchSetting
from memory.visual_memory import VisualMemory

LEAF_FRACTIONS = (1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
REORDER_FACTORS = (1, 2, 4, 10, 20, 50)   # x k
ROUTE_PROBES = (1, 2, 4, 8, 16, 64)
# Distance-ratio routing (memory.search.routing.Router.route): visits fewer shards than probes at equal coverage.
ROUTE_RATIOS = (1.05, 1.1, 1.2, 1.3, 1.5)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One setting, measured."""
    setting: SearchSetting
    qps: float
    recall: float
    agreement: float
    accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.setting.to_dict(), "qps": self.qps, "recall": self.recall, "agreement": self.agreement,
                "accuracy": self.accuracy}


def exact_search(memory: VisualMemory, queries: np.ndarray, k: int, *, block: int = 65_536
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids unicode [nq, k], labels int32 [nq, k], cosine distances float32 [nq, k]) of the exact top-k live
    entries, ties by ascending id."""
    from memory.vectors import l2_normalize  # pylint: disable=g-import-not-at-top
    ids = memory.live_entry_ids()
    emb = memory.get_embeddings(ids)
    q = l2_normalize(np.asarray(queries, dtype=np.float32))
    k = min(int(k), ids.size)
    best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((q.shape[0], 0), dtype=np.int64)
    for start in range(0, ids.size, block):
        s = q @ emb[start:start + block].T
        take = min(k, s.shape[1])
        part = np.argpartition(-s, take - 1, axis=1)[:, :take]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        # Rows are sorted by id, so a stable sort on -score breaks ties by ascending id.
        order = np.lexsort((best_i, -best_s), axis=1)[:, :k] if best_s.shape[1] > k else \
            np.lexsort((best_i, -best_s), axis=1)
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    found = ids[best_i]
    return found, memory.labels_of(found), (1.0 - best_s).astype(np.float32)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    hits = sum(len(set(a[:k].tolist()) & set(b.tolist())) for a, b in zip(found, exact))
    return hits / exact.size if exact.size else 1.0


def candidate_settings(memory: VisualMemory, k: int) -> list[SearchSetting]:
    """The grid searched: leaves x re-rank depth for tree+AH shards, x routing rules (router probes, then
    distance ratios) for a routed memory."""
    tree = memory.has_tree_shards()
    routed = memory.router is not None
    # A routed tree+AH memory multiplies three knobs: a coarser leaves x re-rank grid keeps it near 100 trials.
    leaves = (LEAF_FRACTIONS[2::2] if routed else LEAF_FRACTIONS) if tree else (None,)
    factors = REORDER_FACTORS[::2] if routed else REORDER_FACTORS
    reorders = tuple(sorted({max(k, f * k) for f in factors})) if tree else (None,)
    routes: Sequence[tuple[int | None, float | None]] = ((None, None),)
    if routed:
        n = memory.router.centroids.shape[0]
        probes = tuple(p for p in ROUTE_PROBES if p <= n) + ((n,) if n not in ROUTE_PROBES else ())
        routes = [(p, None) for p in probes] + [(None, r) for r in ROUTE_RATIOS]
    return [SearchSetting(lf, ro, rp, rr) for rp, rr in routes for lf in leaves for ro in reorders
            if not (lf is None and ro is None and rp is None and rr is None)]


def _qps(memory: VisualMemory, q: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray]:
    found = memory.search(q, k).ids  # Warm-up, and the answer.
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        memory.search(q, k)
        best = min(best, time.perf_counter() - start)
    return q.shape[0] / max(best, 1e-9), found


def tune(memory: VisualMemory, queries: np.ndarray, true_labels: np.ndarray, *, rule: VotingRule | str = "rank",
         k: int = 10, params: VotingParams = VotingParams(), min_agreement: float = 0.999,
         max_accuracy_drop: float = 0.1, min_recall: float = 0.95, repeats: int = 2,
         reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Measures every candidate setting and picks the fastest whose votes agree with exact search.

    Args:
      memory: The opened memory (its own setting is the starting point of every trial).
      queries: float [nq, dim] held-out embeddings. true_labels: int [nq] label indices (-1 = unknown class).
      rule, k, params: The vote whose decisions must agree.
      min_agreement: Share of queries whose vote must equal exact search's (0.999).
      max_accuracy_drop: Points of accuracy the setting may lose against exact search (0.1).
      min_recall: For the comparison only: the fastest setting with recall@k >= this.
      repeats: Timed searches per setting (the best counts).
      reference: (ids, labels, distances) of the exact search to compare with, instead of brute force over this
        memory's stored rows: e.g. float32 exact neighbours for a memory storing int8 rows.

    Returns:
      ``{"chosen": Trial dict or None, "by_recall": Trial dict or None, "exact": {...}, "trials": [...],
      "speedup_vs_recall": qps(chosen) / qps(by_recall)}``.
    """
    rule = VotingRule.parse(rule)
    q = np.asarray(queries, dtype=np.float32)
    true = np.asarray(true_labels)
    if q.ndim != 2 or q.shape[0] == 0 or true.shape != (q.shape[0],):
        raise ValueError(f"tune needs [nq, dim] queries with one true label each, got {q.shape} and {true.shape}")
    exact_ids, exact_labels, exact_dist = exact_search(memory, q, k) if reference is None else reference
    exact_vote = vote(exact_labels, exact_dist, rule=rule, k=exact_labels.shape[1], params=params).labels
    exact_acc = 100.0 * float(np.mean(exact_vote == true))
    trials = []
    for setting in candidate_settings(memory, k):
        view = memory.with_search_params(**setting.search_params())
        qps, _ = _qps(view, q, k, repeats)
        res = view.search(q, k)
        pred = vote(res.labels, res.distances, rule=rule, k=min(k, res.labels.shape[1]), params=params).labels
        trials.append(Trial(setting, qps, _recall(res.ids, exact_ids), float(np.mean(pred == exact_vote)),
                            100.0 * float(np.mean(pred == true))))
    ok = [t for t in trials if t.agreement >= min_agreement and t.accuracy >= exact_acc - max_accuracy_drop - 1e-9]
    by_recall = [t for t in trials if t.recall >= min_recall]
    chosen = max(ok, key=lambda t: t.qps) if ok else None
    fastest_recall = max(by_recall, key=lambda t: t.qps) if by_recall else None
    return {"chosen": None if chosen is None else chosen.to_dict(),
            "by_recall": None if fastest_recall is None else fastest_recall.to_dict(),
            "exact": {"accuracy": exact_acc, "queries": int(q.shape[0])},
            "criteria": {"rule": rule.value, "k": int(k), "min_agreement": min_agreement,
                         "max_accuracy_drop": max_accuracy_drop, "min_recall": min_recall},
            "speedup_vs_recall": (chosen.qps / fastest_recall.qps) if chosen and fastest_recall else None,
            "trials": [t.to_dict() for t in trials]}


def publish_search_defaults(root: str, result: dict[str, Any], *, expected_version: int | None = None):
    """Publishes the next version with ``result["chosen"]`` as the memory's default search setting."""
    from memory.store.versions import publish_version, read_base_version  # pylint: disable=g-import-not-at-top
    chosen = result.get("chosen")
    if chosen is None:
        raise ValueError("no setting met the criteria; nothing to publish (exact search stays the default)")
    base, manifest = read_base_version(root, expected_version)
    setting = SearchSetting.from_dict(chosen)
    defaults = {**setting.to_dict(), "tuned": {
        "fitted_on_version": base, "qps": chosen["qps"], "recall": chosen["recall"],
        "agreement": chosen["agreement"], "accuracy": chosen["accuracy"], **result["criteria"],
        "exact_accuracy": result["exact"]["accuracy"], "queries": result["exact"]["queries"]}}
    change = {"kind": "tune", "summary": f"default search setting: {setting.describe()} (votes agree with exact "
                                         f"search on {100 * chosen['agreement']:.2f}% of "
                                         f"{result['exact']['queries']} queries)", **setting.to_dict()}
    return publish_version(root, dataclasses.replace(manifest, search_defaults=defaults, change=change),
                           expected_parent=base)
