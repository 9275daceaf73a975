"""``verify-ledger``: the one implementation behind ``peer verify-ledger`` and
``ceremony verify-ledger``.

Both commands check the ledger of the peer configured in a peer's TOML file against its
roster (:func:`peer.ledger.verify_ledger`) and answer the same way: exit 0 when no problem
is found, 1 otherwise, 2 (one line on stderr) when the configuration, the roster or the
ledger cannot be read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import EXIT_FAILED, EXIT_OK, UsageError, user_errors

if TYPE_CHECKING:
    from .ledger import LedgerReport

__all__ = ["add_arguments", "check_ledger", "command"]

_SQLITE = "sqlite:///"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``verify-ledger``'s arguments on ``parser`` and make :func:`command` its
    handler."""
    parser.add_argument(
        "--config", type=Path, required=True, metavar="PEER.toml", help="the peer's configuration"
    )
    parser.add_argument(
        "--min-signatures",
        type=int,
        metavar="N",
        help="signatures required per record (default: each session's threshold)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=command)


def check_ledger(config_path: Path, min_signatures: int | None = None) -> LedgerReport:
    """Verify the ledger of the peer configured in ``config_path`` against its roster.

    Raises:
        UsageError: the configuration or the roster cannot be read, there is no ledger where
            the configuration says (a missing SQLite file is not opened: that would create an
            empty ledger that "verifies"), or the ledger cannot be read.
    """
    from .config import load_config
    from .identity import load_certificate, load_roster
    from .ledger import Ledger, LedgerError, verify_ledger

    with user_errors():  # a ConfigFileError is a ValueError naming the file and the key
        config = load_config(config_path)
        roster = load_roster(config.roster, load_certificate(config.ca))
    if config.ledger_url.startswith(_SQLITE) and ":memory:" not in config.ledger_url:
        database = Path(config.ledger_url[len(_SQLITE) :])
        if not database.is_file():
            raise UsageError(f"{config_path}: no ledger at {database} (has this peer run?)")
    try:
        with Ledger(config.ledger_url) as ledger:
            return verify_ledger(ledger, roster.verifiers(), min_signatures=min_signatures)
    except LedgerError as error:
        raise UsageError(f"{config_path}: cannot read the ledger: {error}") from None


def command(args: argparse.Namespace) -> int:
    """Run ``verify-ledger`` with the arguments of :func:`add_arguments`; print the report."""
    report = check_ledger(args.config, args.min_signatures)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "source": report.source,
                    "records": report.records,
                    "checkpoints": report.checkpoints,
                    "problems": [str(p) for p in report.problems],
                },
                sort_keys=True,
            )
        )
    else:
        print(str(report))
    return EXIT_OK if report.ok else EXIT_FAILED
