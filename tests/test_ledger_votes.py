"""The ledger's signed votes (peer/ledger/_votes.py): one record per round, kept on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peer.ledger import AgreedRecord, Ledger, SessionError, VoteConflictError, VoteStatement

SESSION = "s"


def _ledger(path: Path) -> Ledger:
    ledger = Ledger(f"sqlite:///{path}")
    ledger.create()
    return ledger


def _record(ledger: Ledger, n: int, round_: int = 1) -> AgreedRecord:
    return AgreedRecord.build(
        SESSION,
        round_,
        aggregate_hash=bytes(32),
        model_hash=bytes(32),
        metrics={"n": n, "survivors": ["a", "b"]},
        epsilon={"a": 0.25},
        prev_hash=ledger.session_head(SESSION),
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with _ledger(path) as ledger:
        ledger.record_proposal(
            SESSION,
            json.dumps({"id": SESSION}),
            proposer="op",
            participants=["a", "b"],
            threshold=2,
            rounds_planned=2,
        )
        ledger.decide_session(SESSION, accept=True)
    return path


def test_a_vote_is_on_disk_when_record_vote_returns(path: Path) -> None:
    ledger = _ledger(path)
    record = _record(ledger, 1)
    kept = ledger.record_vote(record, b"sig-1", attempt=2, aggregator="b", model=b"weights")
    # Another process opening the file (a restarted peer) sees it, before this one closes.
    with _ledger(path) as other:
        again = other.signed_vote(SESSION, 1)
    ledger.close()
    assert again == kept
    assert again.record == record
    assert again.record_hash == record.record_hash()
    assert (again.signature, again.attempt, again.aggregator, again.model) == (
        b"sig-1",
        2,
        "b",
        b"weights",
    )
    assert os.path.getsize(path) > 0


def test_the_same_record_again_keeps_the_first_signature(path: Path) -> None:
    with _ledger(path) as ledger:
        record = _record(ledger, 1)
        first = ledger.record_vote(record, b"sig-1", attempt=0, aggregator="b", model=b"m")
        second = ledger.record_vote(record, b"sig-2", attempt=1, aggregator="a", model=b"m")
        assert second == first
        assert second.signature == b"sig-1"


def test_a_second_record_for_a_round_is_refused_and_nothing_changes(path: Path) -> None:
    with _ledger(path) as ledger:
        first = ledger.record_vote(
            _record(ledger, 1), b"sig-1", attempt=0, aggregator="b", model=b"m"
        )
        with pytest.raises(
            VoteConflictError, match=r"already signed record \w+ \(attempt 0, aggregator b\)"
        ):
            ledger.record_vote(_record(ledger, 2), b"sig-2", attempt=1, aggregator="a", model=b"x")
        assert ledger.signed_vote(SESSION, 1) == first
        # Another round is another vote.
        other = ledger.record_vote(
            _record(ledger, 2, round_=2), b"sig-3", attempt=0, aggregator="a", model=b"y"
        )
        assert ledger.signed_vote(SESSION, 2) == other


def test_no_vote_for_an_unknown_session(path: Path) -> None:
    with _ledger(path) as ledger:
        record = AgreedRecord.build(
            "nope",
            1,
            aggregate_hash=bytes(32),
            model_hash=bytes(32),
            metrics={},
            epsilon={},
            prev_hash=bytes(32),
        )
        with pytest.raises(SessionError):
            ledger.record_vote(record, b"s", attempt=0, aggregator="a", model=b"")
        assert ledger.signed_vote("nope", 1) is None


def _of_attempt(ledger: Ledger, attempt: int) -> AgreedRecord:
    return AgreedRecord.build(
        SESSION,
        1,
        aggregate_hash=bytes(32),
        model_hash=bytes(32),
        metrics={"n": 2, "attempt": attempt},
        epsilon={},
        prev_hash=ledger.session_head(SESSION),
    )


def _no_vote(attempt: int, peer: str = "b") -> VoteStatement:
    return VoteStatement(SESSION, 1, attempt, peer, b"", b"sig")


def test_a_stated_vote_closes_earlier_attempts_and_survives_a_restart(path: Path) -> None:
    with _ledger(path) as ledger:
        assert ledger.state_vote(SESSION, 1, 0) == b""
        ledger.record_vote(_of_attempt(ledger, 0), b"s0", attempt=0, aggregator="a", model=b"")
        assert ledger.state_vote(SESSION, 1, 2) == _of_attempt(ledger, 0).record_hash()
    with _ledger(path) as ledger:
        with pytest.raises(VoteConflictError, match="attempt 1 is over for it"):
            ledger.state_vote(SESSION, 1, 1)
        with pytest.raises(VoteConflictError, match="signs no record of attempt 1"):
            ledger.record_vote(_of_attempt(ledger, 1), b"s1", attempt=1, aggregator="a", model=b"")
        # A record signs only in the attempt it names.
        with pytest.raises(VoteConflictError, match="built in attempt 3"):
            ledger.record_vote(_of_attempt(ledger, 3), b"s3", attempt=2, aggregator="a", model=b"")


def test_a_released_vote_is_gone_and_its_record_never_signed_again(path: Path) -> None:
    with _ledger(path) as ledger:
        r0 = _of_attempt(ledger, 0)
        ledger.record_vote(r0, b"s0", attempt=0, aggregator="a", model=b"")
        # Evidence of another attempt, or naming the record itself, releases nothing.
        for bad in (_no_vote(0), VoteStatement(SESSION, 1, 1, "b", r0.record_hash(), b"s")):
            with pytest.raises(VoteConflictError, match="does not release"):
                ledger.release_vote(SESSION, 1, r0.record_hash(), attempt=1, evidence=[bad])
        with pytest.raises(VoteConflictError, match="cannot be released in attempt 0"):
            ledger.release_vote(SESSION, 1, r0.record_hash(), attempt=0, evidence=[])
        with pytest.raises(VoteConflictError, match="holds no vote for record"):
            ledger.release_vote(SESSION, 1, bytes(32), attempt=1, evidence=[_no_vote(1)])
        assert ledger.signed_vote(SESSION, 1) is not None
        ledger.release_vote(SESSION, 1, r0.record_hash(), attempt=1, evidence=[_no_vote(1)])
        assert ledger.signed_vote(SESSION, 1) is None
    with _ledger(path) as ledger:
        (released,) = ledger.released_votes(SESSION)
        assert released.record_hash == r0.record_hash()
        assert (released.signed_attempt, released.released_attempt) == (0, 1)
        assert released.evidence == (_no_vote(1),)
        with pytest.raises(VoteConflictError, match="never signs that record again"):
            ledger.record_vote(r0, b"s0", attempt=0, aggregator="a", model=b"")
        r1 = _of_attempt(ledger, 1)
        ledger.record_vote(r1, b"s1", attempt=1, aggregator="c", model=b"")
        assert ledger.signed_vote(SESSION, 1).record_hash == r1.record_hash()  # type: ignore[union-attr]
