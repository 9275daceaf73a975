"""The aggregator against malicious participants, and its (stage, message type) table.

Unless said otherwise: 5 peers, t = 3, the misbehaving participant is B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from secagg_testlib import Round, make_round

from secagg import (
    AdvertiseKeys,
    AggregatorState,
    ConsistencySignature,
    GraphKind,
    LocalProtocolError,
    MaskedInput,
    ParticipantMessage,
    RemoteProtocolError,
    RoundAborted,
    ShareKeys,
    Stage,
    UnmaskShares,
    verify_transcript,
)
from secagg.messages import consistency_payload
from secagg.shamir import PRIME, encode_share

A, B, C, D, E = (f"hospital-{x}" for x in "abcde")
STAGES = list(Stage)

Tamper = Callable[[Round, ParticipantMessage], list[ParticipantMessage]]


def resign(r: Round, message: ParticipantMessage) -> ParticipantMessage:
    """``message`` signed by its sender's own key (an authentic but malicious participant)."""
    if isinstance(message, AdvertiseKeys | MaskedInput | UnmaskShares):
        payload = message.signed_payload(r.config.digest)
        return replace(message, signature=r.signers[message.sender].sign(payload))
    raise TypeError(type(message))


def run_with(r: Round, stage: Stage, tamper: Tamper, offender: str = B) -> str:
    """Run the round honestly except that ``offender`` sends ``tamper(...)`` at ``stage``.

    Every message of the tampered list but the first may be refused; the last must be.
    Returns the refusal's reason. The round must then still complete correctly.
    """
    outgoing: dict[str, object] = {}
    reason = ""
    for index, current in enumerate(STAGES):
        assert r.aggregator.stage is current
        replies = r.start() if index == 0 else r.respond(outgoing)  # type: ignore[arg-type]
        for u, message in replies.items():
            if u != offender or current is not stage:
                r.aggregator.receive(message)
                continue
            sent = tamper(r, message)
            for extra in sent[:-1]:
                r.aggregator.receive(extra)
            with pytest.raises(RemoteProtocolError) as raised:
                r.aggregator.receive(sent[-1])
            assert raised.value.offender == offender
            reason = raised.value.reason
            assert offender not in r.aggregator.pending()
        outgoing = r.aggregator.close_stage()  # type: ignore[assignment]
        if current is stage:
            assert offender in r.aggregator.dropped[stage]
            assert offender not in outgoing
    assert r.aggregator.state is AggregatorState.DONE
    result = r.aggregator.result
    assert result is not None
    survivors = [u for u in r.peers if u != offender or stage is Stage.CONSISTENCY]
    if stage is Stage.UNMASK:
        survivors = list(r.peers)  # its input was in; only its shares were refused
    assert list(result.survivors) == survivors
    assert np.array_equal(result.aggregate, r.expected_sum(survivors))
    verified = verify_transcript(r.aggregator.transcript(), r.config, r.verifiers)
    assert np.array_equal(verified.aggregate, result.aggregate)
    return reason


def _flip(signature: bytes) -> bytes:
    return bytes([signature[0] ^ 1]) + signature[1:]


def _advert_of(r: Round, peer: str) -> AdvertiseKeys:
    advert = r.aggregator._received[peer]  # what the aggregator already holds
    assert isinstance(advert, AdvertiseKeys)
    return advert


def _bad_advert_signature(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, AdvertiseKeys)
    return [replace(m, signature=_flip(m.signature))]


def _small_order_key(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, AdvertiseKeys)
    return [resign(r, replace(m, channel_public=bytes(32)))]


