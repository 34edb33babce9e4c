"""What a person changes on the page: the re-vote with entry weights changed, and publishing the changes.

**Re-vote.** The query's neighbours are searched once on the served version (`VisualMemory.search`, the
engine every caller uses) and decided twice by `memory.decide.classify.classify_neighbors`, the step
`VisualMemory.classify` ends with: with the version's entry weights (``before``, the answer `classify`
gives) and with the person's changes multiplied in instead (``after``). Excluding a neighbour sets its entry
weight to 0: it stays in the list and no longer votes, exactly what the version published by `apply_changes`
answers for the same query (an entry weight is multiplied into the rule's weight; `memory.decide.voting`).

**Apply.** The changes are merged into the latest version's entry weights and published as the next version
by `memory.store.mutations.publish_entry_weights`, the function ``vmem prune --mode soft`` publishes with
(a soft-pruning version: its params say `PUBLISHED_BY` and hold the changed ids and weights), with the
person's note in the change (``vmem history`` shows it). **Undo** (`undo_changes`) publishes the weights that version replaced, as one more
version, when no other change of the weights came after it: the history keeps both.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from memory.decide.classify import ClassifyOptions, classify_neighbors
from memory.decide.confidence import memory_calibration
from memory.decide.explain import Prediction
from memory.decide.voting import VotingParams
from memory.search.filters import Crowding, QueryFilter
from memory.store.manifest import Manifest
from memory.store.mutations import publish_entry_weights, read_entry_weights
from memory.store.versions import WriteConflictError, read_manifest, read_version
from memory.visual_memory import VisualMemory

__all__ = ["PUBLISHED_BY", "BadOption", "QueryOptions", "apply_changes", "parse_query_options", "revote",
           "undo_changes"]

# The params entry (WeightsRef.params["published_by"]) of entry weights published from the page: what `undo_changes`
# accepts to undo.
PUBLISHED_BY = "vmem serve"


class BadOption(ValueError):
    """A request option with a bad value: ``option`` names it, the message says what is allowed."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class QueryOptions:
    """A classify request's options, checked: the decision's options, the filter and the crowding."""
    classify: ClassifyOptions
    filters: QueryFilter | None = None
    crowding: Crowding | None = None


def parse_query_options(*, rule: str, k: int, tau: float | None, alpha: float | None, abstain_below: float | None,
                        filter_spec: str | None, crowding_spec: str | None, rerank=None,
                        rerank_below: float | None = None, rerank_top_n: int = 10) -> QueryOptions:
    """The options of ``vmem classify``, from a request, checked by the library's own checks.

    `VotingParams` checks tau and alpha, `ClassifyOptions` the rule, k, the abstention threshold and the
    re-rank gate, `QueryFilter.parse` and `Crowding.parse` the filter and crowding specs (the spellings of
    ``vmem classify --filter/--crowding``).

    Raises:
      BadOption: naming the option and what it allows.
    """
    defaults = VotingParams()
    try:
        params = VotingParams(softmax_tau=defaults.softmax_tau if tau is None else tau,
                              rank_alpha=defaults.rank_alpha if alpha is None else alpha)
    except ValueError as e:
        raise BadOption("tau" if tau is not None and "tau" in str(e) else "alpha", str(e)) from None
    checks = [("rule", dict(rule=rule)), ("k", dict(rule=rule, k=k)),
              ("abstain_below", dict(rule=rule, k=k, abstain_below=abstain_below))]
    for option, kwargs in checks:  # One option at a time, so the error names the one at fault.
        try:
            ClassifyOptions(**{"k": 1, **kwargs})
        except ValueError as e:
            raise BadOption(option, str(e)) from None
    if rerank is None and rerank_below is not None:
        raise BadOption("rerank_below", "this server has no re-ranker: start it with --rerank KIND:NAME to use the "
                                        "re-rank gate")
    try:
        options = ClassifyOptions(rule=rule, k=k, params=params, abstain_below=abstain_below, rerank=rerank,
                                  rerank_below=rerank_below, rerank_top_n=rerank_top_n)
    except ValueError as e:
        raise BadOption("rerank_below" if "below" in str(e) else "rerank_top_n", str(e)) from None
    try:
        query_filter = QueryFilter.parse(filter_spec) if filter_spec else None
    except ValueError as e:
        raise BadOption("filter", str(e)) from None
    try:
        crowding = Crowding.parse(crowding_spec) if crowding_spec else None
    except ValueError as e:
        raise BadOption("crowding", str(e)) from None
    return QueryOptions(options, query_filter, crowding)


def _changed_weights(ids: np.ndarray, weights: np.ndarray, changes: dict[str, float]) -> np.ndarray:
    out = weights.copy()
    for entry_id, w in changes.items():
        out[ids == entry_id] = w
    return out


