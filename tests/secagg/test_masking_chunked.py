"""The chunked, fused masking path (issue 11) is bit-identical to the textbook formula.

The reference below is the formula of secagg/masking.py's docstring written the slow, obvious
way: one whole-vector AES-256-CTR keystream per seed (a fresh encryptor over m zero words),
added or subtracted with numpy modulo 2^bits. The fast path keeps one encryptor per seed and
adds every mask chunk by chunk into a fresh y, hashing y as it goes; any slip in the counter
continuity, the last short chunk, the signs or the digest changes some word.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.config import RoundConfig
from secagg.crypto import DeterministicRandom, KeyPair
from secagg.errors import ConfigError
from secagg.masking import _pairwise_seed, mask_input
from secagg.messages import vector_digest, vector_hasher
from secagg.prg import MaskExpander
from secagg.ring import le_bytes, word_dtype
from secagg.testing import peer_ids


def _reference_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    dtype = word_dtype(bits)
    raw = (
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16)))
        .encryptor()
        .update(bytes(length * dtype.itemsize))
    )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def _reference_masked(
    config: RoundConfig, me: str, x: np.ndarray, self_seed: bytes, keys: dict[str, KeyPair]
) -> np.ndarray:
    y = x.copy()
    y += _reference_mask(self_seed, config.vector_length, config.bits)
    for v in config.peers:
        if v == me:
            continue
        seed = _pairwise_seed(config, keys[me], me, v, keys[v].public)
        mask = _reference_mask(seed, config.vector_length, config.bits)
        if config.mask_sign(me, v) > 0:
            y += mask
        else:
            y -= mask
    return y


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(1, 3000),
    chunk=st.integers(1, 700),
    n=st.integers(2, 5),
    bits=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**32),
)
def test_chunked_masking_equals_the_formula(
    length: int, chunk: int, n: int, bits: int, seed: int
) -> None:
    peers = peer_ids(n)
    config = RoundConfig("s", 3, peers, n // 2 + 1, length, bits=bits)
    rng = DeterministicRandom(f"chunked/{seed}")
    keys = {u: KeyPair.generate(rng) for u in peers}
    me = peers[seed % n]
    dtype = word_dtype(bits)
    x = np.frombuffer(rng.token_bytes(length * dtype.itemsize), dtype=dtype).copy()
    self_seed = rng.token_bytes(32)
    publics = {v: keys[v].public for v in peers if v != me}
    hasher = vector_hasher()
    y = mask_input(
        config, me, x, self_seed, keys[me], publics, MaskExpander(length, bits, chunk), hasher
    )
    expected = _reference_masked(config, me, x, self_seed, keys)
    assert y.dtype == dtype
    assert np.array_equal(y, expected)
    # The digest from the masking pass is the digest of the finished vector.
    assert hasher.digest() == vector_digest(y)
    assert hasher.digest() == hashlib.sha256(b"secagg/vector/v1" + le_bytes(expected)).digest()


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 2000), chunk=st.integers(1, 500), sign=st.sampled_from([1, -1]))
def test_add_into_continues_the_counter_across_chunks(length: int, chunk: int, sign: int) -> None:
    key = DeterministicRandom(f"add/{length}/{chunk}").token_bytes(32)
    acc = np.arange(length, dtype=np.uint32)
    MaskExpander(length, 32, chunk).add_into(acc, key, sign)
    mask = _reference_mask(key, length, 32)
    expected = (
        np.arange(length, dtype=np.uint32) + mask
        if sign > 0
        else (np.arange(length, dtype=np.uint32) - mask)
    )
    assert np.array_equal(acc, expected)


def test_combine_refuses_a_vector_of_the_wrong_shape() -> None:
    expander = MaskExpander(8)
    with pytest.raises(ConfigError, match="shape"):
        expander.combine(np.zeros(8, np.uint32), np.zeros(7, np.uint32), ())
    with pytest.raises(ConfigError, match="dtype"):
        expander.add_into(np.zeros(8, np.uint64), bytes(32))
