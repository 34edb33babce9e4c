"""Voting rules that turn k retrieved neighbours into one label (pure numpy).

Each neighbour ``i = 0..k-1`` (sorted nearest first) gets a weight; a class's
score is the sum of the weights of its neighbours among the first ``k``; the
class with the highest score wins (Geirhos et al. 2024, "Towards flexible
perception with visual memory"):

============  ==============================  ===============
rule          weight of neighbour i           default
============  ==============================  ===============
PLURALITY     1
DISTANCE      exp(-d_i)
SOFTMAX       exp(s_i / tau), s_i = 1 - d_i   tau = 0.07
RANK          1 / (alpha + i), i 0-based      alpha = 2.0
============  ==============================  ===============

``d_i`` is the cosine distance ``1 - <q, x_i>`` of unit vectors. RANK follows
the authors' released code, which counts ranks from 0 (the first neighbour
weighs ``1 / 2``); the paper's text counts from 1.

Optional per-neighbour ``entry_weights`` (e.g. soft-pruning factors
``gamma = 1.75 / (1 + v)``) multiply the rule's weights.

Padding: a neighbour whose label is negative (``-1``) or whose distance is not
finite (``inf``) is padding; it weighs 0 and never wins.

Tie rule: among classes with the same top score, the class that reached that
score first -- at the earliest neighbour position -- wins. Equivalently, a
running winner scanned over positions 0, 1, ... only changes when some class's
score becomes *strictly* greater than the current winner's. With plurality
voting, ties are common: for labels ``[A, B]`` A wins at k=2, and for
``[A, B, B, A]`` B wins at k=4 (B reached 2 at position 2, A only at position
3). Scores are summed in neighbour order starting from 0.0 and compared
exactly (no tolerance), so the result is deterministic and equal to the naive
per-query dictionary loop.

Example::

        labels = np.array([[3, 7, 7]])
        distances = np.array([[0.1, 0.2, 0.3]])
        vote(labels, distances, rule=VotingRule.RANK, k=3)
        # Prediction(labels=array([7]), scores=array([0.5833...]))
        # 3: 1/2; 7: 1/3 + 1/4.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from memory.enums import parse_enum

__all__ = [
    "Prediction",
    "VotingParams",
    "VotingRule",
    "class_scores",
    "neighbor_weights",
    "predict_all_k",
    "vote",
]


class VotingRule(enum.Enum):
    """How a neighbour's weight is derived from its rank and distance."""

    PLURALITY = "plurality"
    DISTANCE = "distance"
    SOFTMAX = "softmax"
    RANK = "rank"

    @classmethod
    def parse(cls, name: str | VotingRule) -> VotingRule:
        """Returns the rule called ``name`` (case-insensitive).

        Raises:
            ValueError: naming the unknown value and the allowed ones.
        """
        return parse_enum(cls, name, "voting rule")


@dataclasses.dataclass(frozen=True)
class VotingParams:
    """Hyper-parameters of the voting rules.

    Attributes:
        softmax_tau: Temperature of SOFTMAX voting (DINOv2 kNN eval: 0.07).
        rank_alpha: Offset of RANK voting, weight ``1 / (alpha + i)`` with a
            0-based rank ``i``.
    """

    softmax_tau: float = 0.07
    rank_alpha: float = 2.0

    def __post_init__(self):
        # Positive values keep every weight > 0, which the one-pass running
        # maximum in predict_all_k relies on (scores never decrease with k).
        if not (np.isfinite(self.softmax_tau) and self.softmax_tau > 0):
            raise ValueError(
                f"softmax_tau must be a finite number > 0, got {self.softmax_tau!r}")
        if not (np.isfinite(self.rank_alpha) and self.rank_alpha > 0):
            raise ValueError(
                f"rank_alpha must be a finite number > 0, got {self.rank_alpha!r}")


class Prediction(NamedTuple):
    """Result of :func:`vote` for a batch of queries.

    Attributes:
        labels: ``[nq]`` int64 predicted labels; ``-1`` for a query without any
            (non-padding) neighbour among its first k.
        scores: ``[nq]`` float64 summed weight of the winning class (0.0 when
            there is no winner). For SOFTMAX the weights are the stabilised ones,
            see :func:`neighbor_weights` (``stable=True``).
    """

    labels: np.ndarray
    scores: np.ndarray


ALL_RULES: tuple[VotingRule, ...] = tuple(VotingRule)


