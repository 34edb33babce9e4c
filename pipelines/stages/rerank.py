"""The evaluate job's re-rank stage (its flags are in pipelines/rerank_args.py, `RerankSpec` in memory/rerank).

After the search and merge, each query's vote (``--rerank-rule`` at ``--rerank-k``) is computed where it was
merged; queries whose vote margin is below ``--rerank-below`` go through `RunInference` with
`RerankModelHandler`, a Beam ``RemoteModelHandler`` (``create_client`` builds the re-ranker on the worker,
``request`` answers a batch; client-side throttling from Beam). The handler's own batch retry is off
(``num_retries=0``): a batch retried after one query's 429 would pay again for every query already answered.
Each query is retried on its own inside the re-ranker (memory.rerank.gemini: 429/5xx/timeouts with backoff), and
answers are kept in a `memory.rerank.base.ResponseCache` under ``OUTPUT/rerank_cache`` before they are emitted, so
a bundle the runner retries after a crash re-uses them: no call is paid twice. ``--rerank-dry-run`` stops
before any call and reports how many queries would be sent.

Every query leaves the stage with a record (its vote, final label, reason, calls) in ``rerank-*.jsonl``;
the report's ``rerank`` section sums them (memory.rerank.base.RerankRecord, RerankTally).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RemoteModelHandler, RunInference

from memory import storage
from memory.decide.voting import VotingParams, VotingRule
from memory.rerank import RerankSpec
from memory.rerank import base as rerank_lib
from memory.rerank.base import RerankReason, RerankRecord, RerankTally

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"
RERANK_PREFIX = "rerank"
_PROGRESS_EVERY = 100
_CALLS = Metrics.counter(_NAMESPACE, "rerank_calls")
_FALLBACKS = Metrics.counter(_NAMESPACE, "rerank_fallbacks")
CACHE_DIR = "rerank_cache"


# ------------------------------------------------------------------------------------------------ stage


@dataclasses.dataclass
class _Client:
    """What RunInference shares per worker (an object: Beam's Shared handle keeps a weak reference to it)."""
    reranker: rerank_lib.Reranker
    cache: rerank_lib.ResponseCache | None
    done: int = 0
    calls: int = 0
    fallbacks: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)


class RerankModelHandler(RemoteModelHandler):
    """Beam's remote-model conventions around a `memory.rerank.base.Reranker`.

    Examples are (query id, RerankRequest, vote label, true label); each inference is a RerankOutcome,
    answered from the response cache when a previous attempt already paid for it.
    """

    def __init__(self, spec: RerankSpec, cache_dir: str | None):
        super().__init__(namespace="visual_memory.rerank", num_retries=0, throttle_delay_secs=5)
        self._spec = spec
        self._cache_dir = cache_dir

    def create_client(self):
        return _Client(self._spec.build(), None if self._cache_dir is None else rerank_lib.ResponseCache(self._cache_dir))

    def request(self, batch: Sequence[Any], model, inference_args=None) -> Iterable[PredictionResult]:
        reranker, cache = model.reranker, model.cache
        prefetch = getattr(reranker, "prefetch", None)
        if prefetch is not None:  # A local encoder embeds the images of the batch's unanswered queries together.
            prefetch([r for _, r, _, _ in batch if cache is None or cache.get(r.key(reranker.name)) is None])
        out = [PredictionResult(example, rerank_lib.rerank_cached(reranker, example[1], cache)) for example in batch]
        calls = sum(r.inference.calls for r in out)
        fallbacks = sum(r.inference.reason.is_fallback for r in out)
        _CALLS.inc(calls)
        _FALLBACKS.inc(fallbacks)
        before = model.done
        model.done, model.calls, model.fallbacks = model.done + len(out), model.calls + calls, model.fallbacks + fallbacks
        if model.done // _PROGRESS_EVERY > before // _PROGRESS_EVERY:
            _LOG.info("re-ranked %d queries on this worker with %s: %d calls, %d fallbacks (%.1f queries/s)",
                      model.done, reranker.name, model.calls, model.fallbacks,
                      model.done / max(time.monotonic() - model.started, 1e-9))
        return out

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 32}


