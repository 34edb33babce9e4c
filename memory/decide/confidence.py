"""Confidence of a vote, its calibration on a held-out split, and abstention (pure numpy).

A kNN vote carries its own evidence of how sure it is. For each query, from its first ``k`` neighbours:

==============  ===============================================================================
score           definition
==============  ===============================================================================
``share``       winner's score / sum of all neighbours' weights (1.0 when every neighbour agrees)
``margin``      (winner's score - runner-up's score) / sum of all weights
``similarity``  cosine similarity ``1 - d_0`` of the nearest neighbour (far from everything: low)
``combined``    all three at once (``platt`` only): a logistic fit on their logits
==============  ===============================================================================

Scores use the rule's own weights (``memory.decide.voting.neighbor_weights``, entry weights multiplied in), so
they describe exactly the vote that decided. None of them is a probability. :class:`Calibration` maps one
of them to the probability that the vote is right, fitted on the neighbour lists of a labelled split the
memory never saw (``vmem evaluate`` on it, then ``vmem calibrate``):

* ``isotonic``: the pool-adjacent-violators fit of correct/incorrect against the score, a
  monotone step function (knots stored, linear interpolation between them, flat beyond the ends);
* ``platt``: a logistic fit ``sigmoid(a * logit(score) + b)`` (``similarity`` is rescaled to [0, 1]
  first), two numbers, smoother on small calibration sets. With ``combined`` (the default) it is a logistic regression
  on the logits of share, margin and rescaled similarity: the vote's agreement *and* how close the memory
  is, which is what tells a query of a class the memory has never seen (its neighbours may agree, but they
  are far) from a hard query of a known class.

Fitted on in-memory queries only, that map says how often such a vote is right, not whether the query's
class is in memory at all. A calibration may also carry an out-of-memory test fitted on the same split
(memory.decide.out_of_memory: a neighbour's similarity against the split's own, deep-kNN style); the
confidence stays the fitted map, and abstention also abstains on queries the test flags. Calibrations
without the test work as before.

``abstain_below=P`` then abstains (label -1, no class name) for every query whose calibrated confidence is
below P: with a calibrated score, roughly "answer only when at least P of such answers are right".
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, NamedTuple

import numpy as np

from memory.enums import parse_enum
from memory.decide.out_of_memory import (EntrySimilarities, OutOfMemoryStatistic, OutOfMemoryTest,
                                         fit_out_of_memory_test)
from memory.decide.voting import VotingParams, VotingRule, neighbor_weights, vote

__all__ = ["Calibration", "CalibrationMethod", "ConfidenceScore", "VoteConfidence", "combined_features",
           "fit_calibration", "fit_on_confidence", "isotonic_fit", "platt_fit", "raw_score", "vote_confidence"]

# Scores are clipped this far inside (0, 1) before a logit: a share of exactly 1.0 is common.
_EPS = 1e-4
_COMBINED_NEEDS_PLATT = ("the combined score has three inputs: calibrate it with method platt, or pick one score "
                         "(share, margin or similarity) for isotonic")


class ConfidenceScore(enum.Enum):
    """Which property of the vote measures its confidence."""
    SHARE = "share"
    MARGIN = "margin"
    SIMILARITY = "similarity"
    COMBINED = "combined"

    @classmethod
    def parse(cls, name: str | ConfidenceScore) -> ConfidenceScore:
        return parse_enum(cls, name, "confidence score")


class CalibrationMethod(enum.Enum):
    """How a raw score becomes a probability of being right."""
    ISOTONIC = "isotonic"
    PLATT = "platt"

    @classmethod
    def parse(cls, name: str | CalibrationMethod) -> CalibrationMethod:
        return parse_enum(cls, name, "calibration method")


class VoteConfidence(NamedTuple):
    """Per query: the vote's label (as ``memory.decide.voting.vote``) and its raw confidence scores, all ``[nq]``.

    ``similarity`` is the nearest neighbour's cosine similarity, ``kth_similarity`` the k-th's (the farthest
    live one of the first k when fewer are live): the statistics of memory.decide.out_of_memory. A query without
    any live neighbour has label -1, share 0, margin 0 and both similarities -1.
    """
    labels: np.ndarray
    share: np.ndarray
    margin: np.ndarray
    similarity: np.ndarray
    kth_similarity: np.ndarray


def _top_two_class_scores(labels: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best and second-best per-class score of each row, without a [nq, num_classes] table."""
    order = np.argsort(labels, axis=1, kind="stable")
    sorted_labels = np.take_along_axis(labels, order, axis=1)
    cum = np.cumsum(np.take_along_axis(weights, order, axis=1), axis=1)
    is_end = np.ones(labels.shape, dtype=bool)
    is_end[:, :-1] = sorted_labels[:, 1:] != sorted_labels[:, :-1]
    # Weights are >= 0, so the cumulative sum never decreases and the sum at the previous class's end is
    # the running maximum of the end sums before this position.
    end_sums = np.where(is_end, cum, 0.0)
    before = np.zeros_like(cum)
    before[:, 1:] = np.maximum.accumulate(end_sums, axis=1)[:, :-1]
    totals = np.where(is_end & (sorted_labels >= 0), cum - before, -np.inf)
    if totals.shape[1] == 1:
        return np.maximum(totals[:, 0], 0.0), np.zeros(totals.shape[0])
    top = -np.partition(-totals, 1, axis=1)[:, :2]
    return np.maximum(top[:, 0], 0.0), np.maximum(top[:, 1], 0.0)


