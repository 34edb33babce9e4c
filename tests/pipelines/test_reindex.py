"""`vmem reindex` (vmem/reindex.py, the job in pipelines/reindex/) and its planner (memory/store/compaction.py).

The bar: a re-index changes nothing a search sees (answers equal those before it and those of a memory built
from scratch from the live entries), removes forgotten rows physically, rewrites only changed shards, and
killing it at any step leaves a memory that opens and answers as the previous version did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from memory import storage
from memory.store import compaction, mutations, purge
from memory.store import shard as shard_io
from memory.store import versions as versions_mod
from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.shard import read_shard_data
from memory.store.sharding import shard_for_id
from memory.vectors import l2_normalize
from memory.store.versions import (WriteConflictError, latest_version, list_versions,
                                   read_manifest, read_version)
from memory.visual_memory import VisualMemory
from pipelines import reindex
from pipelines.reindex import commit as reindex_commit
from pipelines.reindex import stages as reindex_stages
from pipelines.stages.write import SPILL_DIR
from vmem import reindex as reindex_cli
from vmem.args import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D = 16
N = 240
SHARDS = 4
BRUTE = IndexConfig(kind=IndexKind.BRUTE_FORCE)
ENC = {"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}


def _rows(rng, n, prefix):
    ids = [f"{prefix}-{i:06d}" for i in range(n)]
    x = l2_normalize(rng.normal(size=(n, D))).astype(np.float32)  # Unique vectors: byte-greppable.
    labels = [("ant", "bee", "cat")[i % 3] for i in range(n)]
    return {i: (lab, f"gs://photos/{i}.png", v) for i, lab, v in zip(ids, labels, x)}


def _build(root, rows, shards=SHARDS):
    ids = sorted(rows)
    return build_memory_local(str(root), ids=ids, labels=[rows[i][0] for i in ids], uris=[rows[i][1] for i in ids],
                              embeddings=np.stack([rows[i][2] for i in ids]), num_shards=shards,
                              index_config=BRUTE, encoder_identity=ENC)


def _in_shard(ids, s, n=SHARDS):
    return [i for i in ids if shard_for_id(i, n) == s]


@pytest.fixture()
def drifted(tmp_path):
    """A 4-shard memory after forget S (rows of shards 0 and 1) and add D (rows hashing to shards 1 and 2).

    Shard 3 is untouched. Returns (root, all rows incl. D, S, D ids, queries).
    """
    rng = np.random.default_rng(20261126)
    rows = _rows(rng, N, "img")
    root = str(tmp_path / "mem")
    _build(root, rows)
    ids = sorted(rows)
    forgotten = _in_shard(ids, 0)[:9] + _in_shard(ids, 1)[:3]
    candidates = _rows(np.random.default_rng(7), 80, "new")
    added = (_in_shard(sorted(candidates), 1)[:4] + _in_shard(sorted(candidates), 2)[:5])
    # Weights on some entries, one of them forgotten below: the re-index must drop it from the weights file.
    mutations.publish_entry_weights(root, ids=[forgotten[0], ids[-1], ids[-2]], weights=np.array([0.5, 0.25, 2.0]),
                                    params={"k": 3})
    mutations.forget(root, ids=forgotten)
    mutations.add_entries_local(root, ids=added, labels=[candidates[i][0] for i in added],
                                uris=[candidates[i][1] for i in added],
                                embeddings=np.stack([candidates[i][2] for i in added]))
    rows.update({i: candidates[i] for i in added})
    q = np.concatenate([l2_normalize(rng.normal(size=(6, D))),
                        np.stack([rows[i][2] for i in forgotten[:2] + added[:2] + ids[100:102]])]).astype(np.float32)
    return root, rows, forgotten, added, q


def _answers(root, q, *, version=None):
    mem = VisualMemory.open(root, version=version)
    out = []
    for k in (1, 7, len(mem) + 3):
        res = mem.search(q, k)
        out.append((res.ids.copy(), res.distances.copy(), mem.label_names(res.labels),
                    None if res.weights is None else res.weights.copy()))
    return out


def _assert_same(a, b):
    for (ids_a, d_a, lab_a, w_a), (ids_b, d_b, lab_b, w_b) in zip(a, b):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(d_a, d_b)
        np.testing.assert_array_equal(lab_a, lab_b)
        assert (w_a is None) == (w_b is None)
        if w_a is not None:
            np.testing.assert_array_equal(w_a, w_b)


def _shard_files(root, manifest):
    for s in manifest.all_shards:
        base = os.path.join(root, s.path)
        for dirpath, _, files in os.walk(base):
            for f in files:
                yield os.path.join(dirpath, f)


def _leaks(paths, ids, vectors):
    """Files whose raw bytes contain a forgotten id (UTF-8 or numpy's UTF-32) or embedding (float32)."""
    needles = [i.encode("utf-8") for i in ids] + [i.encode("utf-32-le") for i in ids]
    needles += [np.asarray(v, np.float32).tobytes() for v in vectors]
    bad = []
    for path in paths:
        with open(path, "rb") as f:
            blob = f.read()
        bad += [(path, n[:24]) for n in needles if n in blob]
    return bad


# ---------------------------------------------------------------------------------------------- planner


def test_target_shard_count_and_thresholds(drifted):
    root, _, forgotten, added, _ = drifted
    m = read_manifest(root)
    assert compaction.target_shard_count(m.total, target_shard_size=None, current=4) == 4
    assert compaction.target_shard_count(237, target_shard_size=100, current=4) == 3
    assert compaction.target_shard_count(0, target_shard_size=100, current=4) == 1
    with pytest.raises(ValueError, match="target_shard_size"):
        compaction.target_shard_count(10, target_shard_size=0, current=4)
    live = N - len(forgotten) + len(added)
    assert compaction.delta_fraction(m) == pytest.approx(len(added) / live)
    assert compaction.forgotten_fraction(m) == pytest.approx(len(forgotten) / (N + len(added)))
    # delta 9/237 = 0.038, forgotten 12/249 = 0.048.
    needed, why = compaction.needs_reindex(m, delta_threshold=0.1, forgotten_threshold=0.1)
    assert not needed and why.startswith("nothing to do") and "0.0380" in why and "0.0482" in why
    assert compaction.needs_reindex(m, delta_threshold=0.03, forgotten_threshold=0.1)[0]
    needed, why = compaction.needs_reindex(m, delta_threshold=0.1, forgotten_threshold=0.04)
    assert needed and "forgotten fraction above" in why
    assert compaction.needs_reindex(m, delta_threshold=1, forgotten_threshold=1, target_shards=2)[0]
    assert compaction.needs_reindex(m, delta_threshold=1, forgotten_threshold=1, purge_requested=True)[0]


def test_plan_reuses_only_untouched_hash_partitions(drifted):
    root, _, forgotten, added, _ = drifted
    m = read_manifest(root)
    main_ids = {s.path: read_shard_data(os.path.join(root, s.path)).ids for s in m.shards}
    delta_ids = [read_shard_data(os.path.join(root, s.path)).ids for s in m.delta_shards]
    plan = compaction.plan_reindex(m, main_ids=main_ids, forgotten=np.array(forgotten), delta_ids=delta_ids)
    assert plan.rebuilt == (0, 1, 2) and plan.reused == (3,)
    assert plan.targets[3].reused == m.shards[3]
    assert plan.targets[0].reasons == ("9 forgotten rows",)
    assert plan.targets[1].reasons == ("3 forgotten rows", "4 delta rows")
    assert plan.sources == m.shards[:3] + m.delta_shards and plan.delta_rows == 9 and plan.forgotten_rows == 12
    # A new shard count rebuilds everything from every shard.
    plan2 = compaction.plan_reindex(m, main_ids=main_ids, forgotten=np.array(forgotten), delta_ids=delta_ids,
                                    num_shards=3)
    assert plan2.rebuilt == (0, 1, 2) and plan2.reused == () and plan2.sources == m.shards + m.delta_shards
    # Not a hash partition (an id of shard 3 stored in shard 0): nothing may be reused.
    moved = dict(main_ids)
    moved[m.shards[0].path] = np.append(main_ids[m.shards[0].path], main_ids[m.shards[3].path][0])
    plan3 = compaction.plan_reindex(m, main_ids=moved, forgotten=np.array(forgotten), delta_ids=delta_ids)
    assert plan3.reused == () and "hash partition" in plan3.note


def test_orphan_dirs_are_only_unreferenced_dirs_of_published_versions():
    children = ["r000003-aa", "r000003-bb", "r000004-cc", "r000005-dd", "shard-00000-of-00004", "rubbish"]
    referenced = ["shards/r000003-aa/shard-00000-of-00002", "shard-00001-of-00002"]
    assert compaction.orphan_reindex_dirs(children, referenced_paths=referenced, latest=4) == [
        "shards/r000003-bb", "shards/r000004-cc"]


# ------------------------------------------------------------------------------------------- the job


def test_reindex_equals_before_and_from_scratch_and_drops_forgotten(drifted, tmp_path, capsys):
    root, rows, forgotten, added, q = drifted
    before_version = latest_version(root)
    before = _answers(root, q)
    old = read_manifest(root)
    assert reindex_cli.main(["--memory", root]) == EXIT_OK
    out = capsys.readouterr().out
    assert "rebuilt 3: shard-00000-of-00004, shard-00001-of-00004, shard-00002-of-00004" in out
    assert "reused  1: shard-00003-of-00004" in out and "dropped 12 forgotten rows, folded 9 delta rows" in out
    new = read_manifest(root)
    assert new.version == before_version + 1 and new.parent == before_version
    assert new.change["kind"] == "reindex" and new.change["reused"] == ["shard-00003-of-00004"]
    assert new.change["dropped_forgotten"] == 12 and new.change["folded_delta"] == 9
    assert new.delta_shards == () and new.forgotten is None and new.total == old.total
    # Reused: the very same ShardInfo (path, checksum); rebuilt: fresh directories of this job.
    assert new.shards[3] == old.shards[3]
    for s in new.shards[:3]:
        assert s.path.startswith(f"shards/r{new.version:06d}-{new.change['job']}/") and s.path not in {
            o.path for o in old.all_shards}
    # Entry weights: the forgotten id is gone from a new weights file; the others keep their weights.
    ids_w, w = mutations.read_entry_weights(root, new)
    assert forgotten[0] not in ids_w.tolist() and len(ids_w) == 2 and new.entry_weights.path != old.entry_weights.path
    after = _answers(root, q)
    _assert_same(before, after)
    # A memory built from scratch from the live entries: same answers, and byte-identical shards.
    live = {i: r for i, r in rows.items() if i not in set(forgotten)}
    ref_root = str(tmp_path / "ref")
    ref = _build(ref_root, live)
    mutations.publish_entry_weights(ref_root, ids=ids_w.tolist(), weights=w, params={"k": 3})
    _assert_same(after, _answers(ref_root, q))
    assert [s.checksum for s in new.shards] == [s.checksum for s in ref.shards]
    # No file of the latest version holds a forgotten id or embedding (the control: the old ones do).
    assert not _leaks(_shard_files(root, new), forgotten, [rows[i][2] for i in forgotten])
    assert _leaks(_shard_files(root, old), forgotten, [rows[i][2] for i in forgotten])
    # The previous version is still readable and answers as before (history is kept without a purge).
    _assert_same(_answers(root, q, version=before_version), before)


def test_forget_purge_history_then_reindex_leaves_no_forgotten_byte_anywhere(tmp_path, capsys):
    rng = np.random.default_rng(11)
    rows = _rows(rng, N, "img")
    root = str(tmp_path / "mem")
    _build(root, rows)
    ids = sorted(rows)
    extra = _rows(np.random.default_rng(12), 6, "add")
    mutations.add_entries_local(root, ids=sorted(extra), labels=[extra[i][0] for i in sorted(extra)],
                                uris=[extra[i][1] for i in sorted(extra)],
                                embeddings=np.stack([extra[i][2] for i in sorted(extra)]))
    rows.update(extra)
    forgotten = _in_shard(ids, 2)[:5] + sorted(extra)[:2]  # Main rows and delta rows.
    mutations.forget(root, ids=forgotten, request_purge=True)  # What `vmem forget --purge-history` does.
    purge.purge_history(root)
    q = l2_normalize(rng.normal(size=(8, D))).astype(np.float32)
    before = _answers(root, q)
    everything = lambda: [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]  # noqa: E731
    vectors = [rows[i][2] for i in forgotten]
    assert _leaks(everything(), forgotten, vectors)  # Control: tombstones and old shards still hold them.
    assert reindex_cli.main(["--memory", root, "--if-needed"]) == 0  # Needed: a purge is pending.
    assert "purged versions" in capsys.readouterr().out
    _assert_same(before, _answers(root, q))
    assert not _leaks(everything(), forgotten, vectors)
    assert [h["kind"] for h in versions_mod.history(root)] == ["reindex", "purge"]
    assert not purge.purge_requested_since_reindex(root)


def test_if_needed_exit_codes_and_target_shard_size(drifted, capsys):
    root, _, _, _, q = drifted
    n = latest_version(root)
    before = _answers(root, q)
    assert reindex_cli.main(["--memory", root, "--if-needed"]) == reindex_cli.EXIT_NOTHING_TO_DO
    assert "nothing to do: delta fraction 0.0380" in capsys.readouterr().out
    assert reindex_cli.main(["--memory", root, "--if_needed=true", "--nothing_to_do_status=0"]) == 0
    assert latest_version(root) == n
    assert reindex.run(["--memory", root, "--if-needed"]) is None
    assert reindex_cli.main(["--memory", root, "--delta-threshold", "-1"]) == EXIT_USAGE
    assert reindex_cli.main(["--memory", root + "-missing"]) == EXIT_FAILURE  # No memory: a runtime failure.
    assert reindex_cli.main(["--memory", root, "--if-needed", "--delta-threshold", "0.03"]) == 0
    assert latest_version(root) == n + 1
    _assert_same(before, _answers(root, q))
    # A new shard count (ceil(237 / 100) = 3) rebuilds every shard; the answers stay the same.
    assert reindex_cli.main(["--memory", root, "--if-needed", "--target-shard-size", "100"]) == 0
    m = read_manifest(root)
    assert len(m.shards) == 3 and m.change["reused"] == [] and m.build_config["num_shards"] == 3
    _assert_same(before, _answers(root, q))


# --------------------------------------------------------------------------------------- crash safety


def _fail_on_call(monkeypatch, module, name, nth):
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            raise OSError(f"injected failure in {name} (call {nth})")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("where", ["write_shard#2", "create_version_file", "after_version_file", "purge",
                                   "purge_midway"])
def test_failure_at_each_step_leaves_the_previous_answers(drifted, monkeypatch, capsys, where):
    root, _, forgotten, _, q = drifted
    if where.startswith("purge"):
        mutations.forget(root, ids=[sorted(mutations.live_ids(root).tolist())[5]], request_purge=True)
    n = latest_version(root)
    before = _answers(root, q)
    with monkeypatch.context() as mp:
        if where == "write_shard#2":
            _fail_on_call(mp, shard_io, "write_shard", 2)
        elif where == "create_version_file":
            _fail_on_call(mp, storage, "create_exclusive", 1)
        elif where == "after_version_file":
            _fail_on_call(mp, versions_mod, "_refresh_manifest_copy", 1)
        elif where == "purge":  # Published, then killed before the purge published anything.
            _fail_on_call(mp, reindex_commit, "purge_history", 1)
        else:  # Killed halfway through the purge's deletions.
            _fail_on_call(mp, purge, "_remove_empty_parents", 1)
        assert reindex_cli.main(["--memory", root]) == EXIT_FAILURE
    assert "injected failure" in capsys.readouterr().err
    published = {"after_version_file": 1, "purge": 1, "purge_midway": 2}.get(where, 0)
    assert latest_version(root) == n + published
    _assert_same(before, _answers(root, q))  # Opens, and answers as before (or as the identical new version).
    assert reindex_cli.main(["--memory", root]) == EXIT_OK  # A re-run succeeds...
    if where == "purge":  # ...and finishes the purge the crashed run owed.
        assert "purge" in [h["kind"] for h in versions_mod.history(root)]
    _assert_same(before, _answers(root, q))
    m = read_manifest(root)
    assert m.forgotten is None and m.delta_shards == ()
    # ...and removes the crashed run's unreferenced directory.
    used = {s.path.split("/")[1] for s in m.shards if s.path.startswith("shards/")}
    assert sorted(os.listdir(os.path.join(root, "shards"))) == sorted(used)


def test_sigkill_at_random_times_leaves_a_working_memory(drifted, tmp_path):
    """`python vmem/reindex.py` (the Flex Template launcher's command) killed with SIGKILL at seeded random moments
    after chosen progress lines."""
    root, _, _, _, q = drifted
    n = latest_version(root)
    before = _answers(root, q)
    rng = np.random.default_rng(5)
    # While reading sources, while writing shards, around the publish.
    markers = [b"reindex: read ", b"reindex: rebuilt ", b"reindex: published"]
    delays = rng.uniform(0.0, 0.3, size=len(markers))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="1", PYTHONPATH=REPO)
    procs = []
    for i, (marker, delay) in enumerate(zip(markers, delays)):
        copy = str(tmp_path / f"kill{i}")
        shutil.copytree(root, copy)
        log_path = tmp_path / f"kill{i}.log"
        with open(log_path, "wb") as log:  # Three at once: their ~10 s imports overlap.
            p = subprocess.Popen([sys.executable, os.path.join(REPO, "vmem", "reindex.py"), "--memory", copy],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append((copy, p, log_path, marker, delay))
    outcomes = []
    for copy, p, log_path, marker, delay in procs:
        deadline = time.monotonic() + 90
        while marker not in log_path.read_bytes() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        v = latest_version(copy)
        assert v in (n, n + 1), log_path.read_text()
        steps = [line.split("reindex: ")[-1].replace(copy, "M") for line in log_path.read_text().splitlines()
                 if "reindex: " in line]
        outcomes.append((round(float(delay), 2), v, steps[-1][:40] if steps else "before planning"))
        # The memory opens and answers as the previous version (or as the identical new one).
        _assert_same(before, _answers(copy, q))
    # A run killed before publishing left an unreferenced directory; a re-run succeeds and deletes it. Which
    # copy that is depends on timing (under load the "writing shards" kill can land after the publish), so
    # take every copy that stayed at version n.
    unpublished = [c for c, *_ in procs if latest_version(c) == n]
    assert unpublished, outcomes
    def listed(copy):  # A run killed before writing anything has not created shards/ yet.
        path = os.path.join(copy, "shards")
        return set(os.listdir(path)) if os.path.isdir(path) else set()

    for copy in unpublished:
        referenced = {s.path.split("/")[1] for s in read_manifest(copy).shards if s.path.startswith("shards/")}
        orphans = listed(copy) - referenced
        assert reindex_cli.main(["--memory", copy]) == 0
        _assert_same(before, _answers(copy, q))
        assert not orphans & listed(copy)
    print("SIGKILL (delay s, version after, last progress line):", outcomes)


# ---------------------------------------------------------------------------------------- concurrency


def test_reindex_removes_old_leftovers_of_failed_writers_and_keeps_young_ones(drifted):
    root, _, _, _, q = drifted
    before = _answers(root, q)
    n = latest_version(root)
    version_time = os.path.getmtime(os.path.join(root, "versions", f"v{n:06d}.json"))
    old, young = f"tombstones/v{n:06d}-0badf00d.npy", f"tombstones/v{n:06d}-5ca1ab1e.npy"
    for rel in (old, young):
        with open(os.path.join(root, rel), "wb") as f:
            f.write(b"left by a killed forget")
    os.utime(os.path.join(root, old), (version_time - purge.DEFAULT_LEFTOVER_GRACE_S - 1,) * 2)
    assert reindex_cli.main(["--memory", root]) == EXIT_OK
    assert not os.path.exists(os.path.join(root, old))  # Older than the grace period before version n.
    assert os.path.exists(os.path.join(root, young))  # Its writer could still be re-basing: kept.
    _assert_same(before, _answers(root, q))


def test_two_reindexes_of_the_same_version_publish_once(drifted):
    root, _, _, _, q = drifted
    before = _answers(root, q)
    first, second = reindex.prepare_job(root), reindex.prepare_job(root)
    n = first.version
    reindex.execute(first)
    with pytest.raises(WriteConflictError, match=rf"re-index of version {n} .* conflicts with version {n + 1} "
                                                 r"\(reindex\).*never re-bases"):
        reindex.execute(second)
    assert list_versions(root)[-1] == n + 1 and read_version(root, n + 1).change["job"] == first.job_token
    _assert_same(before, _answers(root, q))


def test_a_publish_during_the_reindex_wins_and_the_reindex_fails(drifted, monkeypatch, capsys):
    root, _, _, _, q = drifted
    n = latest_version(root)
    victim = sorted(mutations.live_ids(root).tolist())[0]
    real = shard_io.write_shard
    def write_then_someone_forgets(*args, **kwargs):  # noqa: E306
        if latest_version(root) == n:
            mutations.forget(root, ids=[victim])
        return real(*args, **kwargs)
    monkeypatch.setattr(shard_io, "write_shard", write_then_someone_forgets)
    assert reindex_cli.main(["--memory", root]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert f"re-index of version {n} of {root} conflicts with version {n + 1} (forget)" in err
    assert "Nothing of this change was published" in err and "Traceback" not in err
    assert latest_version(root) == n + 1 and read_manifest(root).change["kind"] == "forget"
    assert victim not in VisualMemory.open(root).search(q, 300).ids


# --------------------------------------------------------------------------------- template, Dataflow


def test_flex_template_metadata_names_only_accepted_flags():
    with open(os.path.join(REPO, "templates", "reindex", "metadata.json"), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["name"] and meta["description"]
    accepted = {o.lstrip("-") for a in reindex_cli.build_parser()._actions for o in a.option_strings}
    examples = {"memory": "gs://b/memories/m", "if_needed": "true", "target_shard_size": "50000",
                "delta_threshold": "0.1", "forgotten_threshold": ".25", "no_verify": "true", "nothing_to_do_status": "0"}
    assert {p["name"] for p in meta["parameters"]} == set(examples)
    import re
    for p in meta["parameters"]:
        assert p["name"] in accepted and p["helpText"] and p["label"]
        assert all(re.fullmatch(r, examples[p["name"]]) for r in p.get("regexes", [])), p["name"]
    args, rest = reindex_cli.build_parser().parse_known_args([f"--{k}={v}" for k, v in examples.items()])
    assert rest == [] and args.if_needed is True and args.target_shard_size == 50000 and args.nothing_to_do_status == 0
    assert args.no_verify is True
    assert reindex_cli.build_parser().parse_args(["--memory=m", "--no-verify"]).no_verify is True
    assert reindex_cli.build_parser().parse_args(["--memory=m", "--no_verify=false"]).no_verify is False
    assert reindex_cli.build_parser().parse_args(["--memory=m"]).no_verify is False
    with open(os.path.join(REPO, "templates", "reindex", "Dockerfile"), encoding="utf-8") as f:
        docker = f.read()
    assert "python311-template-launcher-base" in docker and "vmem/reindex.py" in docker
    assert "FLEX_TEMPLATE_PYTHON_SETUP_FILE" in docker and "requirements-nodeps.txt" in docker


def test_dataflow_dry_run_builds_the_graph_offline(drifted):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    root = drifted[0]
    n = latest_version(root)
    argv = ["--memory", root, "--runner=DataflowRunner", "--dry_run=True", "--project=test-project",
            "--region=us-central1", "--temp_location=gs://test-bucket/tmp"]
    p = beam.Pipeline(options=PipelineOptions(argv[2:]))
    reindex.run(argv, test_pipeline=p)
    names = {t.unique_name for t in p.to_runner_api().components.transforms.values()}
    for step in ("ListSourceShards", "ReadLiveRows", "GroupByTarget", "WriteTargetShard", "Publish"):
        assert step in names
    assert latest_version(root) == n  # Nothing ran.


def test_reindex_of_a_partition_routed_memory_keeps_rows_routes_deltas_and_answers(tmp_path, capsys):
    from memory.search.routing import RouterConfig, read_router
    rng = np.random.default_rng(5)
    centres = l2_normalize(rng.normal(size=(8, D)))
    x = l2_normalize(centres[rng.integers(0, 8, N)] + 0.2 * rng.normal(size=(N, D)) / np.sqrt(D)).astype(np.float32)
    ids = [f"img-{i:06d}" for i in range(N)]
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=ids, labels=["ant"] * N, uris=[f"u/{i}" for i in ids], embeddings=x,
                       num_shards=SHARDS, index_config=BRUTE, encoder_identity=ENC, sharding="partition",
                       router_config=RouterConfig(num_centroids=16, probes=2))
    old = read_manifest(root)
    router = read_router(root, old)
    # Add rows near centre 0 only: every delta row routes to the shard(s) owning that region.
    new_x = l2_normalize(centres[[0] * 6] + 0.1 * rng.normal(size=(6, D)) / np.sqrt(D)).astype(np.float32)
    new_ids = [f"new-{i}" for i in range(6)]
    mutations.add_entries_local(root, ids=new_ids, labels=["bee"] * 6, uris=[f"u/{i}" for i in new_ids],
                                embeddings=new_x)
    mutations.forget(root, ids=ids[:3])
    q = np.concatenate([new_x[:2], x[10:14]])
    full = lambda m: m.with_search_params(route_probes=16)  # Every shard: exact, comparable across layouts.
    before = full(VisualMemory.open(root)).search(q, 9)
    assert reindex_cli.main(["--memory", root]) == EXIT_OK
    new = read_manifest(root)
    assert new.router == old.router and len(new.shards) == SHARDS and new.delta_shards == ()
    targets = set(router.assign(new_x).tolist())
    gone_from = {int(np.flatnonzero([i in read_shard_data(os.path.join(root, s.path)).ids.astype(str)
                                     for s in old.shards])[0]) for i in ids[:3]}
    assert set(new.change["reused"]) == {old.shards[t].name for t in range(SHARDS)} - {
        old.shards[t].name for t in targets | gone_from}
    for t, info in enumerate(new.shards):
        stored = set(read_shard_data(os.path.join(root, info.path)).ids.astype(str).tolist())
        old_ids = set(read_shard_data(os.path.join(root, old.shards[t].path)).ids.astype(str).tolist())
        assert stored == (old_ids - set(ids[:3])) | {n for n, s in zip(new_ids, router.assign(new_x)) if s == t}
    after = full(VisualMemory.open(root)).search(q, 9)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.distances, after.distances)
    capsys.readouterr()
    assert reindex_cli.main(["--memory", root, "--target-shard-size", "60"]) == EXIT_USAGE
    assert "keeps its shard count" in capsys.readouterr().err


# ------------------------------------------------------------------------------- bounded launcher, spills


def _routed_memory(root, n, seed=3, added=None):
    """A 4-shard partition-routed memory of n entries after forgetting 2% and adding 10% (delta rows)."""
    from memory.search.routing import RouterConfig
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(8, D)))
    x = l2_normalize(centres[rng.integers(0, 8, n)] + 0.2 * rng.normal(size=(n, D)) / np.sqrt(D)).astype(np.float32)
    ids = [f"img-{i:06d}" for i in range(n)]
    build_memory_local(root, ids=ids, labels=[("ant", "bee")[i % 2] for i in range(n)], uris=[f"u/{i}" for i in ids],
                       embeddings=x, num_shards=SHARDS, index_config=BRUTE, encoder_identity=ENC, sharding="partition",
                       router_config=RouterConfig(num_centroids=16, probes=2))
    added = n // 10 if added is None else added
    new_x = l2_normalize(centres[rng.integers(0, 8, added)] + 0.1 * rng.normal(size=(added, D)) / np.sqrt(D))
    new_ids = [f"new-{i:06d}" for i in range(added)]
    mutations.add_entries_local(root, ids=new_ids, labels=["cat"] * added, uris=[f"u/{i}" for i in new_ids],
                                embeddings=new_x.astype(np.float32))
    mutations.forget(root, ids=ids[::50] + new_ids[:3])
    return np.concatenate([x[:5], new_x[3:6]]).astype(np.float32)


