"""Filtered search and crowding (memory.search.filters) and metadata columns (memory.store.metadata).

The headline guarantee of filters mirrors forgetting's: a filtered search equals the search of a memory
built from the admitted entries only (same ids, same distances), over random memories with several shards,
exact duplicate vectors and delta shards, and k admitted neighbours whenever k exist. Crowding is checked
against a brute-force greedy walk over the full sorted list, and shown not to depend on the shard count.
"""

from __future__ import annotations

import numpy as np
import pytest

from memory.store import mutations
from memory.build import build_memory_local
from memory.search.filters import Crowding, QueryFilter, crowd, uri_prefix
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.versions import read_manifest
from memory.search.duplicates import near_duplicate_groups
from memory.store.metadata import publish_metadata, read_metadata, read_table_file
from memory.vectors import l2_normalize
from memory.visual_memory import VisualMemory

D = 8
BRUTE = IndexConfig(kind=IndexKind.BRUTE_FORCE)
ENC = {"name": "fake-encoder", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}
CLASSES = ("ant", "bee", "cat", "dog")


def _entries(rng, n, prefix="e"):
    x = l2_normalize(rng.normal(size=(n, D)))
    dup = rng.choice(n, size=max(1, n // 6), replace=False)
    x[dup] = x[dup[0]]  # Exact duplicates under different ids: ties must break by id.
    ids = [f"{prefix}{i:03d}" for i in rng.permutation(n)]
    labels = [CLASSES[i] for i in rng.integers(0, len(CLASSES), n)]
    uris = [f"gs://{'alpha' if rng.random() < 0.5 else 'beta'}/{lab}/{i}.png" for i, lab in zip(ids, labels)]
    return ids, labels, uris, x


def _build(root, ids, labels, uris, x, shards):
    build_memory_local(str(root), ids=list(ids), labels=list(labels), uris=list(uris), embeddings=np.asarray(x),
                       num_shards=shards, index_config=BRUTE, encoder_identity=ENC)
    return VisualMemory.open(str(root))


# ----------------------------------------------------------------------------------------- QueryFilter


def test_filter_parse_forms_and_canonical_key():
    f = QueryFilter.parse("label=cat|dog; uri=gs://alpha/ ;meta:source=web|flickr")
    assert f.labels == ("cat", "dog") and f.uri_prefix == "gs://alpha/"
    assert f.metadata == (("source", ("web", "flickr")),)
    same = QueryFilter.from_dict({"labels": ["dog", "cat"], "uri_prefix": "gs://alpha/",
                                  "metadata": {"source": ["flickr", "web"]}})
    assert f.key() == same.key()
    assert QueryFilter.parse('{"labels": "cat"}').labels == ("cat",)
    assert QueryFilter.parse("meta.source=web").metadata == (("source", ("web",)),)


@pytest.mark.parametrize("spec, message", [
    ("colour=red", "unknown name 'colour'"),
    ("label", "expected NAME=VALUE"),
    (";", "has no condition"),
    ("{bad json", "not valid JSON"),
])
def test_filter_parse_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        QueryFilter.parse(spec)


def test_filter_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match="unknown filter field"):
        QueryFilter.from_dict({"label": ["cat"]})


# --------------------------------------------------------------------------------- filtered == rebuilt


@pytest.mark.parametrize("seed", range(12))
def test_filtered_search_equals_memory_of_admitted_entries(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 120))
    ids, labels, uris, x = _entries(rng, n)
    shards = int(rng.integers(1, 5))
    mem = _build(tmp_path / "m", ids, labels, uris, x, shards)
    if seed % 3 == 0:  # Delta shards too.
        ids2, labels2, uris2, x2 = _entries(rng, 15, prefix="add")
        mutations.add_entries_local(str(tmp_path / "m"), ids=ids2, labels=labels2, uris=uris2, embeddings=x2)
        mem = VisualMemory.open(str(tmp_path / "m"))
        ids, labels, uris, x = ids + ids2, labels + labels2, uris + uris2, np.concatenate([x, x2])
    f = [QueryFilter(labels=("cat",)), QueryFilter(uri_prefix="gs://beta/"),
         QueryFilter(labels=("ant", "dog"), uri_prefix="gs://alpha/")][seed % 3]
    admit = np.asarray([(f.labels is None or lab in f.labels) and (f.uri_prefix is None or u.startswith(f.uri_prefix))
                        for lab, u in zip(labels, uris)])
    if not admit.any():
        pytest.skip("nothing admitted")
    ref = _build(tmp_path / "ref", np.asarray(ids)[admit], np.asarray(labels)[admit], np.asarray(uris)[admit],
                 x[admit], 1)
    q = l2_normalize(rng.normal(size=(9, D)))
    k = int(rng.integers(1, 25))
    got, want = mem.search(q, k, filters=f), ref.search(q, k)
    # Each search is capped at its own memory's live entries: past the admitted ones ``got`` holds padding only.
    w = want.ids.shape[1]
    assert got.ids.shape[1] == min(k, len(mem)) and (got.ids[:, w:] == "").all()
    got = type(got)(*(None if a is None else a[:, :w] for a in got))
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.distances, want.distances)
    np.testing.assert_array_equal(mem.label_names(got.labels), ref.label_names(want.labels))
    # k admitted neighbours whenever k exist: the bounded over-fetch alone would leave rare classes short.
    assert ((got.ids != "").sum(axis=1) == min(k, int(admit.sum()))).all()


