"""Region memories through the command line with the bundled encoder: vmem build --regions, vmem classify on
it (text, JSON, the heat-map page), vmem forget of an image id, and the flags that do not apply."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from memory.regions.layout import region_grid
from memory.store.shard import read_shard_data
from memory.store.versions import read_manifest
from memory.visual_memory import VisualMemory
from vmem import main as cli

GRID = 2


@pytest.fixture(scope="module")
def region_memory(fmnist_small, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("regions") / "memory")
    train = os.path.join(fmnist_small, "train")
    # 5 images per class of the 20: enough to vote, quick to embed.
    small = tmp_path_factory.mktemp("small")
    for cls in sorted(os.listdir(train)):
        os.makedirs(small / cls)
        for name in sorted(os.listdir(os.path.join(train, cls)))[:5]:
            os.symlink(os.path.join(train, cls, name), small / cls / name)
    assert cli.main(["build", "--images", str(small), "--output", out, "--shards", "2", "--regions", str(GRID)]) == 0
    return out


def _query(fmnist_small, cls="trouser"):
    folder = os.path.join(fmnist_small, "test", cls)
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def test_build_stores_each_image_as_its_global_and_region_entries(region_memory):
    manifest = read_manifest(region_memory)
    assert region_grid(manifest) == GRID and manifest.build_config["regions"] == GRID
    parts = [read_shard_data(os.path.join(region_memory, s.path)) for s in manifest.shards]
    ids = np.concatenate([p.ids for p in parts]).tolist()
    images = sorted(i for i in ids if "#r" not in i)
    assert len(images) == 50 and len(ids) == 50 * (1 + GRID * GRID)
    assert sorted(ids) == sorted(images + [f"{i}#r{r}" for i in images for r in range(GRID * GRID)])
    emb = np.concatenate([p.embeddings for p in parts])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The global entry is the embedding a global memory stores (the mean of the same feature map).
    memory = VisualMemory.open(region_memory)
    img = images[0]
    stored = memory.get_embeddings([img])
    direct = memory.embed_images([os.path.join(os.path.dirname(os.path.dirname(memory.get_uris([img])[0])),
                                               *img.split("/")[-2:])])
    np.testing.assert_allclose(stored, direct, atol=1e-5)


def test_info_names_the_grid(region_memory, capsys):
    assert cli.main(["info", region_memory]) == 0
    assert "regions      2 x 2 region entries per image besides its global one (5 entries per image" in (
        capsys.readouterr().out)


def test_classify_shows_region_matches_as_text_json_and_heat_maps(region_memory, fmnist_small, tmp_path, capsys):
    query = _query(fmnist_small)
    page = str(tmp_path / "where.html")
    assert cli.main(["classify", "--memory", region_memory, query, "--k", "5", "--explain", "--html", page]) == 0
    text = capsys.readouterr().out
    assert "predicted  trouser" in text and text.count("regions (query -> neighbour, similarity)") == 5
    html = open(page).read()
    heat = re.findall(r'<img class="heat" src="data:image/png;base64,', html)
    winners = text.count("trouser (") - 1  # Neighbour lines of the predicted class (not the "predicted" line).
    assert winners >= 3 and len(heat) == 2 * winners  # One query map and one neighbour map per winner.
    assert "where the winning neighbours matched (2x2 regions, rule maxsim" in html
    assert "http" not in html.split("<body>")[1]  # Inline: no external asset.

    assert cli.main(["classify", "--memory", region_memory, query, "--k", "5", "--explain", "--json",
                     "--region-rule", "global"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["regions"]["region_rule"] == "global" and len(result["regions"]["regions"]) == 5
    assert all("#r" not in n["id"] for n in result["neighbors"])  # Neighbours are images.


def test_forget_of_an_image_id_removes_all_its_entries(region_memory, tmp_path, capsys):
    import shutil
    root = str(tmp_path / "copy")
    shutil.copytree(region_memory, root)
    memory = VisualMemory.open(root)
    victim = sorted(i for i in memory.live_entry_ids().tolist() if "#r" not in i)[0]
    assert cli.main(["forget", "--memory", root, "--ids", _ids_file(tmp_path, [victim])]) == 0
    live = VisualMemory.open(root).live_entry_ids().tolist()
    assert len(live) == 49 * (1 + GRID * GRID) and not any(i.split("#r")[0] == victim for i in live)
    capsys.readouterr()
    assert cli.main(["forget", "--memory", root, "--ids", _ids_file(tmp_path, [f"{live[0].split('#r')[0]}#r1"])]) == 1
    assert "a region memory forgets whole images, so pass the image id" in capsys.readouterr().err


def _ids_file(tmp_path, ids):
    path = tmp_path / f"ids-{len(os.listdir(tmp_path))}.txt"
    path.write_text("\n".join(ids) + "\n")
    return str(path)


def test_flags_that_do_not_apply_are_refused(region_memory, fmnist_small, tmp_path, capsys, tiny_encoder_config_file):
    query = _query(fmnist_small)
    assert cli.main(["classify", "--memory", region_memory, query, "--filter", "label=bag"]) == 2
    assert "do not apply to a region memory's region classify" in capsys.readouterr().err
    assert cli.main(["build", "--images", os.path.join(fmnist_small, "train"), "--output", str(tmp_path / "m"),
                     "--regions", "2", "--config", tiny_encoder_config_file]) == 2
    err = capsys.readouterr().err
    assert "a saved_model encoder" in err and "does not; build region memories with one of those" in err
    assert cli.main(["build", "--images", os.path.join(fmnist_small, "train"), "--output", str(tmp_path / "m"),
                     "--regions", "1"]) == 2
    assert "region grid must be an int in [2, 16]" in capsys.readouterr().err


def test_evaluate_on_a_region_memory_votes_with_its_global_entries_only(region_memory, fmnist_small, tmp_path):
    out = str(tmp_path / "eval")
    assert cli.main(["evaluate", "--memory", region_memory, "--images", os.path.join(fmnist_small, "test"),
                     "--output", out, "--k-max", "5"]) == 0
    lines = [json.loads(line) for name in sorted(os.listdir(out)) if name.startswith("neighbors-")
             for line in open(os.path.join(out, name))]
    assert len(lines) == 50
    ids = [i for line in lines for i in line["neighbor_ids"]]
    assert len(ids) == 50 * 5 and not any("#r" in i for i in ids)


def test_hard_prune_of_a_region_memory_forgets_whole_images(region_memory, tmp_path, capsys):
    import collections
    import shutil
    root = str(tmp_path / "copy")
    shutil.copytree(region_memory, root)
    assert cli.main(["prune", "--memory", root, "--mode", "hard", "--threshold", "2", "--k", "5"]) == 0
    manifest = read_manifest(root)
    assert manifest.change["kind"] == "forget" and 0 < manifest.forgotten.count < 250
    live = VisualMemory.open(root).live_entry_ids().tolist()
    per_image = collections.Counter(i.split("#r")[0] for i in live)
    assert set(per_image.values()) == {1 + GRID * GRID}  # Every image kept whole or forgotten whole.
    assert manifest.forgotten.count == (50 - len(per_image)) * (1 + GRID * GRID)


def test_add_to_a_region_memory_embeds_the_new_images_regions(region_memory, fmnist_small, tmp_path):
    import shutil
    root = str(tmp_path / "copy")
    shutil.copytree(region_memory, root)
    train = os.path.join(fmnist_small, "train")
    new = tmp_path / "new"
    for cls in sorted(os.listdir(train))[:2]:
        os.makedirs(new / cls)
        for name in sorted(os.listdir(os.path.join(train, cls)))[5:7]:
            os.symlink(os.path.join(train, cls, name), new / cls / name)
    assert cli.main(["add", "--memory", root, "--images", str(new)]) == 0
    import collections
    change = read_manifest(root).change
    # The counts count images (4 read, 4 added); the entries are their global and region entries.
    assert change["kind"] == "add" and change["counts"] == {"read": 4, "added": 4, "failed": 0}
    assert change["added"] == 4 * (1 + GRID * GRID)
    live = VisualMemory.open(root).live_entry_ids().tolist()
    per_image = collections.Counter(i.split("#r")[0] for i in live)
    assert len(per_image) == 54 and set(per_image.values()) == {1 + GRID * GRID}


def test_dataflows_region_flag_is_not_read_as_regions():
    from pipelines import build
    args, beam_args = build.build_arg_parser().parse_known_args(
        ["--images", "d", "--output", "o", "--region", "us-central1", "--regions", "2"])
    assert args.regions == 2 and beam_args == ["--region", "us-central1"]
