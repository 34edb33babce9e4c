"""``vmem classify``: classify images with a visual memory and show the neighbours behind each decision.

For every IMAGE it prints the predicted label and the score of the best classes; with ``--explain`` also
each voting neighbour's rank (0-based, the ``i`` of RANK voting), id, label, cosine distance, weight and
source uri. ``--html FILE`` writes one self-contained page (thumbnails inlined as ``data:`` URIs) showing
each query next to its neighbours; ``--json`` prints machine-readable results instead of text.

Examples::

    vmem classify --memory out/fmnist-memory data/fashion-mnist/test/Coat/00012.png --explain
    vmem classify --memory gs://BUCKET/memories/in1k photo1.jpg photo2.jpg --rule softmax --k 50 \\
        --html neighbours.html

Queries are embedded with the memory's own encoder (the EncoderSpec recorded in its manifest) and its
preprocessing. Nothing here imports Apache Beam.

A region memory (built with ``vmem build --regions G``) is classified by its regions (memory.regions.classify:
each query region finds its best-matching region of every candidate image, MaxSim by default, ``--region-rule``
picks another) and the vote runs over the top k images; ``--explain`` adds which query region matched which
region of each neighbour, and ``--html`` draws it as a heat map over both images for the winning neighbours::

    vmem classify --memory out/fmnist-regions data/fashion-mnist/test/coat/00012.png --explain --html where.html

An IMAGE that cannot be read (missing, a directory, not an image) does not stop the others: every readable
one is answered (embedded in batches as usual), and each unreadable one gets a record in its place (text:
``unreadable REASON``; JSON: ``{"image", "error"}``; ``--html``: its section with the reason) and a line
on stderr.

Exit status: 0 when every image was classified; 1 on a runtime failure (missing memory) and when some images
could not be read (the others are answered; when none could, only the reasons are printed, on stderr); 2 on
a bad flag (unknown rule, k < 1). The message names the bad value and the allowed values or the fix.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from encoders.base import add_runtime_flag
from memory import storage
from memory.decide.explain import Prediction, shown_class_name
from memory.decide.voting import VotingParams, VotingRule
from memory.queries import OnUnreadable, UnreadableQuery
from memory.regions.aggregate import RegionRule
from memory.store.integrity import NO_VERIFY_HELP
from pipelines import rerank_args
from vmem.args import EXIT_FAILURE, RaisingArgumentParser, UsageError, run_command

if TYPE_CHECKING:
    from encoders.base import PreprocessSpec
    from memory.regions.classify import RegionPrediction
    from memory.visual_memory import VisualMemory

__all__ = ["build_parser", "main", "render_html", "render_text", "render_unreadable"]

_TOP_SCORES = 5
_THUMB_PX = 128


def build_parser() -> argparse.ArgumentParser:
    """The ``vmem classify`` argument parser."""
    allowed = ", ".join(r.value for r in VotingRule)
    defaults = VotingParams()
    parser = RaisingArgumentParser(prog="vmem classify",
                     description="Classify images by their nearest neighbours in a visual memory.",
                     epilog="Exit status: 0 every image classified; 1 a runtime failure, or some images could not be "
                            "read (each is named with its reason, every readable one is answered); 2 a bad flag.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (local paths or gs://)")
    parser.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    parser.add_argument("--rule", default=VotingRule.RANK.value, help=f"voting rule ({allowed}; default rank)")
    parser.add_argument("--k", default="10", help="neighbours that vote (>= 1; default 10); capped, with a note, at "
                        "the memory's live entries: a larger k is the vote of every entry")
    parser.add_argument("--tau", type=float, default=defaults.softmax_tau, help="softmax temperature (> 0)")
    parser.add_argument("--alpha", type=float, default=defaults.rank_alpha,
                        help="rank-voting offset: weight 1/(alpha + i) with 0-based i (> 0)")
    parser.add_argument("--explain", action="store_true",
                        help="list every voting neighbour: rank, id, label, distance, weight, source uri")
    parser.add_argument("--html", metavar="FILE", default=None,
                        help="write a self-contained HTML page with each query and its neighbours")
    parser.add_argument("--json", action="store_true", help="print results as JSON instead of text")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    add_runtime_flag(parser)
    parser.add_argument("--abstain-below", type=float, default=None, metavar="P",
                        help="abstain (no class: label -1, label_name null in --json; the reason is given, and "
                             "named: unlike_memory when the memory's out-of-memory test flags the query, else "
                             "split_vote) when the vote's confidence is below P in [0, 1] -- calibrated when the "
                             "memory carries a calibration for this rule and k (`vmem calibrate`), else the raw "
                             "share of the winner's score -- or when that calibration's out-of-memory test flags "
                             "the query")
    parser.add_argument("--region-rule", default=None, choices=[r.value for r in RegionRule],
                        help="region memories only: how region similarities score a memory image (default maxsim: "
                             "the mean over query regions of their best match; memory/regions/aggregate.py)")
    rerank_args.add_selection_args(parser, per_query_file=False)
    rerank_args.add_rerank_args(parser)
    parser.add_argument("--rerank-cache", default=None, metavar="DIR",
                        help="keep re-ranker answers here and never pay for the same query twice")
    return parser


class _DryRun:
    """A re-ranker that makes no call: every query it is asked about is counted as one that would be sent."""

    def __init__(self, name: str):
        self.name = name

    def rerank(self, request):
        from memory.rerank.base import RerankOutcome, RerankReason
        return RerankOutcome(request.vote_label, RerankReason.DRY_RUN)


def _local(image: str) -> str:
    return image[len("file://"):] if image.startswith("file://") else image


def _parse_k(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--k must be an integer >= 1, got {text!r}") from None
    if k < 1:
        raise UsageError(f"--k must be an integer >= 1, got {k}; e.g. --k 10")
    return k


# --------------------------------------------------------------------------- text / JSON


def render_text(image: str, prediction: Prediction, *, explain: bool,
                regions: RegionPrediction | None = None) -> str:
    """One query's result as human-readable lines (``regions``: a region memory's
    `memory.regions.classify.RegionPrediction`, whose matches ``explain`` lists under each neighbour)."""
    # Class names are shown quoted where they could be taken for something else (shown_class_name): a class
    # named "unknown" or "-1" must not read as the abstention.
    lines = [f"{image}"]
    if prediction.abstained:
        lines.append(f"  predicted  abstained (the vote said {shown_class_name(prediction.vote_label_name)})   "
                     f"[rule {prediction.rule.value}, k {prediction.k}]")
        why = "" if prediction.abstain_reason is None else f"   [reason {prediction.abstain_reason.value}]"
        lines.append(f"  abstained  {prediction.reason}{why}")
    elif prediction.label < 0:
        lines.append(f"  predicted  (none: no neighbours)   [rule {prediction.rule.value}, k {prediction.k}]")
    else:
        lines.append(f"  predicted  {shown_class_name(prediction.label_name)} (label {prediction.label})   "
                     f"[rule {prediction.rule.value}, k {prediction.k}]")
    if prediction.rerank_reason:
        lines.append(f"  re-rank    {prediction.rerank_reason}"
                     + (f" (the vote said {shown_class_name(prediction.vote_label_name)})"
                        if prediction.label_name != prediction.vote_label_name else "")
                     + (f": {prediction.rerank_detail}" if prediction.rerank_detail else "")
                     + f"   [{prediction.rerank_calls} calls]")
    if prediction.confidence is not None:
        lines.append(f"  confidence {prediction.confidence:.3f} "
                     f"({'calibrated' if prediction.calibrated else 'raw share of the score, uncalibrated'})")
    top = prediction.top_scores(_TOP_SCORES)
    lines.append("  scores     " + "   ".join(f"{shown_class_name(name)} {score:.6g}" for name, score in top)
                 + (f"   (+{len(prediction.scores) - len(top)} more)" if len(prediction.scores) > len(top) else ""))
    if explain:
        lines.append(f"  {'rank':>4}  {'distance':>10}  {'weight':>12}  {'label':<20}  {'id':<30}  uri")
        for rank, n in enumerate(prediction.neighbors):
            lines.append(f"  {rank:>4}  {n.distance:>10.6f}  {n.weight:>12.6g}  "
                         f"{f'{shown_class_name(n.label_name)} ({n.label})':<20}  {n.id:<30}  {n.uri}")
            if regions is not None:
                match = regions.regions[rank]
                lines.append("        regions (query -> neighbour, similarity)  " + "  ".join(
                    f"{i}->{j} {s:.3f}" for i, (j, s) in enumerate(zip(match.matched, match.similarity))))
    return "\n".join(lines)


def render_unreadable(image: str, unreadable: UnreadableQuery) -> str:
    """The text record of a query image that could not be read: its name and the reason."""
    return f"{image}\n  unreadable {unreadable.reason}"


def _json_result(image: str, prediction: Prediction | UnreadableQuery, *, explain: bool,
                 regions: RegionPrediction | None = None) -> dict:
    if isinstance(prediction, UnreadableQuery):
        return {"image": image, "error": prediction.reason}
    out = {"image": image, **prediction.to_dict()}
    if not explain:
        del out["neighbors"]
    elif regions is not None:
        out["regions"] = regions.to_dict()
    return out


# --------------------------------------------------------------------------- HTML


def _thumbnail(uri: str) -> tuple[str | None, str]:
    """Returns ``(data URI, "")`` for a readable image, or ``(None, reason)`` for one that is not."""
    # Imported here: Pillow is only needed for --html.
    from PIL import Image

    from encoders.preprocess import ImageDecodeError, decode_image
    if not uri:
        return None, "no source uri recorded"
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        rgb = decode_image(storage.read_bytes(path))
    except (OSError, ImageDecodeError) as e:
        return None, f"{type(e).__name__}: {e}"
    img = Image.fromarray(rgb, "RGB")
    # Re-encoded as a small PNG: one format for every source, and the page stays small for large photos.
    img.thumbnail((_THUMB_PX, _THUMB_PX), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), ""


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
section { border-top: 1px solid #ccc; padding: 1em 0; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; width: 150px; font-size: 12px; word-break: break-all; }
figure.query { width: 180px; }
figure img, .missing { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated;
  background: #f4f4f4; border: 1px solid #ddd; }
.missing { display: flex; align-items: center; justify-content: center; text-align: center; color: #a00;
  font-size: 11px; overflow: hidden; }
.same { outline: 3px solid #2a2; } .other { outline: 3px solid #c44; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 8px; text-align: left; }
.unreadable { color: #a00; }
figure.heatmap { width: 340px; } img.heat { width: 160px; height: 160px; margin-right: 4px; }
"""


