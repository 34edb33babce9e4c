"""The add job end to end (tiny real SavedModel encoder, real Fashion-MNIST PNGs, DirectRunner in-process).

One module-scoped flow: build a memory without three held-out classes, evaluate the old classes, add the
held-out classes (plus a corrupt file and an id the memory already holds), evaluate again, and build a
memory from scratch over the union to compare searches with.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import types

import numpy as np
import pytest

from evaluation.datasets import prepare_fashion_mnist
from evaluation.neighbors_io import read_neighbor_files
from memory.store import mutations
from memory.store.mutations import forget
from memory.store.shard import read_shard_data
from memory.store.versions import ConcurrentUpdateError, latest_version, read_version
from memory.visual_memory import VisualMemory
from evaluation.vote_report import write_evaluation_report
from pipelines import add, build, evaluate
from pipelines.add import delta_shards as add_delta_shards
from pipelines.add import job as add_job
from pipelines.add import known_ids as add_known_ids
from pipelines.add import plan as add_plan
from vmem import add as add_cli
from vmem import main as cli
from pipelines.records import FailedRecord
from tests.conftest import brute_force_topk

HELD_OUT = ("sandal", "bag", "ankle_boot")
PER_CLASS, TEST_PER_CLASS = 30, 15
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10


def _copy_classes(src: str, dst: str, classes) -> None:
    for cls in classes:
        shutil.copytree(os.path.join(src, cls), os.path.join(dst, cls))


def _dead_letters(directory: str) -> dict[str, FailedRecord]:
    out = {}
    for path in glob.glob(os.path.join(directory, "*.jsonl")):
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = FailedRecord.from_json(line)
                    out[record.id] = record
    return out


def _stored(root: str, version: int | None = None):
    """(ids, embeddings, label names) of every live row of a version, sorted by id."""
    m = read_version(root, version or latest_version(root))
    parts = [read_shard_data(os.path.join(root, s.path)) for s in m.all_shards if s.count]
    ids = np.concatenate([p.ids for p in parts]).astype(str)
    emb = np.concatenate([p.embeddings for p in parts])
    names = np.asarray(m.class_names)[np.concatenate([p.labels for p in parts])]
    order = np.argsort(ids)
    return ids[order], emb[order], names[order]


def _evaluate(memory: str, images: str, out: str) -> tuple[dict, dict]:
    evaluate.run(["--memory", memory, "--images", images, "--output", out, "--k-max", "10"])
    write_evaluation_report(out)
    report = json.load(open(os.path.join(out, "report.json")))
    records = read_neighbor_files(sorted(glob.glob(os.path.join(out, "neighbors-*.jsonl"))))
    return report, {r.query_id: r for r in records}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.conftest import require_fashion_mnist
    require_fashion_mnist()
    root = tmp_path_factory.mktemp("add_data")
    fm = str(root / "fm")
    prepare_fashion_mnist(fm, per_class=PER_CLASS, test_per_class=TEST_PER_CLASS)
    classes = sorted(os.listdir(os.path.join(fm, "train")))
    old = [c for c in classes if c not in HELD_OUT]
    d = types.SimpleNamespace(root=root, union=os.path.join(fm, "train"), old_classes=old)
    for split, classes_ in (("train_old", old), ("train_new", HELD_OUT), ("test_old", old), ("test_new", HELD_OUT)):
        _copy_classes(os.path.join(fm, "train" if split.startswith("train") else "test"), str(root / split),
                      classes_)
        setattr(d, split, str(root / split))
    # The add's input also holds a corrupt file and a copy of an image the memory already holds (same id).
    (root / "train_new" / "bag" / "corrupt.png").write_bytes(CORRUPT)
    d.duplicate_id = f"{old[0]}/{sorted(os.listdir(os.path.join(d.train_old, old[0])))[0]}"
    os.makedirs(root / "train_new" / old[0])
    shutil.copy(os.path.join(d.train_old, d.duplicate_id), os.path.join(d.train_new, d.duplicate_id))
    return d


@pytest.fixture(scope="module")
def flow(data, tiny_encoder_config_file, tmp_path_factory):
    """Build (old classes) -> evaluate -> add (held-out classes) -> evaluate; plus a from-scratch union build."""
    out = tmp_path_factory.mktemp("add_flow")
    f = types.SimpleNamespace(memory=str(out / "mem"), union=str(out / "union"))
    build.run(["--images", data.train_old, "--output", f.memory, "--config", tiny_encoder_config_file])
    build.run(["--images", data.union, "--output", f.union, "--config", tiny_encoder_config_file])
    f.v1 = read_version(f.memory, 1)
    rng = np.random.default_rng(0)
    _, union_emb, _ = _stored(f.union)
    q = union_emb[rng.choice(len(union_emb), 40, replace=False)] + rng.normal(0, 0.05, (40, 48)).astype(np.float32)
    f.queries = np.concatenate([union_emb[:20], q / np.linalg.norm(q, axis=1, keepdims=True)])
    f.v1_search = VisualMemory.open(f.memory).search(f.queries, 10)
    f.before, f.before_nn = _evaluate(f.memory, data.test_old, str(out / "eval_before"))
    # A 25-entry target: several delta shards even at this size.
    f.result, f.plan = add.launch(["--memory", f.memory, "--images", data.train_new, "--delta-shard-size", "25"])
    f.v2 = read_version(f.memory, 2)
    f.after, f.after_nn = _evaluate(f.memory, data.test_old, str(out / "eval_after"))
    f.new, _ = _evaluate(f.memory, data.test_new, str(out / "eval_new"))
    return f


def test_add_publishes_a_new_version_with_delta_shards(data, flow):
    v1, v2 = flow.v1, flow.v2
    assert latest_version(flow.memory) == 2 and v2.parent == 1 and v2.change["kind"] == "add"
    assert v2.shards == v1.shards  # Main shards untouched: nothing is re-indexed.
    n_new = len(HELD_OUT) * PER_CLASS
    assert len(v2.delta_shards) == 4  # ceil(90 / 25)
    assert all(s.path.startswith(f"deltas/{flow.plan.version_tag}/") and s.index_kind == "brute_force"
               for s in v2.delta_shards)
    assert sum(s.count for s in v2.delta_shards) == n_new == v2.change["added"]
    assert v2.total == v1.total + n_new
    # Append-only class names: old indices keep their meaning, new classes follow, sorted.
    assert v2.class_names == v1.class_names + tuple(sorted(HELD_OUT))
    assert v2.change["new_classes"] == sorted(HELD_OUT)
    assert v2.change["counts"] == {"read": n_new + 2, "added": n_new, "failed": 2}
    ids, _, names = _stored(flow.memory)
    for entry_id, name in zip(ids, names):
        assert entry_id.split("/")[0] == name


def test_corrupt_file_and_duplicate_id_reach_the_dead_letters(data, flow):
    directory = os.path.join(flow.memory, "dead_letter", "add-v000002")
    assert flow.plan.dead_letter_dir == directory
    failures = _dead_letters(directory)
    assert set(failures) == {"bag/corrupt.png", data.duplicate_id}
    assert failures["bag/corrupt.png"].stage == "decode"
    assert failures[data.duplicate_id].reason == "duplicate_id"
    assert "already live in version 1" in failures[data.duplicate_id].detail
    # The duplicate was rejected, not added twice: the memory holds the id once, from the build.
    ids, _, _ = _stored(flow.memory)
    assert int(np.sum(ids == data.duplicate_id)) == 1


def test_search_after_add_equals_a_memory_built_from_scratch_over_the_union(flow):
    added, scratch = VisualMemory.open(flow.memory), VisualMemory.open(flow.union)
    assert len(added) == len(scratch) == len(_stored(flow.union)[0])
    got, want = added.search(flow.queries, 10), scratch.search(flow.queries, 10)
    np.testing.assert_array_equal(got.ids, want.ids)
    # Same pairs, but ScaNN may pick a different dot-product kernel for a differently sized shard: last-bit
    # float differences (seen: 6e-8) are not a different answer.
    np.testing.assert_allclose(got.distances, want.distances, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(added.label_names(got.labels), scratch.label_names(want.labels))
    # And both equal brute force over the stored embeddings (ties by id: rows are sorted by id).
    ids, emb, _ = _stored(flow.memory)
    u_ids, u_emb, _ = _stored(flow.union)
    np.testing.assert_array_equal(ids, u_ids)
    np.testing.assert_array_equal(emb, u_emb)
    true_idx, true_d = brute_force_topk(emb, flow.queries, 10)
    np.testing.assert_allclose(got.distances, true_d, atol=1e-5)
    recall = np.mean([len(set(got.ids[i]) & set(ids[true_idx[i]])) / 10 for i in range(len(flow.queries))])
    assert recall == 1.0


def test_pinned_old_version_is_unchanged_and_history_shows_the_add(flow, capsys):
    v1 = VisualMemory.open(flow.memory, version=1)
    assert v1.class_names == flow.v1.class_names and len(v1) == flow.v1.total
    res = v1.search(flow.queries, 10)
    np.testing.assert_array_equal(res.ids, flow.v1_search.ids)
    np.testing.assert_array_equal(res.distances, flow.v1_search.distances)
    assert cli.main(["history", flow.memory]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].split()[:3] == ["2", "1", "add"]
    assert "added 90 entries in 4 delta shard(s)" in rows[2] and "sandal" in rows[2]


def test_adding_classes_changes_only_old_queries_that_now_meet_new_entries(data, flow):
    """What adding classes does to old-class queries, exactly; and that the new classes are recognised.

    Measured with this tiny 4x4-pooled encoder (105 old-class and 45 new-class test queries, k <= 10): 23 of
    105 old queries get a new-class entry among their 10 neighbours; old-class rank@10 60.95 -> 58.10,
    1-NN 62.86 -> 58.10; new classes rank@10 75.56, 1-NN 77.78 (chance 10). A weak encoder confuses sandals
    and ankle boots with sneakers, so the old-class bar of +-0.5 point is *not* met here; the bundled encoder's
    figures are in docs/adding_classes.md.
    """
    assert flow.before["queries"] == flow.after["queries"] == len(data.old_classes) * TEST_PER_CLASS
    n_old = len(flow.v1.class_names)
    untouched = []
    for qid, rec in flow.after_nn.items():
        old_part = [i for i, lab in zip(rec.neighbor_ids, rec.neighbor_labels) if lab < n_old]
        # Exactness: the neighbours after the add are those before with new-class entries inserted.
        assert old_part == flow.before_nn[qid].neighbor_ids[:len(old_part)], qid
        if len(old_part) == len(rec.neighbor_ids):
            untouched.append(qid)
            assert rec.neighbor_ids == flow.before_nn[qid].neighbor_ids
            # Query embeddings may differ in the last float bits between runs (other batch shapes).
            np.testing.assert_allclose(rec.neighbor_distances, flow.before_nn[qid].neighbor_distances, atol=1e-5)
    # Queries that met no new entry keep their neighbour lists, hence their votes at every k and rule; so the
    # old-class accuracy can only move by the share of queries that did meet one.
    touched_share = 1 - len(untouched) / len(flow.after_nn)
    assert 0 < touched_share < 0.35, touched_share
    before, after = flow.before["accuracy"], flow.after["accuracy"]
    for rule in before:
        for k in before[rule]:
            assert abs(after[rule][k] - before[rule][k]) <= touched_share + 1e-9, (rule, k)
    assert abs(after["rank"]["10"] - before["rank"]["10"]) < 0.05
    # New classes, never seen by the build: recognised far above chance (1/10).
    assert flow.new["queries"] == len(HELD_OUT) * TEST_PER_CLASS
    assert flow.new["accuracy"]["rank"]["10"] > 0.5 and flow.new["accuracy"]["plurality"]["1"] > 0.5


def test_evaluate_and_visual_memory_search_the_delta_shards_exactly(data, flow):
    """vmem evaluate's neighbour lists for new-class queries are VisualMemory.search's, id for id."""
    memory = VisualMemory.open(flow.memory)
    out = os.path.join(os.path.dirname(flow.memory), "eval_new")
    records = sorted(read_neighbor_files(sorted(glob.glob(os.path.join(out, "neighbors-*.jsonl")))),
                     key=lambda r: r.query_id)
    q = memory.embed_images([os.path.join(data.test_new, r.query_id) for r in records])
    res = memory.search(q, 10)
    np.testing.assert_array_equal(res.ids, np.array([r.neighbor_ids for r in records]))
    np.testing.assert_allclose(res.distances, np.array([r.neighbor_distances for r in records]), atol=1e-6)
    delta_ids = set(_stored(flow.memory)[0]) - set(_stored(flow.memory, 1)[0])
    assert np.mean([i in delta_ids for i in res.ids[:, 0]]) > 0.5  # Mostly answered from the delta shards.


def test_forgotten_ids_are_rejected_until_reindex(data, flow, tiny_encoder_config_file, tmp_path):
    root = str(tmp_path / "mem")
    shutil.copytree(flow.memory, root)
    forgotten_id = sorted(i for i in _stored(root)[0] if i.startswith("bag/"))[0]
    forget(root, ids=[forgotten_id])
    images = tmp_path / "again"
    os.makedirs(images / "bag")
    shutil.copy(os.path.join(data.train_new, forgotten_id), images / forgotten_id)
    shutil.copy(os.path.join(data.test_new, "bag", sorted(os.listdir(os.path.join(data.test_new, "bag")))[0]),
                images / "bag" / "fresh.png")
    _, plan = add.launch(["--memory", root, "--images", str(images)])
    m = read_version(root, 4)
    assert plan.base_version == 3 and m.change["counts"] == {"read": 2, "added": 1, "failed": 1}
    failure = _dead_letters(os.path.join(root, "dead_letter", "add-v000004"))[forgotten_id]
    assert failure.reason == "forgotten_id" and "vmem reindex" in failure.detail
    ids, emb, _ = _stored(root)
    fresh = emb[list(ids).index("bag/fresh.png")][None, :]
    assert VisualMemory.open(root).search(fresh, 1).ids[0, 0] == "bag/fresh.png"


def test_an_add_that_loses_to_a_forget_rebases_and_publishes(data, flow, tmp_path, monkeypatch):
    root = str(tmp_path / "mem")
    shutil.copytree(flow.memory, root)
    victim = sorted(_stored(root)[0])[0]
    forget(root, ids=[victim])  # Version 3, published "while the add was running".
    monkeypatch.setattr(add_plan, "latest_version", lambda r: 2)  # The add was launched at version 2.
    _, plan = add.launch(["--memory", root, "--images", os.path.join(data.test_new)])
    m = read_version(root, 4)
    assert plan.base_version == 2 and latest_version(root) == 4
    assert m.parent == 3 and m.change["kind"] == "add" and m.change["job"] == plan.job_id
    assert m.change["dead_letter"] == "dead_letter/add-v000003"  # Where its dead letters went, before re-basing.
    assert add.published_add(plan) == m
    live = set(mutations.live_ids(root).tolist())
    assert victim not in live  # Not resurrected by the re-based add.
    assert set(_stored(root)[0]) - set(_stored(root, 3)[0]) <= live  # Nothing of the add lost.
    assert len(live) == len(set(_stored(root, 3)[0])) - 1 + m.change["added"]  # Nothing doubled.


def test_an_add_of_the_same_ids_conflicts_in_one_line_and_leaves_nothing(data, flow, tmp_path, monkeypatch,
                                                                          capsys):
    root = str(tmp_path / "mem")
    shutil.copytree(flow.memory, root)
    assert add_cli.main(["--memory", root, "--images", data.test_new]) == 0  # Version 3: the winner.
    winner = read_version(root, 3)
    before = sorted(os.listdir(os.path.join(root, "deltas"))), sorted(os.listdir(os.path.join(root, "dead_letter")))
    capsys.readouterr()
    monkeypatch.setattr(add_plan, "latest_version", lambda r: 2)  # The loser was launched at version 2.
    assert add_cli.main(["--memory", root, "--images", data.test_new]) == 1
    err = capsys.readouterr().err
    line = err.splitlines()[0]
    assert line.startswith("vmem add: error: add of ") and "conflicts with version 3 (add)" in line
    assert "were added by both" in line and "Nothing of this change was published" in line
    assert "Traceback" not in err and len(err.splitlines()) == 2  # The line, then how to get the traceback.
    assert latest_version(root) == 3 and read_version(root, 3) == winner
    # The loser left nothing: no delta shard directory, no dead-letter file beside the winner's.
    after = sorted(os.listdir(os.path.join(root, "deltas"))), sorted(os.listdir(os.path.join(root, "dead_letter")))
    assert after == before
    assert all(winner.change["job"] in f for f in os.listdir(os.path.join(root, "dead_letter", "add-v000003")))


def test_vmem_add_cli_prints_what_was_added(data, flow, tmp_path, capsys):
    root = str(tmp_path / "mem")
    shutil.copytree(flow.memory, root)
    assert add_cli.main(["--memory", root, "--images", data.test_new]) == 0
    out = capsys.readouterr().out
    assert f"added {len(HELD_OUT) * TEST_PER_CLASS} entries to {root} in 1 delta shard(s): version 3 (parent 2)" in out
    assert "new classes  0: (none)" in out and "failed 0" in out and "add-v000003" in out
    # Adding the same images again: every one is a duplicate, nothing is published, exit status 1.
    assert add_cli.main(["--memory", root, "--images", data.test_new]) == 1
    assert "nothing to add" in capsys.readouterr().err and latest_version(root) == 3
    reasons = {f.reason for f in _dead_letters(os.path.join(root, "dead_letter", "add-v000004")).values()}
    assert reasons == {"duplicate_id"}


def test_refuses_a_memory_whose_encoder_files_changed(data, tiny_encoder_dir, tmp_path):
    from tests.conftest import save_tiny_encoder, resaved_encoder_config
    config, enc = resaved_encoder_config(tmp_path, tiny_encoder_dir, num_shards=1)
    mem = str(tmp_path / "mem")
    build.run(["--images", data.test_old, "--output", mem, "--config", config])
    shutil.rmtree(enc)
    save_tiny_encoder(enc)  # Re-saved: different bytes, so a different content hash.
    with pytest.raises(add.AddError, match="meaningless"):
        add.run(["--memory", mem, "--images", data.test_new])
    assert latest_version(mem) == 1 and not os.path.exists(os.path.join(mem, "deltas"))


@pytest.mark.slow
def test_add_classes_example_with_the_bundled_encoder(tmp_path, capsys):
    """The documented example (docs/adding_classes.md) at a small size, with the real bundled encoder."""
    from evaluation.examples import add_classes
    assert add_classes.main(["--per-class", "60", "--test-per-class", "30", "--hold-out", "trouser,bag",
                             "--out", str(tmp_path / "ex")]) == 0
    printed = capsys.readouterr().out
    assert "| old classes | v1 (before add) | 240 |" in printed and "| new classes | v2 (after add) | 60 |" in printed
    summary = json.load(open(tmp_path / "ex" / "summary.json"))
    before, after, new = summary["rows"]
    assert summary["new_classes"] == ["bag", "trouser"] and summary["num_classes"] == 10
    # Only old queries that now meet a new-class entry can change their vote, so the old-class accuracy moves
    # by at most their share; for classes unlike the old ones that share is small (default size: 26 of 800,
    # rank@10 -0.25 points; see docs/adding_classes.md).
    share = summary["old_queries_meeting_new_entries"] / summary["old_queries"]
    assert share < 0.1, share
    assert abs(after["rank10"] - before["rank10"]) <= share + 1e-9
    assert after["rank10"] - before["rank10"] >= -0.0085  # At most 2 of 240 queries.
    # New classes, from 60 images each and no training: far above chance (10%).
    assert new["rank10"] > 0.7 and new["nn1"] > 0.7, new


def test_reject_known_ids_is_a_bucketed_join_no_worker_holds_every_id(tmp_path, monkeypatch):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from memory.build import build_memory_local
    from memory.index.shard_index import IndexConfig
    from pipelines.records import ImageRecord

    rng = np.random.default_rng(5)
    n = 200
    x = rng.normal(size=(n, 8)).astype(np.float32)
    ids = [f"m{i:03d}" for i in range(n)]
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=ids, labels=[f"c{i % 3}" for i in range(n)], uris=[f"/i/{i}" for i in ids],
                       embeddings=x / np.linalg.norm(x, axis=1, keepdims=True), num_shards=3,
                       index_config=IndexConfig(),
                       encoder_identity={"name": "fake", "content_hash": "sha256:0", "dim": 8, "preprocess": {}})
    forget(root, ids=["m007", "m150"])
    version = latest_version(root)
    held = []
    real_process = add_known_ids._RejectInBucketFn.process

    def spy(self, element):
        held.append(sum(len(c) for c in element[1]["stored"]))
        return real_process(self, element)

    monkeypatch.setattr(add_known_ids._RejectInBucketFn, "process", spy)
    new = [ImageRecord(i, f"/new/{i}", "c0", b"") for i in ("m003", "m007", "m150", "m199", "n1", "n2", "n3")]
    with TestPipeline(runner="FnApiRunner") as p:
        kept, failed = p | beam.Create(new) | add.RejectKnownIds(root, version, buckets=4)
        assert_that(kept | beam.Map(lambda r: r.id), equal_to(["n1", "n2", "n3"]), label="kept")
        assert_that(failed | beam.Map(lambda f: (f.id, f.reason)), equal_to([
            ("m003", "duplicate_id"), ("m199", "duplicate_id"), ("m007", "forgotten_id"),
            ("m150", "forgotten_id")]), label="failed")
    assert held and max(held) < n  # Each bucket holds its own share of the stored ids, never all of them.


# ------------------------------------------------------------------------- precomputed embeddings (--embeddings)

CLIP_DIM = 16


def _clip_dir(root: str, keys, labels, emb, *, part: int = 0) -> str:
    """One part of clip-retrieval's layout (img_emb/img_emb_<i>.npy + metadata/metadata_<i>.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(root, "img_emb"), exist_ok=True)
    os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
    np.save(os.path.join(root, "img_emb", f"img_emb_{part}.npy"), np.asarray(emb, np.float32))
    pq.write_table(pa.table({"key": list(keys), "label": list(labels),
                             "image_path": [f"/imgs/{k}-{i}.jpg" for i, k in enumerate(keys)]}),
                   os.path.join(root, "metadata", f"metadata_{part}.parquet"))
    return root


