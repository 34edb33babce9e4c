"""WriteDeltaShards: the add job's new entries as brute-force delta shards, one attempt directory each.

Rows are spilled to files per delta shard and one worker writes one delta shard from its spill files
(pipelines.stages.write.SpillBlocks), dropping ids the join rejected and ids given twice in this add.
"""

from __future__ import annotations

import functools
import logging
import secrets

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from memory import storage
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.mutations import DELTAS_DIR
from memory.store.shard import ShardData, write_shard
from memory.store.sharding import shard_for_id
from pipelines.add.plan import AddPlan, check_worker_identity
from pipelines.io.readers import FAILED_TAG, failed_record
from pipelines.records import EntryBlock, Stage
from pipelines.stages.write import SPILL_ROWS, SpillBlocks, dedupe_block, read_spills

_LOG = logging.getLogger("visual_memory")
_NAMESPACE = "visual_memory"

__all__ = ["WriteDeltaShards", "delta_shard_path"]


def _delta_assign(block: EntryBlock, count: int, identities, *, memory_identity: dict) -> np.ndarray:
    """Delta shard of each row: ``shard_for_id(id, count)``. Refuses another encoder before a byte is spilled."""
    for identity in identities:
        check_worker_identity(memory_identity, identity)
    return np.fromiter((shard_for_id(i, count) for i in block.ids.tolist()), np.int64, len(block))


def _rejected_by_delta_shard(ids: np.ndarray, count: int):
    of = np.fromiter((shard_for_id(i, count) for i in ids.tolist()), np.int64, len(ids))
    for shard in np.unique(of).tolist():
        yield int(shard), ids[of == shard]


def delta_shard_path(plan: AddPlan, index: int, count: int) -> tuple[str, str]:
    """(name, root-relative path of a fresh attempt) of delta shard ``index`` of ``count``."""
    leaf = f"delta-{index:05d}-of-{count:05d}"
    return f"{DELTAS_DIR}-{plan.version_tag}-{leaf}", f"{plan.delta_dir}/{leaf}-{secrets.token_hex(4)}"


class _WriteDeltaShardFn(beam.DoFn):
    """(delta shard, {spill paths, rejected ids}) -> (index, ShardInfo) after writing one attempt directory."""

    def __init__(self, plan: AddPlan):
        self._plan = plan
        self._written = Metrics.counter(_NAMESPACE, "entries_added")

    def process(self, element, class_names, count, identities):
        for identity in identities:
            # Checked before writing, so a wrong encoder leaves no delta shard behind.
            check_worker_identity(self._plan.encoder_identity, identity)
        index, grouped = element
        paths = sorted(grouped["spills"])
        if not paths:
            return  # Every row hashing here was rejected: no delta shard.
        block = read_spills(paths)
        rejected = [r for r in grouped["rejected"]]
        if rejected:
            block = block.take(np.flatnonzero(~np.isin(block.ids, np.concatenate(rejected))))
        kept, dups = dedupe_block(block)  # Ids given twice in this add: the first by uri is kept.
        for d, k in dups:
            yield failed_record(str(block.ids[d]), str(block.uris[d]), "duplicate_id",
                                f"id given twice in this add; kept {block.uris[k]}", Stage.EMBED)
        del block
        if not len(kept):
            return
        class_index = {name: i for i, name in enumerate(class_names)}
        labels = np.fromiter((class_index[label] for label in kept.labels.tolist()), np.int32, len(kept))
        data = ShardData(ids=kept.ids, labels=labels, uris=kept.uris, embeddings=kept.embeddings)
        del kept
        name, rel = delta_shard_path(self._plan, index, count)
        # One directory per attempt: a retried or zombie attempt never overwrites the files of another; the
        # publish step names the attempt that counts.
        info = write_shard(storage.join(self._plan.root, rel), data, name=name, root_relative_path=rel,
                           index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE))
        self._written.inc(info.count)
        _LOG.info("wrote delta shard %s: %d entries", rel, info.count)
        yield index, info


class WriteDeltaShards(beam.PTransform):
    """EntryBlock -> ((index, ShardInfo) of each written delta shard, FailedRecords for ids repeated in the add).

    There are ``count`` delta shards (a singleton PCollection: ``max(1, ceil(entries / target))``); a row goes
    to ``shard_for_id(id, count)``. Rows are spilled to files per delta shard (`pipelines.stages.write.SpillBlocks`)
    and one worker writes one delta shard from its spill files, dropping the rows whose id is in
    ``rejected`` (arrays of ids; may be empty). Labels map through ``class_names`` (a singleton: old names,
    then new ones).
    """

    def __init__(self, plan: AddPlan, *, count, class_names, identities, rejected=None, spill_rows: int = SPILL_ROWS):
        super().__init__()
        self._plan = plan
        self._count = count
        self._class_names = class_names
        self._identities = identities
        self._rejected = rejected
        self._spill_rows = spill_rows

    def expand(self, blocks):
        plan = self._plan
        count = beam.pvalue.AsSingleton(self._count)
        assign = functools.partial(_delta_assign, memory_identity=plan.encoder_identity)
        spilled = blocks | "SpillByDeltaShard" >> beam.ParDo(
            SpillBlocks(plan.spill_dir, assign, self._spill_rows), count, beam.pvalue.AsList(self._identities))
        rejected = (self._rejected if self._rejected is not None
                    else blocks.pipeline | "NoRejectedIds" >> beam.Create([]))
        rejected = rejected | "RejectedByDeltaShard" >> beam.FlatMap(_rejected_by_delta_shard, count)
        results = (
            {"spills": spilled, "rejected": rejected}
            | "GroupByDeltaShard" >> beam.CoGroupByKey()
            | "WriteDeltaShard" >> beam.ParDo(
                _WriteDeltaShardFn(plan), class_names=beam.pvalue.AsSingleton(self._class_names),
                count=count, identities=beam.pvalue.AsList(self._identities),
            ).with_outputs(FAILED_TAG, main="infos"))
        return results.infos, results[FAILED_TAG]
