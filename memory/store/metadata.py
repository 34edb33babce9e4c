"""Per-entry metadata columns: what filters (``meta:COLUMN=v``) and crowding (``meta:COLUMN``) select on.

A memory's metadata is one Parquet table per version (``metadata/v<N>-<token>.parquet``: a sorted, unique
string ``id`` column plus string columns), referenced from the manifest (`memory.store.manifest.MetadataRef`) with
its checksum, like soft-pruning weights. Attaching publishes a new version (change kind ``metadata``); later
versions carry the table forward. Entries without a row (added after the last attach) have no value in any
column: a metadata filter never admits them and crowding treats each as a group of its own.

`memory.search.duplicates.near_duplicate_groups` computes a near-duplicate group id per entry, to attach as a
column and crowd by.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Mapping, Sequence

import numpy as np

from memory import storage
from memory.store.manifest import Manifest, ManifestError, MetadataRef, read_checked_file, sha256_checksum
from memory.store.versions import publish_version, read_base_version, versioned_file_name

METADATA_DIR = "metadata"
ID_COLUMN = "id"


@dataclasses.dataclass(frozen=True)
class MetadataTable:
    """Sorted unique ids and one unicode array per column (row i describes ids[i])."""
    ids: np.ndarray
    columns: dict[str, np.ndarray]

    def values(self, column: str, ids: np.ndarray) -> np.ndarray:
        """unicode values of ``column`` for ``ids`` (any shape); "" for ids without a row."""
        if column not in self.columns:
            raise KeyError(f"no metadata column {column!r}; this memory has {sorted(self.columns)} "
                           "(attach one with `vmem metadata --memory M --table FILE`)")
        ids = np.asarray(ids, dtype=str)
        out = np.full(ids.shape, "", dtype=object)
        if self.ids.size and ids.size:
            flat = ids.ravel()
            pos = np.clip(np.searchsorted(self.ids, flat), 0, self.ids.size - 1)
            hit = self.ids[pos] == flat
            vals = out.ravel()
            vals[hit] = self.columns[column][pos[hit]]
            out = vals.reshape(ids.shape)
        return out.astype(str)


def _table_bytes(ids: np.ndarray, columns: Mapping[str, np.ndarray]) -> bytes:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pa.table({ID_COLUMN: pa.array(ids.tolist(), pa.string()),
                      **{c: pa.array(v.tolist(), pa.string()) for c, v in columns.items()}})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_metadata(root: str, manifest: Manifest) -> MetadataTable | None:
    """The version's metadata table (checksum-checked), or None when it has none."""
    return parse_metadata(root, manifest, read_metadata_file(root, manifest))


def read_metadata_file(root: str, manifest: Manifest) -> bytes | None:
    """The bytes of the version's metadata file, checked against its checksum (None when it has none).

    An opened memory reads them at open and parses them (`parse_metadata`) on the first metadata filter or
    crowding: compressed, they cost a fraction of the parsed columns, and a later purge of the version's files
    cannot fail that first use.
    """
    ref = manifest.metadata
    return None if ref is None else read_checked_file(root, manifest, ref.path, ref.checksum, "metadata file")


def parse_metadata(root: str, manifest: Manifest, blob: bytes | None) -> MetadataTable | None:
    """The metadata table of `read_metadata_file`'s bytes (None for None), checked against the manifest."""
    ref = manifest.metadata
    if blob is None or ref is None:
        return None
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    table = pq.read_table(io.BytesIO(blob))
    if table.num_rows != ref.count or table.column_names != [ID_COLUMN, *ref.columns]:
        raise ManifestError(f"version {manifest.version}: metadata file {storage.join(root, ref.path)} holds "
                            f"{table.num_rows} rows, columns {table.column_names}; manifest says {ref.count} rows, "
                            f"columns {[ID_COLUMN, *ref.columns]}")
    return MetadataTable(ids=np.asarray(table.column(ID_COLUMN).to_pylist(), dtype=str),
                         columns={c: np.asarray(table.column(c).to_pylist(), dtype=str) for c in ref.columns})