def vote_confidence(labels: np.ndarray, distances: np.ndarray, *, rule: VotingRule | str, k: int,
                    params: VotingParams = VotingParams(), entry_weights: np.ndarray | None = None
                    ) -> VoteConfidence:
    """The vote of each query and how confident it is.

    Args:
      labels: ``[nq, K]`` neighbour labels, nearest first; -1 is padding.
      distances: ``[nq, K]`` cosine distances; inf is padding.
      rule: Voting rule.
      k: Neighbours that vote, ``1 <= k <= K``.
      params: Rule hyper-parameters.
      entry_weights: Optional ``[nq, K]`` per-neighbour factors (soft pruning), as in ``vote``.

    Returns:
      A :class:`VoteConfidence`; ``labels`` equals ``vote(...).labels``.
    """
    rule = VotingRule.parse(rule)
    decision = vote(labels, distances, rule=rule, k=k, params=params, entry_weights=entry_weights)
    labels_k = np.asarray(labels)[:, :k].astype(np.int64)
    distances_k = np.asarray(distances, dtype=np.float64)[:, :k]
    ew = None if entry_weights is None else np.asarray(entry_weights, dtype=np.float64)[:, :k]
    # Stable softmax weights: one positive factor per query, which cancels in share and margin.
    weights = neighbor_weights(rule, distances_k, params=params, entry_weights=ew, labels=labels_k, stable=True)
    valid = np.isfinite(distances_k) & (labels_k >= 0)
    labels_k = np.where(valid, labels_k, -1)
    total = weights.sum(axis=1)
    top, second = _top_two_class_scores(labels_k, weights)
    safe = np.where(total > 0, total, 1.0)
    share = np.where(total > 0, top / safe, 0.0)
    margin = np.where(total > 0, (top - second) / safe, 0.0)
    rows = np.arange(distances_k.shape[0])
    has_any = valid.any(axis=1)
    first = np.argmax(valid, axis=1)
    last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)
    similarity = np.where(has_any, 1.0 - np.where(has_any, distances_k[rows, first], 0.0), -1.0)
    kth_similarity = np.where(has_any, 1.0 - np.where(has_any, distances_k[rows, last], 0.0), -1.0)
    return VoteConfidence(labels=decision.labels, share=np.clip(share, 0.0, 1.0), margin=np.clip(margin, 0.0, 1.0),
                          similarity=similarity, kth_similarity=kth_similarity)


