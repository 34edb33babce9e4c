"""``vmem classify`` is bounded by what is there: --k past the live entries is capped with a note, a NaN gate refused."""

from __future__ import annotations

import json
import os

from vmem import classify as classify_cli


def _image(fmnist_small: str, cls: str) -> str:
    folder = os.path.join(fmnist_small, "train", cls)
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def test_classify_caps_k_at_the_live_entries_with_a_note(tiny_memory, fmnist_small, capsys):
    # The memory holds 200 entries: k = 10**9 would have sized [1, 10**9] arrays (7.45 GiB at 1e9 for 150).
    bag = _image(fmnist_small, "bag")
    assert classify_cli.main(["--memory", tiny_memory, bag, "--json", "--k", "1000000000"]) == 0
    out, err = capsys.readouterr()
    assert err == ("vmem classify: note: --k 1000000000 exceeds the memory's 200 live entries; all 200 vote "
                   "(k 200)\n")
    (capped,) = json.loads(out)["results"]
    assert classify_cli.main(["--memory", tiny_memory, bag, "--json", "--k", "200"]) == 0
    (every,) = json.loads(capsys.readouterr().out)["results"]
    # The vote of every entry: the same answer and scores as k 200, under the k asked.
    assert capped["k"] == 1000000000 and dict(capped, k=200) == every


def test_a_nan_rerank_gate_is_refused(tiny_memory, fmnist_small, capsys):
    bag = _image(fmnist_small, "bag")
    code = classify_cli.main(["--memory", tiny_memory, bag, "--rerank", "encoder:efficientnet-lite1",
                              "--rerank-below", "nan"])
    err = capsys.readouterr().err
    assert code == 2 and "rerank_below must be a number >= 0 (a vote margin in [0, 1], e.g. 0.3), got nan" in err
