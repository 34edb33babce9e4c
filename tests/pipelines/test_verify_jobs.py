"""Every command that loads shards checks their files against the manifest by default and refuses a changed
file naming the shard and the file; ``--no-verify`` accepts the risk (memory.store.integrity)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from memory.store.versions import latest_version, read_manifest
from pipelines import build, evaluate, prune, reindex
from pipelines.add import job as add_job
from tests.memory.helpers import strip_file_records
from vmem import classify as classify_cli
from vmem import forget as forget_cli
from vmem import tune as tune_cli
from vmem.args import EXIT_FAILURE, EXIT_OK

DIM = 16


def _unit(rng, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clip_dir(root: str, keys, labels, emb) -> str:
    """clip-retrieval's layout, one part: img_emb/img_emb_0.npy + metadata/metadata_0.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(root, "img_emb"))
    os.makedirs(os.path.join(root, "metadata"))
    np.save(os.path.join(root, "img_emb", "img_emb_0.npy"), np.asarray(emb, np.float32))
    pq.write_table(pa.table({"key": list(keys), "label": list(labels), "image_path": [f"/imgs/{k}.jpg" for k in keys]}),
                   os.path.join(root, "metadata", "metadata_0.parquet"))
    return root


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A two-shard memory built by the build job from precomputed embeddings, and a query folder of the same
    encoder."""
    root = tmp_path_factory.mktemp("verify")
    rng = np.random.default_rng(2029)
    keys = [f"b{i:03d}" for i in range(160)]
    _clip_dir(str(root / "base"), keys, [f"c{i % 3}" for i in range(160)], _unit(rng, 160))
    _clip_dir(str(root / "queries"), [f"q{i:02d}" for i in range(12)], [f"c{i % 3}" for i in range(12)],
              _unit(rng, 12))
    memory = str(root / "mem")
    build.run([f"--embeddings=clip:{root / 'base'},label_column=label", "--encoder-id=x", f"--output={memory}",
               "--shards=2", "--runner=FnApiRunner"])
    return memory, str(root / "queries"), keys


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def _shift_rows(root: str, shard: int = 0) -> str:
    """Rewrites a shard's embeddings as a valid .npy of the same size with its rows shifted by one."""
    info = read_manifest(root).shards[shard]
    path = os.path.join(root, info.path, "scann", "dataset.npy")
    np.save(path, np.roll(np.load(path), 1, axis=0))
    return f"shard {info.name}: file scann/dataset.npy at "


