"""Shared plumbing of the command-line tools: one-line errors and exit codes.

Exit codes, the same for every subcommand:

* 0 — the command did what was asked (for a simulation: the round verified);
* 1 — it ran but the outcome is a failure (a round aborted, a check did not pass);
* 2 — it was asked wrongly (bad arguments, unreadable or malformed input files).

Operators read these errors in a terminal or a log, so every error is one line naming what
was wrong, never a traceback. Anything that is a bug still raises normally.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, TextIO

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "UsageError",
    "one_line",
    "run_guarded",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command was called wrongly; the message says what to change."""


def one_line(message: object) -> str:
    """``message`` as a single line (errors from libraries sometimes span several)."""
    return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr and exit code 2.

    argparse's own error output repeats the whole usage block; for a tool driven by scripts
    and read in logs, the one line saying what was wrong is more useful (``--help`` still
    shows the usage).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}\n")


def run_guarded(
    prog: str,
    command: Callable[[], int],
    expected: tuple[type[BaseException], ...] = (),
    stderr: TextIO | None = None,
) -> int:
    """Run ``command``; turn :class:`UsageError` and ``expected`` errors into exit code 2.

    Args:
        prog: the command's name, prefixed to the error line.
        command: the work; returns the exit code.
        expected: further exception types that mean "asked wrongly" (e.g. a library's
            configuration error), reported the same way.
        stderr: where the error line goes (``sys.stderr`` by default).
    """
    out = stderr if stderr is not None else sys.stderr
    caught: tuple[type[BaseException], ...] = (UsageError, *expected)
    try:
        return command()
    except caught as error:
        print(f"{prog}: error: {one_line(error)}", file=out)
        return EXIT_USAGE
