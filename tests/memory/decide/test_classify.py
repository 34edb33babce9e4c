"""memory.decide.explain.explain and VisualMemory.classify on seeded synthetic vectors (no TensorFlow)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from memory import IndexConfig, IndexKind, VisualMemory
from memory.build import build_memory_local
from memory.decide.explain import Neighbor, Prediction, explain
from memory.decide.voting import VotingParams, VotingRule, neighbor_weights, vote
from encoders.base import PreprocessSpec
from tests.memory.helpers import clustered

N, D = 300, 32
CLASSES = ("ankle boot", "bag", "coat", "dress", "shirt")
ENCODER = {"name": "fake-encoder", "content_hash": "sha256:" + "0" * 64, "dim": D,
           "preprocess": PreprocessSpec(image_size=8, resize="resize_square").to_dict()}


# --------------------------------------------------------------------------- explain()


def _random_rows(rng, num_k: int, num_classes: int):
    labels = rng.integers(0, num_classes, num_k)
    # Rounded distances make exact distance ties (and so exact score ties) common.
    distances = np.sort(np.round(rng.uniform(0.0, 1.2, num_k), 1))
    pad = int(rng.integers(0, 3))
    if pad:
        labels[-pad:] = -1
        distances[-pad:] = np.inf
    return labels, distances


@pytest.mark.parametrize("rule", list(VotingRule))
def test_explain_agrees_with_vote_over_random_inputs(rule):
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(4)]
    params = VotingParams(softmax_tau=0.05, rank_alpha=1.5)
    disagreements = 0
    for trial in range(400):
        num_k = int(rng.integers(1, 12))
        labels, distances = _random_rows(rng, num_k, len(names))
        ew = rng.choice([0.0, 0.5, 1.0, 1.75], size=num_k) if trial % 3 == 0 else None
        k = int(rng.integers(1, num_k + 1))
        ids = [f"id{i}" for i in range(num_k)]
        uris = [f"/data/{i}.png" for i in range(num_k)]
        p = explain(ids, labels, distances, rule=rule, k=k, params=params, class_names=names, uris=uris,
                    entry_weights=ew)
        expected = vote(labels[None], distances[None], rule=rule, k=k, params=params,
                        entry_weights=None if ew is None else ew[None])
        assert p.label == int(expected.labels[0])
        assert p.label_name == ("" if p.label < 0 else names[p.label])
        assert p.rule is rule and p.k == k
        # The listing is consistent with the decision: the winner comes first and has the top score.
        if p.label >= 0:
            assert next(iter(p.scores)) == p.label_name
            assert p.scores[p.label_name] == max(p.scores.values())
            values = list(p.scores.values())
            assert values == sorted(values, reverse=True)
        else:
            assert p.scores == {}
        # Weights are the exact (non-stabilised) neighbor_weights, padding omitted.
        w = neighbor_weights(rule, distances[None, :k], params=params, labels=labels[None, :k],
                             entry_weights=None if ew is None else ew[None, :k])[0]
        real = [i for i in range(k) if labels[i] >= 0]
        assert [n.id for n in p.neighbors] == [ids[i] for i in real]
        np.testing.assert_array_equal([n.weight for n in p.neighbors], w[real])
        assert [n.label for n in p.neighbors] == labels[real].tolist()
        assert [n.uri for n in p.neighbors] == [uris[i] for i in real]
        # Scores are the sums of the listed weights per class.
        sums: dict[str, float] = {}
        for n in p.neighbors:
            sums[n.label_name] = sums.get(n.label_name, 0.0) + n.weight
        assert p.scores.keys() == sums.keys()
        for name, score in sums.items():
            assert p.scores[name] == pytest.approx(score, rel=1e-12)
        disagreements += p.label != int(expected.labels[0])
    assert disagreements == 0


def test_explain_values_and_tie_rule():
    names = ["A", "B", "C"]
    # RANK, alpha 2: A at 0 (1/2), B at 1 and 2 (1/3 + 1/4 = 7/12) -> B wins.
    p = explain(["a", "b1", "b2"], [0, 1, 1], [0.1, 0.2, 0.3], rule="rank", k=3, class_names=names,
                uris=["u0", "u1", "u2"])
    assert p.label == 1 and p.label_name == "B"
    assert list(p.scores) == ["B", "A"]
    assert p.scores["B"] == pytest.approx(1 / 3 + 1 / 4) and p.scores["A"] == pytest.approx(0.5)
    assert p.neighbors[0] == Neighbor(id="a", label=0, label_name="A", distance=pytest.approx(0.1), weight=0.5,
                                      uri="u0")
    # Plurality [A, B, B, A] at k=4: a 2-2 tie; B reached 2 first (position 2), so B wins and is listed first.
    p = explain(list("wxyz"), [0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], rule=VotingRule.PLURALITY, k=4,
                class_names=names, uris=[""] * 4)
    assert p.label_name == "B" and list(p.scores.items()) == [("B", 2.0), ("A", 2.0)]
    # ... and [A, B] at k=2: A wins.
    p = explain(list("wxyz"), [0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], rule=VotingRule.PLURALITY, k=2,
                class_names=names, uris=[""] * 4)
    assert p.label_name == "A" and list(p.scores) == ["A", "B"]
    # SOFTMAX shows exact weights exp((1 - d) / tau), not the stabilised ones.
    p = explain(["a"], [2], [0.25], rule="softmax", k=1, class_names=names, uris=["u"])
    assert p.neighbors[0].weight == pytest.approx(np.exp(0.75 / 0.07))
    assert p.scores == {"C": pytest.approx(np.exp(0.75 / 0.07))}


def test_explain_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"k=4 is out of range; allowed 1\.\.3"):
        explain(["a", "b", "c"], [0, 0, 0], [0.1, 0.2, 0.3], rule="rank", k=4, class_names=["A"], uris=["", "", ""])
    with pytest.raises(ValueError, match=r"unknown voting rule 'majority'; allowed: plurality"):
        explain(["a"], [0], [0.1], rule="majority", k=1, class_names=["A"], uris=[""])
    with pytest.raises(ValueError, match=r"label 3 is outside class_names"):
        explain(["a"], [3], [0.1], rule="rank", k=1, class_names=["A"], uris=[""])
    with pytest.raises(ValueError, match="same length"):
        explain(["a", "b"], [0], [0.1], rule="rank", k=1, class_names=["A"], uris=[""])


def test_prediction_is_frozen_and_serialisable():
    p = explain(["a", "b"], [0, 1], [0.0, 0.5], rule="distance", k=2, class_names=["A", "B"], uris=["x", "y"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.label = 3  # type: ignore[misc]
    d = p.to_dict()
    assert d["rule"] == "distance" and d["k"] == 2 and d["label_name"] == "A"
    assert d["scores"] == [{"label_name": "A", "score": 1.0}, {"label_name": "B", "score": pytest.approx(np.exp(-0.5))}]
    assert d["neighbors"][1] == {"id": "b", "label": 1, "label_name": "B", "distance": 0.5,
                                 "weight": pytest.approx(np.exp(-0.5)), "uri": "y"}


# --------------------------------------------------------------------------- VisualMemory.classify(vectors)


def _cluster_of(seed: int, n: int, nq: int, centres: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre each of clustered()'s vectors and queries was drawn around (replays its random stream)."""
    rng = np.random.default_rng(seed)
    rng.normal(size=(centres, D))
    of_x = rng.integers(0, centres, n)
    rng.normal(size=(n, D))
    return of_x, rng.integers(0, centres, nq)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    x, q = clustered(N, D, centres=len(CLASSES), noise=0.3, seed=7, nq=20)
    of_x, of_q = _cluster_of(7, N, 20, len(CLASSES))
    rng = np.random.default_rng(7)
    ids = [f"img-{i:04d}" for i in rng.permutation(N)]
    labels = [CLASSES[c] for c in of_x]  # One class per cluster.
    uris = [f"/data/{i}.png" for i in ids]
    root = str(tmp_path_factory.mktemp("classify"))
    build_memory_local(root, ids=ids, labels=labels, uris=uris, embeddings=x, num_shards=3,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENCODER)
    return VisualMemory.open(root), ids, labels, uris, x, (q, [CLASSES[c] for c in of_q])


