"""Flags that `vmem evaluate` and `vmem classify` share for filters, crowding and re-ranking (no Beam import:
`vmem classify` runs without Beam), and the `memory.rerank.RerankSpec` they describe (re-rankers are chosen
through the registry in memory/rerank/__init__.py).
"""

from __future__ import annotations

import argparse
import json

from memory import storage
from memory.rerank import RerankFlags, RerankSpec, parse_rerank_spec, rerank_help
from memory.rerank import base as rerank_lib
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

