"""What every ``vmem`` command shares: the exit statuses, the usage-error type and the one runner.

Every command module has ``main(argv) -> int`` that hands its work to :func:`run_command`, so every command
reports errors the same way (as the ``git`` and ``beam`` command lines do):

* 0: success.
* 1: a runtime failure: a file or memory that does not exist or cannot be read, data that cannot be used,
  another writer publishing first, a job that failed. ``vmem CMD: error: MESSAGE`` says what failed and
  what to do; ``VMEM_DEBUG=1`` re-raises instead, for the traceback. A writer that published its version
  and then failed (a clean-up, a purge) says so first: ``published version N of MEMORY (readers get it
  now); then STEP failed: CAUSE. FIX`` (memory.store.after_publish).
* 2: a usage error: an unknown or missing flag, a value outside the flag's allowed values, flags that
  exclude each other. ``vmem CMD: error: MESSAGE`` names the flag.

A command may document one more status of its own (``vmem reindex``: 10, nothing to do).

No Beam or TensorFlow import, so commands stay quick to start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from pipelines.runner import FlagError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "RaisingArgumentParser", "UsageError", "error_message",
           "run_command"]


class UsageError(Exception):
    """A bad flag value or combination; the message names the flag and the fix (exit status 2)."""


class RaisingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (argparse's message names the flag) instead of exiting."""

    def error(self, message: str):
        raise UsageError(message)


def error_message(error: BaseException) -> str:
    """The one line a command prints for a runtime failure."""
    if isinstance(error, KeyError):  # str(KeyError) is the repr of its message.
        return str(error.args[0]) if error.args else "KeyError"
    if isinstance(error, (ValueError, OSError, RuntimeError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("visual_memory").setLevel(logging.INFO)
    # Beam logs a failing DoFn's traceback before the job fails; the command reports that failure in its one
    # message (a lost race, a bad input, a failure after the publish), and VMEM_DEBUG=1 shows the traceback.
    debug = bool(os.environ.get("VMEM_DEBUG"))
    logging.getLogger("apache_beam.runners.common").setLevel(logging.NOTSET if debug else logging.CRITICAL)


def run_command(prog: str, body: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Runs one command's ``body(argv)`` and returns its exit status (see the module docstring).

    Args:
      prog: ``vmem CMD``, the prefix of every error message.
      body: Parses ``argv`` and does the command's work; returns its status (0, or a documented one).
      argv: The arguments after the command name (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    _setup_logging()
    try:
        return body(argv)
    except SystemExit as e:  # argparse: --help (0), or a bad flag it has already reported (2).
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    except (UsageError, FlagError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # pylint: disable=broad-except  # The command-line boundary: a failure is status 1.
        if os.environ.get("VMEM_DEBUG"):
            raise
        print(f"{prog}: error: {error_message(e)}\n(set VMEM_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
