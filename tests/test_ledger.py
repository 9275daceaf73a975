"""Tests of the hash-chained ledger (peer.ledger).

Run as a script (``python tests/test_ledger.py URL``) this module is the writer process of
the durability test: it appends records until it is killed.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import event, text

from peer.ledger import (
    ZERO_HASH,
    AgreedRecord,
    ChainMismatchError,
    DuplicateRoundError,
    ImportRefusedError,
    InvalidRecordError,
    Ledger,
    LedgerExport,
    LedgerReadError,
    LedgerWriteError,
    NotEnoughSignaturesError,
    PrivacyCharge,
    PrivacyKind,
    ProblemKind,
    RecordRejected,
    RoundStatus,
    SessionError,
    SessionStatus,
    StoredRecord,
    export_records,
    import_records,
    model_digest,
    record_payload,
    session_genesis,
    verify_ledger,
)
from secagg.crypto import (
    Signer,
    Verifier,
    canonical,
    sha256,
    signer_from_private_key,
    verifier_from_public_key,
)

PEERS = ("a", "b", "c")
SESSION = "s1"


# --------------------------------------------------------------------------- fixtures


def _private_key(peer_id: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(
        sha256(b"ledger-test-key", peer_id.encode())
    )


SIGNERS: dict[str, Signer] = {p: signer_from_private_key(_private_key(p)) for p in PEERS}
VERIFIERS: dict[str, Verifier] = {
    p: verifier_from_public_key(_private_key(p).public_key()) for p in PEERS
}


class StepClock:
    """A clock that advances one second per reading."""

    def __init__(self) -> None:
        self._now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self._now += timedelta(seconds=1)
        return self._now


def _proposal(session_id: str) -> str:
    return json.dumps({"session": session_id, "model": "mlp", "rounds": 10000})


def _genesis(session_id: str) -> bytes:
    """The genesis hash of a test session, computed independently of the ledger."""
    return session_genesis(sha256(_proposal(session_id).encode("utf-8")))


def _open(url: str) -> Ledger:
    ledger = Ledger(url, StepClock())
    ledger.create()
    return ledger


def _add_session(ledger: Ledger, session_id: str = SESSION, threshold: int = 2) -> None:
    ledger.record_proposal(
        session_id,
        _proposal(session_id),
        proposer="a",
        participants=PEERS,
        threshold=threshold,
        rounds_planned=10000,
    )
    if ledger.session(session_id).status == SessionStatus.PROPOSED:  # type: ignore[union-attr]
        ledger.decide_session(session_id, accept=True)


def _material(
    session_id: str, round_: int, prev_hash: bytes, weights_len: int = 64
) -> tuple[AgreedRecord, bytes, dict[str, bytes]]:
    """A deterministic agreed record for (session, round) after ``prev_hash``."""
    weights = (np.arange(weights_len, dtype="<f4") * np.float32(round_)).tobytes()
    record = AgreedRecord.build(
        session_id,
        round_,
        aggregate_hash=sha256(b"aggregate", canonical(session_id, round_)),
        model_hash=model_digest(weights),
        metrics={"loss": 1.0 / round_, "accuracy": 0.5 + round_ / 1000, "examples": 100},
        epsilon={peer: 0.125 * round_ for peer in PEERS},
        prev_hash=prev_hash,
    )
    signatures = {peer: SIGNERS[peer].sign(record.payload()) for peer in PEERS}
    return record, weights, signatures


def _append(ledger: Ledger, session_id: str, round_: int, weights_len: int = 64) -> StoredRecord:
    record, weights, signatures = _material(
        session_id, round_, ledger.session_head(session_id), weights_len
    )
    privacy = [PrivacyCharge(p, PrivacyKind.TRAINING, 0.125, 1e-6) for p in PEERS]
    return ledger.append_agreed(record, signatures, weights, privacy, verifiers=VERIFIERS)


def _dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read with plain sqlite3 (independent of the ledger code)."""
    with sqlite3.connect(path) as conn:
        tables = [
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if not row[0].startswith("sqlite_")
        ]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}


def _sql(path: Path, statement: str, *params: Any) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(statement, params)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(db: Path) -> Iterator[Ledger]:
    ledger = _open(f"sqlite:///{db}")
    _add_session(ledger)
    yield ledger
    ledger.close()


# --------------------------------------------------------------------------- basics


def test_sqlite_connections_are_durable(ledger: Ledger) -> None:
    with ledger.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_payload_is_what_peers_sign(ledger: Ledger) -> None:
    record, _, _ = _material(SESSION, 1, ZERO_HASH)
    payload = record_payload(
        SESSION, 1, record.aggregate_hash, record.model_hash, record.metrics_hash, ZERO_HASH
    )
    assert payload == record.payload()
    assert record.record_hash() == sha256(payload)
    # The prev link is part of the signed bytes.
    other = record_payload(
        SESSION, 1, record.aggregate_hash, record.model_hash, record.metrics_hash, b"\x01" * 32
    )
    assert other != payload


