"""The ledger's part in the session beacon and the refused-proposal log (additive tables)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peer.ledger import Ledger, SessionError

SESSION = "s1"


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.create()
    ledger.record_proposal(
        SESSION,
        json.dumps({"session_id": SESSION}),
        proposer="op",
        participants=["a", "b", "c"],
        threshold=2,
        rounds_planned=1,
    )
    ledger.decide_session(SESSION, accept=True)
    return ledger


def test_the_nonce_is_drawn_once_and_survives_a_reopen(ledger: Ledger, tmp_path: Path) -> None:
    nonce = ledger.session_nonce(SESSION, lambda: b"\1" * 32)
    assert ledger.session_nonce(SESSION, lambda: b"\2" * 32) == nonce == b"\1" * 32
    ledger.close()
    again = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    state = again.beacon_state(SESSION)
    assert state is not None
    assert state.nonce == nonce
    assert state.commitments is None
    assert state.beacon is None
    with pytest.raises(SessionError, match="unknown session"):
        again.session_nonce("other", lambda: b"\1" * 32)


def test_commitments_are_fixed_once(ledger: Ledger) -> None:
    with pytest.raises(SessionError, match="made no commitment"):
        ledger.store_commitments(SESSION, {"a": (b"c" * 32, b"sig")})
    ledger.session_nonce(SESSION, lambda: b"\1" * 32)
    first = {"a": (b"c" * 32, b"sig-a"), "b": (b"d" * 32, b"sig-b")}
    ledger.store_commitments(SESSION, first)
    ledger.store_commitments(SESSION, first)  # the same again: a no-op
    with pytest.raises(SessionError, match="other commitments are already fixed"):
        ledger.store_commitments(SESSION, {**first, "b": (b"e" * 32, b"sig-b")})
    state = ledger.beacon_state(SESSION)
    assert state is not None
    assert state.commitments == first


def test_the_beacon_is_stored_with_its_reveals(ledger: Ledger) -> None:
    ledger.session_nonce(SESSION, lambda: b"\1" * 32)
    with pytest.raises(SessionError, match="no commitments are fixed"):
        ledger.store_beacon(SESSION, {"a": b"\1" * 32}, b"B" * 32)
    ledger.store_commitments(SESSION, {"a": (b"c" * 32, b"sig")})
    ledger.store_beacon(SESSION, {"a": b"\1" * 32}, b"B" * 32)
    assert ledger.session_beacon(SESSION) == b"B" * 32
    with pytest.raises(SessionError, match="another beacon"):
        ledger.store_beacon(SESSION, {"a": b"\1" * 32}, b"C" * 32)


def test_refused_proposals_are_a_bounded_log_apart_from_sessions(ledger: Ledger) -> None:
    for i in range(7):
        ledger.record_refused_proposal(
            f"squat-{i}",
            proposer="hospital-b",
            proposal_hash=bytes(32),
            size=100,
            reason="x" * 5000,
            keep=3,
        )
    refused = ledger.refused_proposals()
    assert [r.session_id for r in refused] == ["squat-4", "squat-5", "squat-6"]
    assert all(len(r.reason) == 1000 for r in refused)
    assert [s.session_id for s in ledger.sessions()] == [SESSION]
