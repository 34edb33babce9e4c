"""`vmem` command-line behaviour: dispatch, help, and errors that name the bad value and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

from vmem import main as cli


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "'frobnicate'" in err and "build" in err


def test_build_errors_name_the_bad_value(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert cli.main(["build", "--images", missing, "--output", str(tmp_path / "m")]) == 1  # A runtime failure.
    err = capsys.readouterr().err
    assert missing in err and "ImageFolder" in err
    assert cli.main(["build", "--images", str(tmp_path), "--output", str(tmp_path / "m"), "--shards", "0"]) == 2
    assert "--shards" in capsys.readouterr().err
    assert cli.main(["build", "--images", str(tmp_path), "--output", str(tmp_path / "m"),
                     "--config", "configs.nonexistent"]) == 1
    assert "configs.nonexistent" in capsys.readouterr().err


def test_info_on_a_non_memory_explains(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "manifest.json" in err and "vmem build" in err


def test_prepare_data_cli(tmp_path, capsys):
    assert cli.main(["prepare-data", "fashion-mnist", "--out", str(tmp_path), "--per-class", "2",
                     "--test-per-class", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 20 images in 10 classes" in out and "test: 10 images" in out
    assert len(os.listdir(tmp_path / "train" / "bag")) == 2


def test_console_script_is_installed_and_answers_help():
    vmem = os.path.join(os.path.dirname(sys.executable), "vmem")
    result = subprocess.run([vmem, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "vmem COMMAND" in result.stdout


def test_metadata_command_attaches_a_table_and_near_duplicate_groups(tmp_path, capsys):
    """vmem metadata --table / --near-duplicates publish versions that vmem info shows and filters use."""
    import numpy as np

    from memory.build import build_memory_local
    from memory.search.filters import Crowding, QueryFilter
    from memory.index.shard_index import IndexConfig, IndexKind
    from memory.vectors import l2_normalize
    from memory.visual_memory import VisualMemory
    from vmem import main as cli
    rng = np.random.default_rng(0)
    base = l2_normalize(rng.normal(size=(6, 8)))
    x = l2_normalize(np.concatenate([base, base + 1e-4 * rng.normal(size=(6, 8))]))  # Each row has a twin.
    ids = [f"e{i:02d}" for i in range(12)]
    root = str(tmp_path / "m")
    build_memory_local(root, ids=ids, labels=["a", "b"] * 6, uris=[f"/d/{i}.png" for i in ids], embeddings=x,
                       num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity={"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": 8,
                                         "preprocess": {}})
    (tmp_path / "t.csv").write_text("id,source\n" + "".join(f"{i},{'web' if n % 2 else 'lab'}\n"
                                                           for n, i in enumerate(ids)))
    assert cli.main(["metadata", "--memory", root, "--table", str(tmp_path / "t.csv")]) == 0
    assert cli.main(["metadata", "--memory", root, "--near-duplicates", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "6 groups over 12 entries; 6 groups of 2+ hold 12 entries" in out
    assert cli.main(["info", root]) == 0
    assert "metadata     columns source, near_dup for 12 entries" in capsys.readouterr().out
    mem = VisualMemory.open(root)
    res = mem.search(base[:1], 12, filters=QueryFilter.parse("meta:source=web"))
    assert set(res.ids[0][res.ids[0] != ""]) == {i for n, i in enumerate(ids) if n % 2}
    crowded = mem.search(base[:1], 3, crowding=Crowding.parse("1:meta:near_dup"))
    assert crowded.ids[0][0] == "e00" and "e06" not in crowded.ids[0]  # e06 is e00's twin.
    assert cli.main(["metadata", "--memory", root, "--table", str(tmp_path / "missing.csv")]) == 1


def test_every_command_is_a_module_with_main_and_reports_a_missing_flag_as_usage(capsys):
    """One table: every command's module has main(argv) -> int, run through the one runner (bad flag: 2)."""
    import importlib
    for name, command in cli.COMMANDS.items():
        module = importlib.import_module(command.module)
        assert callable(module.main), name
        assert cli.main([name]) == 2, name  # Every command has a required argument.
        err = capsys.readouterr().err
        assert f"vmem {name}: error: " in err and "required" in err, (name, err)
        assert cli.main([name, "--help"]) == 0, name
        assert f"vmem {name}" in capsys.readouterr().out, name


def test_runtime_failures_exit_1_and_vmem_debug_re_raises(tmp_path, capsys, monkeypatch):
    import pytest

    from memory.store.manifest import ManifestError
    monkeypatch.delenv("VMEM_DEBUG", raising=False)
    assert cli.main(["history", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmem history: error: not a visual memory") and "VMEM_DEBUG=1" in err
    monkeypatch.setenv("VMEM_DEBUG", "1")
    with pytest.raises(ManifestError, match="not a visual memory"):
        cli.main(["history", str(tmp_path)])


def test_vmem_help_imports_neither_beam_nor_tensorflow():
    code = ("import sys; from vmem import main; main.main(['--help']); main.main(['info', '/nonexistent']); "
            "print(sorted(m for m in ('apache_beam', 'tensorflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.stdout.strip().endswith("[]"), result.stdout + result.stderr
