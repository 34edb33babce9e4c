"""Tests for evaluation.metrics."""

import numpy as np
import pytest

from evaluation import metrics
from memory.voting import VotingRule


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
