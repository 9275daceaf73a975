"""The honest participant against a malicious aggregator: every check, one offending message each.

The participants are driven directly; the messages a malicious aggregator would send are built
by hand from the honest ones. Unless said otherwise the round has 5 peers and t = 3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import pytest
from secagg_testlib import AGGREGATOR, Round, make_round

from secagg import (
    AdvertisedKeys,
    AdvertiseKeys,
    AggregatorMessage,
    ConsistencySignature,
    DeterministicRandom,
    GraphKind,
    InvalidSignatureError,
    KeyPair,
    LinearAnswers,
    LocalProtocolError,
    MaskedInput,
    Participant,
    ParticipantState,
    RemoteProtocolError,
    SharesToYou,
    Stage,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    verify_transcript,
)
from secagg.messages import consistency_payload, share_payload

A, B, C, D, E = (f"hospital-{x}" for x in "abcde")
FAILED = ParticipantState.FAILED


def refuse(
    r: Round,
    peer: str,
    message: AggregatorMessage,
    match: str,
    error: type[RemoteProtocolError] = RemoteProtocolError,
    offender: str = AGGREGATOR,
) -> None:
    """``peer`` refuses ``message``, names ``offender``, is FAILED and refuses anything else."""
    participant = r.participants[peer]
    with pytest.raises(error, match=match) as raised:
        participant.receive(message)
    assert raised.value.offender == offender
    assert participant.state is FAILED
    with pytest.raises(LocalProtocolError):
        participant.receive(message)
    assert participant.state is FAILED


def adverts_for(r: Round, peer: str = A) -> AdvertisedKeys:
    message = r.advance(1)[peer]
    assert isinstance(message, AdvertisedKeys)
    return message


def with_adverts(message: AdvertisedKeys, adverts: list[AdvertiseKeys]) -> AdvertisedKeys:
    return replace(message, adverts=tuple(adverts))


def advert_of(message: AdvertisedKeys, peer: str) -> AdvertiseKeys:
    return next(a for a in message.adverts if a.sender == peer)


def swap(message: AdvertisedKeys, peer: str, new: AdvertiseKeys) -> AdvertisedKeys:
    return with_adverts(message, [new if a.sender == peer else a for a in message.adverts])


# ------------------------------------------------------------------------------ honest


@pytest.mark.parametrize(
    ("graph", "degree", "n"), [(GraphKind.COMPLETE, None, 5), (GraphKind.SECAGG_PLUS, 4, 9)]
)
def test_honest_round_driven_by_hand(graph: GraphKind, degree: int | None, n: int) -> None:
    r = make_round(n, graph=graph, degree=degree)
    assert r.advance(len(Stage)) == {}
    result = r.aggregator.result
    assert result is not None
    assert result.survivors == r.peers
    assert np.array_equal(result.aggregate, r.expected_sum(r.peers))
    assert all(p.state is ParticipantState.DONE for p in r.participants.values())
    verified = verify_transcript(r.aggregator.transcript(), r.config, r.verifiers)
    assert np.array_equal(verified.aggregate, result.aggregate)


# ------------------------------------------------------------------------------ adverts


def test_every_advert_signature_is_verified() -> None:
    for target in (B, C, D, E):
        r = make_round()
        message = adverts_for(r)
        bad = advert_of(message, target)
        flipped = bytes([bad.signature[0] ^ 1]) + bad.signature[1:]
        refuse(
            r,
            A,
            swap(message, target, replace(bad, signature=flipped)),
            f"advert of {target} whose signature is invalid",
            InvalidSignatureError,
        )


@pytest.mark.parametrize("field", ["channel_public", "mask_public", "self_mask_commitment"])
def test_substituted_public_key_is_refused(field: str) -> None:
    """The aggregator swaps B's key for its own but cannot re-sign as B."""
    r = make_round()
    message = adverts_for(r)
    attacker = KeyPair.generate(DeterministicRandom("attacker")).public
    changes: dict[str, Any] = {field: attacker}
    substituted = replace(advert_of(message, B), **changes)
    refuse(r, A, swap(message, B, substituted), "signature is invalid", InvalidSignatureError)


