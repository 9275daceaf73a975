"""Succinct verification: every peer checks the aggregate without any other peer's vector.

Theory of operation
-------------------
The full transcript (:mod:`secagg.transcript`) made every peer download every survivor's
masked input: O(n·m) per peer, O(n²·m) out of the aggregator. Instead:

1. Once the aggregator has unmasked the sum z it fixes the *statement*
   (:class:`~secagg.messages.Statement`): adverts, the survivors' signed masked-input
   headers (each carries the SHA-256 of the survivor's vector), consistency signatures,
   the secrets it reconstructed (self-mask seeds of survivors, mask keys of dropped
   partners, each checkable against its owner's signed advert), and z; it signs it with its
   roster key and sends it to every survivor that revealed shares
   (:class:`~secagg.messages.ProofRequest`).
2. A challenge is derived from the statement's digest (Fiat–Shamir,
   :func:`secagg.linear_check.challenge_key`): λ = 128 pseudo-random 0/1 functionals r_j.
   Each survivor checks the statement shows its own input unaltered and the survivor set it
   signed, and signs a_uj = ⟨r_j, y_u⟩ mod 2^bits (:class:`~secagg.messages.LinearAnswers`).
3. The aggregator checks Σ_u a_uj against ⟨r_j, Σ_u y_u⟩ (one evaluation; each survivor's own
   only when the sum does not match, to name the one whose signed answers disagree with its
   signed input) and publishes the statement, the answers, and — for a survivor that did not
   answer (dropped late, or answered wrongly) — its signed masked vector instead
   (:class:`SuccinctTranscript`; survivors that already hold the statement get only
   :class:`ProofAnswers`).
4. Every verifier checks all signatures and rules of the statement (shared with the full
   transcript, :func:`secagg.transcript.check_published`), regenerates the mask correction C
   from the revealed seeds, and checks Σ_u a_uj = ⟨r_j, z − C − Σ_{fallback} y_v⟩ for all j
   (:func:`verify_succinct`). Soundness ≤ q·2^−128 after q grinding tries; privacy: see
   SECURITY.md "Succinct verification".

A peer now receives z (m words) and O(n²) small signed items, and sends y (m words) and λ
answers: about 2× its vector per round, for any n.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import RoundConfig
from .crypto import Verifier
from .linear_check import LAMBDA, challenge_key, linear_answers, sum_answers
from .messages import (
    ConsistencySignature,
    LinearAnswers,
    MaskedHeader,
    MaskedInput,
    Statement,
)
from .ring import WordArray, word_dtype
from .transcript import TranscriptError, VerifiedAggregate, check_published

__all__ = [
    "ProofAnswers",
    "SuccinctTranscript",
    "check_answers_form",
    "expected_answers",
    "verify_succinct",
]


@dataclass(frozen=True, slots=True, eq=False)
class ProofAnswers:
    """The aggregator's last message to a survivor that holds the statement already: the
    answers of every survivor, and the vectors of survivors without valid answers."""

    session_id: str
    round: int
    statement_sha256: bytes
    answers: tuple[LinearAnswers, ...]
    inputs: tuple[MaskedInput, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class SuccinctTranscript:
    """A round as published for succinct verification (and as stored in the ledger)."""

    statement: Statement
    answers: tuple[LinearAnswers, ...]
    inputs: tuple[MaskedInput, ...] = ()  # survivors without valid answers: their vectors

    @property
    def aggregator(self) -> str:
        return self.statement.aggregator

    @property
    def survivors(self) -> tuple[str, ...]:
        return self.statement.survivors

    @classmethod
    def completed(cls, statement: Statement, answers: ProofAnswers) -> SuccinctTranscript:
        return cls(statement, answers.answers, answers.inputs)


def check_answers_form(
    answers: LinearAnswers,
    config: RoundConfig,
    verifier: Verifier,
    statement_sha256: bytes,
    vector_sha256: bytes,
) -> str | None:
    """Why ``answers`` are not well-formed, signed answers to this statement (None if they
    are). Their values are checked against the sum, not here."""
    if (answers.session_id, answers.round) != (config.session_id, config.round):
        return (
            f"answers of {answers.sender} are for session {answers.session_id!r} "
            f"round {answers.round}"
        )
    if answers.statement_sha256 != statement_sha256:
        return f"answers of {answers.sender} answer another statement (another challenge)"
    if len(answers.answers) != LAMBDA or any(a >> config.bits for a in answers.answers):
        return f"answers of {answers.sender} are not {LAMBDA} words of {config.bits} bits"
    if not verifier.verify(answers.signature, answers.signed_payload(config.digest, vector_sha256)):
        return f"answers of {answers.sender} have an invalid signature (not over its signed input)"
    return None


def verify_succinct(
    transcript: SuccinctTranscript,
    config: RoundConfig,
    verifiers: Mapping[str, Verifier],
    *,
    aggregator: str | None = None,
    own: MaskedInput | None = None,
    signed: ConsistencySignature | None = None,
    own_answers: LinearAnswers | None = None,
) -> VerifiedAggregate:
    """Check a succinct transcript: every signature and rule, then the linear check.

    Args:
        transcript: as published by the round's aggregator (or read from the ledger).
        config: this peer's own copy of the round's parameters.
        verifiers: every roster peer's signature verifier.
        aggregator: the round's aggregator, if known: the statement must be its, signed.
        own: this peer's masked input, if it sent one: its header must appear unaltered.
        signed: this peer's consistency signature, if it sent one (the one survivor set).
        own_answers: this peer's answers, if it sent them: they must be published as sent.

    Raises:
        TranscriptError: naming the aggregator and exactly what is wrong.
    """
    statement = transcript.statement
    agg = statement.aggregator

    def fail(reason: str) -> TranscriptError:
        return TranscriptError(agg, reason)

    if aggregator is not None and agg != aggregator:
        raise TranscriptError(aggregator, f"published a statement in the name of {agg!r}")
    digest = config.digest
    statement_sha256 = statement.sha256(digest)
    if agg in verifiers and not verifiers[agg].verify(
        statement.signature, statement.signed_payload(digest)
    ):
        raise fail("the statement does not carry the aggregator's valid signature")
    z = statement.aggregate
    if z.shape != (config.vector_length,) or z.dtype != word_dtype(config.bits):
        raise fail("the aggregate has the wrong shape or type")
    checked = check_published(
        config,
        verifiers,
        session_id=statement.session_id,
        round_=statement.round,
        aggregator=agg,
        adverts=statement.adverts,
        masked=statement.masked,
        consistency=statement.consistency,
        secrets=(statement.seeds, statement.mask_keys),
        own=own.header() if own is not None else None,
        signed=signed,
    )
    headers: Mapping[str, MaskedHeader] = checked.headers

    answered: dict[str, LinearAnswers] = {}
    for answers in transcript.answers:
        u = answers.sender
        if u not in headers:
            raise fail(f"answers of {u!r}, who is not a survivor")
        if u in answered:
            raise fail(f"transcript lists two answers of {u}")
        problem = check_answers_form(
            answers, config, verifiers[u], statement_sha256, headers[u].vector_sha256
        )
        if problem is not None:
            raise fail(problem)
        answered[u] = answers
    fallback: dict[str, MaskedInput] = {}
    for message in transcript.inputs:
        u = message.sender
        if u not in headers or u in answered or u in fallback:
            raise fail(f"a masked vector of {u!r}, who is not a survivor without answers")
        if message.vector.shape != (config.vector_length,) or message.vector.dtype != z.dtype:
            raise fail(f"masked input of {u} has the wrong shape or type")
        if message.vector_sha256 != headers[u].vector_sha256:
            raise fail(f"masked input of {u} is not the one it signed (altered or swapped)")
        fallback[u] = message
    missing = sorted(set(headers) - set(answered) - set(fallback))
    if missing:
        raise fail(f"neither answers nor a masked input of survivors {missing}")
    if own_answers is not None:
        published = answered.get(own_answers.sender)
        # My answers may be replaced by my signed vector (they arrived late, say): that is
        # what every peer received before succinct verification. Altered, never.
        if published is not None and published != own_answers:
            raise fail("my linear-check answers are altered in the transcript")

    # Σ_u y_u = z − C; the survivors without answers are taken out with their vectors.
    answered_sum = z - checked.correction(config)
    for message in fallback.values():
        np.subtract(answered_sum, message.vector, out=answered_sum)
    expected = linear_answers(challenge_key(digest, statement_sha256), answered_sum)
    claimed = sum_answers([a.answers for a in answered.values()], config.bits)
    if expected != claimed:
        wrong = sum(1 for e, c in zip(expected, claimed, strict=True) if e != c)
        raise fail(
            f"the aggregate is not the sum of the signed masked inputs minus the masks: "
            f"{wrong} of {LAMBDA} linear checks fail"
        )
    return checked.verified(config, z)


def expected_answers(
    config: RoundConfig, statement: Statement, vector: WordArray
) -> tuple[int, ...]:
    """The honest answers of the holder of ``vector`` to ``statement``'s challenge."""
    return linear_answers(challenge_key(config.digest, statement.sha256(config.digest)), vector)
