"""On-disk layout of one shard.

A shard directory holds::

  entries.parquet  one row per entry, sorted by id: id (string), label (int32 index into
                   Manifest.class_names), uri (string); schema metadata records dim and embedding_dtype
  scann/           the serialised ShardIndex (absent for an empty shard). Its dataset file is the shard's only
                   copy of the embeddings: dataset.npy (float32), bfloat16_dataset.npy or int8_dataset.npy,
                   row i = entry i of entries.parquet

ScaNN needs its rows to re-rank (tree+AH) or score (brute force) and keeps them in its own files, so a second
float copy beside it (format 1 wrote embeddings.npy) doubled the bytes per entry; `read_shard_data` recovers
the embeddings from the searcher's files instead. Strings live in Parquet (variable-length UTF-8, zstd), not
in fixed-width UTF-32 arrays whose width is set by the longest uri.

Rows are sorted by id so the same entries give byte-identical files whatever order a distributed build
delivered them in, and so ScaNN's tie order (ascending row) is ascending id.

The manifest records every file's size and crc32c (and a sha256 over the whole shard), and each read here
checks the files it loads against those records unless called with ``verify=False``
(`memory.store.integrity`). A shard never holds a pickle: one is refused before ScaNN sees the directory.

Format 1 shards (embeddings.npy, ids.npy, labels.npy, uris.npy + scann/) are still read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import tempfile
import typing
from collections.abc import Sequence

import numpy as np

from memory import storage
from memory.index.shard_index import (INDEX_META_NAME, EmbeddingDtype, IndexConfig, IndexKind, ShardIndex,
                                      rows_from_dataset_file)
from memory.store.integrity import ENTRIES_NAME, SCANN_DIR, ShardFiles, local_files, record_files, refuse_pickles
from memory.store.manifest import Manifest, ManifestError, ShardInfo
from memory.store.packed import PackedStrings
from memory.index.template import merge_runs
from memory.vectors import l2_normalize

_LOG = logging.getLogger(__name__)

EMPTY_KIND = "empty"
_INT8_MULTIPLIERS = "int8_multipliers.npy"
# Rows must already be unit length; this tolerance admits float32 round-off only.
_UNIT_NORM_TOL = 1e-3


def _row_norms(x: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Row L2 norms in float64, a chunk at a time (a float64 copy of a whole shard would double its bytes)."""
    out = np.empty(x.shape[0], np.float64)
    for start in range(0, x.shape[0], chunk):
        out[start:start + chunk] = np.linalg.norm(x[start:start + chunk].astype(np.float64), axis=1)
    return out


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

    @classmethod
    def empty(cls, dim: int) -> ShardData:
        """A shard with no entries (a hash bucket that got none still gets its shard)."""
        return cls(ids=np.zeros((0,), "<U1"), labels=np.zeros(0, np.int32), uris=np.zeros((0,), "<U1"),
                   embeddings=np.zeros((0, dim), np.float32))

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
            norms = _row_norms(emb)
            bad = np.flatnonzero(~(np.abs(norms - 1.0) <= _UNIT_NORM_TOL))
            if bad.size:
                raise ValueError(
                    f"{where}: embedding row {int(bad[0])} has norm {norms[bad[0]]!r}; rows must be unit length "
                    "(use memory.vectors.l2_normalize)")
        return ShardData(ids=ids, labels=labels, uris=uris, embeddings=np.ascontiguousarray(emb))

    def sorted_by_id(self) -> ShardData:
        """Rows in ascending id order (self when they already are: no copy of the embeddings)."""
        if self.ids.size < 2 or bool((self.ids[1:] >= self.ids[:-1]).all()):
            return self
        order = np.argsort(self.ids, kind="stable")
        return ShardData(ids=self.ids[order], labels=self.labels[order], uris=self.uris[order],
                         embeddings=np.ascontiguousarray(self.embeddings[order]))


class ShardEntries(typing.NamedTuple):
    """A shard's entries without their embeddings: what a loaded (searchable) shard keeps in memory."""
    ids: np.ndarray
    labels: np.ndarray
    uris: np.ndarray


