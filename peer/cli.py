"""Shared plumbing of the command-line tools (``peer``, ``ceremony``): one-line errors, exit codes.

Exit codes, the same for every subcommand:

* 0 — the command did what was asked (for a simulation: the round verified);
* 1 — it ran but the outcome is a failure (a round aborted, a check did not pass);
* 2 — it was asked wrongly (bad arguments, unreadable or malformed input files);
* 130 — stopped by Ctrl-C (the shell's convention).

Operators read these errors in a terminal or a log, so every error is one line naming what
was wrong, never a traceback. Anything that is a bug still raises normally.

A command is an :class:`ArgumentParser` whose subcommands set ``handler`` (a function of the
parsed arguments returning the exit code); :func:`run_command` parses, dispatches and turns
the expected errors into their one line.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn, TextIO

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "UsageError",
    "one_line",
    "run_command",
    "run_guarded",
    "user_errors",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into :class:`UsageError` (one line, exit code 2).

    Identity errors already name the file and the problem; OS errors are about the paths the
    user gave (missing, unreadable, a directory where a file was expected); ``ValueError``
    comes from parsing what those files hold (e.g. "x.pem is not a certificate").
    """
    from .identity import IdentityError  # here: `peer --help` need not load the identities

    try:
        yield
    except (IdentityError, ValueError) as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        raise UsageError(f"{where}{error.strerror or error}") from None


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


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    prog: Callable[[argparse.Namespace], str],
    expected: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse ``argv``, run the chosen subcommand's ``handler``, return the exit code.

    ``--help`` and argument errors end in argparse's ``SystemExit``, whose code is returned
    (the error line is already printed); the handler's :class:`UsageError` and ``expected``
    errors become one line prefixed by ``prog(args)`` (see :func:`run_guarded`).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    return run_guarded(prog(args), lambda: int(handler(args)), expected=expected)