def test_chain_appends_and_verifies(ledger: Ledger) -> None:
    assert ledger.head() == (0, ZERO_HASH)
    assert ledger.session_head(SESSION) == _genesis(SESSION)
    assert _genesis(SESSION) == sha256(
        canonical("session-genesis/v1", sha256(_proposal(SESSION).encode()))
    )
    stored = [_append(ledger, SESSION, r) for r in range(1, 5)]
    assert [s.seq for s in stored] == [1, 2, 3, 4]
    assert stored[0].record.prev_hash == _genesis(SESSION)
    for before, after in itertools.pairwise(stored):
        assert after.record.prev_hash == before.record_hash
    assert ledger.head() == (4, stored[-1].record_hash)
    assert ledger.session_head(SESSION) == stored[-1].record_hash
    with pytest.raises(SessionError, match="unknown session 'other'"):
        ledger.session_head("other")
    assert ledger.last_agreed_round(SESSION) == 4
    assert ledger.last_agreed_round("other") == 0

    records = ledger.agreed_records(SESSION)
    assert [r.record_hash for r in records] == [s.record_hash for s in stored]
    assert records[1].record.metrics == {"loss": 0.5, "accuracy": 0.502, "examples": 100}
    assert records[1].signatures.keys() == set(PEERS)
    assert records[1].recorded_at.tzinfo is not None

    checkpoint = ledger.get_checkpoint(SESSION, 3)
    assert checkpoint is not None
    np.testing.assert_array_equal(checkpoint.array(), np.arange(64, dtype=np.float32) * 3)
    latest = ledger.latest_checkpoint(SESSION)
    assert latest is not None
    assert latest.round == 4
    assert ledger.get_checkpoint(SESSION, 9) is None

    totals = ledger.privacy_spent("b")
    assert totals.training_epsilon == pytest.approx(0.5)
    assert totals.training_delta == pytest.approx(4e-6)
    assert totals.statistics_epsilon == 0.0

    report = verify_ledger(ledger, VERIFIERS, min_signatures=3)
    assert report.ok, str(report)
    assert (report.records, report.checkpoints) == (4, 4)


def test_session_and_round_life_cycle(ledger: Ledger) -> None:
    info = ledger.session(SESSION)
    assert info is not None
    assert info.status == SessionStatus.ACCEPTED
    assert info.participants == PEERS
    assert info.proposal_hash == sha256(_proposal(SESSION).encode())
    # The same proposal again is a no-op; another proposal under the same id is refused.
    _add_session(ledger)
    with pytest.raises(SessionError, match="another proposal"):
        ledger.record_proposal(
            SESSION, "{}", proposer="b", participants=PEERS, threshold=2, rounds_planned=1
        )
    with pytest.raises(SessionError, match="accepted; it cannot become refused"):
        ledger.decide_session(SESSION, accept=False, reason="budget")

    first = ledger.start_round(SESSION, 1, aggregator="a", participants=PEERS)
    assert (first.attempt, first.status) == (1, RoundStatus.RUNNING)
    assert ledger.session(SESSION).status == SessionStatus.RUNNING  # type: ignore[union-attr]
    # The aggregator died: the round is retried with the next one.
    second = ledger.start_round(SESSION, 1, aggregator="b", participants=PEERS)
    assert second.attempt == 2
    with pytest.raises(SessionError, match="no agreed record"):
        ledger.finish_round(SESSION, 1, 2, status=RoundStatus.AGREED)
    _append(ledger, SESSION, 1)
    done = ledger.finish_round(
        SESSION,
        1,
        2,
        status=RoundStatus.AGREED,
        dropped={"masked-input": ["c"]},
        bytes_sent=1000,
        bytes_received=2000,
    )
    assert done.dropped == {"masked-input": ("c",)}
    attempts = ledger.round_attempts(SESSION, 1)
    assert [(a.attempt, a.aggregator, a.status) for a in attempts] == [
        (1, "a", RoundStatus.ABORTED),
        (2, "b", RoundStatus.AGREED),
    ]
    assert attempts[0].abort_reason == "superseded by attempt 2"
    assert attempts[1].ended_at is not None
    with pytest.raises(SessionError, match="already ended as agreed"):
        ledger.abort_round(SESSION, 1, 2, reason="late")
    with pytest.raises(DuplicateRoundError):
        ledger.start_round(SESSION, 1, aggregator="c", participants=PEERS)

    third = ledger.start_round(SESSION, 2, aggregator="c", participants=PEERS)
    aborted = ledger.abort_round(SESSION, 2, third.attempt, reason="only 1 peer left")
    assert aborted.abort_reason == "only 1 peer left"

    ledger.record_statistics(
        "q1",
        SESSION,
        2,
        query={"histogram": "age", "bins": [0, 50, 100]},
        result={"counts": [10, 12]},
        epsilon=0.5,
        privacy=[PrivacyCharge("b", PrivacyKind.STATISTICS, 0.5, 0.0)],
    )
    (stat,) = ledger.statistics_results(SESSION)
    assert stat.result == {"counts": [10, 12]}
    totals = ledger.privacy_spent("b", SESSION)
    assert (totals.training_epsilon, totals.statistics_epsilon) == (0.125, 0.5)
    assert totals.epsilon == 0.625
    with pytest.raises(RecordRejected, match="already recorded"):
        ledger.record_statistics("q1", SESSION, 2, query={}, result={}, epsilon=0.1)

    ledger.set_session_status(SESSION, SessionStatus.FINISHED)
    with pytest.raises(SessionError, match="finished; no round can start"):
        ledger.start_round(SESSION, 3, aggregator="a", participants=PEERS)


