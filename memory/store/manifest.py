"""The memory manifest: the one file that says what a memory directory contains.

A build writes every shard first and the manifest last (atomically), so a directory with a manifest is a
complete memory and a crashed build leaves no manifest: readers never see a half-built memory.

A memory changes by publishing immutable *versions* (``versions/v000001.json``, ...; see memory.store.versions):
each is a full Manifest with its ``version``, ``parent`` and the ``change`` that produced it, plus the
living-memory fields ``delta_shards`` (entries added since the last re-index), ``forgotten`` (tombstones)
and ``entry_weights`` (soft pruning). ``manifest.json`` is a copy of the latest version for tools that do not
know versions; `memory.store.versions.read_manifest` resolves the latest version itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
from typing import Any

from memory import storage
from memory.index.shard_index import EmbeddingDtype, IndexConfig

# 2: shards hold entries.parquet + scann/ (no separate embeddings copy; see memory/store/shard.py). 1: .npy arrays.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
_ENCODER_KEYS = ("name", "content_hash", "dim", "preprocess")
# The build_config key of the memory's IndexConfig (as a dict), the name of configs.build.BuildConfig's field.
INDEX_CONFIG_KEY = "index"
# Read when INDEX_CONFIG_KEY is absent, never written: the key under which existing memories built in-process
# (memory.build.build_memory_local) hold the same dict.
LEGACY_INDEX_CONFIG_KEY = "index_config"


class ManifestError(ValueError):
    """A manifest (or a shard it describes) is missing, malformed or inconsistent."""


CHANGE_KINDS = ("build", "add", "forget", "prune", "reindex", "purge", "calibrate", "metadata", "tune")
_SHA256_LEN = len("sha256:") + 64
WEIGHTS_KINDS = ("soft_pruning",)


class Metric(enum.Enum):
    """Distance metric of the memory. Cosine: distance = 1 - dot of unit vectors."""
    COSINE = "cosine"


@dataclasses.dataclass(frozen=True)
class ShardFile:
    """One file of a shard as the manifest records it: what loading checks the file's bytes against.

    Attributes:
      name: Path relative to the shard directory (``/``-separated), e.g. ``scann/dataset.npy``.
      size: Bytes.
      crc32c: CRC-32C (Castagnoli) of the bytes, 8 lowercase hex digits (`memory.store.integrity`).
    """
    name: str
    size: int
    crc32c: str


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard as recorded in the manifest.

    Attributes:
      name: Shard name, e.g. ``shard-00003-of-00016``.
      path: Shard directory relative to the memory root (``/``-separated).
      count: Number of entries.
      checksum: ``sha256:<hex>`` over every file of the shard, names and sizes included (see
        memory.store.integrity); what `vmem info --verify` recomputes.
      index_kind: ``brute_force``, ``tree_ah`` or ``empty``.
      files: Every file of the shard with its size and CRC-32C, sorted by name: each file is checked against
        its record as it is loaded. Empty for shards written before these were recorded (a re-index records
        them; until then loading checks the whole shard by ``checksum``).
    """
    name: str
    path: str
    count: int
    checksum: str
    index_kind: str
    files: tuple[ShardFile, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; ``files`` only when recorded, so shards without them keep their manifest bytes."""
        d = dataclasses.asdict(self)
        if self.files:
            d["files"] = [dataclasses.asdict(f) for f in self.files]
        else:
            del d["files"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        """Inverse of `to_dict`; raises TypeError on unknown or missing keys."""
        if not isinstance(d, dict):
            raise TypeError(f"expected an object, got {d!r}")
        files = d.get("files") or ()
        if not isinstance(files, (list, tuple)) or not all(isinstance(f, dict) for f in files):
            raise TypeError(f"'files' must be a list of objects, got {files!r}")
        return cls(**dict(d, files=tuple(ShardFile(**f) for f in files)))


@dataclasses.dataclass(frozen=True)
class BuildCounts:
    """Record counts of a build: inputs read, successfully embedded, and failed (dead-lettered)."""
    read: int
    embedded: int
    failed: int


_SHARD_INDEX_KINDS = ("brute_force", "tree_ah", "empty")
# Delta shards are searched exactly: brute force (or empty) only.
_DELTA_INDEX_KINDS = ("brute_force", "empty")


@dataclasses.dataclass(frozen=True)
class ForgottenSet:
    """Tombstones: the ids forgotten but still physically present in some (main or delta) shard.

    Attributes:
      path: File relative to the memory root (e.g. ``tombstones/v000003-1a2b3c4d.npy``): a sorted unicode
        [count] .npy array of ALL such ids (cumulative, not just the last forget's).
      count: Number of ids in the file.
      checksum: ``sha256:<hex>`` of the file's bytes.
    """
    path: str
    count: int
    checksum: str


@dataclasses.dataclass(frozen=True)
class WeightsRef:
    """Per-entry voting weights (soft pruning).

    Attributes:
      path: File relative to the memory root (e.g. ``weights/v000004-1a2b3c4d.npz``) with arrays ``ids``
        (sorted unicode [count]) and ``weights`` (float32 [count], finite, >= 0). Entries absent weigh 1.0.
      count: Number of weighted ids.
      checksum: ``sha256:<hex>`` of the file's bytes.
      kind: What produced the weights; one of WEIGHTS_KINDS.
      params: JSON-serialisable parameters of the producer (e.g. ``{"gamma_numerator": 1.75, "k": 100}``).
    """
    path: str
    count: int
    checksum: str
    kind: str = "soft_pruning"
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RouterRef:
    """The router of a partition-routed memory (memory.search.routing): which main shard owns which region.

    Attributes:
      path: File relative to the memory root (e.g. ``router/router-1a2b3c4d.npz``) holding ``centroids``
        (float32 [count, dim]), ``owners`` (int32 [count], main shard index), ``num_shards`` and ``probes``.
      count: Number of centroids.
      checksum: ``sha256:<hex>`` of the file's bytes.
      probes: Default nearest centroids per query whose shards are searched.
    """
    path: str
    count: int
    checksum: str
    probes: int = 8


@dataclasses.dataclass(frozen=True)
class MetadataRef:
    """Per-entry metadata columns (memory.store.metadata): what filters and crowding can select on.

    Attributes:
      path: File relative to the memory root (e.g. ``metadata/v000004-1a2b3c4d.parquet``): a Parquet table
        with a string ``id`` column (sorted, unique) and one string column per entry of ``columns``.
      count: Rows (entries with metadata; entries absent have no value in any column).
      checksum: ``sha256:<hex>`` of the file's bytes.
      columns: The metadata column names, in file order.
    """
    path: str
    count: int
    checksum: str
    columns: tuple[str, ...] = ()


def sha256_checksum(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``: the checksum format of every file a manifest references."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_checked_file(root: str, manifest: Manifest, ref_path: str, checksum: str, what: str) -> bytes:
    """The bytes of a file ``manifest`` references, after checking them against their recorded checksum.

    Raises:
      ManifestError: naming the version and ``what`` (e.g. "weights file"), when the file is missing or its
        checksum differs (it was modified).
    """
    path = storage.join(root, ref_path)
    try:
        blob = storage.read_bytes(path)
    except FileNotFoundError:
        raise ManifestError(f"version {manifest.version}: {what} {path} missing") from None
    if sha256_checksum(blob) != checksum:
        raise ManifestError(f"version {manifest.version}: {what} {path} checksum mismatch; it was modified")
    return blob


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601 with a ``Z`` suffix, second precision."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything needed to open and trust a memory.

    Attributes:
      format_version: On-disk format version (FORMAT_VERSION).
      encoder: EncoderIdentity.to_dict(): name, content_hash, dim, preprocess. Queries must be embedded
        with the same encoder.
      dim: Embedding dimension.
      metric: Distance metric.
      class_names: Label vocabulary; stored labels index into it.
      shards: All shards, in shard-index order.
      build_config: Free-form, JSON-serialisable description of the build (sources, batch sizes, ...); the
        IndexConfig is under ``INDEX_CONFIG_KEY`` (read it as `index_config`).
      counts: Build record counts.
      created_at: ISO-8601 UTC timestamp.
      version: This version's number (>= 1); a memory built before versions existed reads as version 1.
      parent: The version this one was derived from (None for a build).
      change: What produced this version: ``{"kind": one of CHANGE_KINDS, "at": ISO time, "summary": str,
        ...kind-specific details (counts)}``. Empty for manifests written by code that predates versions
        (it then reads as a build; see memory.store.versions.history).
      delta_shards: Brute-force shards of entries added since the last re-index, searched exactly together
        with ``shards``.
      forgotten: Tombstones of forgotten entries still physically present in ``shards``/``delta_shards``;
        searches skip them exactly. None when nothing is forgotten.
      entry_weights: Soft-pruning weights multiplied into neighbours' votes; None for none.
      router: For a partition-routed memory, the router assigning entries to main shards and queries to the
        shards they visit (delta shards are always visited); None for a hash-sharded memory, whose queries
        visit every shard.
      calibration: The vote-confidence calibration fitted on a held-out split (memory.decide.confidence.Calibration
        as a dict: method, score, rule, k, knots or coefficients, the version it was fitted on); None when
        the memory was never calibrated. Later versions carry it forward; `fitted_on_version` says whether
        the memory changed since.
      search_defaults: The default search setting found by `vmem tune` (memory.search.tuning: leaves_fraction,
        reorder, route_probes, and what it was tuned for under ``tuned``); None -> the build's own setting.
      metadata: Per-entry metadata columns (filters and crowding select on them, memory.store.metadata); None for
        none. Later versions carry it forward; entries added later have no metadata until it is attached.
    """
    format_version: int
    encoder: dict
    dim: int
    metric: Metric
    class_names: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    build_config: dict
    counts: BuildCounts
    created_at: str
    version: int = 1
    parent: int | None = None
    change: dict = dataclasses.field(default_factory=dict)
    delta_shards: tuple[ShardInfo, ...] = ()
    forgotten: ForgottenSet | None = None
    entry_weights: WeightsRef | None = None
    router: RouterRef | None = None
    calibration: dict | None = None
    metadata: MetadataRef | None = None
    search_defaults: dict | None = None

    @property
    def all_shards(self) -> tuple[ShardInfo, ...]:
        """Main shards then delta shards: everything a search must visit."""
        return tuple(self.shards) + tuple(self.delta_shards)

    @property
    def index_config(self) -> IndexConfig:
        """The IndexConfig the memory was built with; IndexConfig() when the build recorded none.

        Read from ``build_config[INDEX_CONFIG_KEY]``, else from ``build_config[LEGACY_INDEX_CONFIG_KEY]``.
        """
        raw = self.build_config.get(INDEX_CONFIG_KEY, self.build_config.get(LEGACY_INDEX_CONFIG_KEY))
        return IndexConfig.from_dict(raw) if isinstance(raw, dict) else IndexConfig()

    @property
    def embedding_dtype(self) -> EmbeddingDtype:
        """How the memory's shards store their rows (`index_config`'s embedding_dtype)."""
        return self.index_config.embedding_dtype

    @property
    def physical_total(self) -> int:
        """Rows stored in main and delta shards, forgotten ones included."""
        return sum(s.count for s in self.all_shards)

    @property
    def total(self) -> int:
        """Number of live entries: rows in main and delta shards minus forgotten ones."""
        return self.physical_total - (self.forgotten.count if self.forgotten else 0)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format_version": self.format_version,
            "encoder": dict(self.encoder),
            "dim": self.dim,
            "metric": self.metric.value,
            "class_names": list(self.class_names),
            "shards": [s.to_dict() for s in self.shards],
            "build_config": dict(self.build_config),
            "counts": dataclasses.asdict(self.counts),
            "created_at": self.created_at,
            "version": self.version,
            "parent": self.parent,
            "change": dict(self.change),
            "delta_shards": [s.to_dict() for s in self.delta_shards],
            "forgotten": dataclasses.asdict(self.forgotten) if self.forgotten else None,
            "entry_weights": dataclasses.asdict(self.entry_weights) if self.entry_weights else None,
        }
        # Written only when present, so hash-sharded memories keep the format that older readers accept.
        if self.router is not None:
            d["router"] = dataclasses.asdict(self.router)
        if self.calibration is not None:
            d["calibration"] = dict(self.calibration)
        if self.metadata is not None:
            d["metadata"] = dict(dataclasses.asdict(self.metadata), columns=list(self.metadata.columns))
        if self.search_defaults is not None:
            d["search_defaults"] = dict(self.search_defaults)
        return d

    def to_json(self) -> str:
        """Serialises to JSON (sorted keys, indent 2) so equal manifests are byte-identical."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parses a dict produced by to_dict; raises ManifestError naming the bad field."""
        if not isinstance(d, dict):
            raise ManifestError(f"manifest must be a JSON object, got {type(d).__name__}")
        expected = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(expected - set(d) - set(_OPTIONAL_FIELDS))
        if missing:
            raise ManifestError(f"manifest is missing field(s) {missing}")
        unknown = sorted(set(d) - expected)
        if unknown:
            raise ManifestError(f"manifest has unknown field(s) {unknown}; allowed: {sorted(expected)}")
        try:
            metric = Metric(d["metric"])
        except ValueError:
            raise ManifestError(
                f"manifest field 'metric': unknown value {d['metric']!r}; allowed: {[m.value for m in Metric]}"
            ) from None
        try:
            shards = tuple(ShardInfo.from_dict(s) for s in d["shards"])
        except TypeError as e:
            raise ManifestError(f"manifest field 'shards': malformed entry ({e})") from None
        try:
            counts = BuildCounts(**d["counts"])
        except TypeError as e:
            raise ManifestError(f"manifest field 'counts': malformed ({e})") from None
        try:
            delta_shards = tuple(ShardInfo.from_dict(s) for s in d.get("delta_shards") or ())
        except TypeError as e:
            raise ManifestError(f"manifest field 'delta_shards': malformed entry ({e})") from None
        optional = {}
        for name, kind in (("forgotten", ForgottenSet), ("entry_weights", WeightsRef), ("router", RouterRef),
                           ("metadata", MetadataRef)):
            raw = d.get(name)
            if raw is not None:
                try:
                    optional[name] = kind(**raw) if name != "metadata" else kind(
                        **dict(raw, columns=tuple(raw.get("columns") or ())))
                except TypeError as e:
                    raise ManifestError(f"manifest field {name!r}: malformed ({e})") from None
        return cls(
            format_version=d["format_version"],
            encoder=d["encoder"],
            dim=d["dim"],
            metric=metric,
            class_names=tuple(d["class_names"]),
            shards=shards,
            build_config=d["build_config"],
            counts=counts,
            created_at=d["created_at"],
            version=d.get("version", 1),
            parent=d.get("parent"),
            change=d.get("change") if d.get("change") is not None else {},
            delta_shards=delta_shards,
            calibration=d.get("calibration"),
            search_defaults=d.get("search_defaults"),
            **optional,
        )

    @classmethod
    def from_json(cls, s: str) -> Manifest:
        """Parses and validates a manifest JSON string."""
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from None
        manifest = cls.from_dict(d)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Checks internal consistency.

        Raises:
          ManifestError: naming the first bad field, its value and what is allowed.
        """
        def _int(name, value, minimum):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ManifestError(f"manifest field {name!r}: expected an int >= {minimum}, got {value!r}")

        if self.format_version not in READABLE_FORMAT_VERSIONS:
            raise ManifestError(
                f"manifest field 'format_version': unsupported version {self.format_version!r}; this code reads "
                f"versions {list(READABLE_FORMAT_VERSIONS)} (rebuild the memory, or use the matching code version)")
        _int("dim", self.dim, 1)
        if not isinstance(self.metric, Metric):
            raise ManifestError(f"manifest field 'metric': expected a Metric, got {self.metric!r}")
        if not isinstance(self.encoder, dict):
            raise ManifestError(f"manifest field 'encoder': expected an object, got {self.encoder!r}")
        missing = [k for k in _ENCODER_KEYS if k not in self.encoder]
        if missing:
            raise ManifestError(f"manifest field 'encoder': missing key(s) {missing}; required: {list(_ENCODER_KEYS)}")
        if self.encoder["dim"] != self.dim:
            raise ManifestError(
                f"manifest field 'encoder.dim' ({self.encoder['dim']!r}) does not match 'dim' ({self.dim!r})")
        if not all(isinstance(c, str) for c in self.class_names):
            raise ManifestError(f"manifest field 'class_names': all entries must be strings, got {self.class_names!r}")
        if len(set(self.class_names)) != len(self.class_names):
            dupes = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
            raise ManifestError(f"manifest field 'class_names': duplicate name(s) {dupes}")
        names, paths = set(), set()
        for i, (field, shard) in enumerate(
                [("shards", s) for s in self.shards] + [("delta_shards", s) for s in self.delta_shards]):
            where = f"{field}[{i if field == 'shards' else i - len(self.shards)}]"
            if not isinstance(shard, ShardInfo):
                raise ManifestError(f"manifest field {where!r}: expected ShardInfo, got {shard!r}")
            if not shard.name or shard.name in names:
                raise ManifestError(f"manifest field '{where}.name': empty or duplicate name {shard.name!r}")
            if (not shard.path or shard.path in paths or shard.path.startswith("/") or "://" in shard.path
                or ".." in shard.path.split("/")):
                raise ManifestError(
                    f"manifest field '{where}.path': {shard.path!r} must be a unique path relative to the memory root")
            names.add(shard.name)
            paths.add(shard.path)
            _int(f"{where}.count", shard.count, 0)
            if not (isinstance(shard.checksum, str) and shard.checksum.startswith("sha256:")
                    and len(shard.checksum) == len("sha256:") + 64):
                raise ManifestError(
                    f"manifest field '{where}.checksum': expected 'sha256:<64 hex>', got {shard.checksum!r}")
            _validate_shard_files(where, shard.files)
            if shard.index_kind not in _SHARD_INDEX_KINDS:
                raise ManifestError(
                    f"manifest field '{where}.index_kind': {shard.index_kind!r}; allowed: {list(_SHARD_INDEX_KINDS)}")
            if (shard.index_kind == "empty") != (shard.count == 0):
                raise ManifestError(
                    f"manifest field '{where}.index_kind': {shard.index_kind!r} inconsistent with count {shard.count}")
            if field == "delta_shards" and shard.index_kind not in _DELTA_INDEX_KINDS:
                raise ManifestError(
                    f"manifest field '{where}.index_kind': {shard.index_kind!r}; delta shards are searched exactly, "
                    f"allowed: {list(_DELTA_INDEX_KINDS)} (write them with memory.store.mutations.write_delta_shard)")
        self._validate_versioning(paths)
        if not isinstance(self.build_config, dict):
            raise ManifestError(f"manifest field 'build_config': expected an object, got {self.build_config!r}")
        if not isinstance(self.counts, BuildCounts):
            raise ManifestError(f"manifest field 'counts': expected BuildCounts, got {self.counts!r}")
        for field in ("read", "embedded", "failed"):
            _int(f"counts.{field}", getattr(self.counts, field), 0)
        try:
            ts = datetime.datetime.fromisoformat(self.created_at.replace("Z", "+00:00"))
        except (AttributeError, ValueError):
            raise ManifestError(
                f"manifest field 'created_at': not an ISO-8601 timestamp: {self.created_at!r}") from None
        if ts.utcoffset() != datetime.timedelta(0):
            raise ManifestError(f"manifest field 'created_at': must be UTC, got {self.created_at!r}")

    def _validate_versioning(self, shard_paths: set[str]) -> None:
        def _int(name, value, minimum):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ManifestError(f"manifest field {name!r}: expected an int >= {minimum}, got {value!r}")

        _int("version", self.version, 1)
        if self.parent is not None:
            _int("parent", self.parent, 1)
            if self.parent >= self.version:
                raise ManifestError(f"manifest field 'parent': {self.parent} must be < version {self.version}")
        if not isinstance(self.change, dict):
            raise ManifestError(f"manifest field 'change': expected an object, got {self.change!r}")
        if self.change and self.change.get("kind") not in CHANGE_KINDS:
            raise ManifestError(
                f"manifest field 'change.kind': {self.change.get('kind')!r}; allowed: {list(CHANGE_KINDS)}")
        try:
            json.dumps(self.change)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"manifest field 'change': not JSON-serialisable ({e})") from None
        kinds = {"forgotten": ForgottenSet, "entry_weights": WeightsRef, "router": RouterRef, "metadata": MetadataRef}
        for name, ref in (("forgotten", self.forgotten), ("entry_weights", self.entry_weights),
                          ("router", self.router), ("metadata", self.metadata)):
            if ref is None:
                continue
            if not isinstance(ref, kinds[name]):
                raise ManifestError(f"manifest field {name!r}: malformed value {ref!r}")
            if (not isinstance(ref.path, str) or not ref.path or ref.path.startswith("/") or "://" in ref.path
                    or ".." in ref.path.split("/") or ref.path in shard_paths):
                raise ManifestError(
                    f"manifest field '{name}.path': {ref.path!r} must be a file path relative to the memory root")
            _int(f"{name}.count", ref.count, 0)
            if not (isinstance(ref.checksum, str) and ref.checksum.startswith("sha256:")
                    and len(ref.checksum) == _SHA256_LEN):
                raise ManifestError(
                    f"manifest field '{name}.checksum': expected 'sha256:<64 hex>', got {ref.checksum!r}")
        if self.forgotten is not None and self.forgotten.count > self.physical_total:
            raise ManifestError(f"manifest field 'forgotten.count': {self.forgotten.count} exceeds the "
                                f"{self.physical_total} rows stored in the shards")
        if self.calibration is not None:
            if not isinstance(self.calibration, dict) or not isinstance(self.calibration.get("method"), str):
                raise ManifestError(f"manifest field 'calibration': expected an object with a 'method', got "
                                    f"{self.calibration!r}")
            try:
                json.dumps(self.calibration, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ManifestError(f"manifest field 'calibration': not JSON-serialisable ({e})") from None
        if self.search_defaults is not None and not isinstance(self.search_defaults, dict):
            raise ManifestError(f"manifest field 'search_defaults': expected an object, got {self.search_defaults!r}")
        if self.metadata is not None and (
                not self.metadata.columns or not all(isinstance(c, str) and c and c != "id"
                                                     for c in self.metadata.columns)):
            raise ManifestError(f"manifest field 'metadata.columns': expected non-empty column names other than "
                                f"'id', got {list(self.metadata.columns)!r}")
        if self.router is not None:
            _int("router.count", self.router.count, 1)
            _int("router.probes", self.router.probes, 1)
        if self.entry_weights is not None:
            if self.entry_weights.kind not in WEIGHTS_KINDS:
                raise ManifestError(f"manifest field 'entry_weights.kind': {self.entry_weights.kind!r}; allowed: "
                                    f"{list(WEIGHTS_KINDS)}")
            if not isinstance(self.entry_weights.params, dict):
                raise ManifestError(
                    f"manifest field 'entry_weights.params': expected an object, got {self.entry_weights.params!r}")


def _validate_shard_files(where: str, files: tuple[ShardFile, ...]) -> None:
    names = []
    for j, f in enumerate(files):
        at = f"{where}.files[{j}]"
        if not isinstance(f, ShardFile):
            raise ManifestError(f"manifest field {at!r}: expected ShardFile, got {f!r}")
        if (not isinstance(f.name, str) or not f.name or f.name.startswith("/") or "://" in f.name
                or "\\" in f.name or any(part in ("", ".", "..") for part in f.name.split("/"))):
            raise ManifestError(f"manifest field '{at}.name': {f.name!r} must be a path relative to the shard")
        if isinstance(f.size, bool) or not isinstance(f.size, int) or f.size < 0:
            raise ManifestError(f"manifest field '{at}.size': expected an int >= 0, got {f.size!r}")
        if not (isinstance(f.crc32c, str) and len(f.crc32c) == 8
                and all(c in "0123456789abcdef" for c in f.crc32c)):
            raise ManifestError(f"manifest field '{at}.crc32c': expected 8 lowercase hex digits, got {f.crc32c!r}")
        names.append(f.name)
    if names != sorted(set(names)):
        raise ManifestError(f"manifest field '{where}.files': names must be unique and sorted, got {names}")


_OPTIONAL_FIELDS = ("version", "parent", "change", "delta_shards", "forgotten", "entry_weights", "router",
                   "calibration", "metadata", "search_defaults")


def manifest_path(root: str) -> str:
    return storage.join(root, MANIFEST_NAME)


def read_manifest_file(path: str) -> Manifest:
    """Reads and validates one manifest JSON file (a version file or manifest.json)."""
    try:
        text = storage.read_text(path)
    except (FileNotFoundError, IsADirectoryError) as e:
        # A directory in the manifest's place holds no manifest either.
        what = "missing (a directory is in its place)" if isinstance(e, IsADirectoryError) else "missing"
        raise ManifestError(
            f"not a visual memory: {path} {what}; build one with `vmem build ...` "
            "(or memory.build.build_memory_local)") from None
    try:
        return Manifest.from_json(text)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
