"""The query-and-vote job end to end (tiny real SavedModel encoder), and its stages in isolation."""

from __future__ import annotations

import glob
import json
import os
import shutil

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from evaluation.neighbors_io import parse_record, read_neighbor_files
from evaluation.vote_report import write_evaluation_report
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig
from memory.store.versions import read_manifest
from memory.search.shard_search import LoadedShard, merge_partials
from memory.visual_memory import VisualMemory
from memory.decide.voting import VotingRule, predict_all_k
from pipelines import build, evaluate
from vmem import main as cli
from pipelines.records import EmbeddedImage
from pipelines.stages.search_shards import SearchShardFn


def unit_rows(rng, n, d):
    """float32 [n, d] random unit-length rows."""
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def synthetic_memory(tmp_path_factory):
    rng = np.random.default_rng(0)
    emb = unit_rows(rng, 300, 16)
    root = str(tmp_path_factory.mktemp("synthetic") / "mem")
    ids = [f"e{i:04d}" for i in range(300)]
    labels = [f"c{i % 7}" for i in range(300)]
    build_memory_local(root, ids=ids, labels=labels, uris=[f"/img/{i}" for i in ids], embeddings=emb,
                       num_shards=4, index_config=IndexConfig(),
                       encoder_identity={"name": "synthetic", "content_hash": "sha256:0", "dim": 16,
                                         "preprocess": {}})
    return root, emb


@pytest.mark.parametrize("join", ["shuffle", "broadcast"])
def test_search_memory_equals_visual_memory_search(synthetic_memory, join):
    root, emb = synthetic_memory
    manifest = read_manifest(root)
    rng = np.random.default_rng(1)
    q = unit_rows(rng, 37, 16)
    queries = [EmbeddedImage(f"q{i}", f"/q/{i}", "c1", q[i]) for i in range(37)]
    expected = VisualMemory.open(root).search(q, 12)

    with TestPipeline(runner="FnApiRunner") as p:
        merged = p | beam.Create(queries) | evaluate.SearchMemory(root, manifest, k=12, join=join, batch_size=8)
        got = merged | beam.MapTuple(lambda qid, n: (qid, tuple(n.neighbors.ids[0]),
                                                     tuple(np.round(n.neighbors.distances[0], 5))))
        assert_that(got, equal_to([(f"q{i}", tuple(expected.ids[i]), tuple(np.round(expected.distances[i], 5)))
                                   for i in range(37)]))


