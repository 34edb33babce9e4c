"""Immutable versions: listing, pinned reads, exclusive publish under races, legacy memories, invariants."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading

import numpy as np
import pytest

from memory.store import mutations
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.manifest import BuildCounts, ForgottenSet, Manifest, ManifestError, Metric, ShardInfo, WeightsRef
from memory.store.versions import (ConcurrentUpdateError, history, latest_version, list_versions, publish_version,
                                   read_manifest, read_version)
from memory.visual_memory import VisualMemory
from tests.memory.helpers import ENCODER, clustered

N = 90


@pytest.fixture()
def root(tmp_path):
    x, _ = clustered(N, 32, centres=5, noise=0.5, seed=11)
    ids = [f"id-{i:03d}" for i in range(N)]
    build_memory_local(str(tmp_path / "mem"), ids=ids, labels=[f"c{i % 3}" for i in range(N)],
                       uris=[f"/src/{i}.png" for i in ids], embeddings=x, num_shards=3,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENCODER)
    return str(tmp_path / "mem")


def test_build_publishes_version_one(root):
    assert list_versions(root) == [1] and latest_version(root) == 1
    m = read_version(root, 1)
    assert (m.version, m.parent, m.change["kind"]) == (1, None, "build")
    assert m.change["summary"] == f"built {N} entries in 3 shards" and m.change["at"]
    with open(os.path.join(root, "manifest.json")) as f:
        assert Manifest.from_json(f.read()) == m
    assert VisualMemory.open(root).version == 1


def test_manifest_round_trip_with_living_fields():
    m = dataclasses.replace(
        Manifest.from_json(Manifest(
            format_version=1, encoder=dict(ENCODER), dim=32, metric=Metric.COSINE,
            class_names=("a",), shards=(ShardInfo("s0", "s0", 2, "sha256:" + "a" * 64, "brute_force"),),
            build_config={}, counts=BuildCounts(2, 2, 0),
            created_at="2026-11-26T12:00:00Z").to_json()),
        version=4, parent=3, change={"kind": "forget", "summary": "x", "at": "2026-11-26T12:00:00Z"},
        delta_shards=(ShardInfo("d0", "deltas/t/d0", 1, "sha256:" + "b" * 64, "brute_force"),),
        forgotten=ForgottenSet("tombstones/v000004-ab.npy", 1, "sha256:" + "c" * 64),
        entry_weights=WeightsRef("weights/v000003-cd.npz", 2, "sha256:" + "d" * 64, "soft_pruning", {"g": 1.75}))
    m.validate()
    assert Manifest.from_json(m.to_json()) == m
    assert (m.physical_total, m.total) == (3, 2)
    bad = dataclasses.replace(m, delta_shards=(dataclasses.replace(m.delta_shards[0], index_kind="tree_ah"),))
    with pytest.raises(ManifestError, match=r"'delta_shards\[0\].index_kind'.*brute_force"):
        bad.validate()
    with pytest.raises(ManifestError, match="'change.kind'"):
        dataclasses.replace(m, change={"kind": "rename"}).validate()
    with pytest.raises(ManifestError, match="'parent'"):
        dataclasses.replace(m, parent=4).validate()
    with pytest.raises(ManifestError, match="'forgotten.count'"):
        dataclasses.replace(m, forgotten=ForgottenSet("t.npy", 9, "sha256:" + "c" * 64)).validate()


def test_pinned_version_answers_as_before_after_forget(root):
    mem1 = VisualMemory.open(root)
    q = mem1.get_embeddings(["id-000", "id-001", "id-050"])
    before = mem1.search(q, 8)
    mutations.forget(root, ids=["id-000", "id-050"])
    mutations.forget(root, label="c1")
    assert list_versions(root) == [1, 2, 3] and read_manifest(root).version == 3
    pinned = VisualMemory.open(root, version=1)
    again = pinned.search(q, 8)
    np.testing.assert_array_equal(again.ids, before.ids)
    np.testing.assert_array_equal(again.distances, before.distances)
    assert len(pinned) == N and len(VisualMemory.open(root, version=2)) == N - 2
    latest = VisualMemory.open(root).search(q, 8)
    assert not {"id-000", "id-050"} & set(latest.ids.ravel().tolist())
    with pytest.raises(ManifestError, match=r"no version 9; available: \[1, 2, 3\]"):
        VisualMemory.open(root, version=9)


def test_concurrent_publishers_same_parent_exactly_one_wins(root):
    base = read_version(root, 1)
    results, barrier = [], threading.Barrier(8)

    def publisher(i):
        barrier.wait()
        try:
            results.append(publish_version(root, dataclasses.replace(
                base, change={"kind": "prune", "summary": f"writer {i}"}), expected_parent=1).change["summary"])
        except ConcurrentUpdateError as e:
            results.append(e)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, str)]
    losers = [r for r in results if isinstance(r, ConcurrentUpdateError)]
    assert len(winners) == 1 and len(losers) == 7
    assert "version 2 (v000002.json)" in str(losers[0]) and "re-run" in str(losers[0])
    assert list_versions(root) == [1, 2] and read_version(root, 2).change["summary"] == winners[0]
    assert not [f for f in os.listdir(os.path.join(root, "versions")) if f.startswith(".tmp")]
    # The same via the public API: a second writer based on version 1 is refused after the first.
    with pytest.raises(ConcurrentUpdateError):
        publish_version(root, base, expected_parent=1)


def test_publish_enforces_append_only_classes_and_same_encoder(root):
    m = read_version(root, 1)
    with pytest.raises(ManifestError, match="append-only"):
        publish_version(root, dataclasses.replace(m, class_names=("c0", "c2", "c1"),
                                                  change={"kind": "add", "summary": "x"}), expected_parent=1)
    enc = dict(ENCODER, name="other")
    with pytest.raises(ManifestError, match="one encoder for life"):
        publish_version(root, dataclasses.replace(m, encoder=enc, change={"kind": "add", "summary": "x"}),
                        expected_parent=1)
    assert list_versions(root) == [1]


def test_legacy_memory_without_versions_reads_as_version_one(root):
    expected = VisualMemory.open(root).search(VisualMemory.open(root).get_embeddings(["id-003"]), 4)
    shutil.rmtree(os.path.join(root, "versions"))  # What a build made before versions existed looks like.
    assert list_versions(root) == [] and latest_version(root) == 1
    mem = VisualMemory.open(root)
    assert mem.version == 1
    np.testing.assert_array_equal(mem.search(mem.get_embeddings(["id-003"]), 4).ids, expected.ids)
    assert [(r["version"], r["kind"], r["entries"]) for r in history(root)] == [(1, "build", N)]
    m = mutations.forget(root, ids=["id-003"])
    # The first publish materialises the old manifest.json as v000001 before replacing manifest.json.
    assert list_versions(root) == [1, 2] and m.parent == 1
    np.testing.assert_array_equal(VisualMemory.open(root, version=1).search(mem.get_embeddings(["id-003"]), 4).ids,
                                  expected.ids)


def test_not_a_memory(tmp_path):
    with pytest.raises(ManifestError, match="not a visual memory: .*manifest.json missing"):
        latest_version(str(tmp_path))
    with pytest.raises(ManifestError, match="not a visual memory"):
        history(str(tmp_path))


def test_checked_deletion_paths_refuse_paths_outside_the_memory(tmp_path):
    from memory.store.versions import checked_deletion_paths
    root = tmp_path / "mem"
    (root / "deltas").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", root / "linked")
    assert checked_deletion_paths(str(root), ["deltas/v000002-ab/delta-00000-of-00001", "tombstones/t.npy"],
                                  what="a test") == [str(root / "deltas/v000002-ab/delta-00000-of-00001"),
                                                     str(root / "tombstones/t.npy")]
    assert checked_deletion_paths("gs://b/mem", ["shards/r000003-ab"], what="a test") == ["gs://b/mem/shards/r000003-ab"]
    for bad, why in [("/etc/passwd", "absolute"), ("gs://other/x", "absolute"), ("../outside", "'..'"),
                     ("shards/../../outside", "'..'"), ("", "non-empty"), (".", "'.'"), ("shards//x", "empty"),
                     ("versions/v000001.json", "history"), ("manifest.json", "history"),
                     ("linked/file", "outside the memory root")]:
        with pytest.raises(ManifestError, match=why):
            checked_deletion_paths(str(root), ["deltas/ok", bad], what="a test")
    with pytest.raises(ManifestError, match="'..'"):
        checked_deletion_paths("gs://b/mem", ["../other-memory"], what="a test")
