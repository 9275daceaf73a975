"""The aggregator's published transcript, and its independent verification by every peer.

The transcript holds only what the aggregator legitimately saw: signed adverts, signed masked
inputs, consistency signatures and the signed shares revealed for unmasking. From it any
peer recomputes the aggregate and checks every signature, so the aggregator is trusted for
nothing: a wrong sum, a forged or substituted advert, a missing consistency signature, an
altered masked input or a forged share is detected, and the round is not agreed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .config import RoundConfig
from .crypto import KeyPair, Verifier, is_valid_x25519_public
from .errors import RemoteProtocolError, RoundAborted
from .masking import mask_correction, reconstruct_secrets, self_mask_commitment
from .messages import (
    AdvertiseKeys,
    ConsistencySignature,
    MaskedHeader,
    MaskedInput,
    UnmaskShares,
    consistency_payload,
)
from .ring import WordArray, word_dtype
from .shamir import ShareError

__all__ = [
    "CheckedRound",
    "Transcript",
    "TranscriptError",
    "VerifiedAggregate",
    "check_published",
    "verify_transcript",
]


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


_M = TypeVar("_M", AdvertiseKeys, MaskedHeader, ConsistencySignature, UnmaskShares)


def _unique_by_sender(
    messages: tuple[_M, ...], what: str, fail: type[TranscriptError], aggregator: str
) -> dict[str, _M]:
    by_sender: dict[str, _M] = {}
    for message in messages:
        if message.sender in by_sender:
            raise fail(aggregator, f"transcript lists two {what} of {message.sender}")
        by_sender[message.sender] = message
    return by_sender


@dataclass(frozen=True, slots=True)
class CheckedRound:
    """What the signed, vector-less part of a published round establishes (see
    :func:`check_published`): who survived and the secrets that unmask their sum."""

    adverts: Mapping[str, AdvertiseKeys]
    headers: Mapping[str, MaskedHeader]
    self_seeds: Mapping[str, bytes]
    dropped_keys: Mapping[str, KeyPair]
    misbehaving: frozenset[str]

    @property
    def survivors(self) -> frozenset[str]:
        return frozenset(self.headers)

    def verified(self, config: RoundConfig, aggregate: WordArray) -> VerifiedAggregate:
        order = config.peers
        return VerifiedAggregate(
            aggregate,
            tuple(u for u in order if u in self.headers),
            tuple(u for u in order if u in self.adverts and u not in self.headers),
            tuple(u for u in order if u in self.misbehaving),
        )

    def correction(self, config: RoundConfig) -> WordArray:
        """C with aggregate = Σ_u y_u + C (:func:`secagg.masking.mask_correction`)."""
        return mask_correction(
            config,
            {u: h.masked_with for u, h in self.headers.items()},
            {u: a.mask_public for u, a in self.adverts.items()},
            self.self_seeds,
            self.dropped_keys,
        )


def check_published(
    config: RoundConfig,
    verifiers: Mapping[str, Verifier],
    *,
    session_id: str,
    round_: int,
    aggregator: str,
    adverts: tuple[AdvertiseKeys, ...],
    masked: tuple[MaskedHeader, ...],
    consistency: tuple[ConsistencySignature, ...],
    unmask: tuple[UnmaskShares, ...] = (),
    secrets: RevealedSecrets | None = None,
    own: MaskedHeader | None = None,
    signed: ConsistencySignature | None = None,
    fail: type[TranscriptError] = TranscriptError,
) -> CheckedRound:
    """Check every signature and rule of a published round except the sum itself.

    Shared by the full transcript (:func:`verify_transcript`) and the succinct one
    (:func:`secagg.succinct.verify_succinct`): the survivors are those whose signed masked
    input headers are listed; their vectors are not needed here. The secrets that unmask the
    sum come either as the signed ``unmask`` responses (shares, reconstructed here) or, in
    the succinct statement, as ``secrets`` already reconstructed by the aggregator (each
    checked against its owner's signed advert).

    Raises:
        TranscriptError: naming the aggregator and exactly what is wrong.
    """
    agg = aggregator

    def error(reason: str) -> TranscriptError:
        return fail(agg, reason)

    if (session_id, round_) != (config.session_id, config.round):
        raise error(f"transcript is for session {session_id!r} round {round_}")
    digest = config.digest

    by_sender = _unique_by_sender(adverts, "adverts", fail, agg)
    seen_keys: set[bytes] = set()
    for u, advert in by_sender.items():
        if not config.is_member(u) or u not in verifiers:
            raise error(f"advert of {u!r}, who is not in the roster")
        if not verifiers[u].verify(advert.signature, advert.signed_payload(digest)):
            raise error(f"advert of {u} has an invalid signature (forged or substituted keys)")
        for key in (advert.channel_public, advert.mask_public):
            if not is_valid_x25519_public(key):
                raise error(f"advert of {u} has a small-order or non-canonical public key")
            if key in seen_keys:
                raise error(f"advert of {u} reuses another advert's public key")
            seen_keys.add(key)

    headers = _unique_by_sender(masked, "masked inputs", fail, agg)
    survivors = frozenset(headers)
    for u, header in headers.items():
        if u not in by_sender:
            raise error(f"masked input of {u}, who advertised no keys")
        if not set(header.masked_with) <= (config.neighbourhood(u) & set(by_sender)) - {u}:
            raise error(f"masked input of {u} claims masks with peers outside its neighbourhood")
        if not verifiers[u].verify(header.signature, header.signed_payload(digest)):
            raise error(f"masked input of {u} has an invalid signature (altered)")
    if len(survivors) < config.threshold:
        raise error(f"only {len(survivors)} survivors, threshold is {config.threshold}")
    if own is not None:
        # A transcript without my input would be the "stealth" two-view attack: my input
        # unmasked in a view in which I am not a survivor. It is never a valid outcome: I
        # sent my input, so I am in the one survivor set that was unmasked or none was.
        if own.sender not in headers:
            raise error(f"my masked input ({own.sender}) is missing from the transcript")
        if headers[own.sender].vector_sha256 != own.vector_sha256:
            raise error("my own masked input was altered in the transcript")
    # Every survivor's masks with other survivors must protect it (participant.py reveals
    # self-mask shares only then): a transcript that unmasks a less protected survivor was
    # not produced by honest share holders.
    needed = config.threshold - 1
    for u, header in headers.items():
        partners = len(set(header.masked_with) & survivors)
        if partners < needed:
            raise error(
                f"survivor {u} masked with only {partners} other survivors, {needed} needed"
            )
    for u, header in headers.items():
        for w in header.masked_with:
            if w in headers and u not in headers[w].masked_with:
                raise error(f"{u} masked with {w} but not the reverse: the masks cannot cancel")

    payload = consistency_payload(digest, tuple(sorted(survivors)))
    if signed is not None and not (
        signed.sender in verifiers and verifiers[signed.sender].verify(signed.signature, payload)
    ):
        raise error(
            f"the published survivor set is not the one {signed.sender} signed "
            "(the aggregator showed different survivor sets)"
        )
    signatures = _unique_by_sender(consistency, "consistency signatures", fail, agg)
    for u, signature in signatures.items():
        if u not in survivors:
            raise error(f"consistency signature of {u}, who is not a survivor")
        if not verifiers[u].verify(signature.signature, payload):
            raise error(f"consistency signature of {u} is not over the published survivor set")
    if len(signatures) < config.quorum:
        raise error(
            f"only {len(signatures)} consistency signatures over the survivor set, "
            f"{config.quorum} needed"
        )

    dropped = frozenset(v for h in headers.values() for v in h.masked_with) - survivors
    if secrets is not None:
        self_seeds, dropped_keys = _check_secrets(secrets, by_sender, survivors, dropped, error)
        return CheckedRound(by_sender, headers, self_seeds, dropped_keys, frozenset())
    responses = _unique_by_sender(unmask, "unmask responses", fail, agg)
    for u, response in responses.items():
        if u not in signatures:
            raise error(f"unmask response of {u}, who did not sign the consistency check")
        if not verifiers[u].verify(response.signature, response.signed_payload(digest)):
            raise error(f"unmask response of {u} has an invalid signature (forged shares)")
        revealed_both = {o for o, _ in response.self_mask_shares} & {
            o for o, _ in response.mask_key_shares
        }
        if revealed_both:
            raise error(f"{u} revealed both shares of {sorted(revealed_both)}")

    misbehaving: set[str] = set()
    try:
        self_seeds, dropped_keys = reconstruct_secrets(  # tolerates one wrong share holder
            config, by_sender, survivors, dropped, responses, misbehaving
        )
    except (RoundAborted, RemoteProtocolError, ShareError) as problem:
        raise error(f"the revealed shares do not unmask the sum: {problem}") from None
    return CheckedRound(by_sender, headers, self_seeds, dropped_keys, frozenset(misbehaving))


RevealedSecrets = tuple[tuple[tuple[str, bytes], ...], tuple[tuple[str, bytes], ...]]
"""(survivor, self-mask seed) pairs and (dropped partner, mask private key) pairs."""


def _check_secrets(
    secrets: RevealedSecrets,
    adverts: Mapping[str, AdvertiseKeys],
    survivors: frozenset[str],
    dropped: frozenset[str],
    error: Callable[[str], TranscriptError],
) -> tuple[dict[str, bytes], dict[str, KeyPair]]:
    """The reconstructed secrets, each the one its owner committed to in its signed advert:
    exactly the survivors' self-mask seeds and the dropped partners' mask keys."""
    seeds, keys = dict(secrets[0]), dict(secrets[1])
    if len(seeds) != len(secrets[0]) or set(seeds) != survivors:
        raise error("the statement does not reveal exactly the survivors' self-mask seeds")
    if len(keys) != len(secrets[1]) or set(keys) != dropped:
        raise error("the statement does not reveal exactly the dropped partners' mask keys")
    for u, seed in seeds.items():
        if len(seed) != 32 or self_mask_commitment(seed) != adverts[u].self_mask_commitment:
            raise error(f"the self-mask seed of {u} is not the one {u} committed to")
    pairs: dict[str, KeyPair] = {}
    for v, key in keys.items():
        pair = KeyPair.from_private_bytes(key) if len(key) == 32 else None
        if pair is None or pair.public != adverts[v].mask_public:
            raise error(f"the mask key of {v} is not the one {v} advertised")
        pairs[v] = pair
    return seeds, pairs


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
    expected_dtype = word_dtype(config.bits)
    for message in transcript.masked_inputs:
        if (
            message.vector.shape != (config.vector_length,)
            or message.vector.dtype != expected_dtype
        ):
            raise TranscriptError(
                agg, f"masked input of {message.sender} has the wrong shape or type"
            )
    checked = check_published(
        config,
        verifiers,
        session_id=transcript.session_id,
        round_=transcript.round,
        aggregator=agg,
        adverts=transcript.adverts,
        masked=tuple(m.header() for m in transcript.masked_inputs),
        consistency=transcript.consistency,
        unmask=transcript.unmask,
        own=own.header() if own is not None else None,
        signed=signed,
    )
    aggregate = checked.correction(config)
    for message in transcript.masked_inputs:
        np.add(aggregate, message.vector, out=aggregate)
    claimed = np.asarray(transcript.aggregate)
    if claimed.shape != aggregate.shape or not np.array_equal(claimed, aggregate):
        wrong = (
            int(np.count_nonzero(claimed != aggregate)) if claimed.shape == aggregate.shape else -1
        )
        raise TranscriptError(
            agg,
            "published aggregate differs from the recomputed one"
            + (f" in {wrong} of {aggregate.size} coordinates" if wrong >= 0 else " (wrong shape)"),
        )
    return checked.verified(config, aggregate)
