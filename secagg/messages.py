"""The protocol's messages: frozen, slotted dataclasses, one per (stage, direction).

Participant -> aggregator:  AdvertiseKeys, ShareKeys, MaskedInput, ConsistencySignature,
                            UnmaskShares
Aggregator -> participant:  AdvertisedKeys, SharesToYou, SurvivorSet, UnmaskRequest

Every message carries ``session_id`` and ``round``. Every message a participant signs is
signed over :meth:`signed_payload`, which also binds the round configuration's digest, so
nothing verifies in another session, round or parameter set. Messages validate their own
shape on construction (types and sizes); protocol rules are checked by the state machines.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .crypto import canonical, sha256
from .ring import WordArray, le_view
from .shamir import SHARE_BYTES

__all__ = [
    "AdvertiseKeys",
    "AdvertisedKeys",
    "AggregatorMessage",
    "ConsistencySignature",
    "MaskedHeader",
    "MaskedInput",
    "ParticipantMessage",
    "ShareKeys",
    "SharesToYou",
    "SurvivorSet",
    "UnmaskRequest",
    "UnmaskShares",
    "consistency_payload",
    "masked_payload",
    "message_size",
    "share_payload",
    "vector_digest",
    "vector_hasher",
]

KEY_BYTES = 32


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _require_share_signatures(
    signatures: tuple[bytes, ...], ciphertexts: tuple[tuple[str, bytes], ...]
) -> None:
    # Checked here, like every field the codec decodes, so that a signature of the wrong type
    # is a malformed message and never reaches the verifier (which would raise TypeError).
    _require(len(signatures) == len(ciphertexts), "one signature per share ciphertext")
    _require(all(isinstance(s, bytes) for s in signatures), "share signatures must be bytes")


def vector_hasher() -> hashlib._Hash:
    """A SHA-256 primed for :func:`vector_digest`: feed it the vector's little-endian words
    (in pieces, as they are computed or arrive) and its digest is the vector's digest."""
    return hashlib.sha256(b"secagg/vector/v1")


def vector_digest(vector: WordArray) -> bytes:
    hasher = vector_hasher()
    hasher.update(le_view(vector))
    return hasher.digest()


def consistency_payload(digest: bytes, survivors: tuple[str, ...]) -> bytes:
    """What each peer signs in the consistency check: the survivor set U3 of the round."""
    return canonical("secagg/consistency/v1", digest, tuple(sorted(survivors)))


def share_payload(digest: bytes, sender: str, recipient: str, ciphertext: bytes) -> bytes:
    """What a sender signs for each share ciphertext: who sent what to whom, in which round.

    The aggregator relays the signature with the ciphertext, so a recipient can tell a
    ciphertext its sender made (and blame the sender if it does not decrypt) from one the
    aggregator altered or forged (and blame the aggregator).
    """
    return canonical("secagg/share-signature/v1", digest, sender, recipient, sha256(ciphertext))


def masked_payload(
    digest: bytes, sender: str, masked_with: tuple[str, ...], vector_sha256: bytes
) -> bytes:
    """What a peer signs for its masked input: the vector's digest and its mask partners."""
    return canonical("secagg/masked/v1", digest, sender, tuple(sorted(masked_with)), vector_sha256)


# ----------------------------------------------------------------- participant -> aggregator


@dataclass(frozen=True, slots=True)
class AdvertiseKeys:
    """Stage 0: two fresh X25519 public keys and a commitment to the self-mask seed."""

    sender: str
    session_id: str
    round: int
    channel_public: bytes
    mask_public: bytes
    self_mask_commitment: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _require(len(self.channel_public) == KEY_BYTES, "channel public key must be 32 bytes")
        _require(len(self.mask_public) == KEY_BYTES, "mask public key must be 32 bytes")
        _require(len(self.self_mask_commitment) == 32, "self-mask commitment must be 32 bytes")

    def signed_payload(self, digest: bytes) -> bytes:
        return canonical(
            "secagg/advertise/v1",
            digest,
            self.sender,
            self.channel_public,
            self.mask_public,
            self.self_mask_commitment,
        )


@dataclass(frozen=True, slots=True)
class ShareKeys:
    """Stage 1: one AES-GCM ciphertext of (mask-key share, self-mask share) per neighbour,
    each signed by the sender (:func:`share_payload`); ``signatures[i]`` is that of
    ``ciphertexts[i]``."""

    sender: str
    session_id: str
    round: int
    ciphertexts: tuple[tuple[str, bytes], ...]  # (recipient, ciphertext)
    signatures: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _require_share_signatures(self.signatures, self.ciphertexts)


@dataclass(frozen=True, slots=True, eq=False)
class MaskedInput:
    """Stage 2: the masked vector, and the neighbours whose pairwise masks it contains."""

    sender: str
    session_id: str
    round: int
    masked_with: tuple[str, ...]
    vector: WordArray
    signature: bytes

    def __post_init__(self) -> None:
        _require(self.vector.ndim == 1, "masked vector must be one-dimensional")

    def signed_payload(self, digest: bytes) -> bytes:
        return masked_payload(digest, self.sender, self.masked_with, vector_digest(self.vector))

    def header(self) -> MaskedHeader:
        """The signed facts of this input without its vector (relayed at unmasking)."""
        return MaskedHeader(
            self.sender, self.masked_with, vector_digest(self.vector), self.signature
        )


