"""What every ``vmem`` subcommand shares: the usage-error type, its exit status and a parser that raises.

No Beam or TensorFlow import, so subcommands stay quick to start.
"""

from __future__ import annotations

import argparse

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad flag or input; the message names the value and the fix, and the command exits with EXIT_USAGE."""


class RaisingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of calling sys.exit, so ``main()`` returns a status."""

    def error(self, message: str):
        raise UsageError(message)
