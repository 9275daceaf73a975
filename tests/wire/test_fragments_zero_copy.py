"""Fragments of a masked or cleartext input are cut straight from the vector's words (issue
11, lane 11w), and are byte for byte those of the serialized message: the wire format is
unchanged, and a receiver rebuilds the very message."""

from __future__ import annotations

import numpy as np
import pytest

from peer.codec import FRAGMENT_BYTES, Reassembler, encode, fragments
from secagg import MaskedInput
from secagg.cleartext import CleartextInput


def reference_fragments(message: object) -> list[bytes]:
    """The straightforward cut: serialize the whole message, then slice it."""
    data = encode(message)[1]
    if not data:
        return [b""]
    return [data[i : i + FRAGMENT_BYTES] for i in range(0, len(data), FRAGMENT_BYTES)]


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("words", [0, 1, FRAGMENT_BYTES // 8 - 3, FRAGMENT_BYTES // 4, 300_001])
@pytest.mark.parametrize("form", ["masked", "cleartext"])
def test_fragments_are_the_serialized_message(bits: int, words: int, form: str) -> None:
    dtype = np.uint32 if bits == 32 else np.uint64
    vector = np.random.default_rng(words).integers(0, 1 << 32, words, dtype=np.uint64)
    vector = vector.astype(dtype)
    message: object
    if form == "masked":
        message = MaskedInput("hospital-b", "s", 7, ("hospital-a", "hospital-c"), vector, b"x" * 64)
    else:
        message = CleartextInput("hospital-b", "s", 7, vector, b"y" * 64)
    cut = list(fragments(message))
    assert [f.data for f in cut] == reference_fragments(message)
    assert all(f.kind == encode(message)[0] for f in cut)
    assert [f.last for f in cut] == [False] * (len(cut) - 1) + [True]
    reassembler = Reassembler(1 << 30)
    received = [reassembler.push(f) for f in cut]
    assert received[:-1] == [None] * (len(cut) - 1)
    got = received[-1]
    assert isinstance(got, type(message))
    assert np.array_equal(got.vector, vector)
    assert got.vector.dtype == vector.dtype


def test_a_received_masked_input_is_hashed_from_its_own_words() -> None:
    """Nothing digest-like comes from the wire: the receiver's digest is of the words it got."""
    from secagg.messages import vector_digest

    vector = np.arange(10, dtype=np.uint32)
    message = MaskedInput("hospital-b", "s", 7, (), vector, b"x" * 64)
    cut = list(fragments(message))
    cut[-1].data = cut[-1].data.replace(vector.tobytes()[-4:], b"\xff" * 4)  # tamper in flight
    got = Reassembler(1 << 20).push(cut[-1])
    assert isinstance(got, MaskedInput)
    assert got.vector_sha256 == vector_digest(got.vector) != message.vector_sha256
