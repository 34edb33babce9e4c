"""Precomputed embeddings as a Beam source: clip-retrieval folders and TFRecords of tf.train.Example.

``vmem build --embeddings SPEC`` skips decoding and encoding: :class:`ReadEmbeddings` turns embeddings
someone already computed into :class:`EntryBlock` s (unit rows, ids, labels, absolute uris) plus
:class:`FailedRecord` s for rows that cannot be used. Every input row ends up in exactly one of the two.

Spec grammar (``KIND:LOCATION`` then optional ``,key=value`` options; a location cannot contain a comma)::

  clip:DIR[,label_column=COL | ,label_from=parent_dir][,id_column=COL][,uri_column=COL]
  tfrecord:PATTERN[,embedding_feature=embedding][,id_feature=id][,label_feature=label][,uri_feature=uri]

``clip:DIR`` is what ``clip-retrieval inference`` writes: ``DIR/img_emb/img_emb_<i>.npy`` (float16/32
[n, d]) row-aligned with ``DIR/metadata/metadata_<i>.parquet``. The label is required: a metadata column
(``label_column``) or the parent directory name of ``image_path`` (``label_from=parent_dir``, as ImageFolder).
The id defaults to the ``key`` column, else ``image_path``; the uri to ``image_path``, else ``url``, else
``<npy path>#<row>``. Relative uris resolve against DIR.

Local paths and ``gs://`` alike go through Beam FileSystems with ranged reads: an npy file's header is parsed
once, then each block seeks to its rows, so no multi-GB file is ever loaded whole.

Examples::

  vmem build --embeddings clip:gs://BUCKET/laion-emb,label_column=label --encoder-id clip-vit-b32 ...
  vmem build --embeddings clip:/data/emb,label_from=parent_dir --encoder-id clip-vit-b32 ...
  vmem build --embeddings 'tfrecord:/data/emb/part-*.tfrecord,embedding_feature=emb' --encoder-id NAME ...
"""

from __future__ import annotations

import dataclasses
import enum
import posixpath
import re
import struct
import typing

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines.io.npy import NpyHeader, open_file, read_npy_header, read_npy_rows
from pipelines.io.readers import FAILED_TAG, failed_record, parse_example, parse_spec_options
from pipelines.records import EntryBlock

_NAMESPACE = "visual_memory"
# Work items hold at most this many blocks of rows: small enough to spread over many workers, large enough
# that re-decoding the metadata columns before an item's start row (parquet has no row seek inside a row
# group) stays a small fraction of the read.
_BLOCKS_PER_ITEM = 16
# pyarrow reads column chunks through a buffer of this size instead of whole, bounding a worker's memory.
_PARQUET_BUFFER = 1 << 20
_NPY_RE = re.compile(r"img_emb_(\d+)\.npy$")
_PARQUET_RE = re.compile(r"metadata_(\d+)\.parquet$")


class EmbeddingKind(enum.Enum):
    CLIP = "clip"
    TFRECORD = "tfrecord"


class LabelFrom(enum.Enum):
    PARENT_DIR = "parent_dir"


_ALLOWED_OPTIONS = {
    EmbeddingKind.CLIP: {"label_column": None, "label_from": tuple(m.value for m in LabelFrom),
                         "id_column": None, "uri_column": None},
    EmbeddingKind.TFRECORD: {"embedding_feature": None, "id_feature": None, "label_feature": None,
                             "uri_feature": None},
}
_TFRECORD_DEFAULTS = {"embedding_feature": "embedding", "id_feature": "id", "label_feature": "label",
                      "uri_feature": "uri"}


@dataclasses.dataclass(frozen=True)
class EmbeddingSource:
    """Where precomputed embeddings come from.

    Attributes:
      kind: the layout.
      location: the clip-retrieval output directory (no trailing slash) or a TFRecord file pattern.
      options: sorted ``(key, value)`` pairs from the spec (TFRecord feature names always filled in).
    """
    kind: EmbeddingKind
    location: str
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "location": self.location, "options": dict(self.options)}


