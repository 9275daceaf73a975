"""The aggregator's published transcript, and its independent verification by every peer.

The transcript holds only what the aggregator legitimately saw: signed adverts, signed masked
inputs, consistency signatures and the signed shares revealed for unmasking. From it any
peer recomputes the aggregate and checks every signature, so the aggregator is trusted for
nothing: a wrong sum, a forged or substituted advert, a missing consistency signature, an
altered masked input or a forged share is detected, and the round is not agreed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .config import RoundConfig
from .crypto import Verifier, is_valid_x25519_public
from .errors import RemoteProtocolError, RoundAborted
from .masking import reconstruct_secrets, unmask_sum
from .messages import (
    AdvertiseKeys,
    ConsistencySignature,
    MaskedInput,
    UnmaskShares,
    consistency_payload,
    vector_digest,
)
from .ring import WordArray, word_dtype
from .shamir import ShareError

__all__ = ["Transcript", "TranscriptError", "VerifiedAggregate", "verify_transcript"]


class TranscriptError(RemoteProtocolError):
    """The published transcript does not support the claimed aggregate."""


@dataclass(frozen=True, slots=True, eq=False)
class Transcript:
    session_id: str
    round: int
    aggregator: str
    adverts: tuple[AdvertiseKeys, ...]
    masked_inputs: tuple[MaskedInput, ...]
    consistency: tuple[ConsistencySignature, ...]
    unmask: tuple[UnmaskShares, ...]
    aggregate: WordArray

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(m.sender for m in self.masked_inputs)


@dataclass(frozen=True, slots=True, eq=False)
class VerifiedAggregate:
    aggregate: WordArray
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]  # advertised keys but their input is not in the sum
    misbehaving: tuple[str, ...] = ()  # revealed a wrong share (the sum was rebuilt without it)


_M = TypeVar("_M", AdvertiseKeys, MaskedInput, ConsistencySignature, UnmaskShares)


def _unique_by_sender(
    messages: tuple[_M, ...], what: str, fail: type[TranscriptError], aggregator: str
) -> dict[str, _M]:
    by_sender: dict[str, _M] = {}
    for message in messages:
        if message.sender in by_sender:
            raise fail(aggregator, f"transcript lists two {what} of {message.sender}")
        by_sender[message.sender] = message
    return by_sender


def verify_transcript(
    transcript: Transcript,
    config: RoundConfig,
    verifiers: Mapping[str, Verifier],
    *,
    own: MaskedInput | None = None,
    signed: ConsistencySignature | None = None,
) -> VerifiedAggregate:
    """Recompute the aggregate from ``transcript`` and check every signature.

    Args:
        transcript: as published by the round's aggregator.
        config: this peer's own copy of the round's parameters.
        verifiers: every roster peer's signature verifier.
        own: this peer's own masked input, if it sent one: it must appear unaltered.
        signed: this peer's own consistency signature, if it sent one: the published
            survivor set must be the one it signed (anything else is a second view).

    Returns:
        The verified aggregate, survivors and dropped peers.

    Raises:
        TranscriptError: naming the aggregator and exactly what is wrong.
    """
    agg = transcript.aggregator

    def fail(reason: str) -> TranscriptError:
        return TranscriptError(agg, reason)

    if (transcript.session_id, transcript.round) != (config.session_id, config.round):
        raise fail(f"transcript is for session {transcript.session_id!r} round {transcript.round}")
    digest = config.digest

    adverts = _unique_by_sender(transcript.adverts, "adverts", TranscriptError, agg)
    seen_keys: set[bytes] = set()
    for u, advert in adverts.items():
        if not config.is_member(u) or u not in verifiers:
            raise fail(f"advert of {u!r}, who is not in the roster")
        if not verifiers[u].verify(advert.signature, advert.signed_payload(digest)):
            raise fail(f"advert of {u} has an invalid signature (forged or substituted keys)")
        for key in (advert.channel_public, advert.mask_public):
            if not is_valid_x25519_public(key):
                raise fail(f"advert of {u} has a small-order or non-canonical public key")
            if key in seen_keys:
                raise fail(f"advert of {u} reuses another advert's public key")
            seen_keys.add(key)

    masked = _unique_by_sender(transcript.masked_inputs, "masked inputs", TranscriptError, agg)
    survivors = frozenset(masked)
    expected_dtype = word_dtype(config.bits)
    for u, message in masked.items():
        if u not in adverts:
            raise fail(f"masked input of {u}, who advertised no keys")
        if (
            message.vector.shape != (config.vector_length,)
            or message.vector.dtype != expected_dtype
        ):
            raise fail(f"masked input of {u} has the wrong shape or type")
        if not set(message.masked_with) <= (config.neighbourhood(u) & set(adverts)) - {u}:
            raise fail(f"masked input of {u} claims masks with peers outside its neighbourhood")
        if not verifiers[u].verify(message.signature, message.signed_payload(digest)):
            raise fail(f"masked input of {u} has an invalid signature (altered)")
    if len(survivors) < config.threshold:
        raise fail(f"only {len(survivors)} survivors, threshold is {config.threshold}")
    if own is not None:
        # A transcript without my input would be the "stealth" two-view attack: my input
        # unmasked in a view in which I am not a survivor. It is never a valid outcome: I
        # sent my input, so I am in the one survivor set that was unmasked or none was.
        if own.sender not in masked:
            raise fail(f"my masked input ({own.sender}) is missing from the transcript")
        if vector_digest(masked[own.sender].vector) != vector_digest(own.vector):
            raise fail("my own masked input was altered in the transcript")
    # Every survivor's masks with other survivors must protect it (participant.py reveals
    # self-mask shares only then): a transcript that unmasks a less protected survivor was
    # not produced by honest share holders.
    needed = config.threshold - 1
    for u, message in masked.items():
        partners = len(set(message.masked_with) & survivors)
        if partners < needed:
            raise fail(f"survivor {u} masked with only {partners} other survivors, {needed} needed")
    for u, message in masked.items():
        for w in message.masked_with:
            if w in masked and u not in masked[w].masked_with:
                raise fail(f"{u} masked with {w} but not the reverse: the masks cannot cancel")

    payload = consistency_payload(digest, tuple(sorted(survivors)))
    if signed is not None and not (
        signed.sender in verifiers and verifiers[signed.sender].verify(signed.signature, payload)
    ):
        raise fail(
            f"the published survivor set is not the one {signed.sender} signed "
            "(the aggregator showed different survivor sets)"
        )
    signatures = _unique_by_sender(
        transcript.consistency, "consistency signatures", TranscriptError, agg
    )
    for u, signature in signatures.items():
        if u not in survivors:
            raise fail(f"consistency signature of {u}, who is not a survivor")
        if not verifiers[u].verify(signature.signature, payload):
            raise fail(f"consistency signature of {u} is not over the published survivor set")
    if len(signatures) < config.quorum:
        raise fail(
            f"only {len(signatures)} consistency signatures over the survivor set, "
            f"{config.quorum} needed"
        )

    responses = _unique_by_sender(transcript.unmask, "unmask responses", TranscriptError, agg)
    for u, response in responses.items():
        if u not in signatures:
            raise fail(f"unmask response of {u}, who did not sign the consistency check")
        if not verifiers[u].verify(response.signature, response.signed_payload(digest)):
            raise fail(f"unmask response of {u} has an invalid signature (forged shares)")
        revealed_both = {o for o, _ in response.self_mask_shares} & {
            o for o, _ in response.mask_key_shares
        }
        if revealed_both:
            raise fail(f"{u} revealed both shares of {sorted(revealed_both)}")

    dropped = frozenset(v for m in masked.values() for v in m.masked_with) - survivors
    misbehaving: set[str] = set()
    try:
        self_seeds, dropped_keys = reconstruct_secrets(  # tolerates one wrong share holder
            config, adverts, survivors, dropped, responses, misbehaving
        )
    except (RoundAborted, RemoteProtocolError, ShareError) as error:
        raise fail(f"the revealed shares do not unmask the sum: {error}") from None
    aggregate = unmask_sum(
        config,
        {u: (m.masked_with, m.vector) for u, m in masked.items()},
        {u: a.mask_public for u, a in adverts.items()},
        self_seeds,
        dropped_keys,
    )
    claimed = np.asarray(transcript.aggregate)
    if claimed.shape != aggregate.shape or not np.array_equal(claimed, aggregate):
        wrong = (
            int(np.count_nonzero(claimed != aggregate)) if claimed.shape == aggregate.shape else -1
        )
        raise fail(
            "published aggregate differs from the recomputed one"
            + (f" in {wrong} of {aggregate.size} coordinates" if wrong >= 0 else " (wrong shape)")
        )
    order = config.peers
    return VerifiedAggregate(
        aggregate,
        tuple(u for u in order if u in survivors),
        tuple(u for u in order if u in adverts and u not in survivors),
        tuple(u for u in order if u in misbehaving),
    )
