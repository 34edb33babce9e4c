"""Tests for memory.decide.voting: hand-computed values and a naive reference."""

import math

import numpy as np
import pytest

from memory.decide import voting
from memory.decide.voting import VotingParams, VotingRule

A, B, C = 0, 1, 2


def _naive_vote(labels_row, weights_row, k):
    """Per-query dict reference with an independent tie formulation.

    The winner is, among classes with the maximal score over the first k
    neighbours, the one whose running sum first reached that score.
    """
    scores = {}
    reached_at = {}
    for j in range(k):
        label = int(labels_row[j])
        if label < 0:
            continue
        scores[label] = scores.get(label, 0.0) + float(weights_row[j])
    if not scores:
        return -1, 0.0
    top = max(scores.values())
    running = {}
    for j in range(k):
        label = int(labels_row[j])
        if label < 0:
            continue
        running[label] = running.get(label, 0.0) + float(weights_row[j])
        if running[label] == top and label not in reached_at:
            reached_at[label] = j
    winner = min(reached_at, key=reached_at.get)
    return winner, top


def _random_inputs(rng, nq, num_k, num_classes, pad_fraction=0.0,
                   with_entry_weights=False):
    labels = rng.integers(0, num_classes, size=(nq, num_k))
    distances = np.sort(rng.uniform(0.0, 2.0, size=(nq, num_k)), axis=1)
    # Short lists are padded at the end, as neighbors_io.to_arrays does.
    lengths = rng.integers(0, num_k + 1, size=nq)
    pad = (np.arange(num_k)[None, :] >= lengths[:, None]) & (
        rng.uniform(size=(nq, 1)) < pad_fraction)
    labels = np.where(pad, -1, labels)
    distances = np.where(pad, np.inf, distances)
    entry_weights = None
    if with_entry_weights:
        # Soft-pruning style factors, including exact zeros.
        v = rng.integers(0, 4, size=(nq, num_k))
        entry_weights = np.where(v >= 1, 1.75 / (1 + v), 1.0)
        entry_weights[rng.uniform(size=(nq, num_k)) < 0.05] = 0.0
    return labels, distances, entry_weights