def test_launcher_reads_no_shard_and_the_graph_does_not_grow_with_the_memory(tmp_path, monkeypatch):
    """prepare_job reads manifests only; the job, the DoFns and the whole graph stay small at any memory size."""
    import pickle
    import apache_beam as beam
    from apache_beam.internal import pickler
    roots = {}
    for n, name in ((400, "small"), (4000, "large")):  # Same-length paths: they are pickled into the graph.
        roots[n] = str(tmp_path / name)
        _routed_memory(roots[n], n)
    reads = []
    with monkeypatch.context() as mp:
        for module, name in ((shard_io, "read_shard_ids"), (shard_io, "read_shard_data"),
                             (shard_io, "read_shard_entries"), (shard_io, "read_shard_embeddings"),
                             (reindex_stages, "read_forgotten"), (reindex_stages, "read_router"),
                             (reindex_commit, "read_forgotten"), (reindex_commit, "read_entry_weights"),
                             (mutations, "read_forgotten")):
            real = getattr(module, name)
            mp.setattr(module, name, lambda *a, _real=real, _name=name, **k: (reads.append(_name), _real(*a, **k))[1])
        jobs = {n: reindex.prepare_job(root) for n, root in roots.items()}
    assert reads == []  # No shard, tombstone, router or weights file is read by the launcher.
    sizes = {}
    for n, job in jobs.items():
        assert len(pickle.dumps(job)) < 10_000
        for fn in (reindex_stages.ScanSourceFn(job), reindex_stages.ReadLiveRowsFn(job),
                   reindex_stages.WriteTargetShardFn(job)):
            assert len(pickler.dumps(fn)) < 20_000, type(fn).__name__
        p = beam.Pipeline()
        reindex.build_pipeline(p, job)
        sizes[n] = len(p.to_runner_api().SerializeToString())
    # 10x the entries (and delta rows): the graph may differ only by a few digits (counts, checksums) and by
    # how its compressed pickles compress; 360 more delta rows' targets alone would add ~2.9 kB per DoFn.
    assert abs(sizes[4000] - sizes[400]) < 1_000, sizes