def _relabel(root: str, shard: int = 0) -> str:
    """Rewrites a shard's entry table as a valid Parquet file with other labels (ids and uris unchanged)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    info = read_manifest(root).shards[shard]
    path = os.path.join(root, info.path, "entries.parquet")
    table = pq.read_table(path)
    labels = (table.column("label").to_numpy() + 1) % 3
    pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int32())), path)
    return f"shard {info.name}: file entries.parquet at "


def test_evaluate_workers_refuse_a_changed_shard_and_run_with_no_verify(pristine, tmp_path):
    src, queries, _ = pristine
    root = _copy(src, tmp_path / "mem")
    where = _shift_rows(root)
    argv = [f"--memory={root}", f"--embeddings=clip:{queries},label_column=label", "--encoder-id=x", "--k-max=5",
            "--runner=DirectRunner"]
    with pytest.raises(Exception, match=f"{where}.*has crc32c .*--no-verify") as e:
        evaluate.run(argv + [f"--output={tmp_path / 'e1'}"])
    assert isinstance(e.value, ValueError)  # ShardCorruptError, or the runner's re-raise of it: one clear line.
    assert not os.path.exists(tmp_path / "e1" / "evaluation-summary.json")
    evaluate.run(argv + [f"--output={tmp_path / 'e2'}", "--no-verify"])
    assert json.load(open(tmp_path / "e2" / "evaluation-summary.json"))


def test_prune_refuses_a_changed_shard_and_publishes_nothing(pristine, tmp_path):
    root = _copy(pristine[0], tmp_path / "mem")
    where = _shift_rows(root, 1)
    with pytest.raises(Exception, match=f"{where}.*has crc32c"):
        prune.run([f"--memory={root}", "--mode=soft", "--k=3", "--runner=DirectRunner"])
    assert latest_version(root) == 1
    prune.run([f"--memory={root}", "--mode=soft", "--k=3", "--runner=DirectRunner", "--no-verify"])
    assert latest_version(root) == 2


def test_add_refuses_a_changed_shard_and_publishes_nothing(pristine, tmp_path):
    root = _copy(pristine[0], tmp_path / "mem")
    where = _relabel(root)
    new = _clip_dir(str(tmp_path / "new"), ["n0", "n1"], ["c0", "c1"], _unit(np.random.default_rng(1), 2))
    argv = [f"--memory={root}", f"--embeddings=clip:{new},label_column=label", "--encoder-id=x",
            "--runner=DirectRunner"]
    with pytest.raises(Exception, match=f"{where}.*the manifest says"):
        add_job.run(argv)
    assert latest_version(root) == 1
    add_job.run(argv + ["--no-verify"])
    assert latest_version(root) == 2


def test_vmem_forget_refuses_a_changed_shard_unless_no_verify(pristine, tmp_path, capsys):
    src, _, keys = pristine
    root = _copy(src, tmp_path / "mem")
    where = _relabel(root, 1)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{keys[0]}\n")
    assert forget_cli.main(["--memory", root, "--ids", str(ids)]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert where in err and "--no-verify" in err and latest_version(root) == 1
    assert forget_cli.main(["--memory", root, "--ids", str(ids), "--no-verify"]) == EXIT_OK
    assert latest_version(root) == 2


def test_reindex_refuses_a_changed_shard_and_publishes_nothing(pristine, tmp_path):
    root = _copy(pristine[0], tmp_path / "mem")
    where = _relabel(root, 1)
    with pytest.raises(Exception, match=f"{where}.*the manifest says"):
        reindex.run([f"--memory={root}", "--runner=DirectRunner"])
    assert latest_version(root) == 1
    reindex.run([f"--memory={root}", "--runner=DirectRunner", "--no-verify"])
    assert latest_version(root) == 2


def test_vmem_tune_refuses_a_changed_shard(pristine, tmp_path, capsys):
    root = _copy(pristine[0], tmp_path / "mem")
    where = _shift_rows(root)
    assert tune_cli.main(["--memory", root, "--queries", str(tmp_path / "none.npy")]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert where in err and "--no-verify" in err


def test_vmem_classify_refuses_a_changed_shard_unless_no_verify(tiny_memory, fmnist_small, tmp_path, capsys):
    root = _copy(tiny_memory, tmp_path / "mem")
    where = _shift_rows(root)
    image = os.path.join(fmnist_small, "test", sorted(os.listdir(os.path.join(fmnist_small, "test")))[0])
    image = os.path.join(image, sorted(os.listdir(image))[0])
    assert classify_cli.main(["--memory", root, image]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert where in err and "has crc32c" in err and "--no-verify" in err
    assert classify_cli.main(["--memory", root, "--no-verify", image]) == EXIT_OK


def test_an_old_memory_opens_and_gets_file_records_on_reindex(pristine, tmp_path):
    from memory.store.mutations import forget
    from memory.visual_memory import VisualMemory
    src, _, keys = pristine
    root = _copy(src, tmp_path / "mem")
    strip_file_records(root)
    assert all(not s.files for s in read_manifest(root).shards)
    VisualMemory.open(root)
    forget(root, ids=[keys[0]])  # One shard changes; the other is reused as it is.
    reindex.run([f"--memory={root}", "--runner=DirectRunner"])
    new = read_manifest(root)
    assert new.version == 3 and sorted(new.change["reused"]) and new.change["rebuilt"]
    assert all(s.files for s in new.shards)
    reused = [s for s in new.shards if s.name in new.change["reused"]]
    assert reused and all(s.files == o.files for s in reused for o in read_manifest(src).shards if o.path == s.path)
    VisualMemory.open(root)