# --------------------------------------------------------------------------- refusals


def test_refusals_leave_the_ledger_unchanged(ledger: Ledger, db: Path) -> None:
    stored = [_append(ledger, SESSION, r) for r in (1, 2)]
    before = _dump(db)

    record, weights, signatures = _material(SESSION, 3, stored[0].record_hash)
    with pytest.raises(ChainMismatchError, match="is not the head of session 's1' \\(round 2"):
        ledger.append_agreed(record, signatures, weights)
    assert _dump(db) == before

    record, weights, signatures = _material(SESSION, 2, stored[1].record_hash)
    with pytest.raises(DuplicateRoundError, match="round 2 is already agreed"):
        ledger.append_agreed(record, signatures, weights)
    assert _dump(db) == before

    record, weights, signatures = _material(SESSION, 3, stored[1].record_hash)
    with pytest.raises(NotEnoughSignaturesError, match="1 signature\\(s\\) \\(a\\), 2 required"):
        ledger.append_agreed(record, {"a": signatures["a"]}, weights)
    with pytest.raises(
        NotEnoughSignaturesError, match="3 signature\\(s\\) \\(a, b, c\\), 4 required"
    ):
        ledger.append_agreed(record, signatures, weights, min_signatures=4)
    assert _dump(db) == before

    forged = dict(signatures, c=SIGNERS["c"].sign(b"something else"))
    with pytest.raises(InvalidRecordError, match="signature of 'c' does not verify"):
        ledger.append_agreed(record, forged, weights, verifiers=VERIFIERS)
    with pytest.raises(InvalidRecordError, match="not participants"):
        ledger.append_agreed(record, dict(signatures, z=b"x" * 64), weights)
    with pytest.raises(InvalidRecordError, match="checkpoint SHA-256"):
        ledger.append_agreed(record, signatures, weights[:-4])
    tampered = AgreedRecord(**{**_fields(record), "metrics": {"loss": 0.0}})
    with pytest.raises(InvalidRecordError, match="metrics_hash"):
        ledger.append_agreed(tampered, signatures, weights)
    assert _dump(db) == before

    # A failure after the record row was written (duplicate privacy rows violate the
    # primary key at flush) rolls back the whole transaction.
    charge = PrivacyCharge("a", PrivacyKind.TRAINING, 0.1, 0.0)
    with pytest.raises(RecordRejected):
        ledger.append_agreed(record, signatures, weights, [charge, charge])
    assert _dump(db) == before
    # ...and the same record is accepted once it is well formed.
    assert ledger.append_agreed(record, signatures, weights, [charge]).seq == 3


def _fields(record: AgreedRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in AgreedRecord.__slots__}


