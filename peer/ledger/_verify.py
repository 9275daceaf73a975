"""Checking a whole chain: :func:`verify_ledger` and the checks it shares with imports.

The checks work on records *as stored* (JSON as text, hashes as raw bytes) rather than on
parsed objects, so that a tampered or malformed column is reported instead of crashing the
check, and so that an export from another peer is checked by exactly the same code.
Every problem is collected; nothing stops at the first.

Records are walked in ``seq`` order. ``seq`` itself must have no gap (the ledger's own
append order), and each record must link to the previous record *of its session*, the
first one to :func:`session_genesis` of the session's stored proposal hash. A record
deleted from the middle of the ledger therefore shows twice: as a gap in ``seq`` and as a
broken link at the next record of its session.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from peer.ledger._errors import InvalidRecordError
from peer.ledger._problems import LedgerProblem, ProblemKind
from peer.ledger._records import (
    HASH_BYTES,
    metrics_digest,
    model_digest,
    record_payload,
    session_genesis,
    valid_signers,
)
from peer.ledger._schema import AgreedRow, CheckpointRow, SessionRow, SignatureRow
from secagg.crypto import Verifier, sha256

if TYPE_CHECKING:
    from peer.ledger._store import LedgerStore

__all__ = [
    "LedgerProblem",
    "LedgerReport",
    "ProblemKind",
    "RawCheckpoint",
    "RawRecord",
    "RawSession",
    "verify_ledger",
]


@dataclass(frozen=True, slots=True)
class LedgerReport:
    """The outcome of :func:`verify_ledger`.

    Attributes:
        source: the ledger URL (password hidden) or a description of an export.
        records: how many agreed records were checked.
        checkpoints: how many checkpoints were checked.
        problems: every problem found, in chain order.
        signatures_checked: False when no roster keys were given: the signatures were
            counted but not verified.
        warnings: what could not be re-checked (:attr:`ProblemKind.NOT_RECHECKABLE`); they
            do not make the report fail, but they are never silent.
    """

    source: str
    records: int
    checkpoints: int
    problems: tuple[LedgerProblem, ...] = field(default_factory=tuple)
    signatures_checked: bool = True
    warnings: tuple[LedgerProblem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def at(self, seq: int) -> list[LedgerProblem]:
        """The problems found at position ``seq``."""
        return [problem for problem in self.problems if problem.seq == seq]

    def __str__(self) -> str:
        head = (
            f"ledger {self.source}: {self.records} agreed record(s), "
            f"{self.checkpoints} checkpoint(s), "
        )
        if not self.signatures_checked:
            head += "signatures counted but not verified (no roster), "
        if self.ok:
            lines = [head + "no problem found"]
        else:
            lines = [head + f"{len(self.problems)} problem(s):"]
            lines += [f"  - {problem}" for problem in self.problems]
        if self.warnings:
            lines.append(f"{len(self.warnings)} warning(s), not re-checkable:")
            lines += [f"  - {warning}" for warning in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------- raw rows


@dataclass(frozen=True, slots=True)
class RawSession:
    """A session as stored: the fields an importer needs to recreate it."""

    session_id: str
    proposal: str
    proposal_hash: bytes
    proposer: str
    status: str
    reason: str | None
    created_at: datetime
    participants: str
    threshold: int
    rounds_planned: int


@dataclass(frozen=True, slots=True)
class RawRecord:
    """An agreed record as stored: JSON as text, hashes as raw bytes."""

    seq: int
    session_id: str
    round: int
    aggregate_hash: bytes
    model_hash: bytes
    metrics_hash: bytes
    metrics: str
    epsilon: str
    prev_hash: bytes
    record_hash: bytes
    signatures: Mapping[str, bytes]


@dataclass(frozen=True, slots=True)
class RawCheckpoint:
    """A checkpoint as stored."""

    session_id: str
    round: int
    weights: bytes
    sha256: bytes


# --------------------------------------------------------------------------- checks


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _bad_epsilon(epsilon: Mapping[str, Any]) -> list[str]:
    return [
        peer_id
        for peer_id, eps in epsilon.items()
        if isinstance(eps, bool)
        or not isinstance(eps, int | float)
        or not math.isfinite(eps)
        or eps < 0
    ]


def _at(
    row: RawRecord, kind: ProblemKind, message: str, peers: tuple[str, ...] = ()
) -> LedgerProblem:
    return LedgerProblem(kind, message, row.seq, row.session_id, row.round, peers)


def _metrics_problems(row: RawRecord) -> list[LedgerProblem]:
    found: list[LedgerProblem] = []
    metrics = _json_object(row.metrics)
    epsilon = _json_object(row.epsilon)
    if metrics is None:
        found.append(_at(row, ProblemKind.MALFORMED, "metrics column is not a JSON object"))
    if epsilon is None:
        found.append(_at(row, ProblemKind.MALFORMED, "epsilon column is not a JSON object"))
    elif bad := _bad_epsilon(epsilon):
        found.append(
            _at(row, ProblemKind.MALFORMED, f"epsilon of {bad} is not a finite number >= 0")
        )
        return found
    if metrics is None or epsilon is None:
        return found
    try:
        digest = metrics_digest(metrics, epsilon)
    except InvalidRecordError as exc:
        found.append(_at(row, ProblemKind.MALFORMED, f"metrics cannot be hashed: {exc}"))
        return found
    if digest != row.metrics_hash:
        found.append(
            _at(
                row,
                ProblemKind.METRICS_HASH,
                f"metrics_hash {row.metrics_hash.hex()} does not match the stored metrics "
                f"and epsilon (they hash to {digest.hex()})",
            )
        )
    return found


def check_sessions(sessions: Iterable[RawSession]) -> list[LedgerProblem]:
    """Problems of session rows (proposal hashes)."""
    problems = []
    for row in sessions:
        actual = sha256(row.proposal.encode("utf-8"))
        if actual != row.proposal_hash:
            problems.append(
                LedgerProblem(
                    ProblemKind.PROPOSAL_HASH,
                    f"proposal hashes to {actual.hex()}, not the stored "
                    f"proposal_hash {row.proposal_hash.hex()}",
                    session_id=row.session_id,
                )
            )
    return problems


@dataclass(frozen=True, slots=True)
class _Link:
    """The last record checked in a session: what the next one must follow."""

    seq: int
    round: int
    record_hash: bytes


@dataclass
class ChainChecker:
    """Checks records one by one in ``seq`` order; :attr:`problems` collects what is wrong.

    Args:
        verifiers: roster keys by peer id; None checks everything that needs no key (links,
            hashes, the number of stored signatures, checkpoints) and leaves the signatures
            themselves unverified.
        min_signatures: signatures required per record; None means each session's threshold.
        thresholds: the threshold of every known session.
        starts: per session, the ``prev_hash`` its first checked record must carry (its
            genesis hash when a whole ledger is checked). A session missing here is not
            known; its records are reported as such.
        prev_seq: the position the first checked record must follow.
    """

    verifiers: Mapping[str, Verifier] | None
    min_signatures: int | None
    thresholds: Mapping[str, int]
    starts: Mapping[str, bytes]
    prev_seq: int = 0
    problems: list[LedgerProblem] = field(default_factory=list)
    model_hashes: dict[tuple[str, int], tuple[int, bytes]] = field(default_factory=dict)
    count: int = 0
    _links: dict[str, _Link] = field(default_factory=dict, init=False)

    def add(self, row: RawRecord) -> None:
        """Check one record (and its link to the previous record of its session)."""
        self.count += 1
        problems = self.problems

        def problem(kind: ProblemKind, message: str) -> None:
            problems.append(_at(row, kind, message))

        if row.seq != self.prev_seq + 1:
            if row.seq <= self.prev_seq:
                problem(ProblemKind.MALFORMED, f"seq does not increase (after seq {self.prev_seq})")
            else:
                missing = (
                    f"seq {self.prev_seq + 1}"
                    if row.seq == self.prev_seq + 2
                    else f"seq {self.prev_seq + 1} to {row.seq - 1}"
                )
                problems.append(
                    LedgerProblem(
                        ProblemKind.MISSING_RECORD,
                        f"{missing} missing: the ledger jumps from seq {self.prev_seq} "
                        f"to seq {row.seq}",
                        self.prev_seq + 1,
                    )
                )
        self._check_link(row, problem)
        key = (row.session_id, row.round)
        if key in self.model_hashes:
            problem(
                ProblemKind.DUPLICATE_ROUND,
                f"this round is already agreed at seq {self.model_hashes[key][0]}",
            )
        self.model_hashes[key] = (row.seq, row.model_hash)
        self.prev_seq = max(row.seq, self.prev_seq)

        bad_lengths = [
            name
            for name in ("aggregate_hash", "model_hash", "metrics_hash", "prev_hash", "record_hash")
            if len(getattr(row, name)) != HASH_BYTES
        ]
        if bad_lengths:
            problem(ProblemKind.MALFORMED, f"{', '.join(bad_lengths)} not {HASH_BYTES} bytes")

        payload = record_payload(
            row.session_id,
            row.round,
            row.aggregate_hash,
            row.model_hash,
            row.metrics_hash,
            row.prev_hash,
        )
        recomputed = sha256(payload)
        if recomputed != row.record_hash:
            problem(
                ProblemKind.RECORD_HASH,
                f"record_hash {row.record_hash.hex()} is not the hash of the payload "
                f"recomputed from the columns ({recomputed.hex()})",
            )
        problems += _metrics_problems(row)
        problems += self._signature_problems(row, payload)

    def _check_link(self, row: RawRecord, problem: Callable[[ProblemKind, str], None]) -> None:
        previous = self._links.get(row.session_id)
        if previous is None:
            start = self.starts.get(row.session_id)
            # An unknown session is reported with the signatures (it has no threshold).
            if start is not None and row.prev_hash != start:
                problem(
                    ProblemKind.BROKEN_LINK,
                    f"prev_hash {row.prev_hash.hex()} is not the start of the chain of "
                    f"session {row.session_id!r} ({start.hex()})",
                )
        else:
            after = f"round {previous.round} at seq {previous.seq}"
            # An equal round is reported as DUPLICATE_ROUND.
            if row.round < previous.round:
                problem(
                    ProblemKind.MALFORMED,
                    f"rounds of session {row.session_id!r} do not increase (after {after})",
                )
            if row.prev_hash != previous.record_hash:
                problem(
                    ProblemKind.BROKEN_LINK,
                    f"prev_hash {row.prev_hash.hex()} is not the record_hash of the previous "
                    f"record of session {row.session_id!r}, {after} "
                    f"({previous.record_hash.hex()})",
                )
        self._links[row.session_id] = _Link(row.seq, row.round, row.record_hash)

    def _signature_problems(self, row: RawRecord, payload: bytes) -> list[LedgerProblem]:
        found: list[LedgerProblem] = []
        threshold = self.thresholds.get(row.session_id)
        if threshold is None:
            found.append(_at(row, ProblemKind.MALFORMED, "the record's session is not known"))
        required = self.min_signatures if self.min_signatures is not None else threshold or 1
        if self.verifiers is None:
            # Without keys only the count can be checked; a forged signature goes unnoticed.
            if len(row.signatures) < required:
                found.append(
                    _at(
                        row,
                        ProblemKind.TOO_FEW_SIGNATURES,
                        f"{len(row.signatures)} signature(s) stored, {required} required",
                    )
                )
            return found
        valid, _ = valid_signers(payload, row.signatures, self.verifiers)
        unknown = tuple(sorted(p for p in row.signatures if p not in self.verifiers))
        bad = tuple(sorted(p for p in row.signatures if p in self.verifiers and p not in valid))
        if len(row.signatures) < required:
            found.append(
                _at(
                    row,
                    ProblemKind.TOO_FEW_SIGNATURES,
                    f"{len(row.signatures)} signature(s) stored, {required} required",
                )
            )
        shortfall = (
            f"; only {len(valid)} of the {required} required signatures are valid"
            if len(valid) < required <= len(row.signatures)
            else ""
        )
        if unknown:
            names = ", ".join(map(repr, unknown))
            found.append(
                _at(
                    row,
                    ProblemKind.UNKNOWN_SIGNER,
                    f"signature(s) by {names}, not in the roster{shortfall}",
                    unknown,
                )
            )
            shortfall = ""
        if bad:
            names = ", ".join(map(repr, bad))
            found.append(
                _at(
                    row,
                    ProblemKind.BAD_SIGNATURE,
                    f"signature(s) of {names} do not verify under their roster keys over "
                    f"the payload recomputed from the columns{shortfall}",
                    bad,
                )
            )
        return found

    def check_checkpoint(self, checkpoint: RawCheckpoint) -> None:
        """Check a checkpoint's hash and that it is the model its record agreed on."""
        key = (checkpoint.session_id, checkpoint.round)
        seq, model_hash = self.model_hashes.get(key, (None, None))

        def problem(kind: ProblemKind, message: str) -> None:
            self.problems.append(
                LedgerProblem(kind, message, seq, checkpoint.session_id, checkpoint.round)
            )

        actual = model_digest(checkpoint.weights)
        if actual != checkpoint.sha256:
            problem(
                ProblemKind.CHECKPOINT_HASH,
                f"checkpoint weights hash to {actual.hex()}, not the stored sha256 "
                f"{checkpoint.sha256.hex()}",
            )
        if model_hash is None:
            problem(ProblemKind.MALFORMED, "checkpoint without an agreed record")
        elif checkpoint.sha256 != model_hash:
            problem(
                ProblemKind.CHECKPOINT_MODEL,
                f"checkpoint sha256 {checkpoint.sha256.hex()} is not the record's "
                f"model_hash {model_hash.hex()}",
            )


