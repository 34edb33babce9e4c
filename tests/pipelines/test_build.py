"""The build job end to end on the DirectRunner with a tiny real SavedModel encoder.

The memory it writes is read back through the public API and compared with brute force over the stored
embeddings; bad files must all reach the dead-letter output with reasons.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from memory.store.versions import read_manifest
from memory.store.shard import read_shard_data
from memory.visual_memory import VisualMemory
from pipelines import build
from pipelines.records import FailedRecord
from tests.conftest import BAD_FILES, brute_force_topk


def _stored(memory_dir: str):
    manifest = read_manifest(memory_dir)
    parts = [read_shard_data(os.path.join(memory_dir, s.path)) for s in manifest.shards]
    ids = np.concatenate([p.ids for p in parts])
    emb = np.concatenate([p.embeddings for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    return manifest, ids, emb, labels


def _dead_letters(memory_dir: str) -> list[FailedRecord]:
    out = []
    for path in glob.glob(os.path.join(memory_dir, "dead_letter", "*.jsonl")):
        with open(path) as f:
            out += [FailedRecord.from_json(line) for line in f if line.strip()]
    return out


def _build(images: str, output: str, config: str, *extra: str) -> None:
    build.run(["--images", images, "--output", output, "--config", config, *extra])


def test_build_search_matches_brute_force_and_is_independent_of_sharding(
        fmnist_small, tiny_encoder_config_file, tmp_path):
    images = os.path.join(fmnist_small, "train")
    _build(images, str(tmp_path / "m3"), tiny_encoder_config_file)  # 3 shards from the config.
    _build(images, str(tmp_path / "m1"), tiny_encoder_config_file, "--shards", "1")
    _build(images, str(tmp_path / "m4"), tiny_encoder_config_file, "--shards", "4")

    manifest, ids, emb, labels = _stored(str(tmp_path / "m3"))
    assert manifest.counts.read == manifest.counts.embedded == 200 and manifest.counts.failed == 0
    assert len(manifest.shards) == 3 and sum(s.count for s in manifest.shards) == 200
    assert all(s.count > 30 for s in manifest.shards)  # The stable hash spreads ids.
    assert manifest.encoder["name"] == "tiny" and manifest.dim == 48
    assert len(manifest.class_names) == 10 and list(manifest.class_names) == sorted(manifest.class_names)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # Ids are ImageFolder-relative paths, and each label is its directory's class.
    for entry_id, label in zip(ids, labels):
        assert entry_id.split("/")[0] == manifest.class_names[label]

    rng = np.random.default_rng(0)
    queries = emb[rng.choice(len(emb), 25, replace=False)] + rng.normal(0, 0.05, (25, 48)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    memories = {n: VisualMemory.open(str(tmp_path / f"m{n}")) for n in (1, 3, 4)}
    results = {n: m.search(queries, 10) for n, m in memories.items()}
    true_idx, true_d = brute_force_topk(emb, queries, 10)
    for n, res in results.items():
        recall = np.mean([len(set(res.ids[i]) & set(ids[true_idx[i]])) / 10 for i in range(25)])
        assert recall == 1.0, (n, recall)
        np.testing.assert_allclose(res.distances, true_d, atol=1e-5)
    np.testing.assert_array_equal(results[1].ids, results[4].ids)
    np.testing.assert_array_equal(results[1].ids, results[3].ids)


def test_bad_files_go_to_dead_letter_and_counts_add_up(mixed_folder, tiny_encoder_config_file, tmp_path):
    root, n_valid = mixed_folder
    out = str(tmp_path / "mem")
    _build(root, out, tiny_encoder_config_file)
    manifest = read_manifest(out)
    c = manifest.counts
    assert c.embedded == n_valid
    assert c.failed == len(BAD_FILES) + 1
    assert c.read == c.embedded + c.failed
    failures = {f.id: f for f in _dead_letters(out)}
    assert set(failures) == {f"bag/{name}" for name in BAD_FILES} | {"loose.png"}
    assert failures["bag/empty.jpg"].reason == "empty_file"
    assert failures["bag/notes.txt"].stage == "decode" and failures["bag/notes.txt"].reason
    assert failures["bag/corrupt.png"].stage == "decode"
    assert failures["loose.png"].reason == "not_in_class_dir"
    assert all(f.detail for f in failures.values())
    assert manifest.build_config["dead_letter_files"]
    assert len(VisualMemory.open(out)) == n_valid


def test_refuses_to_overwrite_a_memory_unless_asked(fmnist_small, tiny_encoder_config_file, tmp_path):
    images = os.path.join(fmnist_small, "test")
    out = str(tmp_path / "mem")
    _build(images, out, tiny_encoder_config_file)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _build(images, out, tiny_encoder_config_file)
    _build(images, out, tiny_encoder_config_file, "--overwrite", "--shards", "2")
    assert len(read_manifest(out).shards) == 2


def test_empty_hash_buckets_become_empty_shards(fmnist_small, tiny_encoder_config_file, tmp_path):
    # 50 test images over 64 shards: many buckets get no entry but the memory still lists all 64.
    out = str(tmp_path / "mem")
    _build(os.path.join(fmnist_small, "test"), out, tiny_encoder_config_file, "--shards", "64")
    manifest = read_manifest(out)
    assert len(manifest.shards) == 64
    assert sum(s.count for s in manifest.shards) == 50
    assert any(s.count == 0 for s in manifest.shards)
    memory = VisualMemory.open(out)
    _, ids, emb, _ = _stored(out)
    res = memory.search(emb[:1], 3)
    assert res.ids[0, 0] == ids[0]
    assert res.distances[0, 0] == pytest.approx(0.0, abs=1e-5)


def test_partition_build_trains_the_same_router_as_the_local_build_and_routes_entries(
        fmnist_small, tiny_encoder_config_file, tmp_path):
    from memory.search.routing import RouterConfig, read_router, select_sample_rows, train_router
    out = str(tmp_path / "routed")
    _build(os.path.join(fmnist_small, "train"), out, tiny_encoder_config_file, "--shards", "3",
           "--sharding", "partition", "--route-probes", "2")
    manifest, ids, emb, _ = _stored(out)
    assert manifest.build_config["sharding"] == "partition" and manifest.router.probes == 2
    from vmem.info import describe
    assert f"shards       3, partition-routed: {manifest.router.count} router centroids, 2 probes" in describe(manifest)
    router = read_router(out, manifest)
    # The Beam job samples by the same id digest and trains with the same seed as the pure-numpy build.
    ids = ids.astype(str)
    local = train_router(emb[select_sample_rows(ids.tolist(), RouterConfig().training_sample_size)], num_shards=3,
                         config=RouterConfig(probes=2))
    np.testing.assert_allclose(router.centroids, local.centroids, atol=1e-5)
    np.testing.assert_array_equal(router.owners, local.owners)
    offset = 0
    for s, info in enumerate(manifest.shards):
        np.testing.assert_array_equal(router.assign(emb[offset:offset + info.count]), s)
        offset += info.count
    assert manifest.counts.embedded == 200 == offset
    # Probing every centroid searches every shard: exact.
    rng = np.random.default_rng(0)
    queries = emb[rng.choice(len(emb), 20, replace=False)]
    memory = VisualMemory.open(out).with_search_params(route_probes=len(router.centroids))
    true_idx, true_d = brute_force_topk(emb, queries, 10)
    res = memory.search(queries, 10)
    np.testing.assert_allclose(res.distances, true_d, atol=1e-5)
    assert all(set(res.ids[i]) == set(ids[true_idx[i]]) for i in range(20))


@pytest.mark.parametrize("sharding", ["hash", "partition"])
def test_duplicate_ids_become_dead_letters_whatever_the_sharding(fmnist_small, tiny_encoder_config_file, tmp_path,
                                                                sharding):
    # Two different images under one id: a router could send them to different shards, so the partition
    # build must drop the extra copy before routing, as the hash build does inside the shard.
    train = os.path.join(fmnist_small, "train")
    files = sorted(glob.glob(os.path.join(train, "*", "*.png")))[:40]
    lines = [f"{path},{os.path.basename(os.path.dirname(path))},img-{i:03d}" for i, path in enumerate(files)]
    lines += [f"{files[j]},{os.path.basename(os.path.dirname(files[j]))},img-000" for j in (21, 33)]
    listing = tmp_path / "list.csv"
    listing.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / sharding)
    _build(str(listing), out, tiny_encoder_config_file, "--shards", "3", "--sharding", sharding)
    manifest, ids, _, _ = _stored(out)
    assert manifest.counts.read == 42 and manifest.counts.embedded == 40 and manifest.counts.failed == 2
    assert int(np.sum(ids.astype(str) == "img-000")) == 1 and len(set(ids.tolist())) == 40
    dead = _dead_letters(out)
    assert sorted((d.id, d.reason) for d in dead) == [("img-000", "duplicate_id")] * 2
    # The copy kept is the first by uri (files are sorted, so files[0]); the other two are the dead letters.
    assert sorted(d.uri for d in dead) == [files[21], files[33]]


def clip_folder(root, parts, *, dim=24, seed=0, duplicate=None):
    """clip-retrieval layout: img_emb/img_emb_<i>.npy + metadata/metadata_<i>.parquet; returns all rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img_emb"))
    os.makedirs(os.path.join(root, "metadata"))
    keys, labels, emb = [], [], []
    for i, n in enumerate(parts):
        x = rng.normal(size=(n, dim)).astype(np.float16)
        k = [f"p{i}-{j:04d}" for j in range(n)]
        if duplicate is not None and i == 1:
            k[0] = duplicate  # The same id in two parts.
        lab = [f"c{j % 3}" for j in range(n)]
        np.save(os.path.join(root, "img_emb", f"img_emb_{i}.npy"), x)
        pq.write_table(pa.table({"key": k, "label": lab, "image_path": [f"/imgs/{kk}.jpg" for kk in k]}),
                       os.path.join(root, "metadata", f"metadata_{i}.parquet"))
        keys += k
        labels += lab
        emb.append(x.astype(np.float32))
    emb = np.concatenate(emb)
    return np.array(keys), np.array(labels), emb / np.linalg.norm(emb, axis=1, keepdims=True)


