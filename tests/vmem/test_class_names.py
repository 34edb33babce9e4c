"""A class may be named anything a folder can be: an abstention never reads as a class, nor a class as one.

Classes named ``unknown`` and ``-1`` (the abstention's old name and its label id) in a memory of vectors: the
abstention has no class name (``label_name`` None / null, "abstained" in text), and those class names are
shown quoted in `vmem classify`'s text and HTML output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from memory import IndexConfig, IndexKind, VisualMemory
from memory.build import build_memory_local
from memory.decide.explain import shown_class_name
from tests.memory.helpers import ENCODER
from vmem import classify as classify_cli

D = ENCODER["dim"]


@pytest.fixture(scope="module")
def named_memory(tmp_path_factory) -> VisualMemory:
    """Three entries of class 'unknown' along axis 0, three of class '-1' along axis 1."""
    root = str(tmp_path_factory.mktemp("names") / "mem")
    x = np.zeros((6, D), np.float32)
    x[:3, 0], x[3:, 1] = 1.0, 1.0
    x[:, 2] = np.linspace(0.0, 0.1, 6)  # Distinct distances, so the order is fixed.
    build_memory_local(root, ids=[f"e{i}" for i in range(6)], labels=["unknown"] * 3 + ["-1"] * 3,
                       uris=[f"/img/{i}.png" for i in range(6)], embeddings=x, num_shards=1,
                       index_config=IndexConfig(kind=IndexKind.BRUTE_FORCE), encoder_identity=ENCODER)
    return VisualMemory.open(root)


def test_an_abstention_has_no_class_name_and_a_class_named_unknown_is_an_answer(named_memory):
    q = np.zeros((1, D), np.float32)
    q[0, 0], q[0, 1] = 1.0, 0.9  # Nearest the 'unknown' class, the '-1' class close behind.
    (answered,) = named_memory.classify(q, rule="plurality", k=3, abstain_below=1.0)
    (abstained,) = named_memory.classify(q, rule="plurality", k=6, abstain_below=1.0)  # 3 vs 3: share 0.5.
    assert (answered.abstained, answered.label_name, answered.label) == (False, "unknown", 1)
    assert (abstained.abstained, abstained.label_name, abstained.label) == (True, None, -1)
    assert abstained.vote_label_name == "unknown" and "confidence 0.500 < 1" in abstained.reason
    assert json.loads(json.dumps(abstained.to_dict()))["label_name"] is None
    assert json.loads(json.dumps(answered.to_dict()))["label_name"] == "unknown"

    text = classify_cli.render_text("q.png", abstained, explain=True).splitlines()
    assert text[1].startswith("  predicted  abstained (the vote said 'unknown')   [rule plurality, k 6]")
    assert text[2].startswith("  abstained  confidence 0.500 < 1")
    assert text[4] == "  scores     'unknown' 3   '-1' 3"
    assert text[6].split()[3:5] == ["'unknown'", "(1)"] and text[-1].split()[3:5] == ["'-1'", "(0)"]
    text = classify_cli.render_text("q.png", answered, explain=False).splitlines()
    assert text[1].startswith("  predicted  'unknown' (label 1)   [rule plurality, k 3]")

    page = classify_cli.render_html("mem", [("q.png", abstained), ("q.png", answered)])
    assert "predicted <b>abstained (the vote said &#x27;unknown&#x27;)</b>" in page
    assert "predicted <b>&#x27;unknown&#x27;</b>" in page and "#5  &#x27;-1&#x27;" in page


def test_the_vote_of_a_class_named_minus_one_is_quoted(named_memory):
    q = np.zeros((1, D), np.float32)
    q[0, 1] = 1.0
    (p,) = named_memory.classify(q, rule="plurality", k=3)
    assert (p.label, p.label_name) == (0, "-1")
    assert classify_cli.render_text("q.png", p, explain=False).splitlines()[1].startswith(
        "  predicted  '-1' (label 0)")
    (p,) = named_memory.classify(q, rule="plurality", k=6, abstain_below=1.0)
    assert classify_cli.render_text("q.png", p, explain=False).splitlines()[1].startswith(
        "  predicted  abstained (the vote said '-1')")


@pytest.mark.parametrize("name, shown", [
    ("coat", "coat"), ("T-shirt/top", "T-shirt/top"), ("ankle boot", "ankle boot"), ("a&b", "a&b"),
    ("-1", "'-1'"), ("42", "'42'"), ("nan", "'nan'"), ("1e3", "'1e3'"), ("unknown", "'unknown'"),
    ("Abstained", "'Abstained'"), ("None", "'None'"), ("", "''"), (" coat", "' coat'"), ("a (b)", "'a (b)'"),
    ("it's", '"it\'s"'), ("tab\there", "'tab\\there'"),
])
def test_shown_class_name_quotes_only_what_could_be_mistaken(name, shown):
    assert shown_class_name(name) == shown
