"""memory.decide.out_of_memory: the k-th neighbour p-value, abstaining when it or the calibrated confidence says so,
and the reason an abstention names; old calibrations (without the test) keep loading and mapping as before."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from memory import IndexConfig, IndexKind, VisualMemory
from memory.build import build_memory_local
from memory.decide.confidence import (Calibration, CalibrationMethod, ConfidenceScore, fit_calibration,
                                      memory_calibration, publish_calibration, vote_confidence)
from memory.decide.out_of_memory import (DEFAULT_LEVEL, MAX_KNOTS, AbstainReason, OutOfMemoryStatistic,
                                         OutOfMemoryTest, fit_out_of_memory_test)
from memory.decide.voting import VotingRule
from memory.store.versions import read_manifest
from memory.vectors import l2_normalize
from tests.memory.helpers import ENCODER


def test_p_value_is_the_conformal_rank_among_the_calibration_similarities():
    test = fit_out_of_memory_test(np.array([0.8, 0.2, 0.6, 0.4]), level=0.3)
    assert test.knots == (0.2, 0.4, 0.6, 0.8) and test.queries == 4
    # (1 + #{calibration <= s}) / (n + 1); ties count as at or below.
    np.testing.assert_allclose(test.p_value([0.1, 0.2, 0.5, 0.4, 0.9]), [1 / 5, 2 / 5, 3 / 5, 3 / 5, 1.0])
    assert test.flags([0.1, 0.2, 0.5]).tolist() == [True, False, False]


def test_the_level_bounds_the_in_memory_queries_flagged_and_far_queries_are_flagged():
    rng = np.random.default_rng(0)
    test = fit_out_of_memory_test(rng.normal(0.7, 0.05, 4000), level=DEFAULT_LEVEL)
    assert len(test.knots) == MAX_KNOTS and test.queries == 4000  # Order statistics, not all 4000.
    inside = rng.normal(0.7, 0.05, 20000)
    assert abs(test.flags(inside).mean() - DEFAULT_LEVEL) < 0.01
    assert test.flags(rng.normal(0.5, 0.05, 2000)).mean() > 0.95
    # The kept order statistics give the exact p-value to within their spacing.
    calibration = rng.normal(0.7, 0.05, 4000)
    kept = fit_out_of_memory_test(calibration)
    exact = fit_out_of_memory_test(calibration, max_knots=4000)
    assert len(exact.knots) == 4000
    sample = rng.normal(0.7, 0.05, 500)
    assert np.abs(kept.p_value(sample) - exact.p_value(sample)).max() < 3e-3


@pytest.mark.parametrize("fields,message", [
    (dict(level=0.0), "level must be a probability in (0, 1)"),
    (dict(level=1.0), "level must be a probability in (0, 1)"),
    (dict(knots=()), "knots must be non-empty, non-decreasing"),
    (dict(knots=(0.5, 0.2)), "knots must be non-empty, non-decreasing"),
    (dict(knots=(0.1, 1.5)), "similarities in [-1, 1]"),
    (dict(queries=1), "queries must be an int >= the 2 knots"),
])
def test_a_bad_test_is_refused_naming_the_field(fields, message):
    good = dict(level=0.05, knots=(0.2, 0.5), queries=10)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        OutOfMemoryTest(**{**good, **fields})


def test_fitting_refuses_empty_or_non_finite_similarities_and_round_trips():
    with pytest.raises(ValueError, match="non-empty, finite calibration split, got 0"):
        fit_out_of_memory_test(np.array([]))
    with pytest.raises(ValueError, match="with NaN or inf"):
        fit_out_of_memory_test(np.array([0.5, np.nan]))
    test = fit_out_of_memory_test(np.array([0.3, 0.9, 0.5]), level=0.1)
    assert OutOfMemoryTest.from_dict(json.loads(json.dumps(test.to_dict()))) == test
    with pytest.raises(ValueError, match=r"out_of_memory has unknown field\(s\) \['colour'\]"):
        OutOfMemoryTest.from_dict({**test.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="malformed out_of_memory"):
        OutOfMemoryTest.from_dict({"level": 0.1, "queries": 3})
    with pytest.raises(ValueError, match="unknown out-of-memory statistic 'median'; allowed: nearest, kth"):
        OutOfMemoryTest.from_dict({**test.to_dict(), "statistic": "median"})
    assert test.statistic is OutOfMemoryStatistic.NEAREST  # The default.


def test_reasons_are_values_with_words():
    assert AbstainReason.parse("UNLIKE_MEMORY") is AbstainReason.UNLIKE_MEMORY
    assert AbstainReason.UNLIKE_MEMORY.text == "unlike anything in memory"
    assert AbstainReason.SPLIT_VOTE.text == "the vote is split"
    with pytest.raises(ValueError, match="unknown abstain reason 'bored'; allowed: unlike_memory, split_vote"):
        AbstainReason.parse("bored")


def test_kth_similarity_is_the_kth_live_neighbours():
    labels = np.array([[0, 1, 0, 1], [2, 2, -1, -1], [-1, -1, -1, -1]])
    distances = np.array([[0.1, 0.2, 0.3, 0.4], [0.05, 0.5, np.inf, np.inf], [np.inf] * 4])
    vc = vote_confidence(labels, distances, rule="rank", k=3)
    np.testing.assert_allclose(vc.kth_similarity, [0.7, 0.5, -1.0])  # Fewer live than k: the farthest live one.
    np.testing.assert_allclose(vc.similarity, [0.9, 0.95, -1.0])


def _lists(rng, n, *, far: float, classes: int = 4, k: int = 10):
    """Neighbour lists whose k-th neighbour is at distance ~``far``; the vote is right ~80 % of the time."""
    true = rng.integers(0, classes, n)
    labels = np.where(rng.random((n, k)) < 0.75, true[:, None], rng.integers(0, classes, (n, k)))
    distances = np.sort(rng.uniform(far - 0.2, far, (n, k)), axis=1)
    return labels, distances, true


def test_the_test_is_fitted_on_the_known_classes_only_and_leaves_the_confidence_alone():
    rng = np.random.default_rng(1)
    labels, distances, true = _lists(rng, 2000, far=0.3)
    true_with_unknown = true.copy()
    true_with_unknown[:500] = -1  # Queries of an unknown class are not part of the in-memory sample.
    distances[:500] += 0.5
    cal = fit_calibration(labels, distances, true_with_unknown, rule="rank", k=10,
                          out_of_memory_level=DEFAULT_LEVEL, out_of_memory_statistic="kth")
    assert cal.out_of_memory.queries == 1500 and cal.out_of_memory.level == DEFAULT_LEVEL
    assert cal.out_of_memory.statistic is OutOfMemoryStatistic.KTH
    assert min(cal.out_of_memory.knots) > 0.65  # The far 500 are not in the in-memory sample.
    plain = fit_calibration(labels, distances, true_with_unknown, rule="rank", k=10)
    assert plain.out_of_memory is None and dataclasses.replace(cal, out_of_memory=None) == plain

    inside = vote_confidence(*_lists(rng, 1000, far=0.3)[:2], rule="rank", k=10)
    outside = vote_confidence(*_lists(rng, 1000, far=0.8)[:2], rule="rank", k=10)
    for vc in (inside, outside):
        np.testing.assert_array_equal(cal.confidence(vc), plain.confidence(vc))  # The fitted map, unchanged.
        np.testing.assert_array_equal(cal.out_of_memory_p(vc), cal.out_of_memory.p_value(vc.kth_similarity))
    assert plain.out_of_memory_p(inside) is None
    assert abs(cal.out_of_memory.flags(inside.kth_similarity).mean() - DEFAULT_LEVEL) < 0.02
    # Farther than every calibration query: the smallest p-value, 1 / 1501.
    np.testing.assert_allclose(cal.out_of_memory_p(outside), 1 / 1501)
    with pytest.raises(ValueError, match="every query has true label -1"):
        fit_calibration(labels, distances, np.full(2000, -1), rule="rank", k=10, out_of_memory_level=0.05)
    with pytest.raises(ValueError, match=r"level must be a probability in \(0, 1\)"):
        fit_calibration(labels, distances, true, rule="rank", k=10, out_of_memory_level=1.5)


# A calibration as manifests stored it before calibrations carried an out-of-memory test.
OLD_CALIBRATION = {"method": "platt", "score": "combined", "rule": "rank", "k": 10, "softmax_tau": 0.07,
                   "rank_alpha": 2.0, "knots_x": [], "knots_y": [], "a": 0.0, "b": 0.0,
                   "coefficients": [0.8, 0.3, 1.5, -0.2], "queries": 800, "accuracy": 0.9,
                   "fitted_on_version": 1, "source": "/evals/calib"}


def test_an_old_calibration_loads_maps_as_before_and_stores_as_before():
    cal = Calibration.from_dict(json.loads(json.dumps(OLD_CALIBRATION)))
    assert cal.out_of_memory is None and cal.to_dict() == OLD_CALIBRATION
    rng = np.random.default_rng(2)
    vc = vote_confidence(*_lists(rng, 50, far=0.9)[:2], rule="rank", k=10)
    assert cal.out_of_memory_p(vc) is None and "out of memory" not in cal.describe()
    with pytest.raises(ValueError, match="out_of_memory must be an object"):
        Calibration.from_dict({**OLD_CALIBRATION, "out_of_memory": 0.05})


def _memory(tmp_path):
    """Tight clusters in 32-d: A (class c0), B (c1) and M, whose every vector is stored twice, once as c0 and
    once as c1 (its votes split 5 to 5); a fourth centre F is in no entry."""
    rng = np.random.default_rng(3)
    centres = l2_normalize(rng.normal(size=(4, 32)))
    a, b, m = (l2_normalize(centres[i] + 0.05 * rng.normal(size=(60, 32))) for i in range(3))
    x = np.concatenate([a, b, m, m])
    labels = ["c0"] * 60 + ["c1"] * 60 + ["c0"] * 60 + ["c1"] * 60
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=[f"e{i}" for i in range(240)], labels=labels, uris=[f"/d/{i}.png" for i in range(240)],
                       embeddings=x, num_shards=1, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity=ENCODER)
    return root, centres, rng


def _near(centres, rng, i, n=1):
    return l2_normalize(centres[i] + 0.05 * rng.normal(size=(n, 32)))


def test_classify_names_why_it_abstained(tmp_path):
    root, centres, rng = _memory(tmp_path)
    # Calibrated on queries near A, B and M: confidence = the share (an identity map), and the test of their
    # 10th neighbour similarities.
    calib = np.concatenate([_near(centres, rng, i, 30) for i in range(3)])
    found = VisualMemory.open(root).search(calib, 10)
    test = fit_out_of_memory_test(vote_confidence(found.labels, found.distances, rule="rank", k=10).kth_similarity,
                                  statistic="kth")
    cal = Calibration(method=CalibrationMethod.ISOTONIC, score=ConfidenceScore.SHARE, rule=VotingRule.RANK, k=10,
                      softmax_tau=0.07, rank_alpha=2.0, knots_x=(0.0, 1.0), knots_y=(0.0, 1.0), queries=90,
                      accuracy=0.8, fitted_on_version=1, out_of_memory=test)
    publish_calibration(root, cal, expected_version=1)
    assert memory_calibration(read_manifest(root)) == cal
    queries = np.concatenate([_near(centres, rng, 3), _near(centres, rng, 2), _near(centres, rng, 0)])
    unlike, split, answered = VisualMemory.open(root).classify(queries, rule="rank", k=10, abstain_below=0.6)
    # Abstained on for the test alone: the query's 10 neighbours agree (share 1, confidence 1).
    assert unlike.abstained and unlike.abstain_reason is AbstainReason.UNLIKE_MEMORY and unlike.confidence == 1.0
    assert unlike.reason.startswith("unlike anything in memory: its neighbour 10 has similarity")
    assert "(p 0.0110 < 0.05; confidence 1.000, isotonic on share" in unlike.reason
    assert "out of memory below the 5th percentile of 90 held-out queries'" in unlike.reason
    assert unlike.to_dict()["abstain_reason"] == "unlike_memory" and unlike.out_of_memory_p == pytest.approx(1 / 91)
    assert split.abstained and split.abstain_reason is AbstainReason.SPLIT_VOTE and split.confidence < 0.6
    assert split.reason.startswith(f"confidence {split.confidence:.3f} < 0.6 (isotonic on share")
    assert split.reason.endswith(": the vote is split") and split.to_dict()["abstain_reason"] == "split_vote"
    assert split.out_of_memory_p >= DEFAULT_LEVEL
    assert not answered.abstained and answered.abstain_reason is None and answered.to_dict()["abstain_reason"] is None
    assert answered.confidence == 1.0 and answered.to_dict()["out_of_memory_p"] >= DEFAULT_LEVEL


def test_a_memory_calibrated_the_old_way_still_classifies_and_abstains_as_a_split_vote(tmp_path):
    root, centres, rng = _memory(tmp_path)
    old = Calibration.from_dict(OLD_CALIBRATION)
    publish_calibration(root, old, expected_version=1)
    assert read_manifest(root).calibration == OLD_CALIBRATION  # Stored as it always was.
    far = _near(centres, rng, 3)
    (p,) = VisualMemory.open(root).classify(far, rule="rank", k=10, abstain_below=1.0)
    assert p.calibrated and p.abstained and p.abstain_reason is AbstainReason.SPLIT_VOTE
    found = VisualMemory.open(root).search(far, 10)
    expected = old.confidence(vote_confidence(found.labels, found.distances, rule="rank", k=10))
    assert p.confidence == pytest.approx(float(expected[0])) and p.out_of_memory_p is None
    assert p.reason.startswith(f"confidence {p.confidence:.3f} < 1 (platt on combined")