def publish_metadata(root: str, ids: Sequence[str], columns: Mapping[str, Sequence[str]], *,
                     expected_version: int | None = None, replace: bool = False, verify: bool = True) -> Manifest:
    """Attaches metadata columns to live entries as the next version.

    Args:
      root: Memory root.
      ids: Live entry ids, one per row of ``columns``.
      columns: ``{name: [value per id]}`` (values become strings; "" means no value).
      expected_version: The version the values describe (default: the latest now).
      replace: Drop the existing table instead of merging into it (by default, listed ids get the given
        values, other rows and columns are kept).
      verify: Check the shard id files read against the manifest (memory.store.integrity).

    Raises:
      KeyError: listing ids that are not live. ValueError: bad shapes, names or duplicate ids.
      ConcurrentUpdateError.
    """
    from memory.store.mutations import check_unique_live, str_array  # pylint: disable=g-import-not-at-top  # (mutations -> scann)
    base, m = read_base_version(root, expected_version)
    ids_arr = str_array(ids)
    if not columns:
        raise ValueError("no metadata columns given; pass at least one column besides the id")
    cols = {}
    for name, values in columns.items():
        if not isinstance(name, str) or not name or name == ID_COLUMN:
            raise ValueError(f"metadata column name {name!r}: must be a non-empty string other than {ID_COLUMN!r}")
        arr = str_array("" if v is None else v for v in values)
        if arr.shape != ids_arr.shape:
            raise ValueError(f"metadata column {name!r} has {arr.shape[0]} values for {ids_arr.shape[0]} ids")
        cols[name] = arr
    check_unique_live(root, base, ids_arr, what="metadata", verify=verify)
    old = None if replace else read_metadata(root, m)
    if old is not None:  # Merge: listed ids take the new values, every other row and column is kept.
        all_ids = np.union1d(old.ids, ids_arr)
        names = list(old.columns) + [c for c in cols if c not in old.columns]
        merged = {}
        for name in names:
            vals = old.values(name, all_ids) if name in old.columns else np.full(all_ids.shape, "", dtype=object)
            vals = vals.astype(object)
            if name in cols:
                vals[np.searchsorted(all_ids, ids_arr)] = cols[name]
            merged[name] = vals.astype(str)
        ids_arr, cols = all_ids, merged
    else:
        order = np.argsort(ids_arr, kind="stable")
        ids_arr, cols = ids_arr[order], {c: v[order] for c, v in cols.items()}
    blob = _table_bytes(ids_arr, cols)
    rel = versioned_file_name(METADATA_DIR, base + 1, ".parquet")
    storage.write_bytes(storage.join(root, rel), blob)
    ref = MetadataRef(path=rel, count=int(ids_arr.size), checksum=sha256_checksum(blob), columns=tuple(cols))
    change = {"kind": "metadata", "summary": f"metadata columns {list(cols)} for {ids_arr.size} entries",
              "columns": list(cols), "entries": int(ids_arr.size), "replaced": bool(replace)}
    return publish_version(root, dataclasses.replace(m, metadata=ref, change=change), expected_parent=base)


def read_table_file(path: str, *, id_column: str = ID_COLUMN) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(ids, {column: values}) of a Parquet, CSV or JSONL file (local or ``gs://``) with an id column."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    blob = storage.read_bytes(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
        table = pq.read_table(io.BytesIO(blob))
    elif path.endswith(".csv"):
        import pyarrow.csv as pcsv  # pylint: disable=g-import-not-at-top
        table = pcsv.read_csv(io.BytesIO(blob), convert_options=pcsv.ConvertOptions(
            column_types=None, strings_can_be_null=False, auto_dict_encode=False))
    elif path.endswith((".jsonl", ".json")):
        import pyarrow.json as pjson  # pylint: disable=g-import-not-at-top
        table = pjson.read_json(io.BytesIO(blob))
    else:
        raise ValueError(f"metadata table {path!r}: expected a .parquet, .csv or .jsonl file")
    if id_column not in table.column_names:
        raise ValueError(f"metadata table {path!r} has no id column {id_column!r}; its columns are "
                         f"{table.column_names} (pass --id-column)")
    def strings(col) -> np.ndarray:
        return np.asarray(["" if v is None else str(v) for v in col.cast(pa.string()).to_pylist()], dtype=str)
    return strings(table.column(id_column)), {c: strings(table.column(c)) for c in table.column_names
                                              if c != id_column}


def metadata_without(root: str, manifest: Manifest, forgotten: np.ndarray, new_version: int) -> MetadataRef | None:
    """The metadata minus forgotten ids (re-index drops them with their rows): the same ref if none is listed."""
    table = read_metadata(root, manifest)
    if table is None:
        return None
    keep = ~np.isin(table.ids, np.asarray(forgotten, dtype=str))
    if keep.all():
        return manifest.metadata
    if not keep.any():
        return None
    blob = _table_bytes(table.ids[keep], {c: v[keep] for c, v in table.columns.items()})
    rel = versioned_file_name(METADATA_DIR, new_version, ".parquet")
    storage.write_bytes(storage.join(root, rel), blob)
    return dataclasses.replace(manifest.metadata, path=rel, count=int(keep.sum()), checksum=sha256_checksum(blob))
