"""Cleartext summation: the insecure baseline that secure aggregation is measured against.

Each participant sends its vector in the clear (signed); the aggregator sums. Nothing is
hidden from the aggregator, so peers refuse such sessions unless their local policy
explicitly allows it (``allow_cleartext``); it exists for benchmarks ("secure round vs
plain round on the same peers") and debugging. Same shape as the secure roles: a
participant with ``start``/``receive``, an aggregator with ``receive``/``pending``/
``close_stage``/``result``/``transcript``, and :func:`verify_cleartext_transcript`.

Two baselines share these roles. ``cleartext`` publishes every input with the sum, and each
peer recomputes it (the cost of verification by download). ``plain`` is minimal FedAvg:
the aggregator returns only the sum (:class:`PlainSum`), and peers take it on trust
(:func:`check_plain_sum` checks only its form): the least a round over the same streams can
move, 2 x 4m bytes per site, which is what secure aggregation's cost is compared with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np

from ._roles import StagedAggregator, drive
from .aggregator import AggregateResult
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
    "PlainSum",
    "check_plain_sum",
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


@dataclass(frozen=True, slots=True, eq=False)
class PlainSum:
    """Minimal FedAvg's reply: the sum and whose inputs are in it, nothing to check it by."""

    session_id: str
    round: int
    aggregator: str
    survivors: tuple[str, ...]
    aggregate: WordArray


class _ParticipantState(StrEnum):
    NEW = "new"
    DONE = "done"
    FAILED = "failed"


class CleartextParticipant:
    def __init__(
        self,
        config: RoundConfig,
        me: str,
        signer: Signer,
        x: WordArray,
        aggregator: str = "aggregator",
    ) -> None:
        if not config.is_member(me):
            raise LocalProtocolError(f"{me} is not in the roster of this round")
        self.config, self.me, self._signer, self._x = config, me, signer, np.asarray(x)
        self.aggregator = aggregator
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

    def receive(self, message: object) -> CleartextInput:
        """The aggregator sends a cleartext participant nothing but the transcript (which the
        driver checks, not this object): any message is refused, naming the aggregator.
        Before, a driver that passed one on got an AttributeError (no ``receive``)."""
        return drive(
            self,
            message,
            _NO_TRANSITIONS,
            offender=self.aggregator,
            failed=_ParticipantState.FAILED,
            refused_in=(_ParticipantState.NEW, _ParticipantState.FAILED),
        )


# The cleartext participant expects no message at all: its table is empty.
_NO_TRANSITIONS: dict[
    tuple[_ParticipantState, type],
    Callable[[CleartextParticipant, Any], tuple[CleartextInput, _ParticipantState]],
] = {}


class CleartextAggregator(StagedAggregator[Stage, CleartextInput, object]):
    """One stage (named ``masked`` so deadlines and drop reports read the same)."""

    STAGE_MESSAGE: ClassVar[Mapping[Stage, type]] = {Stage.MASKED: CleartextInput}
    NEXT_STAGE: ClassVar[Mapping[Stage, Stage | None]] = {Stage.MASKED: None}

    def __init__(self, config: RoundConfig, verifiers: Mapping[str, Verifier], me: str) -> None:
        super().__init__(me, config.peers, verifiers, Stage.MASKED, frozenset(config.peers))
        self.config = config
        self._inputs: dict[str, CleartextInput] = {}
        self.result: AggregateResult | None = None

    def _check_round(self, message: CleartextInput) -> None:
        if (message.session_id, message.round) != (self.config.session_id, self.config.round):
            raise RemoteProtocolError(message.sender, "input for another session or round (replay)")

    def _validate(self, message: CleartextInput) -> None:
        sender, config = message.sender, self.config
        if message.vector.shape != (config.vector_length,) or message.vector.dtype != word_dtype(
            config.bits
        ):
            raise RemoteProtocolError(sender, "input vector has the wrong shape or type")
        if not self._verifiers[sender].verify(
            message.signature, message.signed_payload(config.digest)
        ):
            raise InvalidSignatureError(sender, "invalid signature on its input")

    def _close(self, stage: Stage, arrived: Mapping[str, CleartextInput]) -> dict[str, object]:
        if len(arrived) < self.config.threshold:
            raise RoundAborted(f"only {len(arrived)} inputs, threshold is {self.config.threshold}")
        self._inputs = dict(arrived)
        total = _sum(self._inputs.values(), self.config)
        survivors = tuple(u for u in self.config.peers if u in self._inputs)
        self.result = AggregateResult(total, survivors, dict(self.dropped))
        return {}

    def transcript(self, recipient: str | None = None) -> CleartextTranscript:
        """The inputs and their sum (after DONE); the same for every ``recipient``."""
        if self.result is None:
            raise LocalProtocolError("the round has no result to publish")
        inputs = tuple(self._inputs[u] for u in self.result.survivors)
        return CleartextTranscript(
            self.config.session_id, self.config.round, self.me, inputs, self.result.aggregate
        )

    def plain_sum(self) -> PlainSum:
        """The sum alone (after DONE), for minimal-FedAvg rounds."""
        if self.result is None:
            raise LocalProtocolError("the round has no result to publish")
        return PlainSum(
            self.config.session_id,
            self.config.round,
            self.me,
            self.result.survivors,
            self.result.aggregate,
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


def check_plain_sum(plain: PlainSum, config: RoundConfig, me: str) -> WordArray:
    """The form of a minimal-FedAvg reply: this round, roster members, my input counted, a
    vector of the round's shape. The sum itself is taken on trust (that is the baseline)."""
    agg = plain.aggregator
    if (plain.session_id, plain.round) != (config.session_id, config.round):
        raise RemoteProtocolError(agg, "sum of another session or round")
    if len(set(plain.survivors)) != len(plain.survivors) or not all(
        config.is_member(u) for u in plain.survivors
    ):
        raise RemoteProtocolError(agg, "sum over peers that are not in the roster")
    if me not in plain.survivors:
        raise RemoteProtocolError(agg, f"sum leaves out the input of {me}")
    if len(plain.survivors) < config.threshold:
        raise RemoteProtocolError(agg, "sum over fewer peers than the threshold")
    if plain.aggregate.shape != (config.vector_length,) or plain.aggregate.dtype != word_dtype(
        config.bits
    ):
        raise RemoteProtocolError(agg, "sum of the wrong shape or type")
    return plain.aggregate