def _copied_key_bit_255(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    """A's key with bit 255 set: other bytes, the same X25519 key."""
    assert isinstance(m, AdvertiseKeys)
    copy = bytearray(_advert_of(r, A).mask_public)
    copy[31] |= 0x80
    return [resign(r, replace(m, mask_public=bytes(copy)))]


def _copied_key(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, AdvertiseKeys)
    return [resign(r, replace(m, mask_public=_advert_of(r, A).mask_public))]


def _advert_wrong_round(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    return [replace(m, round=1)]


def _advert_wrong_session(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    return [replace(m, session_id="other")]


def _shares_missing_recipient(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, ShareKeys)
    return [replace(m, ciphertexts=m.ciphertexts[1:], signatures=m.signatures[1:])]


def _shares_twice_to_one(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, ShareKeys)
    return [
        replace(
            m,
            ciphertexts=(*m.ciphertexts, m.ciphertexts[0]),
            signatures=(*m.signatures, m.signatures[0]),
        )
    ]


def _shares_unsigned(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    """A sender whose share signature does not verify is excluded by the aggregator, so that
    its recipients do not blame the relay for it."""
    assert isinstance(m, ShareKeys)
    return [replace(m, signatures=(bytes(64), *m.signatures[1:]))]


def _short_vector(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, MaskedInput)
    return [resign(r, replace(m, vector=m.vector[:-1].copy()))]


def _long_vector(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, MaskedInput)
    return [resign(r, replace(m, vector=np.concatenate([m.vector, m.vector[:1]])))]


def _wrong_dtype(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, MaskedInput)
    return [resign(r, replace(m, vector=m.vector.astype(np.uint64)))]


def _altered_vector(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, MaskedInput)
    vector = m.vector.copy()
    vector[0] += 1
    return [replace(m, vector=vector)]


def _wrong_masked_with(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, MaskedInput)
    return [resign(r, replace(m, masked_with=m.masked_with[1:]))]


def _duplicate_masked(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, MaskedInput)
    vector = m.vector.copy()
    vector[0] += 1
    return [m, resign(r, replace(m, vector=vector))]


def _masked_wrong_round(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    return [replace(m, round=7)]


def _consistency_other_set(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, ConsistencySignature)
    payload = consistency_payload(r.config.digest, (A, B, C))
    return [replace(m, signature=r.signers[B].sign(payload))]


def _consistency_twice(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    return [m, m]


def _unmask_bad_signature(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, UnmaskShares)
    return [replace(m, signature=_flip(m.signature))]


def _unmask_missing_owner(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, UnmaskShares)
    return [resign(r, replace(m, self_mask_shares=m.self_mask_shares[1:]))]


def _unmask_both_shares(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, UnmaskShares)
    owner, share = m.self_mask_shares[0]
    return [resign(r, replace(m, mask_key_shares=(*m.mask_key_shares, (owner, share))))]


def _unmask_share_outside_field(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    assert isinstance(m, UnmaskShares)
    (owner, _), *rest = m.self_mask_shares
    return [resign(r, replace(m, self_mask_shares=((owner, encode_share(PRIME)), *rest)))]


def _wrong_type(r: Round, m: ParticipantMessage) -> list[ParticipantMessage]:
    """A message of the previous stage (late or replayed)."""
    return [ConsistencySignature(B, r.config.session_id, 0, b"x" * 64)]


CASES: list[tuple[Stage, Tamper, str]] = [
    (Stage.ADVERTISE, _bad_advert_signature, "invalid signature on its advert"),
    (Stage.ADVERTISE, _small_order_key, "small-order"),
    (Stage.ADVERTISE, _copied_key, "already in use"),
    (Stage.ADVERTISE, _copied_key_bit_255, "non-canonical"),
    (Stage.ADVERTISE, _advert_wrong_round, "replayed or misrouted"),
    (Stage.ADVERTISE, _advert_wrong_session, "replayed or misrouted"),
    (Stage.ADVERTISE, _wrong_type, "sent ConsistencySignature at stage advertise"),
    (Stage.SHARE, _shares_missing_recipient, "not addressed to its neighbourhood"),
    (Stage.SHARE, _shares_twice_to_one, "not addressed to its neighbourhood"),
    (Stage.SHARE, _shares_unsigned, "invalid signature on its shares"),
    (Stage.MASKED, _short_vector, "masked vector has shape"),
    (Stage.MASKED, _long_vector, "masked vector has shape"),
    (Stage.MASKED, _wrong_dtype, "dtype uint64"),
    (Stage.MASKED, _altered_vector, "invalid signature on its masked input"),
    (Stage.MASKED, _wrong_masked_with, "masked with peers other than"),
    (Stage.MASKED, _duplicate_masked, "sent two messages"),
    (Stage.MASKED, _masked_wrong_round, "replayed or misrouted"),
    (Stage.CONSISTENCY, _consistency_other_set, "invalid signature on its consistency"),
    (Stage.CONSISTENCY, _consistency_twice, "sent two messages"),
    (Stage.UNMASK, _unmask_bad_signature, "invalid signature on its shares"),
    (Stage.UNMASK, _unmask_missing_owner, "self-mask shares of the wrong peers"),
    (Stage.UNMASK, _unmask_both_shares, "mask-key shares of the wrong peers"),
    (Stage.UNMASK, _unmask_share_outside_field, "malformed share"),
]


@pytest.mark.parametrize(
    ("stage", "tamper", "match"), CASES, ids=[f"{s.value}-{t.__name__[1:]}" for s, t, _ in CASES]
)
def test_malicious_participant_is_named_excluded_and_round_completes(
    stage: Stage, tamper: Tamper, match: str
) -> None:
    assert match in run_with(make_round(), stage, tamper)


def test_unknown_sender_is_refused() -> None:
    r = make_round()
    advert = r.start()[A]
    with pytest.raises(RemoteProtocolError) as raised:
        r.aggregator.receive(replace(advert, sender="mallory"))
    assert raised.value.offender == "mallory"


def test_excluded_participant_stays_excluded() -> None:
    r = make_round()
    adverts = r.start()
    bad = adverts[B]
    assert isinstance(bad, AdvertiseKeys)
    with pytest.raises(RemoteProtocolError):
        r.aggregator.receive(replace(bad, signature=_flip(bad.signature)))
    with pytest.raises(RemoteProtocolError, match="not expected"):
        r.aggregator.receive(bad)  # the genuine one, too late: B is out of this round


def test_too_many_malicious_participants_abort_the_round() -> None:
    r = make_round(4)  # t = 3
    outgoing = r.advance(2)
    replies = r.respond(outgoing)
    for u in (A, B):
        message = replies.pop(u)
        assert isinstance(message, MaskedInput)
        with pytest.raises(RemoteProtocolError):
            r.aggregator.receive(replace(message, signature=_flip(message.signature)))
    for message in replies.values():
        r.aggregator.receive(message)
    with pytest.raises(RoundAborted, match="peers can continue after stage masked"):
        r.aggregator.close_stage()
    assert r.aggregator.state is AggregatorState.ABORTED
    assert r.aggregator.abort_reason is not None
    assert r.aggregator.pending() == frozenset()
    with pytest.raises(LocalProtocolError):
        r.aggregator.receive(next(iter(replies.values())))
    with pytest.raises(LocalProtocolError):
        r.aggregator.close_stage()
    with pytest.raises(LocalProtocolError):
        r.aggregator.transcript()


def test_done_aggregator_refuses_everything() -> None:
    r = make_round()
    r.advance(len(Stage))
    assert r.aggregator.state is AggregatorState.DONE
    with pytest.raises(LocalProtocolError):
        r.aggregator.close_stage()
    with pytest.raises(LocalProtocolError):
        r.aggregator.receive(ConsistencySignature(A, r.config.session_id, 0, b""))


# ------------------------------------------------------------------------------ state table


def bank() -> dict[Stage, ParticipantMessage]:
    """B's message at every stage of an honest round (identical in every seeded rerun)."""
    r = make_round()
    sent: dict[Stage, ParticipantMessage] = {}
    outgoing: dict[str, object] = {}
    for index, stage in enumerate(STAGES):
        replies = r.start() if index == 0 else r.respond(outgoing)  # type: ignore[arg-type]
        sent[stage] = replies[B]
        outgoing = r.collect(replies)  # type: ignore[assignment]
    return sent


@pytest.fixture(scope="module")
def honest_bank() -> dict[Stage, ParticipantMessage]:
    return bank()


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
@pytest.mark.parametrize("kind", STAGES, ids=[f"{s.value}-message" for s in STAGES])
def test_stage_accepts_only_its_message_type(
    stage: Stage, kind: Stage, honest_bank: dict[Stage, ParticipantMessage]
) -> None:
    r = make_round()
    outgoing = r.advance(STAGES.index(stage)) if stage is not Stage.ADVERTISE else {}
    assert r.aggregator.stage is stage
    message = honest_bank[kind]
    if kind is stage:
        r.aggregator.receive(message)
        assert B not in r.aggregator.pending()
        return
    with pytest.raises(RemoteProtocolError, match="late or replayed") as raised:
        r.aggregator.receive(message)
    assert raised.value.offender == B
    assert r.aggregator.state is AggregatorState.RUNNING
    # B is out; the others finish the round without it.
    replies = r.start() if stage is Stage.ADVERTISE else r.respond(outgoing)
    replies.pop(B, None)
    for reply in replies.values():
        r.aggregator.receive(reply)
    assert r.aggregator.pending() == frozenset()
    assert B not in r.aggregator.close_stage()
    assert B in r.aggregator.dropped[stage]


def test_viability_pruning_is_reported_as_dropped() -> None:
    """SecAgg+ (k = 2, t = 2): when both neighbours of A drop, A is left out and reported."""
    r = make_round(8, graph=GraphKind.SECAGG_PLUS, degree=2)
    a_neighbours = sorted(r.config.neighbourhood(A) - {A})
    r.advance(len(Stage), drop={0: a_neighbours})
    result = r.aggregator.result
    assert result is not None
    assert A not in result.survivors
    dropped = {u for stage in result.dropped.values() for u in stage}
    assert A in dropped
    assert set(result.survivors) | dropped == set(r.peers)
    assert np.array_equal(result.aggregate, r.expected_sum(result.survivors))
