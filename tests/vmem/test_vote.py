"""End-to-end tests for ``vmem vote`` (vmem.vote.main)."""

import json

import pytest

from vmem import vote as vote_cli
from evaluation.neighbors_io import NeighborRecord, write_records

D3 = [0.1, 0.2, 0.3]


def _write_inputs(tmp_path):
    """Four queries with hand-computed predictions.

    Plurality / distance / rank predict, for k = 1, 2, 3:
        q1 (true 0) [0, 1, 1]: 0, 0 (tie, first reached), 1
        q2 (true 1) [1, 0, 0]: 1, 1, 0
        q3 (true 2) [2] (padded): 2, 2, 2
        q4 (true 1) [0, 1, 1]: 0, 0, 1
    -> 3/4, 3/4, 2/4. Softmax (tau 0.07) keeps the nearest class at k = 3
    (1 vs exp(-0.1/0.07) + exp(-0.2/0.07) = 0.30) -> 3/4, 3/4, 3/4.
    q2 is in the paper's format in a second, gzipped file.
    """
    ours = tmp_path / "ours.jsonl"
    write_records(ours, [
        NeighborRecord("q1", 0, ["a", "b", "c"], [0, 1, 1], D3),
        NeighborRecord("q3", 2, ["d"], [2], [0.05]),
        NeighborRecord("q4", 1, ["e", "f", "g"], [0, 1, 1], D3),
    ])
    paper = tmp_path / "paper.json"
    paper.write_text(json.dumps([{
        "image_id": "q2", "image_class": 1, "neighbor_image_ids": ["h", "i", "j"],
        "neighbor_classes": [1, 0, 0], "neighbor_distances": D3}]))
    return ours, paper


