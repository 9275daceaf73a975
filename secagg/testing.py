"""Deterministic identities for simulations and tests (never for real peers).

Kept apart from :mod:`secagg.simulate` so that protocol modules (the Paillier simulation, for
one) can use them without importing a simulator.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ed25519

from .crypto import (
    DeterministicRandom,
    Signer,
    Verifier,
    signer_from_private_key,
    verifier_from_public_key,
)

__all__ = ["peer_ids", "test_identities"]


def peer_ids(n: int) -> tuple[str, ...]:
    width = max(3, len(str(n - 1)))
    return tuple(f"peer-{i:0{width}d}" for i in range(n))


def test_identities(
    peers: Sequence[str], seed: int
) -> tuple[dict[str, Signer], dict[str, Verifier]]:
    """Deterministic Ed25519 signing keys for simulated peers (never for real ones)."""
    signers: dict[str, Signer] = {}
    verifiers: dict[str, Verifier] = {}
    for u in peers:
        key = ed25519.Ed25519PrivateKey.from_private_bytes(
            DeterministicRandom(f"identity/{seed}/{u}").token_bytes(32)
        )
        signers[u] = signer_from_private_key(key)
        verifiers[u] = verifier_from_public_key(key.public_key())
    return signers, verifiers
