"""The per-shard nearest-neighbour index: one ScaNN searcher over unit vectors.

Distances everywhere in the memory are cosine distances ``1 - dot`` of unit vectors (ScaNN is built with
``dot_product`` and returns similarities; we convert), so results from shards built with different index
kinds merge on one scale.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from typing import Any

import numpy as np

from memory.enums import parse_enum
from memory.index.scann_cpu import import_scann

# AH with lut16 learns 16 centres per block; ScaNN refuses to train on fewer points than that.
_MIN_POINTS_FOR_AH = 16
INDEX_META_NAME = "vmem_index.json"  # Our metadata beside ScaNN's files in a saved index.
_INDEX_META_NAME = INDEX_META_NAME
# Measured on 1M x 256 clustered unit vectors, 500 leaves, one probed, re-rank 75: recall@10 0.971 with
# avq=2.5 against 0.952 without, at the same speed; the fastest setting at recall 0.98 gained 13% and at
# 0.999 40% (one-off runs; compare with `bench_search --avq none` against the default).
AVQ_DEFAULT = 2.5


class EmbeddingDtype(enum.Enum):
    """How a shard's rows are stored inside its ScaNN index, the memory's only copy of its embeddings."""
    FLOAT32 = "float32"  # Exact.
    BFLOAT16 = "bfloat16"  # Half the bytes, ~3 significant digits.
    INT8 = "int8"  # A quarter of the bytes, per-dimension scaled fixed point.

    @classmethod
    def parse(cls, value: str | EmbeddingDtype) -> EmbeddingDtype:
        """``value`` as a member; raises ValueError naming the bad value and the allowed ones."""
        return parse_enum(cls, value, "embedding_dtype")

    @property
    def reorder_type(self) -> str:
        """ScaNN's ``ReorderType`` name for rows stored this way."""
        return self.value.upper()

    @property
    def dataset_file(self) -> str:
        """The file of a saved ShardIndex that holds its rows (see `rows_from_dataset_file`)."""
        return _DATASET_FILES[self]


# The file a serialised ScaNN searcher keeps its rows in, per storage dtype.
_DATASET_FILES = {EmbeddingDtype.FLOAT32: "dataset.npy", EmbeddingDtype.BFLOAT16: "bfloat16_dataset.npy",
                  EmbeddingDtype.INT8: "int8_dataset.npy"}


