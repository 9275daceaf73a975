"""Following a session from the operator's seat: propose, start, watch, collect.

The operator only proposes and watches: the peers run the rounds themselves, so stopping the
watching stops nothing on the peers, and :func:`start_if_accepted` plus :func:`drive_session`
pick a session up again. What :func:`collect_rounds` returns comes from the peers' own
ledgers (the ``Records`` RPC), and each round's record is compared across peers, so it is what
they actually agreed on. ``ceremony run``, ``ceremony stats`` and ``ceremony demo`` share this;
how progress is shown is theirs (a :class:`SessionWatcher`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc

from ..cli import one_line
from ..identity import Roster
from ..session import SessionProposal
from ..session_state import SessionState
from ..tls import TransportError
from ..wire import peer_pb2 as pb
from .client import FINAL_STATES, BeaconFailed, OperatorClient, OperatorError

__all__ = [
    "POLL_SECONDS",
    "STAGES",
    "RoundRow",
    "SessionOutcome",
    "SessionWatcher",
    "check_reachable",
    "collect_rounds",
    "default_timeout",
    "drive_session",
    "propose_and_start",
    "round_row",
    "start_if_accepted",
]

POLL_SECONDS = 0.5
# Stages a round goes through, as the peers report them (peer/round/), for progress bars.
STAGES = ("starting", "advertise", "share", "masked", "consistency", "unmask", "prove", "verify")


class SessionWatcher(Protocol):
    """What :func:`drive_session` tells as the session goes (a progress display)."""

    @property
    def reported_rounds(self) -> int:
        """The last round already shown with :meth:`agreed`."""
        ...

    def agreed(self, row: RoundRow) -> None:
        """Round ``row.round`` was agreed (called in round order, once each)."""

    def update(self, statuses: Mapping[str, pb.SessionStatus | Exception]) -> None:
        """The peers' answers to one poll (an exception for a peer that did not answer)."""

    def close(self) -> None:
        """The watching is over."""


@dataclass(frozen=True)
class RoundRow:
    """One agreed round as the peers hold it.

    Attributes:
        held_by: the peers whose ledger holds this exact record (same hash).
        differs: peers whose ledger holds a *different* record for this round.
        signatures: how many signatures on the record verify under the roster.
    """

    round: int
    aggregator: str
    participants: tuple[str, ...]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    metrics: Mapping[str, Any]
    epsilon: Mapping[str, float]
    signatures: int
    record_hash: str
    held_by: tuple[str, ...] = ()
    differs: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "aggregator": self.aggregator,
            "participants": list(self.participants),
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "metrics": dict(self.metrics),
            "accuracy": self.metrics.get("accuracy"),
            "loss": self.metrics.get("loss"),
            "auc": self.metrics.get("auc"),
            "epsilon": dict(self.epsilon),
            "signatures": self.signatures,
            "record_hash": self.record_hash,
            "held_by": list(self.held_by),
            "differs": list(self.differs),
        }


def round_row(proto: pb.AgreedRecord, participants: Sequence[str], roster: Roster) -> RoundRow:
    """One record as a row; only the signatures that verify under the roster are counted."""
    # Imported here: the round driver is heavy, and only this needs its wire form and check.
    from ..codec import record_from_proto
    from ..round import valid_signatures

    record, signatures = record_from_proto(proto)
    metrics = dict(record.metrics)
    listed = metrics.pop("survivors", None)
    survivors = tuple(str(p) for p in (listed if isinstance(listed, list) else participants))
    aggregator = str(metrics.pop("aggregator", ""))
    metrics.pop("attempt", None)  # which attempt agreed it (peer/round/agreement.py): no figure
    valid, _ = valid_signatures(record, signatures, roster.verifiers())
    return RoundRow(
        round=record.round,
        aggregator=aggregator,
        participants=tuple(sorted(participants)),
        survivors=survivors,
        dropped=tuple(sorted(set(participants) - set(survivors))),
        metrics=metrics,
        epsilon={str(k): float(v) for k, v in record.epsilon.items()},
        signatures=len(valid),
        record_hash=record.record_hash().hex(),
    )


async def collect_rounds(
    client: OperatorClient, session_id: str, participants: Sequence[str]
) -> tuple[list[RoundRow], dict[str, str]]:
    """Each agreed round, compared across every reachable participant's ledger.

    Returns:
        the rows (from the peer holding the most records) and, per peer that could not be
        asked, why.
    """
    answers = await asyncio.gather(
        *(client.records(session_id, p) for p in participants), return_exceptions=True
    )
    held: dict[str, list[pb.AgreedRecord]] = {}
    unreachable: dict[str, str] = {}
    for peer, answer in zip(participants, answers, strict=True):
        if isinstance(answer, TransportError):
            unreachable[peer] = one_line(answer)
        elif isinstance(answer, BaseException):
            raise answer
        else:
            held[peer] = answer
    if not held:
        return [], unreachable
    source = max(held, key=lambda p: len(held[p]))
    rows = []
    for proto in held[source]:
        row = round_row(proto, participants, client.roster)
        same: list[str] = []
        other: list[str] = []
        for peer, records in held.items():
            mine = next((r for r in records if r.round == row.round), None)
            if mine is None:
                continue
            hash_ = round_row(mine, participants, client.roster).record_hash
            (same if hash_ == row.record_hash else other).append(peer)
        rows.append(replace(row, held_by=tuple(sorted(same)), differs=tuple(sorted(other))))
    return rows, unreachable


