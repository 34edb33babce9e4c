"""On-disk layout of one shard.

A shard directory holds::

  embeddings.npy  float32 [n, d], unit rows
  ids.npy         unicode [n], unique, sorted ascending
  labels.npy      int32 [n], indices into Manifest.class_names
  uris.npy        unicode [n], where each entry came from
  scann/          the serialised ShardIndex (absent for an empty shard)

Rows are sorted by id so the same entries give byte-identical files (and checksum) whatever order a
distributed build delivered them in, and so ScaNN's tie order (ascending row) is ascending id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile

import numpy as np

from memory import storage
from memory.index import IndexConfig, ShardIndex
from memory.manifest import ManifestError, ShardInfo

ARRAY_NAMES = ("embeddings", "ids", "labels", "uris")  # Also the checksum order.
SCANN_DIR = "scann"
EMPTY_KIND = "empty"
# Rows must already be unit length; this tolerance admits float32 round-off only.
_UNIT_NORM_TOL = 1e-3


@dataclasses.dataclass
class ShardData:
    """The entries of one shard (row i of every array describes entry i).

    Attributes:
      ids: unicode [n] entry ids.
      labels: int32 [n] indices into the memory's class_names.
      uris: unicode [n] source URIs.
      embeddings: float32 [n, d] unit rows.
    """
    ids: np.ndarray
    labels: np.ndarray
    uris: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def validated(self, *, where: str = "shard") -> ShardData:
        """Returns a copy with canonical dtypes; raises ValueError naming the problem."""
        ids = np.asarray(self.ids)
        uris = np.asarray(self.uris)
        if ids.size == 0:
            ids = ids.astype("<U1")
        if uris.size == 0:
            uris = uris.astype("<U1")
        if ids.dtype.kind != "U" or uris.dtype.kind != "U":
            raise ValueError(f"{where}: ids and uris must be unicode string arrays, got {ids.dtype} and {uris.dtype}")
        labels = np.asarray(self.labels)
        if labels.size and labels.dtype.kind not in "iu":
            raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int32)
        emb = np.asarray(self.embeddings, dtype=np.float32)
        n = ids.shape[0]
        if ids.ndim != 1 or labels.shape != (n,) or uris.shape != (n,) or emb.ndim != 2 or emb.shape[0] != n:
            raise ValueError(
                f"{where}: inconsistent shapes ids {ids.shape}, labels {labels.shape}, uris {uris.shape}, "
                f"embeddings {emb.shape}; expected [n], [n], [n], [n, d]")
        if n:
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"{where}: duplicate id(s) {uniq[counts > 1][:10].tolist()}; ids must be unique")
            if (labels < 0).any():
                raise ValueError(f"{where}: negative label at row {int(np.flatnonzero(labels < 0)[0])}")
            norms = np.linalg.norm(emb.astype(np.float64), axis=1)
            bad = np.flatnonzero(~(np.abs(norms - 1.0) <= _UNIT_NORM_TOL))
            if bad.size:
                raise ValueError(
                    f"{where}: embedding row {int(bad[0])} has norm {norms[bad[0]]!r}; rows must be unit length "
                    "(use memory.vectors.l2_normalize)")
        return ShardData(ids=ids, labels=labels, uris=uris, embeddings=np.ascontiguousarray(emb))

    def sorted_by_id(self) -> ShardData:
        order = np.argsort(self.ids, kind="stable")
        return ShardData(ids=self.ids[order], labels=self.labels[order], uris=self.uris[order],
                         embeddings=np.ascontiguousarray(self.embeddings[order]))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _checksum(blobs: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in ARRAY_NAMES:
        h.update(blobs[name])
    return "sha256:" + h.hexdigest()


def write_shard(shard_dir: str, data: ShardData, *, index_config: IndexConfig, name: str,
                root_relative_path: str) -> ShardInfo:
    """Writes one shard (arrays + ScaNN index) and returns its manifest entry.

    Everything is first written to a local temporary directory (ScaNN cannot serialise to ``gs://``), then
    copied to ``shard_dir``; re-running with the same data overwrites the same files with the same bytes,
    so a retried Beam bundle is harmless.

    Args:
      shard_dir: Destination directory, local or ``gs://``.
      data: The shard's entries, in any order.
      index_config: How to build the ScaNN index.
      name: Shard name for the manifest (e.g. ``shard-00003-of-00016``).
      root_relative_path: shard_dir relative to the memory root, recorded in the manifest.

    Returns:
      The ShardInfo to put in the manifest.
    """
    data = data.validated(where=f"shard {name}").sorted_by_id()
    blobs = {
        "embeddings": _npy_bytes(data.embeddings),
        "ids": _npy_bytes(data.ids),
        "labels": _npy_bytes(data.labels),
        "uris": _npy_bytes(data.uris),
    }
    n = len(data)
    with tempfile.TemporaryDirectory(prefix="vmem-shard-") as tmp:
        for array_name, blob in blobs.items():
            with open(os.path.join(tmp, array_name + ".npy"), "wb") as f:
                f.write(blob)
        if n:
            index = ShardIndex.build(data.embeddings, index_config)
            index.save(os.path.join(tmp, SCANN_DIR))
            kind = index.kind.value
        else:
            kind = EMPTY_KIND
        # A stale scann/ from an earlier build of a different size would mix files from two searchers.
        storage.remove_tree(storage.join(shard_dir, SCANN_DIR))
        storage.makedirs(shard_dir)
        storage.upload_dir(tmp, shard_dir)
    return ShardInfo(name=name, path=root_relative_path, count=n, checksum=_checksum(blobs), index_kind=kind)


def _load_npy(blob: bytes, path: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except ValueError as e:
        raise ManifestError(f"cannot read {path}: {e}") from None


def read_shard_data(shard_dir: str) -> ShardData:
    """Reads a shard's arrays (local or ``gs://``)."""
    arrays = {}
    for array_name in ARRAY_NAMES:
        path = storage.join(shard_dir, array_name + ".npy")
        arrays[array_name] = _load_npy(storage.read_bytes(path), path)
    return ShardData(ids=arrays["ids"], labels=arrays["labels"], uris=arrays["uris"],
                     embeddings=arrays["embeddings"])


def load_shard_index(shard_dir: str, info: ShardInfo) -> ShardIndex | None:
    """Loads a shard's ScaNN index; None for an empty shard."""
    if info.index_kind == EMPTY_KIND:
        return None
    scann_dir = storage.join(shard_dir, SCANN_DIR)
    if not storage.exists(scann_dir):
        raise ManifestError(f"shard {info.name}: index directory {scann_dir} missing")
    index = ShardIndex.load(storage.local_copy(scann_dir))
    if len(index) != info.count or index.kind.value != info.index_kind:
        raise ManifestError(
            f"shard {info.name}: index at {scann_dir} has {len(index)} entries of kind {index.kind.value}, "
            f"manifest says {info.count} of kind {info.index_kind}")
    return index


def verify_shard(shard_dir: str, info: ShardInfo) -> None:
    """Recomputes the shard checksum.

    Raises:
      ManifestError: naming the shard, when files are missing or the checksum differs from the manifest.
    """
    blobs = {}
    for array_name in ARRAY_NAMES:
        path = storage.join(shard_dir, array_name + ".npy")
        try:
            blobs[array_name] = storage.read_bytes(path)
        except FileNotFoundError:
            raise ManifestError(f"shard {info.name}: file {path} missing") from None
    actual = _checksum(blobs)
    if actual != info.checksum:
        raise ManifestError(
            f"shard {info.name} at {shard_dir}: checksum mismatch (manifest {info.checksum}, files {actual}); "
            "the shard was modified or partially written after the build; rebuild the memory")
