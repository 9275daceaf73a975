"""What every protocol's roles share: the staged aggregator, the transition-table driver and
the typed role interfaces that a round driver (the peer, the simulator) programs against.

Theory of operation
-------------------
Every aggregator here (SecAgg's, Paillier's, the cleartext baseline's) runs the same loop:
for each stage it expects one message from each of a set of peers, checks each on arrival,
and closes the stage when the caller says so (a deadline or nobody pending). A sender whose
message breaks the protocol is *excluded* for the rest of the round, as if it had dropped
out; closing a stage either yields the next stage's messages or aborts the round.
:class:`StagedAggregator` is that loop, once; what differs between the protocols is named
hooks (:meth:`~StagedAggregator._check_round`, :meth:`~StagedAggregator._validate`,
:meth:`~StagedAggregator._close`, :meth:`~StagedAggregator._dropped_at_close`).

Every participant-side role is a state machine driven by a transition table
``(state, message type) -> handler``: anything not in the table is the aggregator's fault, a
failing handler fails the role, and a failed role says nothing more. :func:`drive` is that
scaffolding, once.

The :class:`AggregatorRole` and :class:`ParticipantRole` Protocols list what a driver may use,
so that it needs neither ``Any`` nor ``getattr`` to move messages between the roles.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence, Set
from enum import StrEnum
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

import numpy as np
import numpy.typing as npt

from .config import RoundConfig
from .crypto import Verifier
from .errors import LocalProtocolError, RemoteProtocolError, RoundAborted, SecAggError
from .ring import WordArray, word_dtype

__all__ = [
    "AggregatorRole",
    "AggregatorState",
    "ParticipantRole",
    "RoundResult",
    "StagedAggregator",
    "drive",
    "own_input",
    "require_verifiers",
]


class AggregatorState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    ABORTED = "aborted"


# ---------------------------------------------------------------------- the role interfaces


class RoundResult(Protocol):
    """What every aggregator's result carries: the sum and whose inputs are in it."""

    @property
    def aggregate(self) -> WordArray: ...

    @property
    def survivors(self) -> tuple[str, ...]: ...


class AggregatorRole(Protocol):
    """The aggregator side of one round, as a driver sees it (see :class:`StagedAggregator`).

    ``receive`` takes any decoded message: one the current stage does not expect is refused
    with a :class:`RemoteProtocolError` naming its sender, like any other breach.
    """

    @property
    def me(self) -> str: ...

    @property
    def stage(self) -> StrEnum: ...

    @property
    def state(self) -> AggregatorState: ...

    @property
    def result(self) -> RoundResult | None: ...

    @property
    def abort_reason(self) -> str | None: ...

    @property
    def misbehaving(self) -> Set[str]:
        """Participants proven to have misbehaved; the round went on without their part."""
        ...

    def dropped_at(self, stage: StrEnum) -> tuple[str, ...]:
        """The peers that missed (or were excluded at) ``stage``, once it is closed."""
        ...

    def pending(self) -> frozenset[str]: ...

    def receive(self, message: object) -> None: ...

    def close_stage(self) -> Mapping[str, object]: ...

    def transcript(self, recipient: str) -> object:
        """What ``recipient`` is sent as the round's transcript (after DONE)."""
        ...

    def transcripts(self, recipients: Sequence[str]) -> Mapping[str, object]:
        """The transcript of every recipient (after DONE); build once, send each its own."""
        ...


class ParticipantRole(Protocol):
    """One peer's side of one round, as a driver sees it.

    ``start()`` returns the first message, or None for roles that speak only when spoken to;
    ``receive`` returns the reply to each aggregator message. Both raise :class:`SecAggError`
    subclasses, after which the role is failed and says nothing more.
    """

    @property
    def state(self) -> StrEnum: ...

    def start(self) -> object | None: ...

    def receive(self, message: object) -> object: ...


# ---------------------------------------------------------------------- construction checks


def require_verifiers(
    peers: Iterable[str], verifiers: Mapping[str, Verifier], whose: str = ""
) -> None:
    """Every peer whose signature a role checks must have a verifier: refused up front, not
    as a KeyError at the first message."""
    missing = [u for u in peers if u not in verifiers]
    if missing:
        raise LocalProtocolError(f"no signature verifier for {whose}{missing}")


def own_input(x: npt.ArrayLike, config: RoundConfig) -> WordArray:
    """This peer's quantized input as ring words, refused unless it has the round's shape."""
    vector = np.asarray(x)
    dtype = word_dtype(config.bits)
    if vector.shape != (config.vector_length,) or vector.dtype != dtype:
        raise LocalProtocolError(
            f"input must be a {dtype} vector of length {config.vector_length}, "
            f"not {vector.dtype} of shape {vector.shape}"
        )
    return vector