@pytest.mark.parametrize("join", ["shuffle", "broadcast"])
@pytest.mark.parametrize("probes,ratio", [(None, None), (1, None), (None, 1.2)])
def test_routed_fan_out_equals_visual_memory_search_and_skips_shards(tmp_path, probes, ratio, join):
    from memory.search.routing import RouterConfig
    rng = np.random.default_rng(3)
    centres = unit_rows(rng, 6, 16)
    emb = centres[rng.integers(0, 6, 400)] + 0.05 * rng.normal(size=(400, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    root = str(tmp_path / "routed")
    ids = [f"e{i:04d}" for i in range(400)]
    build_memory_local(root, ids=ids, labels=[f"c{i % 5}" for i in range(400)], uris=[f"/img/{i}" for i in ids],
                       embeddings=emb, num_shards=4, index_config=IndexConfig(), sharding="partition",
                       router_config=RouterConfig(num_centroids=12, probes=3),
                       encoder_identity={"name": "synthetic", "content_hash": "sha256:0", "dim": 16,
                                         "preprocess": {}})
    manifest = read_manifest(root)
    q = emb[rng.choice(400, 30, replace=False)] + 0.05 * rng.normal(size=(30, 16)).astype(np.float32)
    memory = VisualMemory.open(root)
    if probes is not None or ratio is not None:
        memory = memory.with_search_params(route_probes=probes, route_ratio=ratio)
    expected = memory.search(q, 12)
    # Routing skips some shard searches.
    assert memory.router.route(q, memory.route_probes, ratio=memory.route_ratio).sum() < 30 * 4
    queries = [EmbeddedImage(f"q{i:02d}", f"/q/{i}", "c1", q[i]) for i in range(30)]

    with TestPipeline(runner="FnApiRunner") as p:
        merged = p | beam.Create(queries) | evaluate.SearchMemory(root, manifest, k=12, join=join, batch_size=8,
                                                                  route_probes=probes, route_ratio=ratio)
        got = merged | beam.MapTuple(lambda qid, n: (qid, n.neighbors.ids[0].tolist(), n.neighbors.distances[0]))

        def matches(actual):
            # Same neighbours in the same order; distances equal up to float32 rounding of the batch matmul.
            assert sorted(qid for qid, _, _ in actual) == [f"q{i:02d}" for i in range(30)]
            for qid, found, dist in actual:
                i = int(qid[1:])
                assert found == expected.ids[i].tolist(), qid
                np.testing.assert_allclose(dist, expected.distances[i], atol=1e-5)

        assert_that(got, matches)


@pytest.mark.parametrize("join", ["shuffle", "broadcast"])
@pytest.mark.parametrize("crowding", [None, "2:uri"])
def test_classify_equals_the_job_on_a_living_template_memory(tmp_path, crowding, join):
    """VisualMemory.classify and the evaluate job vote over the same neighbours (one shard searcher, one merge):
    tree+AH shards searched as one template index, forgotten rows, a delta shard and soft-pruning weights."""
    from memory.decide import pruning
    from memory.index.shard_index import IndexKind
    from memory.search.filters import Crowding
    from memory.decide.voting import vote
    from memory.store import mutations
    rng = np.random.default_rng(11)
    centres = unit_rows(rng, 8, 16)
    emb = centres[rng.integers(0, 8, 600)] + 0.2 * rng.normal(size=(600, 16)).astype(np.float32)
    ids = [f"e{i:04d}" for i in range(600)]
    uris = [f"/img/g{i % 40}/{i}" for i in range(600)]
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=ids[:500], labels=[f"c{i % 5}" for i in range(500)], uris=uris[:500],
                       embeddings=emb[:500], num_shards=3,
                       index_config=IndexConfig(kind=IndexKind.TREE_AH, num_leaves=8, num_leaves_to_search=3),
                       encoder_identity={"name": "synthetic", "content_hash": "sha256:0", "dim": 16,
                                         "preprocess": {}})
    mutations.forget(root, ids=ids[:500:7])
    mutations.add_entries_local(root, ids=ids[500:], labels=[f"c{i % 5}" for i in range(500, 600)],
                                uris=uris[500:], embeddings=emb[500:])
    weighted = [i for n, i in enumerate(ids[:550]) if n >= 100 and (n % 7 or n >= 500)]  # Live ones only.
    mutations.publish_entry_weights(root, ids=weighted, weights=pruning.soft_weights(rng.integers(0, 9, len(weighted))),
                                    params={"rule": pruning.SOFT_RULE})
    memory = VisualMemory.open(root)
    assert len(memory.searched_as[0]) == 3  # The three tree+AH shards are one search unit; the delta another.
    manifest = read_manifest(root)
    crowd = None if crowding is None else Crowding.parse(crowding)
    q = unit_rows(rng, 40, 16)
    queries = [EmbeddedImage(f"q{i:02d}", f"/q/{i}", "c1", q[i]) for i in range(40)]
    want = memory.search(q, 10, crowding=crowd)
    predictions = memory.classify(q, rule=VotingRule.RANK, k=10, crowding=crowd)

    with TestPipeline(runner="FnApiRunner") as p:
        merged = p | beam.Create(queries) | evaluate.SearchMemory(root, manifest, k=10, join=join, batch_size=8,
                                                                  crowding=crowd, search_threads=2)
        got = merged | beam.MapTuple(lambda qid, n: (qid, n.neighbors))

        def matches(actual):
            # Same neighbours in the same order; distances equal up to float32 rounding of the batch matmul.
            assert sorted(qid for qid, _ in actual) == [f"q{i:02d}" for i in range(40)]
            for qid, neighbors in actual:
                i = int(qid[1:])
                np.testing.assert_array_equal(neighbors.ids[0], want.ids[i])
                np.testing.assert_allclose(neighbors.distances[0], want.distances[i], atol=1e-5)
                np.testing.assert_array_equal(neighbors.weights[0], want.weights[i])
                voted = vote(neighbors.labels, neighbors.distances, rule=VotingRule.RANK, k=10,
                             entry_weights=neighbors.weights).labels[0]
                assert voted == predictions[i].label, qid

        assert_that(got, matches)
    assert (want.weights < 1).any() and not np.isin(want.ids, ids[:500:7]).any()


def test_merge_partials_is_exact_and_order_independent(synthetic_memory):
    root, _ = synthetic_memory
    manifest = read_manifest(root)
    shards = [LoadedShard.load(root, info) for info in manifest.shards]
    q = unit_rows(np.random.default_rng(2), 5, 16)
    partials = [s.search(q, 10) for s in shards]
    a = merge_partials(partials, 10)
    b = merge_partials(partials[::-1], 10)
    c = merge_partials([merge_partials(partials[:2], 10), merge_partials(partials[2:], 10)], 10)
    ref = VisualMemory.open(root).search(q, 10)
    for m in (a, b, c):
        np.testing.assert_array_equal(m.ids, ref.ids)
        np.testing.assert_array_equal(m.labels, ref.labels)


@pytest.mark.parametrize("weighted", [False, True])
def test_votes_counted_in_chunks_equal_one_vote_over_all_queries(synthetic_memory, weighted):
    """The neighbour lists the job writes, voted a chunk at a time and summed == one vote over every list."""
    from evaluation.metrics import accuracy_table
    from evaluation.vote_report import count_votes
    from memory.search.shard_search import PartialTopK
    from memory.decide.voting import VotingParams
    root, _ = synthetic_memory
    class_names = read_manifest(root).class_names
    rng = np.random.default_rng(3)
    n, k = 45, 9
    labels = rng.integers(0, len(class_names), size=(n, k)).astype(np.int32)
    dists = np.sort(rng.random((n, k)).astype(np.float32), axis=1)
    weights = rng.random((n, k)).astype(np.float32) if weighted else None
    true_names = [class_names[i % len(class_names)] for i in range(n - 2)] + ["not-a-class"] * 2
    merged = [(f"q{i:03d}", evaluate.QueryNeighbors(true_names[i], f"/q/{i}", PartialTopK(
        np.array([[f"e{j}" for j in range(k)]]), labels[i:i + 1], dists[i:i + 1],
        None if weights is None else weights[i:i + 1]))) for i in range(n)]
    true = np.array([class_names.index(t) if t in class_names else -1 for t in true_names])
    expected = accuracy_table(predict_all_k(labels, dists, entry_weights=weights), true)
    class_index = {c: i for i, c in enumerate(class_names)}
    # Through JSON, as the job writes them and the report reads them back.
    records = [parse_record(json.loads(json.dumps(evaluate.to_record(qid, q, class_index).to_json())), where=qid)
               for qid, q in merged]
    votes = count_votes(records, k_max=k, params=VotingParams(), unpruned=True, chunk_records=8)
    assert (votes.counts.queries, votes.counts.table(), votes.unpruned is not None) == (n, expected, weighted)
    if weighted:
        assert votes.unpruned.table() == accuracy_table(predict_all_k(labels, dists), true)

    with TestPipeline(runner="FnApiRunner") as p:
        unknown = p | beam.Create(merged) | evaluate.UnknownLabels(class_names)
        assert_that(unknown, equal_to(["not-a-class"]))


@pytest.mark.parametrize("weighted", [False, True])
def test_written_records_give_the_padded_arrays_the_vote_reads(weighted):
    """A merged list's real neighbours come first in the arrays, padded with label -1, distance inf, weight 0."""
    from evaluation.neighbors_io import to_arrays
    from memory.search.shard_search import PartialTopK
    rng = np.random.default_rng(4)
    class_index = {"a": 0, "b": 1, "c": 2}
    batch = []
    for i in range(6):
        real = [9, 4, 0, 7, 1, 9][i]  # Real neighbours before the padding; 9 > k_max is cut.
        dist = np.sort(rng.random(9).astype(np.float32))
        dist[real:] = np.inf
        labels = np.where(np.arange(9) < real, rng.integers(0, 3, 9), -1).astype(np.int32)
        ids = np.array([f"e{j}" if j < real else "" for j in range(9)])
        weights = np.where(np.arange(9) < real, rng.random(9), 1.0).astype(np.float32)[None] if weighted else None
        batch.append((f"q{i}", evaluate.QueryNeighbors(["a", "b", "zz"][i % 3], "", PartialTopK(
            ids[None], labels[None], dist[None], weights))))
    k_max = 8
    want_labels = np.full((6, k_max), -1, np.int64)
    want_dist = np.full((6, k_max), np.inf)
    want_weights = np.zeros((6, k_max)) if weighted else None
    for i, (_, q) in enumerate(batch):
        keep = np.flatnonzero(q.neighbors.labels[0] >= 0)[:k_max]
        want_labels[i, :keep.size] = q.neighbors.labels[0][keep]
        want_dist[i, :keep.size] = q.neighbors.distances[0][keep]
        if weighted:
            want_weights[i, :keep.size] = q.neighbors.weights[0][keep]
    want_true = np.array([class_index.get(q.label, -1) for _, q in batch])
    got = to_arrays([evaluate.to_record(qid, q, class_index) for qid, q in batch], k_max)
    for g, w in zip(got, (want_labels, want_dist, want_true, want_weights)):
        if w is None:
            assert g is None
        else:
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


def test_evaluate_writes_neighbours_and_report(tiny_memory, fmnist_small, tmp_path, capsys):
    out = str(tmp_path / "eval")
    rc = cli.main(["evaluate", "--memory", tiny_memory, "--images", os.path.join(fmnist_small, "test"),
                   "--output", out, "--k-max", "20", "--pixel-baseline", "10"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["queries"] == 50 and report["failed"] == 0
    assert set(report["accuracy"]) == {"plurality", "distance", "softmax", "rank"}
    assert set(report["accuracy"]["rank"]) == {str(k) for k in range(1, 21)}
    for rule, best in report["best"].items():
        assert best["accuracy"] == max(report["accuracy"][rule].values())
    assert os.path.getsize(os.path.join(out, "accuracy_vs_k.png")) > 1000
    assert "pixel 1-NN" in report["baselines"]

    # The neighbour lists are the memory's exact answers, and re-voting them gives the same table.
    records = read_neighbor_files(sorted(glob.glob(os.path.join(out, "neighbors-*.jsonl"))))
    assert len(records) == 50
    memory = VisualMemory.open(tiny_memory)
    assert {r.query_id for r in records} == {os.path.relpath(p, os.path.join(fmnist_small, "test"))
                                             for p in glob.glob(os.path.join(fmnist_small, "test", "*", "*.png"))}
    for r in records:
        assert r.true_label == memory.class_names.index(r.query_id.split("/")[0])
        assert len(r.neighbor_ids) == 20
        assert r.neighbor_distances == sorted(r.neighbor_distances)
    labels = np.array([r.neighbor_labels for r in records])
    dists = np.array([r.neighbor_distances for r in records])
    true = np.array([r.true_label for r in records])
    preds = predict_all_k(labels, dists, rules=[VotingRule.RANK], k_max=20)[VotingRule.RANK]
    assert report["accuracy"]["rank"]["10"] == pytest.approx(float(np.mean(preds[:, 9] == true)))
    printed = capsys.readouterr().out
    assert "rank" in printed and "50 queries" in printed

    revote = str(tmp_path / "revote")
    assert cli.main(["vote", "--neighbors", *glob.glob(os.path.join(out, "neighbors-*.jsonl")),
                     "--output", revote, "--k-max", "20"]) == 0
    assert json.load(open(os.path.join(revote, "report.json")))["accuracy"] == report["accuracy"]


def test_evaluate_a_partition_routed_memory_end_to_end(fmnist_small, tiny_encoder_config_file, tiny_memory,
                                                       tmp_path, capsys):
    routed = str(tmp_path / "routed")
    build.run(["--images", os.path.join(fmnist_small, "train"), "--output", routed,
               "--config", tiny_encoder_config_file, "--sharding", "partition"])
    out = str(tmp_path / "eval")
    assert cli.main(["evaluate", "--memory", routed, "--images", os.path.join(fmnist_small, "test"),
                     "--output", out, "--k-max", "10", "--route-probes", "1", "--search-join", "shuffle"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["queries"] == 50 and report["failed"] == 0 and report["extra"]["route_probes"] == 1
    assert report["extra"]["search_join"] == "shuffle"
    # Every query's neighbour list equals VisualMemory.search with the same routing.
    records = sorted(read_neighbor_files(sorted(glob.glob(os.path.join(out, "neighbors-*.jsonl")))),
                     key=lambda r: r.query_id)
    memory = VisualMemory.open(routed).with_search_params(route_probes=1)
    expected = memory.search(memory.embed_images([os.path.join(fmnist_small, "test", r.query_id) for r in records]),
                             10)
    assert [list(r.neighbor_ids) for r in records] == expected.ids.tolist()
    assert cli.main(["evaluate", "--memory", routed, "--images", os.path.join(fmnist_small, "test"),
                     "--output", str(tmp_path / "both"), "--route-probes", "1", "--route-ratio", "1.2"]) != 0
    assert "two routing rules" in capsys.readouterr().err
    # --route-probes on a hash-sharded memory is a usage error naming the fix.
    assert cli.main(["evaluate", "--memory", tiny_memory, "--images", os.path.join(fmnist_small, "test"),
                     "--output", str(tmp_path / "bad"), "--route-probes", "2"]) != 0
    assert "hash-sharded" in capsys.readouterr().err


def test_evaluate_refuses_a_different_encoder(tiny_memory, fmnist_small, tmp_path, capsys):
    rc = cli.main(["evaluate", "--memory", tiny_memory, "--images", os.path.join(fmnist_small, "test"),
                   "--output", str(tmp_path / "e"), "--config", "configs.default"])
    assert rc == 1  # The memory cannot answer queries of another encoder: a runtime failure.
    err = capsys.readouterr().err
    assert "memory's encoder" in err and "efficientnet-lite0" in err


def test_evaluate_detects_changed_encoder_files(fmnist_small, tiny_encoder_dir, tmp_path):
    """Same spec, different weights (content hash): the job must refuse, not report nonsense."""
    from tests.conftest import save_tiny_encoder, resaved_encoder_config
    config, enc = resaved_encoder_config(tmp_path, tiny_encoder_dir, num_shards=2)
    mem = str(tmp_path / "mem")
    build.run(["--images", os.path.join(fmnist_small, "test"), "--output", mem, "--config", config])
    shutil.rmtree(enc)
    save_tiny_encoder(enc)  # Re-saved: different bytes, so a different content hash.
    with pytest.raises(Exception, match="meaningless"):
        evaluate.run(["--memory", mem, "--images", os.path.join(fmnist_small, "test"),
                      "--output", str(tmp_path / "e")])


def test_check_query_counts_refuses_lost_queries():
    evaluate.check_query_counts(read=10, queries=7, failed=3, dead_letter_dir="/out/dead_letter")
    with pytest.raises(evaluate.EvaluationError, match=r"read 10 record\(s\) but answered 6 queries \+ 3 failed"):
        evaluate.check_query_counts(read=10, queries=6, failed=3, dead_letter_dir="/out/dead_letter")


def test_evaluate_refuses_to_report_when_queries_merge(tiny_memory, fmnist_small, tmp_path):
    """Two images under one id become one query: read (6) != answered (5) + failed (0), so no report."""
    test_dir = os.path.join(fmnist_small, "test")
    paths = sorted(glob.glob(os.path.join(test_dir, "*", "*.png")))[:6]
    rows = [f"{p},{os.path.basename(os.path.dirname(p))},q{i}" for i, p in enumerate(paths)]
    rows[5] = rows[5].rsplit(",", 1)[0] + ",q0"  # The same id as the first row.
    manifest = tmp_path / "queries.csv"
    manifest.write_text("uri,label,id\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "eval")
    with pytest.raises(Exception, match=r"bookkeeping mismatch: read 6 record\(s\) but answered 5 queries \+ 0 "
                                        r"failed"):
        evaluate.run(["--memory", tiny_memory, "--images", f"manifest:{manifest}", "--output", out, "--k-max", "5"])
    assert not os.path.exists(os.path.join(out, "report.json"))


def test_search_shard_fn_loads_a_shard_for_its_key_and_keeps_none_after(synthetic_memory, monkeypatch):
    """Grouped by shard, each shard arrives once: load it for that key, then let it go (no keep-alive)."""
    import gc
    import weakref
    root, _ = synthetic_memory
    manifest = read_manifest(root)
    loads = []
    real_load = LoadedShard.load

    def spy(*args, **kwargs):
        shard = real_load(*args, **kwargs)
        loads.append(weakref.ref(shard))
        return shard

    monkeypatch.setattr(LoadedShard, "load", spy)
    q = unit_rows(np.random.default_rng(3), 6, 16)
    batches = [evaluate.QueryBatch(tuple(f"q{i}" for i in rows), ("c1",) * len(rows), ("/q",) * len(rows), q[rows])
               for rows in ([0, 1, 2], [3, 4, 5])]
    fn = SearchShardFn(root, manifest, 5)
    fn.setup()
    keyed = [(b.ids[0], b) for b in batches]
    first = list(fn.process((0, keyed)))
    second = list(fn.process((1, keyed[:1])))
    assert [key for key, _ in first] == ["q0", "q3"] and [key for key, _ in second] == ["q0"]
    assert [qid for _, b in first for qid in b.ids] == [f"q{i}" for i in range(6)] and len(second[0][1].ids) == 3
    assert len(loads) == 2  # One load per shard key, whatever the number of batches.
    expected = real_load(root, manifest.shards[0]).search(q, 5)
    np.testing.assert_array_equal(np.concatenate([b.neighbors.ids for _, b in first]), expected.ids)
    del first, second
    gc.collect()
    assert [ref() for ref in loads] == [None, None]  # No shard outlives its key on the worker.


def test_evaluate_precomputed_query_embeddings(tmp_path):
    """A memory built from embeddings is evaluated with query embeddings of the same encoder; images are refused."""
    from tests.pipelines.test_build import clip_folder
    keys, labels, emb = clip_folder(str(tmp_path / "mem-emb"), [200, 100], dim=16, seed=3)
    qkeys, qlabels, qemb = clip_folder(str(tmp_path / "q-emb"), [40], dim=16, seed=4)
    mem = str(tmp_path / "mem")
    build.run([f"--embeddings=clip:{tmp_path / 'mem-emb'},label_column=label", "--encoder-id=enc-16",
               f"--output={mem}", "--runner=FnApiRunner"])
    out = str(tmp_path / "eval")
    evaluate.run([f"--memory={mem}", f"--embeddings=clip:{tmp_path / 'q-emb'},label_column=label",
                  "--encoder-id=enc-16", f"--output={out}", "--k-max=5", "--runner=FnApiRunner"])
    assert write_evaluation_report(out) == json.load(open(os.path.join(out, "report.json")))
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["queries"] == 40 and report["failed"] == 0
    # The neighbours equal an in-process search of the same memory with the same query vectors.
    records = {r.query_id: r for r in read_neighbor_files(glob.glob(os.path.join(out, "*neighbors*.jsonl")))}
    expected = VisualMemory.open(mem).search(qemb, 5)
    for i, key in enumerate(qkeys):
        assert list(records[key].neighbor_ids) == expected.ids[i].tolist()
    with pytest.raises(evaluate.EvaluationError, match="--encoder-id 'other'.*'enc-16'"):
        evaluate.run([f"--memory={mem}", f"--embeddings=clip:{tmp_path / 'q-emb'},label_column=label",
                      "--encoder-id=other", f"--output={tmp_path / 'e2'}", "--runner=FnApiRunner"])
    with pytest.raises(evaluate.EvaluationError, match="precomputed embeddings of encoder 'enc-16'"):
        evaluate.run([f"--memory={mem}", f"--images={tmp_path}", f"--output={tmp_path / 'e3'}",
                      "--runner=FnApiRunner"])


def test_evaluate_caps_k_max_at_the_live_entries(tmp_path, caplog):
    """--k-max 1e9 on a 10-entry memory (one forgotten: 9 live) retrieves and votes k = 1..9, with a warning."""
    from memory.store.mutations import forget
    from tests.pipelines.test_build import clip_folder
    keys, _, _ = clip_folder(str(tmp_path / "mem-emb"), [6, 4], dim=16, seed=5)
    clip_folder(str(tmp_path / "q-emb"), [7], dim=16, seed=6)
    mem = str(tmp_path / "mem")
    build.run([f"--embeddings=clip:{tmp_path / 'mem-emb'},label_column=label", "--encoder-id=enc-16",
               f"--output={mem}", "--runner=FnApiRunner"])
    forget(mem, ids=[keys[0]])
    out = str(tmp_path / "eval")
    with caplog.at_level("WARNING", logger="visual_memory"):
        evaluate.run([f"--memory={mem}", f"--embeddings=clip:{tmp_path / 'q-emb'},label_column=label",
                      "--encoder-id=enc-16", f"--output={out}", "--k-max=1000000000", "--runner=FnApiRunner"])
    assert f"--k-max 1000000000 exceeds the 9 live entries of memory {mem} (version 2); retrieving and voting " \
           "k = 1..9" in caplog.text
    report = write_evaluation_report(out)
    assert report["k_max"] == 9 and report["extra"]["k_max"] == 9 and report["queries"] == 7
    assert report["extra"]["search_join"] == "broadcast"  # auto: 10 entries of dim 16 fit every worker.
    records = read_neighbor_files(glob.glob(os.path.join(out, "*neighbors*.jsonl")))
    assert {len(r.neighbor_ids) for r in records} == {9} and all(keys[0] not in r.neighbor_ids for r in records)


@pytest.mark.parametrize("swept", [True, False])
def test_an_evaluation_whose_version_is_purged_while_it_runs_runs_again_on_the_latest(tmp_path, monkeypatch,
                                                                                      swept):
    """`vmem forget --purge-history` during an unpinned evaluation. The purge leaves version 2's tombstone file
    (the latest lists its ids too) for the leftover sweep: the evaluation finishes on version 2. Once the sweep
    has removed it (``swept``), the evaluation runs again on the new latest version. A pinned version that was
    purged fails."""
    from memory.store import mutations
    from memory.store.purge import purge_history, remove_leftovers
    from tests.pipelines.test_build import clip_folder
    keys, _, _ = clip_folder(str(tmp_path / "mem-emb"), [120], dim=16, seed=3)
    qkeys, _, qemb = clip_folder(str(tmp_path / "q-emb"), [20], dim=16, seed=4)
    mem = str(tmp_path / "mem")
    build.run([f"--embeddings=clip:{tmp_path / 'mem-emb'},label_column=label", "--encoder-id=enc-16",
               f"--output={mem}", "--runner=FnApiRunner"])
    mutations.forget(mem, ids=keys[:2].tolist())  # Version 2: the one the evaluation starts on.
    expected_v2 = VisualMemory.open(mem).search(qemb, 5)
    real = evaluate.evaluate_pipeline
    runs = []

    def graph_then_purge(p, **kwargs):  # The purge lands after launch, before the workers read version 2.
        runs.append(kwargs["manifest"].version)
        real(p, **kwargs)
        if len(runs) == 1:
            mutations.forget(mem, ids=keys[2:4].tolist())
            assert purge_history(mem) == [1, 2]
            if swept:
                assert len(remove_leftovers(mem, grace_s=0)) == 1

    monkeypatch.setattr(evaluate, "evaluate_pipeline", graph_then_purge)
    out = str(tmp_path / "eval")
    args = [f"--memory={mem}", f"--embeddings=clip:{tmp_path / 'q-emb'},label_column=label", "--encoder-id=enc-16",
            f"--output={out}", "--k-max=5", "--runner=FnApiRunner"]
    evaluate.run(args)
    assert runs == ([2, 4] if swept else [2])
    assert json.load(open(os.path.join(out, "evaluation-summary.json")))["memory_version"] == runs[-1]
    records = {r.query_id: r for r in read_neighbor_files(glob.glob(os.path.join(out, "*neighbors*.jsonl")))}
    expected = VisualMemory.open(mem).search(qemb, 5) if swept else expected_v2
    for i, key in enumerate(qkeys):
        assert list(records[key].neighbor_ids) == expected.ids[i].tolist()
    with pytest.raises(Exception, match="no version 2"):
        evaluate.run(args + ["--version=2"])


def test_a_pinned_evaluation_whose_version_is_purged_while_it_runs_is_a_clear_error(tmp_path, monkeypatch):
    """A re-index's purge deletes the shards of the pinned version after launch: VersionPurgedError, one line."""
    from memory.store import mutations
    from memory.store.purge import purge_history
    from memory.store.versions import VersionPurgedError
    from tests.pipelines.test_build import clip_folder
    keys, _, _ = clip_folder(str(tmp_path / "mem-emb"), [120], dim=16, seed=3)
    clip_folder(str(tmp_path / "q-emb"), [20], dim=16, seed=4)
    mem = str(tmp_path / "mem")
    build.run([f"--embeddings=clip:{tmp_path / 'mem-emb'},label_column=label", "--encoder-id=enc-16",
               f"--output={mem}", "--runner=FnApiRunner"])
    mutations.forget(mem, ids=keys[:2].tolist())
    real = evaluate.evaluate_pipeline

    def graph_then_purge(p, **kwargs):  # As a re-index + purge would: version 2 and its shard files go.
        real(p, **kwargs)
        mutations.forget(mem, ids=keys[2:4].tolist())
        assert purge_history(mem) == [1, 2]
        for shard in read_manifest(mem).shards:
            shutil.rmtree(os.path.join(mem, shard.path))

    monkeypatch.setattr(evaluate, "evaluate_pipeline", graph_then_purge)
    with pytest.raises(VersionPurgedError, match=r"^version 2 of .* was purged .*while it was in use, and its files "
                                                 r"were deleted \([^\n]*\); re-open the memory") as e:
        evaluate.run([f"--memory={mem}", f"--embeddings=clip:{tmp_path / 'q-emb'},label_column=label",
                      "--encoder-id=enc-16", f"--output={tmp_path / 'eval'}", "--k-max=5", "--runner=FnApiRunner",
                      "--version=2"])
    assert "\n" not in str(e.value)
