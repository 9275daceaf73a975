"""``ceremony run``: propose a session to the peers, start it, watch it, show what was agreed.

The operator only proposes and watches: the peers run the rounds themselves, so stopping this
command (Ctrl-C) stops nothing but the watching; ``ceremony run --attach SESSION`` picks it up
again. What is shown at the end comes from the peers' own ledgers (the ``Records`` RPC), and
each round's record is compared across peers, so the table is what they actually agreed on.

The session-following library is :mod:`peer.operator`; this module parses the arguments
and prints. ``federation.toml`` is described in :mod:`peer.operator.federation`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

from peer.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError, one_line, user_errors
from peer.operator import (
    STAGES,
    FederationFile,
    OperatorClient,
    ProposalRefused,
    RoundRow,
    SessionOutcome,
    build_proposal,
    default_timeout,
    drive_session,
    load_federation,
    operator_client,
    propose_and_start,
    start_if_accepted,
)
from peer.operator.federation import __doc__ as federation_doc
from peer.operator.session_examples import TRAINING_HELP
from peer.session import SessionProposal
from peer.session_state import SessionState
from peer.wire import peer_pb2 as pb

__all__ = [
    "ProgressView",
    "add_parsers",
    "connect",
    "print_rounds",
    "propose_and_follow",
]


# --------------------------------------------------------------------------- results


T = TypeVar("T")

# Metrics shown first in the table, when present; then the other short ones alphabetically.
_LEADING_METRICS = ("round_kind", "accuracy", "loss", "auc", "sensitivity", "specificity")
_SHORT_TEXT = 16


def _metric_cells(metrics: Mapping[str, Any]) -> list[str]:
    """``key=value`` for the scalar metrics; nested ones (e.g. standardization vectors) and
    long texts are left to ``--json`` and the dashboard."""
    order = [k for k in _LEADING_METRICS if k in metrics]
    order += sorted(k for k in metrics if k not in _LEADING_METRICS)
    cells = []
    for key in order:
        value = metrics[key]
        if isinstance(value, float):
            cells.append(f"{key}={value:.4g}")
        elif isinstance(value, bool | int) or (
            isinstance(value, str) and len(value) <= _SHORT_TEXT
        ):
            cells.append(f"{key}={value}")
        elif value is None:
            cells.append(f"{key}=n/a")
    return cells


def print_rounds(rows: Sequence[RoundRow], out: TextIO) -> None:
    """The agreed rounds as a table: aggregator, who dropped, signatures, metrics, ε."""
    if not rows:
        print("no round was agreed", file=out)
        return
    print(
        f"{'round':>5}  {'aggregator':<16} {'survivors':>9}  {'dropped':<16} {'signed':>6}  "
        f"{'held by':>7}  {'max eps':>7}  metrics",
        file=out,
    )
    for row in rows:
        metrics = ", ".join(_metric_cells(row.metrics))
        epsilon = max(row.epsilon.values(), default=0.0)
        print(
            f"{row.round:>5}  {row.aggregator:<16} "
            f"{len(row.survivors):>4}/{len(row.participants):<4}"
            f"  {', '.join(row.dropped) or '-':<16} {row.signatures:>6}  "
            f"{len(row.held_by):>7}  {epsilon:>7.3g}  {metrics or '-'}",
            file=out,
        )
    for row in rows:
        if row.differs:
            print(
                f"WARNING: round {row.round}: {', '.join(row.differs)} hold a different record",
                file=out,
            )


# --------------------------------------------------------------------------- progress


@dataclass
class ProgressView:
    """Live progress on ``stream``: a redrawn bar on a terminal, event lines otherwise.

    Events (a round starts with its aggregator, a round is agreed and who dropped, a peer
    stops or resumes answering) are always printed as lines, so a log keeps them.
    """

    stream: TextIO | None
    participants: Sequence[str]
    rounds: int
    live: bool = False
    _round: tuple[int, str, str] = (0, "", "")
    _agreed: int = 0
    _down: dict[str, str] = field(default_factory=dict)
    _bar_shown: bool = False

    def _line(self, text: str) -> None:
        if self.stream is None:
            return
        clear = "\r\x1b[K" if self._bar_shown else ""
        self._bar_shown = False
        print(f"{clear}{text}", file=self.stream, flush=True)

    def update(self, statuses: Mapping[str, pb.SessionStatus | Exception]) -> None:
        """Show what changed since the last poll."""
        for peer, status in statuses.items():
            if isinstance(status, Exception):
                reason = one_line(status)
                if peer not in self._down:
                    self._line(f"{peer}: not answering ({reason})")
                self._down[peer] = reason
            elif peer in self._down:
                del self._down[peer]
                self._line(f"{peer}: answering again")
        up = [s for s in statuses.values() if isinstance(s, pb.SessionStatus)]
        if not up:
            return
        lead = max(up, key=lambda s: (s.rounds_agreed, s.current_round))
        running = [s for s in up if s.current_round == lead.current_round and s.current_stage]
        stage = running[0].current_stage if running else lead.current_stage
        aggregator = lead.current_aggregator
        key = (lead.current_round, aggregator, stage if not self.live else "")
        if lead.current_round and key != self._round and lead.state == SessionState.RUNNING:
            previous_round, previous_aggregator, _ = self._round
            if lead.current_round == previous_round and aggregator != previous_aggregator:
                self._line(
                    f"round {lead.current_round}: aggregator {previous_aggregator} failed, "
                    f"retrying with {aggregator}"
                )
            elif self.live or lead.current_round != previous_round:
                self._line(f"round {lead.current_round}/{self.rounds}: aggregator {aggregator}")
            else:
                self._line(f"round {lead.current_round}: {stage}")
            self._round = key
        if self.live:
            self._bar(lead, stage, len(up))

    def _bar(self, lead: pb.SessionStatus, stage: str, up: int, width: int = 20) -> None:
        if self.stream is None:
            return
        within = (STAGES.index(stage) + 1) / (len(STAGES) + 1) if stage in STAGES else 0.0
        done = min(1.0, (lead.rounds_agreed + within) / max(1, self.rounds))
        filled = int(done * width)
        text = (
            f"[{'#' * filled}{'-' * (width - filled)}] {lead.rounds_agreed}/{self.rounds} rounds"
            f" | round {lead.current_round} {stage or lead.state}"
            f" | aggregator {lead.current_aggregator or '-'}"
            f" | {up}/{len(self.participants)} peers answering"
        )
        print(f"\r\x1b[K{text}", end="", file=self.stream, flush=True)
        self._bar_shown = True

    def agreed(self, row: RoundRow) -> None:
        dropped = ", ".join(row.dropped) or "none"
        self._line(
            f"round {row.round} agreed: aggregator {row.aggregator}, "
            f"{len(row.survivors)}/{len(row.participants)} contributed (dropped: {dropped}), "
            f"{row.signatures} signatures"
        )
        self._agreed = max(self._agreed, row.round)

    def close(self) -> None:
        if self._bar_shown and self.stream is not None:
            print(file=self.stream, flush=True)
            self._bar_shown = False

    @property
    def reported_rounds(self) -> int:
        return self._agreed


# --------------------------------------------------------------------------- command


# The example in peer.operator.federation's docstring, shown under `ceremony run --help`.
_FILE_EXAMPLE = (
    "federation.toml"
    + (federation_doc or "")
    .split("``federation.toml``", 1)[-1]
    .split("Training sessions (", 1)[0]
    .replace("::", ":", 1)
    + TRAINING_HELP
)


def _add_run(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="propose a session to the peers, start it and show live progress",
        description=(
            "Propose the session described in federation.toml to its participants, start it, "
            "show progress on stderr and the agreed result on stdout. The peers run the rounds "
            "themselves: Ctrl-C only stops watching (reattach with --attach). Exit 0 when "
            "every round was agreed, 1 when the session was refused or did not finish, 2 for "
            "bad input or unreachable peers."
        ),
        epilog=_FILE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--federation",
        type=Path,
        required=True,
        metavar="federation.toml",
        help="the operator's certificate, key, CA and roster, and the session to run",
    )
    parser.add_argument(
        "--attach",
        metavar="SESSION",
        help="watch a session that was already proposed (its participants from the file)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="stop watching after S seconds (default: from rounds and stage timeouts)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the file and print the model, data shape and the epsilon each site would "
        "spend; propose nothing",
    )
    parser.add_argument(
        "--records",
        action="append",
        default=[],
        metavar="PEER=N",
        help="with --dry-run: a site's number of training records (repeatable)",
    )
    parser.set_defaults(handler=_cmd_run)


def _records(values: Sequence[str]) -> dict[str, int]:
    records: dict[str, int] = {}
    for value in values:
        peer, _, count = value.partition("=")
        if not peer or not count.isdigit() or int(count) < 1:
            raise UsageError(f"--records {value!r}: expected PEER=N with N a positive integer")
        records[peer] = int(count)
    return records


def _dry_run(args: argparse.Namespace, federation: FederationFile) -> int:
    """Check and describe the session without contacting any peer."""
    from peer.identity import load_certificate, load_roster
    from peer.operator.dry_run import dry_run_lines
    from peer.session import ProposalError

    records = _records(args.records)
    with user_errors():
        # The signed roster (for the participants), checked against the CA; no peer is
        # contacted.
        roster = load_roster(federation.roster, load_certificate(federation.ca))
        proposal = build_proposal(federation, roster, session_id=args.attach)
    strangers = sorted(set(records) - set(proposal.participants))
    if strangers:
        raise UsageError(f"--records names non-participants: {', '.join(strangers)}")
    try:
        lines = dry_run_lines(proposal, records)
    except ProposalError as error:
        print(f"every peer would refuse this session: {error}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(lines))
    return EXIT_OK


def _print_outcome(outcome: SessionOutcome, federation: Path, out: TextIO) -> None:
    print(f"session {outcome.session_id}:", file=out)
    print_rounds(outcome.rows, out)
    states = ", ".join(f"{p} {s}" for p, s in sorted(outcome.states.items()))
    print(f"peers: {states or '-'}", file=out)
    for peer, reason in sorted(outcome.unreachable.items()):
        print(f"not answering: {peer}: {reason}", file=out)
    if outcome.timed_out:
        print(
            f"still running on the peers; watch again with: ceremony run --attach "
            f"{outcome.session_id} --federation {federation}",
            file=out,
        )


def propose_and_follow(
    client: OperatorClient,
    proposal: SessionProposal,
    *,
    attach: bool,
    timeout: float | None,
    quiet: bool,
    json_output: bool,
    what: str,
    started: str,
    again: str,
) -> SessionOutcome | int:
    """Propose and start ``proposal`` (or reattach to it), then follow it with a progress
    view. Returns the outcome, or the exit code when peers refused or the user pressed
    Ctrl-C (the peers carry on: ``again`` says how to come back).

    Raises:
        UsageError: ``timeout`` (``--timeout``; None for :func:`default_timeout`) is not
            positive.
    """
    if timeout is None:
        timeout = default_timeout(proposal)
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, not {timeout}")
    sid = proposal.session_id
    view = ProgressView(
        None if quiet else sys.stderr,
        proposal.participants,
        proposal.rounds,
        live=sys.stderr.isatty() and not quiet,
    )

    async def follow() -> SessionOutcome:
        try:
            if attach:
                await start_if_accepted(client, sid, proposal.participants)
            else:
                await propose_and_start(client, proposal)
                if not quiet:
                    print(
                        f"{what} {sid} started on {len(proposal.participants)} peers {started}",
                        file=sys.stderr,
                    )
            return await drive_session(
                client, sid, proposal.participants, view, rounds=proposal.rounds, timeout=timeout
            )
        finally:
            await client.close()

    try:
        outcome = asyncio.run(until_interrupted(follow()))
    except ProposalRefused as refused:
        for peer, reason in sorted(refused.answers.items()):
            print(f"{peer} refused {what} {sid}: {reason}", file=sys.stderr)
        if json_output:
            print(json.dumps({"session_id": sid, "ok": False, "refused": refused.answers}))
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler was installed
        outcome = None
    if outcome is None:
        view.close()
        print(f"\nstopped watching; the peers carry on with {what} {sid}. {again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return outcome


async def until_interrupted(work: Coroutine[Any, Any, T]) -> T | None:
    """``work``'s result, or None once the user pressed Ctrl-C (SIGINT); ``work`` is then
    cancelled and awaited.

    asyncio.run's own Ctrl-C handling cancels the main task and relies on that cancellation
    reaching the top. A cancelled grpc call raises an RpcError (CANCELLED) rather than
    CancelledError, and Python 3.11's wait_for can swallow a cancellation that races with
    its result: a CI run saw Ctrl-C ignored and the session watched to its end (exit 0, not
    130). So the signal sets an event here, and what was asked is decided by the event, not by
    how the cancellation travelled.
    """
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    with contextlib.suppress(NotImplementedError):  # loops without signal handlers (Windows)
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)
    if not interrupted.is_set():
        return task.result()
    while not task.done():  # a cancellation may be swallowed on its way: ask again
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled():
        task.exception()  # retrieved: the user asked to stop, whatever it ended with
    return None


def connect(federation: FederationFile) -> OperatorClient:
    """:func:`peer.operator.operator_client`, its unreadable files reported as usage errors."""
    with user_errors():
        return operator_client(federation)


def _cmd_run(args: argparse.Namespace) -> int:
    federation = load_federation(args.federation)
    if args.dry_run:
        return _dry_run(args, federation)
    if args.records:
        raise UsageError("--records goes with --dry-run")
    client = connect(federation)
    proposal = build_proposal(federation, client.roster, session_id=args.attach)
    sid = proposal.session_id
    reattach = f"ceremony run --attach {sid} --federation {args.federation}"
    outcome = propose_and_follow(
        client,
        proposal,
        attach=bool(args.attach),
        timeout=args.timeout,
        quiet=args.quiet,
        json_output=args.json,
        what="session",
        started=f"({proposal.rounds} rounds); Ctrl-C stops watching, not the peers",
        again=f"Reattach with: {reattach}",
    )
    if isinstance(outcome, int):
        return outcome
    if args.json:
        print(json.dumps(outcome.as_json(), sort_keys=True))
    else:
        _print_outcome(outcome, args.federation, sys.stdout)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def add_parsers(subparsers: Any) -> None:
    """Register ``run`` on ``ceremony``'s subparsers."""
    _add_run(subparsers)
