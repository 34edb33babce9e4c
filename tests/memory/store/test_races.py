"""Readers while writers publish, and writers that lose a race: re-open, re-base, conflict, leave nothing."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store import mutations, purge, references, versions
from memory.store.manifest import ManifestError
from memory.store.versions import (ConcurrentUpdateError, VersionPurgedError, WriteConflictError, list_versions,
                                   read_manifest)
from memory.vectors import l2_normalize
from memory.visual_memory import VisualMemory

D = 8


def _entries(rng, n, *, prefix="e"):
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    labels = [("ant", "bee", "cat", "dog")[i % 4] for i in range(n)]
    return ids, labels, [f"/img/{i}.png" for i in ids], l2_normalize(rng.normal(size=(n, D)))


def _build(root, ids, labels, uris, x, shards):
    return build_memory_local(str(root), ids=ids, labels=labels, uris=uris, embeddings=x, num_shards=shards,
                              index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                              encoder_identity={"name": "fake-encoder", "content_hash": "sha256:" + "0" * 64,
                                                "dim": D, "preprocess": {}})


@pytest.fixture
def memory(tmp_path):
    ids, labels, uris, x = _entries(np.random.default_rng(7), 120)
    root = str(tmp_path / "mem")
    _build(root, ids, labels, uris, x, 4)
    return root, ids, labels, uris, x


# ------------------------------------------------------------------ readers while a purge removes versions


def _purged_under_a_reader(root, ids, monkeypatch):
    """A reader lists version 2 and reads its file; then two forgets and a purge remove version 2, and the
    leftover sweep its tombstone file, before the reader reads that file."""
    mutations.forget(root, ids=ids[:2])
    stale = read_manifest(root, version=2)
    mutations.forget(root, ids=ids[2:4])
    assert purge.purge_history(root) == [1, 2]
    assert [f.rel for f in purge.remove_leftovers(root, grace_s=0)] == [stale.forgotten.path]
    assert not os.path.exists(os.path.join(root, stale.forgotten.path))
    calls = []
    real_read, real_latest = versions.read_version, versions.latest_version

    def read_version(r, n):
        calls.append(n)
        return stale if n == 2 and calls.count(2) == 1 else real_read(r, n)

    monkeypatch.setattr(versions, "read_version", read_version)
    monkeypatch.setattr(versions, "latest_version", lambda r: 2 if not calls else real_latest(r))
    return calls


def test_a_reader_whose_version_is_purged_while_opening_reopens_the_latest(memory, monkeypatch):
    root, ids, _, _, x = memory
    calls = _purged_under_a_reader(root, ids, monkeypatch)
    mem = VisualMemory.open(root)
    assert calls == [2, 4] and mem.manifest.version == 4 and len(mem) == len(ids) - 4
    assert not set(ids[:4]) & set(mem.search(x[:20], 10).ids.ravel().tolist())


def test_a_pinned_version_purged_while_opening_is_a_clear_error(memory, monkeypatch):
    root, ids, *_ = memory
    _purged_under_a_reader(root, ids, monkeypatch)
    with pytest.raises(VersionPurgedError, match=r"version 2 of .* was purged .*while it was in use.*tombstone "
                                                 r"file .* missing.*re-open the memory"):
        VisualMemory.open(root, version=2)
    monkeypatch.undo()
    with pytest.raises(ManifestError, match=r"no version 2; available: \[3, 4\]"):
        VisualMemory.open(root, version=2)


def test_a_memory_whose_version_is_purged_after_open_keeps_answering_and_says_so_on_its_next_file_read(memory):
    root, ids, _, _, x = memory
    mutations.forget(root, ids=ids[:2])
    held = VisualMemory.open(root)  # Version 2: entry tables, uris and indexes read at open.
    answer = [(p.label, [(n.id, n.uri) for n in p.neighbors]) for p in held.classify(x[:2], k=3)]
    mutations.forget(root, ids=ids[2:4])
    compacted = read_manifest(root)
    # A purge after a re-index deletes the shards version 2 used; here they vanish under the open memory.
    for s in compacted.shards:
        os.rename(os.path.join(root, s.path), os.path.join(root, s.path) + "-gone")
    assert purge.purge_history(root) == [1, 2]
    assert [(p.label, [(n.id, n.uri) for n in p.neighbors]) for p in held.classify(x[:2], k=3)] == answer
    with pytest.raises(VersionPurgedError, match=r"version 2 of .* was purged .*re-open the memory"):
        held.get_embeddings(ids[4:5])  # Read on first use, from the shard files.
    for s in compacted.shards:
        os.rename(os.path.join(root, s.path) + "-gone", os.path.join(root, s.path))
    assert VisualMemory.open(root).classify(x[:2], k=3)


# ------------------------------------------------------------------ writers that lose a race


def _race(*writers):
    """Runs the writers at once (a barrier lines them up); returns each one's result or exception."""
    out, barrier = [None] * len(writers), threading.Barrier(len(writers))

    def run(i):
        barrier.wait()
        try:
            out[i] = writers[i]()
        except Exception as e:  # pylint: disable=broad-except
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _no_unreferenced_files(root):
    """Every tombstone, weights and delta file is referenced by some version (nothing left behind)."""
    referenced = set().union(*(references.referenced_paths(read_manifest(root, version=n)) for n in list_versions(root)))
    for directory in ("tombstones", "weights", "deltas"):
        path = os.path.join(root, directory)
        for name in (os.listdir(path) if os.path.isdir(path) else []):
            rel = f"{directory}/{name}"
            assert rel in referenced or any(p.startswith(rel + "/") for p in referenced), rel


