"""Heat maps of region matches: which query region matched which region of a neighbour, drawn on both images.

For one neighbour image of a region memory (`memory.regions.classify.NeighborRegions`), the query's map shades
each query region by the similarity of its best match in the neighbour, and the neighbour's map shades each of
its regions by the best similarity of the query regions that chose it (regions no query region chose stay
clear). Each shaded cell is labelled: ``->j`` on the query (matched the neighbour's region j), ``i,k`` on the
neighbour (chosen by query regions i and k). Images are shown as the encoder saw them (decoded, resized and
cropped by the memory's preprocessing), so the cells sit where the feature map's cells were; the PNGs are
returned as bytes or ``data:`` URIs, so a page that shows them needs no other file.
"""

from __future__ import annotations

import base64
import io
from typing import NamedTuple, Sequence

import numpy as np

from encoders.base import PreprocessSpec
from encoders.preprocess import decode_image, preprocess
from memory.regions.classify import NeighborRegions

HEATMAP_PX = 160


class MatchMaps(NamedTuple):
    """Per-region shading and labels of one query-neighbour pair.

    Attributes:
      query: float [R]: each query region's match similarity.
      query_labels: ``"->j"`` per query region.
      memory: float [R]: per neighbour region, the best similarity of the query regions that matched it
        (NaN: none did).
      memory_labels: The query regions that matched each neighbour region (``"0,2"``; "" for none).
    """
    query: np.ndarray
    query_labels: list[str]
    memory: np.ndarray
    memory_labels: list[str]


def match_maps(neighbor: NeighborRegions) -> MatchMaps:
    """The shading of both images for one neighbour's region matches (see the module docstring)."""
    sims = np.asarray(neighbor.similarity, dtype=np.float64)
    matched = np.asarray(neighbor.matched, dtype=np.int64)
    regions = sims.size
    memory = np.full(regions, np.nan)
    chosen: list[list[int]] = [[] for _ in range(regions)]
    for i, (j, s) in enumerate(zip(matched.tolist(), sims.tolist())):
        chosen[j].append(i)
        memory[j] = s if np.isnan(memory[j]) else max(memory[j], s)
    return MatchMaps(sims, [f"->{j}" for j in matched.tolist()], memory,
                     [",".join(str(i) for i in c) for c in chosen])


def view_pixels(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [S, S, 3]: an encoded image as the encoder sees it (preprocessed, the normalisation undone)."""
    x = preprocess(decode_image(data), spec)
    rgb = x * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def heatmap_png(pixels: np.ndarray, boxes: np.ndarray, values: np.ndarray, labels: Sequence[str], *,
                low: float = 0.0, high: float = 1.0, size: int = HEATMAP_PX) -> bytes:
    """A PNG of ``pixels`` with each box shaded red by its value and labelled.

    Args:
      pixels: uint8 [H, W, 3].
      boxes: float [R, 4] ``(top, left, bottom, right)`` fractions of the image.
      values: float [R]: cosine similarities; shading grows from ``low`` (faint) to ``high`` (strong red);
        NaN: not shaded.
      labels: One text per box ("" for none).
      low, high: The values of the faintest and the strongest shade (a pair's range, so its best match stands
        out: region similarities of one encoder often all lie within a few hundredths).
      size: Side of the square PNG.
    """
    from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

    base = Image.fromarray(np.asarray(pixels, np.uint8), "RGB").resize((size, size), Image.Resampling.NEAREST)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for (top, left, bottom, right), value, label in zip(np.asarray(boxes).tolist(), np.asarray(values).tolist(),
                                                        labels):
        box = (round(left * size), round(top * size), round(right * size) - 1, round(bottom * size) - 1)
        if not np.isnan(value):
            shade = float(np.clip((value - low) / (high - low), 0.0, 1.0)) if high > low else 1.0
            draw.rectangle(box, fill=(230, 30, 30, int(20 + 170 * shade)))
        draw.rectangle(box, outline=(255, 255, 0, 200))
        if label:
            draw.text((box[0] + 3, box[1] + 2), label, fill=(255, 255, 255, 255))
    out = Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
