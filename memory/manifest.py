"""The memory manifest: the one file that says what a memory directory contains.

A build writes every shard first and the manifest last (atomically), so a directory with a manifest is a
complete memory and a crashed build leaves no manifest: readers never see a half-built memory.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
from typing import Any

from memory import storage

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_ENCODER_KEYS = ("name", "content_hash", "dim", "preprocess")


class ManifestError(ValueError):
    """A manifest (or a shard it describes) is missing, malformed or inconsistent."""


class Metric(enum.Enum):
    """Distance metric of the memory. Cosine: distance = 1 - dot of unit vectors."""
    COSINE = "cosine"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard as recorded in the manifest.

    Attributes:
      name: Shard name, e.g. ``shard-00003-of-00016``.
      path: Shard directory relative to the memory root (``/``-separated).
      count: Number of entries.
      checksum: ``sha256:<hex>`` over the shard's four .npy files (see memory.shard).
      index_kind: ``brute_force``, ``tree_ah`` or ``empty``.
    """
    name: str
    path: str
    count: int
    checksum: str
    index_kind: str


@dataclasses.dataclass(frozen=True)
class BuildCounts:
    """Record counts of a build: inputs read, successfully embedded, and failed (dead-lettered)."""
    read: int
    embedded: int
    failed: int


_SHARD_INDEX_KINDS = ("brute_force", "tree_ah", "empty")


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
      build_config: Free-form, JSON-serialisable description of the build (index config, sources, ...).
      counts: Build record counts.
      created_at: ISO-8601 UTC timestamp.
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

    @property
    def total(self) -> int:
        """Total number of entries over all shards."""
        return sum(s.count for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "encoder": dict(self.encoder),
            "dim": self.dim,
            "metric": self.metric.value,
            "class_names": list(self.class_names),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "build_config": dict(self.build_config),
            "counts": dataclasses.asdict(self.counts),
            "created_at": self.created_at,
        }

    def to_json(self) -> str:
        """Serialises to JSON (sorted keys, indent 2) so equal manifests are byte-identical."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parses a dict produced by to_dict; raises ManifestError naming the bad field."""
        if not isinstance(d, dict):
            raise ManifestError(f"manifest must be a JSON object, got {type(d).__name__}")
        expected = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(expected - set(d))
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
            shards = tuple(ShardInfo(**s) for s in d["shards"])
        except TypeError as e:
            raise ManifestError(f"manifest field 'shards': malformed entry ({e})") from None
        try:
            counts = BuildCounts(**d["counts"])
        except TypeError as e:
            raise ManifestError(f"manifest field 'counts': malformed ({e})") from None
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

        if self.format_version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest field 'format_version': unsupported version {self.format_version!r}; this code reads "
                f"version {FORMAT_VERSION} (rebuild the memory, or use the matching code version)")
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
        for i, shard in enumerate(self.shards):
            where = f"shards[{i}]"
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
            if shard.index_kind not in _SHARD_INDEX_KINDS:
                raise ManifestError(
                    f"manifest field '{where}.index_kind': {shard.index_kind!r}; allowed: {list(_SHARD_INDEX_KINDS)}")
            if (shard.index_kind == "empty") != (shard.count == 0):
                raise ManifestError(
                    f"manifest field '{where}.index_kind': {shard.index_kind!r} inconsistent with count {shard.count}")
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


def manifest_path(root: str) -> str:
    return storage.join(root, MANIFEST_NAME)


def write_manifest(root: str, manifest: Manifest) -> None:
    """Validates and atomically writes ``<root>/manifest.json``; call it last, after every shard."""
    manifest.validate()
    storage.write_text(manifest_path(root), manifest.to_json())


def read_manifest(root: str) -> Manifest:
    """Reads and validates ``<root>/manifest.json``.

    Raises:
      ManifestError: if it is missing (with how to build one), malformed or inconsistent.
    """
    path = manifest_path(root)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ManifestError(
            f"not a visual memory: {path} missing; build one with `vmem build ...` "
            "(or memory.build.build_memory_local)") from None
    try:
        return Manifest.from_json(text)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
