"""Hash shards that search as one index: one partitioning tree and AH codebook trained for the whole memory.

Searching S hash shards costs S times ScaNN's per-query work (tree scoring, the AH lookup-table build, top-k
and re-ranking bookkeeping: ~14 us per query for a 250k-entry shard at 256 dimensions), so a 4-shard memory
ran at 0.4-0.5x the speed of one index over the same data. This module applies faiss's recipe for
distributed IVF builds (train the quantizers once, add each shard's vectors with them, merge the inverted
lists: faiss ``IndexIVF.merge_from``, contrib ``ondisk.merge_ondisk``) to ScaNN:

1. `train_template` trains a tree+AH searcher on an id-hashed sample of the whole memory (the entries with
   the smallest `memory.search.routing.router_sample_key`, the router's sample rule), with the leaves sized for the
   whole memory, emptied of its rows; `write_template` stores it under ``ROOT/index_template/<digest>/``.
2. `build_from_template` builds a shard's searcher from that template: ScaNN itself assigns the shard's rows
   to the template's leaves and encodes them with its codebook (``upsert`` into the emptied template), so
   every shard shares one partitioner and codebook (their files are byte-identical; `template_id` is their
   digest, recorded in each shard's index metadata).
3. `load_merged` searches a run of such shards as one ScaNN searcher: the per-row files (leaf of each row,
   AH codes, re-ranking rows) are concatenated in shard order, the shared ones taken once. A memory opened
   for querying does this for its hash shards (`VisualMemory.open(merge_shards=True)`, the default), so
   their search costs what one index's does; shards stay the unit of building, adding, forgetting and
   re-indexing.

Shards without a template (older memories, routed memories, brute-force shards) are searched one by one as
before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np

from memory import storage
from memory.index.shard_index import INDEX_META_NAME, EmbeddingDtype, IndexConfig, IndexKind, ShardIndex
from memory.index.scann_cpu import import_scann

TEMPLATE_DIR = "index_template"
_ASSETS_NAME = "scann_assets.pbtxt"
# ScaNN asset types holding one row per datapoint (concatenated when shards merge); every other asset
# (partitioner, AH codebook, int8 multipliers, config) is shared and must be byte-identical.
_ROW_ASSETS = {"TOKENIZATION_NPY", "AH_DATASET_NPY", "DATASET_NPY", "INT8_DATASET_NPY", "INT8_NORMS_NPY",
               "BF16_DATASET_NPY"}
_SHARED_FILES = ("serialized_partitioner.pb", "ah_codebook.pb", "scann_config.pb", "int8_multipliers.npy")
# Rows handed to ScaNN's upsert per call (its argument is a Python list of row arrays).
_UPSERT_BATCH = 65_536
# Rows ScaNN tokenises and encodes together inside one upsert call: the same files as one at a time (checked
# byte for byte), ~30% less CPU (measured on 65,536 x 256 rows).
_UPSERT_INNER_BATCH = 4_096


def template_config(config: IndexConfig, total_entries: int, sample_size: int) -> IndexConfig:
    """The tree+AH config of a memory-wide template: leaves (and leaves probed) resolved for the whole memory.

    A merged search is one index over ``total_entries``, so the tree gets that many entries' leaves (round(sqrt)
    by default, or ``config.num_leaves``); written explicitly, so every shard built from it and the merged
    index resolve the same numbers.
    """
    leaves, to_search = config.resolve_leaves(max(1, total_entries))
    leaves = max(1, min(leaves, sample_size))
    return dataclasses.replace(config, kind=IndexKind.TREE_AH, num_leaves=leaves,
                               num_leaves_to_search=max(1, min(to_search, leaves)),
                               training_sample_size=sample_size)


def uses_template(config: IndexConfig, shard_sizes: Sequence[int]) -> bool:
    """Whether a hash-sharded build of these shard sizes gets a template: some shard resolves to tree+AH, and
    SOAR spilling is off (spilled rows are stored twice, a layout `load_merged` does not concatenate)."""
    # float32 rows only: ScaNN cannot load an emptied template whose re-ranking rows are bfloat16 or int8.
    return (config.soar_lambda is None and config.embedding_dtype is EmbeddingDtype.FLOAT32
            and any(config.resolve_kind(n) is IndexKind.TREE_AH for n in shard_sizes))


def train_template(sample: np.ndarray, config: IndexConfig, total_entries: int) -> ShardIndex:
    """A tree+AH searcher trained on ``sample`` (unit rows drawn from the whole memory) for a memory of
    ``total_entries``, emptied of its rows: a template keeps only what was trained (tree centres and AH
    codebooks, means over many entries, like the router's centroids), never an entry's embedding, so
    forgetting an entry leaves no copy of it here."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or sample.shape[0] < 16:
        raise ValueError(f"an index template needs at least 16 sample rows, got shape {sample.shape}")
    trained = ShardIndex.build(sample, template_config(config, total_entries, sample.shape[0]))
    searcher = trained._searcher  # pylint: disable=protected-access  # Same package: the ScaNN searcher.
    # Deleting swaps the last row into the hole, so the rows go last first.
    searcher.searcher.delete(list(range(sample.shape[0] - 1, -1, -1)))
    return ShardIndex(searcher, kind=IndexKind.TREE_AH, size=0, dim=trained.dim, config=trained.config,
                      num_leaves_to_search=trained.num_leaves_to_search)


def template_id(local_dir: str) -> str:
    """Digest of a searcher's shared files: equal for every shard built from one template."""
    h = hashlib.sha256()
    for name in _SHARED_FILES:
        path = os.path.join(local_dir, name)
        if os.path.isfile(path):
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def write_template(root: str, template: ShardIndex) -> dict:
    """Saves the template under ``root/index_template/<digest>`` (local or ``gs://``) and returns its reference
    ``{"path": root-relative directory, "id": template_id}``. Content-addressed: a retried build step that
    trains another template writes another directory, never over the one shards are being built from."""
    with tempfile.TemporaryDirectory(prefix="vmem-template-") as tmp:
        template.save(tmp)
        tid = template_id(tmp)
        rel = f"{TEMPLATE_DIR}/{tid[:16]}"
        dest = storage.join(root, rel)
        if not storage.exists(storage.join(dest, INDEX_META_NAME)):  # Written last by a finished upload.
            storage.makedirs(dest)
            for name in sorted(os.listdir(tmp), key=lambda n: n == INDEX_META_NAME):
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_bytes(storage.join(dest, name), f.read())
    return {"path": rel, "id": tid}


@contextlib.contextmanager
def local_template(root: str, ref: dict) -> Iterator[str]:
    """A local directory holding the template ``ref`` (from `write_template`) of the memory at ``root``."""
    src = storage.join(root, ref["path"])
    if not storage.exists(src):
        raise FileNotFoundError(f"no index template at {src} (build_config.index_template {ref})")
    with storage.local_dir(src, prefix="vmem-template-") as local:
        if template_id(local) != ref["id"]:
            raise ValueError(f"index template at {src} does not match its recorded digest {ref['id'][:16]}...")
        yield local


def build_from_template(embeddings: np.ndarray, template_dir: str) -> ShardIndex:
    """A shard's tree+AH searcher holding ``embeddings`` (unit rows, in shard row order) in the template's
    leaves and codes: ScaNN's upsert tokenises and encodes them with the template's trained partitioner and
    codebook, which it leaves unchanged."""
    scann = import_scann()
    db = np.ascontiguousarray(embeddings, dtype=np.float32)
    if db.ndim != 2 or db.shape[0] == 0:
        raise ValueError(f"build_from_template needs a non-empty [n, d] array, got shape {db.shape}")
    with open(os.path.join(template_dir, INDEX_META_NAME), encoding="utf-8") as f:
        meta = json.load(f)
    if int(meta["dim"]) != db.shape[1]:
        raise ValueError(f"template at {template_dir} has dim {meta['dim']}, the shard's rows {db.shape[1]}")
    searcher = scann.scann_ops_pybind.load_searcher(template_dir)
    if searcher.searcher.size():
        searcher.searcher.delete(list(range(searcher.searcher.size() - 1, -1, -1)))
    for start in range(0, db.shape[0], _UPSERT_BATCH):
        part = db[start:start + _UPSERT_BATCH]
        got = searcher.searcher.upsert([None] * part.shape[0], list(part), _UPSERT_INNER_BATCH)
        if got[0] != start or got[-1] != start + part.shape[0] - 1:
            raise RuntimeError(f"ScaNN upsert placed rows {got[0]}..{got[-1]}, expected {start}..{start + len(part) - 1}")
    return ShardIndex(searcher, kind=IndexKind.TREE_AH, size=db.shape[0], dim=db.shape[1],
                      config=IndexConfig.from_dict(meta["config"]), num_leaves_to_search=meta["num_leaves_to_search"],
                      template_id=template_id(template_dir))


def merge_runs(template_ids: Sequence[str | None], counts: Sequence[int] | None = None,
               max_rows: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) of the runs of at least two consecutive shards built from one template, each cut to at
    most ``max_rows`` entries (``counts``: entries per shard) so that one merged index stays a worker's load."""
    runs, start = [], 0
    for i in range(1, len(template_ids) + 1):
        if i == len(template_ids) or template_ids[i] is None or template_ids[i] != template_ids[start]:
            if template_ids[start] is not None:
                runs += _cut_run(start, i, counts, max_rows)
            start = i
    return runs


def _cut_run(start: int, stop: int, counts: Sequence[int] | None, max_rows: int | None) -> list[tuple[int, int]]:
    pieces, at, rows = [], start, 0
    for i in range(start, stop):
        size = 0 if counts is None else counts[i]
        if max_rows is not None and i > at and rows + size > max_rows:
            pieces.append((at, i))
            at, rows = i, 0
        rows += size
    pieces.append((at, stop))
    return [(a, b) for a, b in pieces if b - a >= 2]


def _assets(local_dir: str) -> list[tuple[str, str]]:
    with open(os.path.join(local_dir, _ASSETS_NAME), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r'asset_type:\s*(\w+)\s+asset_path:\s*"([^"]+)"', text)


def can_merge(local_dirs: Sequence[str]) -> str | None:
    """None when these saved tree+AH shards can be searched as one index, else why not."""
    if len(local_dirs) < 2:
        return "fewer than two shards"
    metas = []
    for d in local_dirs:
        with open(os.path.join(d, INDEX_META_NAME), encoding="utf-8") as f:
            metas.append(json.load(f))
    ids = {m.get("template_id") for m in metas}
    if None in ids or len(ids) != 1:
        return "the shards were not all built from one index template"
    if any(m["kind"] != IndexKind.TREE_AH.value for m in metas):
        return "not every shard is tree+AH"
    layouts = [_assets(d) for d in local_dirs]
    if any(layout != layouts[0] for layout in layouts):
        return "the shards' ScaNN files differ in layout"
    for kind, path in layouts[0]:
        if kind in _ROW_ASSETS:
            if kind == "TOKENIZATION_NPY" and np.load(os.path.join(local_dirs[0], path), mmap_mode="r").ndim != 1:
                return "the shards' leaves hold spilled (SOAR) rows"
        elif kind != "PARTITIONER" and kind != "AH_CENTERS" and kind != "INT8_MULTIPLIERS_NPY":
            return f"unknown ScaNN asset {kind}"
    if len({template_id(d) for d in local_dirs}) != 1:
        return "the shards' partitioners or codebooks differ"
    return None


def load_merged(local_dirs: Sequence[str]) -> ShardIndex:
    """One searcher over the rows of saved shards built from one template, in the order given (row r of shard
    i is merged row sum(sizes[:i]) + r). Raises ValueError naming why they cannot merge (see `can_merge`)."""
    why = can_merge(local_dirs)
    if why is not None:
        raise ValueError(f"cannot search {len(local_dirs)} shards as one index: {why}")
    scann = import_scann()
    first = local_dirs[0]
    sizes = []
    with tempfile.TemporaryDirectory(prefix="vmem-merged-") as tmp:
        assets = _assets(first)
        row_files = {path for kind, path in assets if kind in _ROW_ASSETS}
        for name in os.listdir(first):  # Shared files (scann_config.pb, codebook, ...) are taken once.
            if name not in row_files and name != INDEX_META_NAME:
                shutil.copyfile(os.path.join(first, name), os.path.join(tmp, name))
        for kind, path in assets:
            if kind not in _ROW_ASSETS:
                continue
            parts = [np.load(os.path.join(d, path), mmap_mode="r") for d in local_dirs]
            if kind == "TOKENIZATION_NPY":
                sizes = [p.shape[0] for p in parts]
            # Written part by part into one .npy (memory-mapped): no second in-memory copy of the rows.
            out = np.lib.format.open_memmap(os.path.join(tmp, path), mode="w+", dtype=parts[0].dtype,
                                            shape=(sum(p.shape[0] for p in parts),) + parts[0].shape[1:])
            at = 0
            for p in parts:
                out[at:at + p.shape[0]] = p
                at += p.shape[0]
            out.flush()
            del out, parts
        searcher = scann.scann_ops_pybind.load_searcher(tmp)
    if searcher.searcher.size() != sum(sizes):
        raise RuntimeError(f"merged searcher holds {searcher.searcher.size()} rows, its shards {sum(sizes)}")
    meta_path = os.path.join(first, INDEX_META_NAME)
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    return ShardIndex(searcher, kind=IndexKind.TREE_AH, size=int(sum(sizes)), dim=int(meta["dim"]),
                      config=IndexConfig.from_dict(meta["config"]), num_leaves_to_search=meta["num_leaves_to_search"],
                      template_id=meta["template_id"])