# --------------------------------------------------------------------------- the ledger


def read_sessions(
    ledger: LedgerStore, session_ids: Iterable[str] | None = None
) -> list[RawSession]:
    """Session rows as stored (all, or those named)."""
    with ledger.transaction(write=False) as session:
        query = select(SessionRow).order_by(SessionRow.created_at, SessionRow.session_id)
        if session_ids is not None:
            query = query.where(SessionRow.session_id.in_(list(session_ids)))
        return [
            RawSession(
                session_id=row.session_id,
                proposal=row.proposal,
                proposal_hash=row.proposal_hash,
                proposer=row.proposer,
                status=str(row.status),
                reason=row.reason,
                created_at=row.created_at,
                participants=row.participants,
                threshold=row.threshold,
                rounds_planned=row.rounds_planned,
            )
            for row in session.scalars(query)
        ]


def read_records(ledger: LedgerStore, after_seq: int = 0) -> list[RawRecord]:
    """Agreed records as stored, in chain order."""
    with ledger.transaction(write=False) as session:
        signatures: dict[int, dict[str, bytes]] = {}
        for seq, peer_id, signature in session.execute(
            select(SignatureRow.seq, SignatureRow.peer_id, SignatureRow.signature).where(
                SignatureRow.seq > after_seq
            )
        ):
            signatures.setdefault(seq, {})[peer_id] = signature
        rows = session.execute(
            select(
                AgreedRow.seq,
                AgreedRow.session_id,
                AgreedRow.round,
                AgreedRow.aggregate_hash,
                AgreedRow.model_hash,
                AgreedRow.metrics_hash,
                AgreedRow.metrics,
                AgreedRow.epsilon,
                AgreedRow.prev_hash,
                AgreedRow.record_hash,
            )
            .where(AgreedRow.seq > after_seq)
            .order_by(AgreedRow.seq)
        )
        return [RawRecord(**row._asdict(), signatures=signatures.get(row.seq, {})) for row in rows]


