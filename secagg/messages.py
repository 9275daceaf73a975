"""The protocol's messages: frozen, slotted dataclasses, one per (stage, direction).

Participant -> aggregator:  AdvertiseKeys, ShareKeys, MaskedInput, ConsistencySignature,
                            UnmaskShares, LinearAnswers
Aggregator -> participant:  AdvertisedKeys, SharesToYou, SurvivorSet, UnmaskRequest,
                            ProofRequest

Every message carries ``session_id`` and ``round``. Every message a participant signs is
signed over :meth:`signed_payload`, which also binds the round configuration's digest, so
nothing verifies in another session, round or parameter set. Messages validate their own
shape on construction (types and sizes); protocol rules are checked by the state machines.
"""

from __future__ import annotations

import hashlib
from dataclasses import InitVar, dataclass, field

from .crypto import canonical, sha256
from .ring import WordArray, le_view, word_dtype
from .shamir import SHARE_BYTES

__all__ = [
    "AdvertiseKeys",
    "AdvertisedKeys",
    "AggregatorMessage",
    "ConsistencySignature",
    "LinearAnswers",
    "MaskedHeader",
    "MaskedInput",
    "ParticipantMessage",
    "ProofRequest",
    "ShareKeys",
    "SharesToYou",
    "Statement",
    "SurvivorSet",
    "UnmaskRequest",
    "UnmaskShares",
    "answers_payload",
    "consistency_payload",
    "masked_payload",
    "message_size",
    "share_payload",
    "statement_payload",
    "statement_size",
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


def statement_payload(digest: bytes, statement_sha256: bytes) -> bytes:
    """What the aggregator signs for a statement: :meth:`Statement.sha256` under the round."""
    return canonical("secagg/statement-signature/v1", digest, statement_sha256)


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


def answers_payload(
    digest: bytes,
    sender: str,
    statement_sha256: bytes,
    vector_sha256: bytes,
    answers: tuple[int, ...],
) -> bytes:
    """What a survivor signs with its linear-check answers: the statement they answer (hence
    the challenge) and the digest of the masked input they are computed over."""
    packed = b"".join(a.to_bytes(8, "little") for a in answers)
    return canonical(
        "secagg/linear-answers/v1", digest, sender, statement_sha256, vector_sha256, packed
    )


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
    """Stage 2: the masked vector, and the neighbours whose pairwise masks it contains.

    The vector's digest (:func:`vector_digest`, 4 MB of SHA-256 at m = 10^6) is computed at
    most once per object: on first use, or handed in as ``known_sha256`` by the code that
    hashed these very words as it wrote them (the participant's masking pass). It is never
    taken from the wire: the codec has no digest to give, so a received input is hashed once,
    from its own words. The cache cannot go stale: construction makes ``vector`` read-only,
    so an in-place write through this object raises, and :func:`dataclasses.replace` (which
    does not carry ``known_sha256``) builds an object that hashes its new vector. A caller
    that hands in a view must not write through the view's base (the participant's
    ``masked_buffer`` contract).
    """

    sender: str
    session_id: str
    round: int
    masked_with: tuple[str, ...]
    vector: WordArray
    signature: bytes
    known_sha256: InitVar[bytes | None] = None
    _sha256: bytes = field(init=False, default=b"", repr=False, compare=False)

    def __post_init__(self, known_sha256: bytes | None) -> None:
        _require(self.vector.ndim == 1, "masked vector must be one-dimensional")
        self.vector.flags.writeable = False
        if known_sha256 is not None:
            _require(len(known_sha256) == 32, "vector digest must be 32 bytes")
            object.__setattr__(self, "_sha256", known_sha256)

    @property
    def vector_sha256(self) -> bytes:
        """:func:`vector_digest` of ``vector``, computed once."""
        if not self._sha256:
            object.__setattr__(self, "_sha256", vector_digest(self.vector))
        return self._sha256

    def signed_payload(self, digest: bytes) -> bytes:
        return masked_payload(digest, self.sender, self.masked_with, self.vector_sha256)

    def header(self) -> MaskedHeader:
        """The signed facts of this input without its vector (relayed at unmasking)."""
        return MaskedHeader(self.sender, self.masked_with, self.vector_sha256, self.signature)


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


@dataclass(frozen=True, slots=True)
class LinearAnswers:
    """Stage 5: a survivor's answers ⟨r_j, y⟩ mod 2^bits to the challenge of a statement
    (:mod:`secagg.linear_check`), over its own masked input y, signed
    (:func:`answers_payload`)."""

    sender: str
    session_id: str
    round: int
    statement_sha256: bytes
    answers: tuple[int, ...]
    signature: bytes

    def __post_init__(self) -> None:
        _require(len(self.statement_sha256) == 32, "statement digest must be 32 bytes")
        _require(
            all(isinstance(a, int) and 0 <= a < 1 << 64 for a in self.answers),
            "answers must be ring words",
        )

    def signed_payload(self, digest: bytes, vector_sha256: bytes) -> bytes:
        return answers_payload(
            digest, self.sender, self.statement_sha256, vector_sha256, self.answers
        )


ParticipantMessage = (
    AdvertiseKeys | ShareKeys | MaskedInput | ConsistencySignature | UnmaskShares | LinearAnswers
)


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


@dataclass(frozen=True, slots=True, eq=False)
class Statement:
    """What the aggregator publishes once it has the aggregate: the transcript without any
    masked vector (the survivors' signed headers carry their digests), the secrets it
    reconstructed (each survivor's self-mask seed b_u, each dropped partner's mask private
    key: every one checkable against its owner's signed advert, so the n² shares they were
    rebuilt from need not travel) and the aggregate z.

    Fixed before any challenge exists: the challenge is derived from :meth:`sha256`
    (Fiat–Shamir, :mod:`secagg.linear_check`). ``signature`` is the aggregator's over
    :meth:`signed_payload` when it has a roster key (the peer), empty otherwise (the
    simulator's aggregator has no identity).
    """

    session_id: str
    round: int
    aggregator: str
    adverts: tuple[AdvertiseKeys, ...]
    masked: tuple[MaskedHeader, ...]
    consistency: tuple[ConsistencySignature, ...]
    seeds: tuple[tuple[str, bytes], ...]  # (survivor, its self-mask seed b_u)
    mask_keys: tuple[tuple[str, bytes], ...]  # (dropped partner, its mask private key)
    aggregate: WordArray
    signature: bytes = b""
    # vector_digest(aggregate), computed once (see MaskedInput: the same read-only guard).
    _aggregate_sha256: bytes = field(init=False, default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        _require(self.aggregate.ndim == 1, "aggregate must be one-dimensional")
        word_dtype(self.aggregate.dtype.itemsize * 8)
        # Every verifier hashes these pairs (sha256): one that is not a (peer, bytes) pair is
        # a malformed statement, refused here rather than a crash inside the hash.
        for name, pairs in (("seeds", self.seeds), ("mask keys", self.mask_keys)):
            _require(
                all(
                    isinstance(pair, tuple)
                    and len(pair) == 2
                    and isinstance(pair[0], str)
                    and isinstance(pair[1], bytes)
                    for pair in pairs
                ),
                f"statement {name} must be (peer, bytes) pairs",
            )
        # A statement is hashed by its signer, by every survivor and every verifier (for the
        # signature, the challenge and the answers): z is hashed once per object and can
        # not change under the cached digest.
        self.aggregate.flags.writeable = False

    @property
    def aggregate_sha256(self) -> bytes:
        """:func:`vector_digest` of ``aggregate``, computed once."""
        if not self._aggregate_sha256:
            object.__setattr__(self, "_aggregate_sha256", vector_digest(self.aggregate))
        return self._aggregate_sha256

    def sha256(self, digest: bytes) -> bytes:
        """The digest every challenge and every answer is bound to (the signature is not
        part of it: it signs this)."""
        parts = [
            canonical("secagg/statement/v1", digest, self.session_id, self.round, self.aggregator)
        ]
        parts += [canonical(a.signed_payload(digest), a.signature) for a in self.adverts]
        parts.append(b"masked")
        parts += [canonical(h.signed_payload(digest), h.signature) for h in self.masked]
        parts.append(b"consistency")
        parts += [canonical(c.sender, c.signature) for c in self.consistency]
        parts.append(b"seeds")
        parts += [canonical(owner, seed) for owner, seed in self.seeds]
        parts.append(b"mask-keys")
        parts += [canonical(owner, key) for owner, key in self.mask_keys]
        parts.append(self.aggregate_sha256)
        return sha256(canonical(*parts))

    def signed_payload(self, digest: bytes) -> bytes:
        return statement_payload(digest, self.sha256(digest))

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(h.sender for h in self.masked)


@dataclass(frozen=True, slots=True, eq=False)
class ProofRequest:
    """Stage 4 reply, to each survivor that revealed its shares: the signed statement,
    whose challenge the survivor answers over its own masked input."""

    session_id: str
    round: int
    statement: Statement


AggregatorMessage = AdvertisedKeys | SharesToYou | SurvivorSet | UnmaskRequest | ProofRequest


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
    if isinstance(message, LinearAnswers):
        return len(message.sender) + 32 + 8 * len(message.answers) + len(message.signature)
    if isinstance(message, ProofRequest):
        return statement_size(message.statement)
    if isinstance(message, AdvertisedKeys):
        return sum(message_size(a) for a in message.adverts)
    if isinstance(message, SharesToYou):
        return sum(len(u) + len(c) for u, c in message.ciphertexts)
    if isinstance(message, SurvivorSet):
        return sum(len(u) for u in message.survivors)
    ids = sum(len(u) for u in (*message.survivors, *message.dropped))
    return ids + sum(message_size(s) for s in message.signatures)


def statement_size(statement: Statement) -> int:
    """Bytes of payload a statement carries: headers, signatures, shares and the aggregate."""
    headers = sum(
        len(h.sender) + sum(len(v) for v in h.masked_with) + 32 + len(h.signature)
        for h in statement.masked
    )
    return (
        sum(message_size(a) for a in statement.adverts)
        + headers
        + sum(message_size(c) for c in statement.consistency)
        + sum(len(o) + len(k) for o, k in (*statement.seeds, *statement.mask_keys))
        + statement.aggregate.nbytes
        + len(statement.signature)
    )