def _check_2d(name: str, array: np.ndarray) -> None:
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D [num_queries, K] array, got shape {array.shape}")


def _valid_mask(distances: np.ndarray,
                labels: np.ndarray | None) -> np.ndarray:
    valid = np.isfinite(distances)
    if labels is not None:
        valid &= labels >= 0
    return valid


def neighbor_weights(
    rule: VotingRule | str,
    distances: np.ndarray,
    *,
    params: VotingParams = VotingParams(),
    entry_weights: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    stable: bool = False,
) -> np.ndarray:
    """Returns the weight of every neighbour under ``rule``.

    Args:
        rule: The voting rule.
        distances: ``[nq, K]`` cosine distances, nearest first per row. Padding is
            ``inf``.
        params: Rule hyper-parameters.
        entry_weights: Optional ``[nq, K]`` non-negative factors multiplied into
            the weights (soft pruning).
        labels: Optional ``[nq, K]`` labels; negative labels mark padding.
        stable: For SOFTMAX only: return ``exp((s_i - s_max) / tau)`` where
            ``s_max`` is the query's best similarity among its non-padding
            neighbours, instead of the exact ``exp(s_i / tau)``. This multiplies
            every weight of a query by the same positive constant, so the winner
            (and the tie order) cannot change, while avoiding overflow for small
            tau. Voting uses ``stable=True``; explanations that show weights should
            use the default exact weights.

    Returns:
        ``[nq, K]`` float64 weights; padding weighs 0.

    Raises:
        ValueError: on bad shapes, NaN distances or negative / non-finite entry
            weights.
    """
    rule = VotingRule.parse(rule)
    distances = np.asarray(distances, dtype=np.float64)
    _check_2d("distances", distances)
    if np.isnan(distances).any():
        raise ValueError("distances contain NaN; use inf to mark padding")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != distances.shape:
            raise ValueError(f"labels shape {labels.shape} != distances shape "
                             f"{distances.shape}")
    valid = _valid_mask(distances, labels)
    # Padded distances are replaced by 0 before any arithmetic so that no
    # inf - inf or overflow warning is raised; their weight is zeroed below.
    d = np.where(valid, distances, 0.0)

    if rule is VotingRule.PLURALITY:
        weights = np.ones_like(d)
    elif rule is VotingRule.DISTANCE:
        weights = np.exp(-d)
    elif rule is VotingRule.SOFTMAX:
        sims = 1.0 - d
        if stable:
            masked = np.where(valid, sims, -np.inf)
            s_max = masked.max(axis=1, keepdims=True, initial=-np.inf)
            s_max = np.where(np.isfinite(s_max), s_max, 0.0)
            weights = np.exp((sims - s_max) / params.softmax_tau)
        else:
            with np.errstate(over="ignore"):
                weights = np.exp(sims / params.softmax_tau)
    elif rule is VotingRule.RANK:
        ranks = np.arange(d.shape[1], dtype=np.float64)
        weights = np.broadcast_to(1.0 / (params.rank_alpha + ranks), d.shape).copy()
    else:  # pragma: no cover - exhaustive over the enum.
        raise AssertionError(rule)

    if entry_weights is not None:
        entry_weights = np.asarray(entry_weights, dtype=np.float64)
        if entry_weights.shape != d.shape:
            raise ValueError(f"entry_weights shape {entry_weights.shape} != "
                             f"distances shape {d.shape}")
        if not np.isfinite(entry_weights).all() or (entry_weights < 0).any():
            raise ValueError(
                "entry_weights must be finite and >= 0 (e.g. soft-pruning gamma); "
                f"got min {np.nanmin(entry_weights)!r}")
        weights = weights * entry_weights
    return np.where(valid, weights, 0.0)


