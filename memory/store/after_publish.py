"""A writer that published a version and then failed: the version stands, the message says so first.

A writer (add, forget, prune, re-index) publishes version n+1 and then has steps left that change nothing a
reader sees: removing its spill files and abandoned attempts, the purge ``forget --purge-history`` asked for,
orphan directories of crashed runs, the prune summary. When one of those fails, nothing is lost (version n+1
is complete and readable), but a plain error would read as if the whole write failed. :func:`after_publish`
turns such a failure into an :class:`AfterPublishError` whose one message names the published version first,
then the step that failed and its cause, then how to finish it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

__all__ = ["AfterPublishError", "after_publish", "cause_text"]

# Beam re-raises a DoFn's error as the same type with " [while running 'STEP']" appended to its message.
_RUNNER_STEP = re.compile(r"( \[while running '[^']*'\])+$")
# How a Python traceback in a remote runner's failure text ends for this error.
_IN_TEXT = re.compile(r"AfterPublishError: (published version \d+ of .*)$", re.MULTILINE)


def cause_text(error: BaseException) -> str:
    """An error's message in one piece, without the step annotation a Beam runner appends to it."""
    text = _RUNNER_STEP.sub("", str(error.args[0]) if len(error.args) == 1 else str(error))
    return text if isinstance(error, (OSError, ValueError, RuntimeError)) else f"{type(error).__name__}: {text}"


class AfterPublishError(RuntimeError):
    """Version n+1 is published (readers get it); a step after the publish failed.

    The message, built by :meth:`after`, reads ``published version N of ROOT (readers get it now); then STEP
    failed: CAUSE. FIX``. It takes one string argument, so runners that re-raise a worker's error as its own
    type (Beam does) keep it.
    """

    @classmethod
    def after(cls, *, root: str, version: int, step: str, error: BaseException | str, fix: str) -> AfterPublishError:
        """The error for ``step`` failing with ``error`` after version ``version`` of ``root`` was published.

        Args:
          root: The memory.
          version: The version that was published.
          step: What failed, e.g. "removing orphan re-index directories".
          error: Its cause (an exception, or its message).
          fix: What to do, e.g. "Remove what it names, then re-run `vmem reindex`: it finishes the clean-up."
        """
        cause = error if isinstance(error, str) else cause_text(error)
        return cls(f"published version {version} of {root} (readers get it now); then {step} failed: "
                   f"{cause.rstrip('.')}. {fix}")

    def without_runner_step(self) -> AfterPublishError:
        """This error as it was raised, without the step annotation a runner appended."""
        return AfterPublishError(_RUNNER_STEP.sub("", str(self.args[0]) if self.args else ""))

    @classmethod
    def from_text(cls, text: str) -> AfterPublishError | None:
        """The error a remote worker raised, from the text of a runner's failure (its traceback's last
        ``AfterPublishError: ...`` line), or None when the text holds none."""
        found = _IN_TEXT.findall(text)
        return cls(_RUNNER_STEP.sub("", found[-1].rstrip())) if found else None


@contextlib.contextmanager
def after_publish(*, root: str, version: int, step: str, fix: str) -> Iterator[None]:
    """Runs a step that follows the publish of ``version``; its failure becomes an AfterPublishError.

    Example::

        with after_publish(root=root, version=m.version, step="purging the history", fix="..."):
            purge_history(root)
    """
    try:
        yield
    except AfterPublishError:
        raise
    except Exception as e:  # pylint: disable=broad-except  # Any failure here happened after the publish.
        raise AfterPublishError.after(root=root, version=version, step=step, error=e, fix=fix) from e
