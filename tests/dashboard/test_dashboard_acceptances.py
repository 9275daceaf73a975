"""Each site's signed acceptance of the proposal on the dashboard (peer/acceptances.py).

The attack: a member signs an acceptance in another hospital's name with its own key (or
the ledger's stored acceptance is replaced). With the roster, the page must show that
acceptance as not verifying, name the hospital next to the session facts, and keep showing
the genuine ones as verified.
"""

from __future__ import annotations

from pathlib import Path

from dashboard_testlib import PEERS, LedgerBuilder

from dashboard.app import render
from dashboard.data import ACCEPTED, ACCEPTED_UNCHECKED, BAD_ACCEPTANCE, NO_ACCEPTANCE
from dashboard.source import LedgerSource, Snapshot
from peer.acceptances import AcceptanceStatus, check_acceptances
from secagg.crypto import Verifier


def _snapshot(builder: LedgerBuilder, verifiers: dict[str, Verifier] | None) -> Snapshot:
    source = LedgerSource(builder.url, verifiers=verifiers)
    try:
        return source.snapshot("s1")
    finally:
        source.close()


def _study(tmp_path: Path, forged_by: str | None = None) -> LedgerBuilder:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=2)
    builder.accept("s1", forged_by=forged_by)
    builder.agree_round("s1", 1, {"accuracy": 0.8})
    return builder


def test_genuine_acceptances_are_verified_with_the_roster(tmp_path: Path) -> None:
    builder = _study(tmp_path)
    snapshot = _snapshot(builder, builder.verifiers())
    assert [a.status for a in snapshot.acceptances] == [AcceptanceStatus.VERIFIED] * len(PEERS)
    assert snapshot.report is not None
    assert snapshot.report.ok
    sections = render(snapshot)
    facts, trust = str(sections[1]), str(sections[6])
    assert f"{len(PEERS)} of {len(PEERS)}: {ACCEPTED}" in facts
    assert "acceptance-table" in trust
    assert trust.count(ACCEPTED) == len(PEERS)


def test_an_acceptance_signed_in_another_hospitals_name_does_not_verify(tmp_path: Path) -> None:
    builder = _study(tmp_path, forged_by=PEERS[0])
    snapshot = _snapshot(builder, builder.verifiers())
    statuses = {a.peer: a.status for a in snapshot.acceptances}
    assert statuses[PEERS[-1]] is AcceptanceStatus.FORGED
    assert statuses[PEERS[0]] is AcceptanceStatus.VERIFIED
    sections = render(snapshot)
    facts = str(sections[1])
    assert f"1 of {len(PEERS)}: {BAD_ACCEPTANCE} ({PEERS[-1]})" in facts
    assert "bad-text" in facts
    assert BAD_ACCEPTANCE in str(sections[6])
    # ... and the ledger check fails, naming the hospital, as verify-ledger does.
    assert snapshot.report is not None
    assert not snapshot.report.ok
    (problem,) = snapshot.report.problems
    assert problem.peers == (PEERS[-1],)
    assert "acceptance of the proposal" in problem.message
    # The same stored bytes read by a peer of the keyless dashboard: shown signed, never
    # claimed verified.
    keyless = _snapshot(builder, None)
    assert {a.status for a in keyless.acceptances} == {AcceptanceStatus.UNCHECKED}
    assert f"{len(PEERS)} of {len(PEERS)}: {ACCEPTED_UNCHECKED}" in str(render(keyless)[1])


def test_an_acceptance_of_another_proposal_does_not_verify(tmp_path: Path) -> None:
    """A genuine acceptance of session s1's proposal copied into session s2's place."""
    builder = _study(tmp_path)
    builder.add_session("s2", rounds=2)
    with builder.open() as ledger:
        state = ledger.beacon_state("s1")
        s2 = ledger.session("s2")
    assert state is not None
    assert state.commitments is not None
    assert s2 is not None
    checked = check_acceptances(s2, dict(state.commitments), builder.verifiers())
    assert {a.status for a in checked} == {AcceptanceStatus.FORGED}


def test_a_session_without_acceptances_says_none_recorded(tmp_path: Path) -> None:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=2)
    snapshot = _snapshot(builder, builder.verifiers())
    assert {a.status for a in snapshot.acceptances} == {AcceptanceStatus.MISSING}
    assert f"{len(PEERS)} of {len(PEERS)}: {NO_ACCEPTANCE}" in str(render(snapshot)[1])


def test_a_new_acceptance_changes_the_digest(tmp_path: Path) -> None:
    """Acceptances stored after the page was drawn are shown at the next refresh."""
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=2)
    before = _snapshot(builder, builder.verifiers()).digest()
    builder.accept("s1")
    assert _snapshot(builder, builder.verifiers()).digest() != before
