"""Cryptographic building blocks, all from pyca ``cryptography``.

Nothing here is invented: X25519 for key agreement, HKDF-SHA256 with a distinct ``info``
label per purpose, AES-256-GCM for the encrypted shares, Ed25519 or ECDSA P-256 for
signatures. Randomness comes from an injected :class:`RandomSource` so that tests can fix
it; production uses :class:`SystemRandom` (the OS CSPRNG).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "CHANNEL_INFO",
    "GRAPH_INFO",
    "MASK_INFO",
    "DeterministicRandom",
    "KeyPair",
    "RandomSource",
    "Signer",
    "SystemRandom",
    "Verifier",
    "aead_decrypt",
    "aead_encrypt",
    "canonical",
    "derive_channel_key",
    "derive_mask_seed",
    "hkdf_sha256",
    "is_valid_x25519_public",
    "sha256",
    "signer_from_private_key",
    "verifier_from_public_key",
]

# One HKDF label per purpose. Never reuse a label for a second purpose.
CHANNEL_INFO = b"secagg/channel/v1"
MASK_INFO = b"secagg/mask/v1"
GRAPH_INFO = b"secagg/graph/v2"


# --------------------------------------------------------------------------- randomness


@runtime_checkable
class RandomSource(Protocol):
    """Where every secret random byte comes from."""

    def token_bytes(self, n: int) -> bytes:
        """Return ``n`` uniformly random bytes."""
        ...


class SystemRandom:
    """The operating system's CSPRNG (``os.urandom``). The production default."""

    def token_bytes(self, n: int) -> bytes:
        return os.urandom(n)


class DeterministicRandom:
    """A reproducible CSPRNG for tests and simulations: AES-256-CTR keyed by SHA-256(seed).

    It is cryptographically strong but *not secret* when the seed is known, so it must never
    be used by a real peer.
    """

    def __init__(self, seed: bytes | int | str) -> None:
        key = sha256(b"secagg/deterministic-random/v1", _to_bytes(seed))
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def token_bytes(self, n: int) -> bytes:
        return self._encryptor.update(bytes(n))


# --------------------------------------------------------------------------- encoding


def _to_bytes(value: bytes | int | str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return value.to_bytes(16, "big", signed=True)
    return value.encode("utf-8")


def canonical(*fields: bytes | str | int | Iterable[str]) -> bytes:
    """An unambiguous byte encoding of a tuple of fields, for signing and AEAD data.

    Each field is length-prefixed; a sequence of strings is encoded as a count followed by
    its length-prefixed items. So ``canonical("ab", "c") != canonical("a", "bc")``.
    """
    out = bytearray()
    for field in fields:
        if isinstance(field, bytes | str | int):
            raw = _to_bytes(field)
            tag = b"b" if isinstance(field, bytes) else b"s" if isinstance(field, str) else b"i"
            out += tag + struct.pack(">I", len(raw)) + raw
        else:
            items = [item.encode("utf-8") for item in field]
            out += b"l" + struct.pack(">I", len(items))
            for item in items:
                out += struct.pack(">I", len(item)) + item
    return bytes(out)


def sha256(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.digest()


# --------------------------------------------------------------------------- key agreement


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair. ``public`` is the 32-byte raw public key."""

    private: x25519.X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls, rng: RandomSource) -> KeyPair:
        private = x25519.X25519PrivateKey.from_private_bytes(rng.token_bytes(32))
        return cls(private, _raw_public(private))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        private = x25519.X25519PrivateKey.from_private_bytes(raw)
        return cls(private, _raw_public(private))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def exchange(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared secret with ``peer_public``. Raises ValueError on a bad key."""
        return self.private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))


# Any fixed scalar will do: X25519 clamps scalars to multiples of the cofactor 8, so every
# small-order point, and only those, yields the all-zero secret that ``exchange`` rejects.
_PROBE_KEY = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


_P25519 = 2**255 - 19


def is_valid_x25519_public(raw: bytes) -> bool:
    """False for a 32-byte X25519 public key of small order (every ECDH with it gives zero),
    or one that is not in canonical form.

    A peer that advertises such a key would make every honest ``exchange`` with it raise, so
    such adverts are refused where they are received. Non-canonical encodings (bit 255 set,
    or a u-coordinate >= 2^255 - 19) are refused too: X25519 ignores bit 255 and reduces u,
    so such a key is the *same* key as a canonical one with different bytes, and would pass
    a byte-wise duplicate-key check (a copy of another peer's key). Honest keys, produced by
    ``public_bytes``, are always canonical.
    """
    if len(raw) != 32 or raw[31] & 0x80 or int.from_bytes(raw, "little") >= _P25519:
        return False
    try:
        _PROBE_KEY.exchange(x25519.X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def _raw_public(private: x25519.X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def hkdf_sha256(secret: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _ordered(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def derive_channel_key(shared: bytes, session_id: str, round_: int, u: str, v: str) -> bytes:
    """AES-256-GCM key for shares between ``u`` and ``v``, bound to session and round."""
    lo, hi = _ordered(u, v)
    return hkdf_sha256(shared, CHANNEL_INFO + canonical(session_id, round_, lo, hi))


def derive_mask_seed(shared: bytes, session_id: str, round_: int, u: str, v: str) -> bytes:
    """256-bit PRG seed of the pairwise mask between ``u`` and ``v`` (symmetric in u, v)."""
    lo, hi = _ordered(u, v)
    return hkdf_sha256(shared, MASK_INFO + canonical(session_id, round_, lo, hi))


# --------------------------------------------------------------------------- AEAD

NONCE_BYTES = 12


def aead_encrypt(key: bytes, plaintext: bytes, associated_data: bytes, rng: RandomSource) -> bytes:
    """AES-256-GCM; returns nonce ‖ ciphertext ‖ tag."""
    nonce = rng.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_decrypt(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`. Raises ``cryptography.exceptions.InvalidTag``."""
    if len(sealed) < NONCE_BYTES + 16:
        raise InvalidTag
    return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)


# --------------------------------------------------------------------------- signatures


class Signer(Protocol):
    """Signs protocol messages with an institution's key (its certificate key in a peer)."""

    def sign(self, data: bytes) -> bytes: ...


class Verifier(Protocol):
    """Checks signatures of one institution. ``verify`` returns False on any failure."""

    def verify(self, signature: bytes, data: bytes) -> bool: ...


SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class _KeySigner:
    key: SigningKey

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(data)
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True, slots=True)
class _KeyVerifier:
    key: PublicKey

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, data)
            else:
                self.key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


def signer_from_private_key(key: object) -> Signer:
    """A :class:`Signer` for an Ed25519 or ECDSA (P-256 and up) private key.

    Raises:
        TypeError: for any other key type (RSA keys are not accepted).
    """
    if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        return _KeySigner(key)
    raise TypeError(f"signing keys must be Ed25519 or ECDSA, not {type(key).__name__}")


def verifier_from_public_key(key: object) -> Verifier:
    """A :class:`Verifier` for an Ed25519 or ECDSA public key (e.g. ``cert.public_key()``)."""
    if isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        return _KeyVerifier(key)
    raise TypeError(f"verifying keys must be Ed25519 or ECDSA, not {type(key).__name__}")
