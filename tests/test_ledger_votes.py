"""The ledger's signed votes (peer/ledger/_votes.py): one record per round, kept on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peer.ledger import AgreedRecord, Ledger, SessionError, VoteConflictError

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