def test_concurrent_appends_cannot_fork_the_chain(ledger: Ledger, db: Path) -> None:
    _append(ledger, SESSION, 1)
    head = ledger.session_head(SESSION)
    candidates = [_material(SESSION, r, head) for r in (2, 3)]
    writers = [_open(f"sqlite:///{db}") for _ in candidates]
    barrier = threading.Barrier(len(writers))
    outcomes: list[object] = []

    def append(writer: Ledger, material: tuple[AgreedRecord, bytes, dict[str, bytes]]) -> None:
        barrier.wait()
        try:
            outcomes.append(writer.append_agreed(material[0], material[2], material[1]))
        except RecordRejected as exc:
            outcomes.append(exc)

    threads = [
        threading.Thread(target=append, args=pair) for pair in zip(writers, candidates, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(type(o).__name__ for o in outcomes) == ["ChainMismatchError", "StoredRecord"]
    assert ledger.head()[0] == 2
    assert verify_ledger(ledger, VERIFIERS, 3).ok
    for writer in writers:
        writer.close()


def test_interleaved_sessions_have_independent_chains(tmp_path: Path) -> None:
    db = tmp_path / "mixed.db"
    mixed = _open(f"sqlite:///{db}")
    _add_session(mixed, "s1")
    _add_session(mixed, "s2")
    order = [("s1", 1), ("s2", 1), ("s2", 2), ("s1", 2), ("s2", 3), ("s1", 3)]
    stored = [_append(mixed, session_id, round_) for session_id, round_ in order]
    assert [s.seq for s in stored] == [1, 2, 3, 4, 5, 6]
    for session_id in ("s1", "s2"):
        chain = mixed.agreed_records(session_id)
        assert [r.record.round for r in chain] == [1, 2, 3]
        assert chain[0].record.prev_hash == _genesis(session_id)
        for before, after in itertools.pairwise(chain):
            assert after.record.prev_hash == before.record_hash
        assert mixed.session_head(session_id) == chain[-1].record_hash
    assert mixed.head() == (6, stored[-1].record_hash)
    report = verify_ledger(mixed, VERIFIERS, min_signatures=3)
    assert report.ok, str(report)
    assert report.records == 6

    # A peer that only takes part in s2 builds (and so signs) exactly the same s2 records.
    alone = _open(f"sqlite:///{tmp_path / 'alone.db'}")
    _add_session(alone, "s2")
    solo = [_append(alone, "s2", round_) for round_ in (1, 2, 3)]
    assert [s.record_hash for s in solo] == [r.record_hash for r in mixed.agreed_records("s2")]
    assert [s.seq for s in solo] == [1, 2, 3]  # seq is local, not signed
    alone.close()

    # Deleting s1 round 2 (seq 4) is a gap in seq and a broken link at s1's next record
    # (seq 6), not at seq 5, which belongs to s2 and still links correctly.
    mixed.close()
    _sql(db, "DELETE FROM record_signatures WHERE seq=4")
    _sql(db, "DELETE FROM checkpoints WHERE session_id='s1' AND round=2")
    _sql(db, "DELETE FROM agreed_records WHERE seq=4")
    report = verify_ledger(_open(f"sqlite:///{db}"), VERIFIERS, min_signatures=3)
    assert {(p.seq, p.session_id, p.kind) for p in report.problems} == {
        (4, None, ProblemKind.MISSING_RECORD),
        (6, "s1", ProblemKind.BROKEN_LINK),
    }, str(report)
    assert "previous record of session 's1', round 1 at seq 1" in str(report)


def test_global_head_is_not_a_session_head(ledger: Ledger, db: Path) -> None:
    _add_session(ledger, "s2")
    _add_session(ledger, "s3")
    _append(ledger, SESSION, 1)
    _append(ledger, "s2", 1)
    before = _dump(db)
    # The ledger's last record belongs to s2; the next s1 record must not link to it.
    global_head = ledger.head()[1]
    assert global_head != ledger.session_head(SESSION)
    record, weights, signatures = _material(SESSION, 2, global_head)
    with pytest.raises(ChainMismatchError) as caught:
        ledger.append_agreed(record, signatures, weights, verifiers=VERIFIERS)
    message = str(caught.value)
    assert message.startswith("session 's1' round 2: prev_hash ")
    assert f"is not the head of session 's1' (round 1, {ledger.session_head(SESSION).hex()})" in (
        message
    )
    # The first record of a new session links to its genesis, not to the global head.
    record, weights, signatures = _material("s3", 1, global_head)
    with pytest.raises(ChainMismatchError, match="head of session 's3' \\(its genesis, "):
        ledger.append_agreed(record, signatures, weights)
    assert _dump(db) == before


def test_a_record_is_stored_only_as_the_next_round_of_its_chain(ledger: Ledger, db: Path) -> None:
    first = _append(ledger, SESSION, 1)
    # Round 2 aborted: it is retried under its number, so a round 3 record linked to
    # round 1 can only come from signers who want this peer to skip rounds. Refused.
    attempt = ledger.start_round(SESSION, 2, aggregator="a", participants=PEERS)
    ledger.abort_round(SESSION, 2, attempt.attempt, reason="too many dropouts")
    before = _dump(db)
    record, weights, signatures = _material(SESSION, 3, first.record_hash)
    with pytest.raises(ChainMismatchError, match="only as the next round of its chain \\(2\\)"):
        ledger.append_agreed(record, signatures, weights)
    assert _dump(db) == before
    second = _append(ledger, SESSION, 2)
    assert second.record.prev_hash == first.record_hash
    assert verify_ledger(ledger, VERIFIERS, 2).ok
    # A second round 1 is refused, whatever it links to.
    before = _dump(db)
    for prev in (first.record_hash, second.record_hash):
        record, weights, signatures = _material(SESSION, 1, prev)
        with pytest.raises(DuplicateRoundError):
            ledger.append_agreed(record, signatures, weights)
    assert _dump(db) == before


# --------------------------------------------------------------------------- tampering


def _delete_record_3(db: Path) -> None:
    # Children first: the foreign keys forbid orphans, as they should.
    _sql(db, "DELETE FROM record_signatures WHERE seq=3")
    _sql(db, "DELETE FROM checkpoints WHERE round=3")
    _sql(db, "DELETE FROM agreed_records WHERE seq=3")


TAMPERS: dict[str, tuple[Callable[[Path], None], set[tuple[int | None, ProblemKind]]]] = {
    "aggregate_hash": (
        lambda db: _sql(db, "UPDATE agreed_records SET aggregate_hash=? WHERE seq=2", b"\1" * 32),
        {(2, ProblemKind.RECORD_HASH), (2, ProblemKind.BAD_SIGNATURE)},
    ),
    "metrics_json": (
        lambda db: _sql(
            db,
            "UPDATE agreed_records SET metrics=? WHERE seq=2",
            '{"accuracy":0.99,"examples":100,"loss":0.5}',
        ),
        {(2, ProblemKind.METRICS_HASH)},
    ),
    "epsilon_json": (
        lambda db: _sql(
            db, "UPDATE agreed_records SET epsilon=? WHERE seq=3", '{"a":0,"b":0.375,"c":0.375}'
        ),
        {(3, ProblemKind.METRICS_HASH)},
    ),
    "signature": (
        lambda db: _sql(
            db,
            "UPDATE record_signatures SET signature=? WHERE seq=2 AND peer_id='b'",
            SIGNERS["b"].sign(b"not the payload"),
        ),
        {(2, ProblemKind.BAD_SIGNATURE)},
    ),
    "deleted_signature": (
        lambda db: _sql(db, "DELETE FROM record_signatures WHERE seq=4 AND peer_id='a'"),
        {(4, ProblemKind.TOO_FEW_SIGNATURES)},
    ),
    "prev_link": (
        lambda db: _sql(db, "UPDATE agreed_records SET prev_hash=? WHERE seq=3", b"\2" * 32),
        {
            (3, ProblemKind.BROKEN_LINK),
            (3, ProblemKind.RECORD_HASH),
            (3, ProblemKind.BAD_SIGNATURE),
        },
    ),
    "deleted_middle_record": (
        _delete_record_3,
        {(3, ProblemKind.MISSING_RECORD), (4, ProblemKind.BROKEN_LINK)},
    ),
    "checkpoint_blob": (
        lambda db: _sql(db, "UPDATE checkpoints SET weights=? WHERE round=2", b"\0" * 256),
        {(2, ProblemKind.CHECKPOINT_HASH)},
    ),
    "checkpoint_blob_and_hash": (
        lambda db: _sql(
            db,
            "UPDATE checkpoints SET weights=?, sha256=? WHERE round=4",
            b"\0" * 256,
            sha256(b"\0" * 256),
        ),
        {(4, ProblemKind.CHECKPOINT_MODEL)},
    ),
    "proposal": (
        lambda db: _sql(db, "UPDATE sessions SET proposal=?", '{"rounds": 1}'),
        {(None, ProblemKind.PROPOSAL_HASH)},
    ),
    # The chain starts at the genesis of the stored proposal hash: changing it unhooks it.
    "proposal_hash": (
        lambda db: _sql(db, "UPDATE sessions SET proposal_hash=?", b"\3" * 32),
        {(None, ProblemKind.PROPOSAL_HASH), (1, ProblemKind.BROKEN_LINK)},
    ),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_verify_names_each_tampering(ledger: Ledger, db: Path, name: str) -> None:
    for r in range(1, 6):
        _append(ledger, SESSION, r)
    assert verify_ledger(ledger, VERIFIERS, 3).ok
    ledger.close()
    tamper, expected = TAMPERS[name]
    tamper(db)
    report = verify_ledger(_open(f"sqlite:///{db}"), VERIFIERS, min_signatures=3)
    assert {(p.seq, p.kind) for p in report.problems} == expected, str(report)
    if name == "signature":
        assert report.problems[0].peers == ("b",)
        assert "only 2 of the 3 required" in str(report)


def test_verify_reports_every_problem_not_just_the_first(ledger: Ledger, db: Path) -> None:
    for r in range(1, 6):
        _append(ledger, SESSION, r)
    ledger.close()
    TAMPERS["metrics_json"][0](db)
    TAMPERS["checkpoint_blob_and_hash"][0](db)
    report = verify_ledger(_open(f"sqlite:///{db}"), VERIFIERS, min_signatures=3)
    assert [(p.seq, p.kind) for p in report.problems] == [
        (2, ProblemKind.METRICS_HASH),
        (4, ProblemKind.CHECKPOINT_MODEL),
    ]
    # An unknown roster key is reported per record, naming the signer.
    partial = verify_ledger(_open(f"sqlite:///{db}"), {"a": VERIFIERS["a"]}, min_signatures=1)
    unknown = [p for p in partial.problems if p.kind == ProblemKind.UNKNOWN_SIGNER]
    assert [p.seq for p in unknown] == [1, 2, 3, 4, 5]
    assert unknown[0].peers == ("b", "c")


# --------------------------------------------------------------------------- write failures


def test_file_that_is_not_a_database_raises_read_error(tmp_path: Path) -> None:
    """An operator points verification at the wrong file (or the file was overwritten):
    the verifier answers with a ledger error naming the file, not a database traceback,
    and leaves the file as it was."""
    path = tmp_path / "not-a-ledger.db"
    garbage = random.Random(10).randbytes(8192)
    path.write_bytes(garbage)
    ledger = Ledger(f"sqlite:///{path}", StepClock())
    with pytest.raises(LedgerReadError) as caught:
        verify_ledger(ledger, VERIFIERS, min_signatures=3)
    message = str(caught.value)
    assert message.startswith(f"cannot read the ledger at {ledger.url}: ")
    assert message.endswith("file is not a database")
    with pytest.raises(LedgerWriteError, match="file is not a database"):
        ledger.create()
    ledger.close()
    assert path.read_bytes() == garbage


def test_read_only_database_raises_write_error(ledger: Ledger, db: Path) -> None:
    _append(ledger, SESSION, 1)
    _append(ledger, SESSION, 2)
    ledger.close()
    before = _dump(db)
    read_only = Ledger(f"sqlite:///file:{db}?mode=ro&uri=true", StepClock())
    assert read_only.head()[0] == 2  # reading still works
    record, weights, signatures = _material(SESSION, 3, read_only.head()[1])
    with pytest.raises(LedgerWriteError) as caught:
        read_only.append_agreed(record, signatures, weights)
    message = str(caught.value)
    assert message.startswith(f"cannot write the ledger at {read_only.url}: ")
    assert str(db) in message
    assert message.endswith("attempt to write a readonly database")
    with pytest.raises(LedgerWriteError):
        read_only.start_round(SESSION, 3, aggregator="a", participants=PEERS)
    read_only.close()
    assert _dump(db) == before
    assert verify_ledger(_open(f"sqlite:///{db}"), VERIFIERS, 3).ok


def test_read_only_files_raise_write_error(ledger: Ledger, db: Path) -> None:
    """A ledger whose files cannot be written: by permissions for a normal user; as root
    (who ignores permissions, e.g. in CI) by making them immutable with chattr."""
    _append(ledger, SESSION, 1)
    ledger.close()
    files = [path for path in db.parent.iterdir() if path.name.startswith(db.name)]
    as_root = os.geteuid() == 0
    if as_root:
        locked = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True, text=True)
        if locked.returncode != 0:
            message = f"cannot make the ledger immutable: {locked.stderr.strip()}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    else:
        for path in files:
            path.chmod(0o444)
        db.parent.chmod(0o555)
    try:
        with pytest.raises(LedgerWriteError, match="cannot write the ledger at"):
            _append(Ledger(f"sqlite:///{db}", StepClock()), SESSION, 2)
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", *map(str, files)], check=True)
        else:
            db.parent.chmod(0o755)
            for path in files:
                path.chmod(0o644)
    assert verify_ledger(_open(f"sqlite:///{db}"), VERIFIERS, 3).ok


def test_full_disk_raises_write_error_and_keeps_earlier_records(ledger: Ledger, db: Path) -> None:
    _append(ledger, SESSION, 1)
    _append(ledger, SESSION, 2)
    ledger.close()
    before = _dump(db)
    with sqlite3.connect(db) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]

    full = Ledger(f"sqlite:///{db}", StepClock())

    # SQLite's max_page_count makes the database "full" exactly like a full disk does.
    @event.listens_for(full.engine, "connect")
    def _limit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count={pages + 2}")

    with pytest.raises(LedgerWriteError, match="database or disk is full"):
        _append(full, SESSION, 3, weights_len=256 * 1024)
    full.close()
    assert _dump(db) == before
    # Once there is room again the ledger carries on.
    roomy = _open(f"sqlite:///{db}")
    _append(roomy, SESSION, 3)
    assert verify_ledger(roomy, VERIFIERS, 3).ok


def test_password_is_not_shown_in_errors() -> None:
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed")
    ledger = Ledger("postgresql+psycopg://peer:secret@127.0.0.1:1/ledger", StepClock())
    assert "secret" not in ledger.url
    assert "secret" not in repr(ledger)


# --------------------------------------------------------------------------- durability


def _writer_main(url: str) -> None:
    """Append rounds forever (the parent kills us), printing each committed round."""
    ledger = _open(url)
    _add_session(ledger)
    ledger.recover_interrupted_rounds()
    start = ledger.last_agreed_round(SESSION) + 1
    print("ready", start - 1, flush=True)
    for round_ in range(start, 1_000_000):
        attempt = ledger.start_round(SESSION, round_, aggregator="a", participants=PEERS)
        _append(ledger, SESSION, round_, weights_len=16 * 1024)
        ledger.finish_round(SESSION, round_, attempt.attempt, status=RoundStatus.AGREED)
        print(round_, flush=True)


def _expected_hashes(count: int) -> list[bytes]:
    hashes, prev = [], _genesis(SESSION)
    for round_ in range(1, count + 1):
        record, _, _ = _material(SESSION, round_, prev, 16 * 1024)
        prev = record.record_hash()
        hashes.append(prev)
    return hashes


def test_killed_writer_leaves_a_verifiable_prefix(db: Path) -> None:
    url = f"sqlite:///{db}"
    rng = random.Random(20250301)  # only decides when to kill: nothing secret
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    committed = 0
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, __file__, url], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready", ready
        # The writer resumes exactly where the previous one was killed.
        assert int(ready[1]) >= committed
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        printed = [int(line) for line in proc.stdout.read().split()]
        proc.stdout.close()
        committed = max([committed, int(ready[1]), *printed])

        ledger = Ledger(url, StepClock())
        report = verify_ledger(ledger, VERIFIERS, min_signatures=3)
        assert report.ok, str(report)
        records = ledger.agreed_records()
        rounds = [r.record.round for r in records]
        # Nothing half-written: a gap-free prefix that includes every reported commit.
        assert rounds == list(range(1, len(rounds) + 1))
        assert len(rounds) >= committed
        assert [r.record_hash for r in records] == _expected_hashes(len(rounds))
        assert all(ledger.get_checkpoint(SESSION, r) is not None for r in rounds)
        # At most the round in progress at the kill is left running; start-up closes it.
        running = [a for a in ledger.round_attempts(SESSION) if a.status == RoundStatus.RUNNING]
        assert len(running) <= 1
        for attempt in ledger.recover_interrupted_rounds():
            assert attempt.status == (
                RoundStatus.AGREED if attempt.round <= len(rounds) else RoundStatus.ABORTED
            )
        committed = len(rounds)
        ledger.close()
    assert committed > 0


