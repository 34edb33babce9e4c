"""What an experiment runs on: three specs any build job reads, and the bundled datasets as presets of them.

    vmem experiment k-sweep --memory-data DIR/train --queries DIR/test --output OUT
    vmem experiment abstain --memory-data 'clip:EMB/train,label_column=label' \\
        --queries 'clip:EMB/test,label_column=label' --calibration 'clip:EMB/calib,label_column=label' \\
        --encoder-id dinov2-vitl14 --hold-out CLASS --output OUT

A spec is what ``vmem build`` takes: with ``--encoder-id`` an ``--embeddings`` spec (``clip:DIR,...`` or
``tfrecord:PATTERN,...``, `pipelines.io.embedding_sources.parse_embeddings_spec`), otherwise an ``--images``
spec (ImageFolder directory, ``webdataset:``, ``tfrecord:``, ``manifest:``/CSV/JSONL,
`pipelines.io.readers.parse_image_spec`) embedded by ``--config``'s encoder. A preset
(``--dataset fashion-mnist|mnist``) writes the bundled dataset's splits as ImageFolders and resolves to
those specs plus its defaults (per-class sizes, held-out classes, config); nothing else differs.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shlex
from typing import Any

__all__ = ["ExperimentData", "PRESETS", "Preset", "Split"]


class Split(enum.Enum):
    """The splits of an experiment's data, by the name its workspace stores them under."""
    TRAIN = "train"  # The memory pool.
    CALIB = "calib"  # Calibration queries (never in a memory).
    TEST = "test"    # The queries.

    @property
    def flag(self) -> str:
        """The ``vmem experiment`` flag that gives this split."""
        return {Split.TRAIN: "--memory-data", Split.CALIB: "--calibration", Split.TEST: "--queries"}[self]


@dataclasses.dataclass(frozen=True)
class ExperimentData:
    """The specs of an experiment's splits and how to read them.

    Attributes:
      memory: Spec of the memory pool (``--memory-data``).
      queries: Spec of the queries (``--queries``).
      calibration: Spec of the calibration split (``--calibration``); None when the data has none.
      encoder_id: The encoder that computed precomputed embeddings (``--encoder-id``): the specs are then
        ``--embeddings`` specs. None: the specs are ``--images`` specs.
      config: Build config whose encoder embeds images (``--config``; None: configs.default, as ``vmem build``).

    Raises:
      ValueError: naming the flag, for a spec its reader refuses or ``--config`` with embeddings.
    """
    memory: str
    queries: str
    calibration: str | None = None
    encoder_id: str | None = None
    config: str | None = None

    def __post_init__(self):
        if self.encoder_id is not None and self.config is not None:
            raise ValueError(f"--config {self.config}: the config's encoder embeds images, but --encoder-id "
                             f"{self.encoder_id} says the specs are precomputed embeddings; give one of the two.")
        for split in self.splits():
            self.source(split)  # Fails here, before any job runs, on a spec its reader would refuse.

    @property
    def embeddings(self) -> bool:
        """Whether the specs are precomputed embeddings (``--encoder-id`` given)."""
        return self.encoder_id is not None

    def spec(self, split: Split) -> str | None:
        return {Split.TRAIN: self.memory, Split.CALIB: self.calibration, Split.TEST: self.queries}[split]

    def splits(self) -> tuple[Split, ...]:
        """The splits this data has, in `Split` order."""
        return tuple(s for s in Split if self.spec(s) is not None)

    def source(self, split: Split):
        """The build job's source for ``split``: an EmbeddingSource or an ImageSource.

        Raises:
          ValueError: naming ``split``'s flag and the reader's reason.
        """
        spec = self.spec(split)
        if spec is None:
            raise ValueError(f"the data has no {split.value} split; pass {split.flag} SPEC")
        # pylint: disable=g-import-not-at-top
        from pipelines.io.embedding_sources import EmbeddingKind, parse_embeddings_spec
        from pipelines.io.readers import parse_image_spec
        # pylint: enable=g-import-not-at-top
        try:
            if self.embeddings:
                return parse_embeddings_spec(spec)
            if spec.startswith(EmbeddingKind.CLIP.value + ":"):
                raise ValueError("clip: is a layout of precomputed embeddings; pass --encoder-id NAME (the encoder "
                                 "that computed them)")
            return parse_image_spec(spec)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{split.flag} {spec!r}: {e}") from None

    def flags(self) -> list[str]:
        """The ``vmem experiment`` flags that give this data, shell-quoted."""
        out = []
        for split in (Split.TRAIN, Split.TEST, Split.CALIB):
            if self.spec(split) is not None:
                out += [split.flag, shlex.quote(self.spec(split))]
        for flag, value in (("--encoder-id", self.encoder_id), ("--config", self.config)):
            if value is not None:
                out += [flag, shlex.quote(value)]
        return out

    def key(self) -> dict[str, Any]:
        """What embeddings of this data depend on (the workspace's cache key)."""
        return {"data": dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A bundled dataset as experiment data: its splits written as ImageFolders, and its defaults.

    Attributes:
      name: The bundled dataset (`evaluation.datasets`).
      hold_out: Classes new-classes, unlearning and abstain hold out by default: unlike the remaining ones,
        as the paper's added OOD classes are unlike ImageNet's (see docs/adding_classes.md for close classes).
      config: Build config whose encoder embeds the images.
      train_per_class, calib_per_class, test_per_class: Default split sizes.
    """
    name: str
    hold_out: tuple[str, ...]
    config: str = "configs.fashion_mnist"
    train_per_class: int = 1000
    calib_per_class: int = 100
    test_per_class: int = 100

    def classes(self) -> tuple[str, ...]:
        from evaluation.datasets import class_names  # pylint: disable=g-import-not-at-top
        return class_names(self.name)

    def write(self, root: str, *, train_per_class: int, calib_per_class: int, test_per_class: int,
              config: str) -> ExperimentData:
        """Writes the splits as PNG ImageFolders under ``root``; returns the data they are.

        The memory pool is the first ``train_per_class`` training images of every class, calibration the next
        ``calib_per_class``, the queries the first ``test_per_class`` test images.
        """
        import shutil  # pylint: disable=g-import-not-at-top
        from evaluation.datasets import prepare_dataset  # pylint: disable=g-import-not-at-top
        images, calib = os.path.join(root, "images"), os.path.join(root, "images-calib")
        # PNGs of an earlier, larger setup would otherwise be read as part of this one's splits.
        for stale in (images, calib):
            shutil.rmtree(stale, ignore_errors=True)
        prepare_dataset(self.name, images, per_class=train_per_class, test_per_class=test_per_class)
        prepare_dataset(self.name, calib, per_class=calib_per_class, test_per_class=0,
                        offset_per_class=train_per_class)
        return ExperimentData(memory=os.path.join(images, "train"), queries=os.path.join(images, "test"),
                              calibration=os.path.join(calib, "train"), config=config)


PRESETS = {p.name: p for p in (Preset("fashion-mnist", ("trouser", "bag")), Preset("mnist", ("seven", "nine")))}
