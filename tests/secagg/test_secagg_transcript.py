"""verify_transcript: honest transcripts (with dropouts) pass; every kind of tampering fails."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from secagg_testlib import identities

from secagg import (
    ConsistencySignature,
    GraphKind,
    MaskedInput,
    RoundConfig,
    Stage,
    Transcript,
    TranscriptError,
    UnmaskShares,
    verify_transcript,
)
from secagg.graph import minimum_threshold
from secagg.messages import consistency_payload
from secagg.shamir import PRIME, decode_share, encode_share
from secagg.simulate import AGGREGATOR_ID, SimulationResult, simulate

N = 7


def run(
    n: int = N,
    drops: dict[Stage, int] | None = None,
    graph: GraphKind = GraphKind.COMPLETE,
    degree: int | None = None,
) -> tuple[SimulationResult, Transcript, RoundConfig]:
    result = simulate(n, 5, drops=drops, graph=graph, degree=degree, seed=3)
    assert result.ok, result.aborted
    assert result.transcript is not None
    hood = n if degree is None else min(n, degree + 1)
    config = RoundConfig(
        "simulation", 0, result.peers, minimum_threshold(hood), 5, 32, graph, degree
    )
    return result, result.transcript, config


def reject(
    transcript: Transcript, config: RoundConfig, result: SimulationResult, match: str
) -> None:
    with pytest.raises(TranscriptError, match=match) as raised:
        verify_transcript(transcript, config, identities(result.peers, 3)[1])
    assert raised.value.offender == AGGREGATOR_ID


@pytest.fixture(scope="module")
def honest() -> tuple[SimulationResult, Transcript, RoundConfig]:
    """Complete graph, one peer dropped after sharing: there is a dropped mask key."""
    return run(drops={Stage.MASKED: 1})


# ------------------------------------------------------------------------------ honest

GRAPHS = [(GraphKind.COMPLETE, None, N), (GraphKind.SECAGG_PLUS, 4, 10)]


@pytest.mark.parametrize("stage", list(Stage), ids=[s.value for s in Stage])
@pytest.mark.parametrize(("graph", "degree", "n"), GRAPHS, ids=["complete", "secagg+"])
def test_honest_transcript_with_a_dropout_verifies(
    stage: Stage, graph: GraphKind, degree: int | None, n: int
) -> None:
    result, transcript, config = run(n, {stage: 1}, graph, degree)
    verified = verify_transcript(transcript, config, identities(result.peers, 3)[1])
    assert result.expected is not None
    assert np.array_equal(verified.aggregate, result.expected)
    assert verified.survivors == tuple(result.peers[i] for i in result.survivors)
    if stage in (Stage.MASKED,):
        assert len(verified.dropped) == 1  # advertised, but its input is not in the sum
    if stage in (Stage.CONSISTENCY, Stage.UNMASK):
        assert len(verified.survivors) == n  # dropped after its input was in
    own = next(m for m in transcript.masked_inputs)
    verify_transcript(transcript, config, identities(result.peers, 3)[1], own=own)


# ------------------------------------------------------------------------------ tampering


def test_wrong_sum_is_detected(honest: tuple[SimulationResult, Transcript, RoundConfig]) -> None:
    result, transcript, config = honest
    wrong = transcript.aggregate.copy()
    wrong[-1] += 1
    reject(replace(transcript, aggregate=wrong), config, result, "differs from the recomputed")
    reject(replace(transcript, aggregate=transcript.aggregate[:-1]), config, result, "wrong shape")


@pytest.mark.parametrize("field", ["channel_public", "mask_public", "self_mask_commitment"])
def test_forged_advert_is_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig], field: str
) -> None:
    result, transcript, config = honest
    first, *rest = transcript.adverts
    changes: dict[str, Any] = {field: bytes(range(32, 64))}
    forged = replace(first, **changes)
    reject(replace(transcript, adverts=(forged, *rest)), config, result, "invalid signature")


def test_duplicate_advert_is_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    adverts = (*transcript.adverts, transcript.adverts[0])
    reject(replace(transcript, adverts=adverts), config, result, "two adverts")


def test_missing_consistency_signatures_are_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    assert len(transcript.consistency) >= config.threshold
    fewer = transcript.consistency[: config.threshold - 1]
    # The unmask responses of the removed signers must go too, or they are flagged first.
    signers = {s.sender for s in fewer}
    unmask = tuple(u for u in transcript.unmask if u.sender in signers)
    reject(
        replace(transcript, consistency=fewer, unmask=unmask), config, result, "only 3 consistency"
    )


def test_unmask_response_without_consistency_signature_is_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    consistency = transcript.consistency[1:]
    reject(replace(transcript, consistency=consistency), config, result, "did not sign")


def test_altered_masked_input_is_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    first, *rest = transcript.masked_inputs
    vector = first.vector.copy()
    vector[0] ^= 1
    reject(
        replace(transcript, masked_inputs=(replace(first, vector=vector), *rest)),
        config,
        result,
        "invalid signature",
    )


def test_own_masked_input_must_appear_unaltered(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    mine = transcript.masked_inputs[0]
    vector = mine.vector.copy()
    vector[0] += 1
    with pytest.raises(TranscriptError, match="my own masked input was altered"):
        verify_transcript(
            transcript, config, identities(result.peers, 3)[1], own=replace(mine, vector=vector)
        )


def test_forged_unmask_share_is_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    """A share changed after its holder signed it."""
    result, transcript, config = honest
    first, *rest = transcript.unmask
    owner, share = first.self_mask_shares[0]
    forged_share = encode_share((decode_share(share) + 1) % PRIME)
    forged = replace(first, self_mask_shares=((owner, forged_share), *first.self_mask_shares[1:]))
    reject(replace(transcript, unmask=(forged, *rest)), config, result, "forged shares")


def _resigned(result: SimulationResult, config: RoundConfig, shares: UnmaskShares) -> UnmaskShares:
    signer = identities(result.peers, 3)[0][shares.sender]
    return replace(shares, signature=signer.sign(shares.signed_payload(config.digest)))


def _wrong_share(
    result: SimulationResult,
    config: RoundConfig,
    response: UnmaskShares,
    which: str,
    owner: str | None = None,
) -> UnmaskShares:
    """``response`` with its share of ``owner``'s secret (default: its first share of kind
    ``which``) off by one, validly re-signed."""
    pairs = getattr(response, which)
    assert pairs, which
    target = owner if owner is not None else pairs[0][0]
    bad = tuple(
        (o, encode_share((decode_share(s) + 1) % PRIME) if o == target else s) for o, s in pairs
    )
    changes: dict[str, Any] = {which: bad}
    return _resigned(result, config, replace(response, **changes))


@pytest.mark.parametrize("which", ["self_mask_shares", "mask_key_shares"])
def test_wrong_share_signed_by_its_holder_is_found_and_left_out(
    honest: tuple[SimulationResult, Transcript, RoundConfig], which: str
) -> None:
    """A malicious holder signs a wrong share: the verifier names it, and with more than t
    shares still rebuilds the secret without it, so the sum is right, never silently wrong."""
    result, transcript, config = honest
    first, *rest = transcript.unmask
    forged = _wrong_share(result, config, first, which)
    verified = verify_transcript(
        replace(transcript, unmask=(forged, *rest)), config, identities(result.peers, 3)[1]
    )
    assert verified.misbehaving == (first.sender,)
    assert np.array_equal(verified.aggregate, transcript.aggregate)


@pytest.mark.parametrize("which", ["self_mask_shares", "mask_key_shares"])
def test_two_wrong_holders_of_one_secret_are_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig], which: str
) -> None:
    result, transcript, config = honest
    first, second, *rest = transcript.unmask
    owners = {o for o, _ in getattr(first, which)} & {o for o, _ in getattr(second, which)}
    assert owners, "the two responders share an owner"
    forged = (
        _wrong_share(result, config, first, which),
        _wrong_share(result, config, second, which),
    )
    if {o for o, _ in getattr(first, which)[:1]} != {o for o, _ in getattr(second, which)[:1]}:
        pytest.skip("the first shares of the two responders belong to different owners")
    reject(replace(transcript, unmask=(*forged, *rest)), config, result, "do not unmask the sum")


def test_share_outside_the_field_is_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    first, *rest = transcript.unmask
    owner, _ = first.self_mask_shares[0]
    bad = ((owner, encode_share(PRIME)), *first.self_mask_shares[1:])
    forged = _resigned(result, config, replace(first, self_mask_shares=bad))
    reject(replace(transcript, unmask=(forged, *rest)), config, result, "outside the field")


def test_response_revealing_both_shares_is_flagged(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    first, *rest = transcript.unmask
    both = (*first.mask_key_shares, first.self_mask_shares[0])
    forged = _resigned(result, config, replace(first, mask_key_shares=both))
    reject(replace(transcript, unmask=(forged, *rest)), config, result, "revealed both shares")


def test_dropped_input_smuggled_in_is_detected(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    """Removing a survivor's masked input changes the survivor set nobody signed."""
    result, transcript, config = honest
    reject(
        replace(transcript, masked_inputs=transcript.masked_inputs[1:]),
        config,
        result,
        "consistency signature",
    )