@dataclass
class SessionOutcome:
    """How a watched session ended."""

    session_id: str
    planned: int
    states: dict[str, str]
    rows: list[RoundRow]
    unreachable: dict[str, str]
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Every round agreed, every answering peer finished, no peer holds another record."""
        return (
            not self.timed_out
            and bool(self.states)
            and all(state == SessionState.FINISHED for state in self.states.values())
            and [row.round for row in self.rows] == list(range(1, self.planned + 1))
            and not any(row.differs for row in self.rows)
        )

    def as_json(self) -> dict[str, Any]:
        """The JSON form of a session's self."""
        return {
            "session_id": self.session_id,
            "ok": self.ok,
            "states": self.states,
            "unreachable": self.unreachable,
            "timed_out": self.timed_out,
            "rounds": [row.as_json() for row in self.rows],
        }


async def check_reachable(client: OperatorClient, session_id: str, peers: Sequence[str]) -> None:
    """Fail before proposing anything if a peer cannot be reached, naming every such peer.

    Raises:
        OperatorError: listing each unreachable peer with the transport's reason.
    """
    statuses = await client.status(session_id, peers)
    problems = [
        f"{peer} ({one_line(status)})"
        for peer, status in statuses.items()
        if isinstance(status, Exception)
        and getattr(status, "code", None) is not grpc.StatusCode.NOT_FOUND
    ]
    if problems:
        raise OperatorError(
            f"cannot reach {len(problems)} of {len(peers)} peers: "
            + "; ".join(problems)
            + ". Nothing was proposed. Check that these peers run (peer start --config ...) "
            "at the addresses in the roster"
        )


async def propose_and_start(client: OperatorClient, proposal: SessionProposal) -> None:
    """Propose ``proposal`` to every participant and start it where all accepted.

    Raises:
        OperatorError: a peer cannot be reached.
        ProposalRefused: a peer refused (its reason is in ``answers``).
    """
    await check_reachable(client, proposal.session_id, proposal.participants)
    try:
        await client.propose(proposal)
        # Commit-reveal of the session beacon with every participant (peer/beacon.py).
        await client.start(proposal.session_id, proposal.participants)
    except (TransportError, BeaconFailed) as error:
        raise OperatorError(one_line(error)) from None


async def drive_session(
    client: OperatorClient,
    session_id: str,
    participants: Sequence[str],
    view: SessionWatcher,
    *,
    rounds: int,
    timeout: float,
    poll: float = POLL_SECONDS,
    clock: Callable[[], float] | None = None,
) -> SessionOutcome:
    """Watch a started session until every answering peer is done, or ``timeout``.

    ``rounds`` is the planned number of rounds, unless the peers report theirs.

    This polls itself rather than using :meth:`OperatorClient.wait`, whose progress callback
    is synchronous: here each newly agreed round is fetched (``Records``) and shown with who
    aggregated it and who dropped.
    """
    loop = asyncio.get_running_loop()
    now = clock or loop.time
    deadline = now() + timeout
    statuses: dict[str, pb.SessionStatus | Exception] = {}
    timed_out = False
    while True:
        statuses = await client.status(session_id, participants)
        answering = {p: s for p, s in statuses.items() if isinstance(s, pb.SessionStatus)}
        agreed = max((s.rounds_agreed for s in answering.values()), default=0)
        if agreed > view.reported_rounds:  # before the next round's line, for the order
            source = max(answering, key=lambda p: answering[p].rounds_agreed)
            for proto in await client.records(session_id, source):
                if proto.round > view.reported_rounds:
                    view.agreed(round_row(proto, participants, client.roster))
        view.update(statuses)
        if answering and all(s.state in FINAL_STATES for s in answering.values()):
            break
        if now() >= deadline:
            timed_out = True
            break
        await asyncio.sleep(poll)
    view.close()
    rows, unreachable = await collect_rounds(client, session_id, participants)
    states = {p: s.state for p, s in statuses.items() if isinstance(s, pb.SessionStatus)}
    # On --attach the file may have changed since the proposal: the peers know the plan.
    rounds = max(
        (s.rounds_planned for s in statuses.values() if isinstance(s, pb.SessionStatus)),
        default=rounds,
    )
    for peer, status in statuses.items():
        if isinstance(status, Exception):
            unreachable.setdefault(peer, one_line(status))
    return SessionOutcome(session_id, rounds, states, rows, unreachable, timed_out)


async def start_if_accepted(
    client: OperatorClient, session_id: str, participants: Sequence[str]
) -> None:
    """On attach: start the session on peers that accepted it but were never started
    (the operator was interrupted between proposing and starting).

    Raises:
        OperatorError: no participant knows the session.
    """
    statuses = await client.status(session_id, participants)
    known = {p: s for p, s in statuses.items() if isinstance(s, pb.SessionStatus)}
    if not known:
        reasons = "; ".join(f"{p}: {one_line(s)}" for p, s in statuses.items())
        raise OperatorError(f"no participant knows session {session_id!r} ({reasons})")
    waiting = [p for p, s in known.items() if s.state == SessionState.ACCEPTED]
    if waiting:
        # The beacon needs every participant's nonce: those already running answer theirs
        # and the beacon they hold; the waiting ones then fix it and start.
        try:
            await client.start(session_id, list(participants))
        except BeaconFailed as error:
            raise OperatorError(one_line(error)) from None


def default_timeout(proposal: SessionProposal) -> float:
    """Generous time for the whole session: every round may need a retry or two."""
    per_round = proposal.prepare_seconds + 8 * proposal.stage_seconds
    return proposal.rounds * per_round + 60.0