@pytest.mark.parametrize("sharding", ["hash", "partition"])
def test_build_from_precomputed_embeddings(tmp_path, sharding):
    """--embeddings: no encoder runs; the shard count follows from the entry count; spills and attempts go."""
    keys, labels, emb = clip_folder(str(tmp_path / "emb"), [300, 250, 150], duplicate="p0-0007")
    out = str(tmp_path / "mem")
    build.run([f"--embeddings=clip:{tmp_path / 'emb'},label_column=label", "--encoder-id=test-clip-24",
               f"--output={out}", "--target-shard-size=200", f"--sharding={sharding}", "--runner=FnApiRunner"])
    manifest, ids, stored, stored_labels = _stored(out)
    assert len(manifest.shards) == 4  # ceil(700 / 200), from the parquet metadata at launch.
    assert manifest.counts.read == 700 and manifest.counts.failed == 1 and manifest.counts.embedded == 699
    assert manifest.encoder["name"] == "test-clip-24" and manifest.dim == 24
    assert manifest.build_config["embeddings"]["kind"] == "clip"
    assert (manifest.router is not None) == (sharding == "partition")
    [dup] = _dead_letters(out)
    assert (dup.id, dup.reason) == ("p0-0007", "duplicate_id")
    # The kept copy is the first by uri: /imgs/p0-0007.jpg from part 0 (part 1's row 0 was renamed to it).
    order = np.argsort(ids)
    keep = np.ones(len(keys), bool)
    keep[300] = False
    ref = np.argsort(keys[keep])
    np.testing.assert_array_equal(ids[order], keys[keep][ref])
    np.testing.assert_allclose(stored[order], emb[keep][ref], atol=1e-6)
    names = np.array(manifest.class_names)
    np.testing.assert_array_equal(names[stored_labels[order]], labels[keep][ref])
    assert sorted(os.listdir(os.path.join(out, "shards"))) == sorted(s.path.split("/")[1] for s in manifest.shards)
    assert not os.path.exists(os.path.join(out, ".build-tmp"))
    mem = VisualMemory.open(out, verify=True)
    found = mem.search(emb[:20], 1)
    assert (found.ids[:, 0] == keys[:20]).mean() >= 0.95


