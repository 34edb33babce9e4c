"""Explanations: one query's decision as its neighbours, their weights and the per-class scores (pure numpy).

Every decision of a visual memory is traceable to the neighbours that voted for it (Geirhos et al. 2024).
:func:`explain` turns one row of a search result into a :class:`Prediction` that shows, for each of the
first ``k`` neighbours, its id, label, distance, source uri and the weight it voted with, plus the summed
score of every class.

The explanation cannot disagree with the vote: the predicted label is :func:`memory.decide.voting.vote`'s own
answer for the same row (same rule, k, params and tie rule: the class that *reached* the top score first
wins), and the weights shown are :func:`memory.decide.voting.neighbor_weights`'s. Weights are the exact ones
(``stable=False``): for SOFTMAX that is ``exp(s_i / tau)`` rather than the per-query rescaled weights
``vote()`` sums internally. Rescaling by one positive constant changes no decision, and the exact values
are comparable across queries.

Example::

    p = explain(["a", "b", "c"], [3, 7, 7], [0.1, 0.2, 0.3], rule=VotingRule.RANK, k=3,
                class_names=names, uris=["gs://x/a.png", "gs://x/b.png", "gs://x/c.png"])
    p.label_name           # names[7]: 1/3 + 1/4 > 1/2
    p.neighbors[0].weight  # 0.5 (rank 0 weighs 1 / (alpha + 0))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from memory.decide.out_of_memory import AbstainReason
from memory.decide.voting import VotingParams, VotingRule, class_scores, neighbor_weights, vote

__all__ = ["Neighbor", "Prediction", "explain", "shown_class_name"]

# Words text output uses for itself (an abstention, a missing answer): a class so named is shown quoted.
_OWN_WORDS = frozenset({"abstained", "unknown", "none", "null"})


def shown_class_name(name: str) -> str:
    """A class name as text output shows it: as is, or quoted (``repr``) where it could be taken for something else.

    A class may be named anything a folder can be. Quoted are: the empty name, one that reads as a number
    (``-1`` would read as the abstention label id; ``nan``, ``1e3``), a word the output uses itself
    (``abstained``, ``unknown``, ``none``, ``null``, any case), and one with leading or trailing blanks,
    quotes, parentheses or characters that do not print.
    """
    try:
        float(name)
        number = True
    except ValueError:
        number = False
    plain = (name and not number and name.strip() == name and name.isprintable()
             and name.lower() not in _OWN_WORDS and not any(c in name for c in "'\"()"))
    return name if plain else repr(name)


@dataclasses.dataclass(frozen=True)
class Neighbor:
    """One retrieved memory entry and the weight it voted with.

    Attributes:
      id: Entry id in the memory.
      label: Index into the memory's class_names.
      label_name: The class name.
      distance: Cosine distance ``1 - <q, x>`` to the query.
      weight: The weight this neighbour voted with (the rule's exact weight, times its entry weight if any).
      uri: Where the entry's image came from (as recorded at build time).
    """
    id: str
    label: int
    label_name: str
    distance: float
    weight: float
    uri: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One query's classification with its explanation.

    Attributes:
      label: Predicted label index (-1 when the query has no neighbour at all, e.g. an empty memory).
      label_name: Predicted class name ("" when the query has no neighbour; None when the memory abstained).
      scores: ``{class name: summed weight}`` of every class among the first k neighbours, in descending
        order of score; the predicted class comes first, and classes with equal scores follow the vote's
        tie rule (the one that reached its score at an earlier neighbour position comes first).
      neighbors: The first k neighbours, nearest first (padding, when k exceeds the memory size, omitted).
        Their position in the tuple is their 0-based rank, the ``i`` of RANK voting.
      rule: The voting rule.
      k: Number of neighbours that voted.
      confidence: How sure the vote is, in [0, 1]: the memory's calibrated probability that it is right when
        the memory carries a calibration for this rule and k (``calibrated``), else the raw share of the
        winner's score (memory.decide.confidence); None when not computed.
      calibrated: Whether ``confidence`` is calibrated.
      abstained: True when the memory gave no answer because ``confidence`` was below the asked threshold;
        ``label`` is then -1, ``label_name`` None (an abstention has no class name, so no class, whatever its
        name, reads as one), and ``vote_label_name`` keeps the vote's class.
      reason: Why the memory abstained, in words ("" when it answered).
      abstain_reason: Why, as a value (memory.decide.out_of_memory.AbstainReason): ``UNLIKE_MEMORY`` when the
        memory's out-of-memory test flags the query, else ``SPLIT_VOTE``; None when it answered.
      out_of_memory_p: The test's p-value (memory.decide.out_of_memory) when the memory's calibration carries
        one for this rule and k, else None.
      vote_label_name: The class the neighbours voted for, whether or not the memory answered with it.
      rerank_reason: With a re-ranker (memory.rerank.base): what happened to this query -- ``answered`` (the
        re-ranker picked ``label_name``), ``margin_above_gate`` (not sent), or a fallback reason (the vote
        stands); "" without a re-ranker.
      rerank_calls: Calls the re-ranker made for this query (retries included; 0 from its cache).
      rerank_detail: A fallback's detail (the invalid answer, the error).
    """
    label: int
    label_name: str | None
    scores: dict[str, float]
    neighbors: tuple[Neighbor, ...]
    rule: VotingRule
    k: int
    confidence: float | None = None
    calibrated: bool = False
    abstained: bool = False
    reason: str = ""
    vote_label_name: str = ""
    rerank_reason: str = ""
    rerank_calls: int = 0
    rerank_detail: str = ""
    abstain_reason: AbstainReason | None = None
    out_of_memory_p: float | None = None

    def top_scores(self, n: int = 5) -> list[tuple[str, float]]:
        """The n best ``(class name, score)`` pairs."""
        return list(self.scores.items())[:n]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (rule by its value; scores as an ordered list of pairs)."""
        return {
            "label": self.label,
            "label_name": self.label_name,
            "scores": [{"label_name": name, "score": score} for name, score in self.scores.items()],
            "neighbors": [n.to_dict() for n in self.neighbors],
            "rule": self.rule.value,
            "k": self.k,
            "confidence": self.confidence,
            "calibrated": self.calibrated,
            "abstained": self.abstained,
            "reason": self.reason,
            "abstain_reason": None if self.abstain_reason is None else self.abstain_reason.value,
            "out_of_memory_p": self.out_of_memory_p,
            "vote_label_name": self.vote_label_name,
            **({"rerank_reason": self.rerank_reason, "rerank_calls": self.rerank_calls,
                "rerank_detail": self.rerank_detail} if self.rerank_reason else {}),
        }


def _row(name: str, values: Any, dtype=None) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one query's [K] row, got shape {arr.shape}")
    return arr


def explain(
    ids: Sequence[str] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    distances: Sequence[float] | np.ndarray,
    *,
    rule: VotingRule | str,
    k: int,
    class_names: Sequence[str],
    uris: Sequence[str] | np.ndarray,
    params: VotingParams = VotingParams(),
    entry_weights: Sequence[float] | np.ndarray | None = None,
    winner: int | None = None,
) -> Prediction:
    """Classifies one query from its neighbours and says why.

    Args:
      ids: ``[K]`` neighbour ids of one query, nearest first (a row of ``SearchResult.ids``).
      labels: ``[K]`` neighbour labels; -1 marks padding.
      distances: ``[K]`` cosine distances; ``inf`` marks padding.
      rule: The voting rule (enum or its name).
      k: Number of neighbours that vote, ``1 <= k <= K``.
      class_names: The memory's label vocabulary; ``labels`` index into it.
      uris: ``[K]`` source uri of each neighbour ("" for padding).
      params: Rule hyper-parameters.
      entry_weights: Optional ``[K]`` non-negative per-neighbour factors (soft pruning), as in ``vote()``.
      winner: The label ``vote()`` chose for this row, when the caller already voted on it (with the same rule,
        k, params and entry weights, e.g. `memory.decide.confidence.vote_confidence`'s ``labels``); None
        votes here.

    Returns:
      The :class:`Prediction`; its ``label`` equals ``vote(labels[None], distances[None], ...)``'s.

    Raises:
      ValueError: naming the bad value, for mismatched row lengths, k out of range, labels outside
        class_names or an unknown rule.
    """
    rule = VotingRule.parse(rule)
    ids_row = _row("ids", ids).astype(str)
    labels_row = _row("labels", labels)
    distances_row = _row("distances", distances, np.float64)
    uris_row = _row("uris", uris).astype(str)
    num_k = labels_row.shape[0]
    if not (ids_row.shape == distances_row.shape == uris_row.shape == (num_k,)):
        raise ValueError(f"ids, labels, distances and uris must have the same length K; got {ids_row.shape[0]}, "
                         f"{num_k}, {distances_row.shape[0]} and {uris_row.shape[0]}")
    if labels_row.size and labels_row.max() >= len(class_names):
        raise ValueError(f"label {int(labels_row.max())} is outside class_names (allowed: -1 for padding, "
                         f"0..{len(class_names) - 1}); pass the class_names of the memory that was searched")
    ew = None if entry_weights is None else _row("entry_weights", entry_weights, np.float64)[None, :]
    if winner is None:
        # vote() validates k, label dtype and shapes, and decides the label: the explanation reuses the decision
        # instead of re-deriving it, so the two cannot diverge even by float rounding.
        decision = vote(labels_row[None, :], distances_row[None, :], rule=rule, k=k, params=params,
                        entry_weights=ew, num_classes=len(class_names))
        winner = int(decision.labels[0])
    labels_k, distances_k = labels_row[:k], distances_row[:k]
    weights = neighbor_weights(rule, distances_k[None, :], params=params, labels=labels_k[None, :],
                               entry_weights=None if ew is None else ew[:, :k], stable=False)[0]
    # A neighbour is padding when its label is negative or its distance is not finite (as in vote()).
    voting_labels = np.where(np.isfinite(distances_k), labels_k, -1)
    per_label = class_scores(voting_labels, weights, k)
    # Where each class reached its final score (its last neighbour with a positive weight): among equal
    # scores vote() picks the class that got there first, and the listing follows the same order.
    reached: dict[int, int] = {}
    for pos, (label, weight) in enumerate(zip(voting_labels.tolist(), weights.tolist())):
        if label >= 0 and (label not in reached or weight > 0):
            reached[label] = pos
    order = sorted(per_label, key=lambda c: (c != winner, -per_label[c], reached[c], c))
    scores = {str(class_names[c]): float(per_label[c]) for c in order}
    neighbors = tuple(
        Neighbor(id=str(ids_row[i]), label=int(labels_k[i]), label_name=str(class_names[labels_k[i]]),
                 distance=float(distances_k[i]), weight=float(weights[i]), uri=str(uris_row[i]))
        for i in range(k) if voting_labels[i] >= 0)
    name = "" if winner < 0 else str(class_names[winner])
    return Prediction(label=winner, label_name=name, scores=scores, neighbors=neighbors, rule=rule, k=int(k),
                      vote_label_name=name)
