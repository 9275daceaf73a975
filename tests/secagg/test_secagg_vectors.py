"""Known-answer tests: the mask PRG, Shamir sharing, HKDF (RFC 5869) and the share AEAD."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from secagg_testlib import AGGREGATOR, FixedBytes, make_round

from secagg import DeterministicRandom, KeyPair, RemoteProtocolError, SharesToYou
from secagg.crypto import aead_decrypt, aead_encrypt, derive_channel_key, hkdf_sha256
from secagg.participant import share_associated_data
from secagg.prg import MaskExpander, expand_mask
from secagg.shamir import PRIME, decode_share, encode_share, reconstruct, split_secret

VECTORS = Path(__file__).parent / "vectors"


def _cases(name: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((VECTORS / name).read_text())["cases"]
    return cases


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [case["name"] for case in cases]


PRG_CASES = _cases("prg.json")
SHAMIR_CASES = _cases("shamir.json")
HKDF_CASES = _cases("rfc5869.json")


# ------------------------------------------------------------------------------ PRG


@pytest.mark.parametrize("case", PRG_CASES, ids=_ids(PRG_CASES))
def test_prg_matches_frozen_vector(case: dict[str, Any]) -> None:
    key = bytes.fromhex(case["key"])
    expected = [int(w, 16) for w in case["words"]]
    mask = expand_mask(key, case["length"], case["bits"])
    assert mask.dtype == np.dtype(np.uint32 if case["bits"] == 32 else np.uint64)
    assert [int(w) for w in mask] == expected


@pytest.mark.parametrize("case", PRG_CASES, ids=_ids(PRG_CASES))
def test_prg_expander_reuse_and_add_into(case: dict[str, Any]) -> None:
    """A reused expander gives the same mask; add_into adds and subtracts it mod 2^bits."""
    key = bytes.fromhex(case["key"])
    bits, length = case["bits"], case["length"]
    expected = np.array([int(w, 16) for w in case["words"]], dtype=np.uint64)
    expander = MaskExpander(length, bits)
    expander.expand(bytes(32))  # something else first: buffers must not leak between calls
    acc = np.full(length, 7, dtype=expander.dtype)
    expander.add_into(acc, key)
    modulus = 1 << bits
    assert [int(a) for a in acc] == [(7 + int(w)) % modulus for w in expected]
    expander.add_into(acc, key, -1)
    assert [int(a) for a in acc] == [7] * length


def test_prg_first_block_is_aes_ecb_of_zero_counter() -> None:
    """Independent of the frozen files: CTR block 0 with a zero IV is AES-ECB(key, 0^128)."""
    for case in PRG_CASES:
        key = bytes.fromhex(case["key"])
        encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        block = encryptor.update(bytes(16)) + encryptor.finalize()
        width = case["bits"] // 8
        words = expand_mask(key, 16 // width, case["bits"])
        assert words.astype(f"<u{width}").tobytes() == block


def test_aes_ecb_reference_is_fips197() -> None:
    """Anchor the ECB cross-check itself: FIPS-197 appendix C.3 (AES-256)."""
    key = bytes(range(32))
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    out = encryptor.update(bytes.fromhex("00112233445566778899aabbccddeeff"))
    assert out.hex() == "8ea2b7ca516745bfeafc49904b496089"


def test_prg_rejects_short_seeds() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(bytes(16), 4)


def test_prg_different_seeds_differ() -> None:
    a = expand_mask(b"\x01" * 32, 8)
    b = expand_mask(b"\x02" * 32, 8)
    assert not np.array_equal(a, b)


# ------------------------------------------------------------------------------ Shamir


@pytest.mark.parametrize("case", SHAMIR_CASES, ids=_ids(SHAMIR_CASES))
def test_shamir_split_matches_frozen_shares(case: dict[str, Any]) -> None:
    secret = bytes.fromhex(case["secret"])
    expected = {int(x): int(y, 16) for x, y in case["shares"].items()}
    rng = FixedBytes(bytes.fromhex(case["randomness"]))
    shares = split_secret(secret, sorted(expected), case["threshold"], rng)
    assert shares == expected
    with pytest.raises(AssertionError):
        rng.token_bytes(1)  # exactly the frozen randomness was used, no more


@pytest.mark.parametrize("case", SHAMIR_CASES, ids=_ids(SHAMIR_CASES))
def test_shamir_frozen_shares_reconstruct(case: dict[str, Any]) -> None:
    secret = bytes.fromhex(case["secret"])
    t = case["threshold"]
    shares = {int(x): int(y, 16) for x, y in case["shares"].items()}
    xs = sorted(shares)
    # The lowest t, the highest t, every share (checked), and through the wire encoding.
    assert reconstruct({x: shares[x] for x in xs[:t]}, t) == secret
    assert reconstruct({x: shares[x] for x in xs[-t:]}, t) == secret
    assert reconstruct(shares, t, check=True) == secret
    wire = {x: decode_share(encode_share(y)) for x, y in shares.items()}
    assert reconstruct(wire, t, check=True) == secret


def test_shamir_decode_rejects_values_outside_field() -> None:
    with pytest.raises(ValueError, match="outside the field"):
        decode_share(encode_share(PRIME))
    with pytest.raises(ValueError, match="33 bytes"):
        decode_share(bytes(32))


# ------------------------------------------------------------------------------ HKDF


@pytest.mark.parametrize("case", HKDF_CASES, ids=_ids(HKDF_CASES))
def test_hkdf_sha256_rfc5869(case: dict[str, Any]) -> None:
    okm = hkdf_sha256(
        bytes.fromhex(case["ikm"]),
        bytes.fromhex(case["info"]),
        case["length"],
        bytes.fromhex(case["salt"]),
    )
    assert okm.hex() == case["okm"]


def test_hkdf_absent_salt_is_zero_length_salt() -> None:
    """RFC 5869 test case 3 says 'salt = not provided': our default must mean the same."""
    case = HKDF_CASES[2]
    assert hkdf_sha256(bytes.fromhex(case["ikm"]), b"", case["length"]).hex() == case["okm"]


# ------------------------------------------------------------------------------ share AEAD


def _channel() -> tuple[bytes, bytes, bytes]:
    """(key, associated data, sealed shares) of a share from a to b in round 0."""
    config = make_round(3).config
    a = KeyPair.generate(DeterministicRandom("a"))
    b = KeyPair.generate(DeterministicRandom("b"))
    key = derive_channel_key(a.exchange(b.public), config.session_id, 0, "a", "b")
    assert key == derive_channel_key(b.exchange(a.public), config.session_id, 0, "b", "a")
    ad = share_associated_data(config.digest, "a", "b")
    sealed = aead_encrypt(key, b"shares" * 11, ad, DeterministicRandom("nonce"))
    return key, ad, sealed


def test_aead_round_trip() -> None:
    key, ad, sealed = _channel()
    assert aead_decrypt(key, sealed, ad) == b"shares" * 11


@pytest.mark.parametrize(
    ("session", "round_", "sender", "recipient"),
    [
        ("other-session", 0, "hospital-a", "hospital-b"),
        ("test-session", 1, "hospital-a", "hospital-b"),
        ("test-session", 0, "hospital-c", "hospital-b"),
        ("test-session", 0, "hospital-a", "hospital-c"),
        ("test-session", 0, "hospital-b", "hospital-a"),
    ],
    ids=["session", "round", "sender", "recipient", "direction"],
)
def test_aead_fails_when_associated_data_differs(
    session: str, round_: int, sender: str, recipient: str
) -> None:
    """Same key, same ciphertext: any change of session, round, sender or recipient fails."""
    honest = make_round(3).config
    key = bytes(range(32))
    sealed = aead_encrypt(
        key,
        b"s" * 66,
        share_associated_data(honest.digest, "hospital-a", "hospital-b"),
        DeterministicRandom(1),
    )
    other = make_round(3, session=session, round_=round_).config
    with pytest.raises(InvalidTag):
        aead_decrypt(key, sealed, share_associated_data(other.digest, sender, recipient))


def test_aead_rejects_tampered_and_truncated_ciphertexts() -> None:
    key, ad, sealed = _channel()
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(InvalidTag):
        aead_decrypt(key, bytes(flipped), ad)
    with pytest.raises(InvalidTag):
        aead_decrypt(key, sealed[:20], ad)


def test_channel_keys_are_bound_to_session_and_round() -> None:
    shared = bytes(32)
    base = derive_channel_key(shared, "s", 0, "a", "b")
    assert base != derive_channel_key(shared, "s", 1, "a", "b")
    assert base != derive_channel_key(shared, "t", 0, "a", "b")
    assert base != derive_channel_key(shared, "s", 0, "a", "c")


def test_share_ciphertext_replayed_into_the_next_round_is_refused() -> None:
    """End to end: round-0 ciphertexts relayed in round 1 carry their senders' round-0
    signatures, which do not verify under round 1's digest: the relay is blamed. (The victim's
    own entry, first in the message, is refused for not being what it sent this round.)"""
    old = make_round(4, round_=0)
    old_shares = old.advance(2)
    new = make_round(4, round_=1)
    outgoing = new.advance(2)
    victim = "hospital-a"
    honest = outgoing[victim]
    stale = old_shares[victim]
    assert isinstance(honest, SharesToYou)
    assert isinstance(stale, SharesToYou)
    replayed = SharesToYou(
        honest.session_id, honest.round, victim, stale.ciphertexts, stale.signatures
    )
    with pytest.raises(RemoteProtocolError, match=r"did not sign|other than I sent") as raised:
        new.participants[victim].receive(replayed)
    assert raised.value.offender == AGGREGATOR
    assert new.participants[victim].state == "failed"