def test_advert_signed_by_another_peer_is_refused() -> None:
    r = make_round()
    message = adverts_for(r)
    forged = replace(advert_of(message, B), sender=B)
    forged = replace(forged, signature=r.signers[C].sign(forged.signed_payload(r.config.digest)))
    refuse(r, A, swap(message, B, forged), "signature is invalid", InvalidSignatureError)


def test_fewer_than_t_adverts_is_refused() -> None:
    r = make_round()
    message = adverts_for(r)
    kept = [a for a in message.adverts if a.sender in (A, B)]
    refuse(r, A, with_adverts(message, kept), "only 2 of my neighbourhood at advertise")


def test_exactly_t_adverts_is_accepted() -> None:
    r = make_round()
    message = adverts_for(r)
    kept = [a for a in message.adverts if a.sender in (A, B, C)]
    reply = r.participants[A].receive(with_adverts(message, kept))
    assert sorted(v for v, _ in reply.ciphertexts) == [A, B, C]  # type: ignore[union-attr]


@pytest.mark.parametrize("field", ["channel_public", "mask_public"])
def test_reused_public_key_is_refused(field: str) -> None:
    """B (authentic, but malicious) advertises C's key as its own and signs it."""
    r = make_round()
    message = adverts_for(r)
    changes: dict[str, Any] = {field: getattr(advert_of(message, C), field)}
    copied = replace(advert_of(message, B), **changes)
    refuse(r, A, swap(message, B, r.sign_as(B, copied)), "reuses a public key")


def test_same_key_for_channel_and_mask_is_refused() -> None:
    r = make_round()
    message = adverts_for(r)
    b = advert_of(message, B)
    refuse(
        r,
        A,
        swap(message, B, r.sign_as(B, replace(b, mask_public=b.channel_public))),
        "reuses a public key",
    )


def test_small_order_public_key_is_refused() -> None:
    """An all-zero X25519 key would make every exchange with it fail (or be predictable)."""
    r = make_round()
    message = adverts_for(r)
    b = advert_of(message, B)
    refuse(
        r,
        A,
        swap(message, B, r.sign_as(B, replace(b, mask_public=bytes(32)))),
        "small-order key",
    )


def test_own_advert_missing_is_refused() -> None:
    r = make_round()
    message = adverts_for(r)
    others = [a for a in message.adverts if a.sender != A]
    refuse(r, A, with_adverts(message, others), "my own advert was not echoed")


def test_own_advert_replaced_by_another_signed_one_is_refused() -> None:
    """Even a valid advert of A (from an earlier start of A) is not A's key of *this* object."""
    r = make_round()
    message = adverts_for(r)
    twin = Participant(
        r.config, A, r.signers[A], r.verifiers, r.inputs[A], DeterministicRandom("twin")
    ).start()
    refuse(r, A, swap(message, A, twin), "my own advert was not echoed")


def test_duplicate_advert_is_refused() -> None:
    r = make_round()
    message = adverts_for(r)
    refuse(r, A, with_adverts(message, [*message.adverts, advert_of(message, B)]), "two adverts of")


def test_advert_from_outside_the_neighbourhood_is_refused() -> None:
    r = make_round(8, graph=GraphKind.SECAGG_PLUS, degree=2)
    hood = r.config.neighbourhood(A)
    stranger = next(u for u in r.peers if u not in hood)
    outgoing = r.advance(1)
    message = outgoing[A]
    assert isinstance(message, AdvertisedKeys)
    theirs = outgoing[stranger]
    assert isinstance(theirs, AdvertisedKeys)
    extra = advert_of(theirs, stranger)
    refuse(r, A, with_adverts(message, [*message.adverts, extra]), "not in my neighbourhood")


