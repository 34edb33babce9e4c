"""Classify with a region memory: search regions, score memory images by their regions, vote over images.

For each query, its global vector and its G x G region vectors (one encoder pass, `memory.regions.pooling`)
are searched through the memory's one search engine (`VisualMemory.search`: the shard-search units and the
exact merge), the global vector among the global entries (`memory.search.filters.QueryFilter.entries`, applied
before the top-k cut like forgetting) and each region vector among all entries (a query region may look like a
memory image's region or like a whole memory image). Every image any of those searches returned is a candidate;
its stored global and region vectors are scored exactly against the query's
(`memory.regions.aggregate.image_scores`: MaxSim by default), the top k images by score become the
query's neighbours (distance = 1 - score) and `memory.decide.classify.classify_neighbors` votes over them with
the memory's voting rule, exactly as for a global memory's neighbours. Candidate generation by per-region
nearest neighbours followed by an exact late-interaction re-score is ColBERT's retrieval scheme (Khattab and
Zaharia 2020); an image none of whose vectors is near any query vector is not scored, which the GLOBAL rule
never notices (its top k images are the global search's own) and MaxSim rarely does (a high MaxSim needs near
regions).

The explanation keeps, for every neighbour image, which memory region each query region matched and how
closely (`NeighborRegions`): what ``vmem classify --html`` on a region memory draws as heat maps.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from memory.decide.classify import ClassifyOptions, classify_neighbors
from memory.decide.explain import Prediction
from memory.decide.voting import VotingParams, VotingRule
from memory.enums import parse_enum
from memory.queries import OnUnreadable, UnreadableQuery, preprocess_queries, query_preprocess
from memory.regions.aggregate import RegionRule, image_scores, rank_images
from memory.regions.layout import EntryKind, image_ids_of, region_grid, region_ids
from memory.regions.pooling import region_boxes, region_vectors
from memory.search.filters import QueryFilter
from memory.vectors import l2_normalize

if TYPE_CHECKING:
    from encoders.base import Encoder
    from memory.visual_memory import VisualMemory

# Feature maps are [n, 7, 7, 1280] float32 (250 KB per image): embed in modest batches.
_BATCH = 32
IMAGES_ONLY = QueryFilter(entries=EntryKind.IMAGE)
REGIONS_ONLY = QueryFilter(entries=EntryKind.REGION)


@dataclasses.dataclass(frozen=True)
class NeighborRegions:
    """Where one neighbour image matched the query.

    Attributes:
      image_id: The neighbour's image id (its global entry's id).
      matched: For each query region i (row-major cells), the neighbour's region that matched it best.
      similarity: The cosine similarity of each of those matches.
    """
    image_id: str
    matched: tuple[int, ...]
    similarity: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "matched": list(self.matched), "similarity": list(self.similarity)}


@dataclasses.dataclass(frozen=True)
class RegionPrediction:
    """A region memory's answer for one query: the usual explained prediction plus where each neighbour matched.

    Attributes:
      prediction: The vote over the top k images (`memory.decide.explain.Prediction`; its neighbours are
        images, with distance 1 - the region rule's score).
      grid: The memory's grid G.
      region_rule: How the images were scored.
      regions: One `NeighborRegions` per ``prediction.neighbors``, in the same order.
      boxes: float [G*G, 4]: each region's ``(top, left, bottom, right)`` as fractions of the preprocessed
        image (`memory.regions.pooling.region_boxes` on the feature map's size; an even split for vector
        queries, whose map size is unknown).
    """
    prediction: Prediction
    grid: int
    region_rule: RegionRule
    regions: tuple[NeighborRegions, ...]
    boxes: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "region_rule": self.region_rule.value, "boxes": self.boxes.tolist(),
                "regions": [r.to_dict() for r in self.regions]}


def require_grid(memory: VisualMemory) -> int:
    """The memory's grid G.

    Raises:
      ValueError: a global memory, naming the fix.
    """
    grid = region_grid(memory.manifest)
    if grid is None:
        raise ValueError("this memory has no region entries (built without --regions); rebuild it with "
                         "`vmem build --regions G`, or classify without regions")
    return grid


class QueryRegions(NamedTuple):
    """Image queries as region vectors.

    Attributes:
      vectors: float32 [n, 1 + G*G, d] unit rows of the readable images: global vector, then regions.
      boxes: float [G*G, 4]: where each region lies in the preprocessed image (`region_boxes`).
      unreadable: The images that could not be read (with OnUnreadable.REPORT; [] with RAISE).
    """
    vectors: np.ndarray
    boxes: np.ndarray
    unreadable: list[UnreadableQuery]


def query_region_vectors(memory: VisualMemory, images: Sequence[Any], *, encoder: Encoder | None = None,
                         on_unreadable: OnUnreadable = OnUnreadable.RAISE) -> QueryRegions:
    """Each image's global vector and region vectors, from one encoder pass.

    Images are decoded and preprocessed as the memory's entries were (the manifest's spec) and pooled on the
    memory's grid from the memory's encoder's feature map (`memory.regions.pooling.region_vectors`).

    Raises:
      FileNotFoundError, ValueError: an unreadable image with RAISE (see `VisualMemory.embed_images`), a
        global memory.
      encoders.base.EncoderError: an encoder without a feature map.
    """
    grid = require_grid(memory)
    spec = query_preprocess(memory.manifest, "the region memory")
    pixels, unreadable = preprocess_queries(images, spec, on_unreadable=on_unreadable)
    boxes = region_boxes(grid, grid, grid)
    if not pixels:
        return QueryRegions(np.zeros((0, 1 + grid * grid, memory.dim), np.float32), boxes, unreadable)
    model = memory.query_encoder(encoder)
    parts = []
    for s in range(0, len(pixels), _BATCH):
        maps = model.feature_map(np.stack(pixels[s:s + _BATCH]))
        boxes = region_boxes(maps.shape[1], maps.shape[2], grid)
        parts.append(region_vectors(maps, grid))
    vectors = np.concatenate(parts)
    return QueryRegions(l2_normalize(vectors.reshape(-1, memory.dim)).reshape(vectors.shape), boxes, unreadable)


def candidate_images(memory: VisualMemory, queries: np.ndarray, candidates: int) -> list[np.ndarray]:
    """Per query, the sorted unique image ids its global vector (among global entries) and its region vectors
    (among all entries) found, ``candidates`` neighbours each, in one `VisualMemory.search` call."""
    nq, width, dim = queries.shape
    filters = [IMAGES_ONLY] + [None] * (width - 1)
    found = memory.search(queries.reshape(nq * width, dim), candidates, filters=filters * nq)
    ids = image_ids_of(found.ids).reshape(nq, width * found.ids.shape[1])
    return [np.unique(row[row != ""]) for row in ids]


def classify_regions(memory: VisualMemory, queries: np.ndarray | Sequence[Any], *,
                     region_rule: RegionRule | str = RegionRule.MAXSIM, rule: VotingRule | str = VotingRule.RANK,
                     k: int = 10, params: VotingParams = VotingParams(), candidates: int | None = None,
                     abstain_below: float | None = None, encoder: Encoder | None = None,
                     on_unreadable: OnUnreadable | str = OnUnreadable.RAISE
                     ) -> list[RegionPrediction | UnreadableQuery]:
    """Classifies queries with a region memory (see the module docstring).

    Args:
      memory: An opened region memory (built with ``--regions``).
      queries: Images (anything `VisualMemory.classify` takes), or float [n, 1 + G*G, dim] global-then-region
        query vectors (normalised here).
      region_rule: How region similarities score a memory image (`memory.regions.aggregate.RegionRule`).
      rule, k, params: The voting rule over the top k images, as `VisualMemory.classify`'s.
      candidates: Neighbours fetched per query vector (global and each region) to collect candidate images;
        default max(4k, 32).
      abstain_below: Abstain below this raw confidence (the share of the winner's score); a memory's
        calibration is fitted on global votes, so it is not applied here.
      encoder: An already loaded encoder with the memory's identity.
      on_unreadable: For image queries, as `VisualMemory.classify`'s: RAISE on the first unreadable image, or
        REPORT it as a `memory.queries.UnreadableQuery` in its place and answer the others.

    Returns:
      One `RegionPrediction` per query (or UnreadableQuery, with REPORT).

    Raises:
      ValueError: a global memory, query vectors of the wrong shape, bad options (naming them).
    """
    grid = require_grid(memory)
    region_rule = parse_enum(RegionRule, region_rule, "region rule")
    options = ClassifyOptions(rule=rule, k=k, params=params, abstain_below=abstain_below)
    width = 1 + grid * grid
    if isinstance(queries, np.ndarray) and queries.dtype.kind == "f" and queries.ndim == 3:
        if queries.shape[1:] != (width, memory.dim):
            raise ValueError(f"region query vectors must be [n, {width}, {memory.dim}] (global then {grid}x{grid} "
                             f"regions), got {queries.shape}")
        vectors = l2_normalize(queries.reshape(-1, memory.dim)).reshape(queries.shape)
        images, boxes, unreadable = None, region_boxes(grid, grid, grid), []
    else:
        images = list(queries)
        vectors, boxes, unreadable = query_region_vectors(
            memory, images, encoder=encoder, on_unreadable=parse_enum(OnUnreadable, on_unreadable, "on_unreadable"))
        bad = {u.index for u in unreadable}
        images = [x for i, x in enumerate(images) if i not in bad]
    fetch = options.fetch
    nq = vectors.shape[0]
    ids = np.full((nq, fetch), "", dtype=object)
    labels = np.full((nq, fetch), -1, dtype=np.int32)
    distances = np.full((nq, fetch), np.inf, dtype=np.float32)
    uris = np.full((nq, fetch), "", dtype=object)
    matches: list[tuple[NeighborRegions, ...]] = []
    for q, found in enumerate(candidate_images(memory, vectors, candidates or max(4 * options.k, 32))):
        stored = memory.get_embeddings(np.concatenate([found[:, None], region_ids(found.tolist(), grid)], axis=1)
                                       .ravel().tolist()).reshape(found.size, width, memory.dim)
        scored = image_scores(vectors[q], stored, region_rule)
        top = rank_images(found, scored.scores, fetch)
        n = top.size
        ids[q, :n] = found[top]
        labels[q, :n] = memory.labels_of(found[top])
        distances[q, :n] = 1.0 - scored.scores[top]
        uris[q, :n] = memory.get_uris(found[top])
        matches.append(tuple(NeighborRegions(str(found[t]), tuple(scored.matched[t].tolist()),
                                             tuple(float(s) for s in scored.similarity[t].tolist())) for t in top))
    predictions = classify_neighbors(ids.astype(str), labels, distances, None, uris.astype(str),
                                     class_names=memory.class_names, calibration=None, options=options,
                                     images=images) if nq else []
    answered = iter(RegionPrediction(p, grid, region_rule, m[:len(p.neighbors)], boxes)
                    for p, m in zip(predictions, matches))
    # Back in the callers' order: each unreadable query in its own place.
    by_index = {u.index: u for u in unreadable}
    return [by_index[i] if i in by_index else next(answered) for i in range(nq + len(unreadable))]
