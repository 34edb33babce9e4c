"""Searching a memory: the shard-search unit every caller uses, the exact cross-shard merge, routing.

`shard_search` (search one unit of shards, live rows only, filters and crowding), `merge` (exact top-k
merge of partial results), `routing` (the partition router), `filters` (filters and crowding), `tuning`
(the cheapest search setting whose votes agree with exact search).
"""
