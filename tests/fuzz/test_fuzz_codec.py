"""Hypothesis fuzzing of the wire codec: random and mutated protobuf bytes of every kind.

``peer.codec.decode`` and ``Reassembler.push`` are the first code that touches bytes from
another institution. Whatever arrives, they return a message or raise ``CodecError`` (which the
round stream turns into an Abort naming the sender), and a stream never buffers more than
its limit. Examples are derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from peer.codec import _KINDS, CodecError, Reassembler, decode, encode, fragments
from peer.wire import peer_pb2 as pb
from secagg import Stage
from secagg.cleartext import CleartextInput, CleartextTranscript, PlainSum

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "secagg"))
from secagg_testlib import make_round  # type: ignore[import-not-found, unused-ignore]

FUZZ = settings(
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
KINDS = sorted(_KINDS)
LIMIT = 64 * 1024  # a stream's message limit in these tests


@functools.cache
def samples() -> dict[str, bytes]:
    """One valid encoding of every message kind the codec knows."""
    r = make_round(4, threshold=3, length=8)
    messages: list[object] = []
    replies: dict[str, Any] = r.start()
    for index in range(len(Stage)):
        messages += replies.values()
        outgoing = r.collect(replies)
        messages += outgoing.values()
        if index < len(Stage) - 1:
            replies = r.respond(outgoing)
    messages.append(r.aggregator.transcript())
    messages += [r.aggregator.succinct_transcript(), r.aggregator.proof_answers()]
    vector = np.arange(8, dtype=np.uint32)
    cleartext = CleartextInput("hospital-a", "s", 1, vector, b"\x01" * 64)
    messages += [cleartext, CleartextTranscript("s", 1, "hospital-b", (cleartext,), vector)]
    messages.append(PlainSum("s", 1, "hospital-b", ("hospital-a",), vector))
    signature = pb.RecordSignature(peer_id="hospital-a", record_hash=b"h" * 32, signature=b"s" * 64)
    messages += [
        pb.RoundHello(session_id="s", round=1, peer_id="hospital-a", epsilon=0.5, chain_head=b"x"),
        pb.RecordDraft(prev_hash=b"p" * 32, epsilon_json='{"hospital-a": 0.5}'),
        signature,
        pb.AgreedRecord(session_id="s", round=1, metrics_json="{}", signatures=[signature]),
        pb.Abort(reason="because", offender="hospital-a"),
    ]
    out: dict[str, bytes] = {}
    for message in messages:
        kind, raw = encode(message)
        out.setdefault(kind, raw)
    assert sorted(out) == KINDS, set(KINDS) ^ set(out)
    return out


def _decode_or_refuse(kind: str, raw: bytes) -> object | None:
    try:
        return decode(kind, raw)
    except CodecError:
        event("CodecError")
        return None


@st.composite
def mutated_bytes(draw: st.DrawFn, raw: bytes) -> bytes:
    for _ in range(draw(st.integers(1, 5))):
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "varint", "splice"]))
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        if how == "flip" and raw:
            raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1 :]
        elif how == "insert":
            raw = raw[:i] + draw(st.binary(min_size=1, max_size=8)) + raw[i:]
        elif how == "delete":
            raw = raw[:i] + raw[i + draw(st.integers(1, 8)) :]
        elif how == "truncate":
            raw = raw[:i]
        elif how == "varint":  # a length prefix or number far too large
            raw = raw[:i] + b"\xff" * draw(st.integers(1, 10)) + raw[i:]
        else:  # a whole other message appended: repeated/duplicate/unknown fields
            raw = raw + samples()[draw(st.sampled_from(KINDS))]
    return raw


@pytest.mark.slow
@settings(FUZZ, max_examples=1500)
@given(kind=st.sampled_from(KINDS), raw=st.binary(max_size=400))
def test_random_bytes_of_every_kind_decode_or_raise_codec_error(kind: str, raw: bytes) -> None:
    _decode_or_refuse(kind, raw)


@pytest.mark.slow
@settings(FUZZ, max_examples=2000)
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_mutated_messages_of_every_kind_decode_or_raise_codec_error(
    data: st.DataObject, kind: str
) -> None:
    message = _decode_or_refuse(kind, data.draw(mutated_bytes(samples()[kind])))
    if message is not None:
        event("decoded")
        # Whatever decodes encodes again: the object is well formed.
        assert encode(message)[0] == kind


@settings(FUZZ, max_examples=200)
@given(kind=st.text(max_size=30), raw=st.binary(max_size=64))
def test_unknown_kinds_are_refused(kind: str, raw: bytes) -> None:
    if kind in _KINDS:
        return
    with pytest.raises(CodecError, match="unknown message kind"):
        decode(kind, raw)


# ------------------------------------------------------------------ fragments

fragment_kinds = st.sampled_from(KINDS) | st.text(max_size=12)
sizes = st.integers(0, 2 * LIMIT) | st.sampled_from([10**12, 2**64 - 1, LIMIT, LIMIT + 1])


@st.composite
def random_fragments(draw: st.DrawFn) -> pb.Fragment:
    return pb.Fragment(
        kind=draw(fragment_kinds),
        total_size=draw(sizes),
        last=draw(st.booleans()),
        data=draw(st.binary(max_size=2048) | st.just(b"\0" * LIMIT)),
    )


@pytest.mark.slow
@settings(FUZZ, max_examples=1000)
@given(stream=st.lists(random_fragments(), min_size=1, max_size=30))
def test_random_fragment_streams_are_cut_off_within_the_limit(stream: list[pb.Fragment]) -> None:
    reassembler = Reassembler(LIMIT)
    buffered = 0
    for fragment in stream:
        try:
            message = reassembler.push(fragment)
        except CodecError:
            event("cut off")
            return  # the stream is closed on the first error
        buffered = 0 if fragment.last else buffered + len(fragment.data)
        assert buffered <= LIMIT, "a stream buffered more than its limit"
        if message is not None:
            event("a message")


@st.composite
def split_and_mutated(draw: st.DrawFn) -> tuple[str, list[pb.Fragment]]:
    """A valid message cut into random pieces, one fragment header or body then mutated."""
    kind = draw(st.sampled_from(KINDS))
    raw = samples()[kind]
    cuts = sorted(draw(st.sets(st.integers(1, max(len(raw) - 1, 1)), max_size=5)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    stream = [
        pb.Fragment(kind=kind, total_size=len(raw), last=i == len(pieces) - 1, data=p)
        for i, p in enumerate(pieces)
    ]
    i = draw(st.integers(0, len(stream) - 1))
    field = draw(st.sampled_from(["kind", "total_size", "last", "data", "drop", "repeat"]))
    target = stream[i]
    if field == "kind":
        target.kind = draw(fragment_kinds)
    elif field == "total_size":
        target.total_size = draw(sizes)
    elif field == "last":
        target.last = not target.last
    elif field == "data":
        target.data = draw(mutated_bytes(target.data))
    elif field == "drop":
        del stream[i]
    else:
        stream.insert(i, stream[i])
    return kind, stream


@pytest.mark.slow
@settings(FUZZ, max_examples=1000)
@given(case=split_and_mutated())
def test_mutated_fragment_streams_give_a_message_or_codec_error(
    case: tuple[str, list[pb.Fragment]],
) -> None:
    _kind, stream = case
    reassembler = Reassembler(LIMIT)
    try:
        for fragment in stream:
            reassembler.push(fragment)
    except CodecError:
        event("cut off")


def test_unmutated_fragments_round_trip() -> None:
    for kind, raw in samples().items():
        message = decode(kind, raw)
        reassembler = Reassembler(LIMIT)
        out = [reassembler.push(f) for f in fragments(message)]
        assert encode(out[-1]) == (kind, raw)


def test_a_claimed_size_over_the_limit_is_refused_before_any_data() -> None:
    with pytest.raises(CodecError, match="1000000000000 bytes exceeds the limit"):
        Reassembler(LIMIT).push(pb.Fragment(kind="MaskedInput", total_size=10**12, data=b""))


def test_fragments_that_never_end_are_cut_off_at_the_announced_size() -> None:
    reassembler = Reassembler(LIMIT)
    chunk = pb.Fragment(kind="MaskedInput", total_size=LIMIT, last=False, data=b"\0" * 1024)
    for _ in range(LIMIT // 1024):
        assert reassembler.push(chunk) is None
    with pytest.raises(CodecError, match="exceed the announced size"):
        reassembler.push(chunk)