def test_replayed_advertised_keys_message_is_refused() -> None:
    r = make_round(round_=1)
    message = adverts_for(r)
    refuse(r, A, replace(message, round=0), "replayed or misrouted")
    r = make_round(round_=1)
    message = adverts_for(r)
    refuse(r, A, replace(message, session_id="another-session"), "replayed or misrouted")


def test_adverts_replayed_from_the_previous_round_are_refused() -> None:
    """Adverts B..E really signed in round 0, relayed in round 1 (their round field intact)."""
    old = adverts_for(make_round(round_=0))
    r = make_round(round_=1)
    message = adverts_for(r)
    stale = [a if a.sender == A else advert_of(old, a.sender) for a in message.adverts]
    refuse(r, A, with_adverts(message, stale), "from another round")


def test_previous_round_advert_relabelled_as_this_round_is_refused() -> None:
    """The round field is rewritten, but the signature binds the round's digest."""
    old = adverts_for(make_round(round_=0))
    r = make_round(round_=1)
    message = adverts_for(r)
    relabelled = replace(advert_of(old, B), round=1)
    refuse(r, A, swap(message, B, relabelled), "signature is invalid", InvalidSignatureError)


# ------------------------------------------------------------------------------ shares


def shares_for(r: Round, peer: str = A, **kwargs: object) -> SharesToYou:
    message = r.advance(2, **kwargs)[peer]  # type: ignore[arg-type]
    assert isinstance(message, SharesToYou)
    return message


def relay(message: SharesToYou, pairs: tuple[tuple[str, bytes], ...]) -> SharesToYou:
    """``message`` with other (sender, ciphertext) pairs, each with its sender's original
    signature (64 zero bytes for a sender that sent none)."""
    signature = dict(zip((u for u, _ in message.ciphertexts), message.signatures, strict=True))
    return replace(
        message, ciphertexts=pairs, signatures=tuple(signature.get(u, bytes(64)) for u, _ in pairs)
    )


def test_fewer_than_t_share_senders_is_refused() -> None:
    r = make_round()
    message = shares_for(r)
    kept = tuple((u, c) for u, c in message.ciphertexts if u in (A, B))
    refuse(r, A, relay(message, kept), "only 2 of my neighbourhood at share")


def test_shares_addressed_to_another_peer_are_refused() -> None:
    r = make_round()
    refuse(r, A, replace(shares_for(r), recipient=B), "addressed to 'hospital-b'")


def test_shares_from_a_peer_without_advert_are_refused() -> None:
    r = make_round()
    message = shares_for(r, drop={0: [E]})
    assert E not in {u for u, _ in message.ciphertexts}
    extra = (*message.ciphertexts, (E, bytes(94)))
    refuse(r, A, relay(message, extra), "did not advertise")


def test_two_ciphertexts_from_one_sender_are_refused() -> None:
    r = make_round()
    message = shares_for(r)
    extra = (*message.ciphertexts, message.ciphertexts[1])
    refuse(r, A, relay(message, extra), "two share ciphertexts")


def test_share_signature_of_the_wrong_type_is_a_malformed_message() -> None:
    """Found by tests/fuzz/test_fuzz_secagg.py: a non-bytes share signature reached the
    Ed25519 verifier, which raised TypeError (a crash, not a refusal). The message now
    refuses it when built, as the codec refuses any malformed field."""
    r = make_round()
    message = shares_for(r)
    odd: tuple[Any, ...] = (A, *message.signatures[1:])
    with pytest.raises(ValueError, match="share signatures must be bytes"):
        replace(message, signatures=odd)


def test_ciphertext_tampered_on_the_way_is_blamed_on_the_aggregator() -> None:
    """C signed its ciphertext; the relay altered it. Before share ciphertexts were signed,
    the honest C was blamed ("do not decrypt", offender C)."""
    r = make_round()
    message = shares_for(r)
    tampered = tuple(
        (u, c[:-1] + bytes([c[-1] ^ 1]) if u == C else c) for u, c in message.ciphertexts
    )
    refuse(r, A, relay(message, tampered), "C did not sign|did not sign", InvalidSignatureError)


