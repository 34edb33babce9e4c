"""Labelled synthetic embeddings with class structure, in clip-retrieval's layout (what ``clip:DIR`` reads).

A stand-in for the common research case (CLIP or DINOv2 features of a labelled image collection) at any
size: ``DIR/img_emb/img_emb_<i>.npy`` (float16 or float32 [rows, dim] unit rows) beside row-aligned
``DIR/metadata/metadata_<i>.parquet`` with the columns ``key`` (entry id), ``label`` (class name),
``superclass`` and ``image_path`` (a synthetic uri), plus ``DIR/dataset.json`` (the spec that made it).

Class structure (Gaussian, per dimension; every entry is L2-normalised at the end)::

  superclass centre  s ~ N(0, I)                      one per `classes_per_group` classes
  class centre       c = s + N(0, class_spread^2 I)   classes of one superclass are confusable neighbours
  mode centre        m = c + N(0, mode_spread^2 I)    `modes_per_class` modes (poses, sub-kinds) per class
  entry              x = m + N(0, noise^2 I)

Row r belongs to class ``r % classes`` (round robin), so every prefix of ``m * classes`` rows holds exactly
``m`` entries per class, and the rows of ``per_class=m`` are the first rows of any larger ``per_class``: a
memory-size subset is a prefix. The centres depend on ``seed`` only; the entries
of each ``draw`` (0 = memory, 1 = queries, 2 = calibration, ...) are an independent sample of the same
classes, generated in blocks of ``BLOCK_ROWS`` rows each from its own seeded stream, so the bytes do not
depend on the file size, and memory stays at one block plus the centres (``classes * modes_per_class * dim``
float32), whatever the number of rows.

    python -m evaluation.synthetic_data --out /tmp/syn/memory --classes 1000 --per-class 1000 --dim 256 --seed 0
    python -m evaluation.synthetic_data --out /tmp/syn/queries --classes 1000 --per-class 10 --dim 256 --seed 0 \\
        --draw 1
    vmem build --embeddings clip:/tmp/syn/memory,label_column=label --encoder-id synthetic-256 --output /tmp/syn/m
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["BLOCK_ROWS", "Centres", "LabelledBlock", "LabelledSpec", "centres", "generate", "iter_blocks",
           "main", "metadata_columns", "row_keys", "write_clip_layout", "write_dataset"]

# Rows generated per step (and per random stream): bounds the temporaries to ~BLOCK_ROWS * dim * 4 bytes.
BLOCK_ROWS = 65_536
KEY_WIDTH = 10  # Row numbers up to 10^10, zero-padded so that string order is row order.
DATASET_JSON = "dataset.json"
DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class LabelledSpec:
    """Everything that decides a generated data set's bytes (see the module docstring for the model).

    Attributes:
      classes: Number of classes, >= 1.
      per_class: Entries per class, >= 1 (``classes * per_class`` rows).
      dim: Embedding dimension, >= 1.
      seed: Seeds the centres (every draw shares them) and, with ``draw``, the entries.
      draw: Which independent sample of entries: 0 for a memory, 1 for its queries, 2 for calibration.
      classes_per_group: Classes per superclass (confusable neighbours), >= 1.
      modes_per_class: Modes per class, >= 1.
      class_spread: Standard deviation of a class centre around its superclass centre (superclasses: 1).
      mode_spread: Standard deviation of a mode around its class centre.
      noise: Standard deviation of an entry around its mode.
      rows_per_file: Rows per ``img_emb_<i>.npy`` / ``metadata_<i>.parquet`` pair, >= 1.
      dtype: "float16" (clip-retrieval's) or "float32".
    """
    classes: int
    per_class: int
    dim: int = 256
    seed: int = 0
    draw: int = 0
    classes_per_group: int = 5
    modes_per_class: int = 4
    class_spread: float = 0.45
    mode_spread: float = 0.35
    noise: float = 2.0
    rows_per_file: int = 1_000_000
    dtype: str = "float16"

    def __post_init__(self):
        for name in ("classes", "per_class", "dim", "classes_per_group", "modes_per_class", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("class_spread", "mode_spread", "noise"):
            if not getattr(self, name) >= 0:  # Also refuses NaN.
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.draw < 0:
            raise ValueError(f"--draw must be >= 0, got {self.draw}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def rows(self) -> int:
        return self.classes * self.per_class

    @property
    def groups(self) -> int:
        return math.ceil(self.classes / self.classes_per_group)

    def class_name(self, index: np.ndarray) -> np.ndarray:
        """``class-<index>`` zero-padded to the widest index, so string order is index order."""
        return _names("class-", index, self.classes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Centres(NamedTuple):
    """The class structure of a spec's seed: superclass [groups, dim], class [classes, dim] and mode
    [classes, modes_per_class, dim] centres (float32), and each class's superclass (int64 [classes])."""
    superclass: np.ndarray
    classes: np.ndarray
    modes: np.ndarray
    group_of_class: np.ndarray


class LabelledBlock(NamedTuple):
    """Rows [start, start + len) of a draw: class index, mode index (int64 [b]) and unit vectors [b, dim]."""
    start: int
    labels: np.ndarray
    modes: np.ndarray
    vectors: np.ndarray


def centres(spec: LabelledSpec) -> Centres:
    """The centres of ``spec``'s classes; they depend on seed, dim and the structure, never on the draw."""
    rng = np.random.default_rng([spec.seed, 0])
    superclass = rng.standard_normal((spec.groups, spec.dim), dtype=np.float32)
    # Consecutive classes share a superclass, so class i's confusable neighbours are i +- a few.
    group_of_class = np.arange(spec.classes, dtype=np.int64) // spec.classes_per_group
    cls = superclass[group_of_class] + np.float32(spec.class_spread) * rng.standard_normal(
        (spec.classes, spec.dim), dtype=np.float32)
    modes = cls[:, None, :] + np.float32(spec.mode_spread) * rng.standard_normal(
        (spec.classes, spec.modes_per_class, spec.dim), dtype=np.float32)
    return Centres(superclass, cls, modes, group_of_class)


def iter_blocks(spec: LabelledSpec, *, structure: Centres | None = None) -> Iterator[LabelledBlock]:
    """Yields the draw's rows in blocks of at most ``BLOCK_ROWS``, in row order.

    Block j is drawn from its own stream seeded by (seed, 1 + draw, j), so any block can be regenerated
    alone and the bytes never depend on how the rows are later split into files.

    Args:
      spec: The data set.
      structure: ``centres(spec)``, when the caller already has it.
    """
    structure = centres(spec) if structure is None else structure
    noise = np.float32(spec.noise)
    for j, start in enumerate(range(0, spec.rows, BLOCK_ROWS)):
        rows = min(BLOCK_ROWS, spec.rows - start)
        rng = np.random.default_rng([spec.seed, 1 + spec.draw, j])
        labels = np.arange(start, start + rows, dtype=np.int64) % spec.classes
        # Whole blocks are drawn and the tail cut off, so the rows of a smaller per_class are exactly the
        # first rows of a larger one (memory-size subsets are prefixes, each generated on its own).
        modes = rng.integers(0, spec.modes_per_class, size=BLOCK_ROWS)[:rows]
        vectors = rng.standard_normal((BLOCK_ROWS, spec.dim), dtype=np.float32)[:rows]
        vectors *= noise
        vectors += structure.modes[labels, modes]
        # In place: a second [rows, dim] copy would double the block's memory.
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield LabelledBlock(start, labels, modes, vectors)


def generate(spec: LabelledSpec) -> tuple[np.ndarray, np.ndarray]:
    """The whole draw in memory: (int64 [rows] class indices, float32 [rows, dim] unit vectors).

    For data that fits in memory (studies, tests); `write_dataset` streams larger ones to disk.
    """
    labels = np.empty(spec.rows, dtype=np.int64)
    vectors = np.empty((spec.rows, spec.dim), dtype=np.float32)
    for block in iter_blocks(spec):
        stop = block.start + block.labels.shape[0]
        labels[block.start:stop] = block.labels
        vectors[block.start:stop] = block.vectors
    return labels, vectors


def row_keys(spec: LabelledSpec, start: int, stop: int) -> np.ndarray:
    """Entry ids of rows [start, stop): ``d<draw>-<zero-padded row>``, distinct across draws."""
    return np.char.add(f"d{spec.draw}-", np.char.zfill(np.arange(start, stop).astype(str), KEY_WIDTH))


def metadata_columns(spec: LabelledSpec, structure: Centres, block: LabelledBlock) -> dict[str, np.ndarray]:
    """The metadata of a block's rows: ``key``, ``label``, ``superclass`` and ``image_path`` (a synthetic uri)."""
    keys = row_keys(spec, block.start, block.start + block.labels.shape[0])
    return {"key": keys, "label": spec.class_name(block.labels),
            "superclass": _names("group-", structure.group_of_class[block.labels], spec.groups),
            "image_path": np.char.add(np.char.add(f"gs://vmem-synthetic/labelled/seed-{spec.seed}/", keys), ".jpg")}


def write_clip_layout(data_dir: str, chunks: Iterable[tuple[int, Mapping[str, np.ndarray], np.ndarray]], *,
                      rows: int, dim: int, rows_per_file: int, dtype: str, info: Mapping) -> int:
    """Streams row blocks into ``data_dir`` in clip-retrieval's layout, in bounded memory; returns the files.

    Each ``img_emb_<i>.npy`` is a memory-mapped .npy written in place and each parquet file gets one row
    group per piece of a block, so memory stays at one block whatever ``rows`` is. The files appear under
    ``data_dir + ".tmp"``, renamed into place at the end (with ``info`` as ``dataset.json``), so an
    interrupted run leaves no half data set behind.

    Args:
      data_dir: Output directory (replaced).
      chunks: ``(start row, {column: [b] strings}, float [b, dim] vectors)`` in row order, covering
        ``rows`` rows; every chunk has the same columns.
      rows, dim: Shape of all vectors together.
      rows_per_file: Rows per file pair (the last may hold fewer).
      dtype: On-disk dtype of the vectors.
      info: JSON-able description written as ``dataset.json``.
    """
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    tmp = data_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "img_emb"))
    os.makedirs(os.path.join(tmp, "metadata"))
    current, emb, writer = -1, None, None
    for start, columns, block in _split_at_files(chunks, rows_per_file):
        i, offset = divmod(start, rows_per_file)
        if i != current:
            if writer is not None:
                emb.flush()
                writer.close()
            current = i
            emb = np.lib.format.open_memmap(os.path.join(tmp, "img_emb", f"img_emb_{i}.npy"), mode="w+",
                                            dtype=dtype, shape=(min(rows_per_file, rows - i * rows_per_file), dim))
            schema = pa.schema([(name, pa.string()) for name in columns])
            writer = pq.ParquetWriter(os.path.join(tmp, "metadata", f"metadata_{i}.parquet"), schema)
        emb[offset:offset + block.shape[0]] = block
        writer.write_table(pa.table(dict(columns), schema=schema))
    if writer is not None:
        emb.flush()
        writer.close()
    del emb
    with open(os.path.join(tmp, DATASET_JSON), "w", encoding="utf-8") as f:
        json.dump(dict(info), f, indent=1, sort_keys=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    os.rename(tmp, data_dir)
    return current + 1


def _split_at_files(chunks: Iterable[tuple[int, Mapping[str, np.ndarray], np.ndarray]], rows_per_file: int
                    ) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray]]:
    for start, columns, block in chunks:
        while block.shape[0]:
            take = min(block.shape[0], rows_per_file - start % rows_per_file)
            yield start, {k: v[:take] for k, v in columns.items()}, block[:take]
            start, block = start + take, block[take:]
            columns = {k: v[take:] for k, v in columns.items()}


