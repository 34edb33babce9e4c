"""Every shard file is checked against the manifest's size and crc32c as it is loaded (memory.store.integrity)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.search.shard_search import LoadedShard
from memory.store.integrity import ShardCorruptError, crc32c_hex, with_file_records
from memory.store.manifest import Manifest, ManifestError
from memory.store.shard import read_shard_data, read_shard_entries
from memory.store.versions import read_manifest
from memory.vectors import l2_normalize
from memory.visual_memory import VisualMemory
from tests.memory.helpers import strip_file_records

D = 16
ENC = {"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}


def _build(root: str, kind: IndexKind, n: int = 400) -> tuple[Manifest, np.ndarray, list[str]]:
    rng = np.random.default_rng(29)
    x = l2_normalize(rng.normal(size=(n, D))).astype(np.float32)
    ids = [f"e-{i:05d}" for i in range(n)]
    manifest = build_memory_local(root, ids=ids, labels=[("ant", "bee", "cat")[i % 3] for i in range(n)],
                                  uris=[f"gs://b/{i}.png" for i in ids], embeddings=x, num_shards=2,
                                  index_config=IndexConfig(kind=kind, num_leaves=8), encoder_identity=ENC)
    return manifest, x, ids


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tree+AH memory (two shards from one template, opened as one merged index) and one brute-force."""
    out = {}
    for kind in (IndexKind.TREE_AH, IndexKind.BRUTE_FORCE):
        root = str(tmp_path_factory.mktemp(kind.value) / "mem")
        out[kind] = (root,) + _build(root, kind)
    return out


def _copy(src: str, dst) -> str:
    import shutil
    shutil.copytree(src, str(dst))
    return str(dst)


def _flip_last_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x01]))


def test_build_records_every_file_of_every_shard(built):
    for root, manifest, _, _ in built.values():
        for info in manifest.shards:
            shard_dir = os.path.join(root, info.path)
            on_disk = sorted(os.path.relpath(p, shard_dir).replace(os.sep, "/")
                             for p in glob.glob(os.path.join(shard_dir, "**", "*"), recursive=True) if os.path.isfile(p))
            assert [f.name for f in info.files] == on_disk
            for f in info.files:
                blob = open(os.path.join(shard_dir, *f.name.split("/")), "rb").read()
                assert (f.size, f.crc32c) == (len(blob), crc32c_hex(blob))
        assert read_manifest(root) == manifest  # Recorded in the published version and read back.


@pytest.mark.parametrize("kind", [IndexKind.TREE_AH, IndexKind.BRUTE_FORCE])
def test_a_flipped_byte_in_any_shard_file_is_refused_naming_shard_and_file(built, kind, tmp_path):
    src, manifest, _, _ = built[kind]
    info = manifest.shards[1]
    names = [f.name for f in info.files]
    assert "entries.parquet" in names and "scann/dataset.npy" in names  # ids, labels, uris; embeddings.
    for rel in names:
        root = _copy(src, tmp_path / rel.replace("/", "_"))
        _flip_last_byte(os.path.join(root, info.path, *rel.split("/")))
        with pytest.raises(ShardCorruptError) as e:
            VisualMemory.open(root)
        message = str(e.value)
        assert f"shard {info.name}: file {rel} at " in message
        assert "has crc32c" in message and "nothing of shard" in message and "--no-verify" in message


def test_shifted_rows_of_the_embeddings_are_refused_and_would_change_answers(built, tmp_path):
    src, manifest, x, ids = built[IndexKind.BRUTE_FORCE]
    root = _copy(src, tmp_path / "mem")
    info = manifest.shards[0]
    path = os.path.join(root, info.path, "scann", "dataset.npy")
    before = os.path.getsize(path)
    np.save(path, np.roll(np.load(path), 1, axis=0))  # A valid .npy of the same shape: only a checksum tells.
    assert os.path.getsize(path) == before
    with pytest.raises(ShardCorruptError, match=f"shard {info.name}: file scann/dataset.npy .*has crc32c"):
        VisualMemory.open(root)
    with pytest.raises(ShardCorruptError, match="scann/dataset.npy"):
        LoadedShard.load(root, info)  # The job workers' loader.
    with pytest.raises(ShardCorruptError, match="scann/dataset.npy"):
        read_shard_data(os.path.join(root, info.path), info)  # Re-index, prune and export read rows this way.
    unchecked = VisualMemory.open(root, verify=False)  # Accepting the risk: it opens, and answers are wrong.
    stored = np.asarray(read_shard_entries(os.path.join(root, info.path)).ids)
    row = ids.index(str(stored[5]))
    assert unchecked.search(x[row:row + 1], 1).ids[0, 0] != ids[row]
    assert VisualMemory.open(src).search(x[row:row + 1], 1).ids[0, 0] == ids[row]


