"""Hash shards built from one index template and searched as one index (memory.index.template)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from memory.build import build_memory_local
from memory.search.filters import QueryFilter
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.mutations import forget
from memory.index.template import TEMPLATE_DIR, can_merge, load_merged, merge_runs, template_config
from memory.search.tuning import exact_search
from memory.visual_memory import VisualMemory
from tests.memory.helpers import ENCODER, clustered

N, D, SHARDS = 4000, 32, 4
TREE = IndexConfig(kind=IndexKind.TREE_AH, reorder=200, training_sample_size=2000)


def _build(root, *, sharding="hash", config=TREE, seed=0):
    x, q = clustered(N, D, centres=40, noise=0.3, seed=seed, nq=100)
    ids = [f"e{i:05d}" for i in range(N)]
    build_memory_local(str(root), ids=ids, labels=[f"c{i % 5}" for i in range(N)], uris=[f"/img/{i}" for i in ids],
                       embeddings=x, num_shards=SHARDS, index_config=config, encoder_identity=ENCODER,
                       sharding=sharding)
    return x, q


def _scann_dirs(root):
    mem = VisualMemory.open(str(root), merge_shards=False)
    return [os.path.join(str(root), info.path, "scann") for info in mem.manifest.shards]


def test_merge_runs_are_maximal_runs_of_one_template():
    assert merge_runs(["a", "a", "a", None, "b", "b", "c"]) == [(0, 3), (4, 6)]
    assert merge_runs(["a", "b", "a"]) == []
    assert merge_runs([None, None]) == []
    assert merge_runs([]) == []


def test_template_config_sizes_the_tree_for_the_whole_memory():
    cfg = template_config(IndexConfig(kind=IndexKind.AUTO), total_entries=1_000_000, sample_size=250_000)
    assert cfg.kind is IndexKind.TREE_AH and cfg.num_leaves == 1000 and cfg.training_sample_size == 250_000
    assert cfg.num_leaves_to_search == IndexConfig().resolve_leaves(1_000_000)[1]
    # An explicit leaf count is kept; the sample bounds it (k-means needs a point per leaf).
    assert template_config(IndexConfig(num_leaves=500), 1_000_000, 100).num_leaves == 100


def test_hash_tree_shards_share_one_template_and_search_as_one_index(tmp_path):
    x, q = _build(tmp_path / "m")
    mem = VisualMemory.open(str(tmp_path / "m"))
    ref = mem.manifest.build_config["index_template"]
    assert ref["path"] == f"{TEMPLATE_DIR}/{ref['id'][:16]}" and os.path.isdir(tmp_path / "m" / ref["path"])
    # The template keeps what was trained, no entry's row: forgetting leaves no copy of an embedding there.
    template_rows = np.load(tmp_path / "m" / ref["path"] / "dataset.npy")
    assert template_rows.shape[0] == 0 and not os.path.exists(tmp_path / "m" / ref["path"] / "hashed_dataset.npy")
    metas = [json.load(open(os.path.join(d, "vmem_index.json"))) for d in _scann_dirs(tmp_path / "m")]
    assert {m["template_id"] for m in metas} == {ref["id"]}
    assert mem.searched_as == [tuple(info.name for info in mem.manifest.shards)]
    assert VisualMemory.open(str(tmp_path / "m"), merge_shards=False).searched_as == [
        (info.name,) for info in mem.manifest.shards]

    # Probing every leaf and re-ranking deep, the merged index is exact: its rows map back to the right ids.
    full = mem.with_search_params(leaves_fraction=1.0, reorder=N).search(q, 10)
    want_ids, _, want_dist = exact_search(mem, q, 10)
    np.testing.assert_array_equal(full.ids, want_ids)
    np.testing.assert_allclose(full.distances, want_dist, atol=1e-5)
    labels = mem.labels_of(full.ids)
    np.testing.assert_array_equal(full.labels, labels)
    # At the default setting it keeps (nearly) every true neighbour.
    found = mem.search(q, 10).ids
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), want_ids.tolist())])
    assert recall >= 0.95


def test_merged_search_skips_forgotten_rows_and_applies_filters(tmp_path):
    root = str(tmp_path / "m")
    x, q = _build(root)
    ids = np.array([f"e{i:05d}" for i in range(N)])
    gone = ids[1::7].tolist()
    forget(root, ids=gone, label="c3")
    mem = VisualMemory.open(root).with_search_params(leaves_fraction=1.0, reorder=N)
    assert len(mem.searched_as) == 1
    found = mem.search(q, 10)
    dead = set(gone) | {i for j, i in enumerate(ids.tolist()) if j % 5 == 3}
    assert not dead & set(found.ids.ravel().tolist())
    want_ids, _, _ = exact_search(mem, q, 10)
    np.testing.assert_array_equal(found.ids, want_ids)
    # A query near forgotten class c3 only: the over-fetch runs short, the live brute-force index (over all
    # four merged shards' rows) answers it exactly.
    c3 = x[3::5][:5]
    np.testing.assert_array_equal(mem.search(c3, 10).ids, exact_search(mem, c3, 10)[0])
    # Filters: the merged search admits only the asked labels, like the per-shard one.
    only = QueryFilter(labels=("c1",))
    merged = mem.search(q, 5, filters=only)
    per_shard = VisualMemory.open(root, merge_shards=False).with_search_params(
        leaves_fraction=1.0, reorder=N).search(q, 5, filters=only)
    np.testing.assert_array_equal(merged.ids, per_shard.ids)
    assert set(mem.label_names(merged.labels).ravel().tolist()) == {"c1"}


def test_shards_of_two_templates_do_not_merge(tmp_path):
    _build(tmp_path / "a", seed=0)
    _build(tmp_path / "b", seed=1)
    a, b = _scann_dirs(tmp_path / "a"), _scann_dirs(tmp_path / "b")
    assert can_merge(a) is None
    mixed = [a[0], b[1]]
    assert "not all built from one index template" in can_merge(mixed)
    with pytest.raises(ValueError, match="cannot search 2 shards as one index"):
        load_merged(mixed)
    # Same template id recorded but a codebook file that differs (tampered): refused, not searched wrongly.
    tampered = str(tmp_path / "t")
    shutil.copytree(b[1], tampered)
    meta_path = os.path.join(tampered, "vmem_index.json")
    meta = json.load(open(meta_path))
    meta["template_id"] = json.load(open(os.path.join(a[0], "vmem_index.json")))["template_id"]
    json.dump(meta, open(meta_path, "w"))
    assert can_merge([a[0], tampered]) == "the shards' partitioners or codebooks differ"


def test_routed_and_brute_force_memories_keep_one_index_per_shard(tmp_path):
    _build(tmp_path / "p", sharding="partition")
    routed = VisualMemory.open(str(tmp_path / "p"))
    assert "index_template" not in routed.manifest.build_config
    assert len(routed.searched_as) == SHARDS
    _build(tmp_path / "bf", config=IndexConfig(kind=IndexKind.BRUTE_FORCE))
    brute = VisualMemory.open(str(tmp_path / "bf"))
    assert "index_template" not in brute.manifest.build_config and len(brute.searched_as) == SHARDS


def test_a_probe_of_too_few_rows_pads_with_blanks_not_fake_hits(tmp_path):
    """ScaNN scores the missing hits of a batch NaN (row 0): they come back as padding, at the end."""
    _build(tmp_path / "m")
    mem = VisualMemory.open(str(tmp_path / "m")).with_search_params(leaves_fraction=1e-6, reorder=10)
    x, q = clustered(N, D, centres=40, noise=0.3, seed=0, nq=100)
    res = mem.search(q, 200)  # One probed leaf of a ~4000-row memory holds far fewer than 200 rows.
    pad = res.ids == ""
    assert pad.any() and not np.isnan(res.distances).any()
    assert np.isinf(res.distances[pad]).all() and np.isfinite(res.distances[~pad]).all()
    assert (res.labels[pad] == -1).all()
    # Padding only after the hits, and every hit is a distinct entry.
    for row_pad, row_ids in zip(pad, res.ids):
        first = int(np.argmax(row_pad)) if row_pad.any() else len(row_pad)
        assert row_pad[first:].all() and len(set(row_ids[:first].tolist())) == first