# ---------------------------------------------------------------------- participant side

RoleT = TypeVar("RoleT", bound="_Stateful[Any]")
StateT = TypeVar("StateT", bound=StrEnum)
ReplyT = TypeVar("ReplyT")


class _Stateful(Protocol[StateT]):
    state: StateT


def drive(
    role: RoleT,
    message: object,
    table: Mapping[tuple[StateT, type], Callable[[RoleT, Any], tuple[ReplyT, StateT]]],
    *,
    offender: str,
    failed: StateT,
    refused_in: Collection[StateT],
    check: Callable[[Any], None] | None = None,
    on_fail: Callable[[], None] | None = None,
    unexpected_note: Callable[[object], str] = lambda message: "",
) -> ReplyT:
    """Deliver ``message`` to ``role`` through its transition ``table``; return the reply.

    Args:
        role: the state machine; its ``state`` is moved to the handler's next state.
        table: ``(state, message type) -> handler(role, message) -> (reply, next state)``.
        offender: whom a message the table does not expect blames (the aggregator).
        failed: the role's terminal failure state.
        refused_in: states in which no message may arrive at all (before ``start()``, after a
            failure): the caller drove the role wrongly.
        check: run on an expected message before its handler (e.g. the round it is for).
        on_fail: run whenever the role fails (e.g. drop a private key).
        unexpected_note: appended to the error for an unexpected message.

    Raises:
        LocalProtocolError: a message in a ``refused_in`` state.
        RemoteProtocolError: a message the table does not expect, or one its handler refuses.
        SecAggError: whatever else the handler raises (e.g. :class:`RoundAborted`).
    In every case the role is ``failed`` (and ``on_fail`` has run).
    """
    stateful = cast(_Stateful[StateT], role)

    def fail() -> None:
        stateful.state = failed
        if on_fail is not None:
            on_fail()

    current = stateful.state
    if current in refused_in:
        fail()
        raise LocalProtocolError(f"{type(message).__name__} delivered in state {current.value}")
    handler = table.get((current, type(message)))
    if handler is None:
        fail()
        raise RemoteProtocolError(
            offender,
            f"unexpected {type(message).__name__} in state {current.value}"
            + unexpected_note(message),
        )
    try:
        if check is not None:
            check(message)
        reply, next_state = handler(role, message)
    except SecAggError:
        fail()
        raise
    stateful.state = next_state
    return reply


# ---------------------------------------------------------------------- aggregator side

StageT = TypeVar("StageT", bound=StrEnum)
InT = TypeVar("InT")
OutT = TypeVar("OutT")


