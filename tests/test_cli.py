"""`vmem` command-line behaviour: dispatch, help, and errors that name the bad value and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

from pipelines import cli


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "'frobnicate'" in err and "build" in err


def test_build_errors_name_the_bad_value(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert cli.main(["build", "--images", missing, "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert missing in err and "ImageFolder" in err
    assert cli.main(["build", "--images", str(tmp_path), "--output", str(tmp_path / "m"), "--shards", "0"]) == 2
    assert "--shards" in capsys.readouterr().err
    assert cli.main(["build", "--images", str(tmp_path), "--output", str(tmp_path / "m"),
                     "--config", "configs.nonexistent"]) == 2
    assert "configs.nonexistent" in capsys.readouterr().err


def test_info_on_a_non_memory_explains(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path)]) == 2
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
