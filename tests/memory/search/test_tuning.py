"""memory.search.tuning and vmem tune: exact search, the grid, the choice, and the recorded default setting."""

from __future__ import annotations

import numpy as np

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.versions import read_manifest
from memory.search.setting import SearchSetting, default_setting
from memory.search.tuning import candidate_settings, exact_search, publish_search_defaults, tune
from memory.vectors import l2_normalize
from memory.visual_memory import VisualMemory
from memory.decide.voting import vote
from tests.memory.helpers import ENCODER, clustered, exact_distances

D = 32


def tuning_memory(tmp_path, kind, n=6000, shards=2):
    """A memory of index ``kind`` whose votes are near-tied often (worth tuning), and held-out queries."""
    x, q = clustered(n, D, centres=40, noise=0.35, seed=1, nq=400)
    rng = np.random.default_rng(2)
    # Labels come from the nearest of 8 random anchors (not the generating centres): near-tied votes exist.
    anchors = l2_normalize(rng.normal(size=(8, D)))
    labels = [f"c{int(i)}" for i in np.argmax(x @ anchors.T, axis=1)]
    ids = [f"e{i:05d}" for i in range(n)]
    root = str(tmp_path / kind.value)
    build_memory_local(root, ids=ids, labels=labels, uris=[f"/d/{i}" for i in ids], embeddings=x, num_shards=shards,
                       index_config=IndexConfig(kind=kind, reorder=40), encoder_identity={**ENCODER, "dim": D})
    mem = VisualMemory.open(root)
    true = np.asarray([mem.class_names.index(f"c{int(i)}") for i in np.argmax(q @ anchors.T, axis=1)])
    return root, mem, x, ids, q, true


def test_exact_search_is_brute_force_with_ties_by_id(tmp_path):
    root, mem, x, ids, q, _ = tuning_memory(tmp_path, IndexKind.BRUTE_FORCE, n=500)
    found, labels, dist = exact_search(mem, q[:30], 7, block=128)  # Several blocks.
    d = exact_distances(q[:30], x)
    ref = np.lexsort((np.broadcast_to(np.arange(500), d.shape), d), axis=1)[:, :7]
    np.testing.assert_array_equal(found, np.asarray(ids)[ref])
    np.testing.assert_allclose(dist, np.take_along_axis(d, ref, axis=1), atol=2e-6)
    np.testing.assert_array_equal(labels, mem.labels_of(found))
    assert candidate_settings(mem, 10) == []  # Brute force, not routed: nothing to tune.


def test_tune_picks_the_fastest_setting_that_keeps_the_votes_and_records_it(tmp_path):
    root, mem, x, ids, q, true = tuning_memory(tmp_path, IndexKind.TREE_AH)
    result = tune(mem, q, true, k=10, repeats=1)
    chosen = result["chosen"]
    assert chosen is not None and result["exact"]["queries"] == 400
    # Independently: the chosen setting's votes agree with exact search's on >= 99.9 % of the queries.
    setting = SearchSetting.from_dict(chosen)
    res = mem.with_search_params(**setting.search_params()).search(q, 10)
    _, exact_labels, exact_dist = exact_search(mem, q, 10)
    exact_vote = vote(exact_labels, exact_dist, rule="rank", k=10).labels
    got_vote = vote(res.labels, res.distances, rule="rank", k=10).labels
    assert np.mean(got_vote == exact_vote) >= 0.999
    assert chosen["accuracy"] >= result["exact"]["accuracy"] - 0.1
    ok = [t for t in result["trials"] if t["agreement"] >= 0.999 and t["accuracy"] >= result["exact"]["accuracy"] - 0.1]
    assert chosen["qps"] == max(t["qps"] for t in ok)
    # Some settings of the grid do change votes (the criterion is not vacuous).
    assert min(t["agreement"] for t in result["trials"]) < 0.999
    if result["by_recall"] is not None:
        assert result["by_recall"]["recall"] >= 0.95

    m = publish_search_defaults(root, result, expected_version=mem.version)
    assert m.change["kind"] == "tune" and default_setting(read_manifest(root)) == setting
    opened = VisualMemory.open(root)
    raw = VisualMemory.open(root, search_defaults=False)
    want = raw.with_search_params(**setting.search_params())
    assert [u.index.num_leaves_to_search for u in opened._units] == [u.index.num_leaves_to_search for u in want._units]
    assert [u.index.config.reorder for u in opened._units] == [u.index.config.reorder for u in want._units]
    np.testing.assert_array_equal(opened.search(q, 10).ids, want.search(q, 10).ids)


def test_tune_cli_on_a_brute_force_memory_says_nothing_to_tune(tmp_path, capsys):
    from vmem import main as cli
    root, *_ = tuning_memory(tmp_path, IndexKind.BRUTE_FORCE, n=200)
    (tmp_path / "q").mkdir()
    assert cli.main(["tune", "--memory", root, "--queries", str(tmp_path / "q")]) == 0
    assert "nothing to tune" in capsys.readouterr().out
    assert cli.main(["tune", "--memory", root, "--queries", str(tmp_path / "q"), "--min-agreement", "2"]) == 2



def test_routed_memory_tunes_its_probes(tmp_path):
    x, q = clustered(3000, D, centres=30, noise=0.3, seed=4, nq=300)
    rng = np.random.default_rng(5)
    anchors = l2_normalize(rng.normal(size=(6, D)))
    labels = [f"c{int(i)}" for i in np.argmax(x @ anchors.T, axis=1)]
    root = str(tmp_path / "routed")
    build_memory_local(root, ids=[f"e{i:05d}" for i in range(3000)], labels=labels, uris=[""] * 3000, embeddings=x,
                       num_shards=4, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity={**ENCODER, "dim": D}, sharding="partition")
    mem = VisualMemory.open(root)
    grid = candidate_settings(mem, 10)
    assert grid and all(s.leaves_fraction is None and s.reorder is None for s in grid)
    assert all((s.route_probes is None) != (s.route_ratio is None) for s in grid)  # One routing rule each.
    assert max(s.route_probes or 0 for s in grid) == mem.router.centroids.shape[0]  # Probing all = every shard.
    assert sorted(s.route_ratio for s in grid if s.route_ratio) == [1.05, 1.1, 1.2, 1.3, 1.5]
    true = np.asarray([mem.class_names.index(f"c{int(i)}") for i in np.argmax(q @ anchors.T, axis=1)])
    result = tune(mem, q, true, repeats=1)
    assert result["chosen"] is not None and result["chosen"]["agreement"] >= 0.999
    full = [t for t in result["trials"] if t.get("route_probes") == mem.router.centroids.shape[0]]
    assert full[0]["recall"] == 1.0 and full[0]["agreement"] == 1.0  # Every shard, brute force: exact.