def _previous_same_label(labels: np.ndarray) -> np.ndarray:
    """``prev[q, j]``: the latest position ``< j`` with neighbour j's label.

    -1 when position j is its label's first occurrence. Grouping by label this
    way never allocates a ``[nq, num_classes]`` table.
    """
    nq, num_k = labels.shape
    if labels.size and labels.min() < -1:
        labels = np.maximum(labels, -1)  # All negatives are padding alike.
    positions = np.arange(num_k, dtype=np.int64)
    bits = max(int(num_k - 1).bit_length(), 1)
    if labels.size == 0 or labels.max() < (1 << (62 - bits)):
        # Sorting unique (label, position) keys is a stable sort by label; plain
        # np.sort on int64 is several times faster than a stable argsort.
        keys = ((labels.astype(np.int64) + 1) << bits) | positions
        keys.sort(axis=1)
        order = keys & ((1 << bits) - 1)
        sorted_labels = keys >> bits
    else:  # Huge label values: the packed key would overflow.
        order = np.argsort(labels, axis=1, kind="stable")
        sorted_labels = np.take_along_axis(labels, order, axis=1)
    prev_sorted = np.full((nq, num_k), -1, dtype=np.int64)
    same = sorted_labels[:, 1:] == sorted_labels[:, :-1]
    prev_sorted[:, 1:] = np.where(same, order[:, :-1], -1)
    prev = np.empty_like(prev_sorted)
    np.put_along_axis(prev, order, prev_sorted, axis=1)
    return prev


def _running_class_scores(prev: np.ndarray,
                          weights: np.ndarray) -> np.ndarray:
    """``out[q, j]`` = score of neighbour j's class over positions ``0..j``."""
    nq, num_k = weights.shape
    # Row 0 of ``out_t`` is a zero sentinel for "no earlier neighbour of this
    # class"; position j lives in row j + 1. The transposed layout keeps every
    # per-position slice contiguous.
    out_t = np.zeros((num_k + 1, nq), dtype=np.float64)
    flat = out_t.reshape(-1)
    gather = (prev.T + 1) * nq + np.arange(nq)
    weights_t = np.ascontiguousarray(weights.T)
    # One vectorised step per neighbour position (K steps of O(nq) work). Each
    # class's score is accumulated in neighbour order from 0.0, exactly as a
    # per-query dict would, so exact-equality ties are reproducible.
    for j in range(num_k):
        np.add(weights_t[j], flat[gather[j]], out=out_t[j + 1])
    return out_t[1:].T


