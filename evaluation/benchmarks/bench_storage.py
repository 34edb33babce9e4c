"""Bytes per entry and accuracy of one memory stored as float32, bfloat16 and int8 rows.

    python -m evaluation.benchmarks.bench_storage --memory out/fmnist-memory --images data/fashion-mnist/test \
        [--k 10] [--out DIR] [--work-dir DIR]

A shard's only copy of its embeddings is ScaNN's dataset file, in ``IndexConfig.embedding_dtype`` (see
`memory.store.shard`): the rows brute force scores or tree+AH re-ranks with. This benchmark measures what the dtype
costs and saves on a built memory:

1. Reads the memory's live entries (ids, labels, uris and embeddings of every main and delta shard, forgotten
   ids dropped) and rebuilds them with `memory.build.build_memory_local` once per dtype into temporary
   directories: same shard count, sharding, router config and index config, only ``embedding_dtype`` changed.
   Soft-pruning weights are not carried over, so every variant is voted unweighted.
2. Embeds the ``--images`` ImageFolder (``CLASS/IMAGE`` files, the label is the folder name) once with the
   memory's own encoder (`VisualMemory.embed_images`, the preprocessing `vmem classify` uses).
3. Per dtype: bytes on disk per entry over every file of the memory (`bench_scale.bytes_by_kind`: ScaNN's
   dataset file vs the rest); top-1 accuracy of rank voting at ``--k`` (the `vmem classify` default rule and
   k; `evaluation.metrics.accuracy_table` over `memory.decide.voting.predict_all_k`, as `vmem evaluate` computes it)
   and its change against float32 in percentage points; the fraction of queries whose top-k ids equal
   float32's (as a set, and in the same order).
4. A reference row for the old format 1 (embeddings.npy float32 beside ScaNN's float32 dataset, ids and uris
   as fixed-width UTF-32 arrays, labels int32): COMPUTED from the entries, not measured (format 1 can no
   longer be written); ScaNN's other files and the manifests are the measured float32 ones.

Prints a markdown table and writes ``--out``/storage_results.json (default out/bench-storage/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from evaluation.benchmarks.bench_scale import BYTE_KINDS, bytes_by_kind
from evaluation.metrics import accuracy_table
from memory import storage
from memory.build import build_memory_local
from memory.index.shard_index import EmbeddingDtype, IndexConfig
from memory.store.versions import read_manifest
from memory.store.mutations import read_forgotten
from memory.search.routing import RouterConfig
from memory.store.shard import read_shard_data, read_shard_entries
from memory.store.sharding import Sharding
from memory.visual_memory import VisualMemory
from memory.decide.voting import VotingRule, predict_all_k

DTYPES = ("float32", "bfloat16", "int8")
REFERENCE_DTYPE = "float32"
FORMAT1 = "format 1 (computed)"
RULE = VotingRule.RANK
RESULTS_JSON = "storage_results.json"
# np.save writes a 128-byte header for these 1-D/2-D arrays (magic + dict padded to a multiple of 64).
_NPY_HEADER = 128
# Query images decoded and preprocessed per embed_images call: 224x224x3 float32 pixels are 0.6 MB each.
_EMBED_CHUNK = 256


class MemoryEntries(NamedTuple):
    """A memory's live entries and everything needed to rebuild it with another embedding dtype.

    Attributes:
      ids: unicode [n] entry ids.
      labels: unicode [n] class names.
      uris: unicode [n] source uris.
      embeddings: float32 [n, d] unit rows (dequantised if the memory stores bfloat16/int8).
      num_shards: Main shards of the memory.
      index_config: The memory's IndexConfig (its embedding_dtype is replaced per variant).
      sharding: HASH or PARTITION.
      router_config: The partition router's config (default for hash-sharded memories).
      encoder_identity: The manifest's encoder identity (dim included).
    """
    ids: np.ndarray
    labels: np.ndarray
    uris: np.ndarray
    embeddings: np.ndarray
    num_shards: int
    index_config: IndexConfig
    sharding: Sharding
    router_config: RouterConfig
    encoder_identity: dict


def read_memory_entries(root: str) -> MemoryEntries:
    """Reads the latest version of the memory at ``root`` (local or ``gs://``) into memory."""
    manifest = read_manifest(root)
    parts = [read_shard_data(storage.join(root, info.path), info) for info in manifest.all_shards]
    ids = np.concatenate([p.ids for p in parts]) if parts else np.zeros((0,), "<U1")
    label_idx = np.concatenate([p.labels for p in parts]) if parts else np.zeros((0,), np.int32)
    uris = np.concatenate([p.uris for p in parts]) if parts else np.zeros((0,), "<U1")
    emb = (np.concatenate([p.embeddings.reshape(-1, manifest.dim) for p in parts]) if parts
           else np.zeros((0, manifest.dim), np.float32))
    live = ~np.isin(ids, read_forgotten(root, manifest))
    router = manifest.build_config.get("router")
    return MemoryEntries(
        ids=ids[live], labels=np.asarray(manifest.class_names, dtype=str)[label_idx[live]], uris=uris[live],
        embeddings=emb[live], num_shards=len(manifest.shards), index_config=manifest.index_config,
        # A Beam build records its router config even for hash sharding; the manifest's router ref decides.
        sharding=Sharding.HASH if manifest.router is None else Sharding.PARTITION,
        router_config=RouterConfig.from_dict(router) if isinstance(router, dict) else RouterConfig(),
        encoder_identity=dict(manifest.encoder))


def variant_root(work_dir: str, embedding_dtype: str) -> str:
    """Where `measure_storage` builds the ``embedding_dtype`` variant."""
    return os.path.join(work_dir, f"memory-{embedding_dtype}")


def build_variant(root: str, entries: MemoryEntries, embedding_dtype: str) -> None:
    """Builds ``entries`` at ``root`` exactly as the original memory, with rows stored as ``embedding_dtype``."""
    config = dataclasses.replace(entries.index_config, embedding_dtype=embedding_dtype)
    build_memory_local(root, ids=entries.ids, labels=entries.labels, uris=entries.uris,
                       embeddings=entries.embeddings, num_shards=entries.num_shards, index_config=config,
                       encoder_identity=entries.encoder_identity, sharding=entries.sharding,
                       router_config=entries.router_config)


def format1_bytes(float32_root: str, measured_float32: dict[str, int]) -> dict[str, int]:
    """Bytes the float32 memory at ``float32_root`` would take in shard format 1: computed, not measured.

    Format 1 stored per shard ``embeddings.npy`` (float32 [n, d]) next to ScaNN's float32 ``dataset.npy``,
    ``ids.npy`` and ``uris.npy`` as fixed-width UTF-32 (4 bytes x the shard's longest string, for every entry)
    and ``labels.npy`` (int32). ScaNN's other files, the router and the manifests did not change: they are
    taken from ``measured_float32`` (`bench_scale.bytes_by_kind` of the same memory).

    Returns:
      The kinds of `bench_scale.bytes_by_kind`; ``vectors`` = both float32 copies, ``entries`` = the .npy arrays.
    """
    manifest = read_manifest(float32_root)
    vectors = strings = 0
    for info in manifest.all_shards:
        if not info.count:
            continue
        ids, _, uris = read_shard_entries(storage.join(float32_root, info.path))
        m = int(ids.shape[0])
        vectors += 2 * (_NPY_HEADER + 4 * m * manifest.dim)  # embeddings.npy + scann/dataset.npy
        width_id, width_uri = (max(1, int(np.char.str_len(a).max())) for a in (ids, uris))
        strings += (_NPY_HEADER + 4 * width_id * m) + (_NPY_HEADER + 4 * width_uri * m) + (_NPY_HEADER + 4 * m)
    return dict(measured_float32, vectors=vectors, entries=strings)


@dataclasses.dataclass(frozen=True)
class StorageRow:
    """One embedding dtype's figures.

    Attributes:
      variant: ``float32``, ``bfloat16``, ``int8`` or FORMAT1.
      measured: False for the computed format-1 row.
      entries: Live entries in the memory.
      bytes: Bytes on disk by kind (`bench_scale.BYTE_KINDS`); ``vectors`` is ScaNN's dataset file.
      top1: Top-1 accuracy of RULE at k, in [0, 1] (None for the format-1 row).
      delta_points: top1 minus float32's, in percentage points.
      same_topk_set: Fraction of queries whose top-k ids equal float32's as a set.
      same_topk_order: Fraction whose top-k ids equal float32's in the same order.
      accuracy_at_k: Every rule's top-1 accuracy at k (for the JSON).
    """
    variant: str
    measured: bool
    entries: int
    bytes: dict[str, int]
    top1: float | None = None
    delta_points: float | None = None
    same_topk_set: float | None = None
    same_topk_order: float | None = None
    accuracy_at_k: dict[str, float] | None = None

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes.values()))

    @property
    def dataset_bytes(self) -> int:
        return int(self.bytes["vectors"])

    def per_entry(self, nbytes: int) -> float:
        return nbytes / self.entries if self.entries else float("nan")


