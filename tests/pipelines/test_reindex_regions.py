"""Re-index of a region memory: forgotten images leave with all their entries, the grid and every image's
region entries stay."""

from __future__ import annotations

import collections

import numpy as np

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.regions.layout import GRID_KEY, region_grid, region_ids
from memory.store import mutations
from memory.store.versions import read_manifest
from memory.visual_memory import VisualMemory
from pipelines import reindex

D = 8
GRID = 2


def test_reindex_after_forgetting_an_image_keeps_images_whole(tmp_path):
    rng = np.random.default_rng(0)
    images = [f"img{i:02d}" for i in range(10)]
    ids = np.concatenate([np.asarray(images)[:, None], region_ids(images, GRID)], axis=1).ravel().tolist()
    labels = np.repeat(["a", "b"] * 5, 1 + GRID * GRID).tolist()
    root = str(tmp_path / "memory")
    build_memory_local(root, ids=ids, labels=labels, uris=[""] * len(ids), embeddings=rng.normal(size=(len(ids), D)),
                       num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity={"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": D,
                                         "preprocess": {}}, build_config={GRID_KEY: GRID})
    before = VisualMemory.open(root)
    q = rng.normal(size=(3, D))
    mutations.forget(root, ids=["img03"])
    expected = VisualMemory.open(root).search(q, 20)
    reindex.run(["--memory", root])
    manifest = read_manifest(root)
    assert manifest.change["kind"] == "reindex" and manifest.forgotten is None and region_grid(manifest) == GRID
    after = VisualMemory.open(root)
    assert manifest.physical_total == len(before) - (1 + GRID * GRID)
    per_image = collections.Counter(i.split("#r")[0] for i in after.live_entry_ids().tolist())
    assert "img03" not in per_image and set(per_image.values()) == {1 + GRID * GRID}
    got = after.search(q, 20)
    np.testing.assert_array_equal(got.ids, expected.ids)
