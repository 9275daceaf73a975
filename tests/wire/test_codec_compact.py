"""Compact wire forms of the round's small signed items (peer/codec_compact.py, issue 11).

Mask partners and survivor lists travel as bitmaps over one id table per message, answers as
packed words, and nested items inherit the session and round of their container. The forms
are lossless (decoding gives back the very objects), nothing signed changes (a bitmap that
names another set fails its owner's signature, and honest peers refuse it naming the
aggregator), malformed forms are refused by the codec, and the old forms, which ledgers hold,
still decode and verify.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.codec import CodecError, decode, encode
from peer.codec_compact import bitmap, from_bitmap, id_table, pack_words, unpack_words
from peer.wire import peer_pb2 as pb
from secagg import (
    GraphKind,
    InvalidSignatureError,
    ProofAnswers,
    ProofRequest,
    RoundConfig,
    SecAggError,
    SharesToYou,
    Statement,
    SuccinctTranscript,
    UnmaskRequest,
    testing,
    verify_succinct,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "secagg"))
from secagg_testlib import AGGREGATOR, Round, make_round  # type: ignore[import-not-found, unused-ignore]

# Written by the codec of commit fa05c4a (before the compact forms), as a ledger stores it:
#   encode(simulate(6, 8, threshold=4, drops={Stage.MASKED: 1}, session_id="legacy-wire",
#                   round_=2, seed=5).succinct)
LEGACY = Path(__file__).parent / "data" / "legacy_succinct_transcript.bin"


def _run(r: Round, drop: str | None = None) -> dict[str, list[Any]]:
    """Drive a round to its end; every message the aggregator sent, by type name."""
    sent: dict[str, list[Any]] = {}
    replies: dict[str, Any] = r.start()
    while True:
        outgoing = r.collect(replies)
        if not outgoing:
            break
        for message in outgoing.values():
            sent.setdefault(type(message).__name__, []).append(message)
        # ``drop`` sends no masked input (it received its shares): a dropped mask partner.
        shares = any(isinstance(m, SharesToYou) for m in outgoing.values())
        replies = r.respond(outgoing, skip=[drop] if drop and shares else [])
    sent["ProofAnswers"] = [r.aggregator.proof_answers()]
    sent["SuccinctTranscript"] = [r.aggregator.succinct_transcript()]
    return sent


def _same_statement(a: Statement, b: Statement, digest: bytes) -> bool:
    return a.sha256(digest) == b.sha256(digest) and a.signature == b.signature


@pytest.mark.parametrize(
    ("graph", "degree"), [(GraphKind.COMPLETE, None), (GraphKind.SECAGG_PLUS, 4)]
)
def test_compact_forms_give_back_the_very_messages(graph: GraphKind, degree: int | None) -> None:
    """Every aggregator message of a round with a dropped partner, on a complete and on a
    sparse graph, decodes to what was encoded, ids in the same order (a participant compares
    its own header with ==)."""
    r = make_round(7, length=5, graph=graph, degree=degree)
    sent = _run(r, drop=r.peers[3])
    assert any(m.dropped for m in sent["UnmaskRequest"])  # the dropped list is exercised
    digest = r.config.digest
    for name, messages in sent.items():
        for message in messages:
            kind, raw = encode(message)
            back = decode(kind, raw)
            assert type(back) is type(message)
            if isinstance(message, ProofRequest):
                assert _same_statement(back.statement, message.statement, digest)  # type: ignore[attr-defined]
                assert back.statement.masked == message.statement.masked  # type: ignore[attr-defined]
            elif isinstance(message, SuccinctTranscript):
                assert _same_statement(back.statement, message.statement, digest)  # type: ignore[attr-defined]
                assert back.answers == message.answers  # type: ignore[attr-defined]
            elif isinstance(message, ProofAnswers):
                assert back.answers == message.answers  # type: ignore[attr-defined]
                assert back.statement_sha256 == message.statement_sha256  # type: ignore[attr-defined]
            else:
                assert back == message, name


def test_the_compact_forms_are_the_ones_sent() -> None:
    """Bitmaps, packed answers and inherited fields are what goes on the wire (not the old
    lists of ids and varints), and they are smaller."""
    r = make_round(6, length=4)
    sent = _run(r)
    request = pb.UnmaskRequest.FromString(encode(sent["UnmaskRequest"][0])[1])
    assert request.ids
    assert request.compact
    assert request.survivors_bitmap
    assert not request.survivors
    assert all(h.partners and not h.masked_with for h in request.masked)
    assert all(not s.session_id for s in request.signatures)
    answers = pb.ProofAnswers.FromString(encode(sent["ProofAnswers"][0])[1])
    assert answers.compact
    assert all(a.answer_bytes == 4 and not a.answers for a in answers.answers)
    assert all(
        len(a.packed) == 4 * len(sent["ProofAnswers"][0].answers[0].answers)
        for a in answers.answers
    )
    adverts = pb.AdvertisedKeys.FromString(encode(sent["AdvertisedKeys"][0])[1])
    assert adverts.compact
    assert all(not a.session_id for a in adverts.adverts)


def test_a_bitmap_naming_other_partners_fails_the_signature_and_is_refused() -> None:
    """The aggregator rewrites one survivor's partner bitmap in the unmask request (drops a
    partner, so that survivor seems to have masked with fewer peers). The header decodes, its
    owner's signature does not verify, and the honest participant refuses naming the
    aggregator."""
    r = make_round(6, length=4)
    replies: dict[str, Any] = r.start()
    for _ in range(3):
        outgoing = r.collect(replies)
        replies = r.respond(outgoing)
    outgoing = r.collect(replies)
    recipient = r.peers[1]
    request = outgoing[recipient]
    assert isinstance(request, UnmaskRequest)
    proto = pb.UnmaskRequest.FromString(encode(request)[1])
    victim = next(h for h in proto.masked if h.sender != recipient)
    original = victim.partners
    victim.partners = bytes([original[0] & (original[0] - 1)]) + original[1:]  # clear a bit
    assert victim.partners != original
    tampered = decode("UnmaskRequest", proto.SerializeToString())
    assert isinstance(tampered, UnmaskRequest)
    header = next(h for h in tampered.masked if h.sender == victim.sender)
    assert not r.verifiers[victim.sender].verify(
        header.signature, header.signed_payload(r.config.digest)
    )
    with pytest.raises(InvalidSignatureError) as refused:
        r.participants[recipient].receive(tampered)
    assert refused.value.offender == AGGREGATOR
    assert victim.sender in str(refused.value)


def _corrupt(kind: str, raw: bytes, edit: Any) -> bytes:
    proto = getattr(pb, kind).FromString(raw)
    edit(proto)
    return proto.SerializeToString()  # type: ignore[no-any-return]


def test_malformed_compact_forms_are_refused() -> None:
    r = make_round(5, length=4)
    sent = _run(r)
    _, request = encode(sent["UnmaskRequest"][0])
    _, answers = encode(sent["ProofAnswers"][0])
    _, adverts = encode(sent["AdvertisedKeys"][0])

    def past_the_table(p: Any) -> None:
        p.masked[0].partners = b"\xff" * len(p.masked[0].partners)  # 8 bits, 5 ids

    def short_bitmap(p: Any) -> None:
        p.survivors_bitmap = p.survivors_bitmap + b"\x00"

    def both_forms(p: Any) -> None:
        p.masked[0].masked_with.append(p.ids[0])

    def repeated_id(p: Any) -> None:
        p.ids.append(p.ids[0])

    def own_session(p: Any) -> None:
        p.signatures[0].session_id = "another"

    cases = [
        ("UnmaskRequest", request, past_the_table, "past the end of its table"),
        ("UnmaskRequest", request, short_bitmap, "bitmap of"),
        ("UnmaskRequest", request, both_forms, "both as ids and as a bitmap"),
        ("UnmaskRequest", request, repeated_id, "names an id twice"),
        ("UnmaskRequest", request, own_session, "carries its own session"),
        ("AdvertisedKeys", adverts, lambda p: setattr(p.adverts[0], "round", 9), "own session"),
        ("ProofAnswers", answers, lambda p: setattr(p.answers[0], "answer_bytes", 9), "1 to 8"),
        (
            "ProofAnswers",
            answers,
            lambda p: setattr(p.answers[0], "packed", b"\x01" * 5),
            "words of 4",
        ),
        (
            "ProofAnswers",
            answers,
            lambda p: p.answers[0].answers.append(1),
            "packed and as varints",
        ),
        (
            "ProofAnswers",
            answers,
            lambda p: setattr(p.answers[0], "statement_sha256", b"x" * 32),
            "own statement digest",
        ),
    ]
    for kind, raw, edit, why in cases:
        with pytest.raises(CodecError, match=why):
            decode(kind, _corrupt(kind, raw, edit))


def test_a_stored_transcript_in_the_old_form_still_decodes_and_verifies() -> None:
    """Bytes written by the codec before the compact forms (lists of ids, varint answers,
    full nested items; a round with a dropped peer), as a ledger holds them: they decode, the
    round verifies, and the same transcript re-encoded is smaller and equal."""
    legacy = LEGACY.read_bytes()
    peers = testing.peer_ids(6)
    config = RoundConfig("legacy-wire", 2, peers, 4, 8)
    _, verifiers = testing.test_identities(peers, 5)
    transcript = decode("SuccinctTranscript", legacy)
    assert isinstance(transcript, SuccinctTranscript)
    assert transcript.statement.mask_keys  # a dropped partner's key: the dropped path
    proto = pb.SuccinctTranscript.FromString(legacy)
    assert not proto.compact
    assert proto.answers[0].answers
    verified = verify_succinct(transcript, config, verifiers)
    assert len(verified.survivors) == 5
    _, again = encode(transcript)
    assert len(again) < len(legacy)
    back = decode("SuccinctTranscript", again)
    assert isinstance(back, SuccinctTranscript)
    assert _same_statement(back.statement, transcript.statement, config.digest)
    assert back.answers == transcript.answers
    verify_succinct(back, config, verifiers)


def test_an_edited_answer_in_the_packed_form_fails_verification() -> None:
    """Packing changes no signature: one answer word edited in the packed bytes is refused
    by verification, naming its signer."""
    legacy = LEGACY.read_bytes()
    peers = testing.peer_ids(6)
    config = RoundConfig("legacy-wire", 2, peers, 4, 8)
    _, verifiers = testing.test_identities(peers, 5)
    transcript = decode("SuccinctTranscript", legacy)
    proto = pb.SuccinctTranscript.FromString(encode(transcript)[1])
    first = proto.answers[0]
    first.packed = bytes([first.packed[0] ^ 1]) + first.packed[1:]
    edited = decode("SuccinctTranscript", proto.SerializeToString())
    assert isinstance(edited, SuccinctTranscript)
    with pytest.raises(SecAggError) as refused:
        verify_succinct(edited, config, verifiers)
    assert first.sender in str(refused.value)


@settings(deadline=None, derandomize=True, database=None, max_examples=200)
@given(st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=8), max_size=6))
def test_any_lists_round_trip_through_a_table(lists: list[list[str]]) -> None:
    """Whatever the lists (repeats, disagreeing orders), a list is either reproduced exactly
    by its bitmap or left as ids; lists sorted by one common order all get a bitmap."""
    table = id_table(lists)
    assert sorted(table) == sorted({u for items in lists for u in items})
    for items in lists:
        bits = bitmap(items, table)
        if bits is not None:
            assert from_bitmap(bits, table, "list") == tuple(items)
    ordered = [sorted(set(items), key="jihgfedcba".index) for items in lists]
    table = id_table(ordered)
    for items in ordered:
        bits = bitmap(items, table)
        assert bits is not None
        assert from_bitmap(bits, table, "list") == tuple(items)


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=20))
def test_packed_words_round_trip(values: list[int]) -> None:
    width, raw = pack_words(values)
    assert unpack_words(width, raw) == tuple(values)
    assert width == max(1, (max(values, default=0).bit_length() + 7) // 8)