# --------------------------------------------------------------------------- catch-up


def _two_session_ledger(path: Path) -> Ledger:
    ledger = _open(f"sqlite:///{path}")
    _add_session(ledger, "s1")
    _add_session(ledger, "s2", threshold=3)
    for session_id, round_ in (("s1", 1), ("s2", 1), ("s1", 2), ("s2", 2), ("s1", 3)):
        _append(ledger, session_id, round_)
    return ledger


def test_import_catches_up_an_empty_ledger(tmp_path: Path) -> None:
    source = _two_session_ledger(tmp_path / "a.db")
    target = _open(f"sqlite:///{tmp_path / 'b.db'}")
    export = LedgerExport.from_json(export_records(source).to_json())
    appended = import_records(target, export, VERIFIERS, min_signatures=2)
    assert [s.seq for s in appended] == [1, 2, 3, 4, 5]
    assert target.head() == source.head()
    assert verify_ledger(target, VERIFIERS, min_signatures=3).ok
    assert [r.record_hash for r in target.agreed_records()] == [
        r.record_hash for r in source.agreed_records()
    ]
    # "last" checkpoints: what a peer needs to resume each session.
    assert target.get_checkpoint("s1", 3) == source.get_checkpoint("s1", 3)
    assert target.get_checkpoint("s2", 2) is not None
    assert target.get_checkpoint("s1", 2) is None
    assert target.session("s2").threshold == 3  # type: ignore[union-attr]
    # Importing again adds nothing.
    assert import_records(target, export, VERIFIERS) == []


