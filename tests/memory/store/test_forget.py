"""Exact unlearning: searching after forget(S) equals searching a memory built from scratch without S.

The headline guarantee is checked as a seeded property test over many random memories (shard counts,
exact duplicate vectors, delta shards from add_entries_local, selections by ids / label / source prefix,
k beyond the live size), through both VisualMemory.search and the distributed path (LoadedShard +
merge_partials). Then the error paths, entry weights, adding, and purge after a simulated re-index.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from memory.store import mutations, purge
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.manifest import ManifestError
from memory.store.mutations import DuplicateIdError
from memory.store.shard import read_shard_data, write_shard
from memory.search.shard_search import LoadedShard, load_forgotten, merge_partials, searchable_shards
from memory.vectors import l2_normalize
from memory.store.versions import ConcurrentUpdateError, history, list_versions, publish_version, read_manifest
from memory.visual_memory import VisualMemory
from memory.decide.voting import VotingRule, predict_all_k

D = 8
BRUTE = IndexConfig(kind=IndexKind.BRUTE_FORCE)
ENC = {"name": "fake-encoder", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}
N_CASES = 50


def _entries(rng, n, *, prefix="e", classes=("ant", "bee", "cat", "dog")):
    x = l2_normalize(rng.normal(size=(n, D)))
    if n > 4:
        # Exact duplicate vectors under different ids: distance ties that must break by id.
        dup = rng.choice(n, size=max(1, n // 6), replace=False)
        x[dup] = x[dup[0]]
    ids = [f"{prefix}{i:03d}" for i in rng.permutation(n)]
    labels = [str(classes[i]) for i in rng.integers(0, len(classes), n)]
    # Two source roots, so a source prefix can select an arbitrary-looking subset.
    uris = [f"gs://{'alpha' if rng.random() < 0.5 else 'beta'}/{lab}/{i}.png" for i, lab in zip(ids, labels)]
    return ids, labels, uris, x


def _build(root, ids, labels, uris, x, shards):
    return build_memory_local(str(root), ids=ids, labels=labels, uris=uris, embeddings=x, num_shards=shards,
                              index_config=BRUTE, encoder_identity=ENC)


def _names(mem, res):
    return mem.label_names(res.labels)


def _assert_same(mem, res, ref_mem, ref):
    np.testing.assert_array_equal(res.ids, ref.ids)
    np.testing.assert_array_equal(res.distances, ref.distances)
    np.testing.assert_array_equal(_names(mem, res), _names(ref_mem, ref))


def _predicted_names(mem, res):
    preds = predict_all_k(res.labels, res.distances)
    names = np.asarray(mem.class_names + ("",), dtype=str)
    return {rule: names[p] for rule, p in preds.items()}


def _case(rng, tmp_path, case):
    """One random memory + mutations; returns (root, reference root, queries, live count)."""
    n = int(rng.integers(1, 70))
    shards = int(rng.choice([1, 2, 3, 5]))
    ids, labels, uris, x = _entries(rng, n)
    root = tmp_path / f"case{case}"
    _build(root, ids, labels, uris, x, shards)
    rows = {i: (lab, u, v) for i, lab, u, v in zip(ids, labels, uris, x)}
    if rng.random() < 0.5:  # Delta shard, possibly with a new class and duplicate vectors of main entries.
        m = int(rng.integers(1, 12))
        a_ids, a_labels, a_uris, a_x = _entries(rng, m, prefix="new", classes=("bee", "eel"))
        a_x[0] = x[0]
        mutations.add_entries_local(str(root), ids=a_ids, labels=a_labels, uris=a_uris, embeddings=a_x)
        rows.update({i: (lab, u, v) for i, lab, u, v in zip(a_ids, a_labels, a_uris, a_x)})
    all_ids = sorted(rows)
    for _ in range(int(rng.integers(1, 3))):  # One or two forgets, by ids, label or source prefix.
        live = sorted(mutations.live_ids(str(root)).tolist())
        if not live:
            break
        how = rng.choice(["ids", "label", "prefix"])
        if how == "ids":
            pick = rng.choice(live, size=int(rng.integers(1, len(live) + 1)), replace=False).tolist()
            mutations.forget(str(root), ids=pick)
        elif how == "label":
            mutations.forget(str(root), label=rows[str(rng.choice(live))][0])
        else:
            parts = rows[str(rng.choice(live))][1].split("/")  # gs://<root>/<label>/<id>.png
            depth = int(rng.integers(3, 5))  # gs://<root>/ or gs://<root>/<label>/
            mutations.forget(str(root), source_prefix="/".join(parts[:depth]) + "/")
    live = sorted(mutations.live_ids(str(root)).tolist())
    # The reference: the same entries minus everything forgotten, built from scratch with the same shards.
    ref_root = tmp_path / f"ref{case}"
    _build(ref_root, live, [rows[i][0] for i in live], [rows[i][1] for i in live],
           np.stack([rows[i][2] for i in live]) if live else np.zeros((0, D), np.float32), shards)
    all_x = np.stack([rows[i][2] for i in all_ids])
    q = np.concatenate([l2_normalize(rng.normal(size=(6, D))), all_x[rng.choice(len(all_ids), 4)]])
    return root, ref_root, q.astype(np.float32), len(live)


def test_search_after_forget_equals_rebuild_without_forgotten(tmp_path):
    rng = np.random.default_rng(20261126)
    checked = 0
    for case in range(N_CASES):
        root, ref_root, q, n_live = _case(rng, tmp_path, case)
        mem, ref_mem = VisualMemory.open(str(root)), VisualMemory.open(str(ref_root))
        assert len(mem) == len(ref_mem) == n_live
        physical = mem.manifest.physical_total
        for k in sorted({1, 3, max(1, n_live), n_live + 2, physical + 3}):
            res, ref = mem.search(q, k), ref_mem.search(q, k)
            _assert_same(mem, res, ref_mem, ref)
            preds, ref_preds = _predicted_names(mem, res), _predicted_names(ref_mem, ref)
            for rule in VotingRule:
                np.testing.assert_array_equal(preds[rule], ref_preds[rule], err_msg=f"case {case} k {k} {rule}")
            # The distributed path: one LoadedShard per main/delta shard, partials merged exactly.
            manifest = mem.manifest
            forgotten = load_forgotten(str(root), manifest)
            loaded = [LoadedShard.load(str(root), info, forgotten=forgotten) for info in searchable_shards(manifest)]
            # Capped at the live entries, as VisualMemory.search and the evaluate job cap k.
            live_k = min(k, max(n_live, 1))
            merged = merge_partials([s.search(q, live_k) for s in loaded], live_k)
            np.testing.assert_array_equal(merged.ids, ref.ids)
            np.testing.assert_array_equal(merged.distances, ref.distances)
            np.testing.assert_array_equal(mem.label_names(merged.labels), _names(ref_mem, ref))
            checked += 1
    assert checked >= 3 * N_CASES


def test_forget_hides_entries_and_the_test_can_fail(tmp_path):
    """Control: without tombstones (a pinned pre-forget version) the answers differ from the rebuild."""
    rng = np.random.default_rng(1)
    ids, labels, uris, x = _entries(rng, 60)
    _build(tmp_path / "m", ids, labels, uris, x, 3)
    target = ids[0]
    m = mutations.forget(str(tmp_path / "m"), ids=[target])
    q = x[ids.index(target)][None, :]
    before = VisualMemory.open(str(tmp_path / "m"), version=1).search(q, 5)
    after = VisualMemory.open(str(tmp_path / "m")).search(q, 5)
    assert target in before.ids[0] and target not in after.ids[0]
    assert before.distances[0, 0] == pytest.approx(0.0, abs=1e-6) and m.version == 2
    with pytest.raises(KeyError, match=target):
        VisualMemory.open(str(tmp_path / "m")).get_embeddings([target])


@pytest.fixture()
def memory(tmp_path):
    rng = np.random.default_rng(7)
    ids, labels, uris, x = _entries(rng, 120)
    root = str(tmp_path / "mem")
    _build(root, ids, labels, uris, x, 4)
    return root, ids, labels, uris, x


def test_unknown_ids_raise_key_error_listing_them_and_publish_nothing(memory):
    root, ids, *_ = memory
    mutations.forget(root, ids=[ids[0]])
    with pytest.raises(KeyError) as err:
        mutations.forget(root, ids=[ids[1], "nope-1", ids[0], "nope-2"])
    message = err.value.args[0]
    assert "3 unknown id(s)" in message and "'nope-1'" in message and "'nope-2'" in message
    assert f"already forgotten: ['{ids[0]}']" in message and ids[1] not in message
    assert list_versions(root) == [1, 2]
    assert ids[1] in mutations.live_ids(root)
    with pytest.raises(KeyError, match="unknown label 'zebra'"):
        mutations.forget(root, label="zebra")
    with pytest.raises(KeyError, match="gs://nowhere/"):
        mutations.forget(root, source_prefix="gs://nowhere/")
    with pytest.raises(ValueError, match="needs a selection"):
        mutations.forget(root)
    assert list_versions(root) == [1, 2]


def test_forget_whole_label_and_history(memory):
    root, ids, labels, *_ = memory
    n_bee = labels.count("bee")
    m = mutations.forget(root, label="bee")
    assert m.change["forgotten"] == n_bee and m.total == 120 - n_bee
    mem = VisualMemory.open(root)
    res = mem.search(l2_normalize(np.random.default_rng(3).normal(size=(20, D))), 120)
    assert "bee" not in set(mem.label_names(res.labels).ravel().tolist())
    assert (res.labels >= 0).sum(axis=1).tolist() == [120 - n_bee] * 20
    with pytest.raises(KeyError, match="label 'bee' has no live entries"):
        mutations.forget(root, label="bee")
    mutations.forget(root, ids=[i for i, lab in zip(ids, labels) if lab == "ant"][:2])
    rows = history(root)
    assert [(r["version"], r["parent"], r["kind"], r["entries"]) for r in rows] == [
        (1, None, "build", 120), (2, 1, "forget", 120 - n_bee), (3, 2, "forget", 118 - n_bee)]
    assert rows[1]["summary"] == f"forgot {n_bee} entries (label='bee')"


def test_crash_between_tombstone_and_publish_leaves_latest_intact(memory, monkeypatch):
    root, ids, _, _, x = memory
    q = x[:5]
    expected = VisualMemory.open(root).search(q, 7)

    def crash(*args, **kwargs):
        raise OSError("simulated crash after the tombstone file was written")

    monkeypatch.setattr(mutations, "publish_rebasing", crash)
    with pytest.raises(OSError, match="simulated crash"):
        mutations.forget(root, ids=ids[:3])
    monkeypatch.undo()
    assert not os.listdir(os.path.join(root, "tombstones"))  # The failed writer deleted its unpublished file.
    assert list_versions(root) == [1] and read_manifest(root).forgotten is None
    # A half-written version file from a crashed publisher is never a version.
    with open(os.path.join(root, "versions", ".tmp-v000002.json-abc"), "w") as f:
        f.write('{"format_version": 1, "trunc')
    assert list_versions(root) == [1]
    got = VisualMemory.open(root).search(q, 7)
    np.testing.assert_array_equal(got.ids, expected.ids)
    # The next writer is unaffected by the debris.
    assert mutations.forget(root, ids=ids[:3]).version == 2


def test_stale_expected_version_is_refused(memory):
    root, ids, *_ = memory
    mutations.forget(root, ids=[ids[0]], expected_version=1)
    with pytest.raises(ConcurrentUpdateError, match="version 2.*re-run"):
        mutations.forget(root, ids=[ids[1]], expected_version=1)
    assert list_versions(root) == [1, 2]


def test_entry_weights_reach_search_and_classify(memory):
    root, ids, labels, _, x = memory
    q = x[:3]
    assert VisualMemory.open(root).search(q, 4).weights is None
    top = VisualMemory.open(root).search(q, 4).ids
    target = str(top[0, 0])
    m = mutations.publish_entry_weights(root, ids=[target], weights=[0.0], params={"gamma_numerator": 1.75})
    assert m.change["kind"] == "prune" and m.entry_weights.count == 1
    mem = VisualMemory.open(root)
    res = mem.search(q, 4)
    np.testing.assert_array_equal(res.weights, np.where(res.ids == target, 0.0, 1.0).astype(np.float32))
    pred = mem.classify(q[:1], rule="plurality", k=4)[0]
    assert [n.weight for n in pred.neighbors if n.id == target] == [0.0]
    with pytest.raises(KeyError, match="not-there"):
        mutations.publish_entry_weights(root, ids=["not-there"], weights=[1.0], params={})
    assert mutations.clear_entry_weights(root).entry_weights is None
    assert VisualMemory.open(root).search(q, 4).weights is None


def test_add_rejects_duplicates_and_forgotten_ids(memory):
    root, ids, labels, uris, x = memory
    rng = np.random.default_rng(5)
    with pytest.raises(DuplicateIdError, match=f"already live.*'{ids[3]}'"):
        mutations.add_entries_local(root, ids=["fresh", ids[3]], labels=["ant", "ant"], uris=["a", "b"],
                                    embeddings=rng.normal(size=(2, D)))
    mutations.forget(root, ids=[ids[4]])
    with pytest.raises(DuplicateIdError, match=f"forgotten id.*reindex.*'{ids[4]}'"):
        mutations.add_entries_local(root, ids=[ids[4]], labels=["ant"], uris=["a"], embeddings=x[4:5])
    m = mutations.add_entries_local(root, ids=["fresh", "fresh2"], labels=["zebra", "ant"], uris=["a", "b"],
                                    embeddings=rng.normal(size=(2, D)))
    assert m.class_names == ("ant", "bee", "cat", "dog", "zebra") and m.change["new_classes"] == ["zebra"]
    assert m.total == 121 and len(m.delta_shards) == 1 and m.delta_shards[0].index_kind == "brute_force"
    assert mutations.extended_class_names(("b", "a"), ["c", "a", "0"]) == ("b", "a", "0", "c")
    mem = VisualMemory.open(root)
    assert mem.label_names(mem.search(mem.get_embeddings(["fresh"]), 1).labels).tolist() == [["zebra"]]


def _reindex(root: str) -> None:
    """What a re-index job does: live rows rewritten into NEW shard dirs, deltas folded in, no tombstones."""
    m = read_manifest(root)
    gone = set(load_forgotten(root, m).tolist())
    parts = [read_shard_data(os.path.join(root, s.path)) for s in m.all_shards if s.count]
    keep = [np.array([i not in gone for i in p.ids.tolist()], dtype=bool) for p in parts]
    cat = lambda name: np.concatenate([getattr(p, name)[k] for p, k in zip(parts, keep)])  # noqa: E731
    data = dataclasses.replace(parts[0], ids=cat("ids"), labels=cat("labels"), uris=cat("uris"),
                               embeddings=cat("embeddings"))
    rel = f"shards/r{m.version + 1:06d}/shard-00000-of-00001"
    info = write_shard(os.path.join(root, rel), data, index_config=BRUTE, name="shard-00000-of-00001",
                       root_relative_path=rel)
    publish_version(root, dataclasses.replace(m, shards=(info,), delta_shards=(), forgotten=None,
                                              change={"kind": "reindex", "summary": "re-indexed"}),
                    expected_parent=m.version)


def test_purge_after_reindex_deletes_old_versions_and_files(memory):
    root, ids, labels, uris, x = memory
    mutations.add_entries_local(root, ids=["new1"], labels=["ant"], uris=["u"], embeddings=x[:1])
    mutations.forget(root, ids=[ids[0], "new1"], request_purge=True)
    assert purge.purge_requested_since_reindex(root)
    expected = VisualMemory.open(root).search(x[:10], 130)
    # Before a re-index, purging removes the versions that still show the forgotten entries...
    assert purge.purge_history(root) == [1, 2]
    assert list_versions(root) == [3, 4]
    with pytest.raises(ManifestError, match="no version 1"):
        VisualMemory.open(root, version=1)
    # ...but the embeddings are still inside the current shard files (hidden by tombstones).
    stored = np.concatenate([read_shard_data(os.path.join(root, s.path)).ids for s in read_manifest(root).all_shards])
    assert ids[0] in stored
    _reindex(root)
    assert purge.purge_requested_since_reindex(root) is False
    np.testing.assert_array_equal(VisualMemory.open(root).search(x[:10], 130).ids, expected.ids)
    assert purge.purge_history(root) == [3, 4]
    assert list_versions(root) == [5, 6] and history(root)[-1]["change"]["purged_versions"] == [3, 4]
    deleted = history(root)[-1]["change"]["deleted_paths"]
    assert {p.split("/")[0] for p in deleted} == {"shard-00000-of-00004", "shard-00001-of-00004",
                                                  "shard-00002-of-00004", "shard-00003-of-00004",
                                                  "deltas", "tombstones"}
    for rel in deleted:
        assert not os.path.exists(os.path.join(root, rel))
    assert not os.path.exists(os.path.join(root, "deltas"))  # Empty parents went too.
    stored = read_shard_data(os.path.join(root, read_manifest(root).shards[0].path)).ids.tolist()
    assert ids[0] not in stored and "new1" not in stored and len(stored) == 119
    np.testing.assert_array_equal(VisualMemory.open(root).search(x[:10], 130).ids, expected.ids)
    assert purge.purge_history(root) == []  # Nothing left to purge: nothing published.
    assert list_versions(root) == [5, 6]


def test_purge_killed_halfway_is_finished_by_the_next_purge(memory, monkeypatch):
    """A purge publishes what it will delete first; if killed mid-deletion, the next purge deletes the rest."""
    root, ids, labels, uris, x = memory
    mutations.forget(root, ids=[ids[0]], request_purge=True)
    _reindex(root)
    real_remove = mutations.storage.remove_tree
    calls = []

    def dying_remove(path):
        calls.append(path)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed mid-purge")
        real_remove(path)

    monkeypatch.setattr(mutations.storage, "remove_tree", dying_remove)
    with pytest.raises(KeyboardInterrupt):
        purge.purge_history(root)
    monkeypatch.setattr(mutations.storage, "remove_tree", real_remove)
    deleted = history(root)[-1]["change"]["deleted_paths"]
    assert any(os.path.exists(os.path.join(root, rel)) for rel in deleted)  # Leftovers with forgotten rows.
    purge.purge_history(root)
    for rel in deleted:
        assert not os.path.exists(os.path.join(root, rel))
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert ids[0].encode() not in f.read() or name.endswith(".json"), os.path.join(dirpath, name)


def test_forgetting_a_whole_class_is_exact_and_asks_shards_for_a_bounded_over_fetch(tmp_path, monkeypatch):
    """Forgetting a class used to ask every shard for k + (all its forgotten rows) neighbours."""
    from memory.index.shard_index import ShardIndex
    from memory.search.shard_search import MIN_OVERFETCH
    rng = np.random.default_rng(11)
    classes = ("ant", "bee", "cat", "dog")
    centres = l2_normalize(rng.normal(size=(len(classes), D)))
    n = 2400
    label_idx = rng.integers(0, len(classes), n)
    # Clustered by class, so a forgotten class's queries find (almost) only forgotten rows nearby.
    x = l2_normalize(centres[label_idx] + 0.15 * rng.normal(size=(n, D)))
    x[5:9] = x[4]  # Exact duplicates: ties that must break by id.
    ids = [f"e{i:04d}" for i in rng.permutation(n)]
    labels = [classes[i] for i in label_idx]
    uris = [f"/img/{i}.png" for i in ids]
    root, ref_root = tmp_path / "mem", tmp_path / "ref"
    _build(root, ids, labels, uris, x, 2)
    mutations.forget(str(root), label="cat")
    keep = [i for i, lab in enumerate(labels) if lab != "cat"]
    _build(ref_root, [ids[i] for i in keep], [labels[i] for i in keep], [uris[i] for i in keep], x[keep], 2)
    mem, ref_mem = VisualMemory.open(str(root), search_threads=1), VisualMemory.open(str(ref_root))
    dead_per_shard = [int(np.isin(read_shard_data(os.path.join(root, s.path)).ids,
                                  mutations.read_forgotten(str(root), mem.manifest)).sum())
                      for s in mem.manifest.shards]
    assert min(dead_per_shard) > 2 * 50 + MIN_OVERFETCH  # The old k + dead would exceed the bound below.
    cats = np.flatnonzero(label_idx == classes.index("cat"))
    q = np.concatenate([x[cats[:8]], l2_normalize(rng.normal(size=(4, D)))]).astype(np.float32)

    requested = []
    real_search = ShardIndex.search

    def spy(self, queries, k):
        requested.append((len(self), int(k)))
        return real_search(self, queries, k)

    monkeypatch.setattr(ShardIndex, "search", spy)
    for k in (1, 10, 50):
        requested.clear()
        res, ref = mem.search(q, k), ref_mem.search(q, k)
        _assert_same(mem, res, ref_mem, ref)
        forgotten = load_forgotten(str(root), mem.manifest)
        loaded = [LoadedShard.load(str(root), info, forgotten=forgotten) for info in searchable_shards(mem.manifest)]
        merged = merge_partials([s.search(q, k) for s in loaded], k)
        np.testing.assert_array_equal(merged.ids, ref.ids)
        np.testing.assert_array_equal(merged.distances, ref.distances)
        asked = [want for size, want in requested if size in {s.count for s in mem.manifest.shards}]
        assert asked and max(asked) <= k + max(k, MIN_OVERFETCH)
        # The queries of the forgotten class came up short and were answered over the live rows only.
        live_sizes = {s.count - d for s, d in zip(mem.manifest.shards, dead_per_shard)}
        assert any(size in live_sizes for size, _ in requested)


def test_purge_record_listing_a_path_outside_the_memory_deletes_nothing(memory, tmp_path):
    """A version file's change.deleted_paths is data anyone can edit: a path escaping the root is refused."""
    root, *_ = memory
    outside = tmp_path / "precious.txt"
    outside.write_text("not the memory's")
    leftover = os.path.join(root, "tombstones", "v000001-dead.npy")  # Unreferenced: a purge may delete it.
    os.makedirs(os.path.dirname(leftover))
    open(leftover, "wb").close()
    latest = read_manifest(root)
    publish_version(root, dataclasses.replace(latest, change={
        "kind": "purge", "summary": "edited by hand", "purged_versions": [],
        "deleted_paths": ["tombstones/v000001-dead.npy", "../precious.txt"]}), expected_parent=latest.version)
    with pytest.raises(ManifestError, match=r"refusing to delete '\.\./precious\.txt' listed in version 2"):
        purge.purge_history(root)
    assert outside.read_text() == "not the memory's" and os.path.exists(leftover)  # Nothing at all was deleted.


