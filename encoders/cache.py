"""The cache of model files derived from the bundled weights: published atomically, found by a marker.

Each derived model (the SavedModel export, its LiteRT and ONNX conversions) lives in its own directory of
``cache_root()``, named after the weights' sha256, with a JSON marker written last: its presence means the
directory is complete, and its fields (weights hash, export version, and what the export adds, such as the
model file's own sha256) decide whether the directory is still current. TensorFlow-free.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

MARKER = "visual_memory_bundled.json"


def read_marker(path: str) -> dict[str, Any] | None:
    """The marker of a cache directory, or None when it has none (absent, partial or unreadable)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _current(path: str, expected: Mapping[str, Any], valid: Callable[[str, dict], bool]) -> dict | None:
    marker = read_marker(path)
    if marker is None or any(marker.get(k) != v for k, v in expected.items()) or not valid(path, marker):
        return None
    return marker


def cached_export(final: str, expected: Mapping[str, Any], write: Callable[[str], Mapping[str, Any]],
                  *, valid: Callable[[str, dict], bool] = lambda path, marker: True) -> dict[str, Any]:
    """The marker of ``final``, after writing it with ``write`` unless a current copy is there.

    The export goes to a temporary sibling directory that is renamed into place, so concurrent workers
    never see a half-written model; the loser of a race discards its copy.

    Args:
        final: The cache directory.
        expected: Marker fields a current copy has (name, weights hash, version, ...).
        write: Writes the model into the directory it is given; returns the marker fields it adds.
        valid: Whether a copy whose marker matches ``expected`` is intact (e.g. its file's sha256).

    Returns:
        The marker of the current copy: ``expected`` and what ``write`` added.
    """
    marker = _current(final, expected, valid)
    if marker is not None:
        return marker
    root, name = os.path.split(final)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=root)
    try:
        # mkdtemp makes 0700 dirs; the published cache may be shared by users.
        os.chmod(tmp, 0o755)
        marker = {**expected, **write(tmp)}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f, indent=2)
        if os.path.exists(final) and _current(final, expected, valid) is None:
            # Stale, damaged or partial copy: move it aside (rename is atomic) before publishing.
            stale = tempfile.mkdtemp(prefix=f".{name}-stale-", dir=root)
            os.rename(final, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            marker = _current(final, expected, valid)
            if marker is None:
                raise
            # Another process published an identical export first.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return marker
