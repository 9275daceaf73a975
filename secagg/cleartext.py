"""Cleartext summation: the insecure baseline that secure aggregation is measured against.

Each participant sends its vector in the clear (signed); the aggregator sums. Nothing is
hidden from the aggregator, so peers refuse such sessions unless their local policy
explicitly allows it (``allow_cleartext``); it exists for benchmarks ("secure round vs
plain round on the same peers") and debugging. Same shape as the secure roles: a
participant with ``start``/``receive``, an aggregator with ``receive``/``pending``/
``close_stage``/``result``/``transcript``, and :func:`verify_cleartext_transcript`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from .aggregator import AggregateResult, AggregatorState
from .config import RoundConfig, Stage
from .crypto import Signer, Verifier, canonical
from .errors import InvalidSignatureError, LocalProtocolError, RemoteProtocolError, RoundAborted
from .messages import vector_digest
from .ring import WordArray, word_dtype

__all__ = [
    "CleartextAggregator",
    "CleartextInput",
    "CleartextParticipant",
    "CleartextTranscript",
    "verify_cleartext_transcript",
]


@dataclass(frozen=True, slots=True, eq=False)
class CleartextInput:
    sender: str
    session_id: str
    round: int
    vector: WordArray
    signature: bytes

    def signed_payload(self, digest: bytes) -> bytes:
        return canonical("cleartext/input/v1", digest, self.sender, vector_digest(self.vector))


@dataclass(frozen=True, slots=True, eq=False)
class CleartextTranscript:
    session_id: str
    round: int
    aggregator: str
    inputs: tuple[CleartextInput, ...]
    aggregate: WordArray

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(i.sender for i in self.inputs)


class _ParticipantState(StrEnum):
    NEW = "new"
    DONE = "done"
    FAILED = "failed"


class CleartextParticipant:
    def __init__(self, config: RoundConfig, me: str, signer: Signer, x: WordArray) -> None:
        if not config.is_member(me):
            raise LocalProtocolError(f"{me} is not in the roster of this round")
        self.config, self.me, self._signer, self._x = config, me, signer, np.asarray(x)
        self.state = _ParticipantState.NEW

    def start(self) -> CleartextInput:
        if self.state is not _ParticipantState.NEW:
            self.state = _ParticipantState.FAILED
            raise LocalProtocolError("start() called twice")
        unsigned = CleartextInput(self.me, self.config.session_id, self.config.round, self._x, b"")
        self.state = _ParticipantState.DONE
        signature = self._signer.sign(unsigned.signed_payload(self.config.digest))
        return CleartextInput(
            self.me, self.config.session_id, self.config.round, self._x, signature
        )


class CleartextAggregator:
    """One stage (named ``masked`` so deadlines and drop reports read the same)."""

    def __init__(self, config: RoundConfig, verifiers: Mapping[str, Verifier], me: str) -> None:
        self.config, self.me, self._verifiers = config, me, verifiers
        self.state = AggregatorState.RUNNING
        self.stage = Stage.MASKED
        self._inputs: dict[str, CleartextInput] = {}
        self.dropped: dict[Stage, tuple[str, ...]] = {}
        self.result: AggregateResult | None = None

    def pending(self) -> frozenset[str]:
        if self.state is not AggregatorState.RUNNING:
            return frozenset()
        return frozenset(self.config.peers) - set(self._inputs)

    def receive(self, message: object) -> None:
        if self.state is not AggregatorState.RUNNING:
            raise LocalProtocolError(f"round is {self.state.value}")
        if not isinstance(message, CleartextInput):
            sender = str(getattr(message, "sender", "?"))
            raise RemoteProtocolError(sender, f"sent {type(message).__name__} in a cleartext round")
        sender, config = message.sender, self.config
        if not config.is_member(sender) or sender in self._inputs:
            raise RemoteProtocolError(sender, "unexpected or duplicate input")
        if (message.session_id, message.round) != (config.session_id, config.round):
            raise RemoteProtocolError(sender, "input for another session or round (replay)")
        if message.vector.shape != (config.vector_length,) or message.vector.dtype != word_dtype(
            config.bits
        ):
            raise RemoteProtocolError(sender, "input vector has the wrong shape or type")
        if not self._verifiers[sender].verify(
            message.signature, message.signed_payload(config.digest)
        ):
            raise InvalidSignatureError(sender, "invalid signature on its input")
        self._inputs[sender] = message

    def close_stage(self) -> dict[str, object]:
        if len(self._inputs) < self.config.threshold:
            self.state = AggregatorState.ABORTED
            raise RoundAborted(
                f"only {len(self._inputs)} inputs, threshold is {self.config.threshold}"
            )
        self.dropped[Stage.MASKED] = tuple(sorted(self.pending()))
        total = _sum(self._inputs.values(), self.config)
        survivors = tuple(u for u in self.config.peers if u in self._inputs)
        self.result = AggregateResult(total, survivors, dict(self.dropped))
        self.state = AggregatorState.DONE
        return {}

    def transcript(self) -> CleartextTranscript:
        if self.result is None:
            raise LocalProtocolError("the round has no result to publish")
        inputs = tuple(self._inputs[u] for u in self.result.survivors)
        return CleartextTranscript(
            self.config.session_id, self.config.round, self.me, inputs, self.result.aggregate
        )


def _sum(inputs: object, config: RoundConfig) -> WordArray:
    total = np.zeros(config.vector_length, dtype=word_dtype(config.bits))
    for item in inputs:  # type: ignore[attr-defined]
        np.add(total, item.vector, out=total)
    return total


def verify_cleartext_transcript(
    transcript: CleartextTranscript, config: RoundConfig, verifiers: Mapping[str, Verifier]
) -> WordArray:
    """Recompute the sum and check every signature; raise RemoteProtocolError otherwise."""
    agg = transcript.aggregator
    seen: set[str] = set()
    for item in transcript.inputs:
        if item.sender in seen or not config.is_member(item.sender):
            raise RemoteProtocolError(agg, f"transcript lists an unexpected input of {item.sender}")
        seen.add(item.sender)
        if not verifiers[item.sender].verify(item.signature, item.signed_payload(config.digest)):
            raise RemoteProtocolError(agg, f"input of {item.sender} has an invalid signature")
    total = _sum(transcript.inputs, config)
    if not np.array_equal(total, transcript.aggregate):
        raise RemoteProtocolError(agg, "published aggregate differs from the recomputed one")
    return total
