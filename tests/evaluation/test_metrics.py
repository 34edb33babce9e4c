"""Tests for evaluation.metrics."""

import numpy as np
import pytest

from evaluation import metrics
from memory.decide.voting import VotingRule


def test_accuracy_table_values():
    true = np.array([0, 1, 2, 1])
    preds = {
        VotingRule.RANK: np.array([[0, 0], [1, 0], [2, 2], [0, 1]]),
        "plurality": np.array([[0, 1], [-1, 1], [1, 2], [0, 0]]),
    }
    table = metrics.accuracy_table(preds, true)
    assert table == {"rank": {1: 0.75, 2: 0.75}, "plurality": {1: 0.25, 2: 0.5}}


def test_accuracy_table_errors():
    with pytest.raises(ValueError, match="non-empty"):
        metrics.accuracy_table({"rank": np.zeros((0, 1), int)}, np.zeros(0, int))
    with pytest.raises(ValueError, match=r"'rank' have shape \(3, 2\), "
                       r"expected \[2, k_max\]"):
        metrics.accuracy_table({"rank": np.zeros((3, 2), int)}, np.zeros(2, int))
    with pytest.raises(ValueError, match="unknown voting rule 'vote'"):
        metrics.accuracy_table({"vote": np.zeros((2, 2), int)}, np.zeros(2, int))


def test_best_k_prefers_smallest_k_on_ties():
    table = {"rank": {1: 0.5, 2: 0.75, 3: 0.75}, "softmax": {1: 0.9, 2: 0.1}}
    assert metrics.best_k(table) == {"rank": {"k": 2, "accuracy": 0.75},
                                     "softmax": {"k": 1, "accuracy": 0.9}}


def test_correct_counts_summed_over_batches_equal_the_whole_table():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, size=103)
    preds = {"rank": rng.integers(-1, 5, size=(103, 7)), "softmax": rng.integers(-1, 5, size=(103, 7))}
    whole = metrics.accuracy_table(preds, true)
    cuts = [0, 10, 11, 60, 103]
    parts = [metrics.CorrectCounts.of({r: p[a:b] for r, p in preds.items()}, true[a:b])
             for a, b in zip(cuts, cuts[1:])]
    summed = metrics.CorrectCounts.sum(reversed(parts))  # Order does not matter.
    assert summed.queries == 103
    assert summed.table() == whole


def test_correct_counts_unknown_true_label_is_never_correct():
    # -1 = a query class the memory does not know; -1 = no prediction. They must not "match".
    counts = metrics.CorrectCounts.of({"rank": np.array([[-1, -1], [1, 1]])}, np.array([-1, 1]))
    assert counts.correct["rank"].tolist() == [1, 1]
    assert counts.table() == {"rank": {1: 0.5, 2: 0.5}}


def test_correct_counts_errors():
    a = metrics.CorrectCounts.of({"rank": np.zeros((2, 3), int)}, np.zeros(2, int))
    b = metrics.CorrectCounts.of({"rank": np.zeros((2, 4), int)}, np.zeros(2, int))
    with pytest.raises(ValueError, match="cannot add counts"):
        metrics.CorrectCounts.sum([a, b])
    with pytest.raises(ValueError, match="at least one part"):
        metrics.CorrectCounts.sum([])
    with pytest.raises(ValueError, match="no queries"):
        metrics.CorrectCounts.of({"rank": np.zeros((0, 3), int)}, np.zeros(0, int)).table()
