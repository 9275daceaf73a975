"""Between secagg's message objects and the protobuf wire format, in exactly one place.

The conversion of each message is in :mod:`peer.codec_forms` (with the compact forms of
:mod:`peer.codec_compact`); this module names each kind and turns it into bytes and back.

Also the fragmenting of large messages: every message goes on a stream as one or more
``Fragment``s of at most :data:`FRAGMENT_BYTES`, so vectors of any length travel within
gRPC's default 4 MiB message limit. :class:`Reassembler` refuses a message larger than the
limit its caller sets (derived from the round's vector length), so a stream that never ends
or claims a huge size is cut off instead of exhausting memory.

And the wire form of an agreed ledger record (:func:`record_to_proto`,
:func:`record_from_proto`), used by the round's agreement and by catching up.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO

from google.protobuf.message import DecodeError, Message

from .codec_forms import CodecError, from_proto, to_proto, vector_apart
from .ledger import AgreedRecord
from .paillier_wire import (
    KIND_PREFIX,
    MESSAGE_TYPES,
    PaillierWireError,
    decode_paillier,
    encode_paillier,
)
from .wire import peer_pb2 as pb

__all__ = [
    "FRAGMENT_BYTES",
    "CodecError",
    "Reassembler",
    "decode",
    "encode",
    "fragments",
    "from_proto",
    "record_from_proto",
    "record_to_proto",
    "to_proto",
]

FRAGMENT_BYTES = 1 << 20


_KINDS: dict[str, type[Message]] = {
    name: getattr(pb, name)
    for name in (
        "AdvertiseKeys",
        "ShareKeys",
        "MaskedInput",
        "ConsistencySignature",
        "UnmaskShares",
        "AdvertisedKeys",
        "SharesToYou",
        "SurvivorSet",
        "UnmaskRequest",
        "Transcript",
        "LinearAnswers",
        "ProofRequest",
        "ProofAnswers",
        "SuccinctTranscript",
        "CleartextInput",
        "CleartextTranscript",
        "PlainSum",
        "RoundHello",
        "RecordDraft",
        "RecordSignature",
        "AgreedRecord",
        "Abort",
    )
}


def encode(message: object) -> tuple[str, bytes]:
    """``(kind, bytes)`` of a message: its protobuf type name and serialization."""
    if type(message).__name__ in MESSAGE_TYPES:
        return encode_paillier(message)
    proto = to_proto(message)
    return type(proto).__name__, proto.SerializeToString()


def decode(kind: str, data: bytes) -> object:
    """The message of ``kind`` from its bytes. Raises CodecError for anything malformed."""
    if kind.startswith(KIND_PREFIX):
        try:
            return decode_paillier(kind, data)
        except PaillierWireError as error:
            raise CodecError(str(error)) from None
    cls = _KINDS.get(kind)
    if cls is None:
        raise CodecError(f"unknown message kind {kind!r}")
    proto = cls()
    try:
        proto.ParseFromString(data)
    except DecodeError as error:
        raise CodecError(f"{kind} does not parse: {error}") from None
    return from_proto(proto)


# ------------------------------------------------------------------ fragmenting


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pieces(message: object) -> tuple[str, list[bytes | memoryview]]:
    """``encode(message)`` as pieces whose concatenation is its bytes, the vector of a masked
    or cleartext input among them as a view of its words: no ``tobytes()``, no copy into the
    protobuf field, none in ``SerializeToString`` (three 4 MB copies at m = 10^6)."""
    apart = vector_apart(message)
    if apart is None:
        kind, data = encode(message)
        return kind, [data]
    proto, number, words = apart
    vector = words.cast("B")
    rest = proto.SerializeToString()
    if not len(vector):  # an empty bytes field is not serialized at all
        return type(proto).__name__, [rest]
    # Known fields are serialized in field-number order, so the vector's field goes between
    # the fields numbered below it and those above: the bytes are exactly those of the
    # message with the vector set (tests/wire check this byte for byte).
    head = type(proto)()
    head.CopyFrom(proto)
    for descriptor, _ in proto.ListFields():
        if descriptor.number > number:
            head.ClearField(descriptor.name)
    cut = head.ByteSize()
    field = _varint(number << 3 | 2) + _varint(len(vector))
    return type(proto).__name__, [rest[:cut], field, vector, rest[cut:]]


def fragments(message: object, size: int = FRAGMENT_BYTES) -> Iterator[pb.Fragment]:
    """Cut one message into fragments of at most ``size`` (<= FRAGMENT_BYTES) of payload."""
    kind, pieces = _pieces(message)
    views = [memoryview(piece).cast("B") for piece in pieces if len(piece)]
    total = sum(len(view) for view in views)
    if total == 0:
        yield pb.Fragment(kind=kind, total_size=0, last=True, data=b"")
        return
    sent = 0
    while views:
        # One copy per fragment (a Fragment holds bytes), taken across piece boundaries.
        room, parts = size, []
        while views and room:
            part, views[0] = views[0][:room], views[0][room:]
            parts.append(part)
            room -= len(part)
            if not len(views[0]):
                views.pop(0)
        data = b"".join(parts)
        sent += len(data)
        yield pb.Fragment(kind=kind, total_size=total, last=sent == total, data=data)


class Reassembler:
    """Collects fragments into whole messages, within a size limit.

    A message of more than one fragment waits in an anonymous temporary file (mode 0600,
    unlinked at once) rather than in memory: an aggregator with n streams whose masked
    inputs arrive at the same time then holds no n partial vectors, only the one message it
    decodes at a time (issue 11: aggregator memory O(m)).

    Args:
        max_message_bytes: the largest message this stream may carry; a fragment header
            claiming more, or fragments adding up to more, is refused.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._kind: str | None = None
        self._total = 0
        self._buffer = bytearray()
        self._spill: IO[bytes] | None = None
        self._size = 0

    def push(self, fragment: pb.Fragment) -> object | None:
        """Add a fragment; return the decoded message when it is complete, else None.

        Raises:
            CodecError: inconsistent fragments, a message over the limit, or bad bytes.
        """
        if self._kind is None:
            if fragment.total_size > self.max_message_bytes:
                raise CodecError(
                    f"{fragment.kind or 'message'} of {fragment.total_size} bytes exceeds the "
                    f"limit of {self.max_message_bytes} bytes"
                )
            self._kind, self._total = fragment.kind, fragment.total_size
            if self._total > FRAGMENT_BYTES:
                self._spill = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in _take
        elif fragment.kind != self._kind or fragment.total_size != self._total:
            raise CodecError("fragment of another message arrived before the last one ended")
        self._size += len(fragment.data)
        if self._size > self._total:
            self._take()
            raise CodecError(f"fragments exceed the announced size of {self._total} bytes")
        if self._spill is not None:
            self._spill.write(fragment.data)
        else:
            self._buffer += fragment.data
        if not fragment.last:
            return None
        size, kind, data = self._size, self._kind, self._take()
        if size != self._total:
            raise CodecError(f"message ended at {size} of {self._total} bytes")
        return decode(kind, data)

    def _take(self) -> bytes:
        """The bytes collected so far; the reassembler is empty again."""
        if self._spill is not None:
            self._spill.seek(0)
            data = self._spill.read()
            self._spill.close()
        else:
            data = bytes(self._buffer)
        self._kind, self._size, self._buffer, self._spill = None, 0, bytearray(), None
        return data


