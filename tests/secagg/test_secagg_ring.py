"""The ring's word type and its canonical byte form (secagg/ring.py)."""

from __future__ import annotations

import numpy as np
import pytest

from secagg import ConfigError
from secagg.messages import vector_digest
from secagg.ring import from_le_bytes, le_bytes, word_dtype


@pytest.mark.parametrize("bits", [32, 64])
def test_le_bytes_round_trip_and_byte_order(bits: int) -> None:
    words = np.array([1, 2**bits - 1, 0x01020304], dtype=word_dtype(bits))
    raw = le_bytes(words)
    assert raw[:4] == b"\x01\x00\x00\x00"  # little-endian whatever the machine's order
    back = from_le_bytes(raw, bits)
    assert back.dtype == word_dtype(bits)
    assert np.array_equal(back, words)


def test_big_endian_words_have_the_same_bytes_and_digest() -> None:
    native = np.array([7, 2**32 - 2], dtype=np.uint32)
    swapped = native.astype(np.dtype(">u4"))
    assert le_bytes(swapped) == le_bytes(native)
    assert vector_digest(swapped) == vector_digest(native)


def test_only_32_and_64_bit_rings() -> None:
    with pytest.raises(ConfigError, match="32 or 64 bits, not 16"):
        word_dtype(16)
