"""Flags that `vmem evaluate` and `vmem classify` share for filters, crowding and re-ranking (no Beam import:
`vmem classify` runs without Beam), the `memory.rerank.RerankSpec` they describe (re-rankers are chosen
through the registry in memory/rerank/__init__.py), the evaluate job's `RerankOptions`, and what its report
records of them (`selection_report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Mapping

from memory import storage
from memory.rerank import RerankFlags, RerankSpec, parse_rerank_spec, rerank_help
from memory.rerank import base as rerank_lib
from memory.decide.voting import VotingRule
from memory.search.filters import Crowding, QueryFilter


def add_selection_args(parser: argparse.ArgumentParser, *, per_query_file: bool) -> None:
    """--filter / --filters / --crowding."""
    parser.add_argument("--filter", default=None, metavar="SPEC",
                        help="only entries this filter admits may vote, for every query: 'label=a|b', 'uri=PREFIX', "
                             "'meta:COLUMN=v1|v2', combined with ';' (k admitted neighbours whenever k exist)")
    if per_query_file:
        parser.add_argument("--filters", default=None, metavar="FILE.jsonl",
                            help="per-query filters: JSONL lines {\"query\": QUERY_ID, \"filter\": {\"labels\": [...], "
                                 "\"uri_prefix\": ..., \"metadata\": {COLUMN: [values]}}}; queries not listed use "
                                 "--filter (or none)")
    parser.add_argument("--crowding", default=None, metavar="C[:BY]",
                        help="at most C voters per group: BY = uri (parent folder, default), uri:N (first N path "
                             "components) or meta:COLUMN (e.g. a near-duplicate group from `vmem metadata "
                             "--near-duplicates`)")


def add_rerank_args(parser: argparse.ArgumentParser) -> None:
    """--rerank and its cost gate, Gemini client settings and dry run."""
    g = parser.add_argument_group("re-ranking (a second opinion for low-margin votes)")
    g.add_argument("--rerank", default=None, metavar="KIND:NAME", help=rerank_help())
    g.add_argument("--rerank-below", type=float, default=None, metavar="MARGIN",
                   help="cost gate: only queries whose vote margin is below this are sent (margins are in [0, 1]; "
                        "1.01 sends all)")
    g.add_argument("--rerank-top-n", type=int, default=10, metavar="N", help="neighbours shown per query (default 10)")
    g.add_argument("--rerank-rule", default="rank", help="the vote re-ranking starts from (default rank)")
    g.add_argument("--rerank-k", type=int, default=10, help="k of that vote (default 10)")
    g.add_argument("--rerank-dry-run", action="store_true",
                   help="make no call: report how many queries would be sent")
    g.add_argument("--rerank-rate", type=float, default=None, metavar="CALLS_PER_S",
                   help="client-side rate limit per worker process (default: none)")
    g.add_argument("--rerank-weight", type=float, default=0.5,
                   help="encoder re-ranker: share of the second encoder's similarity in the new score (default 0.5)")
    g.add_argument("--gemini-vertex", action="store_true", help="call Gemini through Vertex AI (with the two below)")
    g.add_argument("--gemini-project", default=None, help="Vertex AI project (default GOOGLE_CLOUD_PROJECT)")
    g.add_argument("--gemini-location", default=None, help="Vertex AI location (default GOOGLE_CLOUD_LOCATION)")
    g.add_argument("--gemini-base-url", default=None, help="another endpoint (a proxy, a private gateway)")
    g.add_argument("--gemini-timeout", type=float, default=60.0, help="seconds per call (default 60)")
    g.add_argument("--gemini-retries", type=int, default=4, help="retries per query on 429/5xx/timeouts (default 4)")


def selection_from_args(args) -> tuple[QueryFilter | None, Crowding | None]:
    return (None if not args.filter else QueryFilter.parse(args.filter),
            None if not args.crowding else Crowding.parse(args.crowding))


def rerank_flags_from_args(args) -> RerankFlags:
    """The re-rank flags every re-ranker kind may read (memory.rerank.RerankFlags)."""
    return RerankFlags(dry_run=bool(args.rerank_dry_run), rate_limit=args.rerank_rate, weight=args.rerank_weight,
                       gemini_vertex=args.gemini_vertex, gemini_project=args.gemini_project,
                       gemini_location=args.gemini_location, gemini_base_url=args.gemini_base_url,
                       gemini_timeout_s=args.gemini_timeout, gemini_retries=args.gemini_retries)


def rerank_spec_from_args(args) -> RerankSpec | None:
    """The --rerank flags as a RerankSpec (None without --rerank); errors name the flag and the fix."""
    if not args.rerank:
        for flag in ("rerank_below", "rerank_rate"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --rerank KIND:NAME")
        return None
    kind, name = parse_rerank_spec(args.rerank)
    if args.rerank_below is None:
        raise ValueError("--rerank needs --rerank-below MARGIN (the cost gate: queries whose vote margin is below it "
                         "are sent; e.g. 0.3, or 1.01 for every query)")
    rerank_lib.check_rerank_below(args.rerank_below)
    rerank_lib.check_top_n(args.rerank_top_n)
    spec = RerankSpec.from_flags(kind, name, rerank_flags_from_args(args))
    if not args.rerank_dry_run:
        spec.build()  # Validates the configuration now (no client is created, no model loaded).
    return spec


def load_query_filters(path: str) -> dict[str, dict]:
    """{query id: filter dict} from a --filters JSONL file (validated: each line must parse as a QueryFilter)."""
    out = {}
    for n, line in enumerate(storage.read_bytes(path).decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, f = str(row["query"]), QueryFilter.from_dict(row["filter"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--filters {path}:{n}: expected {{\"query\": ID, \"filter\": {{...}}}}, got "
                             f"{line[:200]!r} ({e})") from None
        out[qid] = f.to_dict()
    return out


@dataclasses.dataclass(frozen=True)
class RerankOptions:
    """The re-rank stage's settings (the ``--rerank`` flags): who answers, which vote it starts from, the gate.

    Attributes:
      spec: The re-ranker, built on the workers.
      rule: The vote re-ranking starts from.
      k: That vote's k (<= the job's k_max).
      below: Cost gate: queries whose vote margin is below this are sent.
      top_n: Neighbours shown per query (<= the job's k_max).
      dry_run: Make no call; count what would be sent.
    """
    spec: RerankSpec
    rule: VotingRule
    k: int
    below: float
    top_n: int
    dry_run: bool = False

    def report_info(self) -> dict:
        """What the report records about the re-rank configuration (no secrets)."""
        return {"reranker": self.spec.text, "below": self.below, "top_n": self.top_n, "rule": self.rule.value,
                "k": self.k, "dry_run": bool(self.dry_run),
                "options": {k: v for k, v in self.spec.options if k != "api_key"}}


def selection_report(*, default_filter: QueryFilter | None = None, query_filters: Mapping[str, dict] | None = None,
                     filters_file: str | None = None, crowding: Crowding | None = None,
                     rerank: RerankOptions | None = None) -> dict:
    """The evaluation report's record of the filters, crowding and re-ranking it ran with."""
    extra: dict[str, Any] = {}
    if default_filter is not None or query_filters:
        extra["filter"] = {"default": None if default_filter is None else default_filter.to_dict(),
                           "per_query_file": filters_file, "per_query": len(query_filters or {})}
    if crowding is not None:
        extra["crowding"] = crowding.to_dict()
    if rerank is not None:
        extra["rerank"] = rerank.report_info()
    return extra