def test_import_after_missed_rounds(tmp_path: Path) -> None:
    source = _two_session_ledger(tmp_path / "a.db")
    target = _open(f"sqlite:///{tmp_path / 'b.db'}")
    import_records(target, LedgerExport.from_json(export_records(source).to_json()), VERIFIERS)
    # The target was down for two rounds.
    _append(source, "s1", 4)
    _append(source, "s2", 3)
    seq, _ = target.head()
    missed = export_records(source, after_seq=seq, checkpoints="all")
    assert [r.seq for r in missed.records] == [6, 7]
    appended = import_records(target, missed, VERIFIERS)
    assert [(s.seq, s.record.session_id, s.record.round) for s in appended] == [
        (6, "s1", 4),
        (7, "s2", 3),
    ]
    assert target.last_agreed_round("s1") == 4
    assert verify_ledger(target, VERIFIERS, 3).ok


def test_import_into_a_ledger_with_other_sessions(tmp_path: Path) -> None:
    source = _two_session_ledger(tmp_path / "a.db")
    target = _open(f"sqlite:///{tmp_path / 'b.db'}")
    # The target took part in a session the source never saw, and already holds s1 round 1.
    _add_session(target, "s3")
    _append(target, "s3", 1)
    _append(target, "s3", 2)
    full = LedgerExport.from_json(export_records(source).to_json())
    s1_round_1 = LedgerExport(full.sessions, full.records[:1], ())
    assert [s.seq for s in import_records(target, s1_round_1, VERIFIERS)] == [3]

    appended = import_records(target, full, VERIFIERS)
    assert [(s.seq, s.record.session_id, s.record.round) for s in appended] == [
        (4, "s2", 1),
        (5, "s1", 2),
        (6, "s2", 2),
        (7, "s1", 3),
    ]
    for session_id in ("s1", "s2"):
        assert [r.record_hash for r in target.agreed_records(session_id)] == [
            r.record_hash for r in source.agreed_records(session_id)
        ]
        assert target.session_head(session_id) == source.session_head(session_id)
    assert target.head()[0] == 7
    assert verify_ledger(target, VERIFIERS, min_signatures=3).ok
    # Both ledgers go on agreeing the same records although their seq orders differ.
    assert _append(source, "s1", 4).record_hash == _append(target, "s1", 4).record_hash
    assert import_records(target, export_records(source), VERIFIERS) == []


