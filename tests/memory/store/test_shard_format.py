"""Shard format 2: one embedding copy (ScaNN's), Parquet entry table, checksums over every file, no pickles."""

import io
import os

import numpy as np
import pytest

from memory import storage
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.manifest import ManifestError
from memory.store.integrity import verify_shard
from memory.store.shard import (ShardData, load_shard_index, read_shard_data, read_shard_entries, read_shard_ids,
                                write_shard)
from tests.memory.helpers import clustered


def _data(n=300, d=32, seed=0):
    x, _ = clustered(n, d, centres=6, noise=0.5, seed=seed)
    ids = np.array([f"id-{i:05d}" for i in range(n)])[::-1]  # Unsorted on purpose.
    uris = np.array([f"/data/images/class-{i % 3}/very/long/path/{'x' * (i % 40)}/{i}.png" for i in range(n)])
    return ShardData(ids=ids, labels=np.arange(n, dtype=np.int32) % 3, uris=uris, embeddings=x)


@pytest.mark.parametrize("kind", [IndexKind.BRUTE_FORCE, IndexKind.TREE_AH])
@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("bfloat16", 5e-3), ("int8", 2e-2)])
def test_round_trip_keeps_one_embedding_copy(tmp_path, kind, dtype, tol):
    data = _data()
    shard_dir = str(tmp_path / "s")
    info = write_shard(shard_dir, data, index_config=IndexConfig(kind=kind, embedding_dtype=dtype), name="s",
                       root_relative_path="s")
    files = sorted(os.listdir(shard_dir))
    assert files == ["entries.parquet", "scann"]  # No embeddings.npy beside ScaNN's rows.
    back = read_shard_data(shard_dir)
    order = np.argsort(data.ids)
    np.testing.assert_array_equal(back.ids, data.ids[order])
    np.testing.assert_array_equal(back.labels, data.labels[order])
    np.testing.assert_array_equal(back.uris, data.uris[order])
    assert back.embeddings.dtype == np.float32
    err = np.abs(back.embeddings - data.embeddings[order]).max()
    assert err <= tol and (tol == 0 or err > 0)  # Exact only when stored as float32.
    np.testing.assert_allclose(np.linalg.norm(back.embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(read_shard_ids(shard_dir), data.ids[order])
    verify_shard(shard_dir, info)
    index = load_shard_index(shard_dir, info)
    found, _ = index.search(back.embeddings[:20], 1)
    assert (found[:, 0] == np.arange(20)).mean() >= 0.95


def test_quantised_storage_is_smaller(tmp_path):
    data = _data(n=2000, d=64)
    sizes = {}
    for dtype in ("float32", "bfloat16", "int8"):
        d = str(tmp_path / dtype)
        write_shard(d, data, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE, embedding_dtype=dtype), name=dtype,
                    root_relative_path=dtype)
        sizes[dtype] = os.path.getsize(os.path.join(d, "scann", {"float32": "dataset.npy",
                                                                 "bfloat16": "bfloat16_dataset.npy",
                                                                 "int8": "int8_dataset.npy"}[dtype]))
    assert sizes["bfloat16"] < 0.55 * sizes["float32"] and sizes["int8"] < 0.3 * sizes["float32"]


def test_strings_are_not_fixed_width(tmp_path):
    data = _data(n=1000)
    # One long uri must not widen every row (as UTF-32 .npy: 1000 x 2001 x 4 bytes = 8 MB).
    data.uris = np.array(["/" + "u" * 2000] + data.uris[1:].tolist())
    write_shard(str(tmp_path / "s"), data, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), name="s",
                root_relative_path="s")
    assert os.path.getsize(tmp_path / "s" / "entries.parquet") < 100_000
    assert read_shard_entries(str(tmp_path / "s")).uris.tolist().count("/" + "u" * 2000) == 1