def _figure(uri: str, caption_lines: Sequence[str], thumbs: dict, *, css_class: str = "",
            figure_class: str = "") -> str:
    if uri not in thumbs:
        thumbs[uri] = _thumbnail(uri)
    src, reason = thumbs[uri]
    if src is None:
        image = f'<div class="missing {css_class}">source unreadable: {html.escape(reason)}</div>'
    else:
        image = f'<img class="{css_class}" src="{src}" alt="{html.escape(uri)}">'
    caption = "<br>".join(html.escape(line) for line in caption_lines)
    return f'<figure class="{figure_class}">{image}<figcaption>{caption}</figcaption></figure>'


def render_html(memory_path: str, results: Sequence[tuple[str, Prediction | UnreadableQuery]], *,
                regions: dict[int, RegionPrediction] | None = None, preprocess: PreprocessSpec | None = None) -> str:
    """A self-contained page: each query, its predicted label and scores, and its neighbours.

    Thumbnails are read from each neighbour's source uri (local or ``gs://``) and inlined as base64 PNG
    ``data:`` URIs; a source that cannot be read or decoded shows a placeholder with the reason. A query
    image that could not be read has its section, in its place, with the reason. All text is HTML-escaped.
    ``regions`` (a region memory: result index -> `memory.regions.classify.RegionPrediction`, with the
    memory's ``preprocess`` spec) adds, for each winning neighbour, heat maps of which query region matched
    which of its regions (`evaluation.region_heatmap`).
    """
    thumbs: dict[str, tuple[str | None, str]] = {}
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
             f"<title>vmem classify: {html.escape(memory_path)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>Visual memory classification</h1><p>memory: <code>{html.escape(memory_path)}</code></p>"]
    for index, (image, p) in enumerate(results):
        if isinstance(p, UnreadableQuery):
            parts.append(f'<section><h2>{html.escape(image)}</h2><p class="unreadable">unreadable: '
                         f"{html.escape(p.reason)}</p></section>")
            continue
        label = (f"abstained (the vote said {shown_class_name(p.vote_label_name)})" if p.abstained
                 else shown_class_name(p.label_name) if p.label >= 0 else "(none: no neighbours)")
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{score:.6g}</td></tr>"
                       for name, score in p.top_scores(_TOP_SCORES))
        parts.append("<section>")
        parts.append(f"<h2>{html.escape(image)}</h2>")
        parts.append(f"<p>predicted <b>{html.escape(label)}</b> &middot; rule {html.escape(p.rule.value)}, "
                     f"k {p.k}</p>")
        if p.abstain_reason is not None:
            parts.append(f"<p>{html.escape(p.abstain_reason.value)}: {html.escape(p.reason)}</p>")
        parts.append('<div class="row">')
        parts.append(_figure(image, ["query"], thumbs, figure_class="query"))
        parts.append(f"<table><tr><th>class</th><th>score</th></tr>{rows}</table>")
        parts.append("</div><h3>neighbours</h3><div class=\"row\">")
        for rank, n in enumerate(p.neighbors):
            parts.append(_figure(
                n.uri,
                [f"#{rank}  {shown_class_name(n.label_name)}", f"distance {n.distance:.6f}", f"weight {n.weight:.6g}",
                 f"id {n.id}"],
                thumbs, css_class="same" if n.label == p.label else "other"))
        parts.append("</div>")
        if regions and index in regions:
            parts.append(_region_matches(image, p, regions[index], preprocess))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _region_matches(image: str, p: Prediction, found: RegionPrediction, preprocess: PreprocessSpec) -> str:
    """Heat-map pairs (query, neighbour) for the neighbours that voted for the predicted class."""
    from encoders.preprocess import ImageDecodeError
    from evaluation.region_heatmap import data_uri, heatmap_png, match_maps, view_pixels

    def pixels(uri: str):
        try:
            return view_pixels(storage.read_bytes(_local(uri)), preprocess), ""
        except (OSError, ImageDecodeError) as e:
            return None, f"{type(e).__name__}: {e}"

    query, reason = pixels(image)
    if query is None:
        return f'<p class="unreadable">no heat map: query unreadable ({html.escape(reason)})</p>'
    parts = [f"<h3>where the winning neighbours matched ({found.grid}x{found.grid} regions, rule "
             f"{html.escape(found.region_rule.value)}; query region i -&gt; neighbour region j, red = closer)</h3>",
             '<div class="row">']
    for rank, (n, match) in enumerate(zip(p.neighbors, found.regions)):
        if n.label != p.label:
            continue
        maps = match_maps(match)
        memory, reason = pixels(n.uri)
        scale = {"low": float(maps.query.min()), "high": float(maps.query.max())}
        q_png = heatmap_png(query, found.boxes, maps.query, maps.query_labels, **scale)
        q_img = f'<img class="heat" src="{data_uri(q_png)}" alt="query regions">'
        m_png = None if memory is None else heatmap_png(memory, found.boxes, maps.memory, maps.memory_labels, **scale)
        m_img = (f'<img class="heat" src="{data_uri(m_png)}" alt="neighbour regions">' if m_png is not None
                 else f'<div class="missing">source unreadable: {html.escape(reason)}</div>')
        pairs = ", ".join(f"{i}->{j} {s:.2f}" for i, (j, s) in enumerate(zip(match.matched, match.similarity)))
        parts.append(f'<figure class="heatmap">{q_img}{m_img}<figcaption>#{rank} {html.escape(n.id)}<br>'
                     f"{html.escape(pairs)}</figcaption></figure>")
    parts.append("</div>")
    return "".join(parts)