class StagedAggregator(Generic[StageT, InT, OutT]):
    """The aggregator loop shared by every protocol (see the module docstring).

        agg = SomeAggregator(...)
        while agg.state is AggregatorState.RUNNING:
            for message in arriving messages (until agg.pending() is empty or a deadline):
                try: agg.receive(message)
                except RemoteProtocolError as e: log e (e.offender is excluded from the round)
            outgoing = agg.close_stage()       # {peer id: message}, or raises RoundAborted
        agg.result, agg.transcript(peer)

    Subclasses set ``STAGE_MESSAGE`` (the message type each stage expects) and ``NEXT_STAGE``
    (None after the last) and implement the hooks.
    """

    STAGE_MESSAGE: ClassVar[Mapping[Any, type]]
    NEXT_STAGE: ClassVar[Mapping[Any, Any]]

    def __init__(
        self,
        me: str,
        roster: tuple[str, ...],
        verifiers: Mapping[str, Verifier],
        first_stage: StageT,
        expected: frozenset[str],
    ) -> None:
        require_verifiers(roster, verifiers)
        self.me = me
        self.state = AggregatorState.RUNNING
        self.stage: StageT = first_stage
        self.dropped: dict[StageT, tuple[str, ...]] = {}
        self.abort_reason: str | None = None
        # Participants whose part was proven wrong (the round went on without it).
        self.misbehaving: set[str] = set()
        self._roster = roster
        self._verifiers = verifiers
        self._expected = expected
        self._received: dict[str, InT] = {}
        self._excluded: set[str] = set()

    # ------------------------------------------------------------------ hooks

    def _check_round(self, message: InT) -> None:
        """Refuse a message of another session or round (a replay)."""
        raise NotImplementedError

    def _validate(self, message: InT) -> None:
        """The protocol's checks of one expected message; raise RemoteProtocolError."""
        raise NotImplementedError

    def _close(self, stage: StageT, arrived: Mapping[str, InT]) -> dict[str, OutT]:
        """Close ``stage`` over the messages that ``arrived``; the next stage's messages."""
        raise NotImplementedError

    def _kept(self, message: InT) -> InT:
        """What is kept of an accepted message until its stage closes: by default all of it
        (an aggregator that streams large parts elsewhere keeps less)."""
        return message

    def _dropped_at_close(
        self, arrived: Mapping[str, InT], outgoing: Mapping[str, OutT]
    ) -> tuple[str, ...]:
        """Who dropped at the stage just closed (not the last): by default, whoever was
        expected and sent nothing valid."""
        return self._in_roster_order(self._expected - set(arrived))

    # ------------------------------------------------------------------ receiving

    def pending(self) -> frozenset[str]:
        """Peers whose message for the current stage has not arrived yet."""
        if self.state is not AggregatorState.RUNNING:
            return frozenset()
        return self._expected - set(self._received) - self._excluded

    def receive(self, message: object) -> None:
        """Accept one participant message for the current stage.

        Raises:
            RemoteProtocolError: the message breaks the protocol; its sender is excluded from
                the rest of the round (as if it had dropped out) and the round goes on.
            LocalProtocolError: the round is over.
        """
        if self.state is not AggregatorState.RUNNING:
            raise LocalProtocolError(f"round is {self.state.value}; no more messages")
        sender = str(getattr(message, "sender", "?"))
        if sender not in self._expected or sender in self._excluded:
            raise RemoteProtocolError(sender, f"not expected at stage {self.stage.value}")
        try:
            if not isinstance(message, self.STAGE_MESSAGE[self.stage]):
                raise RemoteProtocolError(
                    sender,
                    f"sent {type(message).__name__} at stage {self.stage.value} (late or replayed)",
                )
            # A second, possibly different, message is equivocation: neither copy is used.
            if sender in self._received:
                raise RemoteProtocolError(sender, f"sent two messages at stage {self.stage.value}")
            typed = cast(InT, message)
            self._check_round(typed)
            self._validate(typed)
        except RemoteProtocolError:
            self._excluded.add(sender)
            raise
        self._received[sender] = self._kept(typed)

    # ------------------------------------------------------------------ closing stages

    def close_stage(self) -> dict[str, OutT]:
        """End the current stage; return the next messages, one per recipient.

        After the last stage the result is set and this returns {}.

        Raises:
            RoundAborted: the round cannot go on safely; the aggregator is ABORTED.
            RemoteProtocolError: a participant's breach that only closing reveals; ABORTED.
            LocalProtocolError: the round is already over (closing twice is a caller bug).
        """
        if self.state is not AggregatorState.RUNNING:
            raise LocalProtocolError(f"round is {self.state.value}")
        stage = self.stage
        arrived = {u: m for u, m in self._received.items() if u not in self._excluded}
        self.dropped[stage] = self._in_roster_order(self._expected - set(arrived))
        try:
            outgoing = self._close(stage, arrived)
        except (RoundAborted, RemoteProtocolError) as error:
            self.state = AggregatorState.ABORTED
            self.abort_reason = str(error)
            raise
        next_stage = self.NEXT_STAGE[stage]
        if next_stage is None:
            self.state = AggregatorState.DONE
        else:
            self.dropped[stage] = self._dropped_at_close(arrived, outgoing)
            self.stage = next_stage
            self._expected = frozenset(outgoing)  # each recipient answers at the next stage
            self._received = {}
        return outgoing

    # ------------------------------------------------------------------ publishing

    def transcript(self, recipient: str) -> object:
        """What ``recipient`` is sent as the round's transcript (after DONE)."""
        raise NotImplementedError

    def transcripts(self, recipients: Sequence[str]) -> dict[str, object]:
        """The transcript of every recipient (after DONE). By default one and the same for
        everyone; a protocol that must show some recipient less overrides this."""
        shared = self.transcript(recipients[0]) if recipients else None
        return dict.fromkeys(recipients, shared)

    def dropped_at(self, stage: StrEnum) -> tuple[str, ...]:
        """The peers that missed (or were excluded at) ``stage``; () for an open stage."""
        return self.dropped.get(cast(StageT, stage), ())

    def _in_roster_order(self, peers: Collection[str]) -> tuple[str, ...]:
        return tuple(u for u in self._roster if u in peers)
