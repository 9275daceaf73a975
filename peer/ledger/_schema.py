"""Tables of the ledger (SQLAlchemy 2.0 typed declarative mapping).

Portable by construction: JSON is stored as canonical text (so that a stored document can
be re-hashed byte for byte on any backend), hashes and signatures as binary, timestamps as
UTC, enums as checked strings. Nothing here is specific to SQLite or PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from peer.ledger._records import PrivacyKind, RoundStatus, SessionStatus

SCHEMA_VERSION = 1

ID = String(200)
"""Session, peer and query ids."""

# Named constraints so that migrations on PostgreSQL can address them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite would otherwise drop the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"ledger timestamps must be timezone-aware, got {value!r}")
        utc = value.astimezone(UTC)
        # SQLite stores text without a zone; a server type such as TIMESTAMPTZ gets the
        # aware value (a naive one would be read in the server session's time zone).
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _enum(cls: type[SessionStatus | RoundStatus | PrivacyKind], name: str) -> Enum:
    # Stored as the enum's value, checked by a CHECK constraint, never a native PG type,
    # so that adding a status later is an ordinary migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class MetaRow(Base):
    """Key/value facts about the ledger itself (schema version)."""

    __tablename__ = "ledger_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class SessionRow(Base):
    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    proposal: Mapped[str] = mapped_column(Text)
    proposal_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    proposer: Mapped[str] = mapped_column(ID)
    status: Mapped[SessionStatus] = mapped_column(_enum(SessionStatus, "session_status"))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    participants: Mapped[str] = mapped_column(Text)
    threshold: Mapped[int] = mapped_column(Integer)
    rounds_planned: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        CheckConstraint("threshold >= 1", name="threshold_positive"),
        CheckConstraint("rounds_planned >= 1", name="rounds_positive"),
    )


class RoundRow(Base):
    __tablename__ = "rounds"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    aggregator: Mapped[str] = mapped_column(ID)
    status: Mapped[RoundStatus] = mapped_column(_enum(RoundStatus, "round_status"))
    participants: Mapped[str] = mapped_column(Text)
    dropped: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    abort_reason: Mapped[str | None] = mapped_column(Text)


class AgreedRow(Base):
    """One agreed record: a link of its session's hash chain, at position ``seq`` of this
    ledger's own (unsigned) append order."""

    __tablename__ = "agreed_records"

    # Assigned by the ledger (head + 1), never by the database: the primary key is what
    # makes two concurrent appends of the same position fail instead of forking a chain.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"))
    round: Mapped[int] = mapped_column(Integer)
    aggregate_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    model_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    metrics_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    metrics: Mapped[str] = mapped_column(Text)
    epsilon: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    record_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())

    signatures: Mapped[list[SignatureRow]] = relationship(
        back_populates="record", order_by="SignatureRow.peer_id", lazy="selectin"
    )

    __table_args__ = (
        UniqueConstraint("session_id", "round", name="uq_agreed_records_session_round"),
        CheckConstraint("seq >= 1", name="seq_positive"),
    )


class SignatureRow(Base):
    __tablename__ = "record_signatures"

    seq: Mapped[int] = mapped_column(Integer, ForeignKey("agreed_records.seq"), primary_key=True)
    peer_id: Mapped[str] = mapped_column(ID, primary_key=True)
    signature: Mapped[bytes] = mapped_column(LargeBinary(256))

    record: Mapped[AgreedRow] = relationship(back_populates="signatures")


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[bytes] = mapped_column(LargeBinary(32))

    __table_args__ = (
        ForeignKeyConstraint(
            ["session_id", "round"],
            ["agreed_records.session_id", "agreed_records.round"],
            name="fk_checkpoints_agreed_record",
        ),
    )


class ProofRow(Base):
    """The evidence of an agreed secagg round (peer/ledger/_proofs.py): the round's
    parameters and its succinct transcript, re-checked by ``verify-ledger``."""

    __tablename__ = "round_proofs"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    aggregator: Mapped[str] = mapped_column(ID)
    config: Mapped[str] = mapped_column(Text)
    transcript: Mapped[bytes] = mapped_column(LargeBinary)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PrivacyRow(Base):
    __tablename__ = "privacy_spent"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[str] = mapped_column(ID, primary_key=True)
    kind: Mapped[PrivacyKind] = mapped_column(_enum(PrivacyKind, "privacy_kind"), primary_key=True)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        CheckConstraint("epsilon >= 0", name="epsilon_nonnegative"),
        CheckConstraint("delta >= 0 AND delta <= 1", name="delta_range"),
    )


