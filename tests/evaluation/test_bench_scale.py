"""The pure parts of the scale benchmark: disk accounting, result tables, choices and commands."""

from __future__ import annotations

import json

import pytest

from evaluation.benchmarks import bench_scale, scale_data


@pytest.mark.parametrize("rel, kind", [
    ("shard-00000-of-00004/scann/dataset.npy", "vectors"),
    ("shard-00000-of-00004/scann/bfloat16_dataset.npy", "vectors"),
    ("shard-00000-of-00004/scann/hashed_dataset.npy", "scann"),
    ("shard-00000-of-00004/scann/scann_config.pb", "scann"),
    ("shard-00000-of-00004/embeddings.npy", "vectors"),
    ("shard-00000-of-00004/entries.parquet", "entries"),
    ("shard-00000-of-00004/ids.npy", "entries"),
    ("router/router-abc.npz", "router"),
    ("versions/v000001.json", "manifest+other"),
    ("manifest.json", "manifest+other"),
])
def test_file_kind(rel, kind):
    assert bench_scale.file_kind(rel) == kind


def _result(n: int, **changes) -> bench_scale.SizeResult:
    fields = dict(n=n, builder=bench_scale.BEAM_MARK, build_s=12.345, build_peak_rss_bytes=2_500_000_000,
                  build_peak_rss_source="os.wait4 ru_maxrss (largest process)", bytes_total=n * 1100,
                  bytes_by_kind={"vectors": n * 1024, "scann": n * 60, "entries": n * 10, "router": n * 5,
                                 "manifest+other": n * 1},
                  num_shards=4, shard_kinds=["tree_ah"], load_rss_bytes=1_000_000_000,
                  load_rss_delta_bytes=500_000_000, target_recall=0.95, reached=True,
                  settings="route 2, leaves 0.01, reorder 50/shard", recall=0.9612, qps=1234.4,
                  batch_ms_per_query=0.81, p50_ms=1.234, p99_ms=5.678)
    fields.update(changes)
    return bench_scale.SizeResult(**fields)


def test_table_formats_every_column():
    table = bench_scale.format_table([_result(10_000), _result(100_000, reached=False, recall=0.9)])
    lines = table.splitlines()
    assert lines[0].startswith("| size | build s | build peak RSS GB | bytes/entry | QPS@R>=0.95 | recall@10 | p50 ms")
    assert lines[2] == ("| 10,000 | 12.3 | 2.50 | 1,100 | 1,234 | 0.961 | 1.23 | 5.68 | 1.00 | 4 tree_ah | "
                        "route 2, leaves 0.01, reorder 50/shard | vmem build (Beam) |")
    assert "| MISS (1,234) | 0.900 |" in lines[3]
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    kinds = bench_scale.format_bytes_table([_result(10_000)]).splitlines()
    assert kinds[0] == "| size | total | vectors | scann | entries | router | manifest+other |"
    assert kinds[2] == "| 10,000 | 1,100.0 | 1,024.0 | 60.0 | 10.0 | 5.0 | 1.0 |"


def test_result_json_round_trips_with_bytes_per_entry():
    d = json.loads(json.dumps(_result(1000).to_dict()))
    assert d["bytes_per_entry"] == 1100.0 and d["n"] == 1000 and d["builder"] == bench_scale.BEAM_MARK
    d.pop("bytes_per_entry")
    assert bench_scale.SizeResult(**d) == _result(1000)


def test_select_fastest_and_sizes():
    trials = [bench_scale.Trial("a", 1, 50, 0.01, 0.94, 0.1), bench_scale.Trial("b", 1, 50, 0.02, 0.96, 0.3),
              bench_scale.Trial("c", 2, 20, 0.01, 0.97, 0.2)]
    assert bench_scale.select_fastest(trials, 0.95).settings == "c"
    assert bench_scale.select_fastest(trials, 0.99) is None
    assert bench_scale.parse_sizes("10000,100000") == (10_000, 100_000)
    with pytest.raises(ValueError, match="--sizes"):
        bench_scale.parse_sizes("10k")


def test_spec_and_commands_name_the_data_dir():
    assert "/d/x" in bench_scale.embeddings_spec("/d/x")
    cmd = bench_scale.beam_build_command("/d/x", "/m", sharding="partition", shards=None)
    assert cmd[1:] == ["build", "--embeddings", bench_scale.embeddings_spec("/d/x"), "--encoder-id",
                       scale_data.ENCODER_ID, "--output", "/m", "--sharding", "partition", "--overwrite"]
    assert bench_scale.beam_build_command("/d/x", "/m", sharding="hash", shards=8)[-4:] == [
        "hash", "--overwrite", "--shards", "8"]


def test_spec_parses_as_the_clip_layout_written():
    embedding_sources = pytest.importorskip("pipelines.io.embedding_sources")
    source = embedding_sources.parse_embeddings_spec(bench_scale.embeddings_spec("/d/x"))
    assert source.kind is embedding_sources.EmbeddingKind.CLIP and source.location == "/d/x"
    # write_clip_dataset's label column; ids and uris come from the default key / image_path columns.
    assert source.option("label_column") == "label"
    assert source.option("id_column") is None and source.option("uri_column") is None


def test_open_table_shows_verified_and_unverified_open_and_their_ratio():
    lines = bench_scale.format_open_table([_result(1_000_000, open_verified_s=3.3, open_unverified_s=3.0)]).splitlines()
    assert lines[0] == "| size | open s, verified | open s, verify=False | ratio |"
    assert lines[2] == "| 1,000,000 | 3.30 | 3.00 | 1.100 |"
