"""Reading and writing per-query neighbour lists.

Two on-disk formats are understood, detected per record:

* Ours (JSON Lines, one object per query)::

        {"query_id": "val/000001", "true_label": 65,
          "neighbor_ids": ["train/1", ...], "neighbor_labels": [65, ...],
          "neighbor_distances": [0.12, ...],
          "neighbor_entry_weights": [1.0, ...]}      # optional (soft pruning)

* The records published with the paper (JSON Lines or one JSON array)::

        {"image_id": ..., "image_class": 65, "neighbor_image_ids": [...],
          "neighbor_classes": [...], "neighbor_distances": [...]}

Files ending in ``.gz`` are decompressed transparently; ``gs://`` files are read too. Neighbour lists are
nearest first; :func:`to_arrays` checks this.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np
import orjson

from memory import storage
# The record the evaluate job writes; its schema lives with the job's records.
from pipelines.records import NEIGHBOR_FIELDS, NEIGHBOR_WEIGHTS_FIELD, NeighborRecord

__all__ = [
    "NeighborFormatError",
    "evaluation_files",
    "NeighborRecord",
    "iter_neighbor_files",
    "iter_records",
    "read_neighbor_files",
    "read_records",
    "to_arrays",
    "write_records",
]

PAPER_FIELDS = ("image_id", "image_class", "neighbor_image_ids",
                "neighbor_classes", "neighbor_distances")
# Keys that identify a format; neighbor_distances is shared by both.
_OUR_MARKERS = frozenset(NEIGHBOR_FIELDS) - {"neighbor_distances"}
_PAPER_MARKERS = frozenset(PAPER_FIELDS) - {"neighbor_distances"}


class NeighborFormatError(ValueError):
    """A neighbours file or record is malformed; the message says where."""


def _open_text(path: str, mode: str) -> IO[str]:
    if mode == "r" and storage.is_gcs(path):
        data = storage.read_bytes(path)
        return io.StringIO((gzip.decompress(data) if path.endswith(".gz") else data).decode("utf-8"))
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def write_records(path: str | os.PathLike, records: Iterable[NeighborRecord]
                  ) -> int:
    """Writes records as JSON Lines in our schema (gzip if ``path`` ends .gz).

    Returns:
        The number of records written.

    Raises:
        ValueError: a record holds a NaN or infinite distance or weight (not JSON).
    """
    count = 0
    with _open_text(os.fspath(path), "w") as f:
        for record in records:
            f.write(record.to_json_line())
            f.write("\n")
            count += 1
    return count


def _loads(line: str) -> Any:
    """One JSON value: orjson (~3x the json module on neighbour records), else the json module.

    The json module reads lines orjson refuses (NaN and Infinity literals) and lines whose labels orjson read
    as floats (it reads an integer past 64 bits as one), so the record checks name such a value exactly; it
    also words the errors of invalid JSON.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)
    if type(obj) is dict:  # pylint: disable=unidiomatic-typecheck
        true = obj.get("true_label", obj.get("image_class"))
        labels = obj.get("neighbor_labels", obj.get("neighbor_classes"))
        if type(true) is float or (type(labels) is list and float in set(map(type, labels))):
            return json.loads(line)
    return obj


def _where(path: str, line: int) -> str:
    return f"{path}:{line}"


def _require(obj: dict[str, Any], fields: Sequence[str], fmt: str,
             where: str) -> None:
    for field in fields:
        if field not in obj:
            raise NeighborFormatError(
                f"{where}: {fmt} record is missing field {field!r} "
                f"(required: {', '.join(fields)})")


_INT64_MIN, _INT64_MAX = -2 ** 63, 2 ** 63 - 1


def _as_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()):
        raise NeighborFormatError(
            f"{where}: field {field!r} must be an integer label, got {value!r}")
    # Labels are packed into int64 arrays (to_arrays): a larger one would fail there, far from its line.
    if not _INT64_MIN <= int(value) <= _INT64_MAX:
        raise NeighborFormatError(
            f"{where}: field {field!r} holds label {value!r}, outside the int64 range "
            f"[{_INT64_MIN}, {_INT64_MAX}]; labels are class indices (0, 1, ...)")
    return int(value)


