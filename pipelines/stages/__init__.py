"""The Beam stages jobs compose: one PTransform per stage, named for what it produces.

`embed` (EmbedImages through RunInference), `write` (WriteMemoryShards), `search_shards` (SearchShards: the
evaluate and prune jobs' fan-out over shards, searched with memory.search), `rerank` (the re-rank stage),
`train` (TrainRouter, TrainIndexTemplate: what a build trains on a sample), `progress` (rate and ETA lines).
"""
