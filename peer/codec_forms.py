"""Secagg's message objects to and from their protobuf form (:mod:`peer.codec` puts them on
the wire).

Each ``_x_pb`` / ``_x`` pair converts one message; containers of many small signed items
use the compact forms of :mod:`peer.codec_compact` (id tables and bitmaps, packed answers,
inherited session and round), and decode the older, longer forms as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.message import Message

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
from secagg.ring import le_view, word_dtype

from .codec_compact import bitmap, check_table, from_bitmap, id_table, pack_words, unpack_words
from .wire import peer_pb2 as pb

__all__ = ["CodecError", "from_proto", "to_proto", "vector_apart"]


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


def _input_vector(vector: np.ndarray[Any, Any], with_vector: bool) -> tuple[int, bytes]:
    """An input's word size and vector bytes; no bytes without ``with_vector`` (the vector
    then travels apart: :func:`vector_apart`)."""
    return _vector_bytes(vector) if with_vector else (vector.dtype.itemsize * 8, b"")


def _vector(bits: int, raw: bytes, read_only: bool = False) -> np.ndarray[Any, Any]:
    """The words of ``raw`` in native order. ``read_only`` (for the messages that freeze
    their vector anyway: a masked input, a statement) skips the copy on a little-endian
    machine: the array is a read-only view of ``raw``."""
    dtype = word_dtype(bits)
    if len(raw) % dtype.itemsize:
        raise CodecError(f"vector of {len(raw)} bytes is not a whole number of {bits}-bit words")
    words = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    return words if read_only and words.dtype == dtype else words.astype(dtype)


# A nested item's (session_id, round) when its container is compact: the container's, which
# the item must then not carry itself (None: the item carries its own).
Inherited = tuple[str, int] | None


def _compact(items: Sequence[Any], session_id: str, round: int) -> bool:
    """Whether every item has the container's session and round (then they are left out)."""
    return all((i.session_id, i.round) == (session_id, round) for i in items)


def _inherited(p: Any) -> Inherited:
    """What the items of container ``p`` inherit: its session and round if it is compact."""
    return (p.session_id, p.round) if p.compact else None


def _own_session(m: Any, compact: bool) -> dict[str, Any]:
    """Item ``m``'s session and round fields: left empty in a compact container."""
    return {"session_id": "" if compact else m.session_id, "round": 0 if compact else m.round}


def _inherit(p: Any, inherited: Inherited, what: str) -> tuple[str, int]:
    if inherited is None:
        return p.session_id, p.round
    if p.session_id or p.round:
        raise ValueError(f"{what} carries its own session and round in a compact message")
    return inherited


def _advert_pb(m: AdvertiseKeys, compact: bool = False) -> pb.AdvertiseKeys:
    return pb.AdvertiseKeys(
        sender=m.sender,
        **_own_session(m, compact),
        channel_public=m.channel_public,
        mask_public=m.mask_public,
        self_mask_commitment=m.self_mask_commitment,
        signature=m.signature,
    )


def _advert(p: pb.AdvertiseKeys, inherited: Inherited = None) -> AdvertiseKeys:
    return AdvertiseKeys(
        p.sender,
        *_inherit(p, inherited, f"the advert of {p.sender}"),
        p.channel_public,
        p.mask_public,
        p.self_mask_commitment,
        p.signature,
    )


def _masked_pb(m: MaskedInput, with_vector: bool = True) -> pb.MaskedInput:
    bits, raw = _input_vector(m.vector, with_vector)
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
        _vector(p.bits, p.vector, read_only=True),
        p.signature,
    )


def _consistency_pb(m: ConsistencySignature, compact: bool = False) -> pb.ConsistencySignature:
    return pb.ConsistencySignature(
        sender=m.sender,
        **_own_session(m, compact),
        signature=m.signature,
    )


def _consistency(p: pb.ConsistencySignature, inherited: Inherited = None) -> ConsistencySignature:
    session_id, round = _inherit(p, inherited, f"the consistency signature of {p.sender}")
    return ConsistencySignature(p.sender, session_id, round, p.signature)


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


class _IdLists:
    """The id table of one message's lists (:func:`~peer.codec_compact.id_table`), and
    each list in its shorter form: a bitmap over the table, or its ids if the table's order
    does not reproduce it."""

    def __init__(self, lists: Sequence[Sequence[str]]) -> None:
        self.table = id_table(lists)
        self.used = False  # the table goes on the wire only if a bitmap refers to it

    def encode(self, items: Sequence[str]) -> tuple[list[str], bytes]:
        bits = bitmap(items, self.table)
        if bits is None:
            return list(items), b""
        self.used = self.used or bool(bits)
        return [], bits

    def ids(self) -> list[str]:
        return list(self.table) if self.used else []