def _unit(rng, n: int, dim: int = CLIP_DIM) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def clip_flow(tmp_path_factory):
    """A memory built from a clip-retrieval folder (encoder id "x"), then one add from another clip folder.

    The add's folder holds 60 new entries (half of them in a new class), a second copy of one of them, a copy
    of an id the memory already holds and a row with a NaN embedding.
    """
    root = tmp_path_factory.mktemp("clip_add")
    rng = np.random.default_rng(11)
    f = types.SimpleNamespace(memory=str(root / "mem"))
    base_keys = [f"b{i:03d}" for i in range(120)]
    _clip_dir(str(root / "base"), base_keys, [f"c{i % 3}" for i in range(120)], _unit(rng, 120))
    build.run([f"--embeddings=clip:{root / 'base'},label_column=label", "--encoder-id=x", f"--output={f.memory}",
               "--runner=FnApiRunner"])
    f.v1 = read_version(f.memory, 1)
    f.new_keys = [f"n{i:03d}" for i in range(60)]
    f.new_labels = ["c1" if i % 2 else "zebra" for i in range(60)]
    f.new_emb = _unit(rng, 60)
    bad = np.full((1, CLIP_DIM), np.nan, np.float32)
    keys = f.new_keys + ["n000", "b005", "bad"]
    labels = f.new_labels + ["c1", "c0", "c2"]
    emb = np.concatenate([f.new_emb, _unit(rng, 2), bad])
    f.source = _clip_dir(str(root / "new"), keys, labels, emb)
    f.groups = []
    real = add_delta_shards._WriteDeltaShardFn.process

    def spy(self, element, *args, **kwargs):
        f.groups.append(element)
        return real(self, element, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(add_delta_shards._WriteDeltaShardFn, "process", spy)
        f.result, f.plan = add.launch(["--memory", f.memory, f"--embeddings=clip:{f.source},label_column=label",
                                       "--encoder-id=x", "--delta-shard-size=20", "--runner=FnApiRunner"])
    f.v2 = read_version(f.memory, 2)
    return f


def test_add_precomputed_embeddings_to_a_precomputed_memory(clip_flow):
    f = clip_flow
    v1, v2 = f.v1, f.v2
    assert latest_version(f.memory) == 2 and v2.parent == 1 and v2.change["kind"] == "add"
    assert v2.shards == v1.shards and v2.encoder == v1.encoder and v2.dim == CLIP_DIM
    # 63 rows read: 60 added; a NaN row, a copy of a stored id and a second copy of n000 are dead letters.
    assert v2.change["counts"] == {"read": 63, "added": 60, "failed": 3}
    assert v2.total == v1.total + 60
    assert v2.class_names == v1.class_names + ("zebra",) and v2.change["new_classes"] == ["zebra"]
    # ceil(61 rows left after the join / 20) = 4 delta shards, each from its own attempt directory.
    assert 1 <= len(v2.delta_shards) <= 4
    leaves = [s.path.split("/")[-1] for s in v2.delta_shards]
    assert all(s.path.startswith(f"deltas/{f.plan.version_tag}/") for s in v2.delta_shards)
    assert all(add_plan._ATTEMPT_RE.match(leaf) and leaf.split("-")[3] == "00004" for leaf in leaves), leaves
    # The spills and nothing but the published attempts are left.
    assert sorted(os.listdir(os.path.join(f.memory, f.plan.delta_dir))) == sorted(leaves)
    failures = _dead_letters(f.plan.dead_letter_dir)
    assert set(failures) == {"bad", "b005", "n000"}
    assert failures["bad"].reason == "non_finite_embedding"
    assert failures["b005"].reason == "duplicate_id" and "already live in version 1" in failures["b005"].detail
    assert failures["n000"].reason == "duplicate_id" and "given twice in this add" in failures["n000"].detail
    # The writers got spill file paths, never entries: one delta shard's files per group.
    assert f.groups and all(isinstance(p, str) and p.endswith(".npz") and p.startswith(f.plan.spill_dir)
                            for _, g in f.groups for p in g["spills"])


def test_precomputed_entries_are_searchable_with_their_own_vectors(clip_flow):
    f = clip_flow
    mem = VisualMemory.open(f.memory, verify=True)
    found = mem.search(f.new_emb, 1)
    np.testing.assert_array_equal(found.ids[:, 0], f.new_keys)  # n000: the first copy by uri was kept.
    np.testing.assert_allclose(found.distances[:, 0], 0.0, atol=1e-5)  # Cosine distance to itself.
    np.testing.assert_array_equal(mem.label_names(found.labels[:, 0]), f.new_labels)
    ids, emb, names = _stored(f.memory)
    assert int(np.sum(ids == "b005")) == 1 and len(ids) == 180
    rows = np.searchsorted(ids, f.new_keys)
    np.testing.assert_allclose(emb[rows], f.new_emb, atol=1e-6)


def _refused(monkeypatch, argv, match, root, error=add.AddError):
    def no_graph(*args, **kwargs):
        raise AssertionError("the add built its graph before refusing")

    monkeypatch.setattr(add_job, "add_pipeline", no_graph)
    with pytest.raises(error, match=match):
        add.run(["--memory", root, *argv, "--runner=FnApiRunner"])
    deltas = os.path.join(root, "deltas")
    tag = f"v{latest_version(root) + 1:06d}-"
    assert not any(d.startswith(tag) for d in (os.listdir(deltas) if os.path.isdir(deltas) else []))


def test_precomputed_add_refuses_another_encoder_or_dim_before_reading(clip_flow, tmp_path, monkeypatch):
    f = clip_flow
    spec = f"--embeddings=clip:{f.source},label_column=label"
    before = sorted(os.listdir(os.path.join(f.memory, "deltas")))
    _refused(monkeypatch, [spec, "--encoder-id=y"], r"--encoder-id 'y' differs from the encoder 'x'.*--encoder-id x",
             f.memory)
    _refused(monkeypatch, [spec], r"needs --encoder-id.*--encoder-id x", f.memory)
    small = _clip_dir(str(tmp_path / "dim8"), ["z1", "z2"], ["c0", "c0"], _unit(np.random.default_rng(1), 2, 8))
    _refused(monkeypatch, [f"--embeddings=clip:{small},label_column=label", "--encoder-id=x"],
             r"dim 8.*holds dim 16", f.memory)
    # Images cannot be embedded by an encoder the job only knows by name.
    _refused(monkeypatch, ["--images", str(tmp_path)], r"precomputed embeddings of encoder 'x'.*--embeddings",
             f.memory)
    assert latest_version(f.memory) == 2 and sorted(os.listdir(os.path.join(f.memory, "deltas"))) == before


def test_precomputed_add_refuses_a_memory_built_from_images(clip_flow, tmp_path, monkeypatch):
    from memory.build import build_memory_local
    from memory.index.shard_index import IndexConfig
    root = str(tmp_path / "images-mem")
    x = _unit(np.random.default_rng(2), 30)
    build_memory_local(root, ids=[f"i{i}" for i in range(30)], labels=["c0"] * 30,
                       uris=[f"/i/{i}.png" for i in range(30)], embeddings=x, num_shards=1, index_config=IndexConfig(),
                       encoder_identity={"name": "x", "content_hash": "sha256:0", "dim": CLIP_DIM,
                                         "preprocess": {"image_size": 28}})
    _refused(monkeypatch, [f"--embeddings=clip:{clip_flow.source},label_column=label", "--encoder-id=x"],
             r"built from images with encoder 'x'.*--images", root)
    assert latest_version(root) == 1


def test_publish_step_is_idempotent_when_retried(clip_flow, tmp_path):
    """A retried publish step finds its own version (success); another publish there is a conflict."""
    from memory.index.shard_index import IndexConfig, IndexKind
    from memory.store.shard import ShardData, write_shard
    root = str(tmp_path / "mem")
    shutil.copytree(clip_flow.memory, root)
    plan = add.plan_add(root, images=False)
    v2 = read_version(root, 2)
    data = ShardData(ids=np.array(["r0", "r1", "r2"]), labels=np.array([0, 3, 1], np.int32),
                     uris=np.array(["/r/0", "/r/1", "/r/2"]), embeddings=_unit(np.random.default_rng(3), 3))
    attempts = []
    for _ in range(2):  # Two attempts at delta shard 0 of 1 (a retried bundle); the step names the first.
        name, rel = add.delta_shard_path(plan, 0, 1)
        attempts.append(write_shard(os.path.join(root, rel), data, name=name, root_relative_path=rel,
                                    index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE)))
    os.makedirs(os.path.join(plan.spill_dir, "shard-00000"))
    open(os.path.join(plan.spill_dir, "shard-00000", "0123.npz"), "wb").close()
    identity = json.dumps(v2.encoder, sort_keys=True)

    def publish_step(read, failed):
        return list(add_job._PublishAddFn(plan).process(
            None, infos=[(0, attempts[0])], identities=[identity], class_names=list(v2.class_names),
            records_read=read, failed=failed, dead_letter_files=[]))

    [first] = publish_step(3, 0)
    assert latest_version(root) == 3 and first.delta_shards[-1] == attempts[0]
    assert os.listdir(os.path.join(root, plan.delta_dir)) == [attempts[0].path.split("/")[-1]]
    [again] = publish_step(3, 0)  # The step retried after its version was published: success, same version.
    assert again == first and latest_version(root) == 3
    assert add.publish_add_version(plan, delta_infos=[attempts[0]], new_class_names=[],
                                   counts={"read": 3, "added": 3, "failed": 0}) == first
    with pytest.raises(ConcurrentUpdateError, match="re-run"):  # Not this add's version 3: a conflict.
        publish_step(4, 1)
    # The conflict did not delete the published delta shard.
    assert latest_version(root) == 3 and os.path.isdir(os.path.join(root, attempts[0].path))
    found = VisualMemory.open(root, verify=True).search(data.embeddings, 1)
    np.testing.assert_array_equal(found.ids[:, 0], data.ids)


