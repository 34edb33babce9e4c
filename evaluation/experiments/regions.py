"""Region memories measured: accuracy and bytes per image against global only, and where a match is.

One encoder pass per image gives its feature map; from it come the global vector (its mean, what a global
memory stores) and the G x G region vectors of every grid asked (`memory.regions.pooling`). The memories are
built in process (`memory.build.build_memory_local`, the shard format the build job writes) with the demo
build's index config and shard count, and every query goes through `VisualMemory` (global) or
`memory.regions.classify.classify_regions` (regions). Three measurements:

1. **Accuracy and bytes per image** on held-out queries (by default the demo's: ``make demo``'s ImageFolders):
   global only against each region rule, at the same voting rule and k, and each memory's bytes on disk per
   image.
2. **Localisation on composites**: a query item (a held-out image) pasted at a random place on a canvas
   ``--canvas`` times its side, blank or cluttered with fragments of images of other classes. The query's
   best-matching region is the query region whose match in the top neighbour image is closest (what the heat map
   shades darkest); a hit is a region whose box overlaps the pasted item's box by at least half the item's area
   (``overlap``) or holds its centre (``centre``). The baseline is a region drawn uniformly at random, its hit
   rate computed exactly (the mean over the regions).
3. **Accuracy on the composites**, global against regions.

Run (the demo's data; about 4 minutes on 2 cores)::

    python -m evaluation.experiments.regions --output out/regions

Everything is seeded (``--seed``). Prints progress with the elapsed time; writes ``report.json`` and
``report.md`` to ``--output``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence

import numpy as np

from memory.build import build_memory_local
from memory.regions.aggregate import RegionRule
from memory.regions.classify import RegionPrediction, classify_regions
from memory.regions.layout import GRID_KEY, region_ids
from memory.regions.pooling import region_boxes, region_vectors
from memory.vectors import l2_normalize
from memory.visual_memory import VisualMemory

_BATCH = 32
_SIDE = 28  # Fashion-MNIST items.
_CLUTTER_FRAGMENTS = 6


@dataclasses.dataclass(frozen=True)
class Images:
    """Decoded images of an ImageFolder: uint8 pixels, class names, ids (folder-relative paths), uris."""
    pixels: list[np.ndarray]
    labels: list[str]
    ids: list[str]
    uris: list[str]


def read_folder(root: str, *, per_class: int | None = None) -> Images:
    """The first ``per_class`` images (sorted by name) of each class folder of ``root``."""
    from encoders.preprocess import decode_image  # pylint: disable=g-import-not-at-top
    pixels, labels, ids, uris = [], [], [], []
    for cls in sorted(os.listdir(root)):
        names = sorted(os.listdir(os.path.join(root, cls)))[:per_class]
        for name in names:
            path = os.path.join(root, cls, name)
            with open(path, "rb") as f:
                pixels.append(decode_image(f.read()))
            labels.append(cls)
            ids.append(f"{cls}/{name}")
            uris.append(path)
    return Images(pixels, labels, ids, uris)


class Progress:
    """Prints a step with the seconds since the start."""

    def __init__(self):
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:7.1f} s] {message}", file=sys.stderr, flush=True)


def embed(encoder, pixels: Sequence[np.ndarray], grids: Sequence[int], progress: Progress, what: str
          ) -> tuple[np.ndarray, dict[int, np.ndarray], float, tuple[int, int]]:
    """Unit global vectors [n, d], {G: unit [n, 1 + G*G, d]} from one feature-map pass, the encoder seconds and
    the feature map's (h, w)."""
    from encoders.preprocess import preprocess  # pylint: disable=g-import-not-at-top
    spec = encoder.preprocess_spec
    out: dict[int, list[np.ndarray]] = {g: [] for g in grids}
    seconds = 0.0
    for s in range(0, len(pixels), _BATCH):
        batch = np.stack([preprocess(p, spec) for p in pixels[s:s + _BATCH]])
        t = time.monotonic()
        maps = encoder.feature_map(batch)
        seconds += time.monotonic() - t
        size = maps.shape[1:3]
        for g in grids:
            out[g].append(region_vectors(maps, g))
        if (s // _BATCH) % 50 == 0:
            progress(f"{what}: {s + len(batch)}/{len(pixels)} images ({(s + len(batch)) / max(seconds, 1e-9):.0f}/s)")
    vectors = {g: np.concatenate(v) for g, v in out.items()}
    vectors = {g: l2_normalize(v.reshape(-1, v.shape[-1])).reshape(v.shape) for g, v in vectors.items()}
    return vectors[grids[0]][:, 0], vectors, seconds, size


def build(root: str, images: Images, vectors: np.ndarray, *, grid: int | None, shards: int, config,
          identity: dict) -> VisualMemory:
    """A memory of the images' global vectors [n, d], or (``grid``) of their [n, 1 + G*G, d] global + regions."""
    if os.path.exists(root):
        shutil.rmtree(root)
    if grid is None:
        ids, labels, uris, rows = images.ids, images.labels, images.uris, vectors
        recorded = {"encoder": config.encoder.to_dict()}  # `vmem classify` embeds image queries with it.
    else:
        width = 1 + grid * grid
        ids = np.concatenate([np.asarray(images.ids)[:, None], region_ids(images.ids, grid)], axis=1).ravel()
        labels, uris = np.repeat(images.labels, width), np.repeat(images.uris, width)
        rows = vectors.reshape(-1, vectors.shape[-1])
        recorded = {"encoder": config.encoder.to_dict(), GRID_KEY: grid}
    build_memory_local(root, ids=list(ids), labels=list(labels), uris=list(uris), embeddings=rows, num_shards=shards,
                       index_config=config.index, encoder_identity=identity, build_config=recorded)
    return VisualMemory.open(root)


def disk_bytes(root: str) -> int:
    """Bytes of every file under ``root``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


@dataclasses.dataclass(frozen=True)
class Composite:
    """A query item pasted on a larger canvas: pixels, its label, and its box as fractions of the
    preprocessed (resized and centre-cropped) image."""
    pixels: np.ndarray
    label: str
    box: tuple[float, float, float, float]


def composites(items: Images, *, n: int, canvas: int, cluttered: bool, crop_fraction: float,
               rng: np.random.Generator) -> list[Composite]:
    """``n`` composites of randomly chosen items, each pasted whole inside the part the centre crop keeps."""
    side = canvas * _SIDE
    margin = int(np.ceil(side * (1 - crop_fraction) / 2))
    out = []
    for i in rng.choice(len(items.pixels), size=n, replace=False).tolist():
        item = items.pixels[i]
        page = np.zeros((side, side, 3), np.uint8)
        if cluttered:
            others = [j for j in range(len(items.pixels)) if items.labels[j] != items.labels[i]]
            for j in rng.choice(others, size=_CLUTTER_FRAGMENTS).tolist():
                y0, x0 = rng.integers(0, _SIDE // 2, size=2)
                frag = items.pixels[j][y0:y0 + _SIDE // 2, x0:x0 + _SIDE // 2]
                y, x = rng.integers(0, side - _SIDE // 2, size=2)
                page[y:y + _SIDE // 2, x:x + _SIDE // 2] = np.maximum(page[y:y + _SIDE // 2, x:x + _SIDE // 2], frag)
        y, x = rng.integers(margin, side - margin - _SIDE + 1, size=2)
        page[y:y + _SIDE, x:x + _SIDE] = item
        # Fractions of the canvas -> of the centre crop the encoder sees.
        lo = (1 - crop_fraction) / 2
        box = tuple(float((v / side - lo) / crop_fraction) for v in (y, x, y + _SIDE, x + _SIDE))
        out.append(Composite(page, items.labels[i], box))
    return out


def hits(boxes: np.ndarray, item: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """bool [R] each region overlaps at least half the item's area; bool [R] each region holds its centre."""
    top, left, bottom, right = item
    inter_h = np.clip(np.minimum(boxes[:, 2], bottom) - np.maximum(boxes[:, 0], top), 0, None)
    inter_w = np.clip(np.minimum(boxes[:, 3], right) - np.maximum(boxes[:, 1], left), 0, None)
    overlap = inter_h * inter_w >= 0.5 * (bottom - top) * (right - left)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    centre = (boxes[:, 0] <= cy) & (cy < boxes[:, 2]) & (boxes[:, 1] <= cx) & (cx < boxes[:, 3])
    return overlap, centre


def localisation(found: Sequence[RegionPrediction], items: Sequence[Composite], boxes: np.ndarray,
                 query_regions: np.ndarray, memory: VisualMemory) -> dict:
    """Hit rates of the best-matching query region, two ways, against a uniformly random region (exact mean).

    ``match``: the query region whose MaxSim match in the top neighbour image is closest (the heat map's
    darkest cell). ``whole``: the query region closest to the top neighbour image's global vector.
    """
    rates: dict[str, list[float]] = {}
    for p, item, q in zip(found, items, query_regions):
        overlap, centre = hits(boxes, item.box)
        top = p.regions[0]  # The top neighbour image.
        picks = {"match": int(np.argmax(top.similarity)),
                 "whole": int(np.argmax(q[1:] @ memory.get_embeddings([top.image_id])[0]))}
        for name, hit in (("overlap", overlap), ("centre", centre)):
            for how, i in picks.items():
                rates.setdefault(f"best_region_{how}_{name}_pct", []).append(float(hit[i]))
            rates.setdefault(f"random_region_{name}_pct", []).append(float(hit.mean()))
    return {name: round(100 * float(np.mean(v)), 1) for name, v in sorted(rates.items())}


def accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    return round(100 * float(np.mean([p == t for p, t in zip(predicted, truth)])), 2)


def run(args: argparse.Namespace) -> dict:
    """Runs the three measurements; returns the results (see the module docstring)."""
    from configs.build import load_config  # pylint: disable=g-import-not-at-top
    from encoders import load_encoder  # pylint: disable=g-import-not-at-top
    progress = Progress()
    rng = np.random.default_rng(args.seed)
    config = load_config(args.config)
    grids = sorted(set(args.grids))
    memory_images = read_folder(args.memory_images, per_class=args.memory_per_class)
    queries = read_folder(args.queries, per_class=args.queries_per_class)
    progress(f"read {len(memory_images.ids)} memory images, {len(queries.ids)} queries")
    encoder = load_encoder(config.encoder)
    identity = encoder.identity.to_dict()
    mem_global, mem_regions, mem_seconds, map_size = embed(encoder, memory_images.pixels, grids, progress, "memory")
    q_global, q_regions, q_seconds, _ = embed(encoder, queries.pixels, grids, progress, "queries")
    kind = dict(rule=args.rule, k=args.k)
    results: dict = {"setup": {"memory_images": len(memory_images.ids), "queries": len(queries.ids), "grids": grids,
                               "rule": args.rule, "k": args.k, "seed": args.seed, "shards": args.shards,
                               "encoder": identity["name"], "composites_per_canvas": args.composites,
                               "canvas_times_item": args.canvas},
                     "timing_seconds": {"encoder_memory": round(mem_seconds, 1),
                                        "encoder_queries": round(q_seconds, 1)}}
    work = args.output
    os.makedirs(work, exist_ok=True)
    global_memory = build(os.path.join(work, "memory-global"), memory_images, mem_global, grid=None,
                          shards=args.shards, config=config, identity=identity)
    t = time.monotonic()
    flat = [p.label_name for p in global_memory.classify(q_global, **kind)]
    global_ms = 1000 * (time.monotonic() - t) / len(flat)
    results["queries"] = {"global": {"accuracy_pct": accuracy(flat, queries.labels),
                                     "bytes_per_image": round(disk_bytes(global_memory_root(work)) /
                                                              len(memory_images.ids))}}
    results["timing_seconds"]["classify_ms_per_query_global"] = round(global_ms, 2)
    progress(f"global: {results['queries']['global']}")
    region_memories = {}
    for g in grids:
        memory = build(os.path.join(work, f"memory-regions-{g}"), memory_images, mem_regions[g], grid=g,
                       shards=args.shards, config=config, identity=identity)
        region_memories[g] = memory
        size = round(disk_bytes(os.path.join(work, f"memory-regions-{g}")) / len(memory_images.ids))
        for rule in RegionRule:
            t = time.monotonic()
            found = classify_regions(memory, q_regions[g], region_rule=rule, **kind)
            ms = 1000 * (time.monotonic() - t) / len(found)
            name = f"regions-{g}x{g}-{rule.value}"
            results["queries"][name] = {"accuracy_pct": accuracy([p.prediction.label_name for p in found],
                                                                 queries.labels), "bytes_per_image": size}
            results["timing_seconds"][f"classify_ms_per_query_{name}"] = round(ms, 2)
            progress(f"{name}: {results['queries'][name]} ({ms:.1f} ms/query)")
    results["composites"] = {}
    crop = encoder.preprocess_spec.crop_fraction
    for cluttered in (False, True):
        canvas = "cluttered" if cluttered else "blank"
        made = composites(queries, n=args.composites, canvas=args.canvas, cluttered=cluttered, crop_fraction=crop,
                          rng=rng)
        c_global, c_regions, _, _ = embed(encoder, [c.pixels for c in made], grids, progress, f"{canvas} composites")
        truth = [c.label for c in made]
        row = {"global": {"accuracy_pct": accuracy([p.label_name for p in global_memory.classify(c_global, **kind)],
                                                   truth)}}
        for g in grids:
            boxes = region_boxes(*map_size, g)
            for rule in RegionRule:
                found = classify_regions(region_memories[g], c_regions[g], region_rule=rule, **kind)
                row[f"regions-{g}x{g}-{rule.value}"] = {
                    "accuracy_pct": accuracy([p.prediction.label_name for p in found], truth),
                    **localisation(found, made, boxes, c_regions[g], region_memories[g])}
        results["composites"][canvas] = row
        progress(f"{canvas} composites: {json.dumps(row)}")
    results["timing_seconds"]["total"] = round(time.monotonic() - progress.start, 1)
    return results


def global_memory_root(work: str) -> str:
    return os.path.join(work, "memory-global")


def report_markdown(results: dict, command: str) -> str:
    """The results as Markdown tables."""
    s = results["setup"]
    lines = [f"# Region memories: {s['memory_images']} memory images, {s['queries']} queries, rule {s['rule']} "
             f"k {s['k']}", "", f"`{command}`", "", "| memory | accuracy % | bytes per image |", "|---|---:|---:|"]
    for name, row in results["queries"].items():
        lines.append(f"| {name} | {row['accuracy_pct']:.2f} | {row['bytes_per_image']:,} |")
    for canvas, rows in results["composites"].items():
        lines += ["", f"Composites on a {canvas} canvas ({s['canvas_times_item']}x the item's side, "
                      f"{s['composites_per_canvas']} of them):", "",
                  "| memory | accuracy % | overlap: match | overlap: whole | overlap: random | centre: match "
                  "| centre: whole | centre: random |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            cells = [row.get(f"{kind}_pct", "") for kind in (
                "best_region_match_overlap", "best_region_whole_overlap", "random_region_overlap",
                "best_region_match_centre", "best_region_whole_centre", "random_region_centre")]
            lines.append(f"| {name} | {row['accuracy_pct']:.2f} | " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Timings (s, ms per query): " + json.dumps(results["timing_seconds"])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation.experiments.regions",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--memory-images", default="data/fashion-mnist/train", help="ImageFolder of the memory")
    parser.add_argument("--queries", default="data/fashion-mnist/test", help="ImageFolder of held-out queries")
    parser.add_argument("--memory-per-class", type=int, default=None, help="first N images per class (default all)")
    parser.add_argument("--queries-per-class", type=int, default=None, help="first N queries per class (default all)")
    parser.add_argument("--grids", type=int, nargs="+", default=[2, 3], help="region grids G (default 2 3)")
    parser.add_argument("--rule", default="rank", help="voting rule (default rank)")
    parser.add_argument("--k", type=int, default=10, help="neighbours (images) that vote (default 10)")
    parser.add_argument("--shards", type=int, default=4, help="shards per memory (default 4, as make demo)")
    parser.add_argument("--config", default=None, help="build config whose encoder and index are used")
    parser.add_argument("--composites", type=int, default=300, help="composites per canvas kind (default 300)")
    parser.add_argument("--canvas", type=int, default=3, help="canvas side in item sides (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="directory for the memories and the report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    command = "python -m evaluation.experiments.regions " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(results, f, indent=2)
    markdown = report_markdown(results, command)
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