def _tamper_export(data: bytes, edit: Callable[[dict[str, Any]], None]) -> LedgerExport:
    document = json.loads(data)
    edit(document)
    return LedgerExport.from_json(json.dumps(document).encode())


def _set_metrics(document: Mapping[str, Any]) -> None:
    document["records"][1]["metrics"] = '{"accuracy":1.0,"examples":100,"loss":0.0}'


def _set_signature(document: Mapping[str, Any]) -> None:
    document["records"][2]["signatures"]["c"] = SIGNERS["c"].sign(b"other").hex()


def _drop_record(document: Mapping[str, Any]) -> None:
    del document["records"][2]


def _set_weights(document: Mapping[str, Any]) -> None:
    document["checkpoints"][0]["weights"] = "AAAAAA=="


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set_metrics, (2, ProblemKind.METRICS_HASH)),
        (_set_signature, (3, ProblemKind.BAD_SIGNATURE)),
        (_drop_record, (3, ProblemKind.MISSING_RECORD)),
        (_set_weights, (5, ProblemKind.CHECKPOINT_HASH)),
    ],
)
def test_tampered_export_is_refused(
    tmp_path: Path,
    edit: Callable[[dict[str, Any]], None],
    expected: tuple[int, ProblemKind],
) -> None:
    source = _two_session_ledger(tmp_path / "a.db")
    target = _open(f"sqlite:///{tmp_path / 'b.db'}")
    _add_session(target, "s1")
    before = _dump(tmp_path / "b.db")
    export = _tamper_export(export_records(source).to_json(), edit)
    with pytest.raises(ImportRefusedError) as caught:
        import_records(target, export, VERIFIERS, min_signatures=3)
    assert expected in {(p.seq, p.kind) for p in caught.value.problems}, str(caught.value)
    assert _dump(tmp_path / "b.db") == before


