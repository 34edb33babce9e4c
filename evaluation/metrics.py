"""Top-1 accuracy of voting predictions as a function of k."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from memory.voting import VotingRule

__all__ = ["AccuracyTable", "accuracy_table", "best_k"]

# {rule name: {k: top-1 accuracy in [0, 1]}}
AccuracyTable = dict[str, dict[int, float]]


def _rule_name(rule: VotingRule | str) -> str:
    return VotingRule.parse(rule).value


def accuracy_table(preds: Mapping[VotingRule | str, np.ndarray],
                   true: np.ndarray) -> AccuracyTable:
    """Top-1 accuracy of every rule at every k.

    Args:
        preds: ``{rule: [n, k_max]}`` predictions as returned by
            ``memory.voting.predict_all_k`` (column ``k - 1`` holds the prediction
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
    table: AccuracyTable = {}
    for rule, p in preds.items():
        p = np.asarray(p)
        if p.ndim != 2 or p.shape[0] != true.shape[0]:
            raise ValueError(f"predictions for {_rule_name(rule)!r} have shape "
                             f"{p.shape}, expected [{true.shape[0]}, k_max]")
        correct = (p == true[:, None]).sum(axis=0)
        table[_rule_name(rule)] = {
            k: float(c) / true.shape[0] for k, c in enumerate(correct.tolist(), 1)
        }
    return table


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
