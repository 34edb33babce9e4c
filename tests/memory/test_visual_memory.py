"""build_memory_local + VisualMemory.open + search, against brute force over the stored embeddings."""

import concurrent.futures
import dataclasses
import os

import numpy as np
import pytest

from memory import IndexConfig, IndexKind, SearchResult, VisualMemory
from memory.build import build_memory_local
from memory.search.filters import QueryFilter
from memory.store.manifest import MANIFEST_NAME, ManifestError
from memory.store.mutations import forget
from memory.store.versions import read_manifest
from memory.store.shard import ShardData, read_shard_data, write_shard
from tests.memory.helpers import ENCODER, assert_exact_topk, clustered, recall_at_k

N, D, K = 600, 32, 10
CLASSES = ("ankle boot", "bag", "coat", "dress")


def _entries(seed=0, *, duplicates=True):
    x, q = clustered(N, D, centres=12, noise=0.6, seed=seed, nq=60)
    rng = np.random.default_rng(seed)
    ids = [f"img-{i:05d}" for i in rng.permutation(N)]  # Arrival order != id order.
    if duplicates:
        # Exact duplicate vectors under different ids -> distance ties that land in different shards.
        x[1::50] = x[0]
        q[0] = x[0]
    labels = [CLASSES[i % 4] for i in range(N)]
    uris = [f"file:///data/{i}.png" for i in ids]
    return ids, labels, uris, x, q


def _build(root, num_shards, kind=IndexKind.BRUTE_FORCE, seed=0):
    ids, labels, uris, x, q = _entries(seed)
    manifest = build_memory_local(str(root), ids=ids, labels=labels, uris=uris, embeddings=x,
                                  num_shards=num_shards, index_config=IndexConfig(kind=kind),
                                  encoder_identity=ENCODER, build_config={"source": "synthetic"})
    return manifest, (ids, labels, uris, x, q)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for shards in (1, 4):
        root = tmp_path_factory.mktemp(f"mem{shards}")
        out[shards] = (root, *_build(root, shards))
    return out


def test_manifest_contents(built):
    root, manifest, (ids, labels, _, _, _) = built[4]
    assert read_manifest(str(root)) == manifest
    assert manifest.total == N and manifest.dim == D and manifest.class_names == CLASSES
    assert [s.name for s in manifest.shards] == [f"shard-0000{i}-of-00004" for i in range(4)]
    assert sum(s.count for s in manifest.shards) == N and all(s.count > 100 for s in manifest.shards)
    assert manifest.build_config["source"] == "synthetic"
    assert manifest.build_config["index"]["kind"] == "brute_force"
    assert manifest.counts.embedded == N and manifest.encoder == ENCODER
    mem = VisualMemory.open(str(root))
    assert len(mem) == N and mem.dim == D and mem.class_names == CLASSES and mem.encoder_identity == ENCODER
    # Labels survive the round trip.
    label_of = dict(zip(ids, labels))
    res = mem.search(mem.get_embeddings(ids[:5]), 1)
    assert mem.label_names(res.labels)[:, 0].tolist() == [label_of[i] for i in res.ids[:, 0].tolist()]


def test_search_exact_and_shard_count_invariant(built):
    results = {}
    for shards, (root, _, (ids, _, _, x, q)) in built.items():
        mem = VisualMemory.open(str(root), verify=True)
        res = mem.search(q, K)
        assert isinstance(res, SearchResult)
        assert res.ids.shape == res.labels.shape == res.distances.shape == (len(q), K)
        assert res.labels.dtype == np.int32 and res.distances.dtype == np.float32
        stored = mem.get_embeddings(res.ids.ravel()).reshape(len(q), K, D)
        row = {i: r for r, i in enumerate(ids)}
        idx = np.vectorize(row.__getitem__)(res.ids)
        assert_exact_topk(idx, res.distances, q, x, K)
        assert recall_at_k(idx, q, x, K) == 1.0
        np.testing.assert_allclose(res.distances, 1 - np.einsum("qd,qkd->qk", q, stored), atol=2e-6)
        results[shards] = res
    np.testing.assert_array_equal(results[1].ids, results[4].ids)
    np.testing.assert_array_equal(results[1].labels, results[4].labels)
    np.testing.assert_allclose(results[1].distances, results[4].distances, atol=1e-6)
    # Query 0 equals a vector stored under 13 ids: they tie at ~0 and come out in id order.
    dup_ids = results[4].ids[0]
    assert np.all(results[4].distances[0] < 1e-5)
    assert dup_ids.tolist() == sorted(dup_ids.tolist())