class TestNeighborWeights:

    def test_rank_weights_are_zero_based(self):
        w = voting.neighbor_weights(VotingRule.RANK, np.zeros((1, 4)))
        np.testing.assert_array_equal(w, [[1 / 2, 1 / 3, 1 / 4, 1 / 5]])

    def test_rank_alpha(self):
        w = voting.neighbor_weights("rank", np.zeros((1, 2)),
                                    params=VotingParams(rank_alpha=1.0))
        np.testing.assert_array_equal(w, [[1.0, 1 / 2]])

    def test_plurality(self):
        w = voting.neighbor_weights(VotingRule.PLURALITY, np.array([[0.1, 1.5]]))
        np.testing.assert_array_equal(w, [[1.0, 1.0]])

    def test_distance(self):
        d = np.array([[0.0, 0.25, 1.0]])
        w = voting.neighbor_weights(VotingRule.DISTANCE, d)
        np.testing.assert_allclose(w, [[1.0, math.exp(-0.25), math.exp(-1.0)]],
                                   rtol=1e-15)

    def test_softmax_exact(self):
        d = np.array([[0.1, 0.3]])
        w = voting.neighbor_weights(VotingRule.SOFTMAX, d)
        np.testing.assert_allclose(
            w, [[math.exp(0.9 / 0.07), math.exp(0.7 / 0.07)]], rtol=1e-13)

    def test_softmax_tau(self):
        w = voting.neighbor_weights(VotingRule.SOFTMAX, np.array([[0.5]]),
                                    params=VotingParams(softmax_tau=0.5))
        np.testing.assert_allclose(w, [[math.e]], rtol=1e-15)

    def test_softmax_stable_is_row_rescaled(self):
        d = np.array([[0.1, 0.3, np.inf], [0.6, 0.6, 0.9]])
        exact = voting.neighbor_weights(VotingRule.SOFTMAX, d)
        stable = voting.neighbor_weights(VotingRule.SOFTMAX, d, stable=True)
        np.testing.assert_allclose(stable[0], [1.0, math.exp(-0.2 / 0.07), 0.0],
                                   rtol=1e-13)
        np.testing.assert_allclose(stable[1], [1.0, 1.0, math.exp(-0.3 / 0.07)],
                                   rtol=1e-13)
        np.testing.assert_allclose(stable[0, :2] * math.exp(0.9 / 0.07),
                                   exact[0, :2], rtol=1e-13)

    def test_softmax_stable_no_overflow_for_tiny_tau(self):
        params = VotingParams(softmax_tau=1e-4)
        w = voting.neighbor_weights(VotingRule.SOFTMAX, np.array([[0.0, 0.001]]),
                                    params=params, stable=True)
        np.testing.assert_allclose(w, [[1.0, math.exp(-10.0)]], rtol=1e-12)

    def test_entry_weights_multiply(self):
        d = np.array([[0.2, 0.4, 0.5]])
        gamma = np.array([[1.0, 1.75 / 3, 0.0]])
        for rule in VotingRule:
            plain = voting.neighbor_weights(rule, d)
            scaled = voting.neighbor_weights(rule, d, entry_weights=gamma)
            np.testing.assert_array_equal(scaled, plain * gamma)

    def test_padding_weighs_zero(self):
        d = np.array([[0.1, np.inf, 0.3]])
        labels = np.array([[4, 5, -1]])
        for rule in VotingRule:
            w = voting.neighbor_weights(rule, d, labels=labels)
            assert w[0, 0] > 0
            assert w[0, 1] == 0.0
            assert w[0, 2] == 0.0

    @pytest.mark.parametrize("bad", [-0.5, np.nan, np.inf])
    def test_bad_entry_weights(self, bad):
        with pytest.raises(ValueError, match="entry_weights must be finite"):
            voting.neighbor_weights(VotingRule.RANK, np.zeros((1, 2)),
                                    entry_weights=np.array([[1.0, bad]]))

    def test_nan_distance_rejected(self):
        with pytest.raises(ValueError, match="NaN"):
            voting.neighbor_weights(VotingRule.RANK, np.array([[0.1, np.nan]]))

    @pytest.mark.parametrize("field,value", [("softmax_tau", 0.0),
                                             ("rank_alpha", -1.0)])
    def test_bad_params(self, field, value):
        with pytest.raises(ValueError, match=field):
            VotingParams(**{field: value})

    def test_unknown_rule_names_allowed(self):
        with pytest.raises(ValueError, match=r"'borda'.*plurality, distance, "
                           r"softmax, rank"):
            VotingRule.parse("borda")
        assert VotingRule.parse(" Rank ") is VotingRule.RANK