def test_memory_vector_is_its_own_nearest_neighbour(synthetic):
    memory, ids, labels, uris, x, _ = synthetic
    rows = [0, 17, 123, 299]
    preds = memory.classify(x[rows] * 3.0, rule=VotingRule.RANK, k=5)  # Any scale: normalised first.
    assert len(preds) == len(rows) and all(isinstance(p, Prediction) for p in preds)
    for row, p in zip(rows, preds):
        first = p.neighbors[0]
        assert first.id == ids[row] and first.label_name == labels[row] and first.uri == uris[row]
        assert abs(first.distance) < 1e-5
        assert first.label == CLASSES.index(labels[row])
        assert len(p.neighbors) == 5 and p.k == 5 and p.rule is VotingRule.RANK
        assert [n.weight for n in p.neighbors] == pytest.approx([1 / (2.0 + i) for i in range(5)])


@pytest.mark.parametrize("rule", list(VotingRule))
def test_classify_matches_search_weights_and_vote(synthetic, rule):
    memory, ids, labels, uris, x, (q, q_labels) = synthetic
    k = 12
    params = VotingParams(softmax_tau=0.1, rank_alpha=3.0)
    preds = memory.classify(q, rule=rule, k=k, params=params)
    res = memory.search(q, k)
    expected = vote(res.labels, res.distances, rule=rule, k=k, params=params)
    weights = neighbor_weights(rule, res.distances, params=params, labels=res.labels)
    uri_of = dict(zip(ids, uris))
    assert [p.label for p in preds] == expected.labels.tolist()
    for i, p in enumerate(preds):
        assert [n.id for n in p.neighbors] == res.ids[i].tolist()
        assert [n.label for n in p.neighbors] == res.labels[i].tolist()
        np.testing.assert_array_equal([n.distance for n in p.neighbors], res.distances[i].astype(np.float64))
        np.testing.assert_array_equal([n.weight for n in p.neighbors], weights[i])
        assert [n.uri for n in p.neighbors] == [uri_of[j] for j in res.ids[i].tolist()]
        # Score per class = sum of its neighbours' weights; all scores sum to the total weight.
        for name, score in p.scores.items():
            assert score == pytest.approx(sum(w for n, w in zip(p.neighbors, weights[i]) if n.label_name == name))
        assert sum(p.scores.values()) == pytest.approx(weights[i].sum())
        assert next(iter(p.scores)) == p.label_name
        if rule is VotingRule.PLURALITY:
            assert sum(p.scores.values()) == k
    # Well-separated clusters: every query's own cluster wins under every rule.
    assert [p.label_name for p in preds] == q_labels


