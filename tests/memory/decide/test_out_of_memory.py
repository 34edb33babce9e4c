"""memory.decide.out_of_memory: the k-th neighbour p-value, abstaining when it or the calibrated confidence says so,
and the reason an abstention names; old calibrations (without the test) keep loading and mapping as before."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from memory import IndexConfig, IndexKind, VisualMemory
from memory.build import build_memory_local
from memory.decide.confidence import (Calibration, CalibrationMethod, ConfidenceScore, VoteConfidence,
                                      fit_calibration, memory_calibration, publish_calibration, vote_confidence)
from memory.decide.out_of_memory import (DEFAULT_LEVEL, MAX_KNOTS, AbstainReason, EntrySimilarities,
                                         EntrySimilarityRef, OutOfMemoryStatistic, OutOfMemoryTest, conformal_p_value,
                                         fit_out_of_memory_test, relative_similarity)
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


def _vc(kth):
    """A VoteConfidence whose k-th similarity is ``kth`` (the other fields play no part in the test)."""
    kth = np.asarray(kth, dtype=np.float64)
    return VoteConfidence(labels=np.zeros(kth.size, np.int64), share=np.ones(kth.size), margin=np.ones(kth.size),
                          similarity=kth + 0.1, kth_similarity=kth)


def test_relative_similarity_and_conformal_p_values_by_hand():
    kth = np.array([0.6, 0.5, 0.4])
    neighbor_kth = np.array([[0.7, 0.5, np.nan], [0.2, 0.3, 0.4], [np.nan] * 3])
    # s_k(q) minus the mean of the neighbours' own (unknown ones left out); NaN when none is known.
    np.testing.assert_allclose(relative_similarity(kth, neighbor_kth), [0.0, 0.2, np.nan])
    np.testing.assert_allclose(conformal_p_value(np.array([0.1, 0.2, 0.3]), 3, np.array([0.05, 0.2, np.nan])),
                               [1 / 4, 3 / 4, 1.0])
    with pytest.raises(ValueError, match=r"neighbor_kth must be \[3, k\]"):
        relative_similarity(kth, neighbor_kth[:2])


def _entries():
    # Binary fractions: exact in the stored float32, so the hand-computed ties are ties.
    return EntrySimilarities(ids=np.array(["a", "b", "c", "d"]), similarity=np.array([0.625, 0.625, 0.5, 0.125]), k=1)


def test_the_kth_relative_test_combines_both_p_values_by_fishers_method_by_hand():
    entries = _entries()
    calib_ids = np.array([["a"], ["b"], ["c"], ["d"]])
    test = fit_out_of_memory_test(np.array([0.75, 0.5, 0.375, 0.25]), statistic="kth_relative", level=0.3,
                                  neighbor_kth=entries.lookup(calib_ids), entries=entries)
    # Relative similarities 0.75-0.625, 0.5-0.625, 0.375-0.5, 0.25-0.125; each calibration query's p-values against
    # the split, (1 + #{<= x}) / 5: k-th 1, .8, .6, .4; relative 1, .6, .6, 1.
    assert test.parts == ((0.25, 0.375, 0.5, 0.75), (-0.125, -0.125, 0.125, 0.125))
    np.testing.assert_allclose(test.knots, sorted([0.0, np.log(0.8 * 0.6), np.log(0.6 * 0.6), np.log(0.4)]))
    assert test.entries == entries.ref() and test.entries.k == 1 and test.entries.count == 4
    # Query 1: k-th 0.3 (p .4), neighbour a's own 0.625: relative < all (p .2); log .08 is below every knot: p 1/5.
    # Query 2: k-th 0.7 (p .8), neighbour c's own 0.5: relative 0.2 (p 1); log .8 is above 3 knots: p 4/5.
    # Query 3: an entry added after the calibration (no own similarity): relative p 1, k-th 0.1 (p .2): p 1/5.
    vc, ids = _vc([0.3, 0.7, 0.1]), np.array([["a"], ["c"], ["new"]])
    np.testing.assert_allclose(test.statistic_of(vc, ids), [np.log(0.4 * 0.2), np.log(0.8), np.log(0.2)])
    np.testing.assert_allclose(test.p_values(vc, ids), [1 / 5, 4 / 5, 1 / 5])
    assert test.flags(test.statistic_of(vc, ids)).tolist() == [True, False, True]
    assert "as it is and relative to its neighbours' own" in test.describe()
    # Stored: the knots, both parts and where the entries are; the table itself is not in the dict.
    again = OutOfMemoryTest.from_dict(json.loads(json.dumps(test.to_dict())))
    assert again == test and again.entry_table is None and "entry_table" not in test.to_dict()
    with pytest.raises(ValueError, match="needs the neighbours' ids and the memory's entry similarities"):
        again.statistic_of(vc, ids)
    np.testing.assert_allclose(again.with_entries(entries).p_values(vc, ids), [1 / 5, 4 / 5, 1 / 5])


def test_entry_similarities_are_checked_when_built_and_read():
    entries = _entries()
    np.testing.assert_array_equal(entries.lookup(np.array([["d", ""], ["zz", "a"]])), [[0.125, np.nan], [np.nan, 0.625]])
    ref = entries.ref()
    assert ref.path.startswith("calibration/entry-similarity-k1-") and entries.to_bytes() == _entries().to_bytes()
    back = EntrySimilarities.from_bytes(entries.to_bytes(), ref)
    np.testing.assert_array_equal(back.ids, entries.ids)
    np.testing.assert_array_equal(back.similarity, entries.similarity)
    corrupt = bytearray(entries.to_bytes())
    corrupt[-1] ^= 0xFF
    with pytest.raises(ValueError, match=f"entry similarity file {ref.path} has sha256 .*re-run `vmem calibrate`"):
        EntrySimilarities.from_bytes(bytes(corrupt), ref)
    with pytest.raises(ValueError, match="holds .* entries, the calibration recorded 5"):
        EntrySimilarities.from_bytes(entries.to_bytes(), ref._replace(count=5))
    with pytest.raises(ValueError, match="ids must be sorted and unique"):
        EntrySimilarities(ids=np.array(["b", "a"]), similarity=np.array([0.1, 0.2]), k=1)
    with pytest.raises(ValueError, match="contain NaN or inf"):
        EntrySimilarities(ids=np.array(["a", "b"]), similarity=np.array([0.1, np.nan]), k=1)
    with pytest.raises(ValueError, match="as many similarities as ids"):
        EntrySimilarities(ids=np.array(["a", "b"]), similarity=np.array([0.1]), k=1)
    with pytest.raises(ValueError, match="out_of_memory entries must be an object with fields"):
        EntrySimilarityRef.from_dict({"path": "x"})


@pytest.mark.parametrize("fields,message", [
    (dict(parts=()), "needs parts .* and entries"),
    (dict(entries=None), "needs parts .* and entries"),
    (dict(parts=((0.2, 0.5), (0.3, 2.5))), "relative similarity knots must be non-empty, non-decreasing"),
    (dict(knots=(-1.0, 0.5)), r"knots must be non-empty, non-decreasing sums of log p-values <= 0"),
    (dict(statistic="kth"), "parts and entries belong to the kth_relative test, not kth"),
])
def test_a_bad_relative_test_is_refused_naming_the_field(fields, message):
    good = dict(level=0.05, knots=(-1.0, 0.0), queries=10, statistic="kth_relative", parts=((0.2, 0.5), (-0.1, 0.3)),
                entries=EntrySimilarityRef(path="calibration/x.npy", sha256="0" * 64, count=4, k=1))
    with pytest.raises(ValueError, match=message):
        OutOfMemoryTest(**{**good, **fields})
    with pytest.raises(ValueError, match="needs neighbor_kth and entries"):
        fit_out_of_memory_test(np.array([0.5, 0.6]), statistic="kth_relative")


def test_calibrate_stores_the_entries_own_similarities_and_classify_abstains_with_them(tmp_path):
    from evaluation.calibration import entry_similarities
    root, centres, rng = _memory(tmp_path)
    memory = VisualMemory.open(root)
    entries = entry_similarities(memory, k=10, batch=100)
    # Leave-one-out by brute force: every entry against the others (M's twins, stored twice, included).
    x = memory.get_embeddings(entries.ids)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_allclose(entries.similarity, np.sort(sims, axis=1)[:, -10], atol=1e-5)
    calib = np.concatenate([_near(centres, rng, i, 30) for i in range(3)])
    found = memory.search(calib, 10)
    vc = vote_confidence(found.labels, found.distances, rule="rank", k=10)
    test = fit_out_of_memory_test(vc.kth_similarity, statistic="kth_relative",
                                  neighbor_kth=entries.lookup(found.ids), entries=entries)
    cal = Calibration(method=CalibrationMethod.ISOTONIC, score=ConfidenceScore.SHARE, rule=VotingRule.RANK, k=10,
                      softmax_tau=0.07, rank_alpha=2.0, knots_x=(0.0, 1.0), knots_y=(0.0, 1.0), queries=90,
                      accuracy=0.8, fitted_on_version=1, out_of_memory=test)
    publish_calibration(root, cal, expected_version=1)
    stored = os.path.join(root, test.entries.path)
    assert os.path.isfile(stored)
    far, near = _near(centres, rng, 3), _near(centres, rng, 0)
    unlike, answered = VisualMemory.open(root).classify(np.concatenate([far, near]), rule="rank", k=10,
                                                        abstain_below=0.6)
    assert unlike.abstained and unlike.abstain_reason is AbstainReason.UNLIKE_MEMORY
    assert unlike.reason.startswith("unlike anything in memory: its neighbour 10 has similarity")
    assert "as it is and against its neighbours' own, together less like the memory than in" in unlike.reason
    assert not answered.abstained and answered.out_of_memory_p >= DEFAULT_LEVEL
    # A changed or missing file is refused, naming it, before any query is scored.
    with open(stored, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    os.utime(stored, (1, 1))
    with pytest.raises(ValueError, match=f"version 2: entry similarity file {test.entries.path} has sha256"):
        VisualMemory.open(root).classify(near, rule="rank", k=10)
    os.remove(stored)
    with pytest.raises(ValueError, match=f"entry similarity file {test.entries.path} is missing under"):
        VisualMemory.open(root).classify(near, rule="rank", k=10)
