"""The storage benchmark on a tiny synthetic memory: bytes per dtype, accuracy against brute force, agreement."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.benchmarks import bench_storage
from evaluation.metrics import accuracy_table
from memory.store import mutations
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.versions import read_manifest
from memory.vectors import l2_normalize
from memory.decide.voting import predict_all_k
from tests.conftest import brute_force_topk

N, D, NQ, SHARDS, K = 480, 32, 60, 3, 10
CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")
ENC = {"name": "fake-encoder", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}


def _clustered(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors around one centre per class; wide noise misclassifies some queries (exact rank@10: 0.93)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(CLASSES), D))
    of_x, of_q = rng.integers(0, len(CLASSES), N), rng.integers(0, len(CLASSES), NQ)
    x = l2_normalize((centres[of_x] + 2.0 * rng.standard_normal((N, D))).astype(np.float32))
    q = l2_normalize((centres[of_q] + 2.0 * rng.standard_normal((NQ, D))).astype(np.float32))
    return x, of_x, q, of_q


@pytest.fixture(scope="module", params=[IndexKind.BRUTE_FORCE, IndexKind.TREE_AH], ids=lambda k: k.value)
def measured(request, tmp_path_factory):
    x, of_x, q, of_q = _clustered(seed=3)
    ids = [f"img-{i:04d}" for i in range(N)]
    uris = [f"/data/{CLASSES[c]}/{j}{'-long' * (j % 7)}.png" for j, c in enumerate(of_x)]
    root = str(tmp_path_factory.mktemp("original"))
    build_memory_local(root, ids=ids, labels=[CLASSES[c] for c in of_x], uris=uris, embeddings=x,
                       num_shards=SHARDS, index_config=IndexConfig(kind=request.param, reorder=50),
                       encoder_identity=ENC)
    entries = bench_storage.read_memory_entries(root)
    work = str(tmp_path_factory.mktemp("variants"))
    report = bench_storage.measure_storage(entries, q, [CLASSES[c] for c in of_q], k=K, work_dir=work)
    return request.param, root, work, entries, report, (x, of_x, q, of_q)


def test_entries_round_trip_with_the_memory_config(measured):
    kind, root, _, entries, _, (x, of_x, _, _) = measured
    order = np.argsort(entries.ids)
    assert entries.ids[order].tolist() == [f"img-{i:04d}" for i in range(N)]
    np.testing.assert_allclose(entries.embeddings[order], x, atol=1e-6)
    assert entries.labels[order].tolist() == [CLASSES[c] for c in of_x]
    assert entries.num_shards == SHARDS and entries.index_config.kind is kind and entries.index_config.reorder == 50


def test_variants_keep_shards_and_index_kind(measured):
    kind, root, work, _, _, _ = measured
    original = read_manifest(root)
    for dtype in bench_storage.DTYPES:
        rebuilt = read_manifest(bench_storage.variant_root(work, dtype))
        assert [(s.name, s.count, s.index_kind) for s in rebuilt.shards] == [
            (s.name, s.count, s.index_kind) for s in original.shards]
        assert {s.index_kind for s in rebuilt.shards} == {kind.value}
        assert rebuilt.build_config["index"]["embedding_dtype"] == dtype


def test_dataset_bytes_shrink_with_the_dtype(measured):
    _, _, _, _, report, _ = measured
    per_entry = {r.variant: r.per_entry(r.dataset_bytes) for r in report.rows}
    assert per_entry["int8"] < per_entry["bfloat16"] < per_entry["float32"] < per_entry[bench_storage.FORMAT1]
    # 4, 2 and 1 bytes per dimension, plus one .npy header per shard.
    assert report.row("float32").dataset_bytes == SHARDS * 128 + N * D * 4
    assert report.row("bfloat16").dataset_bytes == SHARDS * 128 + N * D * 2
    assert report.row("int8").dataset_bytes == SHARDS * 128 + N * D * 1
    for r in report.rows:
        assert r.total_bytes > r.dataset_bytes > 0 and r.entries == N


def test_format1_row_is_computed_from_the_shards(measured):
    _, _, work, _, report, _ = measured
    row = report.row(bench_storage.FORMAT1)
    assert not row.measured and row.top1 is None
    f32 = report.row("float32")
    # Two float32 copies of every row; the same ScaNN side files and manifests as the float32 build.
    assert row.dataset_bytes == 2 * f32.dataset_bytes
    assert {k: v for k, v in row.bytes.items() if k not in ("vectors", "entries")} == {
        k: v for k, v in f32.bytes.items() if k not in ("vectors", "entries")}
    expected = 0
    for info in read_manifest(bench_storage.variant_root(work, "float32")).shards:
        ids, _, uris = bench_storage.read_shard_entries(f"{bench_storage.variant_root(work, 'float32')}/{info.path}")
        expected += 3 * 128 + info.count * 4 * (max(map(len, ids)) + max(map(len, uris)) + 1)
    assert row.bytes["entries"] == expected


def test_float32_accuracy_equals_brute_force_voting(measured):
    kind, _, _, _, report, (x, of_x, q, of_q) = measured
    idx, dist = brute_force_topk(x, q, K)
    want = accuracy_table(predict_all_k(of_x[idx], dist), of_q)
    f32 = report.row("float32")
    if kind is IndexKind.BRUTE_FORCE:
        assert f32.accuracy_at_k == pytest.approx({rule: by_k[K] for rule, by_k in want.items()})
    else:  # Approximate search: close to exact, not necessarily equal.
        assert abs(f32.top1 - want["rank"][K]) <= 0.05
    assert f32.top1 == f32.accuracy_at_k["rank"]
    assert 0.5 < f32.top1 < 1.0  # Clusters overlap enough that the accuracy is informative.


def test_accuracies_and_agreement(measured):
    _, _, _, _, report, _ = measured
    f32 = report.row("float32")
    assert f32.delta_points == 0.0 and f32.same_topk_set == 1.0 and f32.same_topk_order == 1.0
    for dtype in ("bfloat16", "int8"):
        r = report.row(dtype)
        assert 0.0 <= r.top1 <= 1.0 and all(0.0 <= a <= 1.0 for a in r.accuracy_at_k.values())
        assert r.delta_points == pytest.approx(100 * (r.top1 - f32.top1))
        assert 0.0 <= r.same_topk_order <= r.same_topk_set <= 1.0
        assert r.same_topk_set > 0.5  # Quantised rows keep most neighbour lists.
    # int8 rounds each coordinate to 1/127 of its range: at least one of 60 top-10 lists changes.
    assert report.row("int8").same_topk_order < 1.0


def test_markdown_table(measured):
    _, _, _, _, report, _ = measured
    lines = bench_storage.markdown_table(report).splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].startswith("| rows stored as | bytes/entry |") and "rank@10 top-1" in lines[0]
    f32 = report.row("float32")
    assert lines[2].startswith(f"| float32 | {f32.total_bytes / N:,.0f} | {f32.dataset_bytes / N:,.0f} |")
    assert f"| {100 * f32.top1:.2f} | +0.00 | 1.000 / 1.000 |" in lines[2]
    assert lines[5].startswith(f"| {bench_storage.FORMAT1} |") and lines[5].endswith("| — | — | — |")
    assert report.to_dict()["rows"][0]["bytes_per_entry"] == pytest.approx(f32.total_bytes / N)


def test_forgotten_entries_are_not_rebuilt(tmp_path):
    x, of_x, _, _ = _clustered(seed=4)
    ids = [f"e{i:03d}" for i in range(N)]
    build_memory_local(str(tmp_path), ids=ids, labels=[CLASSES[c] for c in of_x], uris=ids, embeddings=x,
                       num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENC)
    mutations.forget(str(tmp_path), ids=ids[:5])
    entries = bench_storage.read_memory_entries(str(tmp_path))
    assert sorted(entries.ids.tolist()) == ids[5:] and entries.embeddings.shape == (N - 5, D)


def test_rejects_a_run_without_the_float32_reference(measured, tmp_path):
    _, _, _, entries, _, (_, _, q, of_q) = measured
    with pytest.raises(ValueError, match="float32"):
        bench_storage.measure_storage(entries, q, [CLASSES[c] for c in of_q], work_dir=str(tmp_path),
                                      dtypes=("int8",))
