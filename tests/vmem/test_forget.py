"""``vmem forget`` and ``vmem history`` (vmem/forget.py, vmem/history.py) on a local memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memory.build import build_memory_local
from memory.index.shard_index import IndexConfig, IndexKind
from memory.store.versions import list_versions
from memory.visual_memory import VisualMemory
from vmem import forget as forget_cli, history as history_cli

D = 8
ENC = {"name": "fake", "content_hash": "sha256:" + "0" * 64, "dim": D, "preprocess": {}}


@pytest.fixture()
def memory(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, D))
    ids = [f"img-{i:02d}" for i in range(40)]
    labels = ["cat" if i % 4 == 0 else "dog" for i in range(40)]
    root = str(tmp_path / "mem")
    build_memory_local(root, ids=ids, labels=labels, uris=[f"gs://photos/{lab}/{i}.jpg" for i, lab in zip(ids, labels)],
                       embeddings=x, num_shards=2, index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE),
                       encoder_identity=ENC)
    return root, ids


def test_forget_ids_file_then_history(memory, tmp_path, capsys):
    root, ids = memory
    ids_file = tmp_path / "forget.txt"
    ids_file.write_text(f"{ids[1]}\n\n  {ids[2]}  \n")
    assert forget_cli.main(["--memory", root, "--ids", str(ids_file)]) == 0
    out = capsys.readouterr().out
    assert "forgot 2 entries (2 listed id(s))" in out and "version 2 (parent 1)" in out and "38 live entries" in out
    assert " ms" in out and "until `vmem reindex`" in out
    assert forget_cli.main(["--memory", root, "--label", "cat", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["version"], result["forgotten"], result["forgotten_total"], result["live_entries"]) == (3, 10, 12, 28)
    assert len(VisualMemory.open(root)) == 28

    assert history_cli.main([root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["version", "parent", "kind", "time", "entries", "summary"]
    assert [line.split()[:3] + [line.split()[4]] for line in lines[1:]] == [
        ["1", "-", "build", "40"], ["2", "1", "forget", "38"], ["3", "2", "forget", "28"]]
    assert lines[3].endswith("forgot 10 entries (label='cat')")
    assert history_cli.main([root, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["change"]["kind"] for r in records] == ["build", "forget", "forget"]


def test_forget_errors_name_the_value(memory, tmp_path, capsys):
    """Nothing to forget as asked is a runtime failure (1); flags that exclude each other are a usage error (2)."""
    root, ids = memory
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"{ids[0]}\nghost-7\n")
    assert forget_cli.main(["--memory", root, "--ids", str(ids_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmem forget: error: 1 unknown id(s)") and "['ghost-7']" in err
    assert forget_cli.main(["--memory", root, "--label", "bird"]) == 1
    assert "unknown label 'bird'" in capsys.readouterr().err
    assert forget_cli.main(["--memory", root, "--ids", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert forget_cli.main(["--memory", root, "--label", "cat", "--ids", str(ids_file)]) == 2
    assert "not allowed with" in capsys.readouterr().err
    assert forget_cli.main(["--memory", str(tmp_path / "nowhere"), "--label", "cat"]) == 1
    assert "not a visual memory" in capsys.readouterr().err
    assert history_cli.main([str(tmp_path / "nowhere")]) == 1
    assert "not a visual memory" in capsys.readouterr().err
    assert list_versions(root) == [1]


def test_forget_with_purge_history(memory, capsys):
    root, ids = memory
    assert forget_cli.main(["--memory", root, "--source-prefix", "gs://photos/cat/"]) == 0
    capsys.readouterr()
    assert forget_cli.main(["--memory", root, "--ids", "/dev/null"]) == 1  # Empty ids file.
    assert "holds no id" in capsys.readouterr().err
    ids_file = f"{root}/../one.txt"
    with open(ids_file, "w") as f:
        f.write(ids[1] + "\n")
    assert forget_cli.main(["--memory", root, "--ids", ids_file, "--purge-history"]) == 0
    out = capsys.readouterr().out
    assert "purged versions: [1, 2]" in out and "until `vmem reindex`" in out
    assert list_versions(root) == [3, 4]


def test_help_is_honest_about_physical_deletion(capsys):
    assert forget_cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--purge-history" in text and "vmem reindex" in text


def test_a_lost_race_is_one_line_without_beams_traceback(caplog, capsys, monkeypatch):
    """Beam logs a failed step with its traceback; for a writer that lost a race the command's line suffices
    (VMEM_DEBUG=1 brings Beam's log and the traceback back)."""
    import logging
    from memory.store.versions import WriteConflictError
    from vmem.args import run_command

    def body(error):
        def run(argv):
            try:
                raise error
            except Exception as e:  # What Beam's DoFnRunner does with a step's error before re-raising it.
                logging.getLogger("apache_beam.runners.common").exception(e)
                raise
        return run

    conflict = WriteConflictError("forget of 2 entries of /m conflicts with version 3 (forget)")
    assert run_command("vmem forget", body(conflict), []) == 1
    assert not [r for r in caplog.records if r.name == "apache_beam.runners.common"]
    assert capsys.readouterr().err.splitlines()[0] == f"vmem forget: error: {conflict}"
    assert run_command("vmem forget", body(OSError("disk full")), []) == 1
    assert capsys.readouterr().err.splitlines()[0] == "vmem forget: error: disk full"
    monkeypatch.setenv("VMEM_DEBUG", "1")
    with pytest.raises(OSError, match="disk full"):
        run_command("vmem forget", body(OSError("disk full")), [])
    assert [r.exc_info[1] for r in caplog.records if r.name == "apache_beam.runners.common"][0].args == ("disk full",)
