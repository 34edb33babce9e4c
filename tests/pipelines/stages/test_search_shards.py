"""The search stages: batch-keyed partial answers merge exactly, threaded unit searches answer as one thread."""

from __future__ import annotations

import numpy as np
import pytest

from memory.store.versions import read_manifest
from memory.search.shard_search import LoadedShard, merge_partials
from pipelines.stages.search_shards import BatchNeighbors, QueryBatch, SearchShardFn, merge_batch_neighbors
from tests.pipelines.test_evaluate import unit_rows, synthetic_memory  # noqa: F401  (the fixture, reused)


@pytest.fixture(scope="module")
def memory(synthetic_memory):  # noqa: F811  (pytest injects the imported fixture)
    return synthetic_memory[0]


@pytest.mark.parametrize("seed", range(4))
def test_batch_merge_equals_the_per_query_merge(memory, seed):
    """Units answering different subsets of a batch (routing) merge, in any grouping, to each query's merge."""
    manifest = read_manifest(memory)
    shards = [LoadedShard.load(memory, info) for info in manifest.shards]
    rng = np.random.default_rng(seed)
    q = unit_rows(rng, 20, 16)
    qids = tuple(f"q{i:02d}" for i in range(20))
    visits = rng.random((20, 4)) < 0.5
    visits[np.arange(20), rng.integers(0, 4, 20)] = True  # Every query searches at least one unit.
    parts = []
    for s, shard in enumerate(shards):
        rows = np.flatnonzero(visits[:, s])
        parts.append(BatchNeighbors(tuple(qids[i] for i in rows), tuple(f"t{i}" for i in rows),
                                    tuple(f"/q/{i}" for i in rows), shard.search(q[rows], 7)))
    order = rng.permutation(4)
    one = merge_batch_neighbors([parts[i] for i in order], 7)
    nested = merge_batch_neighbors([merge_batch_neighbors(parts[:2], 7), merge_batch_neighbors(parts[2:], 7)], 7)
    for merged in (one, nested):
        assert sorted(merged.ids) == list(qids)
        for i, qid in enumerate(merged.ids):
            j = qids.index(qid)
            assert (merged.labels[i], merged.uris[i]) == (f"t{j}", f"/q/{j}")
            # The per-query merge of the same partial rows (searching one query alone may round differently).
            expected = merge_partials([p.neighbors.row(p.ids.index(qid)) for p in parts if qid in p.ids], 7)
            np.testing.assert_array_equal(merged.neighbors.ids[i], expected.ids[0])
            np.testing.assert_array_equal(merged.neighbors.distances[i], expected.distances[0])


def test_threaded_unit_search_answers_as_one_thread_in_order(memory):
    """Batches searched on a pool come back in input order with the one-thread answers, filters included."""
    from memory.search.filters import QueryFilter
    manifest = read_manifest(memory)
    rng = np.random.default_rng(9)
    batches = []
    for b in range(9):
        q = unit_rows(rng, 13, 16)
        ids = tuple(f"b{b}q{i}" for i in range(13))
        filters = tuple(QueryFilter(labels=("c1", "c2")).to_dict() if i % 2 else None for i in range(13)) \
            if b == 4 else None  # One filtered batch in the middle.
        batches.append((ids[0], QueryBatch(ids, ("c0",) * 13, ("",) * 13, q, filters)))
    answers = []
    for threads in (1, 2, 3):
        fn = SearchShardFn(memory, manifest, 6, threads=threads)
        fn.setup()
        answers.append(list(fn.process((2, batches))))
        fn.teardown()
    one = answers[0]
    assert [key for key, _ in one] == [key for key, _ in batches]
    assert set(one[4][1].neighbors.labels[1::2].ravel().tolist()) <= {1, 2}  # The filter was applied.
    for other in answers[1:]:
        assert [key for key, _ in other] == [key for key, _ in one]
        for (_, a), (_, b) in zip(one, other):
            assert a.ids == b.ids
            np.testing.assert_array_equal(a.neighbors.ids, b.neighbors.ids)
            np.testing.assert_array_equal(a.neighbors.distances, b.neighbors.distances)


def test_search_threads_must_be_positive(memory):
    with pytest.raises(ValueError, match="search threads must be an int >= 1, got 0"):
        SearchShardFn(memory, read_manifest(memory), 5, threads=0)


def test_auto_join_broadcasts_small_memories_only(memory, monkeypatch):
    from pipelines.stages import search_shards
    manifest = read_manifest(memory)
    assert search_shards.memory_vector_bytes(manifest) == 300 * 16 * 4
    assert search_shards.resolve_join("auto", manifest) is search_shards.SearchJoin.BROADCAST
    assert search_shards.resolve_join("shuffle", manifest) is search_shards.SearchJoin.SHUFFLE
    monkeypatch.setattr(search_shards, "BROADCAST_MAX_BYTES", 300 * 16 * 4 - 1)
    assert search_shards.resolve_join(search_shards.SearchJoin.AUTO, manifest) is search_shards.SearchJoin.SHUFFLE
    assert search_shards.resolve_join("broadcast", manifest) is search_shards.SearchJoin.BROADCAST
    with pytest.raises(ValueError, match="search join 'gather': use one of auto, broadcast, shuffle"):
        search_shards.resolve_join("gather", manifest)


def test_broadcast_search_loads_each_unit_once_for_every_batch(memory, monkeypatch):
    """The broadcast join's worker loads the memory once, however many batches and bundles it searches."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from memory.search import shard_search
    from pipelines.records import EmbeddedImage
    from pipelines.stages.search_shards import SearchMemory
    loads = []
    real_load = shard_search.LoadedShard.load.__func__
    monkeypatch.setattr(shard_search.LoadedShard, "load",
                        classmethod(lambda cls, *a, **kw: loads.append(a[1]) or real_load(cls, *a, **kw)))
    manifest = read_manifest(memory)
    q = unit_rows(np.random.default_rng(5), 90, 16)
    queries = [EmbeddedImage(f"q{i:02d}", f"/q/{i}", "c1", q[i]) for i in range(90)]
    with TestPipeline(runner="FnApiRunner") as p:
        merged = p | beam.Create(queries) | SearchMemory(memory, manifest, k=5, join="broadcast", batch_size=4)
        assert_that(merged | beam.Keys(), equal_to([f"q{i:02d}" for i in range(90)]))
    assert len(loads) == len(manifest.shards) == 4