def parse_embeddings_spec(spec: str) -> EmbeddingSource:
    """Turns ``--embeddings SPEC`` into an :class:`EmbeddingSource` (no I/O; see the module docstring).

    Raises:
      ValueError: unknown kind, unknown or repeated option, or a clip spec without a label option.
    """
    flag = f"--embeddings {spec}"
    kind = next((k for k in EmbeddingKind if spec.startswith(k.value + ":")), None)
    if kind is None:
        raise ValueError(f"{flag}: expected clip:DIR,label_column=COL (or label_from=parent_dir) or "
                         "tfrecord:PATTERN; see pipelines/io/embedding_sources.py for the options.")
    location, options = parse_spec_options(spec[len(kind.value) + 1:], allowed=_ALLOWED_OPTIONS[kind], flag=flag)
    opts = dict(options)
    if kind is EmbeddingKind.CLIP:
        location = location.rstrip("/")
        if ("label_column" in opts) == ("label_from" in opts):
            raise ValueError(f"{flag}: give exactly one of label_column=COL (a metadata column) or "
                             "label_from=parent_dir (the parent directory of image_path), e.g. "
                             f"clip:{location},label_column=label.")
    else:
        opts = {**_TFRECORD_DEFAULTS, **opts}
    return EmbeddingSource(kind, location, tuple(sorted(opts.items())))


# ----------------------------------------------------------------------------------------------- clip layout

class _Pair(typing.NamedTuple):
    """One clip-retrieval part: its embeddings file and its metadata file (either may be missing)."""
    index: int
    npy: str | None
    parquet: str | None


