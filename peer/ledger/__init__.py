"""A peer's durable, hash-chained ledger of what the consortium agreed.

Each session has its own chain, starting at :func:`session_genesis` of its proposal hash,
so peers that take part in different sets of sessions still sign identical records.

::

    ledger = Ledger("sqlite:////var/lib/peer/ledger.db", clock=system_clock)
    ledger.create()
    ledger.record_proposal(...); ledger.decide_session(..., accept=True)
    attempt = ledger.start_round(session_id, 1, aggregator="b", participants=[...])
    record = AgreedRecord.build(session_id, 1, ..., prev_hash=ledger.session_head(session_id))
    # every peer signs record.payload() (== record_payload(...)) ...
    ledger.append_agreed(record, signatures, checkpoint=weights, privacy=[...])
    ledger.finish_round(session_id, 1, attempt.attempt, status=RoundStatus.AGREED)
    report = verify_ledger(ledger, roster_verifiers, min_signatures=2)

Any SQLAlchemy URL works (SQLite by default, PostgreSQL via ``postgresql+psycopg://``).
"""

from peer.ledger._errors import (
    ChainMismatchError,
    DuplicateRoundError,
    ImportRefusedError,
    InvalidRecordError,
    LedgerError,
    LedgerReadError,
    LedgerWriteError,
    NotEnoughSignaturesError,
    RecordRejected,
    SessionError,
    VoteConflictError,
)
from peer.ledger._exchange import EXPORT_FORMAT, LedgerExport, export_records, import_records
from peer.ledger._ledger import Clock, Ledger, system_clock
from peer.ledger._proofs import StoredProof
from peer.ledger._records import (
    HASH_BYTES,
    RECORD_DOMAIN,
    ZERO_HASH,
    AgreedRecord,
    BeaconState,
    ChargedRelease,
    Checkpoint,
    JsonValue,
    PrivacyCharge,
    PrivacyKind,
    PrivacyTotals,
    RefusedProposal,
    RoundAttempt,
    RoundStatus,
    SessionInfo,
    SessionStatus,
    StatisticsResult,
    StoredRecord,
    canonical_json,
    metrics_digest,
    model_digest,
    record_payload,
    session_genesis,
)
from peer.ledger._schema import SCHEMA_VERSION
from peer.ledger._verify import (
    LedgerProblem,
    LedgerReport,
    ProblemKind,
    RawCheckpoint,
    RawRecord,
    RawSession,
    verify_ledger,
)
from peer.ledger._votes import (
    VOTE_STATEMENT_DOMAIN,
    ReleasedVote,
    SignedVote,
    VoteStatement,
    release_quorum,
    statement_problem,
    vote_statement_payload,
)

__all__ = [
    "EXPORT_FORMAT",
    "HASH_BYTES",
    "RECORD_DOMAIN",
    "SCHEMA_VERSION",
    "VOTE_STATEMENT_DOMAIN",
    "ZERO_HASH",
    "AgreedRecord",
    "BeaconState",
    "ChainMismatchError",
    "ChargedRelease",
    "Checkpoint",
    "Clock",
    "DuplicateRoundError",
    "ImportRefusedError",
    "InvalidRecordError",
    "JsonValue",
    "Ledger",
    "LedgerError",
    "LedgerExport",
    "LedgerProblem",
    "LedgerReadError",
    "LedgerReport",
    "LedgerWriteError",
    "NotEnoughSignaturesError",
    "PrivacyCharge",
    "PrivacyKind",
    "PrivacyTotals",
    "ProblemKind",
    "RawCheckpoint",
    "RawRecord",
    "RawSession",
    "RecordRejected",
    "RefusedProposal",
    "ReleasedVote",
    "RoundAttempt",
    "RoundStatus",
    "SessionError",
    "SessionInfo",
    "SessionStatus",
    "SignedVote",
    "StatisticsResult",
    "StoredProof",
    "StoredRecord",
    "VoteConflictError",
    "VoteStatement",
    "canonical_json",
    "export_records",
    "import_records",
    "metrics_digest",
    "model_digest",
    "record_payload",
    "release_quorum",
    "session_genesis",
    "statement_problem",
    "system_clock",
    "verify_ledger",
    "vote_statement_payload",
]
