"""``verify-ledger``: the one implementation behind ``peer verify-ledger`` and
``ceremony verify-ledger``.

Both commands check the ledger of the peer configured in a peer's TOML file against its
roster (:func:`peer.ledger.verify_ledger`) and answer the same way: exit 0 when no problem
is found, 1 otherwise, 2 (one line on stderr) when the configuration, the roster or the
ledger cannot be read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import EXIT_FAILED, EXIT_OK, UsageError, user_errors
from .ledger_rounds import (
    acceptance_problems,
    evidence_problems,
    round_parameter_problems,
    round_proof_problems,
    unrecheckable_rounds,
    vote_release_problems,
)

if TYPE_CHECKING:
    from secagg import Verifier

    from .ledger import (
        Ledger,
        LedgerProblem,
        LedgerReport,
        RawRecord,
        RawSession,
        StoredProof,
    )
    from .ledger._verify import ChainChecker

__all__ = [
    "LedgerCheck",
    "RememberingVerifier",
    "acceptance_problems",
    "add_arguments",
    "check_ledger",
    "command",
    "round_parameter_problems",
    "round_proof_problems",
    "unrecheckable_rounds",
    "vote_release_problems",
]

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
    from .ledger import Ledger, LedgerError

    with user_errors():  # a ConfigFileError is a ValueError naming the file and the key
        config = load_config(config_path)
        roster = load_roster(config.roster, load_certificate(config.ca))
    if config.ledger_url.startswith(_SQLITE) and ":memory:" not in config.ledger_url:
        database = Path(config.ledger_url[len(_SQLITE) :])
        if not database.is_file():
            raise UsageError(f"{config_path}: no ledger at {database} (has this peer run?)")
    try:
        with Ledger(config.ledger_url) as ledger:
            return LedgerCheck(roster.verifiers(), min_signatures).run(ledger)
    except LedgerError as error:
        raise UsageError(f"{config_path}: cannot read the ledger: {error}") from None


class RememberingVerifier:
    """A roster key that remembers the signatures it found genuine.

    A :class:`LedgerCheck` run again (the dashboard's, at every new ledger state) would
    otherwise verify every old signature again: 20,000 ECDSA verifications took 2.2 s for
    1,000 rounds of 20 hospitals. An exact (signature, signed bytes) pair this key accepted
    before is accepted without the arithmetic; anything else, a new record or an edited one
    (its signed bytes differ), is verified in full. Failures are not remembered.
    """

    def __init__(self, key: Verifier) -> None:
        self._key = key
        self._genuine: set[tuple[bytes, bytes]] = set()

    def verify(self, signature: bytes, data: bytes) -> bool:
        pair = (bytes(signature), bytes(data))
        if pair in self._genuine:
            return True
        if not self._key.verify(signature, data):
            return False
        self._genuine.add(pair)
        return True


@dataclass
class _Chain:
    """What :meth:`LedgerCheck.run` checked last: the rows exactly as read, the chain checker
    fed with them (its head per session, the model hashes) and the checkpoints' problems."""

    sessions: tuple[RawSession, ...]
    records: tuple[RawRecord, ...]
    checker: ChainChecker
    checkpoints: int
    checkpoint_problems: list[LedgerProblem]


class LedgerCheck:
    """Everything ``verify-ledger`` checks, in one object that can run again.

    :func:`check_ledger` runs one once. The dashboard keeps one per ledger and runs it at
    every new ledger state; what it checked before is not redone when the stored bytes are
    exactly those checked:

    * records: when every session row and every record checked last time reads back
      unchanged (compared value by value, so an edit anywhere is seen), only the records
      appended since are fed to the remembered chain checker, which continues each
      session's hash chain from its remembered head; otherwise the whole chain is checked
      again from each genesis. Signatures verified before are remembered
      (:class:`RememberingVerifier`).
    * round evidence: each stored round's succinct check is remembered by a digest of the
      evidence row and of its agreed record's aggregate hash; an edited row is checked anew.
    * checkpoints: ``all_checkpoints=False`` reads only the checkpoints of the appended
      records (checkpoints are large); the caller re-reads them all now and then.

    The parameter, acceptance and vote-release checks are cheap and always run in full.

    Args:
        verifiers: roster keys by peer id; None runs every check that needs no key (hash
            chain, hashes, checkpoints, round parameters against the proposal) and reports
            nothing on signatures, acceptances, round evidence and vote releases, which
            need the keys.
        min_signatures: as for :func:`~peer.ledger.verify_ledger`.
    """

    def __init__(
        self, verifiers: Mapping[str, Verifier] | None, min_signatures: int | None = None
    ) -> None:
        self.verifiers: dict[str, Verifier] | None = (
            None
            if verifiers is None
            else {peer: RememberingVerifier(key) for peer, key in verifiers.items()}
        )
        self._min_signatures = min_signatures
        self._chain: _Chain | None = None
        self._proofs: dict[bytes, list[LedgerProblem]] = {}

    def run(
        self,
        ledger: Ledger,
        records: Sequence[RawRecord] | None = None,
        *,
        all_checkpoints: bool = True,
    ) -> LedgerReport:
        """Check ``ledger`` (whose agreed records, as :func:`~peer.ledger.read_records`
        reads them, are ``records`` when the caller read them already).

        Raises:
            LedgerError: the ledger cannot be read.
        """
        from .ledger import LedgerReport
        from .ledger._verify import check_sessions, in_chain_order, read_records, read_sessions

        sessions = tuple(read_sessions(ledger))
        rows = tuple(records) if records is not None else tuple(read_records(ledger))
        chain = self._check_chain(ledger, sessions, rows, all_checkpoints)
        # Only the rounds and their aggregates are needed below: taken from the rows as read
        # (building record objects for a 1,000-round ledger costs seconds).
        agreed = {(row.session_id, row.round): row.aggregate_hash for row in rows}
        proofs = ledger.round_proofs()
        problems: list[LedgerProblem] = [
            *check_sessions(sessions),
            *in_chain_order([*chain.checker.problems, *chain.checkpoint_problems]),
        ]
        warnings = unrecheckable_rounds(ledger, proofs, agreed)
        if self.verifiers is not None:
            problems += self._round_proof_problems(proofs, agreed)
        problems += round_parameter_problems(ledger, proofs)
        if self.verifiers is not None:
            accepted, unstored = acceptance_problems(ledger, self.verifiers, agreed)
            problems += [*accepted, *vote_release_problems(ledger, self.verifiers)]
            warnings += unstored
        return LedgerReport(
            source=ledger.url,
            records=chain.checker.count,
            checkpoints=chain.checkpoints,
            problems=tuple(problems),
            signatures_checked=self.verifiers is not None,
            warnings=tuple(warnings),
        )

    def _check_chain(
        self,
        ledger: Ledger,
        sessions: tuple[RawSession, ...],
        rows: tuple[RawRecord, ...],
        all_checkpoints: bool,
    ) -> _Chain:
        from .ledger._verify import ChainChecker, iter_checkpoints, start_chain

        last, self._chain = self._chain, None  # forgotten unless this run completes
        checked = len(last.records) if last is not None else 0
        if last is not None and last.sessions == sessions and rows[:checked] == last.records:
            checker, new = last.checker, rows[checked:]
        else:
            checker, new = start_chain(sessions, self.verifiers, self._min_signatures), rows
            last = None
        for row in new:
            checker.add(row)
        # check_checkpoint appends to the checker it is called on: a separate one, sharing
        # the model hashes, keeps the chain's own problems free of the checkpoints'.
        on_checkpoints = ChainChecker(None, None, {}, {}, model_hashes=checker.model_hashes)
        if last is None or all_checkpoints:
            count, keys = 0, None
        else:
            count, keys = last.checkpoints, [(row.session_id, row.round) for row in new]
            on_checkpoints.problems = list(last.checkpoint_problems)
        if keys is None or keys:
            for checkpoint in iter_checkpoints(ledger, keys):
                count += 1
                on_checkpoints.check_checkpoint(checkpoint)
        chain = _Chain(sessions, rows, checker, count, on_checkpoints.problems)
        self._chain = chain
        return chain

    def _round_proof_problems(
        self, proofs: Sequence[StoredProof], agreed: Mapping[tuple[str, int], bytes]
    ) -> list[LedgerProblem]:
        # Each proof's re-check is a function of the evidence row, of its record's aggregate
        # and of the (fixed) keys: remembered by a digest of exactly those.
        assert self.verifiers is not None
        remembered: dict[bytes, list[LedgerProblem]] = {}
        problems: list[LedgerProblem] = []
        for proof in proofs:
            aggregate = agreed.get((proof.session_id, proof.round))
            fields = repr(
                (proof.session_id, proof.round, proof.attempt, proof.aggregator, aggregate)
            ).encode("utf-8")
            digest = hashlib.sha256(
                b"".join(
                    len(part).to_bytes(8, "big") + part
                    for part in (fields, proof.config_json.encode("utf-8"), proof.transcript)
                )
            ).digest()
            found = self._proofs.get(digest)
            if found is None:
                found = evidence_problems(proof, aggregate, self.verifiers)
            remembered[digest] = found
            problems += found
        self._proofs = remembered
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
                    "warnings": [str(w) for w in report.warnings],
                },
                sort_keys=True,
            )
        )
    else:
        print(str(report))
    return EXIT_OK if report.ok else EXIT_FAILED