def test_precomputed_build_needs_encoder_id_and_partition_shards_are_checked_before_reading(tmp_path):
    from pipelines.runner import FlagError
    clip_folder(str(tmp_path / "emb"), [40])
    spec = f"--embeddings=clip:{tmp_path / 'emb'},label_column=label"
    with pytest.raises(FlagError, match="--encoder-id"):
        build.run([spec, f"--output={tmp_path / 'a'}", "--runner=FnApiRunner"])
    with pytest.raises(FlagError, match="source holds 40 entries"):
        build.run([spec, "--encoder-id=x", f"--output={tmp_path / 'b'}", "--shards=64", "--sharding=partition",
                   "--runner=FnApiRunner"])
    assert not os.path.exists(tmp_path / "b")  # Refused before anything was written.


def test_manifest_publish_is_idempotent_under_a_retried_step(tmp_path):
    """A retried manifest step finds its own version 1 (success); a different memory there is a conflict."""
    import dataclasses
    from memory.store.versions import ConcurrentUpdateError
    from pipelines.stages.write import publish_build
    clip_folder(str(tmp_path / "emb"), [60])
    out = str(tmp_path / "mem")
    build.run([f"--embeddings=clip:{tmp_path / 'emb'},label_column=label", "--encoder-id=x", f"--output={out}",
               "--runner=FnApiRunner"])
    published = read_manifest(out)
    retried = dataclasses.replace(published, created_at="2030-01-01T00:00:00+00:00", change={})
    assert publish_build(out, retried) == published
    other = dataclasses.replace(retried, counts=dataclasses.replace(retried.counts, read=61, failed=1))
    with pytest.raises(ConcurrentUpdateError):
        publish_build(out, other)


