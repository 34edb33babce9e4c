"""One score per (query, memory image) from region embeddings: late interaction (MaxSim), then the usual vote.

With unit-length region vectors ``q_1..q_R`` of the query and ``m_1..m_R`` of a memory image (R = G * G) and
their global vectors ``q_g``, ``m_g``:

- ``MAXSIM``: ``s = (1/R) * sum_i max_j <q_i, m_j>``: each query region finds its best-matching region of the
  memory image, wherever it is, and the matches are averaged. This is ColBERT's late-interaction MaxSim
  (Khattab and Zaharia, SIGIR 2020: the sum over query tokens of the maximum similarity over document tokens),
  divided by R so that ``s`` stays a cosine similarity in [-1, 1] and ``1 - s`` a cosine distance, which is
  what the voting rules' weights read (`memory.decide.voting`: Distance ``exp(-d)``, Softmax ``exp(s / tau)``).
  The max makes the score invariant to where an object sits in either image (the localisation the composites
  of `evaluation.experiments.regions` measure); the mean keeps one chance match from deciding alone.
- ``MAXSIM_GLOBAL``: ``(MaxSim + <q_g, m_g>) / 2``: the region match, steadied by the whole-image similarity.
- ``BEST_REGION``: ``max_i <q_i, m_g>``: the query region that looks most like the memory image as a whole.
  Patchify (Choi et al. 2025, arXiv 2512.12610) scores a database image by the best match of its patches
  to the query's global descriptor; this is the same max with the roles swapped, for queries whose object
  fills only part of the frame (a small item on a large or cluttered canvas) while memory images show
  whole objects.
- ``GLOBAL``: ``<q_g, m_g>``: the global memory's similarity (a region memory then answers as a global one).

Memory images are then ranked by ``s`` (ties by image id) and the memory's voting rule runs over the top k
images as it runs over the top k entries of a global memory: the rule weights images, never regions, so an
image with many matching regions casts one vote.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np


class RegionRule(enum.Enum):
    """How region similarities become one score per memory image (see the module docstring)."""

    MAXSIM = "maxsim"
    MAXSIM_GLOBAL = "maxsim+global"
    BEST_REGION = "best-region"
    GLOBAL = "global"


class ImageScores(NamedTuple):
    """Scores of one query against m memory images, and which memory region each query region matched.

    Attributes:
      scores: float32 [m], the rule's similarity (distance = 1 - score).
      matched: int64 [m, R]: for each query region, the index of its best-matching region of each image.
      similarity: float32 [m, R]: that match's cosine similarity.
    """
    scores: np.ndarray
    matched: np.ndarray
    similarity: np.ndarray


def image_scores(query: np.ndarray, memory: np.ndarray, rule: RegionRule) -> ImageScores:
    """Scores memory images against one query.

    Args:
      query: float [1 + R, d] unit rows: the query's global vector, then its R region vectors.
      memory: float [m, 1 + R, d] unit rows: each memory image's global vector, then its regions.
      rule: The aggregation rule.

    Returns:
      ImageScores (the matches are computed for every rule: the explanation shows them).

    Raises:
      ValueError: shapes that disagree, naming them.
    """
    query = np.asarray(query, dtype=np.float32)
    memory = np.asarray(memory, dtype=np.float32)
    if query.ndim != 2 or memory.ndim != 3 or memory.shape[1:] != query.shape or query.shape[0] < 2:
        raise ValueError(f"query [1 + R, d] and memory [m, 1 + R, d] must agree, got {query.shape} and "
                         f"{memory.shape}")
    sims = np.einsum("id,mjd->mij", query[1:], memory[:, 1:])  # [m, R query regions, R memory regions]
    matched = sims.argmax(axis=2)
    best = np.take_along_axis(sims, matched[:, :, None], axis=2)[:, :, 0]
    global_sim = memory[:, 0] @ query[0]
    if rule is RegionRule.MAXSIM:
        scores = best.mean(axis=1)
    elif rule is RegionRule.MAXSIM_GLOBAL:
        scores = (best.mean(axis=1) + global_sim) / 2
    elif rule is RegionRule.BEST_REGION:
        scores = (memory[:, 0] @ query[1:].T).max(axis=1)
    else:
        scores = global_sim
    return ImageScores(scores.astype(np.float32), matched.astype(np.int64), best.astype(np.float32))


def rank_images(image_ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """int64 positions of the top ``k`` images by score, highest first, equal scores by ascending image id."""
    order = np.lexsort((np.asarray(image_ids, dtype=str), -np.asarray(scores, dtype=np.float64)))
    return order[:k]
