"""What can be wrong with a ledger: the problems that verification and import report.

Its own module so that the error tree (:class:`~peer.ledger.ImportRefusedError` carries
problems) and the verifier can both use it without importing each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["LedgerProblem", "ProblemKind"]


class ProblemKind(enum.StrEnum):
    """What is wrong with a ledger."""

    MISSING_RECORD = "missing-record"
    """A gap in ``seq``: records were deleted."""
    BROKEN_LINK = "broken-link"
    """``prev_hash`` is not the ``record_hash`` of the previous record of the same session
    (its genesis hash for the session's first record)."""
    RECORD_HASH = "record-hash"
    """``record_hash`` is not the hash of the payload recomputed from the columns."""
    METRICS_HASH = "metrics-hash"
    """``metrics_hash`` does not cover the stored metrics and epsilon."""
    MALFORMED = "malformed"
    """A column cannot be decoded (bad JSON, wrong hash length, unknown session), or ``seq``
    or a session's rounds do not increase."""
    DUPLICATE_ROUND = "duplicate-round"
    """Two records for the same (session, round)."""
    BAD_SIGNATURE = "bad-signature"
    """A signature does not verify under its peer's roster key."""
    UNKNOWN_SIGNER = "unknown-signer"
    """A signature by a peer that is not in the roster."""
    TOO_FEW_SIGNATURES = "too-few-signatures"
    """Fewer signatures are stored than required."""
    CHECKPOINT_HASH = "checkpoint-hash"
    """A checkpoint's weights do not hash to its stored SHA-256."""
    CHECKPOINT_MODEL = "checkpoint-model"
    """A checkpoint's SHA-256 is not its record's ``model_hash``."""
    PROPOSAL_HASH = "proposal-hash"
    """A session's proposal document does not hash to its ``proposal_hash``."""
    ROUND_PROOF = "round-proof"
    """A stored round's evidence does not verify (the succinct check of secagg/succinct.py
    fails, or it is not the evidence of the agreed record's aggregate)."""
    ROUND_PARAMETERS = "round-parameters"
    """A stored round's parameters (n, t, bits, length, graph, collusion bound, attempt,
    beacon) are not those the session's accepted proposal fixes."""
    ACCEPTANCE = "acceptance"
    """A participant's signed acceptance of the proposal (its beacon commitment) is missing,
    forged, or by a peer that is not a participant."""
    VOTE_RELEASE = "vote-release"
    """A vote this peer released (peer/ledger/_votes.py) whose stored statements do not
    prove the record dead: too few valid ones, or one that does not verify."""
    NOT_RECHECKABLE = "not-recheckable"
    """A warning, not a failure: the ledger holds no evidence to re-check this (a round
    agreed before evidence was kept, acceptances never stored here)."""


@dataclass(frozen=True, slots=True)
class LedgerProblem:
    """One thing wrong with a ledger, with where it is."""

    kind: ProblemKind
    message: str
    seq: int | None = None
    session_id: str | None = None
    round: int | None = None
    peers: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = []
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        if self.session_id is not None:
            where.append(f"session {self.session_id!r}")
        if self.round is not None:
            where.append(f"round {self.round}")
        prefix = " ".join(where)
        return f"[{self.kind.value}] {prefix}: {self.message}" if prefix else self.message