@pytest.mark.parametrize("kind", ["add+add", "add+forget", "forget+forget"])
def test_racing_writers_of_different_ids_both_publish_nothing_lost_doubled_or_resurrected(tmp_path, kind):
    rng = np.random.default_rng(11)
    ids, labels, uris, x = _entries(rng, 60)
    root = str(tmp_path / "mem")
    _build(root, ids, labels, uris, x, 2)
    for trial in range(5):
        live = set(mutations.live_ids(root).tolist())
        order = sorted(live)
        writers, added, forgotten = [], set(), set()
        for side, what in enumerate(kind.split("+")):
            if what == "add":
                new = [f"t{trial}-{side}-{i}" for i in range(3)]
                added |= set(new)
                writers.append(lambda new=new: mutations.add_entries_local(
                    root, ids=new, labels=["ant"] * 3, uris=[f"/n/{i}" for i in new],
                    embeddings=l2_normalize(rng.normal(size=(3, D)))))
            else:
                gone = order[side * 2: side * 2 + 2]
                forgotten |= set(gone)
                writers.append(lambda gone=gone: mutations.forget(root, ids=gone))
        v = list_versions(root)[-1]
        results = _race(*writers)
        assert all(not isinstance(r, Exception) for r in results), results
        assert list_versions(root)[-1] == v + 2 and {r.version for r in results} == {v + 1, v + 2}
        now = mutations.live_ids(root).tolist()
        assert len(now) == len(set(now)) == len(live) + len(added) - len(forgotten)  # Nothing doubled.
        assert set(now) == (live | added) - forgotten  # Nothing lost, nothing resurrected.
        _no_unreferenced_files(root)


def test_racing_forgets_of_the_same_id_one_conflicts_in_one_line_and_leaves_nothing(memory):
    root, ids, *_ = memory
    results = _race(lambda: mutations.forget(root, ids=ids[:2]), lambda: mutations.forget(root, ids=ids[1:3]))
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], WriteConflictError), results
    message = str(errors[0])
    assert "\n" not in message and "conflicts with version 2 (forget)" in message and ids[1] in message
    assert list_versions(root) == [1, 2] and len(os.listdir(os.path.join(root, "tombstones"))) == 1
    _no_unreferenced_files(root)


def test_a_pinned_writer_never_rebases(memory):
    root, ids, *_ = memory
    mutations.forget(root, ids=ids[:1])
    with pytest.raises(ConcurrentUpdateError, match="re-run"):
        mutations.forget(root, ids=ids[1:2], expected_version=1)


def test_writers_give_up_after_max_rebases(memory, monkeypatch):
    root, ids, *_ = memory
    real = mutations.publish_rebasing.__globals__["publish_version"]

    def always_loses(r, manifest, *, expected_parent):  # Another writer publishes before every attempt.
        latest = list_versions(r)[-1]
        real(r, dataclasses.replace(read_manifest(r), change={"kind": "prune", "summary": "other"}),
             expected_parent=latest)
        return real(r, manifest, expected_parent=expected_parent)

    monkeypatch.setitem(mutations.publish_rebasing.__globals__, "publish_version", always_loses)
    with pytest.raises(ConcurrentUpdateError, match=f"gave up after re-basing {versions.MAX_REBASES} times"):
        mutations.forget(root, ids=ids[:1])
    monkeypatch.undo()
    assert not os.listdir(os.path.join(root, "tombstones"))
    assert ids[0] in mutations.live_ids(root).tolist()