def test_routed_reindex_through_small_spill_files_matches_and_cleans_up(tmp_path):
    root = str(tmp_path / "mem")
    q = _routed_memory(root, 600, added=70)
    before = VisualMemory.open(root).with_search_params(route_probes=16).search(q, 9)
    old = read_manifest(root)
    live = set(mutations.live_ids(root).tolist())
    job = reindex.prepare_job(root, spill_rows=16)  # Many spill files per target shard.
    reindex.execute(job)
    new = read_manifest(root)
    assert new.version == old.version + 1 and new.total == len(live) and new.delta_shards == ()
    stored = [read_shard_data(os.path.join(root, s.path)).ids.astype(str).tolist() for s in new.shards]
    assert sorted(i for ids in stored for i in ids) == sorted(live)
    for t, info in enumerate(new.shards):  # Main rows stay in their shard.
        old_ids = set(read_shard_data(os.path.join(root, old.shards[t].path)).ids.astype(str).tolist())
        assert {i for i in stored[t] if i.startswith("img-")} == old_ids & live
    after = VisualMemory.open(root).with_search_params(route_probes=16).search(q, 9)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.distances, after.distances)
    leftovers = [d for d, _, _ in os.walk(root) if os.path.basename(d) == SPILL_DIR]
    assert leftovers == []
    # A run killed right after its publish leaves spill files in its (referenced) directory: the next
    # clean-up deletes them and nothing else.
    spill = os.path.join(root, job.job_dir, SPILL_DIR, "shard-00000")
    os.makedirs(spill)
    open(os.path.join(spill, "x.npz"), "wb").close()
    assert reindex.remove_orphans(root) == []
    assert not os.path.exists(os.path.join(root, job.job_dir, SPILL_DIR))
    assert sorted(os.listdir(os.path.join(root, job.job_dir))) == sorted(s.name for s in new.shards
                                                                         if s.path.startswith(job.job_dir))