# ---------------------------------------------------------------- agreed records


def record_to_proto(
    record: AgreedRecord, signatures: Mapping[str, bytes], aggregator: str = ""
) -> pb.AgreedRecord:
    """The wire form of an agreed record (or of one peer's signed vote for it)."""
    record_hash = record.record_hash()
    return pb.AgreedRecord(
        aggregator=aggregator,
        session_id=record.session_id,
        round=record.round,
        aggregate_hash=record.aggregate_hash,
        model_hash=record.model_hash,
        metrics_hash=record.metrics_hash,
        prev_hash=record.prev_hash,
        metrics_json=json.dumps(dict(record.metrics), sort_keys=True),
        epsilon_json=json.dumps(dict(record.epsilon), sort_keys=True),
        signatures=[
            pb.RecordSignature(peer_id=p, record_hash=record_hash, signature=s)
            for p, s in sorted(signatures.items())
        ],
    )


def record_from_proto(proto: pb.AgreedRecord) -> tuple[AgreedRecord, dict[str, bytes]]:
    """The record and its signatures; CodecError if the record's JSON is malformed."""
    try:
        metrics = json.loads(proto.metrics_json or "{}")
        epsilon = json.loads(proto.epsilon_json or "{}")
    except ValueError as error:
        raise CodecError(f"malformed record JSON: {error}") from None
    if not isinstance(metrics, dict) or not isinstance(epsilon, dict):
        raise CodecError("record metrics and epsilon must be JSON objects")
    record = AgreedRecord(
        session_id=proto.session_id,
        round=proto.round,
        aggregate_hash=proto.aggregate_hash,
        model_hash=proto.model_hash,
        metrics_hash=proto.metrics_hash,
        prev_hash=proto.prev_hash,
        metrics=metrics,
        epsilon=epsilon,
    )
    return record, {s.peer_id: s.signature for s in proto.signatures}
