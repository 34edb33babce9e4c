"""``vmem info``: describe a memory as a reader of its latest version sees it (live entries, delta shards,
forgotten and pruned counts, version) and as it was built (classes, encoder, storage, shards, calibration,
tuning).

    vmem info out/fmnist-memory
    vmem info gs://BUCKET/memories/in1k --verify      # also checks every shard's checksum
    vmem info out/fmnist-memory --json                # the manifest, plus "live": memory.live.LiveCounts

After ``add``, ``forget`` or ``prune`` the entry count is the live one (stored rows minus forgotten ones), not
the build's. Reads the manifest, the version history and prune summaries (``--verify`` opens every shard); no
TensorFlow or Beam import, so it answers at once.

Exit status: 0 described (and verified); 1 not a memory, or a checksum does not match; 2 a bad flag.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmem.args import RaisingArgumentParser, run_command

if TYPE_CHECKING:
    from memory.live import LiveCounts

__all__ = ["build_parser", "describe", "main"]


def build_parser() -> RaisingArgumentParser:
    """The ``vmem info`` argument parser."""
    parser = RaisingArgumentParser(prog="vmem info", description="Describe a built memory.")
    parser.add_argument("memory", help="memory directory (local or gs://)")
    parser.add_argument("--json", action="store_true",
                        help="print the manifest as JSON, with the live counts under \"live\"")
    parser.add_argument("--verify", action="store_true", help="also check every shard's checksum")
    return parser


def _live_lines(live: LiveCounts) -> list[str]:
    """The version, live entries, delta shards, forgotten and pruned counts."""
    lines = [f"version      {live.version} ({live.change}"
             + ("" if live.parent is None else f", parent {live.parent}") + ")",
             f"entries      {live.live_entries} live"
             + ("" if live.stored_rows == live.live_entries else
                f" of {live.stored_rows} stored rows ({live.forgotten} forgotten)")
             + ("" if live.built_entries == live.live_entries else f"; the build embedded {live.built_entries}")]
    if live.forgotten:
        hard = "" if not live.hard_pruned else f", {live.hard_pruned} of them by hard pruning"
        lines.append(f"forgotten    {live.forgotten} entries{hard}; hidden by tombstones, their rows are dropped by "
                     "the next `vmem reindex`")
    if live.hard_pruned or live.soft_pruned:
        lines.append(f"pruned       hard {live.hard_pruned or 0} (forgotten), soft {live.soft_pruned} (vote with a "
                     "weight below 1)")
    if live.delta_shards:
        lines.append(f"delta shards {live.delta_shards} ({live.delta_rows} rows) added since the last re-index; "
                     f"main shards hold {live.shard_rows} rows")
    return lines


def describe(manifest, *, live: LiveCounts | None = None) -> str:
    """The text ``vmem info`` prints for a manifest.

    Args:
      manifest: The version described.
      live: Its live counts (`memory.live.live_counts`); default: those the manifest alone shows.
    """
    from memory.live import live_counts  # pylint: disable=g-import-not-at-top
    enc = manifest.encoder
    lines = _live_lines(live or live_counts(None, manifest)) + [
        f"classes      {len(manifest.class_names)}: {', '.join(manifest.class_names[:20])}"
        + (" ..." if len(manifest.class_names) > 20 else ""),
        f"encoder      {enc['name']} ({enc['content_hash'][:23]}...), dim {manifest.dim}, metric {manifest.metric.value}, "
        f"runtime {enc.get('runtime', 'tf')}",
        f"built        {manifest.created_at}; read {manifest.counts.read}, failed {manifest.counts.failed}",
        f"storage      format {manifest.format_version}, embeddings stored as "
        f"{manifest.embedding_dtype.value} (inside each shard's index)",
        f"shards       {len(manifest.shards)}" + (
            "" if manifest.router is None else
            f", partition-routed: {manifest.router.count} router centroids, {manifest.router.probes} probes per query")
        + (", hash shards from one index template (searched as one index)"
           if manifest.router is None and manifest.build_config.get("index_template") else ""),
    ]
    if manifest.calibration is not None:
        from memory.decide.confidence import memory_calibration
        cal = memory_calibration(manifest)
        stale = (cal.fitted_on_version is not None and cal.fitted_on_version != manifest.version
                 and manifest.change.get("kind") != "calibrate")
        lines.append(f"calibration  {cal.describe()}" + (
            "; the memory changed since (re-run vmem calibrate)" if stale else ""))
    if manifest.search_defaults:
        from memory.search.setting import SearchSetting
        tuned = manifest.search_defaults.get("tuned") or {}
        lines.append(f"search       {SearchSetting.from_dict(manifest.search_defaults).describe()} (vmem tune: votes "
                     f"agree with exact search on {100 * tuned.get('agreement', 0):.2f}% of {tuned.get('queries')} "
                     f"queries, version {tuned.get('fitted_on_version')})")
    from memory.regions.layout import region_grid  # pylint: disable=g-import-not-at-top
    grid = region_grid(manifest)
    if grid is not None:
        lines.append(f"regions      {grid} x {grid} region entries per image besides its global one "
                     f"({1 + grid * grid} entries per image; vmem classify scores images by region)")
    if manifest.metadata is not None:
        lines.append(f"metadata     columns {', '.join(manifest.metadata.columns)} for {manifest.metadata.count} entries "
                     "(--filter meta:COLUMN=v, --crowding C:meta:COLUMN)")
    for s in manifest.shards:
        lines.append(f"  {s.name}  {s.count:>9} entries  {s.index_kind:<11} {s.checksum[:19]}...")
    return "\n".join(lines)


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    manifest = read_manifest(args.memory)
    if args.verify:
        from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
        VisualMemory.open(args.memory, verify=True)
    from memory.live import live_counts  # pylint: disable=g-import-not-at-top
    live = live_counts(args.memory.rstrip("/") or args.memory, manifest)
    if args.json:
        print(json.dumps({**manifest.to_dict(), "live": live.to_dict()}, sort_keys=True, indent=2))
    else:
        print(describe(manifest, live=live))
    if args.verify:
        print("verify       all shard checksums match")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem info``; returns the exit status."""
    return run_command("vmem info", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
