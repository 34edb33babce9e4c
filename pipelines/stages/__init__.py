"""The Beam stages jobs compose: one PTransform per stage, named for what it produces.

`embed` (EmbedImages: the encoder run a batch ahead), `write` (WriteMemoryShards), `search_shards` (SearchMemory:
the evaluate and prune jobs' search of every shard, shuffled to the shards or broadcast, searched with
memory.search), `rerank` (the re-rank stage),
`train` (TrainRouter, TrainIndexTemplate: what a build trains on a sample), `progress` (rate and ETA lines).
"""
