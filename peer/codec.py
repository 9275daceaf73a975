"""Between secagg's message objects and the protobuf wire format, in exactly one place.

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
from typing import IO, Any

import numpy as np
from google.protobuf.message import DecodeError, Message

from secagg import (
    AdvertisedKeys,
    AdvertiseKeys,
    ConsistencySignature,
    LinearAnswers,
    MaskedInput,
    ProofAnswers,
    ProofRequest,
    ShareKeys,
    SharesToYou,
    Statement,
    SuccinctTranscript,
    SurvivorSet,
    Transcript,
    UnmaskRequest,
    UnmaskShares,
)
from secagg.cleartext import CleartextInput, CleartextTranscript, PlainSum
from secagg.messages import MaskedHeader
from secagg.ring import word_dtype

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
    "record_from_proto",
    "record_to_proto",
]

FRAGMENT_BYTES = 1 << 20


class CodecError(ValueError):
    """Bytes that are not a valid message of the expected kind."""


# ------------------------------------------------------------------ secagg <-> protobuf


def _pairs(items: Any) -> tuple[tuple[str, bytes], ...]:
    return tuple((item.peer, bytes(item.data)) for item in items)


def _addressed(pairs: tuple[tuple[str, bytes], ...]) -> list[pb.Addressed]:
    return [pb.Addressed(peer=peer, data=data) for peer, data in pairs]


def _vector_bytes(vector: np.ndarray[Any, Any]) -> tuple[int, bytes]:
    bits = vector.dtype.itemsize * 8
    return bits, vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()


def _vector(bits: int, raw: bytes) -> np.ndarray[Any, Any]:
    dtype = word_dtype(bits)
    if len(raw) % dtype.itemsize:
        raise CodecError(f"vector of {len(raw)} bytes is not a whole number of {bits}-bit words")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)


def _advert_pb(m: AdvertiseKeys) -> pb.AdvertiseKeys:
    return pb.AdvertiseKeys(
        sender=m.sender,
        session_id=m.session_id,
        round=m.round,
        channel_public=m.channel_public,
        mask_public=m.mask_public,
        self_mask_commitment=m.self_mask_commitment,
        signature=m.signature,
    )


def _advert(p: pb.AdvertiseKeys) -> AdvertiseKeys:
    return AdvertiseKeys(
        p.sender,
        p.session_id,
        p.round,
        p.channel_public,
        p.mask_public,
        p.self_mask_commitment,
        p.signature,
    )


def _masked_pb(m: MaskedInput) -> pb.MaskedInput:
    bits, raw = _vector_bytes(m.vector)
    return pb.MaskedInput(
        sender=m.sender,
        session_id=m.session_id,
        round=m.round,
        masked_with=list(m.masked_with),
        bits=bits,
        vector=raw,
        signature=m.signature,
    )


def _masked(p: pb.MaskedInput) -> MaskedInput:
    return MaskedInput(
        p.sender,
        p.session_id,
        p.round,
        tuple(p.masked_with),
        _vector(p.bits, p.vector),
        p.signature,
    )


def _consistency_pb(m: ConsistencySignature) -> pb.ConsistencySignature:
    return pb.ConsistencySignature(
        sender=m.sender, session_id=m.session_id, round=m.round, signature=m.signature
    )


def _consistency(p: pb.ConsistencySignature) -> ConsistencySignature:
    return ConsistencySignature(p.sender, p.session_id, p.round, p.signature)


def _unmask_pb(m: UnmaskShares) -> pb.UnmaskShares:
    return pb.UnmaskShares(
        sender=m.sender,
        session_id=m.session_id,
        round=m.round,
        self_mask_shares=_addressed(m.self_mask_shares),
        mask_key_shares=_addressed(m.mask_key_shares),
        signature=m.signature,
    )


def _unmask(p: pb.UnmaskShares) -> UnmaskShares:
    return UnmaskShares(
        p.sender,
        p.session_id,
        p.round,
        _pairs(p.self_mask_shares),
        _pairs(p.mask_key_shares),
        p.signature,
    )


def _header_pb(h: MaskedHeader) -> pb.MaskedHeader:
    return pb.MaskedHeader(
        sender=h.sender,
        masked_with=list(h.masked_with),
        vector_sha256=h.vector_sha256,
        signature=h.signature,
    )


def _header(p: pb.MaskedHeader) -> MaskedHeader:
    return MaskedHeader(p.sender, tuple(p.masked_with), p.vector_sha256, p.signature)


def _statement_pb(m: Statement) -> pb.Statement:
    bits, raw = _vector_bytes(m.aggregate)
    return pb.Statement(
        session_id=m.session_id,
        round=m.round,
        aggregator=m.aggregator,
        adverts=[_advert_pb(a) for a in m.adverts],
        masked=[_header_pb(h) for h in m.masked],
        consistency=[_consistency_pb(c) for c in m.consistency],
        seeds=_addressed(m.seeds),
        mask_keys=_addressed(m.mask_keys),
        bits=bits,
        aggregate=raw,
        signature=m.signature,
    )


def _statement(p: pb.Statement) -> Statement:
    return Statement(
        p.session_id,
        p.round,
        p.aggregator,
        tuple(_advert(a) for a in p.adverts),
        tuple(_header(h) for h in p.masked),
        tuple(_consistency(c) for c in p.consistency),
        _pairs(p.seeds),
        _pairs(p.mask_keys),
        _vector(p.bits, p.aggregate),
        p.signature,
    )


def _answers_pb(m: LinearAnswers) -> pb.LinearAnswers:
    return pb.LinearAnswers(
        sender=m.sender,
        session_id=m.session_id,
        round=m.round,
        statement_sha256=m.statement_sha256,
        answers=list(m.answers),
        signature=m.signature,
    )


def _answers(p: pb.LinearAnswers) -> LinearAnswers:
    return LinearAnswers(
        p.sender, p.session_id, p.round, p.statement_sha256, tuple(p.answers), p.signature
    )


def _cleartext_pb(m: CleartextInput) -> pb.CleartextInput:
    bits, raw = _vector_bytes(m.vector)
    return pb.CleartextInput(
        sender=m.sender,
        session_id=m.session_id,
        round=m.round,
        bits=bits,
        vector=raw,
        signature=m.signature,
    )


def _cleartext(p: pb.CleartextInput) -> CleartextInput:
    return CleartextInput(p.sender, p.session_id, p.round, _vector(p.bits, p.vector), p.signature)


def to_proto(message: object) -> Message:
    """The protobuf form of a secagg message, a Transcript, or a protobuf message itself."""
    if isinstance(message, Message):
        return message
    if isinstance(message, AdvertiseKeys):
        return _advert_pb(message)
    if isinstance(message, ShareKeys):
        return pb.ShareKeys(
            sender=message.sender,
            session_id=message.session_id,
            round=message.round,
            ciphertexts=_addressed(message.ciphertexts),
            signatures=list(message.signatures),
        )
    if isinstance(message, MaskedInput):
        return _masked_pb(message)
    if isinstance(message, ConsistencySignature):
        return _consistency_pb(message)
    if isinstance(message, UnmaskShares):
        return _unmask_pb(message)
    if isinstance(message, AdvertisedKeys):
        return pb.AdvertisedKeys(
            session_id=message.session_id,
            round=message.round,
            adverts=[_advert_pb(a) for a in message.adverts],
        )
    if isinstance(message, SharesToYou):
        return pb.SharesToYou(
            session_id=message.session_id,
            round=message.round,
            recipient=message.recipient,
            ciphertexts=_addressed(message.ciphertexts),
            signatures=list(message.signatures),
        )
    if isinstance(message, SurvivorSet):
        return pb.SurvivorSet(
            session_id=message.session_id, round=message.round, survivors=list(message.survivors)
        )
    if isinstance(message, UnmaskRequest):
        return pb.UnmaskRequest(
            session_id=message.session_id,
            round=message.round,
            survivors=list(message.survivors),
            dropped=list(message.dropped),
            signatures=[_consistency_pb(s) for s in message.signatures],
            masked=[_header_pb(h) for h in message.masked],
        )
    if isinstance(message, LinearAnswers):
        return _answers_pb(message)
    if isinstance(message, ProofRequest):
        return pb.ProofRequest(
            session_id=message.session_id,
            round=message.round,
            statement=_statement_pb(message.statement),
        )
    if isinstance(message, ProofAnswers):
        return pb.ProofAnswers(
            session_id=message.session_id,
            round=message.round,
            statement_sha256=message.statement_sha256,
            answers=[_answers_pb(a) for a in message.answers],
            inputs=[_masked_pb(m) for m in message.inputs],
        )
    if isinstance(message, SuccinctTranscript):
        return pb.SuccinctTranscript(
            statement=_statement_pb(message.statement),
            answers=[_answers_pb(a) for a in message.answers],
            inputs=[_masked_pb(m) for m in message.inputs],
        )
    if isinstance(message, CleartextInput):
        return _cleartext_pb(message)
    if isinstance(message, PlainSum):
        bits, raw = _vector_bytes(message.aggregate)
        return pb.PlainSum(
            session_id=message.session_id,
            round=message.round,
            aggregator=message.aggregator,
            survivors=message.survivors,
            bits=bits,
            aggregate=raw,
        )
    if isinstance(message, CleartextTranscript):
        bits, raw = _vector_bytes(message.aggregate)
        return pb.CleartextTranscript(
            session_id=message.session_id,
            round=message.round,
            aggregator=message.aggregator,
            inputs=[_cleartext_pb(i) for i in message.inputs],
            bits=bits,
            aggregate=raw,
        )
    if isinstance(message, Transcript):
        bits, raw = _vector_bytes(message.aggregate)
        return pb.Transcript(
            session_id=message.session_id,
            round=message.round,
            aggregator=message.aggregator,
            adverts=[_advert_pb(a) for a in message.adverts],
            masked_inputs=[_masked_pb(m) for m in message.masked_inputs],
            consistency=[_consistency_pb(c) for c in message.consistency],
            unmask=[_unmask_pb(u) for u in message.unmask],
            bits=bits,
            aggregate=raw,
        )
    raise TypeError(f"no wire form for {type(message).__name__}")


def from_proto(p: Message) -> object:
    """The secagg object for a protobuf message (other protobuf messages are returned as is).

    Raises:
        CodecError: the message is malformed (wrong key sizes, vector length, ...).
    """
    try:
        return _from_proto(p)
    except (ValueError, TypeError) as error:
        raise CodecError(f"malformed {type(p).__name__}: {error}") from None


def _from_proto(p: Message) -> object:
    if isinstance(p, pb.AdvertiseKeys):
        return _advert(p)
    if isinstance(p, pb.ShareKeys):
        return ShareKeys(
            p.sender, p.session_id, p.round, _pairs(p.ciphertexts), tuple(p.signatures)
        )
    if isinstance(p, pb.MaskedInput):
        return _masked(p)
    if isinstance(p, pb.ConsistencySignature):
        return _consistency(p)
    if isinstance(p, pb.UnmaskShares):
        return _unmask(p)
    if isinstance(p, pb.AdvertisedKeys):
        return AdvertisedKeys(p.session_id, p.round, tuple(_advert(a) for a in p.adverts))
    if isinstance(p, pb.SharesToYou):
        return SharesToYou(
            p.session_id, p.round, p.recipient, _pairs(p.ciphertexts), tuple(p.signatures)
        )
    if isinstance(p, pb.SurvivorSet):
        return SurvivorSet(p.session_id, p.round, tuple(p.survivors))
    if isinstance(p, pb.UnmaskRequest):
        return UnmaskRequest(
            p.session_id,
            p.round,
            tuple(p.survivors),
            tuple(p.dropped),
            tuple(_consistency(s) for s in p.signatures),
            tuple(_header(h) for h in p.masked),
        )
    if isinstance(p, pb.LinearAnswers):
        return _answers(p)
    if isinstance(p, pb.ProofRequest):
        return ProofRequest(p.session_id, p.round, _statement(p.statement))
    if isinstance(p, pb.ProofAnswers):
        return ProofAnswers(
            p.session_id,
            p.round,
            p.statement_sha256,
            tuple(_answers(a) for a in p.answers),
            tuple(_masked(m) for m in p.inputs),
        )
    if isinstance(p, pb.SuccinctTranscript):
        return SuccinctTranscript(
            _statement(p.statement),
            tuple(_answers(a) for a in p.answers),
            tuple(_masked(m) for m in p.inputs),
        )
    if isinstance(p, pb.CleartextInput):
        return _cleartext(p)
    if isinstance(p, pb.PlainSum):
        return PlainSum(
            p.session_id, p.round, p.aggregator, tuple(p.survivors), _vector(p.bits, p.aggregate)
        )
    if isinstance(p, pb.CleartextTranscript):
        return CleartextTranscript(
            p.session_id,
            p.round,
            p.aggregator,
            tuple(_cleartext(i) for i in p.inputs),
            _vector(p.bits, p.aggregate),
        )
    if isinstance(p, pb.Transcript):
        return Transcript(
            session_id=p.session_id,
            round=p.round,
            aggregator=p.aggregator,
            adverts=tuple(_advert(a) for a in p.adverts),
            masked_inputs=tuple(_masked(m) for m in p.masked_inputs),
            consistency=tuple(_consistency(c) for c in p.consistency),
            unmask=tuple(_unmask(u) for u in p.unmask),
            aggregate=_vector(p.bits, p.aggregate),
        )
    return p


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


def fragments(message: object) -> Iterator[pb.Fragment]:
    """Cut one message into fragments of at most FRAGMENT_BYTES of payload."""
    kind, data = encode(message)
    total = len(data)
    if total == 0:
        yield pb.Fragment(kind=kind, total_size=0, last=True, data=b"")
        return
    view = memoryview(data)
    for start in range(0, total, FRAGMENT_BYTES):
        end = min(start + FRAGMENT_BYTES, total)
        yield pb.Fragment(
            kind=kind, total_size=total, last=end == total, data=bytes(view[start:end])
        )


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