def test_classify_k_beyond_memory_size_and_empty_queries(tmp_path):
    x, _ = clustered(4, D, centres=2, noise=0.1, seed=3)
    build_memory_local(str(tmp_path), ids=["a", "b", "c", "d"], labels=["p", "q", "p", "q"],
                       uris=["ua", "ub", "uc", "ud"], embeddings=x, num_shards=2,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENCODER)
    memory = VisualMemory.open(str(tmp_path))
    (p,) = memory.classify(x[:1], rule="plurality", k=10)
    assert p.k == 10 and len(p.neighbors) == 4 and sum(p.scores.values()) == 4.0
    assert p.neighbors[0].id == "a" and p.label_name in ("p", "q")
    assert memory.classify(np.zeros((0, D), np.float32)) == []
    assert memory.classify([]) == []
    np.testing.assert_array_equal(memory.get_uris(["d", "a"]), ["ud", "ua"])
    with pytest.raises(KeyError, match="nope"):
        memory.get_uris(["nope"])


def test_classify_rejects_bad_arguments(synthetic):
    memory, *_, (q, _) = synthetic
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0"):
        memory.classify(q, k=0)
    with pytest.raises(ValueError, match=r"unknown voting rule 'best'; allowed: plurality, distance, softmax, rank"):
        memory.classify(q, rule="best")
    with pytest.raises(ValueError, match=rf"shape \[nq, {D}\]"):
        memory.classify(np.ones((2, D + 1), np.float32))
    with pytest.raises(ValueError, match=r"wrap a single image in a list"):
        memory.classify(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"unsupported query of type int"):
        memory.classify([3])
    with pytest.raises(ValueError, match=r"cannot read query 0 \(4 bytes\) as an image: not_an_image"):
        memory.classify([b"junk"])
    with pytest.raises(FileNotFoundError, match=r"query 1 .*no such image file '/nonexistent/x.png'"):
        memory.classify([np.zeros((8, 8, 3), np.uint8), "/nonexistent/x.png"])
    # Images decode fine, but build_memory_local recorded no EncoderSpec to load the encoder from.
    with pytest.raises(ValueError, match=r"records no encoder spec .* pass encoder="):
        memory.classify([np.zeros((8, 8, 3), np.uint8)])