def test_reject_known_ids_in_blocks_joins_ids_only_per_bucket(tmp_path, monkeypatch):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from memory.build import build_memory_local
    from memory.index.shard_index import IndexConfig
    from pipelines.records import EntryBlock

    n = 200
    ids = [f"m{i:03d}" for i in range(n)]
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=ids, labels=[f"c{i % 3}" for i in range(n)], uris=[f"/i/{i}" for i in ids],
                       embeddings=_unit(np.random.default_rng(5), n, 8), num_shards=3, index_config=IndexConfig(),
                       encoder_identity={"name": "fake", "content_hash": "sha256:0", "dim": 8, "preprocess": {}})
    forget(root, ids=["m007", "m150"])
    held = []
    real_process = add_known_ids._RejectRowsInBucketFn.process

    def spy(self, element):
        held.append((sum(len(c) for c in element[1]["stored"]), [type(r).__name__ for r in element[1]["new"]]))
        return real_process(self, element)

    monkeypatch.setattr(add_known_ids._RejectRowsInBucketFn, "process", spy)
    new = np.array(["m003", "m007", "m150", "m199", "n1", "n2", "n3", "n1"])
    block = EntryBlock(new, np.array(["c0"] * 7 + ["zebra"]), np.array([f"/new/{i}" for i in range(8)]),
                       _unit(np.random.default_rng(6), 8, 8))
    with TestPipeline(runner="FnApiRunner") as p:
        rejected, failed, kept = p | beam.Create([block]) | add.RejectKnownIdsInBlocks(root, 2, buckets=4)
        assert_that(rejected | beam.FlatMap(lambda a: a.tolist()), equal_to(["m003", "m007", "m150", "m199"]),
                    label="rejected")
        assert_that(failed | beam.Map(lambda f: (f.id, f.reason)), equal_to([
            ("m003", "duplicate_id"), ("m199", "duplicate_id"), ("m007", "forgotten_id"),
            ("m150", "forgotten_id")]), label="failed")
        assert_that(kept | beam.Map(lambda k: k[0]) | beam.CombineGlobally(sum), equal_to([4]), label="kept")
        assert_that(kept | beam.FlatMap(lambda k: k[1]) | beam.Distinct(), equal_to(["c0", "zebra"]),
                    label="labels")
    # Each bucket holds its share of the stored ids and only the id/uri/label columns of the new rows.
    assert held and max(h for h, _ in held) < n
    assert {t for _, types_ in held for t in types_} == {"_RowsOfBucket"}