# --------------------------------------------------------------------------- main


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        rule = VotingRule.parse(args.rule)
    except ValueError as e:
        raise UsageError(f"--rule: {e}") from None
    k = _parse_k(args.k)
    try:
        params = VotingParams(softmax_tau=args.tau, rank_alpha=args.alpha)
    except ValueError as e:
        raise UsageError(f"--tau/--alpha: {e}") from None
    # Cheap check before the memory and the encoder load (seconds): nothing to answer when no image exists.
    # Some missing ones are reported in their places, the others answered.
    missing = [image for image in args.images
               if not storage.is_gcs(_local(image)) and not os.path.isfile(_local(image))]
    if len(missing) == len(args.images):
        raise FileNotFoundError("; ".join(f"IMAGE {image!r} is not a readable file" for image in missing)
                                + "; pass paths of image files (PNG, JPEG, ...)")
    if args.abstain_below is not None and not 0.0 <= args.abstain_below <= 1.0:
        raise UsageError(f"--abstain-below must be a probability in [0, 1], got {args.abstain_below}; e.g. 0.8")
    try:
        query_filter, crowding = rerank_args.selection_from_args(args)
        spec = rerank_args.rerank_spec_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.html and os.path.isdir(args.html):
        raise UsageError(f"--html {args.html!r} is a directory; pass a file name such as neighbours.html")

    from memory.store.manifest import ManifestError
    from memory.visual_memory import VisualMemory
    try:
        memory = VisualMemory.open(args.memory, verify=args.verify, runtime=args.runtime)
    except ManifestError as e:
        raise ManifestError(f"--memory {args.memory!r}: {e}") from None
    if k > len(memory):
        print(f"vmem classify: note: --k {k} exceeds the memory's {len(memory)} live entries; all "
              f"{len(memory)} vote (k {max(len(memory), 1)})", file=sys.stderr)
    reranker = None
    if spec is not None:
        reranker = _DryRun(spec.text) if args.rerank_dry_run else spec.build()
    from memory.rerank.base import ResponseCache
    from memory.regions.layout import region_grid
    regions: dict = {}
    if region_grid(memory.manifest) is not None:
        predictions, regions = _classify_regions(memory, args, rule=rule, k=k, params=params, selected=(
            query_filter is not None or crowding is not None or spec is not None))
    elif args.region_rule is not None:
        raise UsageError(f"--region-rule {args.region_rule}: {args.memory!r} is not a region memory (built without "
                         "--regions); drop the flag or rebuild with `vmem build --regions G`")
    else:
        predictions = memory.classify(
            list(args.images), rule=rule, k=k, params=params, abstain_below=args.abstain_below, filters=query_filter,
            crowding=crowding, rerank=reranker, rerank_below=args.rerank_below, rerank_top_n=args.rerank_top_n,
            rerank_cache=None if args.rerank_cache is None else ResponseCache(args.rerank_cache),
            on_unreadable=OnUnreadable.REPORT)
    unreadable = [p for p in predictions if isinstance(p, UnreadableQuery)]
    if len(unreadable) == len(predictions):  # Nothing to show: the reasons are the whole answer.
        raise ValueError("; ".join(u.reason for u in unreadable))
    results = list(zip(args.images, predictions))
    answered = [(image, p) for image, p in results if not isinstance(p, UnreadableQuery)]
    predictions = [p for _, p in answered]
    if reranker is not None:
        from collections import Counter
        reasons = Counter(p.rerank_reason for p in predictions)
        print(f"re-rank ({reranker.name}, margin < {args.rerank_below:g}): "
              + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
              + f"; {sum(p.rerank_calls for p in predictions)} calls"
              + (" (dry run: no call made)" if args.rerank_dry_run else ""), file=sys.stderr)

    if args.json:
        print(json.dumps({"memory": args.memory, "unreadable": len(unreadable), "results": [
            _json_result(image, p, explain=args.explain, regions=regions.get(i))
            for i, (image, p) in enumerate(results)]}, indent=2))
    else:
        print("\n\n".join(render_unreadable(image, p) if isinstance(p, UnreadableQuery)
                           else render_text(image, p, explain=args.explain, regions=regions.get(i))
                           for i, (image, p) in enumerate(results)))
    if args.html:
        from memory.queries import query_preprocess
        storage.write_text(args.html, render_html(args.memory, results, regions=regions,
                                                  preprocess=query_preprocess(memory.manifest, args.memory)))
        print(f"wrote {args.html}", file=sys.stderr)
    if unreadable:
        print(f"vmem classify: error: {len(unreadable)} of {len(results)} images could not be read (the other "
              f"{len(answered)} are answered):\n" + "\n".join(f"  {u.reason}" for u in unreadable), file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _classify_regions(memory: VisualMemory, args: argparse.Namespace, *, rule: VotingRule, k: int,
                      params: VotingParams, selected: bool
                      ) -> tuple[list[Prediction | UnreadableQuery], dict[int, RegionPrediction]]:
    """A region memory's answers (Prediction or UnreadableQuery per image) and, by index, their region matches."""
    if selected:
        raise UsageError("--filter, --crowding and --rerank do not apply to a region memory's region classify; "
                         "drop them (or classify a memory built without --regions)")
    from memory.regions.classify import RegionPrediction, classify_regions
    found = classify_regions(memory, list(args.images), region_rule=args.region_rule or RegionRule.MAXSIM, rule=rule,
                             k=k, params=params, abstain_below=args.abstain_below, on_unreadable=OnUnreadable.REPORT)
    regions = {i: r for i, r in enumerate(found) if isinstance(r, RegionPrediction)}
    return [r.prediction if isinstance(r, RegionPrediction) else r for r in found], regions


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem classify``; returns the exit status (0 ok, 1 runtime failure, 2 bad flag)."""
    return run_command("vmem classify", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