def iter_checkpoints(
    ledger: LedgerStore, keys: Iterable[tuple[str, int]] | None = None
) -> Iterator[RawCheckpoint]:
    """Checkpoints as stored, one at a time (they can be large)."""
    wanted = None if keys is None else set(keys)
    with ledger.transaction(write=False) as session:
        names = session.execute(
            select(CheckpointRow.session_id, CheckpointRow.round).order_by(
                CheckpointRow.session_id, CheckpointRow.round
            )
        ).all()
        for session_id, round_ in names:
            if wanted is not None and (session_id, round_) not in wanted:
                continue
            row = session.get(CheckpointRow, (session_id, round_))
            if row is not None:
                yield RawCheckpoint(row.session_id, row.round, row.weights, row.sha256)
                session.expunge(row)


def verify_ledger(
    ledger: LedgerStore, verifiers: Mapping[str, Verifier] | None, min_signatures: int | None = None
) -> LedgerReport:
    """Check the whole ledger and report every problem found.

    Checks the ``seq`` sequence, each session's chain of ``prev_hash`` links (from its
    genesis hash), each ``record_hash`` against the
    payload recomputed from the columns, each ``metrics_hash`` against the stored metrics and
    epsilon, each signature under the roster key of its peer and their number, each
    checkpoint's hash against its weights and its record's ``model_hash``, and each
    session's proposal hash.

    Args:
        verifiers: roster keys by peer id; None (no roster at hand) runs every check that
            needs no key and only counts the signatures: the report then says nothing about
            whether they are genuine (:attr:`LedgerReport.signatures_checked` is false).
        min_signatures: signatures required per record; None means the session's threshold.

    Raises:
        LedgerReadError: the database cannot be read at all.
    """
    sessions = read_sessions(ledger)
    problems = check_sessions(sessions)
    checker = start_chain(sessions, verifiers, min_signatures)
    for row in read_records(ledger):
        checker.add(row)
    checkpoints = 0
    for checkpoint in iter_checkpoints(ledger):
        checkpoints += 1
        checker.check_checkpoint(checkpoint)
    return LedgerReport(
        source=ledger.url,
        records=checker.count,
        checkpoints=checkpoints,
        problems=tuple(problems + in_chain_order(checker.problems)),
        signatures_checked=verifiers is not None,
    )


