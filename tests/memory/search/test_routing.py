"""Partition-routed shards (memory.search.routing): router training, routing, persistence, and routed search."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from memory.store import compaction
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.manifest import Manifest, ManifestError
from memory.store.versions import read_manifest
from memory.store.mutations import forget
from memory.store.purge import purge_history
from memory.search.routing import (Router, RouterConfig, group_centroids, read_router, search_mask, select_sample_rows,
                            spherical_kmeans, train_router, write_router)
from memory.store.shard import read_shard_data
from memory.visual_memory import VisualMemory

DIM = 16
IDENTITY = {"name": "synthetic", "content_hash": "none", "dim": DIM, "preprocess": {}}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, centres: int, *, seed: int, spread: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = _unit(rng.normal(size=(centres, DIM)))
    which = rng.integers(0, centres, n)
    return _unit(c[which] + spread * rng.normal(size=(n, DIM)) / np.sqrt(DIM)), which


def _build(root: str, x: np.ndarray, *, shards: int = 4, probes: int = 4, centroids: int = 64,
           sharding: str = "partition") -> list[str]:
    ids = [f"e{i:05d}" for i in range(len(x))]
    build_memory_local(root, ids=ids, labels=[f"c{i % 3}" for i in range(len(x))], uris=[f"u/{i}" for i in ids],
                       embeddings=x, num_shards=shards, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity=IDENTITY, sharding=sharding,
                       router_config=RouterConfig(num_centroids=centroids, probes=probes))
    return ids


# ------------------------------------------------------------------------------------- pure functions


def test_spherical_kmeans_recovers_separated_clusters_deterministically():
    x, which = _clustered(2000, 8, seed=1, spread=0.1)
    cent, assign = spherical_kmeans(x, 16, iterations=10, seed=0)
    np.testing.assert_allclose(np.linalg.norm(cent, axis=1), 1.0, atol=1e-5)
    # With more centroids than clusters, every centroid's points come from one true cluster (random init
    # may split a cluster over two centroids, which routing tolerates, but never merges two).
    pairs = {(int(w), int(a)) for w, a in zip(which, assign)}
    assert len({a for _, a in pairs}) == len(pairs) and len({w for w, _ in pairs}) == 8
    np.testing.assert_array_equal(assign, np.argmax(x @ cent.T, axis=1))
    cent2, assign2 = spherical_kmeans(x, 16, iterations=10, seed=0)
    np.testing.assert_array_equal(cent, cent2)
    np.testing.assert_array_equal(assign, assign2)
    with pytest.raises(ValueError, match="k <= n"):
        spherical_kmeans(x[:3], 4, iterations=1, seed=0)


def test_spherical_kmeans_keeps_k_when_a_cluster_empties():
    # 5 distinct points, 5 centroids seeded on duplicates: emptied centroids are re-seeded, none stays empty.
    x = _unit(np.repeat(np.eye(DIM)[:5], [20, 1, 1, 1, 1], axis=0))
    cent, assign = spherical_kmeans(np.concatenate([x, x[:1]]), 5, iterations=5, seed=3)
    assert len(np.unique(assign)) == 5


def test_group_centroids_balances_and_keeps_regions_together():
    # 4 well-separated regions of 10 centroids each, equal sizes: each shard must own exactly one region.
    rng = np.random.default_rng(0)
    regions = _unit(rng.normal(size=(4, DIM)))
    region_of = np.repeat(np.arange(4), 10)
    cents = _unit(regions[region_of] + 0.05 * rng.normal(size=(40, DIM)))
    owners = group_centroids(cents, np.full(40, 100), 4, seed=0)
    assert {frozenset(owners[region_of == r].tolist()) for r in range(4)} == {frozenset({s}) for s in range(4)}
    # One dense region holding most of the data is split: no shard exceeds 1.05 x the mean + one centroid.
    sizes = np.where(region_of == 0, 1000, 10)
    owners = group_centroids(cents, sizes, 4, seed=0)
    load = np.bincount(owners, weights=sizes, minlength=4)
    assert load.max() <= 1.05 * sizes.sum() / 4 + sizes.max()
    assert (np.bincount(owners, minlength=4) > 0).all()
    np.testing.assert_array_equal(group_centroids(cents, sizes, 1, seed=0), np.zeros(40, np.int32))


def _random_router(seed: int, num_centroids: int, num_queries: int):
    """A 5-shard router over random centroids (every shard owns at least one) and random unit queries."""
    rng = np.random.default_rng(seed)
    cents = _unit(rng.normal(size=(num_centroids, DIM)))
    owners = rng.integers(0, 5, num_centroids).astype(np.int32)
    owners[:5] = np.arange(5)
    return Router(centroids=cents, owners=owners, num_shards=5, probes=3), cents, owners, \
        _unit(rng.normal(size=(num_queries, DIM)))


def test_route_matches_brute_force_owners_of_the_nearest_centroids():
    router, cents, owners, q = _random_router(2, 30, 50)
    routed = router.route(q)
    top = np.argsort(-(q @ cents.T), axis=1)[:, :3]
    for i in range(50):
        assert set(np.flatnonzero(routed[i])) == set(owners[top[i]].tolist())
    assert router.route(q, probes=30).all()  # Every centroid -> every shard.
    np.testing.assert_array_equal(router.assign(q), owners[np.argmax(q @ cents.T, axis=1)])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="probes"):
            router.route(q, probes=bad)
    with pytest.raises(ValueError, match="owners"):
        Router(centroids=cents, owners=owners, num_shards=4, probes=3)


def test_ratio_route_visits_the_shards_within_the_distance_ratio_of_the_nearest_centroid():
    router, cents, owners, q = _random_router(3, 40, 60)
    dist = 1.0 - q @ cents.T
    for ratio in (1.0, 1.05, 1.3, 2.0):
        routed = router.route(q, ratio=ratio)
        for i in range(60):  # Brute force: shard s's nearest centroid against the nearest overall.
            want = {s for s in range(5) if dist[i, owners == s].min() <= ratio * dist[i].min() * (1 + 1e-6)}
            got = set(np.flatnonzero(routed[i]).tolist())
            assert want - got <= {s for s in want if abs(dist[i, owners == s].min() - ratio * dist[i].min()) < 1e-5}
            assert got - want <= {s for s in got if abs(dist[i, owners == s].min() - ratio * dist[i].min()) < 1e-5}
    # Ratio 1 is the nearest centroid's shard (probes 1); a larger ratio only adds shards.
    np.testing.assert_array_equal(router.route(q, ratio=1.0), router.route(q, probes=1))
    assert (router.route(q, ratio=1.3) >= router.route(q, ratio=1.05)).all()
    assert router.route(q, probes=1, ratio=100.0).all()  # The ratio rule wins over probes.
    assert router.route(q[:0], ratio=1.2).shape == (0, 5)
    for bad in (0.99, 0, float("nan"), float("inf"), True, "1.2"):
        with pytest.raises(ValueError, match="route ratio must be a number >= 1"):
            router.route(q, ratio=bad)
    mask = search_mask(router, q, [True, True, False, True, True, True], ratio=1.3)
    np.testing.assert_array_equal(mask[:, 5], True)  # The delta shard is searched regardless.
    assert not mask[:, 2].any()


def test_search_mask_routes_main_shards_searches_deltas_and_never_loses_a_query():
    cents = np.eye(DIM, dtype=np.float32)[:4]
    router = Router(centroids=cents, owners=np.arange(4, dtype=np.int32), num_shards=4, probes=1)
    q = np.eye(DIM, dtype=np.float32)[[0, 1, 2]]
    live = [True, True, False, True, True]  # 4 main shards (shard 2 empty) + 1 delta shard.
    mask = search_mask(router, q, live)
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 0, 1]])
    # Without a live delta shard, a query routed only to the empty shard searches every live main shard.
    mask = search_mask(router, q, [True, True, False, True, False])
    np.testing.assert_array_equal(mask[2], [1, 1, 0, 1, 0])
    np.testing.assert_array_equal(mask[:2], [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    # No router: every live shard.
    np.testing.assert_array_equal(search_mask(None, q, live), np.tile(live, (3, 1)))


def test_sample_rows_depend_on_ids_only_not_on_their_order():
    ids = [f"img-{i}" for i in range(500)]
    rows = select_sample_rows(ids, 50)
    shuffled = list(np.random.default_rng(0).permutation(ids))
    rows2 = select_sample_rows(shuffled, 50)
    assert [ids[r] for r in rows] == [shuffled[r] for r in rows2]
    assert len(set(rows.tolist())) == 50 and len(select_sample_rows(ids, 10_000)) == 500


def test_train_router_needs_a_point_per_shard_and_caps_centroids():
    x, _ = _clustered(320, 5, seed=3)
    router = train_router(x, num_shards=4, config=RouterConfig(num_centroids=1000, probes=2))
    assert router.centroids.shape == (10, DIM) and router.probes == 2  # 320 // 32 centroids.
    assert set(router.owners.tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="3 entries for 4 shards"):
        train_router(x[:3], num_shards=4)
    with pytest.raises(ValueError, match="RouterConfig.probes"):
        RouterConfig(probes=0)


# ------------------------------------------------------------------------------------- on disk


def test_router_file_round_trip_and_tamper_detection(tmp_path):
    x, _ = _clustered(600, 6, seed=4)
    root = str(tmp_path / "mem")
    _build(root, x, probes=3)
    manifest = read_manifest(root)
    assert manifest.router is not None and manifest.router.probes == 3
    assert Manifest.from_json(manifest.to_json()) == manifest
    router = read_router(root, manifest)
    np.testing.assert_array_equal(router.centroids, Router.from_bytes(router.to_bytes()).centroids)
    assert write_router(root, router) == manifest.router  # Content-addressed: same bytes, same ref.
    # A hash-sharded manifest has no "router" key, so readers that predate routing still open it.
    assert "router" not in dataclasses.replace(manifest, router=None).to_dict()
    path = os.path.join(root, manifest.router.path)
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"xyz")
    with pytest.raises(ManifestError, match="checksum"):
        VisualMemory.open(root)
    os.remove(path)
    with pytest.raises(ManifestError, match="router file .* missing"):
        read_router(root, manifest)


def test_partition_build_puts_each_entry_in_its_routed_shard(tmp_path):
    x, _ = _clustered(1200, 12, seed=5)
    root = str(tmp_path / "mem")
    ids = _build(root, x)
    manifest = read_manifest(root)
    router = read_router(root, manifest)
    assert manifest.build_config["sharding"] == "partition"
    row_of = {i: r for r, i in enumerate(ids)}
    for s, info in enumerate(manifest.shards):
        data = read_shard_data(os.path.join(root, info.path))
        assert info.count > 0
        np.testing.assert_array_equal(router.assign(x[[row_of[i] for i in data.ids.astype(str)]]), s)
    assert sum(s.count for s in manifest.shards) == 1200


def test_routed_search_visits_fewer_shards_and_keeps_recall(tmp_path):
    x, _ = _clustered(3000, 24, seed=6)
    root = str(tmp_path / "mem")
    ids = _build(root, x, probes=2)
    memory = VisualMemory.open(root)
    assert memory.route_probes == 2
    rng = np.random.default_rng(7)
    q = _unit(x[rng.choice(3000, 200, replace=False)] + 0.05 * rng.normal(size=(200, DIM)))
    truth = np.asarray(ids)[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]]
    visited = memory.router.route(q).sum(axis=1).mean()
    assert visited < 2.0, visited  # Of 4 shards.
    found = memory.search(q, 10).ids
    recall = np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(200)])
    assert recall >= 0.95, recall
    # Probing every centroid visits every shard: exact (brute-force shards), the same as a hash build.
    everything = memory.with_search_params(route_probes=memory.router.centroids.shape[0])
    _build(str(tmp_path / "hashed"), x, sharding="hash")
    hashed = VisualMemory.open(str(tmp_path / "hashed"))
    np.testing.assert_array_equal(everything.search(q, 10).ids, hashed.search(q, 10).ids)
    assert hashed.router is None and hashed.route_probes is None
    with pytest.raises(ValueError, match="hash-sharded"):
        hashed.with_search_params(route_probes=2)
    with pytest.raises(ValueError, match="route_probes must be"):
        memory.with_search_params(route_probes=0)
    # Distance-ratio routing: near-probes-1 cost, recall at least probes 1's; route_probes switches back.
    by_ratio = memory.with_search_params(route_ratio=1.2)
    assert by_ratio.route_ratio == 1.2 and memory.route_ratio is None
    assert memory.router.route(q, ratio=1.2).sum(axis=1).mean() < 2.0
    ratio_found = by_ratio.search(q, 10).ids
    assert np.mean([len(set(ratio_found[i]) & set(truth[i])) / 10 for i in range(200)]) >= 0.95
    assert by_ratio.with_search_params(route_probes=3).route_ratio is None
    with pytest.raises(ValueError, match="not both"):
        memory.with_search_params(route_probes=2, route_ratio=1.2)
    with pytest.raises(ValueError, match="hash-sharded"):
        hashed.with_search_params(route_ratio=1.2)
    with pytest.raises(ValueError, match="route ratio must be"):
        memory.with_search_params(route_ratio=0.5)


def test_forget_and_purge_keep_the_router(tmp_path):
    x, _ = _clustered(600, 6, seed=8)
    root = str(tmp_path / "mem")
    ids = _build(root, x)
    forget(root, ids=ids[:10], request_purge=True)
    purge_history(root)
    memory = VisualMemory.open(root)  # The router file is still referenced, so it was not deleted.
    assert memory.router is not None and len(memory) == 590
    assert not set(memory.search(x[:10], 5).ids.ravel()) & set(ids[:10])


def test_plan_reindex_of_a_routed_memory_keeps_rows_and_routes_deltas(tmp_path):
    x, _ = _clustered(800, 8, seed=9)
    root = str(tmp_path / "mem")
    _build(root, x)
    m = read_manifest(root)
    main_ids = {s.path: read_shard_data(os.path.join(root, s.path)).ids.astype(str) for s in m.shards}
    delta = [np.asarray(["new-1", "new-2", "new-3"])]
    plan = compaction.plan_reindex(m, main_ids=main_ids, forgotten=np.asarray([]), delta_ids=delta,
                                   delta_targets=[np.asarray([2, 2, 0])])
    assert plan.rebuilt == (0, 2) and plan.reused == (1, 3) and plan.note == ""
    with pytest.raises(ValueError, match="keeps its shard count"):
        compaction.plan_reindex(m, main_ids=main_ids, forgotten=np.asarray([]), num_shards=2)
    with pytest.raises(ValueError, match="delta_targets"):
        compaction.plan_reindex(m, main_ids=main_ids, forgotten=np.asarray([]), delta_ids=delta)