def _id_list(ids: Sequence[str], bits: bytes, table: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A list sent as ids or as a bitmap over ``table`` (not both)."""
    if bits and ids:
        raise ValueError(f"{what} is sent both as ids and as a bitmap")
    return from_bitmap(bits, table, what) if bits else tuple(ids)


def _header_pb(h: MaskedHeader, lists: _IdLists) -> pb.MaskedHeader:
    ids, bits = lists.encode(h.masked_with)
    return pb.MaskedHeader(
        sender=h.sender,
        masked_with=ids,
        vector_sha256=h.vector_sha256,
        signature=h.signature,
        partners=bits,
    )


def _header(p: pb.MaskedHeader, table: tuple[str, ...]) -> MaskedHeader:
    partners = _id_list(p.masked_with, p.partners, table, f"the mask partners of {p.sender}")
    return MaskedHeader(p.sender, partners, p.vector_sha256, p.signature)


def _statement_pb(m: Statement) -> pb.Statement:
    bits, raw = _vector_bytes(m.aggregate)
    compact = _compact((*m.adverts, *m.consistency), m.session_id, m.round)
    lists = _IdLists([h.masked_with for h in m.masked])
    masked = [_header_pb(h, lists) for h in m.masked]
    return pb.Statement(
        session_id=m.session_id,
        round=m.round,
        aggregator=m.aggregator,
        adverts=[_advert_pb(a, compact) for a in m.adverts],
        masked=masked,
        consistency=[_consistency_pb(c, compact) for c in m.consistency],
        seeds=_addressed(m.seeds),
        mask_keys=_addressed(m.mask_keys),
        bits=bits,
        aggregate=raw,
        signature=m.signature,
        ids=lists.ids(),
        compact=compact,
    )


def _statement(p: pb.Statement) -> Statement:
    inherited = _inherited(p)
    table = check_table(p.ids)
    return Statement(
        p.session_id,
        p.round,
        p.aggregator,
        tuple(_advert(a, inherited) for a in p.adverts),
        tuple(_header(h, table) for h in p.masked),
        tuple(_consistency(c, inherited) for c in p.consistency),
        _pairs(p.seeds),
        _pairs(p.mask_keys),
        _vector(p.bits, p.aggregate, read_only=True),
        p.signature,
    )


def _answers_pb(m: LinearAnswers, compact: bool = False) -> pb.LinearAnswers:
    width, packed = pack_words(m.answers) if m.answers else (0, b"")
    return pb.LinearAnswers(
        sender=m.sender,
        **_own_session(m, compact),
        statement_sha256=b"" if compact else m.statement_sha256,
        packed=packed,
        answer_bytes=width,
        signature=m.signature,
    )


def _answers(
    p: pb.LinearAnswers, inherited: Inherited = None, statement_sha256: bytes = b""
) -> LinearAnswers:
    what = f"the answers of {p.sender}"
    session_id, round = _inherit(p, inherited, what)
    if inherited is not None:
        if p.statement_sha256:
            raise ValueError(f"{what} carry their own statement digest in a compact message")
    else:
        statement_sha256 = p.statement_sha256
    if p.packed or p.answer_bytes:
        if p.answers:
            raise ValueError(f"{what} are sent both packed and as varints")
        answers = unpack_words(p.answer_bytes, p.packed)
    else:
        answers = tuple(p.answers)  # the form before packed answers (stored transcripts)
    return LinearAnswers(p.sender, session_id, round, statement_sha256, answers, p.signature)


def _answers_compact(
    answers: Sequence[LinearAnswers], statement_sha256: bytes, session_id: str, round: int
) -> bool:
    return _compact(answers, session_id, round) and all(
        a.statement_sha256 == statement_sha256 for a in answers
    )


def _cleartext_pb(m: CleartextInput, with_vector: bool = True) -> pb.CleartextInput:
    bits, raw = _input_vector(m.vector, with_vector)
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


def _unmask_request_pb(m: UnmaskRequest) -> pb.UnmaskRequest:
    compact = _compact(m.signatures, m.session_id, m.round)
    lists = _IdLists([*(h.masked_with for h in m.masked), m.survivors, m.dropped])
    masked = [_header_pb(h, lists) for h in m.masked]
    survivors, survivors_bits = lists.encode(m.survivors)
    dropped, dropped_bits = lists.encode(m.dropped)
    return pb.UnmaskRequest(
        session_id=m.session_id,
        round=m.round,
        survivors=survivors,
        dropped=dropped,
        signatures=[_consistency_pb(s, compact) for s in m.signatures],
        masked=masked,
        ids=lists.ids(),
        survivors_bitmap=survivors_bits,
        dropped_bitmap=dropped_bits,
        compact=compact,
    )


def _unmask_request(p: pb.UnmaskRequest) -> UnmaskRequest:
    inherited = _inherited(p)
    table = check_table(p.ids)
    return UnmaskRequest(
        p.session_id,
        p.round,
        _id_list(p.survivors, p.survivors_bitmap, table, "the survivor set"),
        _id_list(p.dropped, p.dropped_bitmap, table, "the dropped set"),
        tuple(_consistency(s, inherited) for s in p.signatures),
        tuple(_header(h, table) for h in p.masked),
    )


def vector_apart(message: object) -> tuple[Message, int, memoryview] | None:
    """For an input that carries one vector at its top level (masked or cleartext): its
    protobuf form without the vector, the vector field's number, and the vector's
    little-endian bytes, without a copy (:func:`peer.codec.fragments` cuts them straight
    into fragments). None for any other message."""
    if isinstance(message, MaskedInput):
        number = pb.MaskedInput.VECTOR_FIELD_NUMBER
        return _masked_pb(message, with_vector=False), number, le_view(message.vector)
    if isinstance(message, CleartextInput):
        number = pb.CleartextInput.VECTOR_FIELD_NUMBER
        return _cleartext_pb(message, with_vector=False), number, le_view(message.vector)
    return None


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
        compact = _compact(message.adverts, message.session_id, message.round)
        return pb.AdvertisedKeys(
            session_id=message.session_id,
            round=message.round,
            adverts=[_advert_pb(a, compact) for a in message.adverts],
            compact=compact,
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
        return _unmask_request_pb(message)
    if isinstance(message, LinearAnswers):
        return _answers_pb(message)
    if isinstance(message, ProofRequest):
        return pb.ProofRequest(
            session_id=message.session_id,
            round=message.round,
            statement=_statement_pb(message.statement),
        )
    if isinstance(message, ProofAnswers):
        compact = _answers_compact(
            message.answers, message.statement_sha256, message.session_id, message.round
        )
        return pb.ProofAnswers(
            session_id=message.session_id,
            round=message.round,
            statement_sha256=message.statement_sha256,
            answers=[_answers_pb(a, compact) for a in message.answers],
            inputs=[_masked_pb(m) for m in message.inputs],
            compact=compact,
        )
    if isinstance(message, SuccinctTranscript):
        statement = message.statement
        # The answers' statement digest is computed with the round's parameters, which the
        # codec does not have: the transcript carries it once when all answers share it.
        digest = message.answers[0].statement_sha256 if message.answers else b""
        compact = bool(message.answers) and _answers_compact(
            message.answers, digest, statement.session_id, statement.round
        )
        return pb.SuccinctTranscript(
            statement=_statement_pb(statement),
            answers=[_answers_pb(a, compact) for a in message.answers],
            inputs=[_masked_pb(m) for m in message.inputs],
            statement_sha256=digest if compact else b"",
            compact=compact,
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
        inherited = _inherited(p)
        return AdvertisedKeys(
            p.session_id, p.round, tuple(_advert(a, inherited) for a in p.adverts)
        )
    if isinstance(p, pb.SharesToYou):
        return SharesToYou(
            p.session_id, p.round, p.recipient, _pairs(p.ciphertexts), tuple(p.signatures)
        )
    if isinstance(p, pb.SurvivorSet):
        return SurvivorSet(p.session_id, p.round, tuple(p.survivors))
    if isinstance(p, pb.UnmaskRequest):
        return _unmask_request(p)
    if isinstance(p, pb.LinearAnswers):
        return _answers(p)
    if isinstance(p, pb.ProofRequest):
        return ProofRequest(p.session_id, p.round, _statement(p.statement))
    if isinstance(p, pb.ProofAnswers):
        inherited = _inherited(p)
        return ProofAnswers(
            p.session_id,
            p.round,
            p.statement_sha256,
            tuple(_answers(a, inherited, p.statement_sha256) for a in p.answers),
            tuple(_masked(m) for m in p.inputs),
        )
    if isinstance(p, pb.SuccinctTranscript):
        statement = _statement(p.statement)
        inherited = (statement.session_id, statement.round) if p.compact else None
        if p.statement_sha256 and not p.compact:
            raise ValueError("a statement digest without compact answers")
        return SuccinctTranscript(
            statement,
            tuple(_answers(a, inherited, p.statement_sha256) for a in p.answers),
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
