"""The add job: publish new entries (images or precomputed embeddings) as delta shards of a new version.

Local (in-process runner)::

    vmem add --memory out/fmnist-memory --images data/new-images

Precomputed embeddings (a memory built with ``vmem build --embeddings``; the same ``--encoder-id``)::

    vmem add --memory out/laion-memory --embeddings 'clip:data/new-emb,label_column=label' --encoder-id NAME

Local with two worker processes::

    vmem add --memory out/fmnist-memory --images data/new-images \\
        --direct_running_mode=multi_processing --direct_num_workers=2

Dataflow (ship the code with setup.py, as for ``vmem build``)::

    vmem add --memory gs://BUCKET/memories/in1k --images gs://BUCKET/new-classes \\
        --runner=DataflowRunner --project=PROJECT --region=us-central1 \\
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

The graph (`job`; the modules below hold its parts) is ReadImages ─► RejectKnownIds ─► DecodeImages ─►
EmbedImages ─► ToBlocks ─► WriteDeltaShards ─► PublishAdd, every stage's failures going to
``dead_letter/add-vNNNNNN/``; precomputed embeddings replace the first four steps by ReadEmbeddings ─►
RejectKnownIds on blocks.

The launcher reads the memory's latest version n once. Images are decoded with the memory's preprocessing
and embedded with the memory's own encoder (``manifest.build_config["encoder"]``); a worker that ran a
different encoder (name, content hash or dim) fails the job before anything is written. Precomputed
embeddings can only be added to a memory built from precomputed embeddings of the same ``--encoder-id`` and
dim (checked at launch, before anything is read). Ids already live in version n, ids forgotten but still
physically present (until ``vmem reindex``) and ids given twice in this add become dead letters (reasons
``duplicate_id`` / ``forgotten_id``), never a failed job.

Bounded memory per worker, as in the build (pipelines/stages/write.py): entries travel as `EntryBlock`s; known ids
are rejected by an id-hash bucketed join (for blocks only ids and uris are joined); rows are spilled to
files per delta shard (``deltas/v{n+1:06d}-<job id>/.spill/``) and the GroupByKey moves only (delta shard,
spill file) references, so one worker holds one delta shard. There are ``max(1, ceil(entries /
--delta-shard-size))`` brute-force delta shards, an entry going to ``shard_for_id(id, count)``.

Atomic under retries: every attempt at a delta shard writes its own directory
``deltas/v{n+1:06d}-<job id>/delta-IIIII-of-CCCCC-<attempt>``; one final step publishes version n+1 naming
the attempts that count, with the memory's class names extended append-only (old label indices never
change), then deletes the other attempts and the spill files. A retried publish step that finds its own
version n+1 succeeds; if someone else published meanwhile, the job fails with ConcurrentUpdateError and
nothing is published: re-run it. Added entries are searched exactly (brute force) at once by
``VisualMemory``, ``vmem classify`` and ``vmem evaluate``.

Anything that is not an add flag is passed to Beam's PipelineOptions.

Modules: `plan` (the launch-time AddPlan, encoder checks, and the publish of version n+1), `known_ids`
(RejectKnownIds: the id-hash bucketed join), `delta_shards` (WriteDeltaShards), `job` (flags, the typed
`add_pipeline(p, *, ...)`, the typed `add_to_memory(*, memory, source, ...)` that runs it, and `launch` /
`run`, which parse flags into it). Experiments and examples call `add_to_memory`. Printing what was added is
``vmem add``'s (vmem/add.py).
"""

from pipelines.add.delta_shards import WriteDeltaShards, delta_shard_path
from pipelines.add.job import PublishAdd, add_pipeline, add_to_memory, build_arg_parser, launch, run
from pipelines.add.known_ids import RejectKnownIds, RejectKnownIdsInBlocks, id_buckets
from pipelines.add.plan import (DEFAULT_DELTA_SHARD_SIZE, AddError, AddPlan, check_precomputed_identity, plan_add,
                                publish_add_version, published_add, remove_add_leftovers)

__all__ = ["AddError", "AddPlan", "DEFAULT_DELTA_SHARD_SIZE", "PublishAdd", "RejectKnownIds", "RejectKnownIdsInBlocks",
           "WriteDeltaShards", "add_pipeline", "add_to_memory", "build_arg_parser", "check_precomputed_identity",
           "delta_shard_path", "id_buckets", "launch", "plan_add", "publish_add_version", "published_add", "remove_add_leftovers",
           "run"]
