"""`vmem classify --rerank KIND:NAME` resolves KIND through memory.rerank's registry."""

from __future__ import annotations

import json
import os

from tests import fake_reranker
from vmem import classify as classify_cli


def test_classify_with_a_registered_third_reranker(tiny_memory, fmnist_small, capsys, monkeypatch):
    fake_reranker.registered(monkeypatch)
    folder = os.path.join(fmnist_small, "train", "coat")
    images = [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:2]]
    flags = ["--memory", tiny_memory, *images, "--json", "--rerank", "last:x", "--rerank-below", "1.01"]
    assert classify_cli.main([*flags, "--rerank-dry-run"]) == 0
    assert "re-rank (last:x, margin < 1.01): dry_run 2; 0 calls (dry run: no call made)" in capsys.readouterr().err
    assert classify_cli.main(flags) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert [r["rerank_reason"] for r in results] == ["answered", "answered"]
    assert "re-rank (last:x, margin < 1.01): answered 2; 2 calls" in captured.err
    assert classify_cli.main(["--memory", tiny_memory, *images, "--rerank", "nope:x", "--rerank-below", "1"]) == 2
    assert "or 'last:NAME' (e.g. last:x), got 'nope:x'" in capsys.readouterr().err
