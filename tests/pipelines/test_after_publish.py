"""A writer that fails after it published a version (re-index, forget --purge-history, add, prune) reports the
published version first, then what failed after it, in one message without a traceback (unless VMEM_DEBUG=1);
the memory is readable at the new version."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store import mutations
from memory.store.after_publish import AfterPublishError, after_publish, cause_text
from memory.store.sharding import shard_for_id
from memory.store.versions import latest_version, read_manifest
from memory.vectors import l2_normalize
from memory.visual_memory import VisualMemory
from pipelines import build
from pipelines.add import job as add_job
from pipelines.runner import after_publish_error
from vmem import main as cli

D = 8
ENC = {"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}
IDS = [f"e{i:03d}" for i in range(60)]


def _build(root: str) -> None:
    rng = np.random.default_rng(5)
    build_memory_local(root, ids=IDS, labels=[("ant", "bee", "cat")[i % 3] for i in range(60)],
                       uris=[f"/d/{i}.png" for i in IDS], embeddings=l2_normalize(rng.normal(size=(60, D))),
                       num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENC)


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _assert_published_first(err: str, command: str, root: str, version: int, step: str, cause: str) -> None:
    assert err.startswith(f"vmem {command}: error: published version {version} of {root} (readers get it now); "
                          f"then {step} failed: "), err
    assert re.search(cause, err), err
    assert "Traceback" not in err and "[while running" not in err and err.count("published version") == 1
    assert err.endswith("(set VMEM_DEBUG=1 for the traceback)\n")


@pytest.mark.parametrize("escape", ["orphan_dir", "purged_shard"])
def test_reindex_that_cannot_clean_up_reports_its_published_version_and_stays_readable(tmp_path, capsys,
                                                                                     monkeypatch, escape):
    root = str(tmp_path / "mem")
    outside = tmp_path / "outside"
    _build(root)
    in_shard0 = [i for i in IDS if shard_for_id(i, 2) == 0]
    if escape == "orphan_dir":
        # A directory named like a crashed re-index's, that is a link out of the memory.
        mutations.forget(root, ids=in_shard0[:4])
        outside.mkdir()
        os.makedirs(os.path.join(root, "shards"), exist_ok=True)
        os.symlink(outside, os.path.join(root, "shards", "r000001-deadbeef"))
        step, cause = ("removing orphan directories of crashed re-index runs",
                       r"refusing to delete 'shards/r000001-deadbeef' .* resolves to .*outside, outside the memory "
                       r"root")
    else:
        # A shard whose directory resolves outside the memory: the purge after the re-index must delete it.
        shard = read_manifest(root).shards[0]
        shutil.move(os.path.join(root, shard.path), outside)
        os.symlink(outside, os.path.join(root, shard.path))
        mutations.forget(root, ids=in_shard0[:4], request_purge=True)
        step, cause = (r"purging the history (a forget asked for --purge-history)",
                       rf"refusing to delete '{shard.path}' .* resolves to .*outside, outside the memory root")
    n = latest_version(root)
    code, err = _run(capsys, "reindex", "--memory", root)
    assert code == 1
    _assert_published_first(err, "reindex", root, n + 1, step, cause)
    assert os.path.exists(outside)  # Nothing outside the memory was deleted.
    memory = VisualMemory.open(root)
    assert memory.version == n + 1 and memory.manifest.change["kind"] == "reindex" and len(memory) == 56
    assert memory.manifest.forgotten is None
    assert not set(in_shard0[:4]) & set(memory.live_entry_ids().tolist())
    if escape != "orphan_dir":
        return
    # The link is still there, so the next re-index publishes and fails alike; VMEM_DEBUG=1 raises the error itself.
    monkeypatch.setenv("VMEM_DEBUG", "1")
    mutations.forget(root, ids=[in_shard0[5]])
    with pytest.raises(AfterPublishError, match=rf"^published version {n + 3} of "):
        cli.main(["reindex", "--memory", root])


def test_forget_whose_purge_fails_reports_the_forget_first(tmp_path, capsys):
    root = str(tmp_path / "mem")
    _build(root)
    mutations.publish_entry_weights(root, ids=["e000"], weights=np.array([0.5]), params={})
    # Version 2's weights file, replaced by version 3's, which the purge deletes, resolves outside the memory.
    weights = read_manifest(root).entry_weights.path
    mutations.publish_entry_weights(root, ids=["e001"], weights=np.array([0.5]), params={})
    outside = tmp_path / "weights-outside.npz"
    shutil.move(os.path.join(root, weights), outside)
    os.symlink(outside, os.path.join(root, weights))
    code, err = _run(capsys, "forget", "--memory", root, "--label", "bee", "--purge-history")
    assert code == 1
    _assert_published_first(err, "forget", root, 4, "purging the history (--purge-history)",
                            rf"refusing to delete '{weights}' .* outside the memory root.*run `vmem reindex`")
    memory = VisualMemory.open(root)
    assert memory.version == 4 and len(memory) == 60 - 20 and outside.exists()
    assert "bee" not in set(memory.label_names(memory.labels_of(memory.live_entry_ids())).tolist())


def test_prune_whose_summary_cannot_be_written_reports_the_prune_first(tmp_path, capsys, monkeypatch):
    from memory.decide import pruning
    root = str(tmp_path / "mem")
    _build(root)

    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(pruning, "write_summary", fail)
    code, err = _run(capsys, "prune", "--memory", root, "--mode", "soft", "--k", "5")
    assert code == 1
    _assert_published_first(err, "prune", root, 2, "writing the prune summary", r"disk full \(injected\)\. The prune "
                            r"is live")
    memory = VisualMemory.open(root)
    assert memory.version == 2 and memory.manifest.entry_weights is not None


def test_add_whose_clean_up_fails_reports_the_add_first(tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(3)

    def clip_dir(path, keys, labels):
        os.makedirs(os.path.join(path, "img_emb"))
        os.makedirs(os.path.join(path, "metadata"))
        np.save(os.path.join(path, "img_emb", "img_emb_0.npy"), l2_normalize(rng.normal(size=(len(keys), D))))
        pq.write_table(pa.table({"key": keys, "label": labels, "image_path": [f"/i/{k}.jpg" for k in keys]}),
                       os.path.join(path, "metadata", "metadata_0.parquet"))

    root = str(tmp_path / "mem")
    clip_dir(str(tmp_path / "base"), [f"b{i:02d}" for i in range(30)], ["a", "b", "c"] * 10)
    clip_dir(str(tmp_path / "new"), [f"n{i:02d}" for i in range(10)], ["a", "z"] * 5)
    build.run([f"--embeddings=clip:{tmp_path / 'base'},label_column=label", "--encoder-id=x", f"--output={root}",
               "--runner=FnApiRunner"])

    def fail(plan, manifest):
        raise PermissionError(f"cannot delete {plan.spill_dir} (injected)")

    monkeypatch.setattr(add_job, "remove_add_leftovers", fail)
    code, err = _run(capsys, "add", "--memory", root, f"--embeddings=clip:{tmp_path / 'new'},label_column=label",
                     "--encoder-id=x")
    assert code == 1
    _assert_published_first(err, "add", root, 2, "removing this add's spill files and abandoned delta shard attempts",
                            r"cannot delete .* \(injected\)\. The added entries are live")
    memory = VisualMemory.open(root)
    assert memory.version == 2 and len(memory) == 40 and "z" in memory.class_names


def test_after_publish_names_the_version_then_the_step_and_keeps_its_type_through_a_runner():
    with pytest.raises(AfterPublishError) as e:
        with after_publish(root="/m", version=7, step="removing spill files", fix="Re-run it."):
            raise FileNotFoundError("no such file: /m/x")
    assert str(e.value) == ("published version 7 of /m (readers get it now); then removing spill files failed: no "
                            "such file: /m/x. Re-run it.")
    # Beam re-raises a DoFn's error as type(e)(message + step): the type and the message survive.
    augmented = type(e.value)(e.value.args[0] + " [while running 'Publish']")
    assert str(augmented.without_runner_step()) == str(e.value)
    assert cause_text(KeyError("k")) == "KeyError: k" and cause_text(OSError("x [while running 'S']")) == "x"
    # A remote runner reports the worker's traceback as text: the error is found in it.
    text = ("Dataflow pipeline failed. State: FAILED, Error:\nTraceback (most recent call last):\n  File ...\n"
            f"memory.store.after_publish.AfterPublishError: {e.value} [while running 'Publish']\n")
    assert str(AfterPublishError.from_text(text)) == str(e.value)
    assert after_publish_error(RuntimeError(text)).args == e.value.args
    assert AfterPublishError.from_text("KeyError: 'x'") is None and after_publish_error(KeyError("x")) is None

