"""Which attempt of a round a peer runs next, and when it stops trying one.

Pure rules of the session runner (:mod:`peer.runner`), kept apart so each can be read and
tested on its own: how long a participant keeps dialling an aggregator
(:class:`JoinWindow`), which attempt to join after a failed one (:func:`next_attempt`),
when to join the same attempt again after a failure of its own (:func:`rejoin_attempt`),
and how an unexpected error is named (:func:`internal_error`, defined in peer/published.py
with the rest of what may leave the peer).
"""

from __future__ import annotations

from dataclasses import dataclass

# INTERNAL_ERROR, internal_error: kept here, where the runner's other rules are, and defined
# with the rest of what may be published (peer/published.py).
from .published import INTERNAL_ERROR, internal_error
from .round import RoundOutcome, RoundStatusKind
from .session import SessionProposal, aggregator_for
from .session_state import SessionState
from .wire import peer_pb2 as pb

__all__ = [
    "ATTEMPTS_PER_PARTICIPANT",
    "INTERNAL_ERROR",
    "OWN_FAILURES",
    "SAME_ERROR_ATTEMPTS",
    "UNREACHABLE_FLOOR_SECONDS",
    "JoinWindow",
    "internal_error",
    "next_attempt",
    "own_failure",
    "rejoin_attempt",
]

# A round not agreed after this many attempts per participant ends the session here
# (aborted, with the reason): rounds are retried, never skipped, so it cannot go on.
ATTEMPTS_PER_PARTICIPANT = 3
# The same unexpected error in this many attempts in a row ends the session here (aborted,
# naming it) before the attempt limit: a transient fault (a database blip, one peer's odd
# answer) does not recur word for word across attempts spaced by back-off, a deterministic
# bug does, and each futile attempt keeps the others waiting on this peer. Consecutive
# attempts have different aggregators (the rotation moves on one peer per attempt), so one
# misbehaving aggregator cannot end a session this way on its own (an attempt run again,
# rejoin_attempt, gives it two of the three tries, never three).
SAME_ERROR_ATTEMPTS = 3
# Failures that are this peer's own, not the round's: an unexpected error, or a contribution
# it could not prepare (peer/round/participating.py). After one, it joins the same attempt
# again while the others still run it (rejoin_attempt).
OWN_FAILURES = (INTERNAL_ERROR, "cannot prepare")
# The least time a participant keeps dialling an aggregator that does not answer at all
# (connection refused), whatever the stage deadline: the channel's reconnect back-off
# (peer/tls/_channel.py: 0.5 s, then x1.6) dials again about 0.5, 1.3 and 2.6 s after the
# first refusal, so a server that opens a moment late is still reached with a short stage.
UNREACHABLE_FLOOR_SECONDS = 3.0


@dataclass
class JoinWindow:
    """How long a participant keeps dialling a round's aggregator (``participate_with_retry``).

    An aggregator that answers "not ready" is still preparing (training, or starting the
    session a moment after this peer): it is waited on for the whole joining window,
    ``prepare + stage`` from the first dial. One that does not answer at all (connection
    refused: no process there) is given up after ``unreachable_limit`` of continuous
    unreachability, counted from its first unanswered dial and reset whenever it answers,
    so the round moves to the next aggregator instead of spending the joining window on a
    dead one. Times are the caller's clock (the event loop's), passed in.
    """

    deadline: float
    unreachable_limit: float
    unreachable_since: float | None = None

    @classmethod
    def opening(cls, now: float, prepare_seconds: float, stage_seconds: float) -> JoinWindow:
        return cls(
            deadline=now + prepare_seconds + stage_seconds,
            unreachable_limit=max(stage_seconds, UNREACHABLE_FLOOR_SECONDS),
        )

    def retry(self, outcome: RoundOutcome, now: float) -> bool:
        """Whether to dial again after ``outcome``, answered at ``now``."""
        if not outcome.unreachable:
            self.unreachable_since = None  # it answered: whatever it said, it is there
        elif self.unreachable_since is None:
            self.unreachable_since = now
        if outcome.status is not RoundStatusKind.AGGREGATOR_FAILED or now >= self.deadline:
            return False
        if outcome.unreachable:
            assert self.unreachable_since is not None
            return now - self.unreachable_since < self.unreachable_limit
        return outcome.precondition == pb.PRECONDITION_NOT_READY


