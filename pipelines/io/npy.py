"""Ranged reads of ``.npy`` [n, d] float arrays on any Beam filesystem: the header parsed once, then any rows
read with one seek, so no multi-GB file is loaded whole (clip-retrieval's ``img_emb_<i>.npy``)."""

from __future__ import annotations

import dataclasses

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


def open_file(path: str):
    """``path`` opened for reading, as stored (no decompression), on any Beam filesystem."""
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


@dataclasses.dataclass(frozen=True)
class NpyHeader:
    rows: int
    dim: int
    dtype: str
    offset: int  # Byte offset of row 0.


def read_npy_header(path: str) -> NpyHeader:
    """Parses an .npy header (a few hundred bytes) without reading the array."""
    from numpy.lib import format as npy_format
    with open_file(path) as f:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{path}: npy format version {version} is not supported (1.0 and 2.0 are).")
        offset = f.tell()
    if len(shape) != 2 or fortran or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise ValueError(f"{path}: expected a C-order float16/32/64 [n, d] array; got shape {shape}, "
                         f"dtype {dtype}, fortran_order={fortran}.")
    return NpyHeader(rows=int(shape[0]), dim=int(shape[1]), dtype=dtype.str, offset=int(offset))


def read_npy_rows(f, header: NpyHeader, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the open npy file ``f`` as float32 via one seek + ranged read; fewer rows if the
    file is truncated."""
    dtype = np.dtype(header.dtype)
    row_bytes = header.dim * dtype.itemsize
    want = (stop - start) * row_bytes
    chunks, got = [], 0
    f.seek(header.offset + start * row_bytes)
    while got < want:
        chunk = f.read(want - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    data = b"".join(chunks)
    rows = len(data) // row_bytes
    return np.frombuffer(data[:rows * row_bytes], dtype=dtype).reshape(rows, header.dim).astype(np.float32)
