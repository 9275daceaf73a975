"""The aggregator's streaming sum (issue 11): O(m) state, the same sum as before.

* the running sum over any split of the inputs into pieces equals the plain sum of the
  vectors (what the aggregator computed when it held every input), and the digest is the
  vector's digest;
* an input whose words differ from what its sender signed is refused naming the sender, and
  its words leave the sum; too long or too short too;
* a whole round through the aggregator gives the sum of the inputs, and the aggregator keeps
  headers only, reading inputs back from its spool.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_testlib import Round, make_round

from peer.codec import Reassembler, decode, encode, fragments
from peer.wire import peer_pb2 as pb
from secagg import InvalidSignatureError, MaskedInput, RemoteProtocolError, Stage
from secagg.messages import MaskedHeader, vector_digest
from secagg.ring import le_bytes, word_dtype
from secagg.streaming import MaskedSum


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5),
    length=st.integers(1, 300),
    bits=st.sampled_from([32, 64]),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_streaming_sum_over_any_fragment_split_equals_the_plain_sum(
    n: int, length: int, bits: int, cuts: list[int], seed: int
) -> None:
    dtype = word_dtype(bits)
    rng = np.random.default_rng(seed)
    vectors = {
        f"p{i}": rng.integers(0, 1 << bits, size=length, dtype=np.uint64).astype(dtype)
        for i in range(n)
    }
    total = MaskedSum(length, bits)
    for u, vector in vectors.items():
        stream = total.stream(u)
        for piece in _splits(le_bytes(vector), cuts):
            stream.feed(piece)
        assert stream.digest() == vector_digest(vector)
        stream.commit()
    expected = np.zeros(length, dtype=dtype)
    for vector in vectors.values():
        expected += vector
    np.testing.assert_array_equal(total.total, expected)
    for u, vector in vectors.items():
        np.testing.assert_array_equal(total.vector(u), vector)
    # Taking one out again leaves the sum of the others.
    total.remove("p0")
    np.testing.assert_array_equal(total.total, expected - vectors["p0"])


def test_wrong_lengths_are_refused_naming_the_sender_and_leave_the_sum() -> None:
    total = MaskedSum(4, 32)
    ok = total.stream("a")
    ok.feed(le_bytes(np.arange(4, dtype=np.uint32)))
    ok.commit()
    long = total.stream("b")
    long.feed(b"\x01" * 12)
    with pytest.raises(RemoteProtocolError, match="longer than") as refused:
        long.feed(b"\x01" * 8)
    assert refused.value.offender == "b"
    short = total.stream("c")
    short.feed(b"\x02" * 10)  # two words and a half
    with pytest.raises(RemoteProtocolError, match="expected 4 words") as refused:
        short.digest()
    assert refused.value.offender == "c"
    np.testing.assert_array_equal(total.total, np.arange(4, dtype=np.uint32))
    assert total.senders == {"a"}
    with pytest.raises(RemoteProtocolError, match="second masked vector"):
        total.stream("b")  # one try per round


def _masked_inputs(length: int = 33) -> tuple[Round, dict[str, MaskedInput]]:
    r = make_round(5, length=length)
    outgoing = r.advance(2)
    replies = r.respond(outgoing)
    return r, {u: m for u, m in replies.items() if isinstance(m, MaskedInput)}


def test_an_input_that_differs_from_what_its_sender_signed_is_refused_naming_it() -> None:
    r, masked = _masked_inputs()
    victim = r.peers[1]
    altered = masked[victim].vector.copy()
    altered[7] ^= 1
    with pytest.raises(InvalidSignatureError) as refused:
        r.aggregator.receive(replace(masked[victim], vector=altered))
    assert refused.value.offender == victim
    for u, message in masked.items():
        if u != victim:
            r.aggregator.receive(message)
    r.aggregator.close_stage()
    # The refused words left the running sum: it is the sum of the others' inputs.
    expected = np.zeros(33, dtype=np.uint32)
    for u, message in masked.items():
        if u != victim:
            expected += message.vector
    np.testing.assert_array_equal(r.aggregator.masked_sum(), expected)


def test_a_round_sums_correctly_keeping_headers_only() -> None:
    r, masked = _masked_inputs()
    for message in masked.values():
        r.aggregator.receive(message)
    outgoing = r.aggregator.close_stage()
    assert r.aggregator.stage is Stage.CONSISTENCY
    assert all(isinstance(h, MaskedHeader) for h in r.aggregator._masked.values())
    for u, message in masked.items():
        np.testing.assert_array_equal(r.aggregator.masked_vector(u), message.vector)
        pieces = list(r.aggregator.masked_chunks(u))
        np.testing.assert_array_equal(np.concatenate(pieces), message.vector)
    for _ in range(3):  # consistency, unmask, prove
        outgoing = r.collect(r.respond(outgoing))
    assert r.aggregator.result is not None
    np.testing.assert_array_equal(r.aggregator.result.aggregate, r.expected_sum(r.peers))
    transcript = r.aggregator.transcript()
    for published in transcript.masked_inputs:
        np.testing.assert_array_equal(published.vector, masked[published.sender].vector)


def test_fragments_altered_on_the_way_are_refused_naming_the_sender() -> None:
    """A masked input cut into wire fragments, one byte of the vector flipped in a fragment:
    the aggregator refuses it naming its sender, and its words are not in the sum."""
    r, masked = _masked_inputs(length=300_000)
    victim = r.peers[2]
    frames = list(fragments(masked[victim]))
    assert len(frames) > 1  # the vector spans fragments
    data = bytearray(frames[1].data)
    data[100] ^= 1
    frames[1] = pb.Fragment(
        kind=frames[1].kind, total_size=frames[1].total_size, last=frames[1].last, data=bytes(data)
    )
    reassembler = Reassembler(8 * 300_000)
    decoded = [reassembler.push(f) for f in frames][-1]
    assert isinstance(decoded, MaskedInput)
    with pytest.raises(InvalidSignatureError) as refused:
        r.aggregator.receive(decoded)
    assert refused.value.offender == victim
    for u, message in masked.items():
        if u != victim:
            r.aggregator.receive(decode(*encode(message)))
    r.aggregator.close_stage()
    assert victim in r.aggregator.dropped[Stage.MASKED]
    expected = np.zeros(300_000, dtype=np.uint32)
    for u, message in masked.items():
        if u != victim:
            expected += message.vector
    np.testing.assert_array_equal(r.aggregator.masked_sum(), expected)
