"""What one round needs, and the seams it is driven through: backend, role objects, faults.

The round drivers (:mod:`peer.round.aggregating`, :mod:`peer.round.participating`) move
messages and keep deadlines. What they call on the protocol is written down here as
Protocols: a :class:`RoundBackend` (which protocol, :mod:`peer.round.backends`) makes the
sans-I/O role objects, :class:`AggregatorRole` and :class:`ParticipantRole`, and the drivers
call nothing else on them. Fault injection for tests (:mod:`peer.faults`) comes in through
:class:`FaultHooks` on the context, a no-op unless the peer's entry point installs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from secagg import AggregatorState, RandomSource, RoundConfig, Signer, Verifier
from secagg.ring import WordArray

from ..ledger import Ledger, StoredRecord
from ..payloads import Payload
from ..wire import peer_pb2 as pb

__all__ = [
    "NO_FAULTS",
    "AggregatorRole",
    "FaultHooks",
    "NoFaults",
    "ParticipantRole",
    "RoundBackend",
    "RoundContext",
    "RoundOutcome",
    "RoundResult",
    "RoundStatusKind",
    "describe_precondition",
    "max_message_bytes",
]


# ---------------------------------------------------------------- the role objects


class RoundResult(Protocol):
    """What the driver reads of an aggregator's result."""

    @property
    def survivors(self) -> tuple[str, ...]: ...


class AggregatorRole(Protocol):
    """The aggregator's sans-I/O object, as the driver uses it.

    ``receive`` takes any object: the role objects check each message's type against their
    current stage themselves and refuse the others with a RemoteProtocolError.
    """

    @property
    def state(self) -> AggregatorState: ...

    @property
    def stage(self) -> StrEnum: ...

    @property
    def dropped(self) -> Mapping[StrEnum, Sequence[str]]: ...

    @property
    def result(self) -> RoundResult | None: ...

    def pending(self) -> Set[str]: ...

    def receive(self, message: object) -> None: ...

    def close_stage(self) -> Mapping[str, object]: ...


class ParticipantRole(Protocol):
    """A participant's sans-I/O object, as the driver uses it."""

    @property
    def state(self) -> StrEnum: ...

    def start(self) -> object | None:
        """The first message, or None for roles that speak only when spoken to."""
        ...

    def receive(self, message: object) -> object: ...


class RoundBackend(Protocol):
    """One aggregation protocol (secagg, paillier, cleartext): see peer/round/backends.py."""

    @property
    def name(self) -> str: ...

    @property
    def first_stage(self) -> StrEnum:
        """The stage at which participants join (and contributions are awaited)."""
        ...

    def aggregator(self, ctx: RoundContext) -> AggregatorRole: ...

    def participant(self, ctx: RoundContext, x: WordArray) -> ParticipantRole: ...

    def is_transcript(self, message: object) -> bool: ...

    def is_heavy(self, message: object) -> bool:
        """Handling ``message`` takes long enough to belong in a worker thread."""
        ...

    def completed(self, transcript: object, participant: ParticipantRole) -> object:
        """The whole transcript, from what the aggregator sent as the transcript and what
        ``participant`` already received (the secagg statement it answered)."""
        ...

    def stage_reached(self, participant: ParticipantRole) -> str: ...

    def misbehaving(self, protocol: AggregatorRole) -> Set[str]:
        """Peers the aggregator found revealing wrong shares (and rebuilt without)."""
        ...

    def transcripts(self, protocol: AggregatorRole, recipients: Sequence[str]) -> dict[str, object]:
        """What each recipient is sent as the round's transcript."""
        ...

    def verify(
        self, transcript: object, ctx: RoundContext, sent: Sequence[object]
    ) -> tuple[WordArray, tuple[str, ...]]:
        """The verified aggregate and the peers whose inputs are in it (raises otherwise)."""
        ...

    def release(self, protocol: AggregatorRole) -> None:
        """The round is over at the aggregator: free what its role object holds on disk."""
        ...


# ---------------------------------------------------------------- fault injection