def own_failure(outcome: RoundOutcome | None, failures: tuple[str, ...] = OWN_FAILURES) -> bool:
    """Whether an attempt failed by this peer's own fault, one of ``failures`` (None: an
    exception ended it before it had an outcome).

    Only a REFUSED outcome is this peer's own word: an ABORTED one carries the aggregator's
    Abort reason, remote text that may start with anything. Taken by its text alone, an
    aggregator's "internal error: ..." bought it a second run of its attempt and counted as
    this peer's own bug towards SAME_ERROR_ATTEMPTS.
    """
    if outcome is None:
        return True
    return outcome.status is RoundStatusKind.REFUSED and outcome.reason.startswith(failures)


def rejoin_attempt(
    round_: int,
    attempt: int,
    outcome: RoundOutcome | None,
    views: list[tuple[str, pb.SessionStatus]],
    rejoined: set[int],
) -> bool:
    """Whether to join ``attempt`` again after it failed here by this peer's own fault
    (an unexpected error, a contribution it could not prepare), once.

    The others still wait for this peer in that attempt: its aggregator waits the
    joining window for every hello, and when this peer is that aggregator, their hellos
    wait that long for it to start the attempt (``SessionRunner.find_round``), which it now does
    again. Moving on instead sends this peer to an attempt whose aggregator has not
    started it, and the others, failing theirs without it, to that attempt just as this
    peer gives up on it: one attempt apart, every attempt failed, for good when the round
    needs every peer (issue 11, found by tests/round/test_runner_resilience.py).

    Once per attempt (so the attempt limit still bounds the round), and not when more
    than half of the answering participants say they have moved past it. Their answers
    are not evidence: a liar can at most cost this peer that one extra try. The others
    may not have started the round yet when this peer fails (a failure at once, peers
    starting a moment apart): they come to this attempt, so no answer saying so is
    needed. Running an attempt twice signs nothing twice: a peer keeps its vote of the
    round (peer/ledger/_votes.py).
    """
    if not own_failure(outcome) or attempt in rejoined:
        return False
    past = [
        status
        for _, status in views
        if status.state == SessionState.RUNNING
        and (status.current_round, status.current_attempt) > (round_, attempt)
    ]
    return 2 * len(past) <= len(views)


def next_attempt(
    proposal: SessionProposal,
    beacon: bytes,
    round_: int,
    failed: int,
    views: list[tuple[str, pb.SessionStatus]],
    *,
    stated: int | None = None,
) -> int:
    """The attempt of ``round_`` to try after ``failed`` (-1: none yet): the next one, or the
    one most of the others run now if that is further on.

    Never one before ``stated``, the attempt this peer last stated its vote for (it signs no
    record of an earlier attempt, peer/ledger/_votes.py): after a restart it goes straight
    there instead of being refused once per stale attempt.

    A peer that was down, or lost an attempt, would otherwise dial aggregators one attempt
    behind everyone. The others' answers (``views``) are not evidence, so they only choose
    the attempt (whose aggregator is then dialled, and must run it): they never move the
    round. A hint counts only when more than half of the answering participants give the
    same aggregator for this round, so one liar cannot steer it. Their attempt is taken as
    they state it when it matches that aggregator; an aggregator alone names an attempt only
    up to a multiple of n, and guessing the first one ahead once sent a restarted peer n
    attempts past the others (issue 11, the partial-agreement soak).
    """
    nxt = failed + 1
    if stated is not None and stated > nxt:
        nxt = stated
    votes: dict[str, list[int | None]] = {}
    for _, status in views:
        if status.state == SessionState.RUNNING and status.current_round == round_:
            said = status.current_attempt
            consistent = aggregator_for(proposal, round_, said, beacon) == status.current_aggregator
            votes.setdefault(status.current_aggregator, []).append(said if consistent else None)
    if not votes:
        return nxt
    aggregator, attempts = max(votes.items(), key=lambda item: len(item[1]))
    if 2 * len(attempts) <= len(views) or (
        failed >= 0 and aggregator == aggregator_for(proposal, round_, failed, beacon)
    ):
        return nxt  # no majority, or the others have not moved past the failed attempt
    said_by_them = [a for a in attempts if a is not None]
    if said_by_them:
        # Behind this peer's next attempt: they will come to it (this peer cannot go back).
        return max(nxt, max(set(said_by_them), key=said_by_them.count))
    n = len(proposal.participants)  # peers that do not say their attempt (older versions)
    for candidate in range(nxt, nxt + n):
        if aggregator_for(proposal, round_, candidate, beacon) == aggregator:
            return candidate
    return nxt