def test_end_to_end_known_accuracies(tmp_path, capsys):
    ours, paper = _write_inputs(tmp_path)
    out = tmp_path / "out"
    rc = vote_cli.main(["--neighbors", str(ours), str(paper), "--output",
                        str(out), "--baseline", "linear probe=0.863"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["queries"] == 4
    assert report["failed"] == 0
    assert report["k_max"] == 3
    assert report["accuracy"] == {
        "plurality": {"1": 0.75, "2": 0.75, "3": 0.5},
        "distance": {"1": 0.75, "2": 0.75, "3": 0.5},
        "softmax": {"1": 0.75, "2": 0.75, "3": 0.75},
        "rank": {"1": 0.75, "2": 0.75, "3": 0.5},
    }
    assert report["best"]["softmax"] == {"k": 1, "accuracy": 0.75}
    assert report["extra"]["softmax_tau"] == 0.07
    assert report["extra"]["rank_alpha"] == 2.0
    assert report["extra"]["entry_weights"] is False
    assert report["baselines"] == {"linear probe": 0.863}
    stdout = capsys.readouterr().out
    assert "| k | plurality | distance | softmax | rank |" in stdout
    assert "| 3 | 50.00 | 50.00 | 75.00 | 50.00 |" in stdout
    assert (out / "report.md").read_text().endswith(stdout)
    assert (out / "accuracy_vs_k.png").stat().st_size > 5000


def test_rules_k_max_and_tau(tmp_path, capsys):
    ours, paper = _write_inputs(tmp_path)
    out = tmp_path / "out"
    # tau = 1: q1's B gets exp(-0.1) + exp(-0.2) > 1 -> softmax like plurality.
    rc = vote_cli.main(["--neighbors", str(ours), str(paper), "--output",
                        str(out), "--rules", "softmax,rank,softmax",
                        "--k-max", "2", "--tau", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rules"] == ["softmax", "rank"]
    assert report["accuracy"]["softmax"] == {"1": 0.75, "2": 0.75}
    rc = vote_cli.main(["--neighbors", str(ours), str(paper), "--output",
                        str(out), "--rules", "softmax", "--tau", "1"])
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["softmax"]["3"] == 0.5


def test_a_k_max_beyond_the_longest_list_is_capped_with_a_note(tmp_path, capsys):
    # 400,000,000 columns per chunk would be gigabytes; past the longest list (3) every vote is the whole list's.
    ours, paper = _write_inputs(tmp_path)
    out = tmp_path / "out"
    assert vote_cli.main(["--neighbors", str(ours), str(paper), "--output", str(out), "--k-max", "400000000"]) == 0
    err = capsys.readouterr().err
    assert err == ("vmem vote: note: --k-max 400000000 exceeds the longest neighbour list (3); voting k = 1..3 "
                   "(beyond a list every vote is the vote of the whole list)\n")
    report = json.loads((out / "report.json").read_text())
    assert report["k_max"] == 3 and report["accuracy"]["softmax"] == {"1": 0.75, "2": 0.75, "3": 0.75}


@pytest.mark.parametrize("value, message", [
    ("-Infinity", "ours.jsonl:2: field 'neighbor_distances' must hold finite numbers, got -inf"),
    ("99999999999999999999", "ours.jsonl:2: field 'neighbor_labels' holds label 99999999999999999999, outside "
     "the int64 range"),
])
def test_infinite_distances_and_huge_labels_are_refused_with_file_and_line(tmp_path, capsys, value, message):
    ours, _ = _write_inputs(tmp_path)
    lines = ours.read_text().splitlines()
    field = "neighbor_distances" if "Inf" in value else "neighbor_labels"
    record = json.loads(lines[1])
    lines[1] = json.dumps(dict(record, **{field: [0]})).replace("[0]", f"[{value}]")
    ours.write_text("\n".join(lines) + "\n")
    assert vote_cli.main(["--neighbors", str(ours), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"vmem vote: error: cannot read neighbours: {ours.parent}/{message}")
    assert err.count("ours.jsonl:2") == 1 and not (tmp_path / "out").exists()


def test_entry_weights_are_used(tmp_path):
    path = tmp_path / "w.jsonl"
    # Rank without weights: 0.5 vs 1/3 + 1/4 -> 1 (wrong); the soft-pruning
    # weight 1.75/4 on the first "1" makes it 0.396 -> 0 (right).
    write_records(path, [NeighborRecord("q", 0, ["a", "b", "c"], [0, 1, 1], D3,
                                        [1.0, 1.75 / 4, 1.0])])
    out = tmp_path / "out"
    assert vote_cli.main(["--neighbors", str(path), "--output", str(out),
                          "--rules", "rank"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["rank"] == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert report["extra"]["entry_weights"] is True


@pytest.mark.parametrize("args,message", [
    (["--k-max", "0"], "--k-max must be >= 1, got 0"),
    (["--k-max", "x"], "argument --k-max: invalid int value: 'x'"),
    (["--rules", "rank,borda"], "--rules: unknown voting rule 'borda'; "
     "allowed: plurality, distance, softmax, rank"),
    (["--rules", ","], "--rules is empty; allowed: plurality, distance"),
    (["--tau", "0"], "--tau: softmax_tau must be a finite number > 0, got 0.0"),
    (["--alpha", "-2"], "--alpha: rank_alpha must be a finite number > 0"),
    (["--baseline", "probe=86.3"], "--baseline 'probe=86.3' must be "
     "NAME=ACCURACY with ACCURACY in [0, 1]"),
])
def test_usage_errors(tmp_path, capsys, args, message):
    ours, _ = _write_inputs(tmp_path)
    rc = vote_cli.main(["--neighbors", str(ours), "--output",
                        str(tmp_path / "out")] + args)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("vmem vote: error: ")
    assert message in err
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    rc = vote_cli.main(["--neighbors", str(missing), "--output",
                        str(tmp_path / "out")])
    assert rc == 1
    assert f"neighbours file not found: {missing}" in capsys.readouterr().err


def test_malformed_record(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image_id": 1, "image_class": 0}\n')
    rc = vote_cli.main(["--neighbors", str(path), "--output",
                        str(tmp_path / "out")])
    assert rc == 1
    assert (f"{path}:1: paper record is missing field 'neighbor_image_ids'"
            in capsys.readouterr().err)


def test_missing_required_flag(capsys):
    assert vote_cli.main(["--output", "x"]) == 2
    assert "the following arguments are required: --neighbors" in (
        capsys.readouterr().err)


def test_help_exits_zero(capsys):
    assert vote_cli.main(["--help"]) == 0
    assert "--neighbors FILE [FILE ...]" in capsys.readouterr().out


@pytest.mark.parametrize("name, flags, digests", [
    ("fixture", [], ("0afd68195888ab09fb2bb2321caf7f9100b0b1b1c344ddbb1c03969dbff5a652",
                     "88639aa5577248bcc7a6921e41ce7b0f8fbc3a6a0d0416cfc856a1c960b348e9")),
    ("many", [], ("040cc8df33df1a8ecec0e7c905eadadcc4166ec56042bb434b58db0af72b0c5b",
                  "bac992ced804d63bd34fe9c74c9c926f46bad558c749edfb8f55711e8a61a58d")),
    ("many", ["--k-max", "12"], ("7adcc12997bbf72aa5f065dd3feeeb6fcece532d50981f27e0f27c9f0c91a2c5",
                                 "c4c98965382a6f902f1d142b093450b0a08aba415cb1ee7ec1543fae9be525bb")),
])
def test_streamed_reports_are_byte_identical_to_one_list_of_every_record(tmp_path, capsys, name, flags, digests):
    """report.json and report.md as the vote of all records read into one list wrote them (digests recorded
    from that implementation): the fixture above, and 5,000 weighted records (two chunks, lists of 0..30
    neighbours sorted by length, so the first chunk is narrower than the second)."""
    import hashlib

    from tests.evaluation.test_vote_report import random_records
    ours, paper = _write_inputs(tmp_path)
    many = tmp_path / "many.jsonl.gz"
    write_records(many, sorted(random_records(5000, seed=9, weighted=True), key=lambda r: len(r.neighbor_labels)))
    inputs = [str(ours), str(paper)] if name == "fixture" else [str(many)]
    out = tmp_path / "out"
    assert vote_cli.main(["--neighbors", *inputs, *flags, "--output", str(out), "--baseline", "lp=0.8"]) == 0
    got = tuple(hashlib.sha256((out / f).read_text().replace(str(tmp_path), "TMP").encode()).hexdigest()
                for f in ("report.json", "report.md"))
    assert got == digests
