"""The wire format: generated code is fresh, secagg messages survive encoding, large vectors
travel in fragments within gRPC's default limits, and oversized messages are refused."""

from __future__ import annotations

import numpy as np
import pytest

from peer.codec import FRAGMENT_BYTES, CodecError, Reassembler, decode, encode, fragments
from peer.wire import peer_pb2 as pb
from scripts import gen_protos
from secagg import MaskedInput
from secagg.simulate import simulate

GRPC_DEFAULT_LIMIT = 4 * 1024 * 1024


def test_generated_code_is_fresh() -> None:
    assert gen_protos.main(["--check"]) == 0


def test_every_protocol_message_round_trips_through_the_wire_format() -> None:
    result = simulate(5, 16, seed=3)
    transcript = result.transcript
    assert transcript is not None
    messages: list[object] = [
        *transcript.adverts,
        *transcript.masked_inputs,
        *transcript.consistency,
        *transcript.unmask,
        transcript,
    ]
    for message in messages:
        kind, data = encode(message)
        back = decode(kind, data)
        if isinstance(message, MaskedInput):
            assert isinstance(back, MaskedInput)
            np.testing.assert_array_equal(back.vector, message.vector)
            assert back.vector.dtype == message.vector.dtype
            assert (back.sender, back.masked_with, back.signature) == (
                message.sender,
                message.masked_with,
                message.signature,
            )
        elif message is transcript:
            assert encode(back) == (kind, data)
        else:
            assert back == message


def test_ten_million_words_travel_in_fragments_below_the_grpc_limit() -> None:
    vector = np.arange(10_000_000, dtype=np.uint32)
    message = MaskedInput("hospital-a", "s", 1, ("hospital-b",), vector, b"s" * 64)
    parts = list(fragments(message))
    assert len(parts) > 1
    assert all(part.ByteSize() < GRPC_DEFAULT_LIMIT for part in parts)
    assert all(len(part.data) <= FRAGMENT_BYTES for part in parts)
    reassembler = Reassembler(max_message_bytes=50_000_000)
    outputs = [reassembler.push(part) for part in parts]
    assert outputs[:-1] == [None] * (len(parts) - 1)
    received = outputs[-1]
    assert isinstance(received, MaskedInput)
    np.testing.assert_array_equal(received.vector, vector)


def test_a_message_over_the_limit_is_refused_before_it_is_buffered() -> None:
    reassembler = Reassembler(max_message_bytes=1000)
    with pytest.raises(CodecError, match="exceeds the limit"):
        reassembler.push(pb.Fragment(kind="MaskedInput", total_size=10**12, last=False, data=b"x"))


def test_fragments_that_lie_about_their_size_are_refused() -> None:
    reassembler = Reassembler(max_message_bytes=1000)
    reassembler.push(pb.Fragment(kind="MaskedInput", total_size=10, last=False, data=b"12345"))
    with pytest.raises(CodecError, match="exceed the announced size"):
        reassembler.push(pb.Fragment(kind="MaskedInput", total_size=10, last=False, data=b"123456"))


def test_garbage_bytes_give_a_codec_error_not_a_crash() -> None:
    with pytest.raises(CodecError):
        decode("UnmaskShares", b"\xff\xff\xff\xff")
    with pytest.raises(CodecError, match="unknown message kind"):
        decode("Nope", b"")
    bad_share = pb.UnmaskShares(
        sender="a", self_mask_shares=[pb.Addressed(peer="b", data=b"short")]
    )
    with pytest.raises(CodecError, match="malformed UnmaskShares"):
        decode("UnmaskShares", bad_share.SerializeToString())


def test_signed_shares_and_unmask_headers_round_trip() -> None:
    """Issue 9's new fields: each share ciphertext's signature (ShareKeys, SharesToYou) and
    the survivors' masked-input headers (UnmaskRequest) survive the wire format."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "secagg"))
    from secagg_testlib import make_round  # type: ignore[import-not-found, unused-ignore]

    from secagg import ShareKeys, SharesToYou, UnmaskRequest

    r = make_round(4, length=3)
    outgoing = r.collect(r.start())
    replies = r.respond(outgoing)
    share_keys = list(replies.values())
    outgoing = r.collect(replies)
    shares_to_you = list(outgoing.values())
    outgoing = r.collect(r.respond(outgoing))
    outgoing = r.collect(r.respond(outgoing))
    requests = list(outgoing.values())
    assert all(isinstance(m, ShareKeys) and m.signatures for m in share_keys)
    assert all(isinstance(m, SharesToYou) and m.signatures for m in shares_to_you)
    assert all(isinstance(m, UnmaskRequest) and m.masked for m in requests)
    for message in (*share_keys, *shares_to_you, *requests):
        kind, data = encode(message)
        assert decode(kind, data) == message
