"""The aggregation protocols a session can choose, behind one small interface.

The round drivers (peer/rounds.py) move messages and keep deadlines; a backend says which
sans-I/O objects play the two roles, which messages are heavy to handle, and how a peer
checks the published transcript. ``secagg`` (the default) is Bonawitz/SecAgg+ masking;
``cleartext`` is the insecure baseline used to measure what security costs; it is refused
by every peer whose policy does not explicitly allow it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from secagg import (
    Aggregator,
    MaskedInput,
    Participant,
    ParticipantState,
    RandomSource,
    RoundConfig,
    Signer,
    Stage,
    Transcript,
    Verifier,
    verify_transcript,
)
from secagg.cleartext import (
    CleartextAggregator,
    CleartextParticipant,
    CleartextTranscript,
    verify_cleartext_transcript,
)
from secagg.messages import SharesToYou
from secagg.prg import WordArray

__all__ = ["BACKENDS", "RoundBackend", "backend_for"]


class RoundBackend(Protocol):
    name: str
    first_stage: Stage

    def aggregator(
        self, config: RoundConfig, verifiers: Mapping[str, Verifier], me: str
    ) -> Any: ...

    def participant(
        self,
        config: RoundConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        x: WordArray,
        rng: RandomSource,
        aggregator: str,
    ) -> Any: ...

    def is_transcript(self, message: object) -> bool: ...

    def is_heavy(self, message: object) -> bool:
        """Handling ``message`` takes long enough to belong in a worker thread."""
        ...

    def stage_reached(self, participant: Any) -> str: ...

    def verify(
        self,
        transcript: Any,
        config: RoundConfig,
        verifiers: Mapping[str, Verifier],
        sent: Sequence[object],
    ) -> tuple[WordArray, tuple[str, ...]]:
        """The verified aggregate and the peers whose inputs are in it (raises otherwise)."""
        ...


class SecAggBackend:
    name = "secagg"
    first_stage = Stage.ADVERTISE

    def aggregator(self, config: RoundConfig, verifiers: Mapping[str, Verifier], me: str) -> Any:
        return Aggregator(config, verifiers, me)

    def participant(
        self,
        config: RoundConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        x: WordArray,
        rng: RandomSource,
        aggregator: str,
    ) -> Any:
        return Participant(config, me, signer, verifiers, x, rng, aggregator)

    def is_transcript(self, message: object) -> bool:
        return isinstance(message, Transcript)

    def is_heavy(self, message: object) -> bool:
        return isinstance(message, SharesToYou)  # expands every mask

    def stage_reached(self, participant: Any) -> str:
        return {
            ParticipantState.SHARED: "share",
            ParticipantState.MASKED: "masked",
            ParticipantState.SIGNED: "consistency",
            ParticipantState.DONE: "unmask",
        }.get(participant.state, str(participant.state.value))

    def verify(
        self,
        transcript: Any,
        config: RoundConfig,
        verifiers: Mapping[str, Verifier],
        sent: Sequence[object],
    ) -> tuple[WordArray, tuple[str, ...]]:
        own = next((m for m in sent if isinstance(m, MaskedInput)), None)
        verified = verify_transcript(transcript, config, verifiers, own=own)
        return verified.aggregate, verified.survivors


class CleartextBackend:
    name = "cleartext"
    first_stage = Stage.MASKED

    def aggregator(self, config: RoundConfig, verifiers: Mapping[str, Verifier], me: str) -> Any:
        return CleartextAggregator(config, verifiers, me)

    def participant(
        self,
        config: RoundConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        x: WordArray,
        rng: RandomSource,
        aggregator: str,
    ) -> Any:
        return CleartextParticipant(config, me, signer, x)

    def is_transcript(self, message: object) -> bool:
        return isinstance(message, CleartextTranscript)

    def is_heavy(self, message: object) -> bool:
        return False

    def stage_reached(self, participant: Any) -> str:
        return "masked"

    def verify(
        self,
        transcript: Any,
        config: RoundConfig,
        verifiers: Mapping[str, Verifier],
        sent: Sequence[object],
    ) -> tuple[WordArray, tuple[str, ...]]:
        aggregate = verify_cleartext_transcript(transcript, config, verifiers)
        return aggregate, transcript.survivors


BACKENDS: dict[str, RoundBackend] = {"secagg": SecAggBackend(), "cleartext": CleartextBackend()}


def backend_for(aggregation: str) -> RoundBackend:
    try:
        return BACKENDS[aggregation]
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}") from None
