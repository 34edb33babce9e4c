"""The re-index job: fold delta shards into the main shards and drop forgotten rows physically.

Local (in-process runner)::

    vmem reindex --memory out/fmnist-memory
    vmem reindex --memory out/fmnist-memory --if-needed --delta-threshold 0.1 --forgotten-threshold 0.1
    python vmem/reindex.py --memory out/fmnist-memory --target-shard-size 50000   # the Flex Template launcher's

Local with two worker processes::

    vmem reindex --memory out/fmnist-memory --direct_running_mode=multi_processing --direct_num_workers=2

Dataflow (ship the code with setup.py, as for ``vmem build``; scheduled runs: docs/scheduling.md)::

    vmem reindex --memory gs://BUCKET/memories/in1k --if-needed \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

The graph::

    ListSourceShards ─► SpreadSources ─┬► ScanSources ─┬► summaries ─► CollectSummaries ─► Plan (side input)
                                       │               └► delta rows, spilled ───┐
                                       └► ReadLiveRows ─► main rows, spilled ────┤
    RebuiltTargets ──────────────────────────────────────────────────────────────┴► GroupByTarget ─►
        WriteTargetShard ─► Publish (last, once)

Where the work happens (bounded memory on the launcher and in the graph): the launcher reads only the
latest version n (its manifest, and the version files, for a pending ``--purge-history``) and decides from
its counts alone whether a re-index is needed and the target shard count (``ceil(live / N)``, live =
ShardInfo counts minus the tombstone count). It reads no shard, no tombstone list (which can hold millions
of ids), no router and no weights file, and the DoFns carry the manifest and paths only. Workers read the
rest, each the shard it processes (one shard per element after a Reshuffle), the tombstone list once per
worker process, the router once per DoFn instance:

* ScanSources: a main shard's ids (the id column only) -> its ShardSummary (rows, forgotten rows, ids that
  hash to another shard). A delta shard (always a source) is read in full: every row's target shard is
  computed once -- ``shard_for_id(id, target count)``, or ``router.assign(embedding)`` for a partition-routed
  memory -- and that one result both feeds its summary (rows per target) and spills its live rows, so the
  plan and the rows agree row for row (recomputing a nearest centroid elsewhere could break a
  floating-point tie differently).
* Plan: the summaries (a few counts per shard) are combined into the plan (memory.store.compaction
  .plan_from_summaries): with an unchanged shard count, a main shard holding no forgotten row and receiving
  no delta row is *reused* as is (same directory); every other target shard is *rebuilt*. Counting
  forgotten rows per shard needs the ids (tombstones say which ids, not where they are stored), and so does
  verifying the hash partition, so that pass is on the workers; it reads ids, never embeddings.
* ReadLiveRows: each main shard the plan reads (changed ones; all of them when the shard count changes) is
  read, forgotten rows are dropped and live rows go to ``shard_for_id(id, target count)`` (a routed
  memory's rows stay in their shard).
* Rows never travel as per-entry elements: blocks of <= BLOCK_ROWS rows are spilled by target shard to
  files under ``shards/r{n+1:06d}-<job id>/.build-tmp/`` (pipelines.stages.write.SpillBlocks), the GroupByKey moves
  only (target, spill file) references, and the worker writing a target shard reads its spill files, holding
  one shard. Each rebuilt shard is written with the memory's IndexConfig into a NEW directory
  ``shards/r{n+1:06d}-<job id>/shard-IIIII-of-NNNNN`` (never a path a published version uses).

Known limits: each worker process holds the whole tombstone list (sorted ids, read once; a re-index is due
by default once forgotten rows pass 10% of stored rows) -- a join bucketed by id hash, like ``vmem add``'s
RejectKnownIds, would bound that too; and the publish step reads the entry weights file to drop forgotten
ids from it.

One final step publishes version n+1 (change kind ``reindex``: rebuilt and reused shard names, dropped
forgotten rows, folded delta rows) with no delta shards, no tombstones and the entry weights minus forgotten
ids, then deletes the spill files. If a forget since the last re-index asked for ``--purge-history``, the
old versions and the shard files that still hold forgotten embeddings are then deleted
(memory.store.mutations.purge_history). A shard that disagrees with the manifest (row count) fails the job on the
worker that reads it; nothing is published.

``vmem reindex`` (vmem/reindex.py) runs the job and prints what was rebuilt and reused; its exit status: 0
re-indexed and published; 10 nothing to do (``--if-needed`` and below both thresholds; the reason is printed;
``--nothing-to-do-status`` changes it, e.g. 0 under a scheduler); 2 a bad flag; 1 failure, including no
memory at --memory and a concurrent publish (another writer published version n+1 first: nothing of this run
is live; re-run it).

Crash safety: until the final publish nothing a version references is touched, so a re-index killed at any
step leaves the memory exactly at version n. A killed run leaves its ``shards/r{n+1:06d}-<job id>/``
directory (spill files included) behind; it is never referenced (the next run picks a new job id). After each
successful publish the job deletes such orphans: ``shards/rNNNNNN-*`` directories with NNNNNN <= the latest
version that no existing version references (a run that would publish NNNNNN can no longer do so), and the
``.build-tmp/`` spill files a run killed right after its publish left in its referenced directory. Orphans of
other jobs (``deltas/``, ``tombstones/``, ``weights/`` files of a crashed add/forget/prune) are left alone.

Anything that is not a re-index flag is passed to Beam's PipelineOptions.

Modules: `plan` (the launcher's ReindexJob, from the manifest alone), `stages` (the workers' scan, spill and
rebuild DoFns), `commit` (the last step: publish version n+1, purge, remove orphans), `job` (flags, the typed
`build_pipeline(p, job)`, `execute` and `run`).
"""

from pipelines.reindex.job import build_arg_parser, build_pipeline, check_args, execute, parse_flags, prepare, run
from pipelines.reindex.plan import ReindexError, ReindexJob, finish_pending_purge, prepare_job, published_by
from pipelines.reindex.commit import assemble_manifest, publish, remove_orphans

__all__ = ["ReindexError", "ReindexJob", "assemble_manifest", "build_arg_parser", "build_pipeline", "check_args",
           "execute", "finish_pending_purge", "parse_flags", "prepare", "prepare_job", "publish", "published_by",
           "remove_orphans", "run"]
