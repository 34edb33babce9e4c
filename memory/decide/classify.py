"""Classification from searched neighbours: the vote, its explanation and confidence, abstention, re-ranking.

`VisualMemory.classify` embeds and searches the queries, then calls `classify_neighbors`. Each query is voted
once (`memory.rerank.base.vote_and_gate`, the step the evaluate job's re-rank stage runs too); its
explanation (memory.decide.explain), confidence (memory.decide.confidence) and cost gate all read that vote.
Then two optional second steps: a re-ranker's answer for low-margin votes (memory.rerank.base), and
abstention below a confidence or on a query the memory's out-of-memory test flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from memory.decide.confidence import Calibration
from memory.decide.explain import Prediction, explain
from memory.decide.out_of_memory import AbstainReason, OutOfMemoryStatistic
from memory.decide.voting import VotingParams, VotingRule
from memory.queries import query_bytes, query_uri
from memory.rerank.base import (Reranker, RerankReason, ResponseCache, check_rerank_below, check_top_n, rerank_cached,
                                vote_and_gate)


@dataclasses.dataclass(frozen=True)
class ClassifyOptions:
    """How `classify_neighbors` decides (see `VisualMemory.classify` for each option).

    Checked once, when constructed (where the options enter: `VisualMemory.classify`); every step after takes
    them as checked.

    Raises:
      ValueError: naming the bad value and the fix: unknown rule, k not an int >= 1, abstain_below outside
        [0, 1], rerank_below not a number >= 0, a re-ranker without rerank_below, rerank_top_n outside [2, 64].
    """
    rule: VotingRule | str
    k: int
    params: VotingParams = VotingParams()
    abstain_below: float | None = None
    rerank: Reranker | None = None
    rerank_below: float | None = None
    rerank_top_n: int = 10
    rerank_cache: ResponseCache | None = None

    def __post_init__(self):
        object.__setattr__(self, "rule", VotingRule.parse(self.rule))
        if not isinstance(self.k, (int, np.integer)) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        object.__setattr__(self, "k", int(self.k))
        below = self.abstain_below
        if below is not None and not (isinstance(below, (int, float, np.floating)) and not isinstance(below, bool)
                                      and 0.0 <= float(below) <= 1.0):
            raise ValueError(f"abstain_below must be a probability in [0, 1] (e.g. 0.8) or None, got {below!r}")
        if self.rerank is not None:
            check_top_n(self.rerank_top_n)
            if self.rerank_below is None:
                raise ValueError("rerank needs rerank_below (the vote margin under which a query is sent, e.g. "
                                 "0.3; use 1.01 to send every query)")
        check_rerank_below(self.rerank_below)

    @property
    def fetch(self) -> int:
        """Neighbours to search per query: the k that vote, or the top-N a re-ranker is shown if more."""
        return max(self.k, int(self.rerank_top_n)) if self.rerank is not None else self.k


def classify_neighbors(ids: np.ndarray, labels: np.ndarray, distances: np.ndarray, weights: np.ndarray | None,
                       uris: np.ndarray, *, class_names: Sequence[str], calibration: Calibration | None,
                       options: ClassifyOptions, images: Sequence[Any] | None = None) -> list[Prediction]:
    """One explained `Prediction` per query from its searched neighbours.

    Args:
      ids, labels, distances, uris: ``[nq, K]`` neighbours of each query, nearest first ("" / -1 / inf / ""
        padding): a `memory.visual_memory.SearchResult` of ``options.fetch``, which the search caps at the
        memory's live entries (``K < options.k`` then; the neighbours past K would be padding, which never votes).
      weights: ``[nq, K]`` soft-pruning entry weights multiplied into the votes, or None.
      class_names: The memory's class names.
      calibration: The memory's calibration (memory.decide.confidence.memory_calibration), or None.
      options: The checked options.
      images: The image queries (what a re-ranker is shown), or None for vector queries.

    Returns:
      One `memory.decide.explain.Prediction` per query (see `VisualMemory.classify`).
    """
    k, rule, params, rerank = options.k, options.rule, options.params, options.rerank
    nq = ids.shape[0]
    gated = vote_and_gate(labels, distances, weights, class_names=class_names, rule=rule, k=k, params=params,
                          below=None if rerank is None else options.rerank_below, top_n=options.rerank_top_n,
                          query_ids=[str(q) for q in range(nq)],
                          query_uris=[""] * nq if images is None else [query_uri(x) for x in images],
                          neighbor_uris=uris, query_image=None if images is None else lambda q: query_bytes(images[q]))
    vc = gated.vote
    calibrated = calibration is not None and calibration.matches(rule, k, params)
    confidence = calibration.confidence(vc) if calibrated else vc.share
    test = calibration.out_of_memory if calibrated else None
    p_out = None if test is None else calibration.out_of_memory_p(vc, ids)
    how = calibration.describe() if calibrated else (
        "raw share of the winner's score; uncalibrated" + (
            "" if calibration is None else f" (the memory's calibration is for rule {calibration.rule.value}, "
                                           f"k {calibration.k})"))
    # Each explanation shows the one vote cast above (its winner), not a second vote of its own. It is the
    # vote of the k asked even where fewer columns were searched (the rest would be padding).
    kk = min(k, ids.shape[1])
    predictions = [dataclasses.replace(
        explain(ids[q, :kk], labels[q, :kk], distances[q, :kk], rule=rule, k=kk, params=params,
                class_names=class_names, uris=uris[q, :kk], entry_weights=None if weights is None else weights[q, :kk],
                winner=int(vc.labels[q])), k=k)
                   for q in range(nq)]
    out = []
    for q, (p, c) in enumerate(zip(predictions, confidence.tolist())):
        fields: dict[str, Any] = dict(confidence=float(c), calibrated=calibrated)
        answered = False
        if rerank is not None:
            request = gated.requests[q]
            outcome = None if request is None else rerank_cached(rerank, request, options.rerank_cache)
            fields.update(rerank_reason=RerankReason.NOT_GATED if outcome is None else outcome.reason,
                          rerank_calls=0 if outcome is None else outcome.calls,
                          rerank_detail="" if outcome is None else outcome.detail)
            answered = outcome is not None and outcome.reranked
            if answered and outcome.label != p.label_name:
                fields.update(label=list(class_names).index(outcome.label), label_name=outcome.label,
                              reason=f"re-ranked by {rerank.name} (vote said {p.label_name!r}, margin "
                                     f"{float(vc.margin[q]):.3f} < {float(options.rerank_below):g})")
        if p_out is not None:
            fields.update(out_of_memory_p=float(p_out[q]))
        # A re-ranker's answer is the decision; abstention applies to the vote alone. It abstains when either
        # says so: the test (unlike the memory's own held-out queries) or the calibrated confidence
        # (memory.decide.out_of_memory says why they are not multiplied into one number).
        unlike = p_out is not None and p_out[q] < test.level
        if options.abstain_below is not None and (unlike or c < options.abstain_below) and not answered:
            if unlike:
                why = AbstainReason.UNLIKE_MEMORY
                which = "nearest neighbour" if test.statistic is OutOfMemoryStatistic.NEAREST else f"neighbour {kk}"
                # The relative test weighs the similarity against the neighbours' own as well.
                than = ("as it is and against its neighbours' own, together less like the memory than" if
                        test.statistic.needs_entries else "less than")
                detail = (f"{why.text}: its {which} has similarity {float(test.similarity_of(vc)[q]):.3f}, "
                          f"{than} in {100 * (1 - float(p_out[q])):.1f}% of held-out in-memory queries (p "
                          f"{float(p_out[q]):.4f} < {test.level:g}; confidence {c:.3f}, {how})")
            else:
                why = AbstainReason.SPLIT_VOTE
                detail = f"confidence {c:.3f} < {float(options.abstain_below):g} ({how}): {why.text}"
            fields.update(label=-1, label_name=None, abstained=True, abstain_reason=why, reason=detail)
        out.append(dataclasses.replace(p, **fields))
    return out
