"""The stored memory: what lies on disk (or gs://) and how a new version of it is published.

`manifest` (the versioned description of a memory), `versions` (atomic publish, history), `sharding` (stable
id -> shard assignment), `shard` (shard files), `blocks` (rows of entries as one value), `mutations` (add,
forget, weights), `compaction` (the re-index plan), `export` (clip-retrieval folders), `metadata` (per-entry
columns), `purge` (history and leftovers), `packed` (string columns as UTF-8 bytes + offsets).
"""