def start_chain(
    sessions: Iterable[RawSession],
    verifiers: Mapping[str, Verifier] | None,
    min_signatures: int | None = None,
) -> ChainChecker:
    """The checker :func:`verify_ledger` feeds a whole ledger's records to, in ``seq`` order
    (each session's chain starting at its genesis hash). Kept, it can be fed the records
    appended later (``peer.ledger_check.LedgerCheck`` does)."""
    sessions = list(sessions)
    return ChainChecker(
        verifiers=verifiers,
        min_signatures=min_signatures,
        thresholds={s.session_id: s.threshold for s in sessions},
        starts={s.session_id: _genesis(s) for s in sessions},
    )


def _genesis(raw: RawSession) -> bytes:
    # A stored proposal hash of the wrong length is already a PROPOSAL_HASH problem; hashing
    # it anyway gives a genesis no record links to, so the first record is reported too.
    try:
        return session_genesis(raw.proposal_hash)
    except InvalidRecordError:
        return sha256(b"malformed proposal hash", raw.proposal_hash)


def in_chain_order(problems: list[LedgerProblem]) -> list[LedgerProblem]:
    """``problems`` by position; checkpoint problems, found after the chain walk, are shown
    with their record."""
    return sorted(problems, key=lambda p: p.seq if p.seq is not None else math.inf)