def test_plan_from_summaries_equals_plan_reindex(drifted):
    root, _, forgotten, _, _ = drifted
    m = read_manifest(root)
    main_ids = {s.path: read_shard_data(os.path.join(root, s.path)).ids for s in m.shards}
    delta_ids = [read_shard_data(os.path.join(root, s.path)).ids for s in m.delta_shards]
    gone = np.sort(np.array(forgotten))
    for n in (None, 3):
        new_n = n or len(m.shards)
        summaries = [compaction.summarize_main_shard(s.path, i, main_ids[s.path], gone, num_main=len(m.shards),
                                                     routed=False) for i, s in enumerate(m.shards)]
        summaries += [compaction.summarize_delta_shard(s.path, ids, [shard_for_id(i, new_n) for i in ids], gone)
                      for s, ids in zip(m.delta_shards, delta_ids)]
        assert compaction.plan_from_summaries(m, summaries[::-1], num_shards=n) == compaction.plan_reindex(
            m, main_ids=main_ids, forgotten=np.array(forgotten), delta_ids=delta_ids, num_shards=n)
    with pytest.raises(ValueError, match="no summary of main shard"):
        compaction.plan_from_summaries(m, summaries[1:])


def test_reindex_of_a_templated_hash_memory_keeps_searching_its_shards_as_one(tmp_path, capsys):
    """Rebuilt tree+AH shards reuse the memory's index template (memory.index.template), so they still merge."""
    from tests.memory.helpers import ENCODER, clustered
    x, q = clustered(3000, 32, centres=30, noise=0.3, seed=3, nq=40)
    ids = [f"t{i:05d}" for i in range(3000)]
    root = str(tmp_path / "m")
    build_memory_local(root, ids=ids, labels=[f"c{i % 4}" for i in range(3000)], uris=[""] * 3000, embeddings=x,
                       num_shards=3, index_config=IndexConfig(kind=IndexKind.TREE_AH, training_sample_size=1500),
                       encoder_identity=ENCODER)
    template = read_manifest(root).build_config["index_template"]
    gone = [i for i in ids if shard_for_id(i, 3) == 0][:40]
    mutations.forget(root, ids=gone)
    assert reindex_cli.main(["--memory", root]) == EXIT_OK
    assert "rebuilt 1: shard-00000-of-00003" in capsys.readouterr().out
    new = read_manifest(root)
    assert new.build_config["index_template"] == template and new.change["kind"] == "reindex"
    mem = VisualMemory.open(root)
    assert mem.searched_as == [tuple(s.name for s in new.shards)]
    full = mem.with_search_params(leaves_fraction=1.0, reorder=3000).search(q, 10)
    from memory.search.tuning import exact_search
    np.testing.assert_array_equal(full.ids, exact_search(mem, q, 10)[0])
    assert not set(gone) & set(full.ids.ravel().tolist())