def test_hash_build_of_tree_shards_trains_one_template_and_the_memory_searches_them_as_one(tmp_path):
    """TrainIndexTemplate: every tree+AH shard the Beam build writes shares one template (memory.index.template)."""
    keys, _, emb = clip_folder(str(tmp_path / "emb"), [300, 250, 150])
    out = str(tmp_path / "mem")
    build.run([f"--embeddings=clip:{tmp_path / 'emb'},label_column=label", "--encoder-id=test-clip-24",
               f"--output={out}", "--target-shard-size=200", "--index=tree_ah", "--runner=FnApiRunner"])
    mem = VisualMemory.open(out, verify=True)
    template = mem.manifest.build_config["index_template"]
    assert template["path"].startswith("index_template/") and os.path.isdir(os.path.join(out, template["path"]))
    assert {s.index_kind for s in mem.manifest.shards} == {"tree_ah"}
    assert mem.searched_as == [tuple(s.name for s in mem.manifest.shards)]
    found = mem.with_search_params(leaves_fraction=1.0, reorder=1000).search(emb[:50], 1)
    np.testing.assert_array_equal(found.ids[:, 0], keys[:50])
    # The same build with brute-force shards trains no template.
    out_bf = str(tmp_path / "bf")
    build.run([f"--embeddings=clip:{tmp_path / 'emb'},label_column=label", "--encoder-id=test-clip-24",
               f"--output={out_bf}", "--target-shard-size=200", "--index=brute_force", "--runner=FnApiRunner"])
    assert "index_template" not in VisualMemory.open(out_bf).manifest.build_config
    assert not os.path.exists(os.path.join(out_bf, "index_template"))
