"""The shared ground of every paper experiment: data embedded once, memories built by the real jobs.

A :class:`Workspace` reads an experiment's data -- three specs any build job reads
(`evaluation.experiments.data.ExperimentData`: the memory pool ``train``, the calibration split ``calib``
when there is one, the queries ``test``) -- through the real build job (``vmem build --images`` with the
config's encoder, or ``vmem build --embeddings`` for precomputed embeddings; Beam, ScaNN) **once**, then
exports the embeddings as clip-retrieval folders (``memory.store.export``). A bundled dataset
(``--dataset fashion-mnist|mnist``) is a preset of the same path: its splits are written as PNG
ImageFolders first (`evaluation.experiments.data.Preset`). Every memory an experiment needs -- a subset,
the same entries under randomised labels, a memory without some classes -- is then built from those folders
by ``vmem build --embeddings`` and queried by ``vmem evaluate --embeddings``: the same jobs a user runs, on
the same embeddings, without paying the encoder again. Changing labels never re-embeds anything. Every job
runs with the setup's runner flags.

Everything lives under ``WORK/<dataset>/``; embedding is cached (a stamp records the data and the encoder
identity), so ``vmem experiment`` runs after the first reuse the embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.experiments.data import PRESETS, ExperimentData, Preset, Split
from memory.decide.pruning import PruningMode
from memory.store.blocks import EntryBlock
from memory.store.export import export_embeddings, read_clip_folder, write_clip_folder

_LOG = logging.getLogger("visual_memory")

# Each preset's default held-out classes (new-classes, unlearning, abstain), by dataset.
HOLD_OUT = {name: p.hold_out for name, p in PRESETS.items()}
CUSTOM = "custom"  # The name of experiment data given by specs, unless --name says otherwise.
_PER_CLASS = ("train_per_class", "calib_per_class", "test_per_class")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What is embedded and how memories are built (configs as code; `--train-per-class` etc. override).

    Attributes:
      dataset: A preset ("fashion-mnist", "mnist"), or with ``data`` the name its reports and work directory use.
      train_per_class: Preset memory pool: the first N training images of every class (None with ``data``).
      calib_per_class: Preset calibration split: the next N training images of every class (never in a memory).
      test_per_class: Preset queries: the first N test images of every class.
      shards: Main shards of every memory (brute force below 50,000 entries: exact search).
      k_max: Neighbours retrieved per query (the paper's k range is 1..100); capped, with a logged warning, at
        the memory pool (a preset's train_per_class x its classes; with ``data``, once its pool is read), the
        most entries any experiment's memory holds.
      seed: Seeds every random choice (label noise, subsets, forgotten ids).
      config: A preset's build config whose encoder embeds the images (default the preset's: the bundled
        EfficientNet-Lite0); None with ``data`` (its own ``config``).
      hold_out: Classes held out of the memory by new-classes and abstain, the first forgotten by unlearning
        (default per preset; none with ``data``).
      data: The specs the experiments run on (`ExperimentData`); None: the ``dataset`` preset's.
      runner_flags: Beam flags every job runs with (``--runner=...``, ``--direct_num_workers=N``, Dataflow's).
    """
    dataset: str = "fashion-mnist"
    train_per_class: int | None = None
    calib_per_class: int | None = None
    test_per_class: int | None = None
    shards: int = 2
    k_max: int = 100
    seed: int = 0
    config: str | None = None
    hold_out: tuple[str, ...] = ()
    data: ExperimentData | None = None
    runner_flags: tuple[str, ...] = ()

    def __post_init__(self):
        if self.data is None:
            if self.dataset not in PRESETS:
                raise ValueError(f"unknown dataset {self.dataset!r}; allowed: {', '.join(PRESETS)} (or your own data: "
                                 "--memory-data SPEC --queries SPEC)")
            for name in (*_PER_CLASS, "config"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, getattr(PRESETS[self.dataset], name))
        else:
            # The name is a directory under the work directory, next to the presets' caches.
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.dataset) or self.dataset in PRESETS:
                raise ValueError(f"--name {self.dataset!r}: letters, digits, '.', '_' and '-', not a preset's name "
                                 f"({', '.join(PRESETS)}); it names the data's directory under --work-dir")
            if self.config is not None:
                raise ValueError(f"config {self.config!r} is a preset's; data given by specs names its own "
                                 "(ExperimentData.config, --config)")
            given = [name for name in _PER_CLASS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} sizes a --dataset preset's splits; --memory-data, "
                                 "--queries and --calibration are used whole (leave it out)")
        for name in (*_PER_CLASS, "shards", "k_max"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.data is None:
            if not self.hold_out:
                object.__setattr__(self, "hold_out", HOLD_OUT[self.dataset])
            self._cap_k_max(self.train_per_class * len(PRESETS[self.dataset].classes()))

    def _cap_k_max(self, pool: int) -> None:
        if self.k_max > pool:
            # No memory of an experiment holds more than the pool; the revotes' [queries, k_max] arrays past it
            # would hold only padding, and every vote there is the vote of every entry.
            per_class = f" ({self.train_per_class} per class)" if self.data is None else ""
            _LOG.warning("k_max %d exceeds the memory pool of %d entries%s; k = 1..%d", self.k_max, pool, per_class,
                         pool)
            object.__setattr__(self, "k_max", pool)

    def for_pool(self, pool: int) -> Setup:
        """This setup with k_max capped (logged) at a memory pool of ``pool`` entries, once data has been read."""
        capped = dataclasses.replace(self)
        capped._cap_k_max(pool)
        return capped

    @property
    def preset(self) -> Preset | None:
        """The preset this setup's data comes from, or None for data given by specs."""
        return None if self.data is not None else PRESETS[self.dataset]

    def command(self, name: str) -> str:
        """The `vmem experiment` command line that reproduces experiment ``name`` with this setup."""
        if self.data is None:
            default = Setup(dataset=self.dataset)
            head = [f"vmem experiment {name} --dataset {self.dataset}"]
            compared = (*_PER_CLASS, "shards", "seed")
        else:
            default = Setup(dataset=CUSTOM, data=self.data)
            head = [f"vmem experiment {name}", *self.data.flags()]
            if self.dataset != CUSTOM:
                head += ["--name", shlex.quote(self.dataset)]
            compared = ("shards", "seed")
        flags = [f"--{f.replace('_', '-')} {getattr(self, f)}" for f in compared
                 if getattr(self, f) != getattr(default, f)]
        if self.hold_out != default.hold_out:
            flags.append("--hold-out " + shlex.quote(",".join(self.hold_out)))
        return " ".join([*head, *flags, *(shlex.quote(f) for f in self.runner_flags)])

    def embedding_key(self) -> dict[str, Any]:
        """What the cached embeddings depend on."""
        if self.data is not None:
            return self.data.key()
        return {"dataset": self.dataset, "train_per_class": self.train_per_class,
                "calib_per_class": self.calib_per_class, "test_per_class": self.test_per_class,
                "config": self.config}


SPLITS = tuple(s.value for s in Split)


class Workspace:
    """Experiment data embedded once (see the module docstring) plus helpers that run the real jobs on it.

    ``setup`` is the given one until `prepare` has read the data; then, with data given by specs, its k_max
    is capped at the memory pool (`Setup.for_pool`).
    """

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

    @property
    def pipeline_options(self) -> list[str]:
        """The Beam flags every job of this workspace runs with."""
        return list(self.setup.runner_flags)

    def prepare(self) -> dict[str, Any]:
        """Reads every split of the data through the build job once and exports its embeddings (cached).

        A preset first writes its splits as PNG ImageFolders. Returns the stamp: ``counts`` per split,
        the ``encoder`` identity, the ``encoder_id`` every derived memory records.
        """
        if self._stamp is not None:
            return self._stamp
        stamp = self._read_stamp()
        if stamp is None or stamp.get("key") != self.setup.embedding_key():
            stamp = self._embed()
        self._stamp = stamp
        if self.setup.data is not None:
            self.setup = self.setup.for_pool(stamp["counts"][Split.TRAIN.value])
        return stamp

    def adopt(self, counts: dict[str, int], *, encoder_id: str) -> dict[str, Any]:
        """Takes embeddings already in this workspace's clip-retrieval folders (``embeddings/SPLIT``, written by
        a generator such as `evaluation.synthetic_data`) as its data, without reading them through the build
        job; returns the stamp `prepare` then finds.

        Args:
          counts: Rows of each split written.
          encoder_id: The encoder id every memory and query of the data records.
        """
        stamp = {"key": self.setup.embedding_key(), "counts": dict(counts), "encoder": {"name": encoder_id},
                 "encoder_id": encoder_id, "embed_seconds": 0.0}
        os.makedirs(os.path.dirname(self._stamp_path()), exist_ok=True)
        with open(self._stamp_path(), "w", encoding="utf-8") as f:
            json.dump(stamp, f, indent=2, sort_keys=True)
        self._stamp = None
        return self.prepare()

    def _embed(self) -> dict[str, Any]:
        from configs.build import load_config  # pylint: disable=g-import-not-at-top
        from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
        from pipelines.build import build_memory  # pylint: disable=g-import-not-at-top
        s = self.setup
        data = s.data
        if data is None:
            data = self._timed("prepare_images", s.preset.write, self.root, train_per_class=s.train_per_class,
                               calib_per_class=s.calib_per_class, test_per_class=s.test_per_class, config=s.config)
        # Splits of an earlier setup with more of them would otherwise be read as this one's.
        for stale in (self.path("embed"), self.path("embeddings")):
            shutil.rmtree(stale, ignore_errors=True)
        counts = {}
        config = load_config(data.config).replace(num_shards=1)
        label = "read_embeddings" if data.embeddings else "embed_images"
        for split in data.splits():
            memory = self.path("embed", split.value)
            _LOG.info("reading the %s split (%s %s)", split.value, split.flag, data.spec(split))
            self._timed(label, build_memory, source=data.source(split), output=memory, config=config,
                        encoder_id=data.encoder_id, overwrite=True, pipeline_options=self.pipeline_options)
            counts[split.value] = export_embeddings(memory, self.path("embeddings", split.value))
        identity = read_manifest(self.path("embed", Split.TRAIN.value)).encoder
        stamp = {"key": s.embedding_key(), "counts": counts, "encoder": identity,
                 # Derived memories record the encoder by name (and, for images, content hash): queries must match.
                 "encoder_id": data.encoder_id or f"{identity['name']}@{identity['content_hash'].split(':')[-1][:16]}",
                 "embed_seconds": round(self.seconds.get(label, 0.0), 1)}
        with open(self._stamp_path(), "w", encoding="utf-8") as f:
            json.dump(stamp, f, indent=2, sort_keys=True)
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
        """The embedded split (ids, class names, uris, unit embeddings), read once.

        Raises:
          ValueError: an unknown split, or one the data does not have (naming the flag that gives it).
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if split not in self._tables:
            if split not in self.prepare()["counts"]:
                raise ValueError(f"the data has no {split} split; pass {Split(split).flag} SPEC")
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
                    encoder_id=self.encoder_id, overwrite=True, pipeline_options=self.pipeline_options)
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
                    encoder_id=self.encoder_id, version=version, k_max=k_max or self.setup.k_max,
                    pipeline_options=self.pipeline_options)
        return self._timed("evaluate", write_evaluation_report, out), out

    def add(self, memory: str, spec: str) -> int:
        """``vmem add --embeddings SPEC``; returns the new version."""
        from pipelines.add import add_to_memory  # pylint: disable=g-import-not-at-top
        from pipelines.io.embedding_sources import parse_embeddings_spec  # pylint: disable=g-import-not-at-top
        _, plan = self._timed("add", add_to_memory, memory=memory, source=parse_embeddings_spec(spec),
                              encoder_id=self.encoder_id, pipeline_options=self.pipeline_options)
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
        self._timed("prune", prune_memory, memory=memory, mode=mode, threshold=threshold, k=k,
                    pipeline_options=self.pipeline_options)


def rng_for(setup: Setup, *purpose: Any) -> np.random.Generator:
    """A generator seeded by the setup's seed and what it is for, so experiments draw independently.

    Strings are folded in by CRC-32, not ``hash()``, which Python salts per process.
    """
    return np.random.default_rng([setup.seed, *[p if isinstance(p, int) else zlib.crc32(str(p).encode())
                                                for p in purpose]])


def per_class_rows(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the rows whose label is in ``classes``."""
    return np.isin(labels, np.asarray(list(classes), dtype=str))