def test_checksum_covers_index_files_and_pickles_are_refused(tmp_path):
    shard_dir = tmp_path / "s"
    info = write_shard(str(shard_dir), _data(), index_config=IndexConfig(kind=IndexKind.TREE_AH), name="s",
                       root_relative_path="s")
    codes = shard_dir / "scann" / "hashed_dataset.npy"
    original = codes.read_bytes()
    arr = np.load(io.BytesIO(original))
    arr[0] ^= 1
    np.save(codes, arr)
    with pytest.raises(ManifestError, match="checksum mismatch"):
        verify_shard(str(shard_dir), info)
    codes.write_bytes(original)
    verify_shard(str(shard_dir), info)
    (shard_dir / "scann" / "scann_docids.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ManifestError, match=r"pickle file\(s\) \['scann/scann_docids.pkl'\]"):
        verify_shard(str(shard_dir), info)
    with pytest.raises(ManifestError, match="pickle"):
        load_shard_index(str(shard_dir), info)  # Refused before ScaNN could unpickle it.


def test_empty_shard_records_its_dim(tmp_path):
    empty = ShardData(ids=np.array([], str), labels=np.zeros(0, np.int32), uris=np.array([], str),
                      embeddings=np.zeros((0, 32), np.float32))
    info = write_shard(str(tmp_path / "e"), empty, index_config=IndexConfig(), name="e", root_relative_path="e")
    assert info.count == 0 and load_shard_index(str(tmp_path / "e"), info) is None
    assert read_shard_data(str(tmp_path / "e")).embeddings.shape == (0, 32)
    verify_shard(str(tmp_path / "e"), info)


def test_format_1_shards_are_still_read(tmp_path):
    """A shard written by format 1 (.npy arrays + scann/) loads, verifies and searches unchanged."""
    data = _data(n=100).sorted_by_id()
    shard_dir = tmp_path / "old"
    info = write_shard(str(shard_dir), data, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), name="old",
                       root_relative_path="old")
    os.remove(shard_dir / "entries.parquet")
    import hashlib
    h = hashlib.sha256()
    for name, arr in [("embeddings", data.embeddings), ("ids", data.ids), ("labels", data.labels),
                      ("uris", data.uris)]:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        (shard_dir / f"{name}.npy").write_bytes(buf.getvalue())
        h.update(buf.getvalue())
    legacy = info.__class__(**{**info.__dict__, "checksum": "sha256:" + h.hexdigest()})
    verify_shard(str(shard_dir), legacy)
    back = read_shard_data(str(shard_dir))
    np.testing.assert_array_equal(back.ids, data.ids)
    np.testing.assert_array_equal(back.embeddings, data.embeddings)
    assert storage.exists(str(shard_dir / "scann"))


def test_entry_tables_read_ids_labels_and_packed_uris_once_and_check_the_count(tmp_path):
    """What VisualMemory.open reads of every shard: the entry table's three columns, the uris packed."""
    import dataclasses
    from memory.store.shard import read_entry_tables
    data = _data(n=100).sorted_by_id()
    dirs, infos = [], []
    for name, part in (("a", slice(0, 60)), ("b", slice(60, 100))):
        shard = ShardData(data.ids[part], data.labels[part], data.uris[part], data.embeddings[part])
        dirs.append(str(tmp_path / name))
        infos.append(write_shard(dirs[-1], shard, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), name=name,
                                 root_relative_path=name))
    tables = read_entry_tables(dirs, infos, num_classes=3)
    np.testing.assert_array_equal(np.concatenate(tables.ids), data.ids)
    np.testing.assert_array_equal(np.concatenate(tables.labels), data.labels)
    assert tables.uris.to_numpy().tolist() == data.uris.tolist()
    assert tables.uris.nbytes < data.uris.nbytes / 3  # UTF-8 + offsets, not fixed-width UTF-32.
    wrong = [infos[0], dataclasses.replace(infos[1], count=41)]
    with pytest.raises(ManifestError, match=r"shard b: files hold 40 entries and 40 uris, manifest says 41"):
        read_entry_tables(dirs, wrong, num_classes=3, verify=False)
