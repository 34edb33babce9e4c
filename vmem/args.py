"""What every ``vmem`` subcommand shares: the usage-error type, its exit status and a parser that raises.

No Beam or TensorFlow import, so subcommands stay quick to start.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad flag or input; the message names the value and the fix, and the command exits with EXIT_USAGE."""


class RaisingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of calling sys.exit, so ``main()`` returns a status."""

    def error(self, message: str):
        raise UsageError(message)


def run_command(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
                argv: Sequence[str] | None, *, errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parses ``argv`` and returns ``run(args)``: what a subcommand's ``main`` does.

    A UsageError (or one of ``errors``) prints ``PROG: error: MESSAGE`` to stderr and returns EXIT_USAGE;
    ``--help`` prints the help and returns 0.
    """
    try:
        return run(parser.parse_args(argv))
    except (UsageError, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0)
