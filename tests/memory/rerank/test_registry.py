"""memory.rerank's registry: specs resolve through it, and a new kind is one module plus one register()."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types

import pytest

from memory import rerank as registry
from memory.rerank import RerankerKind, RerankFlags, RerankSpec
from memory.rerank.base import RerankOutcome, RerankReason, make_request, rerank_cached
from memory.rerank.gemini import GeminiReranker
from memory.rerank.second_opinion import EncoderReranker
from tests import fake_reranker

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_builtin_kinds_build_their_rerankers(monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", "k")
    assert list(registry.RERANKERS) == ["gemini", "encoder"]
    gemini = RerankSpec.from_flags("gemini", "gemini-test", RerankFlags(rate_limit=2.0, gemini_timeout_s=5.0))
    assert dict(gemini.options) == dict(api_key="k", base_url=None, location=None, max_retries=4, project=None,
                                        rate_limit=2.0, timeout_s=5.0, vertexai=False)
    assert [k for k, _ in gemini.options] == sorted(k for k, _ in gemini.options)
    built = gemini.build()
    assert isinstance(built, GeminiReranker) and built.name == "gemini:gemini-test" and gemini.text == built.name
    encoder = RerankSpec.from_flags("encoder", "efficientnet-lite1", RerankFlags(weight=0.25))
    assert encoder.options == (("weight", 0.25),)
    assert isinstance(encoder.build(), EncoderReranker) and encoder.build().name == "encoder:efficientnet-lite1@w=0.25"
    assert pickle.loads(pickle.dumps(gemini)) == gemini


def test_gemini_needs_a_key_unless_dry_run_or_vertex(monkeypatch):
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="needs an API key in GOOGLE_API_KEY"):
        RerankSpec.from_flags("gemini", "m", RerankFlags())
    assert "api_key" in dict(RerankSpec.from_flags("gemini", "m", RerankFlags(dry_run=True)).options)
    vertex = RerankSpec.from_flags("gemini", "m", RerankFlags(gemini_vertex=True, gemini_project="p"))
    assert "api_key" not in dict(vertex.options) and dict(vertex.options)["project"] == "p"


def test_unknown_kinds_name_the_registered_ones():
    with pytest.raises(ValueError, match="unknown re-ranker kind 'gpt'; registered: gemini, encoder"):
        RerankSpec("gpt", "x")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(RerankerKind("gemini", "x", usage="gemini:M", example="gemini:m", help=""))
    with pytest.raises(ValueError, match="lower case"):
        registry.register(RerankerKind("Bad Kind", "x", usage="", example="", help=""))


def test_a_third_reranker_is_one_module_and_one_registration(monkeypatch):
    fake_reranker.registered(monkeypatch)
    assert registry.parse_rerank_spec("last:x") == ("last", "x")
    spec = RerankSpec.from_flags("last", "x", RerankFlags(rate_limit=3.0))
    assert spec.options == (("rate_limit", 3.0),) and spec.text == "last:x"
    reranker = spec.build()
    assert isinstance(reranker, fake_reranker.LastLabelReranker) and reranker.rate_limit == 3.0
    request = make_request("q", "", ["Coat", "Shirt", "Coat"], ["/a", "/b", "/c"], [0.1, 0.2, 0.3],
                           vote_label="Coat", margin=0.1, top_n=3)
    assert rerank_cached(reranker, request, None) == RerankOutcome("Shirt", RerankReason.ANSWERED, calls=1)
    assert registry.rerank_help().endswith(" or last:NAME (answers the last candidate label)")
    with pytest.raises(ValueError, match=r"'gemini:MODEL' \(e\.g\. gemini:gemini-2\.5-flash\), 'encoder:NAME' .* "
                                         r"or 'last:NAME' \(e\.g\. last:x\), got 'nope:x'"):
        registry.parse_rerank_spec("nope:x")


def test_a_registered_module_without_the_two_functions_is_named(monkeypatch):
    module = types.ModuleType("tests_incomplete_reranker")
    module.make_reranker = lambda name: None
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "RERANKERS", dict(registry.RERANKERS))
    registry.register(RerankerKind("half", module.__name__, usage="half:X", example="half:x", help=""))
    with pytest.raises(TypeError, match="tests_incomplete_reranker defines no spec_options"):
        RerankSpec("half", "x").build()


def test_a_spec_builds_where_its_kind_was_never_registered(monkeypatch, tmp_path):
    """A Beam worker unpickles the spec in a fresh process, whose registry holds only the built-in kinds."""
    fake_reranker.registered(monkeypatch)
    spec = RerankSpec.from_flags("last", "x", RerankFlags(rate_limit=3.0))
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    worker = ("import pickle, sys\n"
              "from memory import rerank\n"
              "assert 'last' not in rerank.RERANKERS, rerank.RERANKERS\n"
              "reranker = pickle.load(open(sys.argv[1], 'rb')).build()\n"
              "print(type(reranker).__name__, reranker.name, reranker.rate_limit)\n")
    run = subprocess.run([sys.executable, "-c", worker, str(tmp_path / "spec.pkl")], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["LastLabelReranker", "last:x", "3.0"]
    assert spec.module == fake_reranker.__name__ and RerankSpec("last", "x").module == fake_reranker.__name__