def _match(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _list_pairs(location: str) -> list[_Pair]:
    npys = {int(_NPY_RE.search(p).group(1)): p for p in _match(f"{location}/img_emb/img_emb_*.npy")
            if _NPY_RE.search(p)}
    parquets = {int(_PARQUET_RE.search(p).group(1)): p
                for p in _match(f"{location}/metadata/metadata_*.parquet") if _PARQUET_RE.search(p)}
    if not npys:
        raise FileNotFoundError(f"--embeddings clip:{location}: no {location}/img_emb/img_emb_<i>.npy files; "
                                "expected the output folder of clip-retrieval inference.")
    return [_Pair(i, npys.get(i), parquets.get(i)) for i in sorted(set(npys) | set(parquets))]


class _Columns(typing.NamedTuple):
    id: str
    label: str | None  # None: label from image_path's parent directory.
    uri: str | None  # None: no uri column; uris are <npy>#<row>.


class _WorkItem(typing.NamedTuple):
    """Rows [start, stop) of one part. ``problem`` (reason, detail) set: every row is a dead letter."""
    pair: _Pair
    start: int
    stop: int
    header: NpyHeader | None
    row_group: int  # Parquet row group holding [start, stop); -1 with a problem.
    row_group_start: int  # First row of that row group within the file.
    columns: _Columns | None
    problem: tuple[str, str] | None


def _resolve_columns(source: EmbeddingSource, names: list[str]) -> tuple[_Columns | None, tuple[str, str] | None]:
    id_col = source.option("id_column") or ("key" if "key" in names else "image_path")
    uri_col = source.option("uri_column") or next((c for c in ("image_path", "url") if c in names), None)
    label_col = source.option("label_column")
    needed = {"id_column": id_col, "uri_column": source.option("uri_column")}
    if label_col is not None:
        needed["label_column"] = label_col
    else:
        needed["label_from=parent_dir"] = "image_path"
    for option, column in needed.items():
        if column is not None and column not in names:
            return None, ("missing_column", f"{option} needs metadata column {column!r}; the parquet has {names}")
    return _Columns(id=id_col, label=label_col, uri=uri_col), None


class _PartInfo(typing.NamedTuple):
    rows: int  # Rows this part accounts for: max(npy rows, parquet rows).
    header: NpyHeader | None
    row_groups: list[int]
    columns: _Columns | None
    problem: tuple[str, str] | None


def _inspect_part(source: EmbeddingSource, pair: _Pair, expected_dim: int | None) -> _PartInfo:
    """Reads one part's npy header and parquet footer (cheap) and decides whether its rows can be used."""
    import pyarrow.parquet as pq
    header, npy_rows, pq_rows, row_groups, columns, problem = None, 0, 0, [], None, None
    if pair.npy is not None:
        try:
            header = read_npy_header(pair.npy)
            npy_rows = header.rows
        except (OSError, ValueError) as e:
            problem = ("unreadable_embeddings", f"{pair.npy}: {type(e).__name__}: {e}")
    if pair.parquet is not None:
        try:
            with open_file(pair.parquet) as f:
                meta = pq.ParquetFile(f).metadata
                pq_rows = meta.num_rows
                row_groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                names = list(meta.schema.to_arrow_schema().names)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError.
            problem = problem or ("unreadable_metadata", f"{pair.parquet}: {type(e).__name__}: {e}")
    rows = max(npy_rows, pq_rows)
    if problem is not None:
        return _PartInfo(rows, None, [], None, problem)
    if pair.parquet is None:
        return _PartInfo(rows, None, [], None, (
            "missing_metadata", f"{pair.npy} has no metadata/metadata_{pair.index}.parquet beside it"))
    if pair.npy is None:
        return _PartInfo(rows, None, [], None, (
            "missing_embeddings", f"{pair.parquet} has no img_emb/img_emb_{pair.index}.npy beside it"))
    if npy_rows != pq_rows:
        return _PartInfo(rows, None, [], None, (
            "row_count_mismatch",
            f"{pair.npy} has {npy_rows} rows but {pair.parquet} has {pq_rows}; rows cannot be aligned"))
    if expected_dim is not None and header.dim != expected_dim:
        return _PartInfo(rows, None, [], None, (
            "wrong_dim", f"{pair.npy} has dim {header.dim}, the source's first file has {expected_dim}"))
    columns, problem = _resolve_columns(source, names)
    return _PartInfo(rows, header, row_groups, columns, problem)


def _plan_part(source: EmbeddingSource, pair: _Pair, expected_dim: int | None, block_size: int):
    """Work items covering every row of a part: ranges of <= block_size * _BLOCKS_PER_ITEM rows that never
    straddle a parquet row group."""
    info = _inspect_part(source, pair, expected_dim)
    item_rows = block_size * _BLOCKS_PER_ITEM
    if info.problem is not None:
        for start in range(0, info.rows, item_rows):
            yield _WorkItem(pair, start, min(start + item_rows, info.rows), None, -1, 0, None, info.problem)
        return
    group_start = 0
    for group, group_rows in enumerate(info.row_groups):
        for start in range(group_start, group_start + group_rows, item_rows):
            stop = min(start + item_rows, group_start + group_rows)
            yield _WorkItem(pair, start, stop, info.header, group, group_start, info.columns, None)
        group_start += group_rows


def _is_absolute(uri: str) -> bool:
    return uri.startswith("/") or "://" in uri


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _normalise(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit float32 rows of the usable ones, finite mask, nonzero mask); the norm in float64 cannot overflow."""
    wide = rows.astype(np.float64)
    finite = np.isfinite(wide).all(axis=1)
    norms = np.sqrt(np.square(np.where(finite[:, None], wide, 0.0)).sum(axis=1))
    nonzero = norms > 0
    ok = finite & nonzero
    return (wide[ok] / norms[ok, None]).astype(np.float32), finite, nonzero


def _rows_to_block(rows: list) -> EntryBlock:
    """(id, label, uri, unit row) tuples -> one EntryBlock."""
    ids, labels, uris, vectors = zip(*rows)
    return EntryBlock(ids=np.array(ids, dtype=str), labels=np.array(labels, dtype=str),
                      uris=np.array(uris, dtype=str), embeddings=np.stack(vectors).astype(np.float32))


class _ReadClipItemFn(beam.DoFn):
    """A work item -> EntryBlocks of at most ``block_size`` rows, dead letters for the unusable rows."""

    def __init__(self, source: EmbeddingSource, block_size: int):
        self._source = source
        self._block_size = block_size
        self._read = Metrics.counter(_NAMESPACE, "embeddings_read")
        self._blocks = Metrics.counter(_NAMESPACE, "embedding_blocks")

    def process(self, item: _WorkItem):
        if item.problem is not None:
            name = posixpath.basename(item.pair.npy or item.pair.parquet)
            reason, detail = item.problem
            for row in range(item.start, item.stop):
                yield failed_record(f"{name}:{row}", item.pair.npy or item.pair.parquet, reason, detail)
            return
        import pyarrow.parquet as pq
        columns = item.columns
        wanted = sorted({columns.id, columns.label or "image_path", *([columns.uri] if columns.uri else [])})
        offset = item.row_group_start
        with open_file(item.pair.parquet) as f, open_file(item.pair.npy) as npy_file:
            batches = pq.ParquetFile(f, buffer_size=_PARQUET_BUFFER).iter_batches(
                batch_size=self._block_size, row_groups=[item.row_group], columns=wanted)
            for batch in batches:
                batch_start, offset = offset, offset + batch.num_rows
                # Parquet cannot seek to a row inside a row group: batches before the item are decoded and skipped.
                lo, hi = max(batch_start, item.start), min(offset, item.stop)
                if lo >= hi:
                    if batch_start >= item.stop:
                        break
                    continue
                yield from self._block(item, lo, hi, batch.slice(lo - batch_start, hi - lo), npy_file)
        if offset < item.stop:  # The footer promised more rows than the row group yielded.
            for row in range(max(offset, item.start), item.stop):
                yield failed_record(f"{posixpath.basename(item.pair.npy)}:{row}", item.pair.npy, "truncated_metadata",
                                    f"{item.pair.parquet} ended at row {offset}")

    def _block(self, item: _WorkItem, lo: int, hi: int, batch, npy_file):
        """Rows [lo, hi) of a work item (``batch``: their metadata) -> dead letters, then one EntryBlock.

        Column operations over the whole block (pyarrow, numpy); Python runs per row only for dead letters.
        """
        cols, npy, n = item.columns, item.pair.npy, hi - lo
        rows = read_npy_rows(npy_file, item.header, lo, hi)
        unit, finite, nonzero = _normalise(rows)
        present = np.arange(n) < rows.shape[0]  # A truncated npy file holds fewer rows than its header says.
        ok_rows = np.zeros(n, dtype=bool)
        ok_rows[:rows.shape[0]] = finite & nonzero
        ids = _text_column(batch.column(cols.id))
        uris = _uri_column(batch.column(cols.uri) if cols.uri else None, n, lo, npy=npy,
                           location=self._source.location)
        if cols.label is not None:
            labels = _text_column(batch.column(cols.label))
        else:
            labels = _parent_dir_column(_text_column(batch.column("image_path")))
        has_id, has_label = ids != "", labels != ""
        kept = has_id & has_label & ok_rows
        for i in np.flatnonzero(~kept).tolist():
            yield self._dead_letter(item, lo + i, str(ids[i]), str(uris[i]), has_label[i], present[i],
                                    i < rows.shape[0] and finite[i])
        if kept.any():
            unit_index = np.cumsum(ok_rows) - 1
            block = EntryBlock(ids=ids[kept].astype(str), labels=labels[kept].astype(str),
                               uris=uris[kept].astype(str), embeddings=unit[unit_index[kept]])
            self._read.inc(len(block))
            self._blocks.inc()
            yield block

    def _dead_letter(self, item: _WorkItem, row: int, record_id: str, uri: str, has_label: bool, present: bool,
                     finite: bool):
        """The failure of one unusable row, by the first of its problems in the order the checks are listed."""
        cols, npy = item.columns, item.pair.npy
        if not record_id:
            fallback = f"{posixpath.basename(npy)}:{row}"
            return failed_record(fallback, uri, "missing_id", f"row {row} of {item.pair.parquet}: empty {cols.id!r}")
        if not has_label:
            where = repr(cols.label) if cols.label else "parent directory of 'image_path'"
            return failed_record(record_id, uri, "missing_label", f"row {row} of {item.pair.parquet}: empty {where}")
        if not present:
            return failed_record(record_id, uri, "truncated_embeddings",
                                 f"{npy} holds fewer rows than its header's {item.header.rows}")
        if not finite:
            return failed_record(record_id, uri, "non_finite_embedding", f"row {row} of {npy} has NaN or inf")
        return failed_record(record_id, uri, "zero_norm_embedding", f"row {row} of {npy} is all zeros")


def _text_column(column) -> np.ndarray:
    """A metadata column as an object array of stripped strings, "" for nulls (as `_text` per value)."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        trimmed = pc.fill_null(pc.utf8_trim_whitespace(column), "")
        return trimmed.to_numpy(zero_copy_only=False)
    # Other types (ints, dates...): Python's str() spelling, as `_text` gives it.
    return np.array([_text(v) for v in column.to_pylist()], dtype=object)


def _uri_column(column, n: int, lo: int, *, npy: str, location: str) -> np.ndarray:
    """Absolute uris of a block's rows: relative ones joined to the source location, empty ones ``<npy>#<row>``."""
    uris = _text_column(column) if column is not None else np.full(n, "", dtype=object)
    empty = uris == ""
    if empty.any():
        uris[empty] = [f"{npy}#{row}" for row in (lo + np.flatnonzero(empty)).tolist()]
    text = uris.astype(str)
    absolute = np.char.startswith(text, "/") | (np.char.find(text, "://") >= 0)
    relative = ~(absolute | empty)
    if relative.any():
        # posixpath.join(location, uri) for a relative uri.
        prefix = location if not location or location.endswith("/") else location + "/"
        uris[relative] = np.char.add(prefix, text[relative]).astype(object)
    return uris


# The parent directory's name of a path, as posixpath.basename(posixpath.dirname(path)): the leftmost
# component followed by slashes and a last component without one.
_PARENT_DIR = r"(?P<parent>[^/]*)/+[^/]*$"


def _parent_dir_column(paths: np.ndarray) -> np.ndarray:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    found = pc.extract_regex(pa.array(paths, type=pa.string()), _PARENT_DIR).field(0)
    return pc.fill_null(found, "").to_numpy(zero_copy_only=False)


class _ListPartsFn(beam.DoFn):
    def process(self, location: str):
        yield from _list_pairs(location)


class _PlanPartFn(beam.DoFn):
    def __init__(self, source: EmbeddingSource, expected_dim: int, block_size: int):
        self._source = source
        self._dim = expected_dim
        self._block_size = block_size

    def process(self, pair: _Pair):
        yield from _plan_part(self._source, pair, self._dim, self._block_size)


# ------------------------------------------------------------------------------------------------- TFRecords

def _first_tfrecord(pattern: str) -> bytes:
    """The first record of the first file matching ``pattern`` (TFRecord framing read by hand: no TF ops)."""
    paths = _match(pattern)
    if not paths:
        raise FileNotFoundError(f"--embeddings tfrecord:{pattern}: no file matches.")
    with FileSystems.open(paths[0], compression_type=CompressionTypes.AUTO) as f:
        head = f.read(12)  # uint64 length, uint32 masked crc of the length.
        if len(head) < 12:
            raise ValueError(f"{paths[0]}: empty or not a TFRecord file; cannot tell the embedding dim.")
        (length,) = struct.unpack("<Q", head[:8])
        return f.read(length)


class ParseEmbeddingExampleFn(beam.DoFn):
    """(filename, serialized Example) -> (id, label, uri, unit float32 row) or a dead letter."""

    def __init__(self, source: EmbeddingSource, dim: int):
        self._source = source
        self._dim = dim

    def setup(self):
        # Imported on the worker: the Example proto lives in TensorFlow, which the launcher need not load.
        from tensorflow.core.example import example_pb2
        self._example_cls = example_pb2.Example

    def process(self, element):
        filename, serialized = element
        opt = self._source.option
        fallback, features, failure = parse_example(self._example_cls, filename, serialized)
        if failure is not None:
            yield failure
            return

        def text(name: str) -> str:
            if name in features and features[name].bytes_list.value:
                return features[name].bytes_list.value[0].decode("utf-8", "replace").strip()
            if name in features and features[name].int64_list.value:
                return str(features[name].int64_list.value[0])
            return ""

        record_id, label, uri = text(opt("id_feature")), text(opt("label_feature")), text(opt("uri_feature"))
        if uri and not _is_absolute(uri):
            uri = posixpath.join(posixpath.dirname(filename), uri)
        uri = uri or f"{filename}#{record_id or fallback}"
        values = features[opt("embedding_feature")].float_list.value if opt("embedding_feature") in features else []
        if not record_id:
            yield failed_record(fallback, uri, "missing_id", f"no bytes feature {opt('id_feature')!r} in the Example")
        elif not label:
            yield failed_record(record_id, uri, "missing_label", f"no feature {opt('label_feature')!r} in the Example")
        elif len(values) != self._dim:
            yield failed_record(record_id, uri, "wrong_dim", f"float_list {opt('embedding_feature')!r} has "
                                f"{len(values)} values, expected {self._dim}")
        else:
            unit, finite, nonzero = _normalise(np.asarray(values, dtype=np.float32)[None, :])
            if not finite[0]:
                yield failed_record(record_id, uri, "non_finite_embedding", "embedding has NaN or inf")
            elif not nonzero[0]:
                yield failed_record(record_id, uri, "zero_norm_embedding", "embedding is all zeros")
            else:
                yield record_id, label, uri, unit[0]


class _CountBlockFn(beam.DoFn):
    def __init__(self):
        self._read = Metrics.counter(_NAMESPACE, "embeddings_read")
        self._blocks = Metrics.counter(_NAMESPACE, "embedding_blocks")

    def process(self, block: EntryBlock):
        self._read.inc(len(block))
        self._blocks.inc()
        yield block


# ---------------------------------------------------------------------------------------------- public API

def embedding_dim(source: EmbeddingSource) -> int:
    """The embedding dimension: the first npy file's header, or the first TFRecord's float_list length."""
    if source.kind is EmbeddingKind.CLIP:
        first = next(p for p in _list_pairs(source.location) if p.npy is not None)
        return read_npy_header(first.npy).dim
    from tensorflow.core.example import example_pb2
    features = example_pb2.Example.FromString(_first_tfrecord(source.location)).features.feature
    name = source.option("embedding_feature")
    if name not in features or not features[name].float_list.value:
        raise ValueError(f"--embeddings tfrecord:{source.location}: the first Example has no float_list "
                         f"feature {name!r}; it has {sorted(features)}. Set embedding_feature=NAME.")
    return len(features[name].float_list.value)


def count_entries(source: EmbeddingSource) -> int | None:
    """Rows :class:`ReadEmbeddings` will account for (blocks + dead letters), from file headers only.

    For clip-retrieval folders this is the sum over parts of max(npy rows, parquet rows), so a part whose
    counts disagree still adds up. ``None`` for TFRecords, whose records cannot be counted without a read.
    """
    if source.kind is not EmbeddingKind.CLIP:
        return None
    return sum(_inspect_part(source, pair, None).rows for pair in _list_pairs(source.location))


class ReadEmbeddings(beam.PTransform):
    """Reads precomputed embeddings into :class:`EntryBlock` s of unit rows.

    Returns a ``(blocks, failures)`` pair of PCollections: :class:`EntryBlock` and :class:`FailedRecord`
    (stage ``read``; reasons ``non_finite_embedding``, ``zero_norm_embedding``, ``missing_id``,
    ``missing_label``, ``wrong_dim``, ``row_count_mismatch``, ``missing_metadata``, ``missing_embeddings``,
    ``missing_column``, ``unreadable_*``, ``truncated_*``, ``bad_example``).

    clip-retrieval folders are planned into (part, row range) work items of at most ``16 * block_size`` rows,
    reshuffled so workers read in parallel; a worker holds one block of embeddings and one parquet batch.
    The embedding dim is the first npy file's (read at construction of the graph); parts with another dim
    are dead letters.
    """

    def __init__(self, source: EmbeddingSource, *, block_size: int = 4096):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        self._source = source
        self._block_size = block_size

    def expand(self, pbegin):
        src, dim = self._source, embedding_dim(self._source)
        if src.kind is EmbeddingKind.CLIP:
            items = (
                pbegin
                | "EmbeddingsDir" >> beam.Create([src.location])
                | "ListParts" >> beam.ParDo(_ListPartsFn())
                | "SpreadParts" >> beam.Reshuffle()
                | "PlanWorkItems" >> beam.ParDo(_PlanPartFn(src, dim, self._block_size))
                | "SpreadWorkItems" >> beam.Reshuffle())
            results = items | "ReadWorkItems" >> beam.ParDo(
                _ReadClipItemFn(src, self._block_size)).with_outputs(FAILED_TAG, main="blocks")
            return results.blocks, results[FAILED_TAG]
        from apache_beam.io.tfrecordio import ReadAllFromTFRecord
        rows = (
            pbegin
            | "TFRecordPattern" >> beam.Create([src.location])
            | "ReadTFRecords" >> ReadAllFromTFRecord(with_filename=True)
            | "ParseExamples" >> beam.ParDo(ParseEmbeddingExampleFn(src, dim)).with_outputs(
                FAILED_TAG, main="rows"))
        blocks = (
            rows.rows
            | "BatchRows" >> beam.BatchElements(min_batch_size=self._block_size, max_batch_size=self._block_size)
            | "ToBlocks" >> beam.Map(_rows_to_block)
            | "CountBlocks" >> beam.ParDo(_CountBlockFn()))
        return blocks, rows[FAILED_TAG]