def test_per_query_filters_and_unfiltered_queries_mix(tmp_path):
    rng = np.random.default_rng(7)
    ids, labels, uris, x = _entries(rng, 80)
    mem = _build(tmp_path / "m", ids, labels, uris, x, 3)
    q = l2_normalize(rng.normal(size=(3, D)))
    got = mem.search(q, 5, filters=[QueryFilter(labels=("bee",)), None, QueryFilter(labels=("dog",))])
    names = mem.label_names(got.labels)
    assert set(names[0]) == {"bee"} and set(names[2]) == {"dog"}
    np.testing.assert_array_equal(got.ids[1], mem.search(q[1:2], 5).ids[0])
    with pytest.raises(ValueError, match="2 filters for 3 queries"):
        mem.search(q, 5, filters=[None, None])


def test_filter_with_forgotten_entries(tmp_path):
    rng = np.random.default_rng(3)
    ids, labels, uris, x = _entries(rng, 60)
    root = tmp_path / "m"
    _build(root, ids, labels, uris, x, 2)
    cats = [i for i, lab in zip(ids, labels) if lab == "cat"]
    mutations.forget(str(root), ids=cats[: len(cats) // 2])
    mem = VisualMemory.open(str(root))
    got = mem.search(l2_normalize(rng.normal(size=(4, D))), 30, filters=QueryFilter(labels=("cat",)))
    live_cats = set(cats[len(cats) // 2:])
    assert all(set(r[r != ""]) == live_cats for r in got.ids)


def test_unknown_filter_label_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    mem = _build(tmp_path / "m", *_entries(rng, 20), 1)
    with pytest.raises(ValueError, match=r"filter labels \['emu'\] are not classes"):
        mem.search(l2_normalize(rng.normal(size=(1, D))), 3, filters=QueryFilter(labels=("emu",)))


# ----------------------------------------------------------------------------------------- metadata


def test_metadata_attach_merge_filter_and_carry_forward(tmp_path):
    rng = np.random.default_rng(5)
    ids, labels, uris, x = _entries(rng, 50)
    root = str(tmp_path / "m")
    _build(root, ids, labels, uris, x, 2)
    source = ["web" if i % 3 else "studio" for i in range(50)]
    publish_metadata(root, ids, {"source": source})
    publish_metadata(root, ids[:10], {"licence": ["cc"] * 10})  # Merges: source kept, licence added.
    m = read_manifest(root)
    assert m.change["kind"] == "metadata" and m.metadata.columns == ("source", "licence")
    table = read_metadata(root, m)
    assert table.values("source", np.asarray(ids)).tolist() == source
    assert table.values("licence", np.asarray(ids[9:11])).tolist() == ["cc", ""]
    mem = VisualMemory.open(root)
    q = l2_normalize(rng.normal(size=(5, D)))
    got = mem.search(q, 50, filters=QueryFilter.parse("meta:source=studio"))
    studio = {i for i, s in zip(ids, source) if s == "studio"}
    assert all(set(r[r != ""]) == studio for r in got.ids)
    # Later versions keep the table; an added entry has no value, so a metadata filter never admits it.
    mutations.add_entries_local(root, ids=["new"], labels=["cat"], uris=["gs://alpha/cat/new.png"],
                                embeddings=x[:1])
    mem = VisualMemory.open(root)
    assert read_manifest(root).metadata == m.metadata
    assert "new" not in mem.search(x[:1], 60, filters=QueryFilter.parse("meta:source=studio|web")).ids


def test_metadata_errors(tmp_path):
    rng = np.random.default_rng(2)
    ids, labels, uris, x = _entries(rng, 10)
    root = str(tmp_path / "m")
    mem = _build(root, ids, labels, uris, x, 1)
    with pytest.raises(ValueError, match="has no metadata columns"):
        mem.search(x[:1], 2, filters=QueryFilter.parse("meta:source=web"))
    with pytest.raises(KeyError, match="not live"):
        publish_metadata(root, ["nope"], {"source": ["web"]})
    with pytest.raises(ValueError, match="2 values for 1 ids"):
        publish_metadata(root, ids[:1], {"source": ["a", "b"]})
    publish_metadata(root, ids, {"source": ["web"] * 10})
    with pytest.raises(KeyError, match=r"no metadata column 'colour'.*\['source'\]"):
        VisualMemory.open(root).search(x[:1], 2, filters=QueryFilter.parse("meta:colour=red"))


def test_read_table_file_formats(tmp_path):
    (tmp_path / "t.csv").write_text("id,source,n\na,web,1\nb,studio,2\n")
    (tmp_path / "t.jsonl").write_text('{"key": "a", "source": "web"}\n{"key": "b", "source": null}\n')
    ids, cols = read_table_file(str(tmp_path / "t.csv"))
    assert ids.tolist() == ["a", "b"] and cols["source"].tolist() == ["web", "studio"]
    assert cols["n"].tolist() == ["1", "2"]
    ids, cols = read_table_file(str(tmp_path / "t.jsonl"), id_column="key")
    assert cols["source"].tolist() == ["web", ""]
    with pytest.raises(ValueError, match="no id column 'id'"):
        read_table_file(str(tmp_path / "t.jsonl"))


# ----------------------------------------------------------------------------------------- crowding


def test_crowd_greedy_walk():
    groups = np.asarray([["a", "a", "b", "a", "", "", "b", "c"]])
    valid = np.ones(groups.shape, bool)
    cols, short = crowd(groups, valid, 4, 1)
    assert cols.tolist() == [[0, 2, 4, 5]] and not short[0]  # "" = a group of its own.
    cols, short = crowd(groups, valid, 6, 2)
    assert cols.tolist() == [[0, 1, 2, 4, 5, 6]]
    cols, short = crowd(np.asarray([["a", "a", "a"]]), np.ones((1, 3), bool), 2, 1)
    assert cols.tolist() == [[0, -1]] and short[0]  # Full list, still short: fetch more.
    cols, short = crowd(np.asarray([["a", "a", ""]]), np.asarray([[True, True, False]]), 2, 1)
    assert cols.tolist() == [[0, -1]] and not short[0]  # Exhausted list: nothing more to fetch.


def test_uri_prefix_depth():
    assert uri_prefix("gs://b/x/y.png", 1) == "gs://b"
    assert uri_prefix("gs://b/x/y.png", 2) == "gs://b/x"
    assert uri_prefix("/data/web/a/1.png", 2) == "/data/web"
    assert Crowding.parse("2:uri:3") == Crowding(2, "uri:3")
    with pytest.raises(ValueError, match="crowding by 'colour'"):
        Crowding(1, "colour")
    with pytest.raises(ValueError, match="expected C or C:BY"):
        Crowding.parse("x")


@pytest.mark.parametrize("seed", range(6))
def test_crowded_search_equals_greedy_walk_and_ignores_sharding(tmp_path, seed):
    rng = np.random.default_rng(100 + seed)
    n = 150
    ids, labels, uris, x = _entries(rng, n)
    # Many entries per folder so crowding bites: 6 folders.
    uris = [f"gs://site{int(rng.integers(0, 6))}/img/{i}.png" for i in ids]
    c, k = int(rng.integers(1, 4)), int(rng.integers(3, 15))
    crowding = Crowding(c, "uri")
    q = l2_normalize(rng.normal(size=(7, D)))
    one = _build(tmp_path / "one", ids, labels, uris, x, 1)
    many = _build(tmp_path / "many", ids, labels, uris, x, 4)
    got = many.search(q, k, crowding=crowding)
    np.testing.assert_array_equal(got.ids, one.search(q, k, crowding=crowding).ids)
    full = one.search(q, n)
    folder = {i: u.rsplit("/", 1)[0] for i, u in zip(ids, uris)}
    for row in range(q.shape[0]):
        kept, seen = [], {}
        for i in full.ids[row]:
            if seen.get(folder[i], 0) < c:
                seen[folder[i]] = seen.get(folder[i], 0) + 1
                kept.append(i)
        assert got.ids[row][got.ids[row] != ""].tolist() == kept[:k]


def test_near_duplicate_groups_and_crowding_by_them(tmp_path):
    rng = np.random.default_rng(9)
    base = l2_normalize(rng.normal(size=(10, D)))
    # Entry j has 0..3 near copies: groups of 1..4 members.
    x, ids = [], []
    for j in range(10):
        for copy in range(1 + j % 4):
            x.append(base[j] + (1e-3 * rng.normal(size=D) if copy else 0))
            ids.append(f"g{j}-{copy}")
    x = l2_normalize(np.asarray(x))
    root = str(tmp_path / "m")
    mem = _build(root, ids, ["cat"] * len(ids), [f"/d/{i}.png" for i in ids], x, 2)
    got_ids, groups = near_duplicate_groups(mem, 1e-4)
    by_id = dict(zip(got_ids.tolist(), groups.tolist()))
    for i in ids:
        assert by_id[i] == i.split("-")[0] + "-0"  # The smallest member id names the group.
    publish_metadata(root, got_ids, {"near_dup": groups})
    mem = VisualMemory.open(root)
    res = mem.search(base, 3, crowding=Crowding.parse("1:meta:near_dup"))
    for row in res.ids:
        assert len({by_id[i] for i in row}) == 3


@pytest.mark.parametrize("seed", range(6))
def test_distributed_path_equals_visual_memory_with_filters_and_crowding(tmp_path, seed):
    """What the evaluate job runs (LoadedShard per shard, merge_partials in any grouping) equals search()."""
    from memory.search.shard_search import LoadedShard, load_forgotten, merge_partials, searchable_shards
    rng = np.random.default_rng(300 + seed)
    ids, labels, uris, x = _entries(rng, 140)
    uris = [f"gs://site{int(rng.integers(0, 5))}/img/{i}.png" for i in ids]
    root = str(tmp_path / "m")
    _build(root, ids, labels, uris, x, 4)
    mutations.forget(root, ids=ids[:20])
    publish_metadata(root, ids[20:], {"src": [f"s{int(v)}" for v in rng.integers(0, 3, 120)]})
    mem = VisualMemory.open(root)
    m = read_manifest(root)
    q = l2_normalize(rng.normal(size=(6, D)))
    filters = [QueryFilter(labels=("cat", "dog")), None, QueryFilter(uri_prefix="gs://site1/"),
               QueryFilter.parse("meta:src=s0|s2"), None, QueryFilter(labels=("ant",))]
    crowding = [None, Crowding(1, "uri"), Crowding(2, "meta:src")][seed % 3]
    k = int(rng.integers(2, 12))
    shards = [LoadedShard.load(root, info, forgotten=load_forgotten(root, m), with_uris=True,
                               class_names=m.class_names, metadata=read_metadata(root, m))
              for info in searchable_shards(m)]
    partials = [s.search(q, k, filters=filters, crowding=crowding) for s in shards]
    c = None if crowding is None else crowding.max_per_group
    flat = merge_partials(partials, k, max_per_group=c)
    # A different merge grouping (what a CombineFn may do) gives the same lists.
    tree = merge_partials([merge_partials(partials[:2], k, max_per_group=c),
                           merge_partials(partials[2:], k, max_per_group=c)], k, max_per_group=c)
    want = mem.search(q, k, filters=filters, crowding=crowding)
    np.testing.assert_array_equal(flat.ids, want.ids)
    np.testing.assert_array_equal(tree.ids, want.ids)
    np.testing.assert_array_equal(flat.distances, want.distances)
    uri_of = dict(zip(ids, uris))
    assert all(u == (uri_of[i] if i else "") for i, u in zip(flat.ids.ravel(), flat.uris.ravel()))