def revote(memory: VisualMemory, embedding: Sequence[float], options: QueryOptions, changes: dict[str, float]
           ) -> tuple[Prediction, Prediction]:
    """The decision on one query's neighbours before and after the entry-weight ``changes`` ``{id: weight}``.

    Args:
      memory: The served version.
      embedding: The query's embedding (the memory's dim).
      options: The decision's options; a re-ranker in them is not asked (the re-vote is the neighbours' vote).
      changes: New entry weights of some entries (ids of this version's live entries).

    Returns:
      ``(before, after)``: before equals `VisualMemory.classify` of the embedding on this version.

    Raises:
      KeyError: an id of ``changes`` that is not a live entry of this version.
      ValueError: an embedding of the wrong dimension.
    """
    memory.get_uris(list(changes))  # KeyError naming ids that are not live entries.
    decide = dataclasses.replace(options.classify, rerank=None, rerank_below=None, rerank_cache=None)
    found = memory.search(np.asarray(embedding, dtype=np.float32)[None], decide.fetch, filters=options.filters,
                          crowding=options.crowding)
    base = found.weights if found.weights is not None else np.ones(found.distances.shape, np.float32)
    uris = memory.uris_of_results(found.ids)
    calibration = memory_calibration(memory.manifest)

    def decided(weights: np.ndarray | None) -> Prediction:
        return classify_neighbors(found.ids, found.labels, found.distances, weights, uris,
                                  class_names=memory.class_names, calibration=calibration, options=decide)[0]

    return decided(found.weights), decided(_changed_weights(found.ids, base, changes))


def _weights_table(root: str, manifest: Manifest) -> dict[str, float]:
    weights = read_entry_weights(root, manifest)
    if weights is None:
        return {}
    return dict(zip(np.asarray(weights[0]).astype(str).tolist(), np.asarray(weights[1], np.float64).tolist()))


def apply_changes(root: str, changes: dict[str, float], *, note: str, seen_version: int | None = None,
                  verify: bool = True) -> Manifest:
    """Publishes the latest version's entry weights with ``changes`` merged in as the next version.

    Args:
      root: The memory.
      changes: ``{id: weight}`` of live entries (weight 0 excludes an entry from the vote).
      note: The person's note, recorded in the version's change (``vmem history``).
      seen_version: The version the person looked at, recorded in the change's params.
      verify: Check the shard id files read against the manifest.

    Returns:
      The published manifest.

    Raises:
      KeyError: ids that are not live in the latest version. ConcurrentUpdateError / WriteConflictError:
        another writer published meanwhile (nothing was published; apply again).
    """
    base = read_manifest(root)
    table = _weights_table(root, base)
    table.update(changes)
    ids = sorted(table)
    params = {"rule": "set by a person", "published_by": PUBLISHED_BY, "changes": dict(sorted(changes.items())), "computed_on_version": base.version,
              "seen_version": seen_version, "replaced_weights": None if base.entry_weights is None
              else base.entry_weights.path}
    return publish_entry_weights(root, ids=ids, weights=np.asarray([table[i] for i in ids], np.float64),
                                 params=params, expected_version=base.version, note=note, verify=verify)


def undo_changes(root: str, version: int, *, note: str, verify: bool = True) -> Manifest:
    """Publishes, as the next version, the entry weights that ``version`` (a change applied by a person) replaced.

    Raises:
      ValueError: ``version`` is not a change of the entry weights made with `apply_changes`.
      WriteConflictError: the entry weights changed again after ``version`` (undo that change first).
      ManifestError: ``version`` or its parent no longer exists (purged).
    """
    target = read_version(root, version)
    ref = target.entry_weights
    if ref is None or ref.params.get("published_by") != PUBLISHED_BY or target.parent is None:
        raise ValueError(f"version {version} of {root} is not a change of entry weights applied from the page "
                         f"(its change: {target.change.get('summary', target.change.get('kind'))!r}); pick the "
                         "version `vmem history` lists for the apply")
    base = read_manifest(root)
    if base.entry_weights != ref:
        raise WriteConflictError.of(root, what=f"undo of version {version}", base=version, winner=base,
                                    clash="the entry weights changed after it; undo the later change first")
    parent = read_version(root, target.parent)
    previous = read_entry_weights(root, parent)
    ids = [] if previous is None else np.asarray(previous[0]).astype(str).tolist()
    weights = np.zeros(0) if previous is None else np.asarray(previous[1], np.float64)
    prev_ref = parent.entry_weights
    params = {**(dict(prev_ref.params) if prev_ref is not None else {}), "published_by": PUBLISHED_BY,
              "undoes_version": version}
    return publish_entry_weights(root, ids=ids, weights=weights, params=params, expected_version=base.version,
                                 note=note or f"undo of version {version}", verify=verify)