def test_purge_leaves_tombstones_the_latest_lists_for_the_leftover_sweep(memory):
    """A purged version's tombstone file whose ids the latest tombstones all list is left for the sweep (a job
    still reading that version can finish; nothing is revealed beyond the latest's own tombstones); one whose
    ids a re-index dropped goes at once."""
    root, ids, *_ = memory
    mutations.forget(root, ids=[ids[0]])
    second = read_manifest(root).forgotten.path
    mutations.forget(root, ids=[ids[1]])
    assert purge.purge_history(root) == [1, 2]
    assert second not in history(root)[-1]["change"]["deleted_paths"]
    assert os.path.exists(os.path.join(root, second))  # Still readable by whoever pinned version 2...
    np.testing.assert_array_equal(mutations.read_forgotten(root, read_manifest(root)), sorted(ids[:2]))
    assert [f.rel for f in purge.remove_leftovers(root, grace_s=0)] == [second]  # ...until the sweep.
    assert not os.path.exists(os.path.join(root, second))
    mutations.forget(root, ids=[ids[2]])
    third = read_manifest(root).forgotten.path
    _reindex(root)
    assert purge.purge_history(root)  # The re-index dropped the forgotten rows: their tombstones go now.
    assert third in history(root)[-1]["change"]["deleted_paths"]
    assert not os.path.exists(os.path.join(root, third))