def _vote_and_gate(batch, *, class_names: Sequence[str], rule: VotingRule, k: int, params: VotingParams,
                   below: float, top_n: int, dry_run: bool):
    """(query id, QueryNeighbors) batch -> ("send", example) for gated queries, ("done", record) for the rest."""
    n = [q.neighbors for _, q in batch]
    labels = np.concatenate([x.labels for x in n])
    no_uris = np.full(labels.shape[1], "")
    gated = rerank_lib.vote_and_gate(
        labels, np.concatenate([x.distances for x in n]),
        None if n[0].weights is None else np.concatenate([x.weights for x in n]), class_names=class_names,
        rule=rule, k=k, params=params, below=below, top_n=top_n, query_ids=[qid for qid, _ in batch],
        query_uris=[q.uri for _, q in batch],
        neighbor_uris=[no_uris if x.uris is None else x.uris[0] for x in n])
    out = []
    for (qid, q), vote_label, request, margin in zip(batch, gated.vote_labels.tolist(), gated.requests,
                                                     gated.vote.margin.tolist()):
        reason = RerankReason.NOT_GATED
        if request is not None:
            reason = RerankReason.SINGLE_LABEL if len(request.labels) < 2 else RerankReason.DRY_RUN if dry_run else None
        if reason is None:
            out.append(("send", (qid, request, vote_label, q.label)))
        else:
            out.append(("done", RerankRecord.of(qid, q.label, vote_label, margin,
                                                rerank_lib.RerankOutcome(vote_label, reason))))
    return out


class _TallyFn(beam.CombineFn):
    """RerankRecords -> the report's re-rank section (RerankTally.to_dict)."""

    def create_accumulator(self):
        return RerankTally()

    def add_input(self, acc, rec):
        return acc + rec.tally()

    def merge_accumulators(self, accumulators):
        out = RerankTally()
        for a in accumulators:
            out = out + a
        return out

    def extract_output(self, acc):
        return acc.to_dict()


class RerankStage(beam.PTransform):
    """(query id, merged QueryNeighbors) -> (per-query records written to OUTPUT/rerank-*.jsonl, summary)."""

    def __init__(self, spec: RerankSpec, output: str, class_names: Sequence[str], *, rule: VotingRule, k: int,
                 params: VotingParams, below: float, top_n: int, dry_run: bool):
        super().__init__()
        self._spec, self._output, self._class_names = spec, output, tuple(class_names)
        self._vote = dict(class_names=self._class_names, rule=rule, k=k, params=params, below=below, top_n=top_n,
                          dry_run=dry_run)

    def expand(self, merged):
        vote = self._vote
        sent_counter = Metrics.counter(_NAMESPACE, "rerank_sent")
        gated = (merged
                 | "BatchForGate" >> beam.BatchElements(min_batch_size=1, max_batch_size=256)
                 | "VoteAndGate" >> beam.FlatMap(lambda b: _vote_and_gate(b, **vote)))
        done = gated | "NotSent" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "done" else [])
        to_send = gated | "ToSend" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "send" else [])

        def counted(x):
            sent_counter.inc()
            return x
        answered = (to_send
                    | "Count" >> beam.Map(counted)
                    | "Rerank" >> RunInference(RerankModelHandler(self._spec, storage.join(self._output, CACHE_DIR)))
                    | "ToRecord" >> beam.Map(lambda r: RerankRecord.of(r.example[0], r.example[3], r.example[2],
                                                                       r.example[1].margin, r.inference)))
        records = (done, answered) | "AllRecords" >> beam.Flatten()
        files = (records | "Json" >> beam.Map(lambda r: json.dumps(r.to_dict()))
                 | "WriteRerank" >> beam.io.WriteToText(storage.join(self._output, RERANK_PREFIX),
                                                         file_name_suffix=".jsonl"))
        summary = records | "Tally" >> beam.CombineGlobally(_TallyFn())
        return files, summary