def test_parallel_shard_search_equals_sequential(built):
    root, _, (_, _, _, _, q) = built[4]
    mem = VisualMemory.open(str(root))
    assert mem.search_threads == min(4, os.cpu_count() or 1)
    seq = VisualMemory.open(str(root), search_threads=1)
    par = seq.with_search_params(threads=4)
    assert seq.search_threads == 1 and par.search_threads == 4
    a, b = seq.search(q, K), par.search(q, K)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.distances, b.distances)
    # Many threads calling one memory at once get the same answers (the pool is shared and thread-safe).
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = np.concatenate([r.ids for r in pool.map(lambda i: par.search(q[i:i + 7], K), range(0, len(q), 7))])
    np.testing.assert_array_equal(got, a.ids)
    with pytest.raises(ValueError, match="search_threads"):
        VisualMemory.open(str(root), search_threads=0)


def test_query_chunked_search_equals_one_thread(built):
    """A batch of >= 64 queries per thread is split into query chunks (memory.search.shard_search.search_in_chunks):
    each chunk routes, searches and merges on its own thread; the answer must not change, per-query
    filters included (each chunk gets its own queries' filters)."""
    root, _, (_, _, _, _, q) = built[4]
    rng = np.random.default_rng(3)
    many = np.concatenate([q, q[rng.integers(0, len(q), 240)] + 0.05 * rng.standard_normal((240, D))])
    filters = [QueryFilter(labels=(CLASSES[i % 4],)) if i % 3 else None for i in range(len(many))]
    seq = VisualMemory.open(str(root), search_threads=1)
    want, want_f = seq.search(many, K), seq.search(many, K, filters=filters)
    for threads in (2, 4):  # 300 queries: 150 or 75 per chunk.
        par = seq.with_search_params(threads=threads)
        got, got_f = par.search(many, K), par.search(many, K, filters=filters)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.distances, want.distances)
        np.testing.assert_array_equal(got_f.ids, want_f.ids)
    # The filters reached each chunk's own queries: a filtered query's neighbours all carry its label.
    labels = seq.label_names(want_f.labels)
    assert all((labels[i] == CLASSES[i % 4]).all() for i in range(len(many)) if i % 3)
    # Each chunk normalises its own rows (the unnormalised `many` above); a zero row is named by its batch index.
    many[200] = 0.0
    for threads in (1, 2):
        with pytest.raises(ValueError, match=r"cannot L2-normalise row 200: norm 0\.0"):
            seq.with_search_params(threads=threads).search(many, K)


def test_tree_ah_memory_recall(tmp_path):
    _, (ids, _, _, x, q) = _build(tmp_path, 3, kind=IndexKind.TREE_AH)
    mem = VisualMemory.open(str(tmp_path))
    assert {s.index_kind for s in mem.manifest.shards} == {"tree_ah"}
    res = mem.search(q, K)
    row = {i: r for r, i in enumerate(ids)}
    assert recall_at_k(np.vectorize(row.__getitem__)(res.ids), q, x, K) >= 0.95


def test_k_larger_than_memory_is_capped_at_its_live_entries(tmp_path):
    ids, labels, uris, x, q = _entries(1, duplicates=False)
    build_memory_local(str(tmp_path), ids=ids[:7], labels=labels[:7], uris=uris[:7], embeddings=x[:7],
                       num_shards=3, index_config=IndexConfig(), encoder_identity=ENCODER)
    mem = VisualMemory.open(str(tmp_path))
    # Capped before anything is allocated: 10**9 columns of padding would be gigabytes.
    for k in (10, 10 ** 9):
        res = mem.search(q[:2], k)
        assert res.ids.shape == res.labels.shape == res.distances.shape == (2, 7)
        assert sorted(res.ids[0].tolist()) == sorted(ids[:7]) and np.isfinite(res.distances).all()
    # Fewer found than k (a filter) is still padded, up to the cap.
    res = mem.search(q[:2], 10, filters=QueryFilter(labels=(labels[0],)))
    kept = int((np.asarray(labels[:7]) == labels[0]).sum())
    assert (res.ids[:, kept:] == "").all() and (res.labels[:, kept:] == -1).all()
    assert np.isinf(res.distances[:, kept:]).all() and mem.label_names(res.labels)[0, 6] == ""
    # The cap is the live count: after a forget, 6. classify at k = 10**9 is the vote of every live entry.
    forget(str(tmp_path), ids=[ids[0]])
    mem = VisualMemory.open(str(tmp_path))
    assert mem.search(q[:2], 10 ** 9).ids.shape == (2, 6)
    predictions = mem.classify(q[:2], k=10 ** 9, rule="plurality")
    assert [p.k for p in predictions] == [10 ** 9] * 2 and all(len(p.neighbors) == 6 for p in predictions)
    assert [dataclasses.replace(p, k=6) for p in predictions] == mem.classify(q[:2], k=6, rule="plurality")


