"""The evaluate job's shard search uses the memory's recorded (`vmem tune`) search setting."""

from __future__ import annotations

import numpy as np

from memory.index.shard_index import IndexKind
from memory.store.versions import read_manifest
from memory.store.shard import search_units
from memory.search.setting import SearchSetting, default_setting
from memory.search.tuning import publish_search_defaults
from memory.visual_memory import VisualMemory
from tests.memory.search.test_tuning import tuning_memory


def test_the_evaluate_job_searches_with_the_recorded_setting(tmp_path):
    """What SearchShardFn runs (shards loaded on a worker, tuned there) equals VisualMemory.open's search."""
    from pipelines.stages.search_shards import QueryBatch, SearchShardFn, merge_batch_neighbors
    root, mem, x, ids, q, true = tuning_memory(tmp_path, IndexKind.TREE_AH)
    setting = SearchSetting(leaves_fraction=1 / 64, reorder=10)  # Cheap: differs from the build's setting.
    publish_search_defaults(root, {"chosen": {**setting.to_dict(), "qps": 1.0, "recall": 0.5, "agreement": 0.99,
                                              "accuracy": 50.0},
                                   "criteria": {"rule": "rank", "k": 10}, "exact": {"accuracy": 50.0, "queries": 1}})
    m = read_manifest(root)
    from vmem.info import describe
    assert "search       leaves 0.01562, reorder 10 (vmem tune: votes agree with exact search on 99.00% of 1" \
        in describe(m)
    # The job searches what VisualMemory.open does: hash shards built from one index template as one index.
    units = search_units(root, m)
    assert units == [tuple(range(len(m.shards)))]
    fn = SearchShardFn(root, m, 10, setting=default_setting(m), units=units)
    fn.setup()
    batch = QueryBatch(tuple(f"q{i}" for i in range(len(q))), ("c0",) * len(q), ("",) * len(q), q)
    parts = [b for u in range(len(units)) for _, b in fn.process((u, [("q0", batch)]))]
    merged = merge_batch_neighbors(parts, 10)
    assert merged.ids == batch.ids
    job = merged.neighbors.ids
    tuned = VisualMemory.open(root).search(q, 10).ids
    build = VisualMemory.open(root, search_defaults=False).search(q, 10).ids
    np.testing.assert_array_equal(job, tuned)
    assert (tuned != build).any()  # The recorded setting really changed the search.