def write_dataset(data_dir: str, spec: LabelledSpec, *, log: Callable[[str], None] | None = None) -> float:
    """Writes ``spec``'s draw to ``data_dir`` (replacing it) in clip-retrieval's layout; returns the seconds.

    Args:
      data_dir: Output directory; read it with ``clip:DATA_DIR,label_column=label``.
      spec: The data set.
      log: Receives a progress line per file written and a summary (default: none).
    """
    start_time = time.perf_counter()
    structure = centres(spec)

    def chunks():
        next_report = 0
        for block in iter_blocks(spec, structure=structure):
            stop = block.start + block.labels.shape[0]
            yield block.start, metadata_columns(spec, structure, block), block.vectors
            if log is not None and stop >= next_report:
                log(f"{stop:,} / {spec.rows:,} rows, {time.perf_counter() - start_time:.1f} s")
                next_report = stop + max(spec.rows // 10, 1)

    files = write_clip_layout(data_dir, chunks(), rows=spec.rows, dim=spec.dim, rows_per_file=spec.rows_per_file,
                              dtype=spec.dtype, info=spec.to_dict())
    seconds = time.perf_counter() - start_time
    if log is not None:
        log(f"wrote {spec.rows:,} rows ({spec.classes:,} classes x {spec.per_class:,}, dim {spec.dim}, draw "
            f"{spec.draw}) in {files} file pair(s) to {data_dir} in {seconds:.1f} s")
    return seconds


def _names(prefix: str, index: np.ndarray, count: int) -> np.ndarray:
    return np.char.add(prefix, np.char.zfill(np.asarray(index).astype(str), max(4, len(str(count - 1)))))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.synthetic_data", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="Output directory (replaced); read it as clip:OUT,label_column=label.")
    defaults = LabelledSpec(classes=1, per_class=1)
    for f in dataclasses.fields(LabelledSpec):
        kind = type(getattr(defaults, f.name))
        required = f.name in ("classes", "per_class")
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, required=required,
                       default=None if required else getattr(defaults, f.name),
                       choices=DTYPES if f.name == "dtype" else None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evaluation.synthetic_data --out DIR --classes C --per-class N [...]``; exit 2 on a bad flag."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    try:
        spec = LabelledSpec(**args)
    except ValueError as e:
        parser.error(str(e))  # Exits 2, naming the flag.
    write_dataset(out, spec, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
