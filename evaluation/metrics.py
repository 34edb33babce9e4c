"""Top-1 accuracy of voting predictions as a function of k."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from memory.decide.voting import VotingRule

__all__ = ["AccuracyTable", "CorrectCounts", "accuracy_table", "best_k"]

# {rule name: {k: top-1 accuracy in [0, 1]}}
AccuracyTable = dict[str, dict[int, float]]


def _rule_name(rule: VotingRule | str) -> str:
    return VotingRule.parse(rule).value


@dataclasses.dataclass(frozen=True)
class CorrectCounts:
    """How many queries each rule got right at each k: an accuracy table that can be summed.

    A distributed evaluation votes each batch of queries where it is and sums these counts (a Beam
    CombineFn can merge them in any order), instead of gathering every neighbour list into one worker.

    Attributes:
        queries: Number of queries counted.
        correct: ``{rule name: int64 [k_max]}``, entry ``k - 1`` = queries whose prediction from their
            first k neighbours equals the true label.
    """
    queries: int
    correct: Mapping[str, np.ndarray]

    @classmethod
    def of(cls, preds: Mapping[VotingRule | str, np.ndarray], true: np.ndarray) -> CorrectCounts:
        """Counts one batch.

        Args:
            preds: ``{rule: [n, k_max]}`` predictions as returned by ``memory.decide.voting.predict_all_k``
                (column ``k - 1`` holds the prediction from the first k neighbours; -1 means no prediction
                and is wrong).
            true: ``[n]`` ground-truth labels (-1 for a class the memory does not know: always wrong).

        Raises:
            ValueError: if shapes disagree.
        """
        true = np.asarray(true)
        if true.ndim != 1:
            raise ValueError(f"true must be a 1-D label array, got shape {true.shape}")
        correct = {}
        for rule, p in preds.items():
            p = np.asarray(p)
            if p.ndim != 2 or p.shape[0] != true.shape[0]:
                raise ValueError(f"predictions for {_rule_name(rule)!r} have shape "
                                 f"{p.shape}, expected [{true.shape[0]}, k_max]")
            correct[_rule_name(rule)] = ((p == true[:, None]) & (true[:, None] >= 0)).sum(axis=0).astype(np.int64)
        return cls(queries=int(true.shape[0]), correct=correct)

    @classmethod
    def sum(cls, parts: Iterable[CorrectCounts]) -> CorrectCounts:
        """Adds counts of disjoint query sets (same rules and k_max).

        Raises:
            ValueError: on no parts, or parts with different rules or k_max.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("CorrectCounts.sum needs at least one part")
        first = parts[0]
        correct = {rule: np.array(c, dtype=np.int64) for rule, c in first.correct.items()}
        for part in parts[1:]:
            if set(part.correct) != set(correct) or any(
                    np.shape(part.correct[r]) != correct[r].shape for r in correct):
                raise ValueError(
                    f"cannot add counts for rules/k_max {_shapes(part)} to counts for {_shapes(first)}")
            for rule in correct:
                correct[rule] += part.correct[rule]
        return cls(queries=sum(p.queries for p in parts), correct=correct)

    @property
    def k_max(self) -> int:
        """The largest k counted (0 when no rule is)."""
        return max((int(np.size(c)) for c in self.correct.values()), default=0)

    def widened(self, k_max: int) -> CorrectCounts:
        """These counts extended to ``k_max`` by repeating each rule's count at the largest k.

        Only for queries none of whose neighbour lists is longer than ``self.k_max``: beyond its list a query's
        vote no longer changes (padding never votes), so its vote at any larger k is its vote at ``self.k_max``.

        Raises:
            ValueError: if ``k_max`` is below the k already counted.
        """
        if k_max < self.k_max:
            raise ValueError(f"cannot widen counts for k up to {self.k_max} to k_max {k_max}")
        return CorrectCounts(queries=self.queries, correct={
            rule: np.concatenate([c, np.repeat(np.asarray(c, dtype=np.int64)[-1:], k_max - np.size(c))])
            for rule, c in self.correct.items()})

    def table(self) -> AccuracyTable:
        """``{rule name: {k: accuracy}}`` with accuracy in [0, 1].

        Raises:
            ValueError: if no query was counted.
        """
        if self.queries <= 0:
            raise ValueError("no queries were counted; accuracy is undefined")
        return {rule: {k: float(c) / self.queries for k, c in enumerate(np.asarray(counts).tolist(), 1)}
                for rule, counts in self.correct.items()}


def _shapes(counts: CorrectCounts) -> dict[str, int]:
    return {rule: int(np.size(c)) for rule, c in counts.correct.items()}


def accuracy_table(preds: Mapping[VotingRule | str, np.ndarray],
                   true: np.ndarray) -> AccuracyTable:
    """Top-1 accuracy of every rule at every k (``CorrectCounts.of(preds, true).table()``).

    Args:
        preds: ``{rule: [n, k_max]}`` predictions as returned by
            ``memory.decide.voting.predict_all_k`` (column ``k - 1`` holds the prediction
            from the first k neighbours; -1 means no prediction and is wrong).
        true: ``[n]`` ground-truth labels.

    Returns:
        ``{rule name: {k: accuracy}}`` with k = 1..k_max and accuracy in [0, 1].

    Raises:
        ValueError: if there are no queries or shapes disagree.
    """
    true = np.asarray(true)
    if true.ndim != 1 or true.shape[0] == 0:
        raise ValueError(
            f"true must be a non-empty 1-D label array, got shape {true.shape}")
    return CorrectCounts.of(preds, true).table()


def best_k(table: Mapping[str, Mapping[int, float]]
           ) -> dict[str, dict[str, float | int]]:
    """The best k per rule; ties go to the smallest k.

    Returns:
        ``{rule name: {"k": k, "accuracy": accuracy}}``.
    """
    out = {}
    for rule, by_k in table.items():
        if not by_k:
            raise ValueError(f"no accuracies for rule {rule!r}")
        k, acc = min(((int(k), a) for k, a in by_k.items()),
                     key=lambda ka: (-ka[1], ka[0]))
        out[rule] = {"k": k, "accuracy": acc}
    return out
