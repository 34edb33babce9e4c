"""A tiny region memory end to end without an encoder: build, search by entry kind, forget whole images,
classify by regions (MaxSim) where the global vector fails."""

from __future__ import annotations

import numpy as np
import pytest

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.regions.aggregate import RegionRule
from memory.regions.classify import IMAGES_ONLY, REGIONS_ONLY, classify_regions
from memory.regions.layout import GRID_KEY, is_region_id, region_grid, region_ids
from memory.regions.pooling import region_vectors
from memory.search.filters import QueryFilter
from memory.store import mutations
from memory.visual_memory import VisualMemory

D = 24
GRID = 2
ENC = {"name": "fake-encoder", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}
CLASSES = ("ant", "bee", "cat")


def _maps(rng, classes, quadrants, *, clutter):
    """Feature maps [n, 4, 4, D]: a background common to all images plus noise, and the class's object
    pattern in one 2 x 2 quadrant; ``clutter`` adds a large random vector to each other quadrant."""
    protos = np.eye(D, dtype=np.float32)[:len(CLASSES)] * 4.0
    base = np.zeros(D, np.float32)
    base[len(CLASSES):] = 1.0
    maps = np.tile(base, (len(classes), 4, 4, 1)) + 0.05 * rng.normal(size=(len(classes), 4, 4, D))
    for i, (c, quad) in enumerate(zip(classes, quadrants)):
        for other in range(4):
            r, col = divmod(other, 2)
            if other == quad:
                maps[i, 2 * r:2 * r + 2, 2 * col:2 * col + 2] += protos[CLASSES.index(c)]
            elif clutter:
                maps[i, 2 * r:2 * r + 2, 2 * col:2 * col + 2] += clutter * np.abs(rng.normal(size=D))
    return maps.astype(np.float32)


@pytest.fixture()
def region_memory(tmp_path):
    rng = np.random.default_rng(0)
    classes = [CLASSES[i % 3] for i in range(12)]
    vectors = region_vectors(_maps(rng, classes, [i % 4 for i in range(12)], clutter=0.0), GRID)
    images = [f"img{i:02d}" for i in range(12)]
    ids = np.concatenate([np.asarray(images)[:, None], region_ids(images, GRID)], axis=1).ravel().tolist()
    labels = np.repeat(classes, 1 + GRID * GRID).tolist()
    uris = np.repeat([f"/data/{c}/{i}.png" for c, i in zip(classes, images)], 1 + GRID * GRID).tolist()
    build_memory_local(str(tmp_path), ids=ids, labels=labels, uris=uris, embeddings=vectors.reshape(-1, D),
                       num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENC,
                       build_config={GRID_KEY: GRID})
    return str(tmp_path), rng


def test_the_manifest_records_the_grid_and_filters_pick_one_kind_of_entry(region_memory):
    root, rng = region_memory
    memory = VisualMemory.open(root)
    assert region_grid(memory.manifest) == GRID and len(memory) == 12 * 5
    q = rng.normal(size=(3, D))
    images = memory.search(q, 20, filters=IMAGES_ONLY).ids
    regions = memory.search(q, 20, filters=REGIONS_ONLY).ids
    assert images.shape == (3, 12) or (images[:, 12:] == "").all()
    assert not is_region_id(images[images != ""]).any() and (images != "").sum() == 3 * 12
    assert is_region_id(regions).all()
    # The kind is part of the filter's key, so two filters never share a cached mask.
    assert IMAGES_ONLY.key() != REGIONS_ONLY.key() != QueryFilter().key()
    assert QueryFilter.from_dict({"entries": "region"}) == REGIONS_ONLY
    with pytest.raises(ValueError, match="unknown filter entries 'regions'; allowed: image, region"):
        QueryFilter(entries="regions")


def test_forgetting_an_image_id_removes_its_global_and_every_region_entry(region_memory):
    root, _ = region_memory
    manifest = mutations.forget(root, ids=["img04"])
    assert manifest.change["forgotten"] == 1 + GRID * GRID
    memory = VisualMemory.open(root)
    assert len(memory) == 11 * 5
    everything = memory.search(np.ones((1, D)), len(memory)).ids
    assert not any(i == "img04" or i.startswith("img04#") for i in everything.ravel().tolist())
    with pytest.raises(KeyError, match="unknown id"):
        mutations.forget(root, ids=["img04"])
    with pytest.raises(ValueError, match=r"pass the image id \('img05'\)"):
        mutations.forget(root, ids=["img05#r1"])
    # A label selects an image's entries together (they share it): whole images again.
    assert mutations.forget(root, label="bee").change["forgotten"] == 3 * (1 + GRID * GRID)


def test_classify_regions_finds_the_object_where_the_global_vector_is_swamped(region_memory):
    root, _ = region_memory
    memory = VisualMemory.open(root)
    rng = np.random.default_rng(7)
    classes = ["ant", "bee", "cat", "bee", "cat", "ant"]
    # Cluttered queries: strong random clutter around the object hides it from the global vector.
    queries = region_vectors(_maps(rng, classes, [3, 2, 1, 0, 3, 1], clutter=6.0), GRID)
    got = classify_regions(memory, queries, k=3)
    assert [p.prediction.label_name for p in got] == classes
    top = got[0]
    assert top.grid == GRID and top.region_rule is RegionRule.MAXSIM
    assert len(top.regions) == len(top.prediction.neighbors) == 3
    assert [r.image_id for r in top.regions] == [n.id for n in top.prediction.neighbors]
    # Query 0's object sits in quadrant 3; each neighbour's best match for it is that neighbour's object
    # quadrant (img00 -> 0, img03 -> 3, img06 -> 2: image i holds its object in quadrant i % 4).
    for r in top.regions:
        assert r.matched[3] == int(r.image_id[3:]) % 4 and r.similarity[3] > 0.5
    globally = classify_regions(memory, queries, k=3, region_rule=RegionRule.GLOBAL)
    assert sum(p.prediction.label_name == c for p, c in zip(globally, classes)) < len(classes)


def test_classify_regions_refuses_a_global_memory_and_bad_vectors(tmp_path, region_memory):
    root, rng = region_memory
    with pytest.raises(ValueError, match=r"region query vectors must be \[n, 5, 24\]"):
        classify_regions(VisualMemory.open(root), rng.normal(size=(2, 4, D)))
    build_memory_local(str(tmp_path / "flat"), ids=["a", "b"], labels=["ant", "bee"], uris=["", ""],
                       embeddings=rng.normal(size=(2, D)), num_shards=1,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENC)
    with pytest.raises(ValueError, match=r"no region entries \(built without --regions\)"):
        classify_regions(VisualMemory.open(str(tmp_path / "flat")), rng.normal(size=(2, 5, D)))
