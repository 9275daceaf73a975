"""``verify-ledger``: the one implementation behind ``peer verify-ledger`` and
``ceremony verify-ledger``.

Both commands check the ledger of the peer configured in a peer's TOML file against its
roster (:func:`peer.ledger.verify_ledger`) and answer the same way: exit 0 when no problem
is found, 1 otherwise, 2 (one line on stderr) when the configuration, the roster or the
ledger cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import EXIT_FAILED, EXIT_OK, UsageError, user_errors

if TYPE_CHECKING:
    from secagg import Verifier

    from .ledger import Ledger, LedgerProblem, LedgerReport

__all__ = ["add_arguments", "check_ledger", "command", "round_proof_problems"]

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
            verifiers = roster.verifiers()
            report = verify_ledger(ledger, verifiers, min_signatures=min_signatures)
            proofs = round_proof_problems(ledger, verifiers)
            return dataclasses.replace(report, problems=(*report.problems, *proofs))
    except LedgerError as error:
        raise UsageError(f"{config_path}: cannot read the ledger: {error}") from None


def round_proof_problems(ledger: Ledger, verifiers: Mapping[str, Verifier]) -> list[LedgerProblem]:
    """Re-run the succinct check (secagg/succinct.py) of every stored round's evidence
    (peer/ledger/_proofs.py) and check it is the evidence of the agreed record's aggregate.

    An edited transcript, answer, signature, aggregate or parameter fails the check (every
    item is signed over the round's parameters, and the answers over the statement); an
    evidence row without its agreed record, or of another aggregate, is reported too.
    """
    from secagg import (
        RoundConfig,
        SecAggError,
        SuccinctTranscript,
        TranscriptError,
        verify_succinct,
    )

    from .codec import CodecError, decode
    from .ledger import LedgerProblem, ProblemKind
    from .round.agreement import aggregate_hash

    agreed = {(r.record.session_id, r.record.round): r for r in ledger.agreed_records()}
    problems: list[LedgerProblem] = []
    for proof in ledger.round_proofs():

        def problem(message: str, peers: tuple[str, ...] = ()) -> None:
            problems.append(
                LedgerProblem(
                    ProblemKind.ROUND_PROOF,
                    message,
                    session_id=proof.session_id,  # noqa: B023 (called in this iteration)
                    round=proof.round,  # noqa: B023
                    peers=peers,
                )
            )

        stored = agreed.get((proof.session_id, proof.round))
        if stored is None:
            problem("evidence of a round that has no agreed record")
            continue
        try:
            config = RoundConfig.from_dict(json.loads(proof.config_json))
            transcript = decode("SuccinctTranscript", proof.transcript)
        except (ValueError, TypeError, KeyError, CodecError, SecAggError) as error:
            problem(f"the stored evidence cannot be read: {error}")
            continue
        if not isinstance(transcript, SuccinctTranscript) or (
            config.session_id,
            config.round,
        ) != (proof.session_id, proof.round):
            problem("the stored evidence is of another round")
            continue
        try:
            verified = verify_succinct(transcript, config, verifiers, aggregator=proof.aggregator)
        except TranscriptError as error:
            problem(f"the round's succinct check fails: {error}", (error.offender,))
            continue
        if aggregate_hash(verified.aggregate) != stored.record.aggregate_hash:
            problem("the verified aggregate is not the one the agreed record holds")
    return problems


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