def test_ciphertext_its_sender_signed_but_that_does_not_decrypt_blames_the_sender() -> None:
    """A malicious C signs garbage: its own signature proves it sent it."""
    r = make_round()
    message = shares_for(r)
    garbage = bytes(94)
    signed = r.signers[C].sign(share_payload(r.config.digest, C, A, garbage))
    pairs = tuple((u, garbage if u == C else c) for u, c in message.ciphertexts)
    forged = relay(message, pairs)
    forged = replace(
        forged,
        signatures=tuple(
            signed if u == C else sig for (u, _), sig in zip(pairs, forged.signatures, strict=True)
        ),
    )
    refuse(r, A, forged, "do not decrypt", offender=C)


def test_ciphertext_moved_between_senders_is_blamed_on_the_aggregator() -> None:
    """B's ciphertext relabelled as C's: C's signature does not cover it (nor does B's
    signature, which names B as the sender)."""
    r = make_round()
    message = shares_for(r)
    of_b = dict(message.ciphertexts)[B]
    moved = tuple((u, of_b if u == C else c) for u, c in message.ciphertexts)
    refuse(r, A, relay(message, moved), "did not sign", InvalidSignatureError)


def test_own_shares_must_come_back() -> None:
    r = make_round()
    message = shares_for(r)
    others = tuple((u, c) for u, c in message.ciphertexts if u != A)
    refuse(r, A, relay(message, others), "my own shares")


# ------------------------------------------------------------------------------ survivor set


def survivors_for(r: Round, peer: str = A) -> SurvivorSet:
    message = r.advance(3)[peer]
    assert isinstance(message, SurvivorSet)
    return message


@pytest.mark.parametrize(
    ("survivors", "match"),
    [
        ((A, B, C, C), "lists a peer twice"),
        ((A, B, C, "mallory"), "outside the roster"),
        ((B, C, D), "I am not in the survivor set"),
        ((A, B), "only 2 of my neighbourhood at masked"),
    ],
    ids=["duplicate", "stranger", "without-me", "below-t"],
)
def test_bad_survivor_set_is_refused(survivors: tuple[str, ...], match: str) -> None:
    r = make_round()
    refuse(r, A, replace(survivors_for(r), survivors=survivors), match)


def test_survivor_who_never_shared_with_me_is_refused() -> None:
    """U3 ⊆ U2: E's shares were withheld from A, then E is listed as a survivor."""
    r = make_round()
    message = shares_for(r)
    withheld = tuple((u, c) for u, c in message.ciphertexts if u != E)
    masked = r.participants[A].receive(relay(message, withheld))
    assert isinstance(masked, MaskedInput)
    assert E not in masked.masked_with
    refuse(r, A, SurvivorSet(r.config.session_id, 0, (A, B, C, D, E)), "U3 ⊄ U2")


def test_replayed_survivor_set_is_refused() -> None:
    r = make_round(round_=2)
    refuse(r, A, replace(survivors_for(r), round=1), "replayed or misrouted")


# ------------------------------------------------------------------------------ unmasking


def unmask_round() -> tuple[Round, UnmaskRequest]:
    """D dropped at advertise, E after sharing (at masked): survivors A, B, C; E is dropped."""
    r = make_round()
    message = r.advance(4, drop={0: [D], 2: [E]})[A]
    assert isinstance(message, UnmaskRequest)
    assert message.survivors == (A, B, C)
    assert message.dropped == (E,)
    return r, message


def test_honest_unmask_request_is_answered() -> None:
    r, message = unmask_round()
    assert r.participants[A].signed_survivors == (A, B, C)  # what its transcript must show
    reply = r.participants[A].receive(message)
    assert isinstance(reply, UnmaskShares)
    assert [u for u, _ in reply.self_mask_shares] == [A, B, C]
    assert [u for u, _ in reply.mask_key_shares] == [E]


