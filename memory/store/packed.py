"""A column of strings held as one UTF-8 buffer and row offsets (Arrow's string layout), not a string per row.

An opened memory keeps every entry's source uri so that explanations, uri filters and crowding never go back to
the shard files (a purge may have deleted them since). A numpy unicode array is fixed-width UTF-32, four bytes
per character of the *longest* uri for every row, and a Python list costs an object per row; this costs the
uris' UTF-8 bytes plus 8 bytes per row, and only the rows asked for are decoded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["PackedStrings"]


class PackedStrings:
    """Strings ``data[offsets[i]:offsets[i + 1]].decode()`` for i in [0, n).

    Attributes:
      offsets: int64 [n + 1], non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == data.size``.
      data: uint8 [m], the strings' UTF-8 bytes, back to back.
    """
    __slots__ = ("offsets", "data")

    def __init__(self, offsets: np.ndarray, data: np.ndarray):
        offsets = np.asarray(offsets, dtype=np.int64)
        data = np.asarray(data, dtype=np.uint8)
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != data.size or (
                offsets.size > 1 and bool((np.diff(offsets) < 0).any())):
            raise ValueError(f"offsets must run from 0 to the {data.size} data bytes without decreasing, got "
                             f"{offsets.size} offsets from {offsets[:1].tolist()} to {offsets[-1:].tolist()}")
        self.offsets, self.data = offsets, data

    @classmethod
    def of(cls, strings: Sequence[str] | np.ndarray) -> PackedStrings:
        """Packs Python or numpy strings."""
        encoded = [str(s).encode("utf-8") for s in (strings.tolist() if isinstance(strings, np.ndarray)
                                                   else strings)]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(offsets, np.frombuffer(b"".join(encoded), np.uint8).copy())

    @classmethod
    def from_arrow(cls, column) -> PackedStrings:
        """Copies an Arrow string column (a ChunkedArray or Array; nulls read as "") without a Python string per row."""
        import pyarrow as pa  # pylint: disable=g-import-not-at-top
        import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        arr = arr.cast(pa.large_string())  # int64 offsets whatever the writer used.
        if arr.null_count:
            arr = pc.fill_null(arr, "")
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64)[arr.offset:arr.offset + len(arr) + 1]
        first, last = (int(offsets[0]), int(offsets[-1])) if offsets.size else (0, 0)
        data = np.frombuffer(data_buf, np.uint8)[first:last] if data_buf is not None else np.zeros(0, np.uint8)
        return cls(offsets - first if offsets.size else np.zeros(1, np.int64), data.copy())

    @classmethod
    def concat(cls, parts: Sequence[PackedStrings]) -> PackedStrings:
        """The rows of every part, in order."""
        if not parts:
            return cls.of([])
        starts = np.cumsum([0] + [p.data.size for p in parts])
        offsets = np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        return cls(offsets, np.concatenate([p.data for p in parts]))

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def nbytes(self) -> int:
        """Bytes held (offsets and data)."""
        return int(self.offsets.nbytes + self.data.nbytes)

    def slice(self, lo: int, hi: int) -> PackedStrings:
        """Rows [lo, hi) (copies their bytes)."""
        o = self.offsets[lo:hi + 1]
        return PackedStrings(o - o[0], self.data[o[0]:o[-1]].copy())

    def take(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """unicode array of the given rows, in the shape of ``rows``."""
        import pyarrow as pa  # pylint: disable=g-import-not-at-top
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must be in [0, {len(self)}), got range [{rows.min()}, {rows.max()}]")
        if not rows.size:
            return np.zeros(rows.shape, "<U1")
        # A zero-copy Arrow view decodes only the rows taken, in C.
        view = pa.LargeStringArray.from_buffers(len(self), pa.py_buffer(self.offsets), pa.py_buffer(self.data))
        return np.asarray(view.take(pa.array(rows.ravel())).to_pylist(), dtype=str).reshape(rows.shape)

    def to_numpy(self) -> np.ndarray:
        """Every row as a unicode array (what filters and crowding compare)."""
        return self.take(np.arange(len(self)))
