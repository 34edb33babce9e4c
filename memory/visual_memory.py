"""A visual memory opened for querying: manifest + every shard's index, ids and labels."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from memory import storage
from memory.index import ShardIndex
from memory.manifest import Manifest, ManifestError, read_manifest
from memory.merge import merge_topk
from memory.shard import load_shard_index, read_shard_data, verify_shard
from memory.vectors import l2_normalize

_PAD_ID = ""


class SearchResult(NamedTuple):
    """Neighbours of each query, nearest first.

    Attributes:
      ids: unicode [nq, k] entry ids ("" for padding when k exceeds the memory size).
      labels: int32 [nq, k] indices into class_names (-1 for padding).
      distances: float32 [nq, k] cosine distances 1 - dot (+inf for padding).
    """
    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray


class VisualMemory:
    """A read-only visual memory (local directory or ``gs://``), searched exactly across shards.

    Open with `VisualMemory.open(path)`. All shards are loaded eagerly (ScaNN index, ids, labels) so that
    search latency does not include I/O; embeddings are read lazily, only for `get_embeddings`.
    """

    def __init__(self, root: str, manifest: Manifest, indices: Sequence[ShardIndex | None],
                 ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self._root = root
        self._manifest = manifest
        self._indices = list(indices)
        self._ids = ids
        self._labels = labels
        self._offsets = offsets
        self._row_of_id: dict[str, int] | None = None
        self._embeddings: np.ndarray | None = None

    @classmethod
    def open(cls, path: str, *, verify: bool = False) -> VisualMemory:
        """Opens a memory.

        Args:
          path: Memory root (the directory holding manifest.json), local or ``gs://``.
          verify: Recompute every shard's checksum against the manifest (reads all embeddings).

        Returns:
          The opened memory.

        Raises:
          ManifestError: no manifest ("not a visual memory: ..."), unsupported format_version, malformed
            manifest, missing shard files or (with verify) a checksum mismatch.
        """
        root = path.rstrip("/") if len(path) > 1 else path
        manifest = read_manifest(root)
        indices, ids, labels, offsets = [], [], [], [0]
        for info in manifest.shards:
            shard_dir = storage.join(root, info.path)
            if verify:
                verify_shard(shard_dir, info)
            try:
                data = read_shard_data(shard_dir)
            except FileNotFoundError as e:
                raise ManifestError(f"shard {info.name}: {e}") from None
            if len(data) != info.count or (info.count and data.embeddings.shape[1] != manifest.dim):
                raise ManifestError(
                    f"shard {info.name}: files hold {len(data)} entries of shape {data.embeddings.shape}, manifest "
                    f"says {info.count} of dim {manifest.dim}")
            if info.count and int(data.labels.max()) >= len(manifest.class_names):
                raise ManifestError(f"shard {info.name}: label {int(data.labels.max())} outside class_names")
            indices.append(load_shard_index(shard_dir, info))
            ids.append(data.ids.astype(str))
            labels.append(data.labels.astype(np.int32))
            offsets.append(offsets[-1] + info.count)
        all_ids = np.concatenate(ids) if ids else np.zeros((0,), dtype="<U1")
        all_labels = np.concatenate(labels) if labels else np.zeros((0,), dtype=np.int32)
        return cls(root, manifest, indices, all_ids, all_labels, np.asarray(offsets, dtype=np.int64))

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._manifest.class_names

    @property
    def encoder_identity(self) -> dict:
        """The encoder that built the memory; queries must be embedded with the same one."""
        return dict(self._manifest.encoder)

    @property
    def dim(self) -> int:
        return self._manifest.dim

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Finds the k nearest memory entries of each query across all shards.

        Args:
          queries: [nq, dim] query embeddings (L2-normalised here).
          k: Neighbours per query, >= 1; when k exceeds len(self) the tail is padded.

        Returns:
          SearchResult, nearest first; equal distances ordered by ascending id, so the answer does not
          depend on the number of shards.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(
                f"queries must have shape [nq, {self.dim}] (this memory's encoder "
                f"{self._manifest.encoder.get('name')!r} has dim {self.dim}), got {q.shape}; embed queries with "
                "the memory's encoder")
        q = l2_normalize(q) if q.shape[0] else q.astype(np.float32)
        nq = q.shape[0]
        partials, keys = [], []
        for s, index in enumerate(self._indices):
            if index is None:
                continue
            local, dist = index.search(q, k)
            glob = np.where(local >= 0, local + self._offsets[s], -1)
            partials.append((glob, dist))
            keys.append(np.where(glob >= 0, self._ids[np.maximum(glob, 0)] if len(self) else _PAD_ID, _PAD_ID))
        if not partials:
            return SearchResult(ids=np.full((nq, k), _PAD_ID, dtype="<U1"),
                                labels=np.full((nq, k), -1, dtype=np.int32),
                                distances=np.full((nq, k), np.inf, dtype=np.float32))
        gidx, dist = merge_topk(partials, k, tie_keys=keys)
        valid = gidx >= 0
        safe = np.maximum(gidx, 0)
        ids = np.where(valid, self._ids[safe], _PAD_ID)
        labels = np.where(valid, self._labels[safe], -1).astype(np.int32)
        return SearchResult(ids=ids, labels=labels, distances=dist)

    def _id_rows(self) -> dict[str, int]:
        if self._row_of_id is None:
            self._row_of_id = {i: r for r, i in enumerate(self._ids.tolist())}
        return self._row_of_id

    def get_embeddings(self, ids: Sequence[str]) -> np.ndarray:
        """Returns the stored float32 [len(ids), dim] embeddings of the given entries.

        Raises:
          KeyError: listing the unknown ids.
        """
        ids = [str(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        rows_of = self._id_rows()
        unknown = [i for i in ids if i not in rows_of]
        if unknown:
            raise KeyError(f"{len(unknown)} unknown id(s) (not in this memory): {unknown[:20]}")
        if self._embeddings is None:
            parts = [read_shard_data(storage.join(self._root, info.path)).embeddings.reshape(-1, self.dim)
                     for info in self._manifest.shards]
            self._embeddings = (np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)).astype(
                np.float32, copy=False)
        return self._embeddings[[rows_of[i] for i in ids]].reshape(len(ids), self.dim)

    def label_names(self, labels: np.ndarray) -> np.ndarray:
        """Maps label indices (any shape; -1 = padding) to class-name strings ("" for padding)."""
        labels = np.asarray(labels)
        names = np.asarray(self.class_names + ("",), dtype=str)
        # -1 indexes the trailing "" entry, which is exactly the padding name.
        if labels.size and (labels.max() >= len(self.class_names) or labels.min() < -1):
            raise ValueError(f"labels must be in [-1, {len(self.class_names) - 1}], got range "
                             f"[{labels.min()}, {labels.max()}]")
        return names[labels]
