"""memory.decide.confidence: vote confidence, isotonic/Platt calibration, abstention in VisualMemory.classify."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.stats import expected_calibration_error
from memory import IndexConfig, IndexKind, VisualMemory
from memory.build import build_memory_local
from memory.decide.confidence import (Calibration, CalibrationMethod, ConfidenceScore, fit_calibration, isotonic_fit,
                               memory_calibration, platt_fit, publish_calibration, vote_confidence)
from memory.decide.voting import VotingParams, VotingRule, neighbor_weights, vote
from memory.store.versions import ConcurrentUpdateError
from tests.memory.helpers import ENCODER, clustered


def _random_lists(rng, nq: int, num_k: int, classes: int):
    labels = rng.integers(0, classes, (nq, num_k))
    distances = np.sort(np.round(rng.uniform(0, 1.2, (nq, num_k)), 1), axis=1)
    pad = rng.integers(0, 3, nq)
    for q, p in enumerate(pad):
        if p:
            labels[q, -p:] = -1
            distances[q, -p:] = np.inf
    return labels, distances


@pytest.mark.parametrize("rule", list(VotingRule))
def test_vote_confidence_matches_a_per_query_dictionary(rule):
    rng = np.random.default_rng(1)
    labels, distances = _random_lists(rng, 300, 9, 4)
    ew = rng.choice([0.0, 0.5, 1.0, 1.75], size=labels.shape)
    params = VotingParams(softmax_tau=0.1, rank_alpha=1.5)
    for k in (1, 4, 9):
        vc = vote_confidence(labels, distances, rule=rule, k=k, params=params, entry_weights=ew)
        np.testing.assert_array_equal(vc.labels, vote(labels, distances, rule=rule, k=k, params=params,
                                                      entry_weights=ew).labels)
        w = neighbor_weights(rule, distances[:, :k], params=params, entry_weights=ew[:, :k], labels=labels[:, :k],
                             stable=True)
        for q in range(labels.shape[0]):
            scores = {}
            for lab, wt in zip(labels[q, :k], w[q]):
                if lab >= 0:
                    scores[lab] = scores.get(lab, 0.0) + wt
            total = sum(scores.values())
            ranked = sorted(scores.values(), reverse=True) + [0.0, 0.0]
            share = ranked[0] / total if total > 0 else 0.0
            margin = (ranked[0] - ranked[1]) / total if total > 0 else 0.0
            assert vc.share[q] == pytest.approx(share, abs=1e-12)
            assert vc.margin[q] == pytest.approx(margin, abs=1e-12)
            live = np.isfinite(distances[q, :k]) & (labels[q, :k] >= 0)
            expected_sim = 1 - distances[q, :k][live][0] if live.any() else -1.0
            assert vc.similarity[q] == pytest.approx(expected_sim)


def test_unanimous_votes_have_share_one_and_no_neighbours_share_zero():
    labels = np.array([[2, 2, 2], [-1, -1, -1]])
    distances = np.array([[0.1, 0.2, 0.3], [np.inf, np.inf, np.inf]])
    vc = vote_confidence(labels, distances, rule="rank", k=3)
    assert vc.share.tolist() == [1.0, 0.0] and vc.margin.tolist() == [1.0, 0.0]
    assert vc.labels.tolist() == [2, -1] and vc.similarity[1] == -1.0


def test_isotonic_fit_is_monotone_pools_violators_and_keeps_monotone_data():
    kx, ky = isotonic_fit(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(np.interp([1, 2, 3, 4], kx, ky), [0.5, 0.5, 0.5, 0.5])
    kx, ky = isotonic_fit(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1]))
    np.testing.assert_allclose(np.interp([1, 2, 3], kx, ky), [0.0, 1.0, 1.0])
    rng = np.random.default_rng(2)
    x = rng.random(2000)
    y = rng.random(2000) < x
    kx, ky = isotonic_fit(x, y)
    assert (np.diff(kx) >= 0).all() and (np.diff(ky) >= 0).all()
    # Each pooled block's value is the mean of its points, so the fit preserves the overall mean.
    assert np.interp(x, kx, ky).mean() == pytest.approx(y.mean(), abs=1e-12)


def test_platt_recovers_a_logistic_model():
    rng = np.random.default_rng(3)
    x = rng.uniform(0.01, 0.99, 20000)
    p = 1 / (1 + np.exp(-(2.0 * np.log(x / (1 - x)) - 0.5)))
    a, b = platt_fit(x, rng.random(x.size) < p)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(-0.5, abs=0.1)


def _overconfident_lists(rng, n: int, classes: int = 5, k: int = 10):
    """Neighbour lists whose share overstates accuracy: the true class holds only some of the votes."""
    true = rng.integers(0, classes, n)
    agree = rng.uniform(0.2, 1.0, n)
    labels = np.where(rng.random((n, k)) < agree[:, None], true[:, None], rng.integers(0, classes, (n, k)))
    distances = np.sort(rng.uniform(0.1, 0.6, (n, k)), axis=1)
    return labels, distances, np.where(rng.random(n) < 0.3, (true + 1) % classes, true)


@pytest.mark.parametrize("method,score", [("isotonic", "share"), ("platt", "share"),
                                          ("platt", "combined")])
def test_calibration_lowers_ece_on_a_fresh_split(method, score):
    rng = np.random.default_rng(4)
    fit_on = _overconfident_lists(rng, 3000)
    labels, distances, true = _overconfident_lists(rng, 3000)
    cal = fit_calibration(*fit_on, rule="plurality", k=10, method=method, score=score)
    vc = vote_confidence(labels, distances, rule="plurality", k=10)
    correct = vc.labels == true
    before = expected_calibration_error(vc.share, correct)
    after = expected_calibration_error(cal.confidence(vc), correct)
    assert before > 0.1 and after < 0.03, (before, after)


def test_a_perfectly_separable_set_is_calibrated():
    # Every neighbour of every query has the query's class: share 1.0, always right, ECE 0 either way.
    labels = np.repeat(np.arange(4), 25)[:, None].repeat(10, axis=1)
    distances = np.sort(np.random.default_rng(5).uniform(0, 0.2, labels.shape), axis=1)
    true = labels[:, 0]
    cal = fit_calibration(labels, distances, true, rule="rank", k=10, method="isotonic", score="share")
    vc = vote_confidence(labels, distances, rule="rank", k=10)
    assert expected_calibration_error(vc.share, vc.labels == true) == 0.0
    np.testing.assert_allclose(cal.confidence(vc), 1.0)


def test_calibration_round_trips_and_refuses_bad_fields():
    rng = np.random.default_rng(6)
    cal = fit_calibration(*_overconfident_lists(rng, 500), rule="softmax", k=7, score="margin", method="isotonic",
                          params=VotingParams(softmax_tau=0.1), fitted_on_version=3)
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal and again.matches("softmax", 7, VotingParams(softmax_tau=0.1))
    assert not again.matches("softmax", 7, VotingParams()) and not again.matches("rank", 7, again.params)
    with pytest.raises(ValueError, match="unknown calibration method 'spline'"):
        Calibration.from_dict({**cal.to_dict(), "method": "spline"})
    with pytest.raises(ValueError, match="unknown field"):
        Calibration.from_dict({**cal.to_dict(), "colour": 1})
    combined = fit_calibration(*_overconfident_lists(rng, 500), rule="rank", k=7)
    assert combined.method is CalibrationMethod.PLATT and combined.score is ConfidenceScore.COMBINED
    assert Calibration.from_dict(combined.to_dict()) == combined and len(combined.coefficients) == 4
    with pytest.raises(ValueError, match="calibrate it with method platt"):
        fit_calibration(*_overconfident_lists(rng, 50), rule="rank", k=7, method="isotonic", score="combined")
    with pytest.raises(ValueError, match="isotonic calibration needs"):
        Calibration(method=CalibrationMethod.ISOTONIC, score=ConfidenceScore.SHARE, rule=VotingRule.RANK, k=1,
                    softmax_tau=0.07, rank_alpha=2.0, knots_x=(0.5, 0.2), knots_y=(0.1, 0.2))


def _memory(tmp_path, *, seed=7):
    x, _ = clustered(400, 32, centres=4, noise=0.6, seed=seed)
    labels = [f"c{i % 4}" for i in range(400)]
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=[f"e{i}" for i in range(400)], labels=labels, uris=[f"/d/{i}.png" for i in range(400)],
                       embeddings=x, num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity=ENCODER)
    return root, x


def test_classify_abstains_below_the_threshold_and_uses_the_published_calibration(tmp_path):
    root, x = _memory(tmp_path)
    rng = np.random.default_rng(8)
    queries = x[rng.integers(0, 400, 60)] + 0.8 * rng.normal(size=(60, 32)).astype(np.float32)
    memory = VisualMemory.open(root)
    raw = memory.classify(queries, rule="rank", k=10)
    assert all(p.confidence is not None and not p.calibrated and not p.abstained for p in raw)
    threshold = float(np.median([p.confidence for p in raw]))
    gated = memory.classify(queries, rule="rank", k=10, abstain_below=threshold)
    for p, g in zip(raw, gated):
        assert g.abstained == (p.confidence < threshold)
        if g.abstained:
            assert (g.label, g.label_name, g.vote_label_name) == (-1, None, p.label_name)  # An abstention has no class name.
            assert "uncalibrated" in g.reason and f"{p.confidence:.3f}" in g.reason
        else:
            assert (g.label, g.label_name) == (p.label, p.label_name)
    assert 0 < sum(g.abstained for g in gated) < len(gated)

    # A calibration that maps every share to 0.25 makes every answer abstain at 0.5, with its description.
    cal = Calibration(method=CalibrationMethod.ISOTONIC, score=ConfidenceScore.SHARE, rule=VotingRule.RANK, k=10,
                      softmax_tau=0.07, rank_alpha=2.0, knots_x=(0.0, 1.0), knots_y=(0.25, 0.25), queries=60,
                      accuracy=0.25, fitted_on_version=1)
    published = publish_calibration(root, cal, expected_version=1)
    assert published.version == 2 and published.change["kind"] == "calibrate"
    assert memory_calibration(published) == cal
    calibrated = VisualMemory.open(root).classify(queries, rule="rank", k=10, abstain_below=0.5)
    assert all(p.abstained and p.calibrated and p.confidence == 0.25 for p in calibrated)
    assert "isotonic on share of rule rank, k 10" in calibrated[0].reason
    # Another k is not what the calibration was fitted for: raw share, and the reason says so.
    other = VisualMemory.open(root).classify(queries[:3], rule="rank", k=5)
    assert not any(p.calibrated for p in other)
    with pytest.raises(ConcurrentUpdateError):
        publish_calibration(root, cal, expected_version=1)
    with pytest.raises(ValueError, match="abstain_below must be a probability"):
        memory.classify(queries, abstain_below=1.5)