def test_empty_shards(tmp_path):
    ids, labels, uris, x, q = _entries(2, duplicates=False)
    m = build_memory_local(str(tmp_path), ids=ids[:2], labels=labels[:2], uris=uris[:2], embeddings=x[:2],
                           num_shards=8, index_config=IndexConfig(), encoder_identity=ENCODER)
    assert sum(s.index_kind == "empty" for s in m.shards) >= 6
    res = VisualMemory.open(str(tmp_path), verify=True).search(q[:1], 3)
    assert sorted(res.ids[0].tolist()) == sorted(ids[:2]) and res.ids.shape == (1, 2)  # k 3 capped at 2 entries.


def test_errors(built, tmp_path):
    root = built[4][0]
    mem = VisualMemory.open(str(root))
    with pytest.raises(ValueError, match=r"\[nq, 32\].*got \(2, 31\)"):
        mem.search(np.ones((2, 31), np.float32), 3)
    with pytest.raises(ValueError, match="row 1"):
        mem.search(np.stack([np.ones(32), np.zeros(32)]), 3)
    with pytest.raises(KeyError, match="nope"):
        mem.get_embeddings(["img-00000", "nope"])
    with pytest.raises(ManifestError, match=f"not a visual memory: .*{MANIFEST_NAME} missing"):
        VisualMemory.open(str(tmp_path))


def pa_array(values):
    import pyarrow as pa
    return pa.array(values, pa.int32())


def test_verify_catches_tampered_shard(tmp_path):
    manifest, _ = _build(tmp_path, 2)
    import pyarrow.parquet as pq
    entries_path = tmp_path / manifest.shards[1].path / "entries.parquet"
    table = pq.read_table(entries_path)
    labels = (table.column("label").to_numpy() + 1) % 4
    # Same rows, schema and metadata, other labels: only the checksum can tell.
    pq.write_table(table.set_column(1, "label", pa_array(labels)), entries_path)
    VisualMemory.open(str(tmp_path), verify=False)  # Not verified: opens.
    with pytest.raises(ManifestError, match="shard-00001-of-00002: file entries.parquet .* the manifest says"):
        VisualMemory.open(str(tmp_path))  # Verified by default.


def test_write_shard_is_order_independent(tmp_path):
    ids, _, uris, x, _ = _entries(3, duplicates=False)
    ids, uris, x = np.array(ids[:50]), np.array(uris[:50]), x[:50]
    labels = np.arange(50, dtype=np.int32) % 4
    infos = []
    for run, order in enumerate([np.arange(50), np.random.default_rng(0).permutation(50)]):
        data = ShardData(ids=ids[order], labels=labels[order], uris=uris[order], embeddings=x[order])
        infos.append(write_shard(str(tmp_path / str(run)), data, index_config=IndexConfig(), name="s",
                                 root_relative_path="s"))
    assert infos[0] == infos[1]
    back = read_shard_data(str(tmp_path / "1"))
    assert back.ids.tolist() == sorted(ids.tolist())
    with pytest.raises(ValueError, match="duplicate id"):
        write_shard(str(tmp_path / "d"), ShardData(ids=np.array(["a", "a"]), labels=np.zeros(2, np.int32),
                                                   uris=np.array(["u", "v"]), embeddings=x[:2]),
                    index_config=IndexConfig(), name="d", root_relative_path="d")
    with pytest.raises(ValueError, match="row 0 has norm"):
        write_shard(str(tmp_path / "n"), ShardData(ids=np.array(["a"]), labels=np.zeros(1, np.int32),
                                                   uris=np.array(["u"]), embeddings=2 * x[:1]),
                    index_config=IndexConfig(), name="n", root_relative_path="n")
