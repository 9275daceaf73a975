"""Catching up: export agreed records from one peer's ledger, import them into another's.

A peer that was down while rounds were agreed asks another peer for its records and
imports those it lacks. The export is trusted for nothing: before anything is written, the
importer checks the export exactly as :func:`verify_ledger` checks a ledger (links within
each session, hashes, signatures under its own roster keys, checkpoints) and that, for
each session, the new records continue that session's chain in its own ledger (from the
session's genesis hash when the ledger does not know the session yet). Then all new
records are appended in one transaction.

``seq`` is each ledger's own append order and is not signed: peers that take part in
different sessions hold the same record at different positions. ``after_seq`` of
:func:`export_records` is a position in the *exporter's* ledger; when in doubt export
everything (``after_seq=0``): records the importer already holds are skipped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from peer.ledger._chain import append_record, session_chain_head
from peer.ledger._errors import ImportRefusedError, InvalidRecordError, RecordRejected
from peer.ledger._ledger import Ledger
from peer.ledger._records import AgreedRecord, SessionStatus, StoredRecord
from peer.ledger._schema import AgreedRow, SessionRow
from peer.ledger._verify import (
    ChainChecker,
    LedgerProblem,
    ProblemKind,
    RawCheckpoint,
    RawRecord,
    RawSession,
    check_sessions,
    iter_checkpoints,
    read_records,
    read_sessions,
)
from secagg.crypto import Verifier

__all__ = ["EXPORT_FORMAT", "LedgerExport", "export_records", "import_records"]

EXPORT_FORMAT = "ledger-export/v1"

CheckpointChoice = Literal["all", "last", "none"]


@dataclass(frozen=True, slots=True)
class LedgerExport:
    """Agreed records (with their sessions and checkpoints) taken from a ledger.

    ``records`` are contiguous in the exporter's ``seq`` order, oldest first.
    """

    sessions: tuple[RawSession, ...]
    records: tuple[RawRecord, ...]
    checkpoints: tuple[RawCheckpoint, ...]

    def to_json(self) -> bytes:
        """A self-contained JSON document (bytes as hex, weights as base64)."""
        document = {
            "format": EXPORT_FORMAT,
            "sessions": [
                {
                    "session_id": s.session_id,
                    "proposal": s.proposal,
                    "proposal_hash": s.proposal_hash.hex(),
                    "proposer": s.proposer,
                    "status": s.status,
                    "reason": s.reason,
                    "created_at": s.created_at.isoformat(),
                    "participants": s.participants,
                    "threshold": s.threshold,
                    "rounds_planned": s.rounds_planned,
                }
                for s in self.sessions
            ],
            "records": [
                {
                    "seq": r.seq,
                    "session_id": r.session_id,
                    "round": r.round,
                    "aggregate_hash": r.aggregate_hash.hex(),
                    "model_hash": r.model_hash.hex(),
                    "metrics_hash": r.metrics_hash.hex(),
                    "metrics": r.metrics,
                    "epsilon": r.epsilon,
                    "prev_hash": r.prev_hash.hex(),
                    "record_hash": r.record_hash.hex(),
                    "signatures": {peer: sig.hex() for peer, sig in sorted(r.signatures.items())},
                }
                for r in self.records
            ],
            "checkpoints": [
                {
                    "session_id": c.session_id,
                    "round": c.round,
                    "weights": base64.b64encode(c.weights).decode("ascii"),
                    "sha256": c.sha256.hex(),
                }
                for c in self.checkpoints
            ],
        }
        return json.dumps(document, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> LedgerExport:
        """Parse :meth:`to_json` output.

        Raises:
            ImportRefusedError: the document is not a well-formed export.
        """
        try:
            document = json.loads(data)
            if document.get("format") != EXPORT_FORMAT:
                raise ValueError(f"format is {document.get('format')!r}, not {EXPORT_FORMAT!r}")
            return cls(
                sessions=tuple(_session(item) for item in document["sessions"]),
                records=tuple(_record(item) for item in document["records"]),
                checkpoints=tuple(_checkpoint(item) for item in document["checkpoints"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ImportRefusedError(f"not a well-formed ledger export: {exc!r}") from exc


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    return value


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer")
    return value


def _session(item: Mapping[str, Any]) -> RawSession:
    reason = item["reason"]
    return RawSession(
        session_id=_text(item["session_id"], "session_id"),
        proposal=_text(item["proposal"], "proposal"),
        proposal_hash=bytes.fromhex(item["proposal_hash"]),
        proposer=_text(item["proposer"], "proposer"),
        status=SessionStatus(item["status"]).value,
        reason=None if reason is None else _text(reason, "reason"),
        created_at=datetime.fromisoformat(item["created_at"]),
        participants=_text(item["participants"], "participants"),
        threshold=_int(item["threshold"], "threshold"),
        rounds_planned=_int(item["rounds_planned"], "rounds_planned"),
    )


def _record(item: Mapping[str, Any]) -> RawRecord:
    return RawRecord(
        seq=_int(item["seq"], "seq"),
        session_id=_text(item["session_id"], "session_id"),
        round=_int(item["round"], "round"),
        aggregate_hash=bytes.fromhex(item["aggregate_hash"]),
        model_hash=bytes.fromhex(item["model_hash"]),
        metrics_hash=bytes.fromhex(item["metrics_hash"]),
        metrics=_text(item["metrics"], "metrics"),
        epsilon=_text(item["epsilon"], "epsilon"),
        prev_hash=bytes.fromhex(item["prev_hash"]),
        record_hash=bytes.fromhex(item["record_hash"]),
        signatures={
            _text(peer, "signer"): bytes.fromhex(sig) for peer, sig in item["signatures"].items()
        },
    )


def _checkpoint(item: Mapping[str, Any]) -> RawCheckpoint:
    return RawCheckpoint(
        session_id=_text(item["session_id"], "session_id"),
        round=_int(item["round"], "round"),
        weights=base64.b64decode(item["weights"], validate=True),
        sha256=bytes.fromhex(item["sha256"]),
    )


def export_records(
    ledger: Ledger, *, after_seq: int = 0, checkpoints: CheckpointChoice = "last"
) -> LedgerExport:
    """The records of ``ledger`` after position ``after_seq``, for a peer to catch up.

    Args:
        after_seq: a position in *this* ledger (0 for everything); the importer's own
            ``seq`` only fits when both ledgers hold the same records in the same order.
        checkpoints: ``"last"`` (the newest exported checkpoint of each session, which is
            what a peer needs to resume), ``"all"`` or ``"none"``.
    """
    records = read_records(ledger, after_seq)
    sessions = read_sessions(ledger, {r.session_id for r in records})
    keys: set[tuple[str, int]] = set()
    if checkpoints != "none":
        keys = {(r.session_id, r.round) for r in records}
    found = list(iter_checkpoints(ledger, keys))
    if checkpoints == "last":
        newest: dict[str, RawCheckpoint] = {}
        for checkpoint in found:
            if checkpoint.session_id not in newest or (
                checkpoint.round > newest[checkpoint.session_id].round
            ):
                newest[checkpoint.session_id] = checkpoint
        found = sorted(newest.values(), key=lambda c: (c.session_id, c.round))
    return LedgerExport(sessions=tuple(sessions), records=tuple(records), checkpoints=tuple(found))


def check_export(
    export: LedgerExport, verifiers: Mapping[str, Verifier], min_signatures: int | None
) -> list[LedgerProblem]:
    """Every problem of an export on its own (before it is compared with a ledger)."""
    problems = check_sessions(export.sessions)
    thresholds: dict[str, int] = {}
    for s in export.sessions:
        if s.session_id in thresholds:
            problems.append(
                LedgerProblem(ProblemKind.MALFORMED, "session exported twice", None, s.session_id)
            )
        thresholds[s.session_id] = s.threshold
    if not export.records:
        return problems
    # The first exported record of each session is linked to the importer's session head
    # later; here only the links between exported records are checked. Records of a
    # session the export does not describe get no start, so they are reported as unknown.
    starts: dict[str, bytes] = {}
    for record in export.records:
        if record.session_id in thresholds:
            starts.setdefault(record.session_id, record.prev_hash)
    checker = ChainChecker(
        verifiers=verifiers,
        min_signatures=min_signatures,
        thresholds=thresholds,
        starts=starts,
        prev_seq=export.records[0].seq - 1,
    )
    for record in export.records:
        checker.add(record)
    for checkpoint in export.checkpoints:
        checker.check_checkpoint(checkpoint)
    return problems + checker.problems


def import_records(
    ledger: Ledger,
    export: LedgerExport,
    verifiers: Mapping[str, Verifier],
    min_signatures: int | None = None,
) -> list[StoredRecord]:
    """Append the records of ``export`` that ``ledger`` lacks, after verifying everything.

    Records the ledger already holds (same ``record_hash``) are skipped; within each session
    they must come before the new ones, and the session's first new record must link to
    :meth:`Ledger.session_head` (the genesis hash of a session the ledger lacks). Sessions
    the ledger does not know are created as the exporter recorded them. New records get
    the next local ``seq`` in export order. All writes happen in one transaction.

    Args:
        verifiers: this peer's roster keys (never keys that came with the export).
        min_signatures: signatures required per record; None means the session's threshold.

    Returns:
        The newly appended records.

    Raises:
        ImportRefusedError: the export does not verify, conflicts with this ledger, or does
            not continue the chain of one of its sessions; the ledger is unchanged.
        LedgerWriteError: the ledger cannot be written; it is unchanged.
    """
    problems = check_export(export, verifiers, min_signatures)
    if problems:
        raise ImportRefusedError(
            f"export refused by {ledger.url}: {len(problems)} problem(s)", problems
        )
    sessions = {s.session_id: s for s in export.sessions}
    checkpoints = {(c.session_id, c.round): c.weights for c in export.checkpoints}
    appended: list[StoredRecord] = []
    with ledger.transaction(write=True) as session:
        new = _new_records(session, export.records)
        firsts = {r.session_id: r for r in reversed(new)}
        for session_id in dict.fromkeys(r.session_id for r in new):
            srow = _ensure_session(session, sessions[session_id])
            last_round, head = session_chain_head(session, srow)
            first = firsts[session_id]
            if first.prev_hash != head:
                where = f"round {last_round}" if last_round else "its genesis"
                raise ImportRefusedError(
                    f"export does not continue the chain of session {session_id!r} in "
                    f"{ledger.url}: its first new record (round {first.round}) follows "
                    f"{first.prev_hash.hex()}, but the session's head is {where} "
                    f"({head.hex()})"
                )
        now = ledger.now()
        for raw in new:
            record = AgreedRecord(
                session_id=raw.session_id,
                round=raw.round,
                aggregate_hash=raw.aggregate_hash,
                model_hash=raw.model_hash,
                metrics_hash=raw.metrics_hash,
                prev_hash=raw.prev_hash,
                metrics=json.loads(raw.metrics),
                epsilon=json.loads(raw.epsilon),
            )
            try:
                stored = append_record(
                    session,
                    record,
                    raw.signatures,
                    checkpoints.get((raw.session_id, raw.round)),
                    (),
                    min_signatures,
                    verifiers,
                    now,
                )
            except RecordRejected as exc:
                raise ImportRefusedError(f"export refused by {ledger.url}: {exc}") from exc
            appended.append(stored)
    return appended


def _new_records(session: Session, records: tuple[RawRecord, ...]) -> list[RawRecord]:
    """The records not yet in the ledger; in each session, those already there must come
    first."""
    new: list[RawRecord] = []
    unknown_seen: set[str] = set()
    for raw in records:
        row = session.scalars(
            select(AgreedRow).where(
                AgreedRow.session_id == raw.session_id, AgreedRow.round == raw.round
            )
        ).one_or_none()
        if row is None:
            new.append(raw)
            unknown_seen.add(raw.session_id)
            continue
        if row.record_hash != raw.record_hash:
            raise ImportRefusedError(
                f"conflict: session {raw.session_id!r} round {raw.round} is agreed as "
                f"{row.record_hash.hex()} at local seq {row.seq}, but the export has "
                f"{raw.record_hash.hex()}"
            )
        if raw.session_id in unknown_seen:
            raise ImportRefusedError(
                f"export interleaves known and unknown records: session {raw.session_id!r} "
                f"round {raw.round} is known locally but follows records of that session "
                "that are not"
            )
    return new


def _ensure_session(session: Session, raw: RawSession) -> SessionRow:
    row = session.get(SessionRow, raw.session_id)
    if row is not None:
        if row.proposal_hash != raw.proposal_hash:
            raise ImportRefusedError(
                f"conflict: session {raw.session_id!r} has another proposal locally"
            )
        return row
    try:
        participants = json.loads(raw.participants)
    except ValueError as exc:
        raise InvalidRecordError(f"participants of session {raw.session_id!r}: {exc}") from exc
    row = SessionRow(
        session_id=raw.session_id,
        proposal=raw.proposal,
        proposal_hash=raw.proposal_hash,
        proposer=raw.proposer,
        status=SessionStatus(raw.status),
        reason=raw.reason,
        created_at=raw.created_at,
        updated_at=raw.created_at,
        participants=json.dumps(participants, sort_keys=True, separators=(",", ":")),
        threshold=raw.threshold,
        rounds_planned=raw.rounds_planned,
    )
    session.add(row)
    session.flush()
    return row