@dataclasses.dataclass(frozen=True)
class StorageReport:
    k: int
    rule: str
    queries: int
    dim: int
    rows: tuple[StorageRow, ...]

    def row(self, variant: str) -> StorageRow:
        for r in self.rows:
            if r.variant == variant:
                return r
        raise KeyError(f"no row {variant!r}; rows: {[r.variant for r in self.rows]}")

    def to_dict(self) -> dict:
        rows = []
        for r in self.rows:
            d = dataclasses.asdict(r)
            d.update(total_bytes=r.total_bytes, bytes_per_entry=r.per_entry(r.total_bytes),
                     dataset_bytes_per_entry=r.per_entry(r.dataset_bytes),
                     rest_bytes_per_entry=r.per_entry(r.total_bytes - r.dataset_bytes))
            rows.append(d)
        return {"k": self.k, "rule": self.rule, "queries": self.queries, "dim": self.dim, "rows": rows}


def _top1_at_k(labels: np.ndarray, distances: np.ndarray, true: np.ndarray, k: int) -> dict[str, float]:
    table = accuracy_table(predict_all_k(labels, distances, k_max=k), true)
    return {rule: by_k[k] for rule, by_k in table.items()}


def measure_storage(entries: MemoryEntries, query_embeddings: np.ndarray, query_labels: Sequence[str], *,
                    k: int = 10, work_dir: str, dtypes: Sequence[str] = DTYPES) -> StorageReport:
    """Rebuilds ``entries`` once per dtype under ``work_dir`` and measures bytes, accuracy and neighbour agreement.

    Args:
      entries: The memory to rebuild (`read_memory_entries`).
      query_embeddings: [nq, d] query embeddings from the memory's encoder.
      query_labels: [nq] class names of the queries (names the memory does not know always count as wrong).
      k: Neighbours that vote and that are compared with float32's.
      work_dir: Where the variants are built (one sub-directory each, left in place).
      dtypes: Embedding dtypes to build; must include float32, the reference.

    Returns:
      One row per dtype, in ``dtypes`` order, then the computed format-1 row.
    """
    allowed = sorted(d.value for d in EmbeddingDtype)
    unknown = sorted(set(dtypes) - set(allowed))
    if unknown or REFERENCE_DTYPE not in dtypes:
        raise ValueError(f"dtypes must include {REFERENCE_DTYPE!r} and be among {allowed}, "
                         f"got {list(dtypes)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    queries = np.asarray(query_embeddings, dtype=np.float32)
    query_labels = np.asarray(query_labels, dtype=str)
    if queries.ndim != 2 or queries.shape[0] != query_labels.shape[0] or queries.shape[0] == 0:
        raise ValueError(f"need [nq, d] query embeddings and nq labels (nq >= 1), got {queries.shape} and "
                         f"{query_labels.shape}")
    n = int(entries.ids.shape[0])
    ordered = [REFERENCE_DTYPE] + [d for d in dtypes if d != REFERENCE_DTYPE]
    measured: dict[str, tuple[dict[str, int], np.ndarray, dict[str, float]]] = {}
    for dtype in ordered:
        root = variant_root(work_dir, dtype)
        build_variant(root, entries, dtype)
        memory = VisualMemory.open(root)
        class_index = {name: i for i, name in enumerate(memory.class_names)}
        true = np.array([class_index.get(name, -1) for name in query_labels.tolist()], dtype=np.int64)
        result = memory.search(queries, k)
        measured[dtype] = (bytes_by_kind(root), result.ids, _top1_at_k(result.labels, result.distances, true, k))
    ref_ids, ref_acc = measured[REFERENCE_DTYPE][1], measured[REFERENCE_DTYPE][2][RULE.value]
    rows = []
    for dtype in dtypes:
        nbytes, ids, acc = measured[dtype]
        rows.append(StorageRow(
            variant=dtype, measured=True, entries=n, bytes=nbytes, top1=acc[RULE.value],
            delta_points=100.0 * (acc[RULE.value] - ref_acc),
            same_topk_set=float(np.all(np.sort(ids, axis=1) == np.sort(ref_ids, axis=1), axis=1).mean()),
            same_topk_order=float(np.all(ids == ref_ids, axis=1).mean()), accuracy_at_k=acc))
    rows.append(StorageRow(variant=FORMAT1, measured=False, entries=n,
                           bytes=format1_bytes(variant_root(work_dir, REFERENCE_DTYPE), measured[REFERENCE_DTYPE][0])))
    return StorageReport(k=k, rule=RULE.value, queries=int(queries.shape[0]), dim=int(entries.embeddings.shape[1]),
                         rows=tuple(rows))


def markdown_table(report: StorageReport) -> str:
    """The report as one markdown table (bytes per entry, accuracy in %, agreement with float32)."""
    k = report.k
    lines = [f"| rows stored as | bytes/entry | ScaNN dataset file | rest | {report.rule}@{k} top-1 | "
             f"vs float32 (points) | same top-{k} ids as float32 (set / order) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        total, data = r.per_entry(r.total_bytes), r.per_entry(r.dataset_bytes)
        if r.measured:
            acc = f"{100 * r.top1:.2f}"
            delta = f"{r.delta_points:+.2f}"
            same = f"{r.same_topk_set:.3f} / {r.same_topk_order:.3f}"
        else:
            acc = delta = same = "—"
        lines.append(f"| {r.variant} | {total:,.0f} | {data:,.0f} | {total - data:,.0f} | {acc} | {delta} | {same} |")
    return "\n".join(lines)


def embed_query_images(memory_root: str, paths: Sequence[str]) -> np.ndarray:
    """Embeds image files with the memory's own encoder and preprocessing (`VisualMemory.embed_images`)."""
    memory = VisualMemory.open(memory_root)
    encoder = memory.query_encoder()
    return np.concatenate([memory.embed_images(list(paths[s:s + _EMBED_CHUNK]), encoder=encoder)
                           for s in range(0, len(paths), _EMBED_CHUNK)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", required=True, help="a built memory (e.g. out/fmnist-memory)")
    parser.add_argument("--images", required=True, help="ImageFolder of labelled query images (CLASS/IMAGE)")
    parser.add_argument("--k", type=int, default=10, help="neighbours that vote and are compared (default 10)")
    parser.add_argument("--out", default="out/bench-storage", help=f"directory for {RESULTS_JSON}")
    parser.add_argument("--work-dir", default=None,
                        help="where the variants are built and kept (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")

    work = args.work_dir or tempfile.mkdtemp(prefix="vmem-storage-")
    try:
        t0 = time.perf_counter()
        entries = read_memory_entries(args.memory)
        paths, labels = storage.list_image_folder(args.images)
        queries = embed_query_images(args.memory, paths)
        t1 = time.perf_counter()
        report = measure_storage(entries, queries, labels, k=args.k, work_dir=work)
        t2 = time.perf_counter()
        print(f"{args.memory}: {len(entries.ids):,} entries x {report.dim}, {entries.num_shards} shards "
              f"({entries.sharding.value}, index kind {entries.index_config.kind.value}); "
              f"{report.queries:,} queries from {args.images} (read + embed {t1 - t0:.0f} s, "
              f"{len(DTYPES)} builds + searches {t2 - t1:.0f} s)")
        print(markdown_table(report))
        print(f"{FORMAT1}: embeddings.npy + ScaNN float32 dataset.npy + UTF-32 ids/uris + int32 labels computed "
              "from the entries (not measured); ScaNN's other files and manifests as measured for float32.")
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, RESULTS_JSON)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(report.to_dict(), memory=args.memory, images=args.images, byte_kinds=list(BYTE_KINDS)),
                      f, indent=2)
        print(f"wrote {path}")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