def test_the_leftover_sweep_deletes_only_old_unreferenced_files(memory):
    root, ids, *_ = memory
    mutations.forget(root, ids=ids[:1])  # Version 2 and its tombstone file (referenced).
    crashed = {  # What killed writers left: made for versions <= the latest, referenced by no version.
        "tombstones/v000002-deadbeef.npy": b"x", "weights/v000002-deadbeef.npz": b"x",
        "deltas/v000002-deadbeef/delta-00000-of-00001/ids.npy": b"x",
        "dead_letter/add-v000002/failed-deadbeef-00000-of-00001.jsonl": b""}
    running = {"tombstones/v000003-cafecafe.npy": b"x", "deltas/v000003-cafecafe/x": b"x"}  # A later version's.
    for rel, data in {**crashed, **running}.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    assert purge.find_leftovers(root) == []  # Younger than the grace period: kept.
    version_file = os.path.join(root, "versions", "v000002.json")
    hour = purge.DEFAULT_LEFTOVER_GRACE_S
    for rel in crashed:
        os.utime(os.path.join(root, rel), (os.path.getmtime(version_file) - hour - 5,) * 2)
        if rel.startswith("deltas/"):
            os.utime(os.path.join(root, *rel.split("/")[:3]), (os.path.getmtime(version_file) - hour - 5,) * 2)
            os.utime(os.path.join(root, *rel.split("/")[:2]), (os.path.getmtime(version_file) - hour - 5,) * 2)
    found = purge.remove_leftovers(root)
    assert sorted(f.rel for f in found) == sorted(["tombstones/v000002-deadbeef.npy", "weights/v000002-deadbeef.npz",
                                                   "deltas/v000002-deadbeef",
                                                   "dead_letter/add-v000002/failed-deadbeef-00000-of-00001.jsonl"])
    for rel in running:
        assert os.path.exists(os.path.join(root, rel))
    assert os.path.exists(os.path.join(root, read_manifest(root).forgotten.path))
    assert VisualMemory.open(root, verify=True).manifest.version == 2
    with pytest.raises(ValueError, match="grace_s must be >= 0"):
        purge.find_leftovers(root, grace_s=-1)


def test_entry_weights_rebase_over_an_add_and_conflict_with_other_weights(memory):
    root, ids, *_ = memory
    rng = np.random.default_rng(5)
    results = _race(lambda: mutations.publish_entry_weights(root, ids=ids[:3], weights=[0.5] * 3, params={}),
                    lambda: mutations.add_entries_local(root, ids=["w-new"], labels=["ant"], uris=["/w"],
                                                        embeddings=l2_normalize(rng.normal(size=(1, D)))))
    assert all(not isinstance(r, Exception) for r in results), results
    latest = read_manifest(root)
    assert latest.version == 3 and latest.entry_weights.count == 3 and "w-new" in mutations.live_ids(root).tolist()
    results = _race(lambda: mutations.publish_entry_weights(root, ids=ids[:2], weights=[0.1] * 2, params={}),
                    lambda: mutations.publish_entry_weights(root, ids=ids[5:7], weights=[0.2] * 2, params={}))
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], WriteConflictError), results
    assert "conflicts with version 4 (prune)" in str(errors[0]) and "changed the entry weights too" in str(errors[0])
    _no_unreferenced_files(root)  # The loser's weights file is gone.


def test_adds_of_new_classes_on_both_sides_conflict(memory):
    root, *_ = memory
    rng = np.random.default_rng(6)

    def add(name):
        return lambda: mutations.add_entries_local(root, ids=[f"{name}-1"], labels=[name], uris=["/n"],
                                                   embeddings=l2_normalize(rng.normal(size=(1, D))))

    results = _race(add("eel"), add("fox"))
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], WriteConflictError), results
    assert "both added new class names" in str(errors[0])
    assert len(read_manifest(root).class_names) == 5 and list_versions(root) == [1, 2]
    _no_unreferenced_files(root)  # The loser's delta shard is gone.