@pytest.mark.parametrize("both", [B, A, C], ids=["other", "myself", "last"])
def test_survivor_listed_as_dropped_is_refused_and_nothing_revealed(both: str) -> None:
    r, message = unmask_round()
    request = replace(message, dropped=(*message.dropped, both))
    participant = r.participants[A]
    with pytest.raises(RemoteProtocolError, match="both the self-mask and the mask-key") as err:
        participant.receive(request)
    assert err.value.offender == AGGREGATOR
    assert participant.state is FAILED
    # Having refused, it will not answer even the honest request: nothing is ever revealed.
    with pytest.raises(LocalProtocolError):
        participant.receive(message)
    assert participant.state is FAILED


def test_unmask_request_for_another_survivor_set_is_refused() -> None:
    r, message = unmask_round()
    refuse(r, A, replace(message, survivors=(A, B)), "other than the one I signed")


def test_mask_key_of_a_peer_that_did_not_drop_after_sharing_is_refused() -> None:
    """D never shared (it dropped at advertise): A holds nothing of D's and must not pretend."""
    r, message = unmask_round()
    refuse(r, A, replace(message, dropped=(E, D)), "did not drop out")


def test_fewer_than_t_consistency_signatures_is_refused() -> None:
    r, message = unmask_round()
    refuse(r, A, replace(message, signatures=message.signatures[:2]), "only 2 consistency")


def test_duplicate_consistency_signature_is_refused() -> None:
    r, message = unmask_round()
    doubled = (*message.signatures[:2], message.signatures[0])
    refuse(r, A, replace(message, signatures=doubled), "is not expected")


def test_consistency_signature_of_a_non_survivor_is_refused() -> None:
    r, message = unmask_round()
    payload = consistency_payload(r.config.digest, (A, B, C))
    from_e = ConsistencySignature(E, r.config.session_id, 0, r.signers[E].sign(payload))
    refuse(r, A, replace(message, signatures=(*message.signatures, from_e)), "is not expected")


@pytest.mark.parametrize("signed", [(A, B), (A, B, C, E)], ids=["subset", "superset"])
def test_consistency_signature_over_another_survivor_set_is_refused(
    signed: tuple[str, ...],
) -> None:
    r, message = unmask_round()
    other = r.signers[B].sign(consistency_payload(r.config.digest, signed))
    signatures = tuple(
        ConsistencySignature(B, s.session_id, s.round, other) if s.sender == B else s
        for s in message.signatures
    )
    refuse(
        r,
        A,
        replace(message, signatures=signatures),
        "does not match my survivor set",
        InvalidSignatureError,
    )


def test_consistency_signature_from_the_previous_round_is_refused() -> None:
    r, message = unmask_round()
    old_digest = make_round(round_=1).config.digest
    replayed = r.signers[B].sign(consistency_payload(old_digest, (A, B, C)))
    signatures = tuple(
        replace(s, signature=replayed) if s.sender == B else s for s in message.signatures
    )
    refuse(r, A, replace(message, signatures=signatures), "does not match", InvalidSignatureError)


def test_split_survivor_sets_are_detected() -> None:
    """The aggregator shows {A,B,C,D} to A and B but {A,B,C,D,E} to C, D and E.

    Whatever consistency signatures it then forwards, A either sees signatures over a set it
    did not sign (refused) or fewer than t over its own set (refused). A reveals nothing.
    """
    r = make_round()
    honest = survivors_for(r)
    assert honest.survivors == (A, B, C, D, E)
    short = replace(honest, survivors=(A, B, C, D))
    signatures: dict[str, ConsistencySignature] = {}
    for peer in r.peers:
        reply = r.participants[peer].receive(short if peer in (A, B) else honest)
        assert isinstance(reply, ConsistencySignature)
        signatures[peer] = reply
    # Signatures of A's four survivors: C's and D's are over the other view.
    everyone = tuple(signatures[u] for u in (A, B, C, D))
    request = UnmaskRequest(r.config.session_id, 0, (A, B, C, D), (), everyone)
    refuse(r, A, request, "does not match my survivor set", InvalidSignatureError)
    own_view_only = (signatures[A], signatures[B])
    request = UnmaskRequest(r.config.session_id, 0, (A, B, C, D), (), own_view_only)
    refuse(r, B, request, "only 2 consistency signatures")