@dataclass(frozen=True, slots=True)
class MaskedHeader:
    """A survivor's signed masked input, less the vector: who it masked with.

    The aggregator relays these with the unmask request, so that each share holder checks,
    from the survivor's own signature, that the survivor's mask partners survived before it
    reveals the survivor's self-mask share.
    """

    sender: str
    masked_with: tuple[str, ...]
    vector_sha256: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _require(len(self.vector_sha256) == 32, "vector digest must be 32 bytes")

    def signed_payload(self, digest: bytes) -> bytes:
        return masked_payload(digest, self.sender, self.masked_with, self.vector_sha256)


@dataclass(frozen=True, slots=True)
class ConsistencySignature:
    """Stage 3: the sender's signature over the survivor set it was shown."""

    sender: str
    session_id: str
    round: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class UnmaskShares:
    """Stage 4: shares of survivors' self-mask seeds and of dropped peers' mask keys."""

    sender: str
    session_id: str
    round: int
    self_mask_shares: tuple[tuple[str, bytes], ...]  # (owner, 33-byte share of b_owner)
    mask_key_shares: tuple[tuple[str, bytes], ...]  # (owner, 33-byte share of s_sk_owner)
    signature: bytes

    def __post_init__(self) -> None:
        for _, share in (*self.self_mask_shares, *self.mask_key_shares):
            _require(len(share) == SHARE_BYTES, f"shares must be {SHARE_BYTES} bytes")

    def signed_payload(self, digest: bytes) -> bytes:
        def flat(pairs: tuple[tuple[str, bytes], ...]) -> bytes:
            return b"".join(canonical(owner, share) for owner, share in sorted(pairs))

        return canonical(
            "secagg/unmask/v1",
            digest,
            self.sender,
            flat(self.self_mask_shares),
            flat(self.mask_key_shares),
        )


ParticipantMessage = AdvertiseKeys | ShareKeys | MaskedInput | ConsistencySignature | UnmaskShares


# ----------------------------------------------------------------- aggregator -> participant


@dataclass(frozen=True, slots=True)
class AdvertisedKeys:
    """Stage 0 reply: the signed adverts of the recipient's neighbourhood (U1)."""

    session_id: str
    round: int
    adverts: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True, slots=True)
class SharesToYou:
    """Stage 1 reply: ciphertexts addressed to ``recipient`` (their senders form U2)."""

    session_id: str
    round: int
    recipient: str
    ciphertexts: tuple[tuple[str, bytes], ...]  # (sender, ciphertext)
    signatures: tuple[bytes, ...] = ()  # the sender's signature of each ciphertext

    def __post_init__(self) -> None:
        _require_share_signatures(self.signatures, self.ciphertexts)


@dataclass(frozen=True, slots=True)
class SurvivorSet:
    """Stage 2 reply: U3, the peers whose masked input the aggregator holds."""

    session_id: str
    round: int
    survivors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """Stage 3 reply: the consistency signatures, and whose shares the recipient reveals.

    ``survivors`` get their self-mask seed share revealed; ``dropped`` their mask-key
    share. ``masked`` holds the signed masked-input header of every survivor in the
    recipient's neighbourhood. An honest participant refuses unless the two sets are
    disjoint, a quorum signed the survivor set, and every survivor it unmasks masked with at
    least t - 1 other survivors (see participant.py).
    """

    session_id: str
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signatures: tuple[ConsistencySignature, ...]
    masked: tuple[MaskedHeader, ...] = ()


AggregatorMessage = AdvertisedKeys | SharesToYou | SurvivorSet | UnmaskRequest


def message_size(message: ParticipantMessage | AggregatorMessage) -> int:
    """Bytes of payload a message carries on the wire (ids, keys, ciphertexts, vectors)."""
    if isinstance(message, AdvertiseKeys):
        return len(message.sender) + 96 + len(message.signature)
    if isinstance(message, ShareKeys):
        return len(message.sender) + sum(len(v) + len(c) for v, c in message.ciphertexts)
    if isinstance(message, MaskedInput):
        ids = sum(len(v) for v in message.masked_with)
        return len(message.sender) + ids + message.vector.nbytes + len(message.signature)
    if isinstance(message, ConsistencySignature):
        return len(message.sender) + len(message.signature)
    if isinstance(message, UnmaskShares):
        pairs = (*message.self_mask_shares, *message.mask_key_shares)
        return len(message.sender) + sum(len(o) + len(s) for o, s in pairs) + len(message.signature)
    if isinstance(message, AdvertisedKeys):
        return sum(message_size(a) for a in message.adverts)
    if isinstance(message, SharesToYou):
        return sum(len(u) + len(c) for u, c in message.ciphertexts)
    if isinstance(message, SurvivorSet):
        return sum(len(u) for u in message.survivors)
    ids = sum(len(u) for u in (*message.survivors, *message.dropped))
    return ids + sum(message_size(s) for s in message.signatures)
