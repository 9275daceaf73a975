"""The session beacon: randomness that no proposer or peer can choose (commit-reveal).

The SecAgg+ graph and the aggregator rotation of a session are seeded from its beacon. If
they were seeded from anything the proposer picks (the session id), a proposer could try ids
until its colluders surround a victim or aggregate round 1. So the beacon is fixed only
after every participant accepted, from a nonce of each:

1. **Commit** — on accepting a proposal, a peer draws a 32-byte nonce, stores it in its
   ledger *before* answering, and answers ``commitment = SHA-256(label ‖ proposal digest ‖
   peer ‖ nonce)`` with its signature over (proposal digest, peer, commitment).
2. **Reveal** — the proposer sends every participant the full set of signed commitments
   (``Start``). A peer checks that each participant committed, with a valid signature, and
   that its own commitment is the one it made; it stores the set and only then answers its
   nonce. A second, different set for the same session is refused: the commitments are
   fixed before any nonce is out.
3. **Beacon** — the proposer sends all nonces (``Start`` again); each peer checks every nonce
   against its commitment and computes ``beacon = SHA-256(label ‖ proposal digest ‖ sorted
   (peer, nonce))``. Only then does the session run.

Each honest peer's beacon includes its own nonce, which nobody knew when the commitments it
accepted were fixed, so its beacon is uniform to everyone else whatever they did. What
remains: whoever sees all nonces first (the proposer, or a last revealer) can *abort* (not
send the reveals) and try again with a new session — see SECURITY.md "The session beacon".

The digest binds the whole proposal (session id included), so a commitment or a nonce of
one session means nothing in another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from secagg import Verifier

__all__ = [
    "NONCE_BYTES",
    "BeaconError",
    "Commitment",
    "beacon_of",
    "check_commitments",
    "check_reveals",
    "commit",
    "commitment_signed_bytes",
]

NONCE_BYTES = 32
_COMMIT_LABEL = b"hospital-secagg/beacon-commitment/v1\x00"
_SIGN_LABEL = b"hospital-secagg/beacon-commitment-signature/v1\x00"
_BEACON_LABEL = b"hospital-secagg/beacon/v1\x00"


class BeaconError(ValueError):
    """A commitment or a reveal that does not check out (the text names whose)."""


@dataclass(frozen=True)
class Commitment:
    """One participant's signed commitment to its nonce."""

    peer: str
    commitment: bytes
    signature: bytes


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def commit(proposal_digest: bytes, peer: str, nonce: bytes) -> bytes:
    """``SHA-256(label ‖ proposal digest ‖ peer ‖ nonce)``, each field length-prefixed."""
    return hashlib.sha256(
        _COMMIT_LABEL + _field(proposal_digest) + _field(peer.encode()) + _field(nonce)
    ).digest()


def commitment_signed_bytes(proposal_digest: bytes, peer: str, commitment: bytes) -> bytes:
    """What a peer signs with its certificate key: (proposal digest, peer, commitment)."""
    return _SIGN_LABEL + _field(proposal_digest) + _field(peer.encode()) + _field(commitment)


def check_commitments(
    proposal_digest: bytes,
    participants: tuple[str, ...],
    commitments: Mapping[str, Commitment],
    verifiers: Mapping[str, Verifier],
) -> None:
    """Every participant, and nobody else, committed, each with a valid signature.

    Raises:
        BeaconError: naming the participant whose commitment is missing, extra or forged.
    """
    missing = sorted(set(participants) - set(commitments))
    if missing:
        raise BeaconError(f"no commitment from {', '.join(missing)}")
    extra = sorted(set(commitments) - set(participants))
    if extra:
        raise BeaconError(f"commitments from non-participants {', '.join(extra)}")
    for peer in sorted(participants):
        entry = commitments[peer]
        verifier = verifiers.get(peer)
        if len(entry.commitment) != 32:
            raise BeaconError(f"commitment of {peer} is not 32 bytes")
        if verifier is None or not verifier.verify(
            entry.signature, commitment_signed_bytes(proposal_digest, peer, entry.commitment)
        ):
            raise BeaconError(f"commitment signature of {peer} does not verify")


def check_reveals(
    proposal_digest: bytes, commitments: Mapping[str, bytes], reveals: Mapping[str, bytes]
) -> None:
    """Every committed peer revealed the nonce it committed to.

    Raises:
        BeaconError: naming who withheld its nonce or revealed one that does not match.
    """
    withheld = sorted(set(commitments) - set(reveals))
    if withheld:
        raise BeaconError(f"no nonce revealed for {', '.join(withheld)}")
    extra = sorted(set(reveals) - set(commitments))
    if extra:
        raise BeaconError(f"nonces from peers that did not commit: {', '.join(extra)}")
    for peer in sorted(commitments):
        nonce = reveals[peer]
        if len(nonce) != NONCE_BYTES or commit(proposal_digest, peer, nonce) != commitments[peer]:
            raise BeaconError(f"the nonce revealed for {peer} does not match its commitment")


def beacon_of(proposal_digest: bytes, reveals: Mapping[str, bytes]) -> bytes:
    """``SHA-256(label ‖ proposal digest ‖ sorted (peer, nonce))``."""
    digest = hashlib.sha256(_BEACON_LABEL + _field(proposal_digest))
    for peer in sorted(reveals):
        digest.update(_field(peer.encode()) + _field(reveals[peer]))
    return digest.digest()


# ---------------------------------------------------------------- tests only

TEST_NONCE_ENV = "HOSPITAL_SECAGG_TEST_BEACON_NONCE"


class FixedNonce:
    """A "random source" that always answers the same bytes: a peer whose beacon nonce a
    test fixed (``HOSPITAL_SECAGG_TEST_BEACON_NONCE=<64 hex digits>``), so that the test can
    compute the beacon, and thus who aggregates, before the peers start.

    This gives up only that peer's own contribution: a peer may pick its nonce however it
    likes, and the beacon stays unpredictable while one participant draws its nonce at
    random. Never set in production (the peer logs a warning when it is).
    """

    def __init__(self, nonce: bytes) -> None:
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"{TEST_NONCE_ENV} must be {NONCE_BYTES} bytes in hex")
        self._nonce = nonce

    def token_bytes(self, n: int) -> bytes:
        if n != NONCE_BYTES:
            raise ValueError(f"a fixed beacon nonce is {NONCE_BYTES} bytes, not {n}")
        return self._nonce


def nonce_source_from_env(environ: Mapping[str, str]) -> FixedNonce | None:
    """The fixed nonce a test asked for in ``environ``, or None (production)."""
    value = environ.get(TEST_NONCE_ENV)
    return FixedNonce(bytes.fromhex(value)) if value else None
