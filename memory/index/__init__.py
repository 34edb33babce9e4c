"""The per-shard ScaNN index: build, serialise, load and search one shard's vectors.

`shard_index` (IndexConfig, IndexKind, ShardIndex), `template` (one index template trained for a whole
memory so hash shards search as one index), `scann_cpu` (ScaNN's SIMD kernels where the CPU has them).
Depends on nothing else in memory/ but storage, vectors and enums.
"""
