"""Manifest JSON round trip and validation errors."""

import dataclasses
import json

import pytest

from configs.build import BuildConfig
from memory.index.shard_index import EmbeddingDtype, IndexConfig
from memory.store.manifest import (FORMAT_VERSION, INDEX_CONFIG_KEY, LEGACY_INDEX_CONFIG_KEY, BuildCounts, Manifest,
                                   ManifestError, Metric, ShardInfo)
from memory.store.versions import read_manifest, write_manifest
from tests.memory.helpers import ENCODER


def _manifest(**overrides) -> Manifest:
    fields = dict(
        format_version=FORMAT_VERSION,
        encoder=dict(ENCODER),
        dim=32,
        metric=Metric.COSINE,
        class_names=("cat", "dog"),
        shards=(ShardInfo("shard-00000-of-00002", "shard-00000-of-00002", 3, "sha256:" + "a" * 64, "brute_force"),
                ShardInfo("shard-00001-of-00002", "shard-00001-of-00002", 0, "sha256:" + "b" * 64, "empty")),
        build_config={"index_config": {"kind": "auto"}},
        counts=BuildCounts(read=4, embedded=3, failed=1),
        created_at="2026-11-26T12:00:00Z",
    )
    fields.update(overrides)
    return Manifest(**fields)


def test_json_round_trip(tmp_path):
    m = _manifest()
    m.validate()
    assert m.total == 3
    text = m.to_json()
    d = json.loads(text)
    assert d["metric"] == "cosine" and d["shards"][1]["index_kind"] == "empty"
    assert list(d) == sorted(d)  # Sorted keys: equal manifests are byte-identical.
    assert Manifest.from_json(text) == m
    write_manifest(str(tmp_path), m)
    assert read_manifest(str(tmp_path)) == m
    # Version 1 and its manifest.json copy; no temp files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "versions"]
    assert [p.name for p in (tmp_path / "versions").iterdir()] == ["v000001.json"]


@pytest.mark.parametrize("overrides, field", [
    (dict(format_version=3), "format_version"),
    (dict(dim=0), "dim"),
    (dict(dim=16), "encoder.dim"),
    (dict(encoder={"name": "x", "dim": 32}), "encoder"),
    (dict(class_names=("cat", "cat")), "class_names"),
    (dict(counts=BuildCounts(read=-1, embedded=0, failed=0)), "counts.read"),
    (dict(created_at="yesterday"), "created_at"),
    (dict(created_at="2026-11-26T12:00:00"), "created_at"),  # No timezone.
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ManifestError, match=f"'{field}'"):
        _manifest(**overrides).validate()


@pytest.mark.parametrize("shard_overrides, field", [
    (dict(checksum="md5:abc"), "shards[0].checksum"),
    (dict(path="../elsewhere"), "shards[0].path"),
    (dict(path="gs://b/x"), "shards[0].path"),
    (dict(index_kind="hnsw"), "shards[0].index_kind"),
    (dict(index_kind="empty"), "shards[0].index_kind"),  # count 3 but "empty".
    (dict(count=-2), "shards[0].count"),
])
def test_shard_validation_names_the_field(shard_overrides, field):
    m = _manifest()
    bad = dataclasses.replace(m.shards[0], **shard_overrides)
    with pytest.raises(ManifestError, match=field.replace("[", r"\[").replace("]", r"\]")):
        dataclasses.replace(m, shards=(bad,) + m.shards[1:]).validate()


def test_from_json_errors():
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json("{")
    d = json.loads(_manifest().to_json())
    del d["counts"]
    with pytest.raises(ManifestError, match="missing field"):
        Manifest.from_json(json.dumps(d))
    d = json.loads(_manifest().to_json())
    d["metric"] = "l2"
    with pytest.raises(ManifestError, match="'metric'.*allowed"):
        Manifest.from_json(json.dumps(d))
    d = json.loads(_manifest().to_json())
    d["format_version"] = 99
    with pytest.raises(ManifestError, match="unsupported version 99"):
        Manifest.from_json(json.dumps(d))


def test_read_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not a visual memory: .*manifest.json missing; build one with `vmem build"):
        read_manifest(str(tmp_path))


def test_a_directory_named_manifest_json_is_no_manifest(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(ManifestError, match=r"^not a visual memory: .*manifest.json missing \(a directory is in its "
                       r"place\); build one with `vmem build"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize("build_config, dtype", [
    ({"index": {"kind": "tree_ah", "embedding_dtype": "int8"}}, EmbeddingDtype.INT8),  # The key written now.
    ({"index_config": {"kind": "auto", "embedding_dtype": "bfloat16"}}, EmbeddingDtype.BFLOAT16),  # Older key.
    ({"index_config": {"kind": "brute_force"}}, EmbeddingDtype.FLOAT32),  # No dtype recorded: the default.
    ({"source": "synthetic"}, EmbeddingDtype.FLOAT32),  # No index config recorded.
])
def test_index_config_and_embedding_dtype_read_either_key(tmp_path, build_config, dtype):
    write_manifest(str(tmp_path), _manifest(build_config=build_config))
    m = read_manifest(str(tmp_path))
    assert m.embedding_dtype is dtype and m.index_config.embedding_dtype is dtype
    raw = build_config.get(INDEX_CONFIG_KEY, build_config.get(LEGACY_INDEX_CONFIG_KEY))
    assert m.index_config == (IndexConfig.from_dict(raw) if raw else IndexConfig())


def test_new_memories_record_the_index_config_under_one_key():
    config = IndexConfig(kind="brute_force", embedding_dtype="int8")
    assert config.embedding_dtype is EmbeddingDtype.INT8 and config.to_dict()["embedding_dtype"] == "int8"
    assert IndexConfig.from_dict(config.to_dict()) == config
    assert BuildConfig(index=config).to_dict()[INDEX_CONFIG_KEY] == config.to_dict()
    with pytest.raises(ValueError, match="unknown embedding_dtype 'int4'; allowed: float32, bfloat16, int8"):
        IndexConfig(embedding_dtype="int4")