class IndexKind(enum.Enum):
    """How a shard is searched."""
    AUTO = "auto"  # brute force below IndexConfig.tree_ah_min_size, tree+AH+reorder at/above.
    BRUTE_FORCE = "brute_force"  # Exact.
    TREE_AH = "tree_ah"  # Partitioning tree + anisotropic hashing + exact float reordering.


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How to build (and search) each shard's ScaNN index.

    Attributes:
      kind: Index kind; AUTO picks per shard by size.
      tree_ah_min_size: With AUTO, shards with at least this many entries use TREE_AH.
      num_leaves: Partitioning-tree leaves; None -> ~sqrt(n) (ScaNN README guidance), clipped to n.
      num_leaves_to_search: Leaves probed per query; None -> a heuristic (see `resolve_leaves`) that keeps
        recall@10 >= 0.95 on clustered data, probing most leaves of small shards.
      reorder: Candidates re-scored exactly after AH scoring (at least k are always re-scored).
      dims_per_block: AH dimensions per block (2 is ScaNN's recommended default).
      anisotropic_quantization_threshold: AH anisotropic threshold (0.2 is ScaNN's default for dot product).
      training_sample_size: Points used to train the tree and AH codebooks (at most); None -> all points.
        Default 250k, the value ScaNN's README uses for its 1.2M-point example: training k-means and the AH
        codebooks on every point of a 500k-entry shard took 2 min of a 2-min-per-shard build here.
      ah_training_iterations: k-means iterations per AH codebook (ScaNN's default is 10; faiss trains its
        PQ codebooks with 25).
      embedding_dtype: How ScaNN stores the rows it re-ranks (tree+AH) or scores (brute force), which is also the
        memory's only copy of the embeddings (`EmbeddingDtype`; its string value is accepted): ``float32``
        (exact), ``bfloat16`` (half the bytes, ~3 significant digits) or ``int8`` (a quarter, per-dimension
        scaled fixed point). `memory.store.shard.read_shard_data`
        returns them dequantised to float32, so a re-index of a quantised memory stays quantised.
      spherical: Train the partitioning tree with unit-norm centroids (spherical k-means). Memory entries are
        unit vectors searched by cosine, where plain k-means centroids of different norms bias the leaf
        choice: measured on 300k x 256 clustered unit vectors, 3 of 547 leaves gave recall@10 0.976 with it
        against 0.869 without (and 0.956 needed 20 leaves).
      avq: Anisotropic vector quantization of the partition centres (ScaNN's ``tree(avq=...)``, the eta of
        Guo et al. 2020 applied to leaf assignment); None trains plain centres. See `AVQ_DEFAULT`.
      soar_lambda: SOAR spilling (Sun et al. 2023, ScaNN's ``tree(soar_lambda=...)``): every entry is also
        stored in a second leaf chosen to be orthogonal to its first residual, so fewer leaves find it; the
        AH codes of the spilled copies cost bytes and scan time. None (default) disables it.
    """
    kind: IndexKind = IndexKind.AUTO
    tree_ah_min_size: int = 50_000
    num_leaves: int | None = None
    num_leaves_to_search: int | None = None
    reorder: int = 200
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    training_sample_size: int | None = 250_000
    spherical: bool = True
    ah_training_iterations: int = 10
    embedding_dtype: EmbeddingDtype = EmbeddingDtype.FLOAT32
    avq: float | None = AVQ_DEFAULT
    soar_lambda: float | None = None

    def __post_init__(self):
        if not isinstance(self.kind, IndexKind):
            # Accept the string form (configs, JSON) but store the enum.
            object.__setattr__(self, "kind", _parse_kind(self.kind))
        # Accept the string form (configs, JSON, --embedding-dtype) but store the enum.
        object.__setattr__(self, "embedding_dtype", EmbeddingDtype.parse(self.embedding_dtype))
        for field in ("tree_ah_min_size", "reorder", "dims_per_block", "ah_training_iterations"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexConfig.{field} must be an int >= 1, got {value!r}")
        for field in ("num_leaves", "num_leaves_to_search", "training_sample_size"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"IndexConfig.{field} must be None or an int >= 1, got {value!r}")
        for field in ("avq", "soar_lambda"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"IndexConfig.{field} must be None or a number > 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict (kind and embedding_dtype as their string values)."""
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        d["embedding_dtype"] = self.embedding_dtype.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexConfig:
        """Inverse of to_dict; unknown keys are an error (they are usually typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown IndexConfig field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    def resolve_kind(self, n: int) -> IndexKind:
        """The concrete kind used for a shard of n entries (never AUTO).

        Shards too small to train AH codebooks (< 16 points) are brute force even when TREE_AH is forced;
        brute force is exact, so this only ever improves recall.
        """
        if n < _MIN_POINTS_FOR_AH:
            return IndexKind.BRUTE_FORCE
        if self.kind is IndexKind.AUTO:
            return IndexKind.TREE_AH if n >= self.tree_ah_min_size else IndexKind.BRUTE_FORCE
        return self.kind

    def resolve_leaves(self, n: int) -> tuple[int, int]:
        """Returns (num_leaves, num_leaves_to_search) for a TREE_AH shard of n entries.

        num_leaves defaults to round(sqrt(n)). The leaves-to-search default probes at least 1/8 of the
        leaves (measured: recall@10 0.99 on 20k clustered vectors, 200 centres, with reorder 200) and at
        least enough leaves to scan ~2000 points, so that shards of up to ~2000 entries probe every leaf:
        the partitioner is weakest there and a full scan of a small shard is cheap. On unclustered
        (uniformly random) data 1/8 is not enough (recall@10 ~0.5 at 20k): set num_leaves_to_search.
        """
        leaves = self.num_leaves if self.num_leaves is not None else max(1, round(math.sqrt(n)))
        leaves = max(1, min(leaves, n))
        if self.num_leaves_to_search is not None:
            to_search = self.num_leaves_to_search
        else:
            by_fraction = math.ceil(leaves / 8)
            by_points = math.ceil(leaves * min(1.0, 2000 / n))
            to_search = max(by_fraction, by_points)
        return leaves, max(1, min(to_search, leaves))


def training_threads() -> int:
    """Threads ScaNN trains a tree+AH index with: the cores this process may run on.

    ScaNN's default (0) trains on the calling thread alone. Its k-means (tree and AH codebooks) is not
    bit-reproducible run to run with any thread count, so more threads change no guarantee.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parse_kind(value: Any) -> IndexKind:
    try:
        return IndexKind(value)
    except ValueError:
        raise ValueError(
            f"unknown index kind {value!r}; allowed: {[k.value for k in IndexKind]}") from None


class ShardIndex:
    """A ScaNN searcher over one shard's unit embeddings (metric: dot product; distance = 1 - dot).

    Build with `ShardIndex.build`, persist with `save`/`load` (local directories only: ScaNN's serialize
    cannot write ``gs://``; `memory.store.shard` copies the directory).
    """

    def __init__(self, searcher: Any, *, kind: IndexKind, size: int, dim: int, config: IndexConfig,
                 num_leaves_to_search: int | None, template_id: str | None = None):
        self._searcher = searcher
        # Digest of the memory-wide index template this searcher was built from (memory.index.template), or None.
        self._template_id = template_id
        self._kind = kind
        self._size = size
        self._dim = dim
        self._config = config
        self._leaves_to_search = num_leaves_to_search

    @classmethod
    def build(cls, embeddings: np.ndarray, config: IndexConfig) -> ShardIndex:
        """Builds the index.

        Args:
          embeddings: float32 [n, d] unit rows, n >= 1.
          config: Index configuration; AUTO is resolved from n.

        Returns:
          The built index.
        """
        scann = import_scann()  # Heavy (imports TF); only needed here.

        db = np.ascontiguousarray(embeddings, dtype=np.float32)
        if db.ndim != 2 or db.shape[0] == 0 or db.shape[1] == 0:
            raise ValueError(f"ShardIndex.build needs a non-empty [n, d] array, got shape {db.shape}")
        n, dim = db.shape
        kind = config.resolve_kind(n)
        builder = scann.scann_ops_pybind.builder(db, 10, "dot_product")
        builder.set_n_training_threads(training_threads())
        quantize = scann.ReorderType[config.embedding_dtype.reorder_type]
        leaves_to_search = None
        if kind is IndexKind.BRUTE_FORCE:
            searcher = builder.score_brute_force(quantize=quantize).build()
        else:
            leaves, leaves_to_search = config.resolve_leaves(n)
            sample = min(n, config.training_sample_size or n)
            searcher = builder.tree(
                num_leaves=leaves,
                num_leaves_to_search=leaves_to_search,
                training_sample_size=sample,
                spherical=config.spherical,
                # ScaNN's default (50) would merge the leaves of small shards away.
                min_partition_size=max(1, min(50, n // (2 * leaves))),
                avq=None if config.avq is None else float(config.avq),
                soar_lambda=None if config.soar_lambda is None else float(config.soar_lambda),
            ).score_ah(
                config.dims_per_block,
                anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
                training_sample_size=sample,
                training_iterations=config.ah_training_iterations,
            ).reorder(config.reorder, quantize=quantize).build()
        return cls(searcher, kind=kind, size=n, dim=dim, config=config, num_leaves_to_search=leaves_to_search)

    @property
    def kind(self) -> IndexKind:
        """The resolved index kind (never AUTO)."""
        return self._kind

    @property
    def num_leaves_to_search(self) -> int | None:
        """Leaves probed per query (None for brute force)."""
        return self._leaves_to_search

    def with_search_params(self, *, leaves_to_search: int | None = None, reorder: int | None = None) -> ShardIndex:
        """The same searcher (no copy, no rebuild) probing other numbers of leaves / re-ranking more or fewer.

        ScaNN takes both knobs per query batch, so a recall/speed trade-off can be tuned on a built index.
        Brute-force indexes ignore them.
        """
        if leaves_to_search is not None and leaves_to_search < 1:
            raise ValueError(f"leaves_to_search must be >= 1, got {leaves_to_search}")
        if reorder is not None and reorder < 1:
            raise ValueError(f"reorder must be >= 1, got {reorder}")
        config = self._config if reorder is None else dataclasses.replace(self._config, reorder=reorder)
        leaves = self._leaves_to_search if leaves_to_search is None else leaves_to_search
        return ShardIndex(self._searcher, kind=self._kind, size=self._size, dim=self._dim, config=config,
                          num_leaves_to_search=leaves, template_id=self._template_id)

    @property
    def config(self) -> IndexConfig:
        return self._config

    @property
    def template_id(self) -> str | None:
        """The memory-wide index template this searcher was built from (`memory.index.template`), or None."""
        return self._template_id

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return self._size

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Finds the k nearest rows of each query.

        Args:
          queries: float32 [nq, d] unit rows.
          k: Neighbours per query, >= 1.

        Returns:
          (indices int64 [nq, k], distances float32 [nq, k]) of local row indices and cosine distances,
          nearest first; when k > n the tail is padded with index -1 and distance +inf. Equal distances
          come out in ascending row order (ScaNN's order), i.e. ascending id within a shard written by
          `memory.store.shard.write_shard`.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self._dim:
            raise ValueError(f"queries must have shape [nq, {self._dim}], got {q.shape}")
        nq = q.shape[0]
        idx = np.full((nq, k), -1, dtype=np.int64)
        dist = np.full((nq, k), np.inf, dtype=np.float32)
        if nq == 0:
            return idx, dist
        # Never ask ScaNN for more than n: it pads with index 0 and NaN, which would look like real hits.
        k_eff = min(int(k), self._size)
        if self._kind is IndexKind.BRUTE_FORCE:
            found, sims = self._searcher.search_batched(q, final_num_neighbors=k_eff)
        else:
            found, sims = self._searcher.search_batched(
                q,
                final_num_neighbors=k_eff,
                pre_reorder_num_neighbors=max(self._config.reorder, k_eff),
                leaves_to_search=self._leaves_to_search)
        found = np.asarray(found)
        sims = np.asarray(sims, dtype=np.float32)
        # A tree search can return fewer than k_eff hits when the probed leaves hold fewer points: fewer
        # columns, or (a batch whose other queries found more) NaN-scored padding rows 0, which are no hits.
        width = min(found.shape[1], k_eff) if found.ndim == 2 else 0
        hit = np.isfinite(sims[:, :width])
        idx[:, :width] = np.where(hit, found[:, :width].astype(np.int64), -1)
        dist[:, :width] = np.where(hit, np.float32(1.0) - sims[:, :width], np.inf)
        return idx, dist

    def save(self, local_dir: str) -> None:
        """Serialises the searcher (plus a small JSON of our metadata) into a local directory."""
        os.makedirs(local_dir, exist_ok=True)
        # relative_path=True: the assets file must not embed this (often temporary) directory's absolute path.
        self._searcher.serialize(local_dir, relative_path=True)
        meta = {
            "kind": self._kind.value,
            "size": self._size,
            "dim": self._dim,
            "num_leaves_to_search": self._leaves_to_search,
            "config": self._config.to_dict(),
        }
        if self._template_id is not None:
            meta["template_id"] = self._template_id
        with open(os.path.join(local_dir, _INDEX_META_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, sort_keys=True, indent=2)

    @classmethod
    def load(cls, local_dir: str) -> ShardIndex:
        """Loads an index written by `save` from a local directory."""
        scann = import_scann()

        meta_path = os.path.join(local_dir, _INDEX_META_NAME)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"not a saved ShardIndex: {meta_path} missing")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        searcher = scann.scann_ops_pybind.load_searcher(local_dir)
        return cls(searcher, kind=_parse_kind(meta["kind"]), size=int(meta["size"]), dim=int(meta["dim"]),
                   config=IndexConfig.from_dict(meta["config"]),
                   num_leaves_to_search=meta["num_leaves_to_search"], template_id=meta.get("template_id"))



def rows_from_dataset_file(embedding_dtype: EmbeddingDtype, stored: np.ndarray,
                           int8_multipliers: np.ndarray | None = None) -> np.ndarray:
    """Float32 [n, d] rows from a saved searcher's dataset file: exact for float32, dequantised otherwise.

    ScaNN keeps bfloat16 rows as the int16 bit patterns (the high half of a float32) and int8 rows as
    ``round(x * multiplier)`` per dimension (``int8_multipliers.npy``).
    """
    if embedding_dtype is EmbeddingDtype.FLOAT32:
        return np.asarray(stored, dtype=np.float32)
    if embedding_dtype is EmbeddingDtype.BFLOAT16:
        return (np.asarray(stored).astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if embedding_dtype is EmbeddingDtype.INT8:
        if int8_multipliers is None:
            raise ValueError("int8 rows need int8_multipliers.npy")
        return np.asarray(stored, np.float32) / np.asarray(int8_multipliers, np.float32)[None, :]
    raise ValueError(f"unknown embedding_dtype {embedding_dtype!r}; pass an EmbeddingDtype "
                     f"({', '.join(d.value for d in EmbeddingDtype)})")