def _entries_parquet_bytes(data: ShardData, *, dim: int, embedding_dtype: EmbeddingDtype) -> bytes:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    table = pa.table({"id": pa.array(data.ids.tolist(), pa.string()),
                      "label": pa.array(data.labels, pa.int32()),
                      "uri": pa.array(data.uris.tolist(), pa.string())})
    table = table.replace_schema_metadata(
        {"vmem": json.dumps({"dim": int(dim), "embedding_dtype": embedding_dtype.value}, sort_keys=True)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=["label"], write_statistics=False)
    return buf.getvalue()


def write_shard(shard_dir: str, data: ShardData, *, index_config: IndexConfig, name: str,
                root_relative_path: str, template_dir: str | None = None) -> ShardInfo:
    """Writes one shard (entry table + ScaNN index) and returns its manifest entry.

    Everything is first written to a local temporary directory (ScaNN cannot serialise to ``gs://``), then
    copied to ``shard_dir``. Give each attempt its own ``shard_dir`` (the build does: see
    `pipelines.stages.write`) so a retried or concurrent attempt never mixes files with another; the manifest,
    written last, names the attempt that counts.

    Args:
      shard_dir: Destination directory, local or ``gs://``.
      data: The shard's entries, in any order.
      index_config: How to build the ScaNN index (its embedding_dtype is how the rows are stored).
      name: Shard name for the manifest (e.g. ``shard-00003-of-00016``).
      root_relative_path: shard_dir relative to the memory root, recorded in the manifest.
      template_dir: A local memory-wide index template (`memory.index.template`): a shard that resolves to
        tree+AH is built from it (its partitioner and codebook), so the memory can search it merged with its
        sibling shards; None trains the shard's own.

    Returns:
      The ShardInfo to put in the manifest.
    """
    data = data.validated(where=f"shard {name}").sorted_by_id()
    n = len(data)
    dim = int(data.embeddings.shape[1])  # Also of an empty shard: its embeddings are [0, dim].
    with tempfile.TemporaryDirectory(prefix="vmem-shard-") as tmp:
        with open(os.path.join(tmp, ENTRIES_NAME), "wb") as f:
            f.write(_entries_parquet_bytes(data, dim=dim, embedding_dtype=index_config.embedding_dtype))
        if n:
            if template_dir is not None and index_config.resolve_kind(n) is IndexKind.TREE_AH:
                from memory.index.template import build_from_template  # pylint: disable=g-import-not-at-top
                index = build_from_template(data.embeddings, template_dir)
            else:
                index = ShardIndex.build(data.embeddings, index_config)
            del data  # The index holds its own copy; free ours before serialising (peak memory per worker).
            index.save(os.path.join(tmp, SCANN_DIR))
            kind = index.kind.value
            del index
        else:
            kind = EMPTY_KIND
        def read_local(rel):
            with open(os.path.join(tmp, *rel.split("/")), "rb") as f:
                return f.read()

        checksum, files = record_files(read_local, local_files(tmp))
        # A stale scann/ from an earlier attempt at the same path would mix files from two searchers.
        storage.remove_tree(storage.join(shard_dir, SCANN_DIR))
        storage.makedirs(shard_dir)
        storage.upload_dir(tmp, shard_dir)
    return ShardInfo(name=name, path=root_relative_path, count=n, checksum=checksum, index_kind=kind, files=files)


def _load_npy(blob: bytes, path: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except ValueError as e:
        raise ManifestError(f"cannot read {path}: {e}") from None


def _entries_file(files: ShardFiles):
    """The shard's entries.parquet as a pyarrow ParquetFile, or None for a format-1 shard (ids.npy, ...).

    One read per shard: a format-2 shard costs no existence check (on GCS, each is a round trip).
    """
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    path = files.path(ENTRIES_NAME)
    try:
        blob = files.read(ENTRIES_NAME)
    except FileNotFoundError:
        if storage.exists(files.path("ids.npy")):
            return None
        raise
    try:
        return pq.ParquetFile(io.BytesIO(blob))
    except Exception as e:  # pylint: disable=broad-except  # pyarrow raises several error types.
        raise ManifestError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _read_table(entries, shard_dir: str, columns=None):
    try:
        return entries.read(columns=columns)
    except Exception as e:  # pylint: disable=broad-except  # pyarrow raises several error types.
        raise ManifestError(f"cannot read {storage.join(shard_dir, ENTRIES_NAME)}: {type(e).__name__}: {e}") from None


def _read_legacy(files: ShardFiles, array_name: str) -> np.ndarray:
    return _load_npy(files.read(array_name + ".npy"), files.path(array_name + ".npy"))


def _strings(column) -> np.ndarray:
    values = column.to_pylist()
    return np.array(values, dtype=str) if values else np.zeros((0,), "<U1")


def read_shard_ids(shard_dir: str, info: ShardInfo | None = None, *, verify: bool = True) -> np.ndarray:
    """The shard's ids (unicode [n], sorted), reading nothing else.

    ``info`` and ``verify``, here and in every reader of this module: the shard's manifest entry, against which
    each file read is checked (`memory.store.integrity.ShardFiles`; `ShardCorruptError` on a mismatch) unless
    ``verify`` is False; without ``info`` the files are read unchecked.
    """
    files = ShardFiles(shard_dir, info, verify=verify)
    entries = _entries_file(files)
    if entries is None:
        return _read_legacy(files, "ids").astype(str)
    return _strings(_read_table(entries, shard_dir, ["id"]).column("id"))


def _entry_columns(entries, files: ShardFiles) -> tuple[np.ndarray, np.ndarray, typing.Any]:
    """(ids, labels, uris) with the uris as read: an Arrow column, or unicode for a format-1 shard."""
    if entries is None:
        return (_read_legacy(files, "ids").astype(str), _read_legacy(files, "labels").astype(np.int32),
                _read_legacy(files, "uris").astype(str))
    table = _read_table(entries, files.shard_dir)
    return (_strings(table.column("id")), table.column("label").to_numpy(zero_copy_only=False).astype(np.int32),
            table.column("uri"))


def _entries_of(entries, files: ShardFiles) -> ShardEntries:
    ids, labels, uris = _entry_columns(entries, files)
    return ShardEntries(ids, labels, uris if isinstance(uris, np.ndarray) else _strings(uris))


def read_shard_entries(shard_dir: str, info: ShardInfo | None = None, *, verify: bool = True) -> ShardEntries:
    """The shard's ids, labels and uris (no embeddings): what searching a shard needs besides its index.
    ``info``, ``verify``: as `read_shard_ids`."""
    files = ShardFiles(shard_dir, info, verify=verify)
    return _entries_of(_entries_file(files), files)


def _embeddings_of(entries, files: ShardFiles) -> np.ndarray:
    if entries is None:
        return _read_legacy(files, "embeddings")
    raw = (entries.schema_arrow.metadata or {}).get(b"vmem")
    if raw is None:
        raise ManifestError(f"{files.path(ENTRIES_NAME)}: no vmem metadata (dim, embedding_dtype); "
                            "not written by write_shard")
    meta = json.loads(raw)
    if entries.metadata.num_rows == 0:  # An empty shard has no index, hence no rows.
        return np.zeros((0, int(meta["dim"])), np.float32)
    dtype = EmbeddingDtype.parse(meta["embedding_dtype"])
    rel = f"{SCANN_DIR}/{dtype.dataset_file}"
    stored = _load_npy(files.read(rel), files.path(rel))
    multipliers = None
    if dtype is EmbeddingDtype.INT8:
        mrel = f"{SCANN_DIR}/{_INT8_MULTIPLIERS}"
        multipliers = _load_npy(files.read(mrel), files.path(mrel))
    rows = rows_from_dataset_file(dtype, stored, multipliers)
    del stored
    # Quantised rows are within ~1e-3 of unit length; exact unit rows again for a re-index or an add.
    return rows if dtype is EmbeddingDtype.FLOAT32 else l2_normalize(rows)


def read_shard_embeddings(shard_dir: str, info: ShardInfo | None = None, *, verify: bool = True) -> np.ndarray:
    """The shard's float32 [n, d] unit embeddings, row i = entry i (dequantised for bfloat16/int8 storage).
    ``info``, ``verify``: as `read_shard_ids`."""
    files = ShardFiles(shard_dir, info, verify=verify)
    return _embeddings_of(_entries_file(files), files)


def read_shard_data(shard_dir: str, info: ShardInfo | None = None, *, verify: bool = True) -> ShardData:
    """Reads a shard's entries and embeddings (local or ``gs://``); entries.parquet is read once.
    ``info``, ``verify``: as `read_shard_ids`."""
    files = ShardFiles(shard_dir, info, verify=verify)
    entries_file = _entries_file(files)
    entries = _entries_of(entries_file, files)
    return ShardData(ids=entries.ids, labels=entries.labels, uris=entries.uris,
                     embeddings=_embeddings_of(entries_file, files))


@contextlib.contextmanager
def _local_scann_dir(scann_dir: str):
    """A local directory with the ScaNN files: the directory itself, or a download removed afterwards.

    ScaNN reads the whole searcher into memory on load, so a downloaded copy is deleted as soon as it is
    loaded instead of piling up on a worker's disk, one copy per shard ever loaded.
    """
    with storage.local_dir(scann_dir, prefix="vmem-scann-") as local:
        yield local


@contextlib.contextmanager
def _checked_local_index_dir(shard_dir: str, info: ShardInfo, verify: bool):
    """The shard's ScaNN directory, local, after checking it exists, holds no pickle and (with ``verify``) that
    every file matches the manifest (ScaNN reads them itself, so they are checked just before it does)."""
    scann_dir = storage.join(shard_dir, SCANN_DIR)
    if not storage.exists(scann_dir):
        raise ManifestError(f"shard {info.name}: index directory {scann_dir} missing")
    with _local_scann_dir(scann_dir) as local:
        refuse_pickles(local_files(local), f"shard {info.name} index {scann_dir}")
        ShardFiles(shard_dir, info, verify=verify).check_dir(local, SCANN_DIR)
        yield local


def load_shard_index(shard_dir: str, info: ShardInfo, *, verify: bool = True) -> ShardIndex | None:
    """Loads a shard's ScaNN index; None for an empty shard. ``verify``: check every index file against the
    manifest first (`memory.store.integrity`).

    Raises:
      ManifestError: the index is missing, holds a pickle, or disagrees with the manifest
        (`ShardCorruptError`: a file differs from its record).
    """
    if info.index_kind == EMPTY_KIND:
        return None
    scann_dir = storage.join(shard_dir, SCANN_DIR)
    with _checked_local_index_dir(shard_dir, info, verify) as local:
        index = ShardIndex.load(local)
    if len(index) != info.count or index.kind.value != info.index_kind:
        raise ManifestError(
            f"shard {info.name}: index at {scann_dir} has {len(index)} entries of kind {index.kind.value}, "
            f"manifest says {info.count} of kind {info.index_kind}")
    return index


def shard_template_id(shard_dir: str, info: ShardInfo, *, verify: bool = True) -> str | None:
    """The index template a tree+AH shard was built from (`memory.index.template`), read from its small index
    metadata file without loading the searcher; None for other shards and for shards without one. ``verify``:
    check the file against its record first (a shard without per-file records is checked when its index loads:
    its whole-shard check reads every file, too much for this small read)."""
    if info.index_kind != IndexKind.TREE_AH.value:
        return None
    files = ShardFiles(shard_dir, info, verify=verify and bool(info.files))
    try:
        meta = json.loads(files.read(f"{SCANN_DIR}/{INDEX_META_NAME}"))
    except FileNotFoundError:
        return None  # load_shard_index reports the missing index.
    return meta.get("template_id")


class EntryTables(typing.NamedTuple):
    """Every shard's entry table (`read_entry_tables`): ids and labels per shard, all uris packed in shard order."""
    ids: list[np.ndarray]
    labels: list[np.ndarray]
    uris: PackedStrings


def read_entry_tables(shard_dirs: Sequence[str], infos: Sequence[ShardInfo], *, num_classes: int,
                      verify: bool = True) -> EntryTables:
    """Every shard's ids, labels and uris (not the embeddings: the index holds the only copy), each entry table
    read once, checked against the manifest (counts, labels below ``num_classes``; with ``verify``, the files
    read against their records). The uris stay packed (`memory.store.packed`): no Python string per entry."""
    ids, labels, uris = [], [], []
    for info, shard_dir in zip(infos, shard_dirs):
        files = ShardFiles(shard_dir, info, verify=verify)
        try:
            shard_ids, shard_labels, shard_uris = _entry_columns(_entries_file(files), files)
        except FileNotFoundError as e:
            raise ManifestError(f"shard {info.name}: {e}") from None
        if len(shard_ids) != info.count or len(shard_uris) != info.count:
            raise ManifestError(f"shard {info.name}: files hold {len(shard_ids)} entries and {len(shard_uris)} uris, "
                                f"manifest says {info.count}")
        if info.count and int(shard_labels.max()) >= num_classes:
            raise ManifestError(f"shard {info.name}: label {int(shard_labels.max())} outside class_names")
        ids.append(shard_ids)
        labels.append(shard_labels)
        uris.append(PackedStrings.of(shard_uris) if isinstance(shard_uris, np.ndarray)
                    else PackedStrings.from_arrow(shard_uris))
    return EntryTables(ids, labels, PackedStrings.concat(uris))


# Most entries one merged index holds (four shards of the default 500,000-entry target): a hash memory of more
# is searched as several merged indexes, so a job's worker loads a bounded piece of it.
MERGE_MAX_ROWS = 2_000_000


def search_units(root: str, manifest: Manifest, *, merge: bool = True, verify: bool = True) -> list[tuple[int, ...]]:
    """The searched indexes of a memory version: each a tuple of `manifest.all_shards` positions, one shard, or
    a run of consecutive shards built from one index template and searched as one index (memory.index.template;
    hash-sharded memories only: a routed memory searches only the shards a query is routed to). The in-process
    memory and the distributed jobs search the same units, so they return the same neighbours. ``verify``: as
    `shard_template_id`."""
    infos = manifest.all_shards
    if not merge or manifest.router is not None:
        return [(s,) for s in range(len(infos))]
    ids = [shard_template_id(storage.join(root, info.path), info, verify=verify) for info in infos]
    runs = dict(merge_runs(ids, [info.count for info in infos], MERGE_MAX_ROWS))
    units, s = [], 0
    while s < len(infos):
        stop = runs.get(s, s + 1)
        units.append(tuple(range(s, stop)))
        s = stop
    return units


def load_unit_index(shard_dirs: Sequence[str], infos: Sequence[ShardInfo], *, verify: bool = True
                    ) -> ShardIndex | None:
    """The index of one `search_units` unit: its shard's (`load_shard_index`), or its shards' searched as one
    (`memory.index.template.load_merged`); ``verify`` as `load_shard_index`."""
    if len(infos) == 1:
        return load_shard_index(shard_dirs[0], infos[0], verify=verify)
    from memory.index.template import load_merged  # pylint: disable=g-import-not-at-top
    names = [info.name for info in infos]
    with contextlib.ExitStack() as stack:
        local = []
        for shard_dir, info in zip(shard_dirs, infos):
            local.append(stack.enter_context(_checked_local_index_dir(shard_dir, info, verify)))
        try:
            index = load_merged(local)
        except ValueError as e:
            raise ManifestError(f"shards {names}: {e}") from None
    if len(index) != sum(info.count for info in infos):
        raise ManifestError(f"shards {names}: merged index has {len(index)} entries, manifest says "
                            f"{sum(info.count for info in infos)}")
    return index