def _as_list(value: Any, field: str, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise NeighborFormatError(
            f"{where}: field {field!r} must be a list, got "
            f"{type(value).__name__}")
    return value


def _as_ints(value: Any, field: str, where: str) -> list[int]:
    values = _as_list(value, field, where)
    if set(map(type, values)) <= {int} and (not values or _INT64_MIN <= min(values) <= max(values) <= _INT64_MAX):
        return values  # Every label a JSON integer in range: nothing to convert or name.
    return [_as_int(x, field, where) for x in values]


def _as_floats(value: Any, field: str, where: str) -> list[float]:
    values = _as_list(value, field, where)
    if set(map(type, values)) <= {float} and all(map(math.isfinite, values)):
        return values  # Every value a finite JSON float: nothing to convert or name.
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise NeighborFormatError(
                f"{where}: field {field!r} must hold numbers, got {x!r}")
        # NaN, +/-Infinity (and ints past float range) are not distances: in the arrays inf marks padding, so a
        # -Infinity nearest neighbour would silently stop voting.
        try:
            number = float(x)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise NeighborFormatError(
                f"{where}: field {field!r} must hold finite numbers, got {x!r}; NaN and +/-Infinity are not "
                f"distances (write the real distance, or leave the neighbour out)")
        out.append(number)
    return out


def parse_record(obj: Any, *, where: str) -> NeighborRecord:
    """Parses one decoded JSON object in either format.

    Args:
        obj: The decoded JSON value.
        where: ``"file:line"`` used in error messages.

    Raises:
        NeighborFormatError: naming ``where`` and the missing or bad field.
    """
    if not isinstance(obj, dict):
        raise NeighborFormatError(
            f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = obj.keys()
    if _OUR_MARKERS & keys:
        fmt, names = "visual-memory", NEIGHBOR_FIELDS
    elif _PAPER_MARKERS & keys:
        fmt, names = "paper", PAPER_FIELDS
    else:
        raise NeighborFormatError(
            f"{where}: record matches neither format; expected fields "
            f"{', '.join(NEIGHBOR_FIELDS)} (ours) or {', '.join(PAPER_FIELDS)} "
            f"(paper), got {', '.join(sorted(keys)) or 'no fields'}")
    _require(obj, names, fmt, where)
    qid, true, ids, labels, dists = (obj[n] for n in names)
    ids = _as_list(ids, names[2], where)
    if not set(map(type, ids)) <= {str}:
        ids = [str(i) for i in ids]
    labels = _as_ints(labels, names[3], where)
    dists = _as_floats(dists, names[4], where)
    true = _as_int(true, names[1], where)
    weights = None
    if fmt == "visual-memory" and obj.get(NEIGHBOR_WEIGHTS_FIELD) is not None:
        weights = _as_floats(obj[NEIGHBOR_WEIGHTS_FIELD], NEIGHBOR_WEIGHTS_FIELD,
                             where)
        if any(w < 0 for w in weights):
            raise NeighborFormatError(
                f"{where}: {NEIGHBOR_WEIGHTS_FIELD} must be finite and >= 0, got {min(weights)!r}")
    try:
        return NeighborRecord(
            query_id=str(qid), true_label=true,
            neighbor_ids=ids, neighbor_labels=labels, neighbor_distances=dists,
            neighbor_weights=weights)
    except ValueError as e:
        raise NeighborFormatError(f"{where}: {e}") from None


# Characters read at once from a JSON array file (more when one element is longer).
ARRAY_BLOCK_CHARS = 1 << 20


def _iter_json_array(f: IO[str], head: str, path: str) -> Iterator[tuple[Any, int]]:
    """Yields (element, line) of a top-level JSON array, reading ``f`` in blocks and keeping line numbers.

    ``head`` is what was already read (the first line, holding the ``[``). Only the unread part of the
    current block is held, so memory does not grow with the file.
    """
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    buf, pos = head, head.index("[") + 1
    line = 1 + head.count("\n", 0, pos)  # The line of buf[pos].
    eof = False
    expect_value = True
    first = True

    def refill() -> None:
        nonlocal buf, pos, eof
        chunk = f.read(max(ARRAY_BLOCK_CHARS, len(buf) - pos))
        eof = not chunk
        buf, pos = buf[pos:] + chunk, 0

    while True:
        while pos < len(buf) and buf[pos] in ws:
            line += buf[pos] == "\n"
            pos += 1
        if pos >= len(buf):
            if eof:
                raise NeighborFormatError(f"{_where(path, line)}: unterminated JSON array")
            refill()
            continue
        if buf[pos] == "]" and (first or not expect_value):
            return
        if not expect_value:
            if buf[pos] != ",":
                raise NeighborFormatError(f"{_where(path, line)}: expected ',' or ']' in JSON array")
            pos += 1
            expect_value = True
            continue
        try:
            value, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            if eof:
                raise NeighborFormatError(f"{_where(path, line)}: invalid JSON: {e.msg}") from None
            refill()  # The element may just continue past this block.
            continue
        if end == len(buf) and not eof:
            refill()  # A number at the block's end may continue in the next one.
            continue
        yield value, line
        line += buf.count("\n", pos, end)
        pos = end
        expect_value = False
        first = False


def iter_records(path: str | os.PathLike) -> Iterator[NeighborRecord]:
    """Yields the records of one file (JSON Lines or JSON array, maybe .gz).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        NeighborFormatError: naming the file, line and missing or bad field.
    """
    path = os.fspath(path)
    with _open_text(path, "r") as f:
        first_line = f.readline()
        if first_line.lstrip().startswith("["):
            for obj, line in _iter_json_array(f, first_line, path):
                yield parse_record(obj, where=_where(path, line))
            return
        for line_no, line in enumerate(_chain([first_line], f), start=1):
            if not line.strip():
                continue
            try:
                obj = _loads(line)
            except json.JSONDecodeError as e:
                raise NeighborFormatError(
                    f"{_where(path, line_no)}: invalid JSON: {e.msg}") from None
            yield parse_record(obj, where=_where(path, line_no))


def _chain(first: list[str], rest: IO[str]) -> Iterator[str]:
    yield from first
    yield from rest


def read_records(path: str | os.PathLike) -> list[NeighborRecord]:
    """Reads all records of one file; see :func:`iter_records`."""
    return list(iter_records(path))


def evaluation_files(eval_dir: str | os.PathLike) -> list[str]:
    """The neighbour-list files a ``vmem evaluate --output EVAL_DIR`` wrote (``neighbors-*.jsonl``, maybe .gz).

    Raises:
      FileNotFoundError: naming the directory, when it holds none.
    """
    files = sorted(glob.glob(os.path.join(os.fspath(eval_dir), "neighbors-*.jsonl*")))
    if not files:
        raise FileNotFoundError(f"{os.fspath(eval_dir)} holds no neighbors-*.jsonl; did the evaluation run?")
    return files


def _missing(paths: Sequence[str | os.PathLike]) -> None:
    missing = [os.fspath(p) for p in paths
               if not (storage.exists(os.fspath(p)) if storage.is_gcs(os.fspath(p)) else os.path.isfile(p))]
    if missing:
        raise FileNotFoundError(f"neighbours file not found: {missing[0]}")


def _first_repeat(paths: Sequence[str | os.PathLike], suspects: set[int]) -> NeighborFormatError | None:
    """The first query id read twice, among those whose hash is in ``suspects`` (re-reads the files)."""
    seen: dict[str, str] = {}
    for path in paths:
        for record in iter_records(path):
            if hash(record.query_id) not in suspects:
                continue
            if record.query_id in seen:
                return NeighborFormatError(
                    f"query id {record.query_id!r} occurs twice: in "
                    f"{seen[record.query_id]} and {os.fspath(path)}")
            seen[record.query_id] = os.fspath(path)
    return None  # Only hashes collided.


def iter_neighbor_files(paths: Sequence[str | os.PathLike]) -> Iterator[NeighborRecord]:
    """Streams the records of several files (e.g. output shards), in order, refusing a repeated query id.

    Memory: one record at a time plus 8 bytes per query id (a hash, for the repeat check). The check runs
    when the last file is read: a repeat is then named exactly (the files are read again for it).

    Raises:
        FileNotFoundError: naming the first missing file (before any record is yielded).
        NeighborFormatError: on a malformed record or a query id that occurs
            twice (it would be counted twice in the accuracy).
    """
    _missing(paths)
    blocks, block = [], []
    for path in paths:
        for record in iter_records(path):
            block.append(hash(record.query_id))
            if len(block) == 65536:
                blocks.append(np.array(block, dtype=np.int64))
                block = []
            yield record
    hashes = np.concatenate(blocks + [np.array(block, dtype=np.int64)])
    blocks = block = None
    hashes.sort()
    repeated = hashes[1:][hashes[1:] == hashes[:-1]]
    if repeated.size:
        error = _first_repeat(paths, set(repeated.tolist()))
        if error is not None:
            raise error


def read_neighbor_files(paths: Sequence[str | os.PathLike]
                        ) -> list[NeighborRecord]:
    """Reads several files (e.g. output shards) into one list; see :func:`iter_neighbor_files`.

    Raises:
        FileNotFoundError: naming the first missing file.
        NeighborFormatError: on a malformed record or a query id that occurs
            twice (it would be counted twice in the accuracy).
    """
    return list(iter_neighbor_files(paths))


def to_arrays(
    records: Sequence[NeighborRecord],
    k_max: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Packs records into the arrays that ``memory.decide.voting`` consumes.

    Lists longer than ``k_max`` are truncated; shorter ones are padded with
    label -1, distance inf and entry weight 0 (padding never votes).

    Args:
        records: The queries.
        k_max: Columns of the output; default the longest neighbour list.

    Returns:
        ``(labels [n, K] int64, distances [n, K] float64, true [n] int64,
        entry_weights [n, K] float64 or None)``; entry weights are None when no
        record carries them.

    Raises:
        ValueError: if ``k_max < 1``, if only some records carry entry weights,
            or if a neighbour list is not sorted nearest first.
    """
    if k_max is None:
        k_max = max((len(r.neighbor_labels) for r in records), default=1)
        k_max = max(k_max, 1)
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    n = len(records)
    with_weights = [r.neighbor_weights is not None for r in records]
    if any(with_weights) and not all(with_weights):
        bad = records[with_weights.index(False)].query_id
        raise ValueError(
            f"only some records carry neighbor_entry_weights (query {bad!r} has "
            f"none); write them for every query or for none")
    labels = np.full((n, k_max), -1, dtype=np.int64)
    distances = np.full((n, k_max), np.inf, dtype=np.float64)
    weights = np.zeros((n, k_max)) if n and all(with_weights) else None
    true = np.empty(n, dtype=np.int64)
    for i, r in enumerate(records):
        m = min(len(r.neighbor_labels), k_max)
        labels[i, :m] = r.neighbor_labels[:m]
        distances[i, :m] = r.neighbor_distances[:m]
        if weights is not None:
            weights[i, :m] = r.neighbor_weights[:m]
        true[i] = r.true_label
    if n and k_max > 1:
        unsorted = distances[:, 1:] < distances[:, :-1]
        if unsorted.any():
            row = int(np.argmax(unsorted.any(axis=1)))
            raise ValueError(
                f"query {records[row].query_id!r}: neighbor_distances are not "
                f"sorted nearest first ({distances[row, :].tolist()[:5]}...); "
                f"rank voting needs nearest-first lists -- sort each record by "
                f"distance (if the file holds similarities, convert d = 1 - s)")
    return labels, distances, true, weights
