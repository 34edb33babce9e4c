"""The region aggregation rule: MaxSim over query regions, with the global variants, and the image ranking."""

from __future__ import annotations

import numpy as np
import pytest

from memory.regions.aggregate import RegionRule, image_scores, rank_images
from memory.vectors import l2_normalize


def _unit(rows):
    return l2_normalize(np.asarray(rows, dtype=np.float32))


def test_maxsim_finds_each_query_region_wherever_it_sits():
    e = np.eye(6, dtype=np.float32)
    # The query: global e0, regions e1 e2 e3 e4. Image A holds the same regions in another order; B only e1.
    query = e[[0, 1, 2, 3, 4]]
    a = e[[5, 4, 3, 2, 1]]
    b = _unit([e[5], e[1], e[5], e[5], e[5]])
    got = image_scores(query, np.stack([a, b]), RegionRule.MAXSIM)
    np.testing.assert_allclose(got.scores, [1.0, 0.25], rtol=1e-6)
    assert got.matched[0].tolist() == [3, 2, 1, 0]  # Query region i matched A's region 3 - i.
    assert got.matched[1, 0] == 0 and got.similarity[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    # Neither image shares the query's global vector: GLOBAL scores 0, MAXSIM_GLOBAL halves MaxSim.
    np.testing.assert_allclose(image_scores(query, np.stack([a, b]), RegionRule.GLOBAL).scores, [0, 0], atol=1e-7)
    np.testing.assert_allclose(image_scores(query, np.stack([a, b]), RegionRule.MAXSIM_GLOBAL).scores,
                               [0.5, 0.125], rtol=1e-6)
    # BEST_REGION: the query region most like the whole image (A's and B's global is e5: no query region).
    c = _unit([e[3], e[5], e[5], e[5], e[5]])
    np.testing.assert_allclose(image_scores(query, np.stack([a, c]), RegionRule.BEST_REGION).scores, [0, 1],
                               atol=1e-7)


def test_maxsim_is_the_mean_of_per_region_maxima_on_random_vectors():
    rng = np.random.default_rng(0)
    query = _unit(rng.normal(size=(10, 8)))
    memory = _unit(rng.normal(size=(5 * 10, 8))).reshape(5, 10, 8)
    got = image_scores(query, memory, RegionRule.MAXSIM)
    for m in range(5):
        sims = query[1:] @ memory[m, 1:].T
        np.testing.assert_allclose(got.scores[m], sims.max(axis=1).mean(), rtol=1e-5)
        assert got.matched[m].tolist() == sims.argmax(axis=1).tolist()


def test_image_scores_refuses_shapes_that_disagree():
    with pytest.raises(ValueError, match=r"query \[1 \+ R, d\] and memory \[m, 1 \+ R, d\] must agree"):
        image_scores(np.zeros((5, 4)), np.zeros((2, 10, 4)), RegionRule.MAXSIM)


def test_rank_images_breaks_ties_by_image_id():
    order = rank_images(np.asarray(["c", "a", "b", "d"]), np.asarray([0.5, 0.5, 0.9, 0.1]), 3)
    assert order.tolist() == [2, 1, 0]