def test_transcript_of_another_round_is_refused(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    reject(replace(transcript, round=1), config, result, "round 1")
    other = replace(config, round=1)
    with pytest.raises(TranscriptError):
        verify_transcript(replace(transcript, round=1), other, identities(result.peers, 3)[1])


def test_masked_input_type_is_checked(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    first, *rest = transcript.masked_inputs
    wrong: MaskedInput = replace(first, vector=first.vector.astype(np.uint64))
    reject(replace(transcript, masked_inputs=(wrong, *rest)), config, result, "wrong shape")


# ------------------------------------------------------------------------------ issue 9


def test_transcript_of_another_attempt_is_refused(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    """The attempt is in the digest every signature covers: attempt 0's transcript does not
    verify as attempt 1 of the same round."""
    result, transcript, config = honest
    retry = RoundConfig(
        config.session_id,
        config.round,
        config.peers,
        config.threshold,
        config.vector_length,
        config.bits,
        config.graph_kind,
        config.degree,
        attempt=1,
    )
    with pytest.raises(TranscriptError, match="invalid signature"):
        verify_transcript(transcript, retry, identities(result.peers, 3)[1])


def test_transcript_without_my_input_is_refused(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    """The stealth two-view attack published a view in which the victim was a late dropout."""
    result, transcript, config = honest
    mine, *rest = transcript.masked_inputs
    without = replace(transcript, masked_inputs=tuple(rest))
    with pytest.raises(TranscriptError, match=r"my masked input .* is missing") as raised:
        verify_transcript(without, config, identities(result.peers, 3)[1], own=mine)
    assert raised.value.offender == AGGREGATOR_ID


def test_transcript_with_another_survivor_set_than_i_signed_is_refused(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    result, transcript, config = honest
    signers, verifiers = identities(result.peers, 3)
    me = transcript.masked_inputs[0].sender
    other_set = tuple(sorted(m.sender for m in transcript.masked_inputs[1:]))
    signed = ConsistencySignature(
        me,
        config.session_id,
        config.round,
        signers[me].sign(consistency_payload(config.digest, other_set)),
    )
    with pytest.raises(TranscriptError, match=r"not the one .* signed") as raised:
        verify_transcript(transcript, config, verifiers, signed=signed)
    assert raised.value.offender == AGGREGATOR_ID
    mine = next(s for s in transcript.consistency if s.sender == me)
    verify_transcript(transcript, config, verifiers, signed=mine)  # the honest one passes


def test_fewer_consistency_signatures_than_the_quorum_are_refused() -> None:
    """SecAgg+ (n = 10, k = 4, t = 3): t signatures are not enough, Q = 6 are needed."""
    result, transcript, config = run(10, None, GraphKind.SECAGG_PLUS, 4)
    assert config.threshold == 3
    assert config.quorum == 6
    kept = transcript.consistency[: config.quorum - 1]
    signers = {s.sender for s in kept}
    unmask = tuple(u for u in transcript.unmask if u.sender in signers)
    reject(
        replace(transcript, consistency=kept, unmask=unmask),
        config,
        result,
        "only 5 consistency signatures over the survivor set, 6 needed",
    )


def test_survivor_with_too_few_surviving_mask_partners_is_refused(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    """A survivor whose signed masked_with leaves fewer than t - 1 other survivors: honest
    holders would not have revealed its self-mask share (the isolation attack)."""
    result, transcript, config = honest
    signers, _ = identities(result.peers, 3)
    first, *rest = transcript.masked_inputs
    few = first.masked_with[: config.threshold - 2]
    lonely = replace(first, masked_with=few)
    lonely = replace(
        lonely, signature=signers[first.sender].sign(lonely.signed_payload(config.digest))
    )
    reject(
        replace(transcript, masked_inputs=(lonely, *rest)),
        config,
        result,
        f"masked with only {len(few)} other survivors",
    )


def test_non_canonical_copy_of_another_key_is_refused(
    honest: tuple[SimulationResult, Transcript, RoundConfig],
) -> None:
    """Bit 255 set: the same X25519 key as another advert's with different bytes."""
    result, transcript, config = honest
    signers, _ = identities(result.peers, 3)
    a, b, *rest = transcript.adverts
    copy = bytearray(a.mask_public)
    copy[31] |= 0x80
    forged = replace(b, mask_public=bytes(copy))
    forged = replace(forged, signature=signers[b.sender].sign(forged.signed_payload(config.digest)))
    reject(replace(transcript, adverts=(a, forged, *rest)), config, result, "non-canonical")
