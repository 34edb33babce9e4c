"""What every job shares at launch: its flag-error type and runner defaults (Beam is imported only when a
job resolves its PipelineOptions, TensorFlow never: launchers stay quick)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

    from memory.store.after_publish import AfterPublishError

# Beam 2.77's FnApiRunner in --direct_running_mode=multi_threading corrupts data between stages when
# several worker threads run bundles of large elements at once: measured here, `vmem evaluate` on 3,000
# queries sometimes reported 2,999 queries (one silently lost), sometimes allocated 24 GB and was killed,
# and a 10-line pipeline (10,000 x 5 KB arrays -> BatchElements -> fan-out -> GroupByKey -> CombinePerKey
# -> AsList side input) failed 3 runs out of 3 with "Invalid PaneInfoEncoding" / a MemoryError inside the
# runner's coder. The same pipeline is correct in in_memory and multi_processing modes, so those are the
# only modes we use or recommend.
_UNSAFE_MODE = "multi_threading"
DEFAULT_RUNNER = "FnApiRunner"

# What a job's typed entry point (`pipelines.build.build_memory`, ...) takes as runner settings: Beam flags
# (``["--runner=DataflowRunner", "--project=P", ...]``), a PipelineOptions, or None (the defaults).
BeamOptions = Union["PipelineOptions", Sequence[str], None]


class FlagError(ValueError):
    """A job flag has a bad value, or two flags exclude each other; the message names the flag and the fix.

    Raised while a job's ``run`` parses its flags, or its typed entry point (`pipelines.build.build_memory`,
    ...) checks its arguments, before anything is read or written. The ``vmem`` commands
    report it as a usage error (exit status 2); every other exception of a job is a runtime failure.
    """


def runner_error(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The innermost exception of ``kinds`` in ``error``'s cause/context chain: runners re-raise a worker's
    error wrapped in, or chained to, their own types (Beam re-raises one as a copy of its type with
    "[while running 'STEP']" appended), so the innermost is the one its author raised."""
    seen, found = set(), None
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            found = error
        seen.add(id(error))
        # ``raise X from None`` hides the context: X is the error its author meant to report.
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return found


def after_publish_error(error: BaseException) -> AfterPublishError | None:
    """The AfterPublishError a job's worker raised, from the runner's error: in its chain (in-process runners) or
    in its text (remote runners report a worker's traceback as text); without the runner's step annotation."""
    # Imported here: the `vmem` commands import this module, and `memory` imports numpy and ScaNN.
    from memory.store.after_publish import AfterPublishError  # pylint: disable=g-import-not-at-top
    found = runner_error(error, (AfterPublishError,))
    if isinstance(found, AfterPublishError):
        return found.without_runner_step()
    return AfterPublishError.from_text(str(error))


def _has_flag(args: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


def _flag_value(args: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def with_default_runner(beam_args: Sequence[str]) -> list[str]:
    """Defaults to Beam's in-process portable runner (what DirectRunner itself delegates to), one worker.

    DirectRunner in Beam 2.77 first tries to download the Prism binary; offline that costs a failed
    download on every run, so without an explicit ``--runner`` we go straight to the in-process runner
    (``FnApiRunner``, in_memory mode). One worker is enough for the embedding jobs: the encoder already
    uses every core (measured: build job 0.81x-0.91x of the raw encoder rate on 2 CPUs,
    evaluation/benchmarks/bench_jobs.py). ``--direct_running_mode=multi_processing
    --direct_num_workers=N`` runs N worker processes instead.

    Raises:
      FlagError: for ``--direct_running_mode=multi_threading`` with more than one worker, which loses or
        corrupts elements in this Beam version (see the comment above); the message names the safe modes.
    """
    args = list(beam_args)
    _check_running_mode(_flag_value(args, "--direct_running_mode"), _flag_value(args, "--direct_num_workers"))
    if not _has_flag(args, "--runner"):
        args.append(f"--runner={DEFAULT_RUNNER}")
    return args


def _check_running_mode(mode: str | None, workers: str | int | None) -> None:
    if mode == _UNSAFE_MODE and workers not in (None, 1, "1"):
        raise FlagError(
            f"--direct_running_mode={_UNSAFE_MODE} with --direct_num_workers={workers} is refused: Beam 2.77's "
            "multi-threaded local runner loses or corrupts elements between stages of these jobs (measured). "
            "Use --direct_running_mode=multi_processing --direct_num_workers=N for N worker processes, or "
            "leave both flags out (one in-process worker).")


def resolve_pipeline_options(options: BeamOptions = None) -> PipelineOptions:
    """A job's PipelineOptions: the runner settings with `with_default_runner`'s default and refusal.

    Args:
      options: Beam flags (``["--runner=DataflowRunner", "--project=P", ...]``), a PipelineOptions, or None
        (no flags). A PipelineOptions without a runner gets FnApiRunner set on it, as flags without
        ``--runner`` get ``--runner=FnApiRunner``.

    Raises:
      FlagError: the multi-threaded local runner with more than one worker (see `with_default_runner`).
      TypeError: a single string instead of a sequence of flags.
    """
    # pylint: disable-next=g-import-not-at-top
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
    if isinstance(options, str):
        raise TypeError(f"pipeline_options {options!r}: pass a list of Beam flags (e.g. {options.split()!r}) or a "
                        "PipelineOptions, not one string.")
    if not isinstance(options, PipelineOptions):
        return PipelineOptions(with_default_runner(options or ()))
    direct = options.view_as(DirectOptions)
    _check_running_mode(direct.direct_running_mode, direct.direct_num_workers)
    standard = options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = DEFAULT_RUNNER
    return options


def worker_pool_threads() -> int:
    """Threads a DoFn's own pool uses on a worker (decoding, a shard's query batches): its cores, at most 4.

    The work on these pools (Pillow, ScaNN) releases the GIL; more than 4 threads bought nothing measurable.
    """
    return max(1, min(4, os.cpu_count() or 1))