class TestVote:

    def test_rank_hand_computed(self):
        labels = np.array([[A, B, B]])
        d = np.array([[0.1, 0.2, 0.3]])
        pred = voting.vote(labels, d, rule=VotingRule.RANK, k=3)
        assert pred.labels.tolist() == [B]
        assert pred.scores[0] == 1 / 3 + 1 / 4
        assert pred.scores[0] == pytest.approx(0.58333333333)
        pred2 = voting.vote(labels, d, rule=VotingRule.RANK, k=2)
        assert pred2.labels.tolist() == [A]
        assert pred2.scores[0] == 0.5

    def test_plurality_tie_first_reached(self):
        d = np.array([[0.1, 0.2]])
        pred = voting.vote(np.array([[A, B]]), d, rule="plurality", k=2)
        assert pred.labels.tolist() == [A]
        assert pred.scores.tolist() == [1.0]
        pred = voting.vote(np.array([[B, A]]), d, rule="plurality", k=2)
        assert pred.labels.tolist() == [B]

    def test_plurality_tie_reached_first_not_appeared_first(self):
        # A appears first, but B reaches 2 votes at position 2, A only at 3.
        labels = np.array([[A, B, B, A]])
        d = np.array([[0.1, 0.2, 0.3, 0.4]])
        pred = voting.vote(labels, d, rule=VotingRule.PLURALITY, k=4)
        assert pred.labels.tolist() == [B]
        assert pred.scores.tolist() == [2.0]

    def test_distance_hand_computed(self):
        labels = np.array([[A, B, B]])
        d = np.array([[0.0, 0.5, 0.6]])
        pred = voting.vote(labels, d, rule=VotingRule.DISTANCE, k=3)
        # A: 1, B: exp(-0.5) + exp(-0.6) = 1.1553.
        assert pred.labels.tolist() == [B]
        assert pred.scores[0] == pytest.approx(math.exp(-0.5) + math.exp(-0.6),
                                               rel=1e-15)

    def test_softmax_hand_computed(self):
        labels = np.array([[A, B, B]])
        d = np.array([[0.10, 0.15, 0.16]])
        # exact: A exp(0.9/0.07); B exp(0.85/0.07) + exp(0.84/0.07).
        # relative to A: B = exp(-0.05/0.07) + exp(-0.06/0.07) = 0.914 < 1.
        pred = voting.vote(labels, d, rule=VotingRule.SOFTMAX, k=3)
        assert pred.labels.tolist() == [A]
        assert pred.scores[0] == 1.0
        pred = voting.vote(labels, d, rule=VotingRule.SOFTMAX, k=3,
                           params=VotingParams(softmax_tau=0.5))
        assert pred.labels.tolist() == [B]
        assert pred.scores[0] == pytest.approx(
            math.exp(-0.05 / 0.5) + math.exp(-0.06 / 0.5), rel=1e-13)

    def test_entry_weights_flip_the_vote(self):
        labels = np.array([[A, B, B]])
        d = np.array([[0.1, 0.2, 0.3]])
        gamma = np.array([[1.0, 1.75 / 4, 1.0]])  # v = 3 for the first B.
        pred = voting.vote(labels, d, rule=VotingRule.RANK, k=3,
                           entry_weights=gamma)
        # B: 1.75/4/3 + 1/4 = 0.3958 < A: 0.5
        assert pred.labels.tolist() == [A]
        assert pred.scores[0] == 0.5

    def test_padding_never_wins(self):
        labels = np.array([[-1, -1, 3], [-1, -1, -1], [7, 7, 2]])
        d = np.array([[np.inf, np.inf, 0.5], [np.inf] * 3,
                      [np.inf, np.inf, 0.9]])
        for rule in VotingRule:
            pred = voting.vote(labels, d, rule=rule, k=3)
            assert pred.labels.tolist() == [3, -1, 2]
            assert pred.scores[1] == 0.0

    def test_zero_entry_weights_first_real_neighbour_wins(self):
        pred = voting.vote(np.array([[4, 5]]), np.array([[0.1, 0.2]]),
                           rule=VotingRule.RANK, k=2,
                           entry_weights=np.zeros((1, 2)))
        assert pred.labels.tolist() == [4]
        assert pred.scores.tolist() == [0.0]

    def test_k_out_of_range(self):
        with pytest.raises(ValueError, match=r"k=4 is out of range; allowed 1..3"):
            voting.vote(np.zeros((1, 3), int), np.zeros((1, 3)), rule="rank", k=4)
        with pytest.raises(ValueError, match=r"k=0"):
            voting.vote(np.zeros((1, 3), int), np.zeros((1, 3)), rule="rank", k=0)

    def test_num_classes_validation(self):
        with pytest.raises(ValueError, match=r"label 5 .*num_classes=5"):
            voting.vote(np.array([[5]]), np.zeros((1, 1)), rule="rank", k=1,
                        num_classes=5)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"labels shape \(1, 3\) != "
                           r"distances shape \(1, 2\)"):
            voting.vote(np.zeros((1, 3), int), np.zeros((1, 2)), rule="rank", k=1)

    def test_float_labels_rejected(self):
        with pytest.raises(ValueError, match="labels must be integers"):
            voting.vote(np.zeros((1, 2)), np.zeros((1, 2)), rule="rank", k=1)