def test_a_reload_after_open_is_checked_too(built, tmp_path):
    src, manifest, x, ids = built[IndexKind.BRUTE_FORCE]
    root = _copy(src, tmp_path / "mem")
    memory = VisualMemory.open(root)
    _flip_last_byte(os.path.join(root, manifest.shards[0].path, "scann", "dataset.npy"))
    with pytest.raises(ShardCorruptError, match="scann/dataset.npy"):
        memory.get_embeddings(ids[:1])  # Read lazily, after open: checked like the files read at open.


def test_missing_extra_and_resized_files_are_refused(built, tmp_path):
    src, manifest, _, _ = built[IndexKind.TREE_AH]
    info = manifest.shards[0]
    root = _copy(src, tmp_path / "missing")
    os.remove(os.path.join(root, info.path, "scann", "hashed_dataset.npy"))
    with pytest.raises(ShardCorruptError, match="file scann/hashed_dataset.npy at .* is missing"):
        VisualMemory.open(root)
    root = _copy(src, tmp_path / "extra")
    with open(os.path.join(root, info.path, "scann", "notes.txt"), "w") as f:
        f.write("x")
    with pytest.raises(ShardCorruptError, match="file scann/notes.txt at .* is not recorded in the manifest"):
        VisualMemory.open(root)
    root = _copy(src, tmp_path / "longer")
    with open(os.path.join(root, info.path, "entries.parquet"), "ab") as f:
        f.write(b"\0")
    size = next(f.size for f in info.files if f.name == "entries.parquet")
    with pytest.raises(ShardCorruptError, match=f"file entries.parquet at .* has {size + 1} bytes, the manifest "
                                                f"says {size}"):
        VisualMemory.open(root)


def test_a_memory_without_file_records_opens_checked_by_its_whole_shard_checksum(built, tmp_path):
    src, _, x, ids = built[IndexKind.TREE_AH]
    root = _copy(src, tmp_path / "old")
    strip_file_records(root)
    old = read_manifest(root)
    assert all(not s.files for s in old.shards) and "files" not in open(os.path.join(root, "manifest.json")).read()
    expected = VisualMemory.open(src).search(x[:5], 3).ids
    np.testing.assert_array_equal(VisualMemory.open(root).search(x[:5], 3).ids, expected)
    # Records computed for it equal what the build recorded (what a re-index writes into the new version).
    assert [with_file_records(os.path.join(root, s.path), s) for s in old.shards] == list(read_manifest(src).shards)
    _flip_last_byte(os.path.join(root, old.shards[1].path, "scann", "dataset.npy"))
    with pytest.raises(ShardCorruptError, match=f"shard {old.shards[1].name} at .*checksum mismatch.*--no-verify"):
        VisualMemory.open(root)
    with pytest.raises(ShardCorruptError, match="checksum mismatch"):
        with_file_records(os.path.join(root, old.shards[1].path), old.shards[1])  # Never records altered files.
    VisualMemory.open(root, verify=False)


@pytest.mark.parametrize("bad, match", [
    ({"crc32c": "XYZ"}, "crc32c': expected 8 lowercase hex digits"),
    ({"size": -1}, "size': expected an int >= 0"),
    ({"name": "../x"}, "must be a path relative to the shard"),
])
def test_manifest_refuses_malformed_file_records(built, bad, match):
    _, manifest, _, _ = built[IndexKind.BRUTE_FORCE]
    d = manifest.to_dict()
    d["shards"][0]["files"][0].update(bad)
    with pytest.raises(ManifestError, match=match):
        Manifest.from_json(json.dumps(d))


