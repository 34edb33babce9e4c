"""Second opinions on low-margin votes: the re-rank types, the cost gate, the re-rankers and their registry.

`base` (requests, outcomes and their `RerankReason`, the gate, the response cache, per-query records and
tallies), `gemini` (a Gemini model through google-genai), `second_opinion` (a second encoder).

**The registry.** ``--rerank KIND:NAME`` (``vmem classify``, ``vmem evaluate``) names a registered kind and
what that kind calls NAME (a model, an encoder). `RERANKERS` maps each kind to the module that implements
it; the module is imported only when a spec of its kind is resolved or built, so a re-ranker's
dependencies load only when it is used. `RerankSpec` is the picklable recipe (kind, name, options, module)
a Beam worker builds its re-ranker from, without consulting its own registry.

**Adding a re-ranker** is one new module and one registration line:

1. ``memory/rerank/my_kind.py`` with a class implementing `memory.rerank.base.Reranker` (a ``name`` that
   includes its settings, since it is part of every cache key, and ``rerank(request) -> RerankOutcome``
   that never raises for a per-query problem: it returns the vote's label with the `RerankReason`), and
   two module-level functions:

   - ``make_reranker(name: str, **options) -> Reranker``: the re-ranker for ``my_kind:NAME``. It must
     pickle (it travels inside a Beam DoFn) and check its settings without a network call or a model load
     (the CLI builds one to validate the flags).
   - ``spec_options(flags: RerankFlags) -> dict[str, Any]``: its ``make_reranker`` options from the shared
     re-rank flags, as plain picklable values; raise ValueError naming the flag and the fix for a missing
     setting. The report records every option except ``api_key``.

2. At the end of this module::

       register(RerankerKind("my_kind", "memory.rerank.my_kind", usage="my_kind:NAME", example="my_kind:x",
                             help="my_kind:NAME (what it is)"))

A re-ranker that needs a setting no flag carries yet also needs that flag (pipelines/rerank_args.py) and a
`RerankFlags` field.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memory.rerank.base import Reranker

__all__ = ["RERANKERS", "RerankFlags", "RerankSpec", "RerankerKind", "parse_rerank_spec", "register", "rerank_help"]


@dataclasses.dataclass(frozen=True)
class RerankFlags:
    """The re-rank settings the command line shares among re-rankers (each kind's `spec_options` picks its own).

    Attributes:
      dry_run: ``--rerank-dry-run``: no call will be made (a Gemini key is then not required).
      rate_limit: ``--rerank-rate``: calls per second per worker process (None: no limit).
      weight: ``--rerank-weight``: the second encoder's share of the new score.
      gemini_vertex: ``--gemini-vertex``: call Gemini through Vertex AI.
      gemini_project: ``--gemini-project``: the Vertex AI project.
      gemini_location: ``--gemini-location``: the Vertex AI location.
      gemini_base_url: ``--gemini-base-url``: another endpoint.
      gemini_timeout_s: ``--gemini-timeout``: seconds per call.
      gemini_retries: ``--gemini-retries``: retries per query.
    """
    dry_run: bool = False
    rate_limit: float | None = None
    weight: float = 0.5
    gemini_vertex: bool = False
    gemini_project: str | None = None
    gemini_location: str | None = None
    gemini_base_url: str | None = None
    gemini_timeout_s: float = 60.0
    gemini_retries: int = 4


@dataclasses.dataclass(frozen=True)
class RerankerKind:
    """One registered kind of re-ranker.

    Attributes:
      kind: The ``KIND`` of ``--rerank KIND:NAME`` (lower case, no ``:`` or whitespace).
      module: The module implementing it (``make_reranker`` and ``spec_options``), imported on first use.
      usage: ``KIND:PLACEHOLDER`` as error messages show it, e.g. ``gemini:MODEL``.
      example: A valid spec, e.g. ``gemini:gemini-2.5-flash``.
      help: Its part of ``--rerank``'s help text.
    """
    kind: str
    module: str
    usage: str
    example: str
    help: str

    def load(self) -> ModuleType:
        """The implementing module (imported now if it was not)."""
        return _load_module(self.kind, self.module)


def _load_module(kind: str, name: str) -> ModuleType:
    module = importlib.import_module(name)
    missing = [fn for fn in ("make_reranker", "spec_options") if not callable(getattr(module, fn, None))]
    if missing:
        raise TypeError(f"re-ranker kind {kind!r}: module {name} defines no {' or '.join(missing)}; "
                        "see memory/rerank/__init__.py for what a re-ranker module provides")
    return module


RERANKERS: dict[str, RerankerKind] = {}


def register(entry: RerankerKind) -> RerankerKind:
    """Adds a kind to `RERANKERS`; raises ValueError for a malformed or already registered kind."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", entry.kind):
        raise ValueError(f"re-ranker kind must be lower case letters, digits, '_' or '-', got {entry.kind!r}")
    if entry.kind in RERANKERS:
        raise ValueError(f"re-ranker kind {entry.kind!r} is already registered (module "
                         f"{RERANKERS[entry.kind].module}); pick another kind")
    RERANKERS[entry.kind] = entry
    return entry