def raw_score(confidence: VoteConfidence, score: ConfidenceScore | str) -> np.ndarray:
    """The chosen raw score of every query, float64 ``[nq]`` (for ``combined``: the share, its uncalibrated
    stand-in)."""
    score = ConfidenceScore.parse(score)
    name = "share" if score is ConfidenceScore.COMBINED else score.value
    return np.asarray(getattr(confidence, name), dtype=np.float64)


def combined_features(confidence: VoteConfidence) -> np.ndarray:
    """``[nq, 3]`` logits of share, margin and (similarity + 1) / 2: the inputs of a ``combined`` fit."""
    return np.stack([_logit(np.asarray(confidence.share, np.float64)),
                     _logit(np.asarray(confidence.margin, np.float64)),
                     _logit((np.asarray(confidence.similarity, np.float64) + 1.0) / 2.0)], axis=1)


def _unit_interval(score: ConfidenceScore, x: np.ndarray) -> np.ndarray:
    # Cosine similarity lives in [-1, 1]; the other scores already in [0, 1].
    return (x + 1.0) / 2.0 if score is ConfidenceScore.SIMILARITY else x


def _check_fit_inputs(x: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(correct).reshape(-1)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"scores and correct must be non-empty and of one length, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("scores contain NaN or inf")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("correct must hold booleans (or 0/1)")
    return x, y.astype(np.float64)


def isotonic_fit(x: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: the non-decreasing fit of ``correct`` against ``x`` (least squares).

    Returns:
      ``(knots_x, knots_y)``: increasing x and the fitted, non-decreasing probabilities there; each pooled
      block keeps its lowest and highest x, so ``np.interp(x, knots_x, knots_y)`` reproduces the fit.
    """
    x, y = _check_fit_inputs(x, correct)
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    ux, start, counts = np.unique(xs, return_index=True, return_counts=True)
    sums = np.add.reduceat(ys, start)
    # Blocks as (sum, count, lowest x, highest x); a new block merges backwards while it violates order.
    b_sum, b_n, b_lo, b_hi = [], [], [], []
    for xv, s, n in zip(ux.tolist(), sums.tolist(), counts.tolist()):
        b_sum.append(s), b_n.append(n), b_lo.append(xv), b_hi.append(xv)
        while len(b_sum) > 1 and b_sum[-2] * b_n[-1] >= b_sum[-1] * b_n[-2]:
            s, n, hi = b_sum.pop(), b_n.pop(), b_hi.pop()
            b_lo.pop()
            b_sum[-1] += s
            b_n[-1] += n
            b_hi[-1] = hi
    knots_x, knots_y = [], []
    for s, n, lo, hi in zip(b_sum, b_n, b_lo, b_hi):
        for xv in ((lo,) if lo == hi else (lo, hi)):
            knots_x.append(xv)
            knots_y.append(s / n)
    return np.asarray(knots_x), np.asarray(knots_y)


def _logistic_fit(features: np.ndarray, y: np.ndarray, *, iterations: int = 50) -> np.ndarray:
    """Weights (then the bias) of a logistic regression by Newton's method, with a 1e-6 ridge that keeps the
    fit finite on separable data (every confident vote right, say)."""
    x = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
    w = np.zeros(x.shape[1])
    ridge = 1e-6 * np.eye(x.shape[1])
    for _ in range(iterations):
        p = _sigmoid(x @ w)
        step = np.linalg.solve((x * (p * (1 - p))[:, None]).T @ x + ridge, x.T @ (p - y) + ridge @ w)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def platt_fit(x: np.ndarray, correct: np.ndarray, *, iterations: int = 50) -> tuple[float, float]:
    """Logistic regression of ``correct`` on ``logit(x)`` (x in [0, 1]).

    Returns:
      ``(a, b)`` of ``p = sigmoid(a * logit(x) + b)``.
    """
    x, y = _check_fit_inputs(x, correct)
    a, b = _logistic_fit(_logit(x)[:, None], y, iterations=iterations)
    return float(a), float(b)


def _logit(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, _EPS, 1 - _EPS)
    return np.log(x) - np.log1p(-x)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # Overflow-free form of 1 / (1 + exp(-z)).


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A fitted map from one raw vote score to P(vote is right), for one rule, k and rule parameters.

    Attributes:
      method: Isotonic or Platt.
      score: The raw score it calibrates.
      rule, k, softmax_tau, rank_alpha: The vote it was fitted for; applying it to another vote is refused.
      knots_x, knots_y: Isotonic fit (increasing x, non-decreasing y); empty for Platt.
      a, b: Platt coefficients; 0 for isotonic.
      coefficients: For the ``combined`` score: the weights of the share, margin and similarity logits,
        then the bias.
      queries: Size of the calibration split; accuracy: its accuracy (the base rate).
      fitted_on_version: The memory version whose neighbours it was fitted on (None when unknown).
      source: Where the calibration neighbours came from (free text, e.g. the evaluation directory).
      out_of_memory: The out-of-memory test fitted on the same split (memory.decide.out_of_memory), or None
        (a calibration without one: abstention reads the confidence alone).
    """
    method: CalibrationMethod
    score: ConfidenceScore
    rule: VotingRule
    k: int
    softmax_tau: float
    rank_alpha: float
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()
    a: float = 0.0
    b: float = 0.0
    coefficients: tuple[float, ...] = ()
    queries: int = 0
    accuracy: float = 0.0
    fitted_on_version: int | None = None
    source: str = ""
    out_of_memory: OutOfMemoryTest | None = None

    def __post_init__(self):
        if self.out_of_memory is not None and not isinstance(self.out_of_memory, OutOfMemoryTest):
            raise ValueError(f"out_of_memory must be an OutOfMemoryTest or None, got "
                             f"{type(self.out_of_memory).__name__}")
        if self.score is ConfidenceScore.COMBINED:
            if self.method is not CalibrationMethod.PLATT:
                raise ValueError(_COMBINED_NEEDS_PLATT)
            if len(self.coefficients) != 4 or not np.isfinite(self.coefficients).all():
                raise ValueError(f"a combined calibration needs 4 finite coefficients, got {self.coefficients!r}")
        elif self.method is CalibrationMethod.ISOTONIC:
            xs, ys = np.asarray(self.knots_x, dtype=np.float64), np.asarray(self.knots_y, dtype=np.float64)
            if xs.size == 0 or xs.shape != ys.shape or (np.diff(xs) < 0).any() or (np.diff(ys) < -1e-12).any() \
                    or not np.isfinite(xs).all() or (ys < 0).any() or (ys > 1).any():
                raise ValueError("isotonic calibration needs non-empty, equally long knots_x (non-decreasing) "
                                 f"and knots_y (non-decreasing, in [0, 1]); got {len(self.knots_x)} and "
                                 f"{len(self.knots_y)} knots")
        elif not (np.isfinite(self.a) and np.isfinite(self.b)):
            raise ValueError(f"platt calibration needs finite a and b, got {self.a!r}, {self.b!r}")

    @property
    def params(self) -> VotingParams:
        return VotingParams(softmax_tau=self.softmax_tau, rank_alpha=self.rank_alpha)

    def describe(self) -> str:
        """One line: what is calibrated, how, and on what."""
        on = "" if self.fitted_on_version is None else f", fitted on version {self.fitted_on_version}"
        ood = "" if self.out_of_memory is None else f"; {self.out_of_memory.describe()}"
        return (f"{self.method.value} on {self.score.value} of rule {self.rule.value}, k {self.k} "
                f"({self.queries} held-out queries, accuracy {100 * self.accuracy:.2f}%{on}){ood}")

    def matches(self, rule: VotingRule | str, k: int, params: VotingParams) -> bool:
        """Whether this calibration was fitted for that vote."""
        return (VotingRule.parse(rule) is self.rule and int(k) == self.k
                and params == self.params)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the raw scores (any shape), in [0, 1]; ``[n, 3]`` `combined_features`
        for the combined score."""
        raw = np.asarray(raw, dtype=np.float64)
        if self.score is ConfidenceScore.COMBINED:
            if raw.ndim != 2 or raw.shape[1] != 3:
                raise ValueError(f"the combined score needs [n, 3] combined_features, got shape {raw.shape}")
            return _sigmoid(raw @ np.asarray(self.coefficients[:3]) + self.coefficients[3])
        if self.method is CalibrationMethod.ISOTONIC:
            return np.interp(raw, np.asarray(self.knots_x), np.asarray(self.knots_y))
        return _sigmoid(self.a * _logit(_unit_interval(self.score, raw)) + self.b)

    def confidence(self, vc: VoteConfidence) -> np.ndarray:
        """Calibrated confidence of each query of a :class:`VoteConfidence`."""
        if self.score is ConfidenceScore.COMBINED:
            return self.apply(combined_features(vc))
        return self.apply(raw_score(vc, self.score))

    def out_of_memory_p(self, vc: VoteConfidence, neighbor_ids: np.ndarray | None = None) -> np.ndarray | None:
        """Each query's out-of-memory p-value (memory.decide.out_of_memory), or None without the test.

        Args:
          vc: The queries' votes.
          neighbor_ids: ``[nq, >= k]`` their neighbours' entry ids (the ``kth_relative`` test reads them).
        """
        return None if self.out_of_memory is None else self.out_of_memory.p_values(vc, neighbor_ids)

    def to_dict(self) -> dict[str, Any]:
        # Field by field: the test (with its entry table) is serialized by its own to_dict.
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "out_of_memory"}
        d.update(method=self.method.value, score=self.score.value, rule=self.rule.value,
                 knots_x=list(self.knots_x), knots_y=list(self.knots_y), coefficients=list(self.coefficients))
        # Without a test the dict is what calibrations without one always stored.
        if self.out_of_memory is not None:
            d["out_of_memory"] = self.out_of_memory.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        """Parses :meth:`to_dict` output; ValueError names a missing or bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"calibration must be an object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"calibration has unknown field(s) {unknown}; allowed: {sorted(fields)}")
        try:
            return cls(**{**d, "method": CalibrationMethod.parse(d["method"]),
                          "score": ConfidenceScore.parse(d["score"]), "rule": VotingRule.parse(d["rule"]),
                          "knots_x": tuple(float(v) for v in d.get("knots_x", ())),
                          "knots_y": tuple(float(v) for v in d.get("knots_y", ())),
                          "coefficients": tuple(float(v) for v in d.get("coefficients", ())),
                          "out_of_memory": None if d.get("out_of_memory") is None
                          else OutOfMemoryTest.from_dict(d["out_of_memory"])})
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed calibration ({type(e).__name__}: {e})") from None


def fit_calibration(labels: np.ndarray, distances: np.ndarray, true: np.ndarray, *, rule: VotingRule | str,
                    k: int, params: VotingParams = VotingParams(), entry_weights: np.ndarray | None = None,
                    **options) -> Calibration:
    """Fits a calibration on the neighbour lists of a labelled held-out split.

    Args:
      labels, distances, entry_weights: ``[n, K]`` neighbour arrays of the held-out queries (as
        ``evaluation.neighbors_io.to_arrays`` gives them).
      true: ``[n]`` true labels (-1 for a class the memory does not know: the vote is then always wrong).
      rule, k, params: The vote to calibrate.
      **options: ``method``, ``score``, ``fitted_on_version``, ``source``: see `fit_on_confidence`.

    Raises:
      ValueError: on empty or mismatched inputs, or bad names.
    """
    vc = vote_confidence(labels, distances, rule=rule, k=k, params=params, entry_weights=entry_weights)
    return fit_on_confidence(vc, true, rule=rule, k=k, params=params, **options)


def fit_on_confidence(vc: VoteConfidence, true: np.ndarray, *, rule: VotingRule | str, k: int,
                      params: VotingParams = VotingParams(),
                      method: CalibrationMethod | str = CalibrationMethod.PLATT,
                      score: ConfidenceScore | str = ConfidenceScore.COMBINED, fitted_on_version: int | None = None,
                      source: str = "", out_of_memory_level: float | None = None,
                      out_of_memory_statistic: OutOfMemoryStatistic | str = OutOfMemoryStatistic.NEAREST,
                      neighbor_ids: np.ndarray | None = None, entries: EntrySimilarities | None = None
                      ) -> Calibration:
    """`fit_calibration` on an already computed `vote_confidence` of the same rule, k and params.

    Args:
      vc: The held-out queries' votes and raw scores.
      true: ``[n]`` true labels (-1: a class the memory does not know).
      rule, k, params: The vote ``vc`` was computed for (recorded in the fit).
      method, score: See the module docstring.
      fitted_on_version, source: Recorded with the fit.
      out_of_memory_level: Also fit an out-of-memory test at this level (memory.decide.out_of_memory, e.g.
        its ``DEFAULT_LEVEL``) on the neighbour similarities of the queries with a known class (true >= 0);
        None fits none.
      out_of_memory_statistic: What the test compares.
      neighbor_ids, entries: ``kth_relative`` only: ``[n, >= k]`` the held-out queries' neighbour ids and the
        memory's `memory.decide.out_of_memory.EntrySimilarities`.
    """
    rule, method, score = VotingRule.parse(rule), CalibrationMethod.parse(method), ConfidenceScore.parse(score)
    true = np.asarray(true)
    if true.shape != vc.labels.shape:
        raise ValueError(f"true has shape {true.shape}, expected [{vc.labels.shape[0]}] (one label per query)")
    correct = (vc.labels == true) & (true >= 0)
    raw = raw_score(vc, score)
    common = dict(method=method, score=score, rule=rule, k=int(k), softmax_tau=params.softmax_tau,
                  rank_alpha=params.rank_alpha, queries=int(true.size), accuracy=float(correct.mean()),
                  fitted_on_version=fitted_on_version, source=source,
                  out_of_memory=_fit_test(vc, true, out_of_memory_level, out_of_memory_statistic, neighbor_ids,
                                          entries))
    if score is ConfidenceScore.COMBINED:
        if method is not CalibrationMethod.PLATT:
            raise ValueError(_COMBINED_NEEDS_PLATT)
        features = combined_features(vc)
        _check_fit_inputs(features[:, 0], correct)
        weights = _logistic_fit(features, correct.astype(np.float64))
        return Calibration(coefficients=tuple(float(w) for w in weights), **common)
    if method is CalibrationMethod.ISOTONIC:
        kx, ky = isotonic_fit(raw, correct)
        return Calibration(knots_x=tuple(kx.tolist()), knots_y=tuple(ky.tolist()), **common)
    a, b = platt_fit(_unit_interval(score, raw), correct)
    return Calibration(a=a, b=b, **common)


def _fit_test(vc: VoteConfidence, true: np.ndarray, level: float | None, statistic: OutOfMemoryStatistic | str,
              neighbor_ids: np.ndarray | None, entries: EntrySimilarities | None) -> OutOfMemoryTest | None:
    if level is None:
        return None
    known = true >= 0  # A query of a class the memory does not know is no sample of the in-memory null.
    if not known.any():
        raise ValueError("the out-of-memory test needs calibration queries of classes the memory holds; every "
                         "query has true label -1")
    statistic = OutOfMemoryStatistic.parse(statistic)
    neighbor_kth = None
    if statistic.needs_entries:
        if neighbor_ids is None or entries is None:
            raise ValueError(f"the {statistic.value} out-of-memory test needs the held-out queries' neighbour ids "
                             "and the memory's entry similarities (evaluation.calibration.entry_similarities)")
        neighbor_kth = entries.lookup(np.asarray(neighbor_ids)[known, :entries.k])
    return fit_out_of_memory_test(statistic.of(vc)[known], level=level, statistic=statistic,
                                  neighbor_kth=neighbor_kth, entries=entries)


def memory_calibration(manifest, *, root: str | None = None) -> Calibration | None:
    """The calibration a memory version carries (``Manifest.calibration``), or None.

    Args:
      manifest: The version's manifest.
      root: The memory's root: reads the entry similarities a ``kth_relative`` out-of-memory test needs (checked
        against their sha256). Without it such a test cannot score a query.

    Raises:
      ValueError: naming the memory version, when the stored calibration or its entry similarities are
        malformed or changed.
    """
    if manifest.calibration is None:
        return None
    try:
        calibration = Calibration.from_dict(manifest.calibration)
        test = calibration.out_of_memory
        if root is not None and test is not None and test.entries is not None:
            calibration = dataclasses.replace(calibration, out_of_memory=test.with_entries(
                _read_entries(root, test.entries)))
        return calibration
    except ValueError as e:
        raise ValueError(f"version {manifest.version}: {e}; re-run `vmem calibrate`") from None


def _read_entries(root: str, ref) -> EntrySimilarities:
    from memory import storage  # pylint: disable=g-import-not-at-top
    path = storage.join(root, ref.path)
    try:
        # A classify reads the calibration each call: the checked table is reused while the file is untouched.
        return _read_checked_entries(path, ref, storage.modified_time(path))
    except FileNotFoundError:
        raise ValueError(f"entry similarity file {ref.path} is missing under {root}") from None


@functools.lru_cache(maxsize=4)
def _read_checked_entries(path: str, ref, modified: float) -> EntrySimilarities:
    del modified  # Part of the cache key only: a rewritten file is read and checked again.
    from memory import storage  # pylint: disable=g-import-not-at-top
    return EntrySimilarities.from_bytes(storage.read_bytes(path), ref)


def publish_calibration(root: str, calibration: Calibration, *, expected_version: int | None = None):
    """Publishes the next version of the memory at ``root`` carrying ``calibration`` (replacing any earlier one).

    Args:
      root: Memory root (local or ``gs://``).
      calibration: The fit; its ``fitted_on_version`` should be the version the neighbours were searched in.
      expected_version: The version to build on (default: the latest); ConcurrentUpdateError otherwise.

    Returns:
      The published Manifest.
    """
    from memory import storage  # pylint: disable=g-import-not-at-top
    from memory.store.versions import publish_version, read_base_version  # pylint: disable=g-import-not-at-top
    base, manifest = read_base_version(root, expected_version)
    test = calibration.out_of_memory
    if test is not None and test.entries is not None:
        if test.entry_table is None:
            raise ValueError("the calibration's out-of-memory test has no entry similarities to store; fit it with "
                             "entries (evaluation.calibration.fit_from_evaluation does)")
        # Written before the version that names it, as every file a version references.
        storage.write_bytes(storage.join(root, test.entries.path), test.entry_table.to_bytes())
    change = {"kind": "calibrate", "summary": f"confidence calibration: {calibration.describe()}",
              "method": calibration.method.value, "score": calibration.score.value, "rule": calibration.rule.value,
              "k": calibration.k, "queries": calibration.queries}
    return publish_version(root, dataclasses.replace(manifest, calibration=calibration.to_dict(), change=change),
                           expected_parent=base)