def test_format_1_arrays_are_checked_by_the_whole_shard_checksum(tmp_path):
    """A format-1 shard (embeddings, ids, labels, uris as .npy) has no per-file records: a changed array is
    refused by its whole-shard checksum, whichever array it is."""
    import dataclasses
    import hashlib
    import io
    import shutil

    from memory.store.shard import ShardData, write_shard
    rng = np.random.default_rng(3)
    data = ShardData(ids=np.array([f"e{i:03d}" for i in range(40)]), labels=np.arange(40, dtype=np.int32) % 3,
                     uris=np.array([f"/u/{i}" for i in range(40)]),
                     embeddings=l2_normalize(rng.normal(size=(40, D))).astype(np.float32))
    src = tmp_path / "src"
    info = write_shard(str(src), data, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), name="old",
                       root_relative_path="old")
    os.remove(src / "entries.parquet")
    h = hashlib.sha256()
    for name in ("embeddings", "ids", "labels", "uris"):
        buf = io.BytesIO()
        np.save(buf, getattr(data, name), allow_pickle=False)
        (src / f"{name}.npy").write_bytes(buf.getvalue())
        h.update(buf.getvalue())
    legacy = dataclasses.replace(info, checksum="sha256:" + h.hexdigest(), files=())
    np.testing.assert_array_equal(read_shard_data(str(src), legacy).ids, data.ids)
    for name in ("embeddings", "ids", "labels", "uris"):
        shard_dir = tmp_path / name
        shutil.copytree(src, shard_dir)
        _flip_last_byte(str(shard_dir / f"{name}.npy"))
        with pytest.raises(ShardCorruptError, match="shard old at .*checksum mismatch"):
            read_shard_data(str(shard_dir), legacy)
        read_shard_entries(str(shard_dir), legacy, verify=False)  # Accepting the risk reads it.


def test_open_takes_the_sums_of_a_child_summing_ahead_and_refuses_what_it_finds(built, tmp_path, monkeypatch):
    """VisualMemory.open has a child process sum large ScaNN files ahead (integrity.summed_ahead); the checks use
    its sums (nothing is summed again here) and a flipped byte is refused as before."""
    from memory.store import integrity
    src, manifest, _, _ = built[IndexKind.TREE_AH]
    monkeypatch.setattr(integrity, "SUM_AHEAD_MIN_BYTES", 0)  # A small memory is summed here by default.
    got = []
    real_get = integrity._SumsAhead.get

    def get(self, path):
        found = real_get(self, path)
        got.append((path, found))
        return found

    monkeypatch.setattr(integrity._SumsAhead, "get", get)
    VisualMemory.open(src)
    scann_files = integrity.local_index_files([os.path.join(src, i.path) for i in manifest.shards], manifest.shards)
    assert scann_files and [p for p, _ in got] == scann_files and all(f is not None for _, f in got)
    for path, (size, crc) in got:
        blob = open(path, "rb").read()
        assert (size, crc) == (len(blob), crc32c_hex(blob))
    root = _copy(src, tmp_path / "flipped")
    rel = "scann/dataset.npy"
    _flip_last_byte(os.path.join(root, manifest.shards[1].path, *rel.split("/")))
    with pytest.raises(ShardCorruptError, match=f"shard {manifest.shards[1].name}: file {rel} at .*has crc32c"):
        VisualMemory.open(root)


def test_a_child_that_fails_leaves_the_sums_to_this_process(built, tmp_path, monkeypatch):
    from memory.store import integrity
    src, manifest, _, _ = built[IndexKind.TREE_AH]
    monkeypatch.setattr(integrity, "SUM_AHEAD_MIN_BYTES", 0)
    monkeypatch.setattr(integrity, "_SUM_PROGRAM", "import sys; sys.exit(3)")
    root = _copy(src, tmp_path / "flipped")
    rel = "scann/dataset.npy"
    _flip_last_byte(os.path.join(root, manifest.shards[0].path, *rel.split("/")))
    with pytest.raises(ShardCorruptError, match=f"shard {manifest.shards[0].name}: file {rel} at .*has crc32c"):
        VisualMemory.open(root)
    assert len(VisualMemory.open(src)) == sum(i.count for i in manifest.shards)