# ------------------------------------------------------------------------------ issue 9


def test_dropped_peer_listed_twice_is_refused() -> None:
    """Two mask-key shares of one owner in one response would be a second share of it."""
    r, message = unmask_round()
    refuse(r, A, replace(message, dropped=(E, E)), "lists a dropped peer twice")


def test_survivor_without_a_masked_input_is_refused() -> None:
    """A survivor whose masked input the request does not carry: A cannot check that its
    masks protect it, so it reveals nothing."""
    r, message = unmask_round()
    headers = tuple(h for h in message.masked if h.sender != B)
    refuse(r, A, replace(message, masked=headers), "survivor hospital-b has no masked input")


def test_masked_input_header_listed_twice_is_refused() -> None:
    r, message = unmask_round()
    refuse(r, A, replace(message, masked=(*message.masked, message.masked[0])), "two masked")


def test_forged_masked_input_header_is_refused() -> None:
    """B's header with a masked_with B never signed: the aggregator forged it."""
    r, message = unmask_round()
    headers = tuple(
        replace(h, masked_with=(*h.masked_with, D)) if h.sender == B else h for h in message.masked
    )
    refuse(r, A, replace(message, masked=headers), "invalid signature", InvalidSignatureError)


def test_survivor_with_too_few_surviving_partners_is_not_unmasked() -> None:
    """The isolation attack in one message: C's input was masked with E only (its U2 cut),
    E is declared dropped: C's self-mask share would strip C's last mask. A refuses."""
    r = make_round()
    outgoing = r.advance(2)
    shares_c = outgoing[C]
    assert isinstance(shares_c, SharesToYou)
    cut = relay(shares_c, tuple((u, ct) for u, ct in shares_c.ciphertexts if u in (C, E, A)))
    replies = {u: r.participants[u].receive(m) for u, m in outgoing.items() if u != C}
    replies[C] = r.participants[C].receive(cut)
    masked_c = replies[C]
    assert isinstance(masked_c, MaskedInput)
    assert set(masked_c.masked_with) == {A, E}
    survivors = (A, B, C, D)  # E "dropped"
    signatures = []
    for u in (A, B, D):
        reply = r.participants[u].receive(SurvivorSet(r.config.session_id, 0, survivors))
        assert isinstance(reply, ConsistencySignature)
        signatures.append(reply)
    headers = tuple(
        m.header() for u, m in replies.items() if u in survivors and isinstance(m, MaskedInput)
    )
    request = UnmaskRequest(r.config.session_id, 0, survivors, (E,), tuple(signatures), headers)
    # C masked with A and E; of them only A survived: 1 partner, t - 1 = 2 needed.
    refuse(r, A, request, "survivor hospital-c masked with only 1 other survivors")


def test_fewer_than_a_quorum_of_signatures_is_refused_even_above_t() -> None:
    """SecAgg+ n = 10, k = 4, t = 3: five valid signatures over my set, quorum 6."""
    r = make_round(10, graph=GraphKind.SECAGG_PLUS, degree=4)
    assert (r.config.threshold, r.config.quorum) == (3, 6)
    outgoing = r.advance(4)
    peer = r.peers[0]
    message = outgoing[peer]
    assert isinstance(message, UnmaskRequest)
    refuse(
        r,
        peer,
        replace(message, signatures=message.signatures[:5]),
        "only 5 consistency signatures over my survivor set, 6 of the 10 roster peers",
    )


def test_copy_of_another_peers_key_with_bit_255_set_is_refused() -> None:
    """X25519 ignores bit 255: byte-wise it differs, as a key it is B's own."""
    r = make_round()
    message = adverts_for(r)
    b = advert_of(message, B)
    c = advert_of(message, C)
    copy = bytearray(b.channel_public)
    copy[31] |= 0x80
    forged = r.sign_as(C, replace(c, channel_public=bytes(copy)))
    refuse(r, A, swap(message, C, forged), "non-canonical or small-order key")


