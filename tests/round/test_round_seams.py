"""The round's seams (peer/round/context.py): typed preconditions, fault hooks that are
no-ops unless a test installs them, backends that refuse a transcript of another kind."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from peer import faults
from peer.codec import decode, encode
from peer.payloads import payload_for
from peer.privacy import PrivacyBudgetError
from peer.round import BACKENDS, NO_FAULTS, Elsewhere, RoundContext, RoundOutcome, RoundStatusKind
from peer.round.context import describe_precondition
from peer.session import ProposalError
from peer.wire import peer_pb2 as pb
from secagg import RemoteProtocolError


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_a_transcript_of_another_kind_is_refused_naming_the_aggregator(name: str) -> None:
    # An aggregator that sends some other message where the transcript belongs is named;
    # the peer never reads fields the message does not have.
    ctx = cast(RoundContext, SimpleNamespace(aggregator="hospital-b"))
    with pytest.raises(RemoteProtocolError) as error:
        BACKENDS[name].verify(pb.RecordDraft(), ctx, [])
    assert error.value.offender == "hospital-b"
    assert "RecordDraft" in str(error.value)


def test_a_precondition_travels_typed_with_its_round() -> None:
    elsewhere = Elsewhere(pb.PRECONDITION_ROUND_PASSED, "session s is at round 7 here", 7)
    abort = decode("Abort", encode(elsewhere.abort())[1])
    assert isinstance(abort, pb.Abort)
    assert abort.precondition == pb.PRECONDITION_ROUND_PASSED
    assert abort.round == 7
    assert abort.offender == ""  # nobody broke the protocol
    outcome = RoundOutcome(RoundStatusKind.AGGREGATOR_FAILED, "hospital-b")
    outcome.precondition, outcome.precondition_round = abort.precondition, abort.round
    assert outcome.where() == "round-passed: 7"
    assert describe_precondition(pb.PRECONDITION_NOT_READY, 0) == "not-ready"
    assert describe_precondition(pb.PRECONDITION_BEHIND, 3) == "behind: 3"
    assert describe_precondition(pb.PRECONDITION_NONE, 0) == "-"


def test_fault_hooks_are_no_ops_unless_the_environment_asks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (faults.KILL_AT_ENV, faults.TAMPER_ENV, faults.TAMPER_SEND_ENV):
        monkeypatch.delenv(name, raising=False)
    assert faults.from_environment() is NO_FAULTS
    message = object()
    assert NO_FAULTS.outgoing(1, "hospital-a", message) is message
    transcripts: dict[str, object] = {"hospital-a": message}
    assert NO_FAULTS.transcripts(1, transcripts) is transcripts
    monkeypatch.setenv(faults.TAMPER_ENV, "1")
    assert isinstance(faults.from_environment(), faults.EnvironmentFaults)


def test_an_unknown_payload_kind_is_refused_and_budget_errors_are_one() -> None:
    with pytest.raises(ProposalError, match="payload kind 'genome' is not supported"):
        payload_for("genome")
    from peer.payloads.statistics import StatisticsBudgetError

    assert StatisticsBudgetError is PrivacyBudgetError
    assert issubclass(PrivacyBudgetError, ProposalError)