def test_export_that_does_not_continue_the_chain_is_refused(tmp_path: Path) -> None:
    source = _two_session_ledger(tmp_path / "a.db")
    target = _open(f"sqlite:///{tmp_path / 'b.db'}")
    before = _dump(tmp_path / "b.db")
    with pytest.raises(ImportRefusedError, match="does not continue the chain"):
        import_records(target, export_records(source, after_seq=2), VERIFIERS)
    assert _dump(tmp_path / "b.db") == before
    with pytest.raises(ImportRefusedError, match="not a well-formed ledger export"):
        LedgerExport.from_json(b'{"format": "something/v9"}')


def test_export_with_a_forked_record_is_refused(tmp_path: Path) -> None:
    source = _two_session_ledger(tmp_path / "a.db")
    target = _open(f"sqlite:///{tmp_path / 'b.db'}")
    _add_session(target, "s1")
    # The target agreed on a different round 1 of s1 than the source (a fork).
    record, weights, signatures = _material("s1", 1, _genesis("s1"), weights_len=8)
    target.append_agreed(record, signatures, weights)
    before = _dump(tmp_path / "b.db")
    with pytest.raises(ImportRefusedError, match="conflict: session 's1' round 1"):
        import_records(target, export_records(source), VERIFIERS)
    assert _dump(tmp_path / "b.db") == before


if __name__ == "__main__":
    _writer_main(sys.argv[1])