# ------------------------------------------------------------------------------ state table

STATES = list(ParticipantState)
INPUTS = [
    "start",
    "AdvertisedKeys",
    "SharesToYou",
    "SurvivorSet",
    "UnmaskRequest",
    "ProofRequest",
]
LEGAL: dict[tuple[ParticipantState, str], tuple[type, ParticipantState]] = {
    (ParticipantState.NEW, "start"): (AdvertiseKeys, ParticipantState.ADVERTISED),
    (ParticipantState.ADVERTISED, "AdvertisedKeys"): (object, ParticipantState.SHARED),
    (ParticipantState.SHARED, "SharesToYou"): (MaskedInput, ParticipantState.MASKED),
    (ParticipantState.MASKED, "SurvivorSet"): (ConsistencySignature, ParticipantState.SIGNED),
    (ParticipantState.SIGNED, "UnmaskRequest"): (UnmaskShares, ParticipantState.UNMASKED),
    (ParticipantState.UNMASKED, "ProofRequest"): (LinearAnswers, ParticipantState.DONE),
}


def honest_messages(peer: str = A) -> dict[str, AggregatorMessage]:
    """What ``peer`` receives in an honest 4-peer round (identical in every seeded rerun)."""
    r = make_round(4)
    received: dict[str, AggregatorMessage] = {}
    outgoing = r.collect(r.start())
    for _ in range(5):
        received[type(outgoing[peer]).__name__] = outgoing[peer]
        outgoing = r.collect(r.respond(outgoing))
    return received


def participant_in(state: ParticipantState, peer: str = A) -> Participant:
    r = make_round(4)
    if state is ParticipantState.NEW:
        return r.participants[peer]
    steps = {
        ParticipantState.ADVERTISED: 1,
        ParticipantState.SHARED: 2,
        ParticipantState.MASKED: 3,
        ParticipantState.SIGNED: 4,
        ParticipantState.UNMASKED: 5,
        ParticipantState.DONE: 6,
        ParticipantState.FAILED: 1,
    }[state]
    r.advance(steps)
    participant = r.participants[peer]
    if state is ParticipantState.FAILED:
        with pytest.raises(RemoteProtocolError):
            participant.receive(SurvivorSet(r.config.session_id, 0, r.peers))
    assert participant.state is state
    return participant


@pytest.fixture(scope="module")
def messages() -> dict[str, AggregatorMessage]:
    return honest_messages()


def _input(participant: Participant, name: str, messages: dict[str, AggregatorMessage]) -> object:
    if name == "start":
        return participant.start()
    return participant.receive(messages[name])


@pytest.mark.parametrize("state", STATES, ids=[s.value for s in STATES])
@pytest.mark.parametrize("name", INPUTS)
def test_state_table(
    state: ParticipantState, name: str, messages: dict[str, AggregatorMessage]
) -> None:
    participant = participant_in(state)
    legal = LEGAL.get((state, name))
    if legal is not None:
        reply_type, next_state = legal
        assert isinstance(_input(participant, name, messages), reply_type)
        assert participant.state is next_state
        return
    caller_error = name == "start" or state in (ParticipantState.NEW, ParticipantState.FAILED)
    expected = LocalProtocolError if caller_error else RemoteProtocolError
    with pytest.raises(expected) as raised:
        _input(participant, name, messages)
    assert type(raised.value) is expected
    if isinstance(raised.value, RemoteProtocolError):
        assert raised.value.offender == AGGREGATOR
    assert participant.state is FAILED
    # A FAILED participant refuses everything, including what would have been legal.
    refusals: list[Callable[[], object]] = [participant.start]
    refusals += [partial(participant.receive, m) for m in messages.values()]
    for attempt in refusals:
        with pytest.raises(LocalProtocolError):
            attempt()
        assert participant.state is FAILED