class PrivacyReleaseRow(Base):
    """A privacy charge written *before* a noisy value left this peer, one per release.

    ``release_id`` names the released value (a digest of the vector), so sending the same
    value again (a retried attempt reusing its contribution) is not a second charge, while
    a fresh value always is. An attempt that aborts stays charged: the peer cannot know
    whether the aggregator unmasked its input. Added in schema version 1 without a version
    change (a new table: older ledgers get it empty on ``create``).
    """

    __tablename__ = "privacy_releases"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_id: Mapped[str] = mapped_column(ID, primary_key=True)
    release_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    kind: Mapped[PrivacyKind] = mapped_column(_enum(PrivacyKind, "release_kind"))
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    event: Mapped[str | None] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("epsilon >= 0", name="epsilon_nonnegative"),
        CheckConstraint("delta >= 0 AND delta <= 1", name="delta_range"),
    )


class StatisticsRow(Base):
    __tablename__ = "statistics_results"

    query_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"))
    round: Mapped[int] = mapped_column(Integer)
    query: Mapped[str] = mapped_column(Text)
    result: Mapped[str] = mapped_column(Text)
    epsilon: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BeaconRow(Base):
    """A session's commit-reveal beacon as this peer holds it (peer/beacon.py).

    ``nonce`` is this peer's own, written before it answers the proposal (so a restarted peer
    answers the same commitment) and secret until it reveals it; ``commitments`` is the set
    the proposer sent (canonical JSON ``{peer: [commitment hex, signature hex]}``), fixed
    once stored; ``reveals`` (``{peer: nonce hex}``) and ``beacon`` once every nonce checked.
    """

    __tablename__ = "session_beacons"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(32))
    commitments: Mapped[str | None] = mapped_column(Text)
    reveals: Mapped[str | None] = mapped_column(Text)
    beacon: Mapped[bytes | None] = mapped_column(LargeBinary(32))


class RefusedProposalRow(Base):
    """A proposal this peer refused: a bounded log, kept apart from the session ids so that a
    refused proposal never reserves its id (the squatting attack)."""

    __tablename__ = "refused_proposals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ID)
    proposer: Mapped[str] = mapped_column(ID)
    proposal_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    size: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SignedVoteRow(Base):
    """The record this peer signed for a round, written *before* its signature left the peer
    (peer/ledger/_votes.py): one per round, so that it never signs a second, different one,
    and a retry's aggregator can collect the same signature again. ``model`` is the round's
    result as this peer computed it, so that the record can be stored with its checkpoint
    even if it is agreed only after a restart. Added in schema version 1 without a version
    change (a new table: older ledgers get it empty on ``create``).
    """

    __tablename__ = "signed_votes"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    aggregator: Mapped[str] = mapped_column(ID)
    record_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    aggregate_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    model_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    metrics_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    metrics: Mapped[str] = mapped_column(Text)
    epsilon: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    signature: Mapped[bytes] = mapped_column(LargeBinary(256))
    model: Mapped[bytes] = mapped_column(LargeBinary)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class VoteStatementRow(Base):
    """The latest attempt of a round for which this peer signed a *vote statement*
    (peer/ledger/_votes.py): "as this attempt starts, my only signed record of the round is
    ``vote_hash`` (empty: none)". From then on this peer signs no record of an earlier attempt.
    Written before the statement leaves. A new table (older ledgers get it empty on ``create``).
    """

    __tablename__ = "vote_statements"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    vote_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class VoteReleaseRow(Base):
    """A vote this peer released (peer/ledger/_votes.py): the record it had signed, the attempt
    that released it and the statements that proved the record can never reach t (canonical
    JSON, kept for audit). This peer never signs that record again. A new table."""

    __tablename__ = "vote_releases"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    record_hash: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    signed_attempt: Mapped[int] = mapped_column(Integer)
    released_attempt: Mapped[int] = mapped_column(Integer)
    evidence: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class VoteProofRow(Base):
    """The evidence of the round's record this peer voted for, kept when it voted
    (peer/ledger/_proofs.py), so that a record completed in a later attempt from the kept
    votes still gets its evidence into ``round_proofs``. One per round. A new table."""

    __tablename__ = "vote_proofs"

    session_id: Mapped[str] = mapped_column(ID, ForeignKey("sessions.session_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    record_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    attempt: Mapped[int] = mapped_column(Integer)
    aggregator: Mapped[str] = mapped_column(ID)
    config: Mapped[str] = mapped_column(Text)
    transcript: Mapped[bytes] = mapped_column(LargeBinary)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