def _winners_all_k(labels: np.ndarray, prev: np.ndarray,
                   weights: np.ndarray, valid: np.ndarray,
                   k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Winner label and score at every k = 1..k_max."""
    nq = labels.shape[0]
    running = _running_class_scores(prev[:, :k_max], weights[:, :k_max])
    running = np.where(valid[:, :k_max], running, -np.inf)
    # With non-negative weights no class score ever decreases, so the best
    # score over classes at k equals the running max of ``running`` up to k,
    # and the first position attaining it is where the winner reached it.
    best = np.maximum.accumulate(running, axis=1)
    previous = np.full((nq, k_max), -np.inf)
    previous[:, 1:] = best[:, :-1]
    strictly_better = running > previous
    where = np.where(strictly_better, np.arange(k_max), -1)
    np.maximum.accumulate(where, axis=1, out=where)
    has_winner = where >= 0
    winner = np.take_along_axis(labels[:, :k_max], np.maximum(where, 0), axis=1)
    winner = np.where(has_winner, winner, -1).astype(np.int64)
    score = np.where(has_winner, best, 0.0)
    return winner, score


def _prepare(labels: np.ndarray, distances: np.ndarray,
             entry_weights: np.ndarray | None, num_classes: int | None
             ) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    distances = np.asarray(distances, dtype=np.float64)
    _check_2d("labels", labels)
    if labels.shape != distances.shape:
        raise ValueError(
            f"labels shape {labels.shape} != distances shape {distances.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for "
                         f"num_classes={num_classes} (allowed: -1 for padding, "
                         f"0..{num_classes - 1})")
    if entry_weights is not None and np.shape(entry_weights) != labels.shape:
        raise ValueError(f"entry_weights shape {np.shape(entry_weights)} != "
                         f"labels shape {labels.shape}")
    return labels, distances


def _check_k(name: str, k: int, num_k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ValueError(f"{name} must be an int, got {k!r}")
    if not 1 <= k <= num_k:
        raise ValueError(f"{name}={k} is out of range; allowed 1..{num_k} "
                         f"(the number of neighbours per query)")


def vote(
    labels: np.ndarray,
    distances: np.ndarray,
    *,
    rule: VotingRule | str,
    k: int,
    params: VotingParams = VotingParams(),
    entry_weights: np.ndarray | None = None,
    num_classes: int | None = None,
) -> Prediction:
    """Predicts one label per query from its first ``k`` neighbours.

    Args:
        labels: ``[nq, K]`` int neighbour labels, nearest first; -1 is padding.
        distances: ``[nq, K]`` cosine distances; inf is padding.
        rule: The voting rule.
        k: Number of neighbours that vote, ``1 <= k <= K``.
        params: Rule hyper-parameters.
        entry_weights: Optional ``[nq, K]`` non-negative per-neighbour factors.
        num_classes: Optional; only used to validate labels (no per-class table
            is allocated).

    Returns:
        A :class:`Prediction`. Ties follow the module's first-reached rule.
    """
    labels, distances = _prepare(labels, distances, entry_weights, num_classes)
    _check_k("k", k, labels.shape[1])
    labels, distances = labels[:, :k], distances[:, :k]
    if entry_weights is not None:
        entry_weights = np.asarray(entry_weights)[:, :k]
    rule = VotingRule.parse(rule)
    weights = neighbor_weights(rule, distances, params=params,
                               entry_weights=entry_weights, labels=labels,
                               stable=True)
    valid = _valid_mask(distances, labels)
    prev = _previous_same_label(labels)
    winner, score = _winners_all_k(labels, prev, weights, valid, k)
    return Prediction(labels=winner[:, -1], scores=score[:, -1])


def predict_all_k(
    labels: np.ndarray,
    distances: np.ndarray,
    *,
    rules: Iterable[VotingRule | str] = ALL_RULES,
    k_max: int | None = None,
    params: VotingParams = VotingParams(),
    entry_weights: np.ndarray | None = None,
) -> dict[VotingRule, np.ndarray]:
    """Predicts every query's label for every rule and every k in one pass.

    The work is O(nq * K log K) for grouping neighbours by label plus O(nq * K)
    per rule, independent of the number of classes: no ``[nq, num_classes]``
    table is allocated.

    Args:
        labels: ``[nq, K]`` int neighbour labels, nearest first; -1 is padding.
        distances: ``[nq, K]`` cosine distances; inf is padding.
        rules: Rules to evaluate (default: all four).
        k_max: Largest k, ``1 <= k_max <= K``; default K.
        params: Rule hyper-parameters.
        entry_weights: Optional ``[nq, K]`` non-negative per-neighbour factors.

    Returns:
        ``{rule: preds}`` with ``preds[q, k - 1]`` the label predicted for query
        ``q`` from its first ``k`` neighbours (-1 if none of them is a real
        neighbour); identical to ``vote(..., k=k).labels``.
    """
    labels, distances = _prepare(labels, distances, entry_weights, None)
    num_k = labels.shape[1]
    k_max = num_k if k_max is None else k_max
    _check_k("k_max", k_max, num_k)
    rules = [VotingRule.parse(r) for r in rules]
    labels, distances = labels[:, :k_max], distances[:, :k_max]
    if entry_weights is not None:
        entry_weights = np.asarray(entry_weights)[:, :k_max]
    prev = _previous_same_label(labels)
    valid = _valid_mask(distances, labels)
    out = {}
    for rule in rules:
        weights = neighbor_weights(rule, distances, params=params,
                                   entry_weights=entry_weights, labels=labels,
                                   stable=True)
        out[rule], _ = _winners_all_k(labels, prev, weights, valid, k_max)
    return out


def class_scores(labels_row: np.ndarray | Iterable[int],
                 weights_row: np.ndarray | Iterable[float],
                 k: int) -> dict[int, float]:
    """Per-class scores of one query's first ``k`` neighbours (explanations).

    Args:
        labels_row: ``[K]`` labels of one query's neighbours; negatives are
            padding and are skipped.
        weights_row: ``[K]`` weights, e.g. a row of :func:`neighbor_weights`.
        k: Number of neighbours to include, ``1 <= k <= K``.

    Returns:
        ``{label: score}`` in order of each class's first appearance. Scores are
        summed in neighbour order exactly as :func:`vote` sums them; note that
        among tied classes the winner is the one that *reached* the top score
        first, which need not be the one that appeared first.
    """
    labels_row = np.asarray(labels_row).reshape(-1)
    weights_row = np.asarray(weights_row, dtype=np.float64).reshape(-1)
    if labels_row.shape != weights_row.shape:
        raise ValueError(f"labels_row shape {labels_row.shape} != weights_row "
                         f"shape {weights_row.shape}")
    _check_k("k", k, labels_row.shape[0])
    scores: dict[int, float] = {}
    for label, weight in zip(labels_row[:k].tolist(), weights_row[:k].tolist()):
        if label < 0:
            continue
        scores[int(label)] = scores.get(int(label), 0.0) + weight
    return scores
