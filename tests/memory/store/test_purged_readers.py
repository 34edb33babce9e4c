"""A purge deleting a version's files under its readers: an open re-opens the latest, an opened memory keeps answering.

Purges are made deterministic: a newer version that no longer references a file is published first (as a
purge does), then the reader is stopped between reading the old version's manifest and reading its files, and
the old version file and that file are deleted there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.search.filters import Crowding, QueryFilter
from memory.store import mutations, references, versions
from memory.store.metadata import publish_metadata
from memory.store.versions import VersionPurgedError, publish_version, read_manifest
from memory.vectors import l2_normalize
from memory.visual_memory import VisualMemory

D = 8
N = 400


def _build(root, *, sharding="hash"):
    rng = np.random.default_rng(11)
    ids = [f"e{i:03d}" for i in range(N)]
    build_memory_local(root, ids=ids, labels=[("ant", "bee", "cat", "dog")[i % 4] for i in range(N)],
                       uris=[f"gs://b/{('web', 'cam')[i % 2]}/{i % 7}/{i}.png" for i in range(N)],
                       embeddings=l2_normalize(rng.normal(size=(N, D))), num_shards=2,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), sharding=sharding,
                       encoder_identity={"name": "fake-encoder", "content_hash": "sha256:" + "0" * 64, "dim": D,
                                         "preprocess": {}})
    return ids


def _queries():
    return l2_normalize(np.random.default_rng(12).normal(size=(6, D)))


def _moved(root, m, kind):
    """(version m with the file(s) of ``kind`` copied to a new path, the root-relative file the old path held)."""
    def copy(rel):
        new = rel + "-moved"
        src, dst = os.path.join(root, rel), os.path.join(root, new)
        (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, dst)
        return new

    if kind in ("entries", "index"):
        shard = m.shards[0]
        moved = dataclasses.replace(m, shards=(dataclasses.replace(shard, path=copy(shard.path)), *m.shards[1:]))
        if kind == "entries":
            return moved, f"{shard.path}/entries.parquet"
        return moved, f"{shard.path}/scann/{sorted(os.listdir(os.path.join(root, shard.path, 'scann')))[0]}"
    field = {"tombstones": "forgotten", "weights": "entry_weights", "metadata": "metadata", "router": "router"}[kind]
    ref = getattr(m, field)
    return dataclasses.replace(m, **{field: dataclasses.replace(ref, path=copy(ref.path))}), ref.path


@pytest.fixture(params=["entries", "index", "tombstones", "weights", "metadata", "router"])
def stale_reader(request, tmp_path, monkeypatch):
    """A reader that lists version a as the latest; version b (the latest) no longer references one of a's files,
    which a purge deletes with version a's file right after the reader read a's manifest."""
    root = str(tmp_path / "mem")
    kind = request.param
    ids = _build(root, sharding="partition" if kind == "router" else "hash")
    if kind == "tombstones":
        mutations.forget(root, ids=ids[:3])
    elif kind == "weights":
        mutations.publish_entry_weights(root, ids=ids[:10], weights=np.full(10, 0.5), params={})
    elif kind == "metadata":
        publish_metadata(root, ids, {"source": [("web", "cam")[i % 2] for i in range(N)]})
    a = read_manifest(root)
    moved, gone = _moved(root, a, kind)
    b = publish_version(root, dataclasses.replace(moved, change={"kind": "purge", "summary": "moved"}),
                        expected_parent=a.version)
    calls = []
    real_read, real_latest = versions.read_version, versions.latest_version

    def read_version(r, n):
        calls.append(n)
        m = real_read(r, n)
        if n == a.version and calls.count(n) == 1:  # The purge, between the manifest and its files.
            os.remove(versions.version_path(r, n))
            os.remove(os.path.join(r, gone))
        return m

    monkeypatch.setattr(versions, "read_version", read_version)
    monkeypatch.setattr(versions, "latest_version", lambda r: a.version if not calls else real_latest(r))
    return root, a.version, b.version, gone, calls


def test_an_open_whose_version_loses_a_file_to_a_purge_reopens_the_latest(stale_reader):
    root, a, b, gone, calls = stale_reader
    mem = VisualMemory.open(root)
    assert calls == [a, b] and mem.version == b and not os.path.exists(os.path.join(root, gone))
    assert mem.classify(_queries(), k=5)  # Every file version b references is there.


def test_a_pinned_open_whose_version_loses_a_file_to_a_purge_is_a_clear_error(stale_reader):
    root, a, _, gone, _ = stale_reader
    with pytest.raises(VersionPurgedError, match=rf"version {a} of .* was purged .*while it was in use"
                                                 rf".*re-open the memory"):
        VisualMemory.open(root, version=a)


# ------------------------------------------------------------------ an opened memory after its version is purged


@pytest.fixture
def purged_after_open(tmp_path):
    """A memory opened at version 3 (forgotten rows, metadata), then every file of version 3 deleted by a purge
    after a newer version that references none of them was published."""
    root = str(tmp_path / "mem")
    ids = _build(root)
    publish_metadata(root, ids, {"source": [("web", "cam")[i % 2] for i in range(N)]})
    mutations.forget(root, ids=ids[:5])
    mem = VisualMemory.open(root)
    assert mem.version == 3
    m = read_manifest(root)
    before = _answers(mem)
    shards = []
    for shard in m.shards:
        shutil.copytree(os.path.join(root, shard.path), os.path.join(root, shard.path + "-moved"))
        shards.append(dataclasses.replace(shard, path=shard.path + "-moved"))
    moved, _ = _moved(root, dataclasses.replace(m, shards=tuple(shards)), "tombstones")
    moved, _ = _moved(root, moved, "metadata")
    publish_version(root, dataclasses.replace(moved, change={"kind": "purge", "summary": "moved"}), expected_parent=3)
    os.remove(versions.version_path(root, 3))
    for rel in references.referenced_paths(m):
        path = os.path.join(root, rel)
        (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
    return root, mem, before


def _answers(mem):
    q = _queries()
    out = []
    for kw in ({}, {"filters": QueryFilter(uri_prefix="gs://b/web/")}, {"filters": QueryFilter(labels=("bee",))},
               {"filters": QueryFilter(metadata=(("source", ("cam",)),))}, {"crowding": Crowding(max_per_group=1)},
               {"crowding": Crowding(by="meta:source", max_per_group=2)}):
        preds = mem.classify(q, k=4, rule="plurality", **kw)
        out.append([(p.label, [(n.id, n.uri) for n in p.neighbors]) for p in preds])
    return out


def test_an_opened_memory_keeps_answering_after_a_purge_deletes_its_files(purged_after_open):
    root, mem, before = purged_after_open
    # Explanations (uris), uri / label / metadata filters and crowding are answered from what open read.
    assert _answers(mem) == before
    assert mem.get_uris(["e010"]).tolist() == ["gs://b/web/3/10.png"]
    assert VisualMemory.open(root).version == 4


def test_embeddings_of_a_purged_version_are_a_clear_error_not_a_missing_file(purged_after_open):
    _, mem, _ = purged_after_open
    with pytest.raises(VersionPurgedError, match=r"version 3 of .* was purged .*entries.parquet.*re-open the memory"):
        mem.get_embeddings(["e010"])


def test_a_search_that_needs_a_purged_versions_embeddings_is_a_clear_error(purged_after_open):
    _, mem, _ = purged_after_open
    # A query whose over-fetch finds no admitted row of a shard is searched by brute force over the shard's
    # admitted rows, which reads its embeddings: a filter admitting one entry of 200 leaves queries short.
    with pytest.raises(VersionPurgedError, match=r"version 3 of .* was purged .*re-open the memory"):
        mem.search(_queries(), 5, filters=QueryFilter(uri_prefix="gs://b/web/3/10.png"))