def _registered(kind: str) -> RerankerKind:
    if kind not in RERANKERS:
        raise ValueError(f"unknown re-ranker kind {kind!r}; registered: {', '.join(RERANKERS)}")
    return RERANKERS[kind]


def _choices() -> str:
    specs = [f"{k.usage!r} (e.g. {k.example})" for k in RERANKERS.values()]
    return specs[0] if len(specs) == 1 else ", ".join(specs[:-1]) + " or " + specs[-1]


def rerank_help() -> str:
    """``--rerank``'s help: every registered kind's."""
    return " or ".join(k.help for k in RERANKERS.values())


def parse_rerank_spec(spec: str) -> tuple[str, str]:
    """``"gemini:gemini-2.5-flash"`` -> ``("gemini", "gemini-2.5-flash")``: a registered kind and a name
    without whitespace; raises ValueError listing every registered kind with an example."""
    if isinstance(spec, str):
        kind, sep, name = spec.strip().partition(":")
        kind, name = kind.strip().lower(), name.strip()
        if sep and kind in RERANKERS and name and not re.search(r"\s", name):
            return kind, name
    raise ValueError(f"re-ranker must be {_choices()}, got {spec!r}")


@dataclasses.dataclass(frozen=True)
class RerankSpec:
    """Everything needed to build a re-ranker on a worker (picklable, no client inside).

    Attributes:
      kind: A registered kind (`RERANKERS`).
      name: What the kind calls NAME (a model, an encoder).
      options: ``make_reranker`` keyword options, sorted by name.
      module: The module implementing ``kind``, looked up in `RERANKERS` where the spec is made (default).
        `build` imports it by name: a Beam worker unpickles the spec in a process whose registry holds only
        the kinds its own imports registered, not those the launching process registered at run time.
    """
    kind: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()
    module: str = ""

    def __post_init__(self) -> None:
        entry = _registered(self.kind)
        if not self.module:
            object.__setattr__(self, "module", entry.module)  # Frozen: set once, here.

    @classmethod
    def from_flags(cls, kind: str, name: str, flags: RerankFlags) -> RerankSpec:
        """The spec of ``KIND:NAME`` with the kind's options from ``flags`` (its ``spec_options``)."""
        options = _registered(kind).load().spec_options(flags)
        return cls(kind, name, tuple(sorted(options.items())))

    @property
    def text(self) -> str:
        """``KIND:NAME``, as ``--rerank`` takes it."""
        return f"{self.kind}:{self.name}"

    def build(self) -> Reranker:
        """The re-ranker (no client is created and no model is loaded before its first request); needs
        ``module`` importable here, not ``kind`` registered here."""
        return _load_module(self.kind, self.module).make_reranker(self.name, **dict(self.options))


register(RerankerKind("gemini", "memory.rerank.gemini", usage="gemini:MODEL", example="gemini:gemini-2.5-flash",
                      help="gemini:MODEL (e.g. gemini:gemini-2.5-flash; API key from GOOGLE_API_KEY or "
                           "GEMINI_API_KEY, or --gemini-vertex)"))
register(RerankerKind("encoder", "memory.rerank.second_opinion", usage="encoder:NAME",
                      example="encoder:efficientnet-lite1",
                      help="encoder:efficientnet-lite1 (offline, a second bundled encoder)"))