class FaultHooks(Protocol):
    """Where a test may make a peer die or lie (peer/faults.py). Production: :data:`NO_FAULTS`."""

    def point(self, round_: int, name: str) -> None:
        """The peer reached point ``name`` of ``round_`` (a test may kill it here)."""
        ...

    def outgoing(self, round_: int, recipient: str, message: object) -> object:
        """What the aggregator sends ``recipient`` instead of ``message``."""
        ...

    def reply(self, round_: int, message: object, signer: Signer, digest: bytes) -> object:
        """What a participant sends instead of ``message``."""
        ...

    def transcripts(self, round_: int, transcripts: dict[str, object]) -> dict[str, object]:
        """The transcripts the aggregator publishes instead of ``transcripts``."""
        ...

    def published_aggregate(self, round_: int, aggregate: WordArray) -> WordArray:
        """The sum the (secagg) aggregator states, signs and publishes instead of
        ``aggregate``."""
        ...


class NoFaults:
    """Every hook leaves everything as it is."""

    def point(self, round_: int, name: str) -> None:
        return None

    def outgoing(self, round_: int, recipient: str, message: object) -> object:
        return message

    def reply(self, round_: int, message: object, signer: Signer, digest: bytes) -> object:
        return message

    def transcripts(self, round_: int, transcripts: dict[str, object]) -> dict[str, object]:
        return transcripts

    def published_aggregate(self, round_: int, aggregate: WordArray) -> WordArray:
        return aggregate


NO_FAULTS: FaultHooks = NoFaults()


# ---------------------------------------------------------------- context and outcome


class RoundStatusKind(StrEnum):
    AGREED = "agreed"
    ABORTED = "aborted"  # the round cannot complete (too few peers, no agreement)
    AGGREGATOR_FAILED = "aggregator-failed"  # retry with the next aggregator
    REFUSED = "refused"  # this peer refused (protocol violation, bad transcript)


def describe_precondition(precondition: pb.Precondition.ValueType, round_: int) -> str:
    """``round-passed: 7``, ``behind: 3``, ``not-ready``, ``round-agreed`` (``-`` for none)."""
    if precondition == pb.PRECONDITION_NONE:
        return "-"
    name = pb.Precondition.Name(precondition).removeprefix("PRECONDITION_").lower()
    name = name.replace("_", "-")
    if precondition in (pb.PRECONDITION_ROUND_PASSED, pb.PRECONDITION_BEHIND):
        return f"{name}: {round_}"
    return name


@dataclass
class RoundOutcome:
    status: RoundStatusKind
    aggregator: str
    reason: str = ""
    # ``reason`` is published (Status.detail): when it leaves out what only this peer may
    # read (peer/published.py), the full text for its own ledger is here.
    local_reason: str = ""
    record: StoredRecord | None = None
    survivors: tuple[str, ...] = ()
    dropped: dict[str, list[str]] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    # Set when the aggregator is elsewhere in the session (protos/peer.proto, Precondition),
    # with the round it names; ``unreachable`` when the aggregator could not be dialled.
    precondition: pb.Precondition.ValueType = pb.PRECONDITION_NONE
    precondition_round: int = 0
    unreachable: bool = False

    def where(self) -> str:
        """The precondition for the logs, e.g. ``round-passed: 7``."""
        return describe_precondition(self.precondition, self.precondition_round)


@dataclass
class RoundContext:
    """Everything one node needs to take part in one round."""

    me: str
    session_id: str
    round: int
    attempt: int
    aggregator: str
    config: RoundConfig
    signer: Signer
    verifiers: Mapping[str, Verifier]
    ledger: Ledger
    payload: Payload
    backend: RoundBackend
    rng: RandomSource
    stage_seconds: float
    prepare_seconds: float
    paillier_key_bits: int = 2048
    on_stage: Callable[[str, str], None] = lambda stage, detail: None
    faults: FaultHooks = NO_FAULTS
    # Where the aggregator spools masked inputs (peer/spool.py); None: the system temp dir.
    spool_dir: Path | None = None

    @property
    def log_prefix(self) -> str:
        return f"peer={self.me} session={self.session_id} round={self.round} attempt={self.attempt}"

    def max_message_bytes(self) -> int:
        return max_message_bytes(
            self.config.vector_length, self.config.bits, len(self.config.peers)
        )


def max_message_bytes(vector_length: int, bits: int, peers: int) -> int:
    """Largest message a round may carry: the transcript holds every masked input."""
    words = vector_length * (bits // 8)
    return (peers + 2) * (words + 64 * 1024) + peers * peers * 256 + (1 << 20)
