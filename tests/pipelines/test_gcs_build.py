"""The build job with gs:// input and output, through a local GCS emulator (no cloud, no network).

Real Fashion-MNIST PNGs (plus one corrupt file) are uploaded to the emulator bucket; the job reads them
through Beam's GcsIO and writes shards, dead letters and the manifest back to the bucket. The memory is
then read back through the public API, the CLI and compared with a local build of the same images.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from memory import storage
from memory.store.versions import read_manifest
from memory.store.shard import read_shard_data
from memory.visual_memory import VisualMemory
from pipelines import build
from vmem import main as cli
from pipelines.records import FailedRecord
from tests.conftest import brute_force_topk

_CLASSES = 3
_PER_CLASS = 10
_CORRUPT = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10  # PNG signature, broken body.


@pytest.fixture()
def small_folder(fmnist_small, tmp_path) -> tuple[str, str]:
    """3 classes x 10 real PNGs plus one corrupt PNG inside the first class; returns (root, corrupt id)."""
    src = os.path.join(fmnist_small, "train")
    root = tmp_path / "imgs"
    classes = sorted(os.listdir(src))[:_CLASSES]
    for cls in classes:
        os.makedirs(root / cls)
        for name in sorted(os.listdir(os.path.join(src, cls)))[:_PER_CLASS]:
            shutil.copy(os.path.join(src, cls, name), root / cls / name)
    corrupt_id = f"{classes[0]}/corrupt.png"
    (root / corrupt_id).write_bytes(_CORRUPT)
    return str(root), corrupt_id


def _dead_letters(memory_dir: str) -> list[FailedRecord]:
    root = storage.join(memory_dir, "dead_letter")
    out = []
    for name in storage.list_dir(root):
        # Only the finalized files: WriteToText's beam-temp-* staging objects must be gone after the rename.
        assert name.endswith(".jsonl"), name
        out += [FailedRecord.from_json(line)
                for line in storage.read_text(storage.join(root, name)).splitlines() if line.strip()]
    return out


def test_build_from_and_to_gcs_matches_local_build(gcs_bucket, small_folder, tiny_encoder_config_file, tmp_path,
                                                   capsys):
    local_images, corrupt_id = small_folder
    gcs_images = storage.join(gcs_bucket, "build-test", "imgs")
    gcs_out = storage.join(gcs_bucket, "build-test", "mem")
    storage.remove_tree(storage.join(gcs_bucket, "build-test"))  # Session-scoped bucket: start clean.
    storage.upload_dir(local_images, gcs_images)
    local_out = str(tmp_path / "mem")

    build.run(["--images", gcs_images, "--output", gcs_out, "--config", tiny_encoder_config_file])
    build.run(["--images", local_images, "--output", local_out, "--config", tiny_encoder_config_file])

    manifest = read_manifest(gcs_out)
    local_manifest = read_manifest(local_out)
    n_valid = _CLASSES * _PER_CLASS
    c = manifest.counts
    assert (c.read, c.embedded, c.failed) == (n_valid + 1, n_valid, 1)
    assert c.read == c.embedded + c.failed
    assert c == local_manifest.counts
    assert manifest.class_names == local_manifest.class_names and len(manifest.class_names) == _CLASSES
    # uris (gs:// vs local) enter the checksums, so compare the layout and the stored columns instead.
    # Paths end in a per-attempt suffix (shards/<name>-<attempt>), different in every build.
    assert ([(s.name, s.path.rsplit("-", 1)[0], s.count, s.index_kind) for s in manifest.shards]
            == [(s.name, s.path.rsplit("-", 1)[0], s.count, s.index_kind) for s in local_manifest.shards])
    assert all(s.path.startswith(f"shards/{s.name}-") for s in manifest.shards)
    assert storage.list_dir(storage.join(gcs_out, "shards")) == sorted(s.path[len("shards/"):] for s in manifest.shards)
    for shard, local_shard in zip(manifest.shards, local_manifest.shards):
        a = read_shard_data(storage.join(gcs_out, shard.path))
        b = read_shard_data(os.path.join(local_out, local_shard.path))
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.embeddings, b.embeddings)
        assert all(u == storage.join(gcs_images, i) for u, i in zip(a.uris, a.ids))
    assert manifest.build_config["images"] == {"kind": "folder", "location": gcs_images}

    failures = _dead_letters(gcs_out)
    assert [(f.id, f.stage) for f in failures] == [(corrupt_id, "decode")]
    assert failures[0].uri == storage.join(gcs_images, corrupt_id) and failures[0].detail
    assert manifest.build_config["dead_letter_files"]
    assert all(p.startswith(f"{gcs_out}/dead_letter/") for p in manifest.build_config["dead_letter_files"])

    gcs_memory = VisualMemory.open(gcs_out, verify=True)
    local_memory = VisualMemory.open(local_out)
    assert len(gcs_memory) == len(local_memory) == n_valid
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(8, 48)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    a, b = gcs_memory.search(queries, 5), local_memory.search(queries, 5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.distances, b.distances)

    capsys.readouterr()
    assert cli.main(["info", gcs_out, "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"entries      {n_valid}" in out and f"read {n_valid + 1}, failed 1" in out
    assert "all shard checksums match" in out


def test_overwrite_on_gcs_replaces_the_memory_and_its_searchers(gcs_bucket, small_folder, tiny_encoder_config_file,
                                                                tmp_path):
    local_images, _ = small_folder
    out = storage.join(gcs_bucket, "overwrite-test", "mem")
    storage.remove_tree(storage.join(gcs_bucket, "overwrite-test"))
    build.run(["--images", local_images, "--output", out, "--config", tiny_encoder_config_file])
    first = VisualMemory.open(out)  # Caches this build's ScaNN searchers locally.
    assert len(first) == _CLASSES * _PER_CLASS
    with pytest.raises(FileExistsError, match="--overwrite"):
        build.run(["--images", local_images, "--output", out, "--config", tiny_encoder_config_file])

    # Same shard names, different content: the rebuilt memory holds only the last class.
    kept = sorted(os.listdir(local_images))[-1]
    other = tmp_path / "other"
    shutil.copytree(os.path.join(local_images, kept), other / kept)
    build.run(["--images", str(other), "--output", out, "--config", tiny_encoder_config_file, "--overwrite"])
    manifest = read_manifest(out)
    assert manifest.class_names == (kept,) and (manifest.counts.embedded, manifest.counts.failed) == (_PER_CLASS, 0)
    # The first build's dead letter (the corrupt file) went with the old memory.
    assert not storage.exists(storage.join(out, "dead_letter")) or not _dead_letters(out)

    second = VisualMemory.open(out)
    parts = [read_shard_data(storage.join(out, s.path)) for s in manifest.shards]
    ids = np.concatenate([p.ids for p in parts])
    emb = np.concatenate([p.embeddings for p in parts])
    rng = np.random.default_rng(1)
    queries = emb[rng.choice(len(emb), 4, replace=False)]
    res = second.search(queries, 3)
    true_idx, true_d = brute_force_topk(emb, queries, 3)
    np.testing.assert_array_equal(res.ids, ids[true_idx])
    np.testing.assert_allclose(res.distances, true_d, atol=1e-5)