class TestPredictAllK:

    def test_hand_computed_columns(self):
        labels = np.array([[A, B, B, A, C]])
        d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
        preds = voting.predict_all_k(labels, d)
        assert set(preds) == set(VotingRule)
        assert preds[VotingRule.PLURALITY].tolist() == [[A, A, B, B, B]]
        # rank: A 1/2 | B 1/3 | B 7/12 > 1/2 | A 1/2+1/5=7/10 > 7/12 | C 1/6.
        assert preds[VotingRule.RANK].tolist() == [[A, A, B, A, A]]
        assert preds[VotingRule.RANK].dtype == np.int64

    def test_subset_of_rules_and_k_max(self):
        labels = np.array([[A, B, B, A]])
        d = np.array([[0.1, 0.2, 0.3, 0.4]])
        preds = voting.predict_all_k(labels, d, rules=["rank"], k_max=3)
        assert list(preds) == [VotingRule.RANK]
        assert preds[VotingRule.RANK].tolist() == [[A, A, B]]

    def test_k_max_out_of_range(self):
        with pytest.raises(ValueError, match=r"k_max=5 is out of range; "
                           r"allowed 1..4"):
            voting.predict_all_k(np.zeros((2, 4), int), np.zeros((2, 4)), k_max=5)

    def test_empty_batch(self):
        preds = voting.predict_all_k(np.zeros((0, 3), int), np.zeros((0, 3)))
        assert preds[VotingRule.RANK].shape == (0, 3)

    @pytest.mark.parametrize("seed", range(25))
    def test_matches_naive_reference_few_classes(self, seed):
        rng = np.random.default_rng(seed)
        num_classes = int(rng.integers(2, 5))
        labels, d, ew = _random_inputs(rng, nq=40, num_k=12,
                                       num_classes=num_classes, pad_fraction=0.3,
                                       with_entry_weights=bool(seed % 2))
        self._check_against_naive(labels, d, ew)

    @pytest.mark.parametrize("seed", range(3))
    def test_matches_naive_reference_1000_classes(self, seed):
        rng = np.random.default_rng(1000 + seed)
        labels, d, ew = _random_inputs(rng, nq=30, num_k=100, num_classes=1000,
                                       pad_fraction=0.2, with_entry_weights=True)
        # Make a few classes repeat so that voting is non-trivial.
        labels[:, 50:] = np.where(labels[:, 50:] >= 0, labels[:, 50:] % 7,
                                  labels[:, 50:])
        self._check_against_naive(labels, d, ew)

    def test_plurality_ties_are_frequent_in_reference_check(self):
        # Guards that the property test exercises the tie rule at all.
        rng = np.random.default_rng(0)
        labels, d, _ = _random_inputs(rng, nq=200, num_k=10, num_classes=3)
        w = voting.neighbor_weights(VotingRule.PLURALITY, d, labels=labels)
        ties = 0
        for q in range(200):
            scores = voting.class_scores(labels[q], w[q], 10)
            top = max(scores.values())
            ties += sum(s == top for s in scores.values()) > 1
        assert ties > 20

    def _check_against_naive(self, labels, d, ew):
        preds = voting.predict_all_k(labels, d, entry_weights=ew)
        nq, num_k = labels.shape
        for rule in VotingRule:
            weights = voting.neighbor_weights(rule, d, entry_weights=ew,
                                              labels=labels, stable=True)
            expected = np.array([[_naive_vote(labels[q], weights[q], k)[0]
                                  for k in range(1, num_k + 1)]
                                 for q in range(nq)])
            np.testing.assert_array_equal(preds[rule], expected, err_msg=str(rule))
            for k in (1, num_k // 2, num_k):
                pred = voting.vote(labels, d, rule=rule, k=k, entry_weights=ew)
                np.testing.assert_array_equal(pred.labels, expected[:, k - 1])
                scores = [_naive_vote(labels[q], weights[q], k)[1] for q in range(nq)]
                np.testing.assert_array_equal(pred.scores, scores)


class TestClassScores:

    def test_rank_scores(self):
        w = voting.neighbor_weights(VotingRule.RANK, np.zeros((1, 4)))[0]
        scores = voting.class_scores([A, B, B, -1], w, 4)
        assert scores == {A: 0.5, B: 1 / 3 + 1 / 4}
        assert list(scores) == [A, B]

    def test_k_truncates(self):
        scores = voting.class_scores([3, 3, 9], [1.0, 2.0, 5.0], 2)
        assert scores == {3: 3.0}

    def test_bad_k(self):
        with pytest.raises(ValueError, match=r"k=4 is out of range"):
            voting.class_scores([1, 2], [1.0, 1.0], 4)


def test_huge_label_values_use_the_fallback_grouping():
    big = 2**62
    labels = np.array([[big, 5, 5, big, big + 1]])
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    preds = voting.predict_all_k(labels, d, rules=["plurality"])
    assert preds[VotingRule.PLURALITY].tolist() == [[big, big, 5, 5, 5]]


def test_any_negative_label_is_padding():
    labels = np.array([[-7, 4, -1]])
    d = np.array([[0.1, 0.2, 0.3]])
    preds = voting.predict_all_k(labels, d, rules=["rank"])
    assert preds[VotingRule.RANK].tolist() == [[-1, 4, 4]]
