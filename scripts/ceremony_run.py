"""``ceremony run``: propose a session to the peers, start it, watch it, show what was agreed.

The operator only proposes and watches: the peers run the rounds themselves, so stopping this
command (Ctrl-C) stops nothing but the watching; ``ceremony run --attach SESSION`` picks it up
again. What is shown at the end comes from the peers' own ledgers (the ``Records`` RPC), and
each round's record is compared across peers, so the table is what they actually agreed on.

``federation.toml`` (paths are relative to the file)::

    [operator]
    cert = "operator/ceremony-operator.pem"
    key = "operator/ceremony-operator.key"      # mode 0600
    ca = "ca.pem"
    roster = "roster.json"                      # with roster.json.sig beside it

    [session]
    id = "study-1"                  # optional: default session-<UTC time>-<random>
    participants = ["hospital-a", "hospital-b", "hospital-c"]   # default: every roster peer
    rounds = 3
    threshold = 3                   # default: the lowest safe one (SECURITY.md)
    colluders = 1                   # participants that may collude, the aggregator included
    graph = "complete"              # or "secagg+" (then optionally degree = K)
    stage_seconds = 30
    prepare_seconds = 120

    [session.payload]
    kind = "vector"
    length = 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from scripts._cli import EXIT_FAILED, EXIT_OK, UsageError, one_line
from scripts.ceremony_identity import user_errors

if TYPE_CHECKING:
    from peer.identity import Roster
    from peer.operator import OperatorClient
    from peer.session import SessionProposal
    from peer.wire import peer_pb2 as pb

__all__ = [
    "EXIT_INTERRUPTED",
    "FederationFile",
    "ProgressView",
    "RoundRow",
    "SessionOutcome",
    "add_parsers",
    "build_proposal",
    "drive_session",
    "load_federation",
    "print_rounds",
]

EXIT_INTERRUPTED = 130  # the shell's convention for "stopped by Ctrl-C"
POLL_SECONDS = 0.5
# Session states after which a peer does nothing more for the session.
FINAL_STATES = frozenset({"finished", "aborted", "refused", "failed"})
# Stages a round goes through, as the peers report them (peer/rounds.py), for the bar.
STAGES = ("starting", "advertise", "share", "masked", "consistency", "unmask", "verify")

_SESSION_KEYS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "participants": list,
    "rounds": int,
    "threshold": int,
    "colluders": int,
    "graph": str,
    "degree": int,
    "bits": int,
    "aggregation": str,
    "stage_seconds": (int, float),
    "prepare_seconds": (int, float),
    "seed": int,
    "payload": dict,
    "privacy": dict,
}


# --------------------------------------------------------------------------- federation.toml


@dataclass(frozen=True)
class FederationFile:
    """A parsed ``federation.toml``: the operator's files and the raw ``[session]`` table."""

    path: Path
    cert: Path
    key: Path
    ca: Path
    roster: Path
    session: Mapping[str, Any]


def load_federation(path: Path, *, payload_required: bool = True) -> FederationFile:
    """Read and check ``federation.toml``; every problem names the file and the key.

    Args:
        path: the file.
        payload_required: whether ``[session]`` must describe a payload and its ``rounds``
            (``ceremony run``); commands that bring their own payload (``ceremony stats``)
            only need the operator's files and, optionally, the session's other settings.

    Raises:
        UsageError: missing or malformed file, missing keys, wrong types, missing files.
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such federation file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: not valid TOML: {error}") from None
    operator = document.get("operator")
    if not isinstance(operator, dict):
        raise UsageError(f"{path}: missing [operator] table (cert, key, ca, roster)")
    session = document.get("session", None if payload_required else {})
    if not isinstance(session, dict):
        raise UsageError(f"{path}: missing [session] table (participants, rounds, payload)")
    unknown = sorted(set(document) - {"operator", "session"})
    if unknown:
        raise UsageError(f"{path}: unknown table(s) {', '.join(unknown)}")

    def file(key: str) -> Path:
        value = operator.get(key)
        if not isinstance(value, str):
            raise UsageError(f"{path} [operator]: '{key}' must be a path (string)")
        resolved = (path.parent / value).resolve()
        if not resolved.is_file():
            raise UsageError(f"{path} [operator]: '{key}' = {value!r}: no such file ({resolved})")
        return resolved

    for key, value in session.items():
        kind = _SESSION_KEYS.get(key)
        if kind is None:
            raise UsageError(
                f"{path} [session]: unknown key '{key}' (known: {', '.join(_SESSION_KEYS)})"
            )
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UsageError(f"{path} [session]: '{key}' has the wrong type: {value!r}")
    payload = session.get("payload")
    if payload_required and (payload is None or not isinstance(payload.get("kind"), str)):
        raise UsageError(f"{path} [session.payload]: missing 'kind' (e.g. kind = \"vector\")")
    if payload_required and "rounds" not in session:
        raise UsageError(f"{path} [session]: missing required key 'rounds'")
    return FederationFile(
        path=path,
        cert=file("cert"),
        key=file("key"),
        ca=file("ca"),
        roster=file("roster"),
        session=session,
    )


def default_session_id(now: datetime) -> str:
    """A fresh session id: readable time plus a random suffix so two runs never collide."""
    return f"session-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def build_proposal(
    federation: FederationFile, roster: Roster, session_id: str | None = None
) -> SessionProposal:
    """The :class:`~peer.session.SessionProposal` that ``federation``'s ``[session]`` describes.

    Raises:
        UsageError: a participant not in the roster, or a proposal the library rejects.
    """
    from peer.identity import Role
    from peer.session import SessionProposal

    table = federation.session
    where = f"{federation.path} [session]"
    peers = [e.peer_id for e in roster.entries if e.role is Role.PEER]
    participants = [str(p) for p in table.get("participants", peers)]
    strangers = [p for p in participants if p not in peers]
    if strangers:
        raise UsageError(
            f"{where}: participants {', '.join(strangers)} are not peers in the roster "
            f"{federation.roster} (its peers: {', '.join(peers)})"
        )
    graph = str(table.get("graph", "complete"))
    degree = table.get("degree")
    sid = session_id or str(table.get("id") or default_session_id(datetime.now(UTC)))
    try:
        return SessionProposal(
            session_id=sid,
            participants=tuple(participants),
            rounds=int(table["rounds"]),
            threshold=int(
                table.get(
                    "threshold",
                    SessionProposal.default_threshold(
                        len(participants),
                        int(table.get("colluders", 1)),
                        graph,
                        None if degree is None else int(degree),
                    ),
                )
            ),
            payload=dict(table["payload"]),
            graph=graph,
            degree=None if degree is None else int(degree),
            bits=int(table.get("bits", 32)),
            aggregation=str(table.get("aggregation", "secagg")),
            privacy=dict(table.get("privacy", {})),
            stage_seconds=float(table.get("stage_seconds", 30.0)),
            prepare_seconds=float(table.get("prepare_seconds", 120.0)),
            seed=int(table.get("seed", 0)),
            colluders=int(table.get("colluders", 1)),
        )
    except ValueError as error:  # ProposalError, or an unknown graph kind
        raise UsageError(f"{where}: {error}") from None


def operator_client(federation: FederationFile) -> OperatorClient:
    """An :class:`~peer.operator.OperatorClient` for the operator named by its certificate."""
    from peer.identity import fingerprint, load_certificate
    from peer.operator import OperatorClient

    with user_errors():
        mine = fingerprint(load_certificate(federation.cert))
        client = OperatorClient.from_files(
            "?", federation.cert, federation.key, federation.ca, federation.roster
        )
    entry = next((e for e in client.roster.entries if e.cert_fingerprint_sha256 == mine), None)
    if entry is None:
        raise UsageError(
            f"{federation.path} [operator]: certificate {federation.cert} is not in the roster "
            f"{federation.roster}; the peers would refuse it"
        )
    client.me = entry.peer_id
    return client


# --------------------------------------------------------------------------- results


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


def _row(proto: pb.AgreedRecord, participants: Sequence[str], roster: Roster) -> RoundRow:
    from peer.rounds import record_from_proto

    record, signatures = record_from_proto(proto)
    metrics = dict(record.metrics)
    listed = metrics.pop("survivors", None)
    survivors = tuple(str(p) for p in (listed if isinstance(listed, list) else participants))
    aggregator = str(metrics.pop("aggregator", ""))
    verifiers = roster.verifiers()
    payload = record.payload()
    valid = sum(
        1
        for peer, signature in signatures.items()
        if peer in verifiers and verifiers[peer].verify(signature, payload)
    )
    return RoundRow(
        round=record.round,
        aggregator=aggregator,
        participants=tuple(sorted(participants)),
        survivors=survivors,
        dropped=tuple(sorted(set(participants) - set(survivors))),
        metrics=metrics,
        epsilon={str(k): float(v) for k, v in record.epsilon.items()},
        signatures=valid,
        record_hash=record.record_hash().hex(),
    )


async def fetch_records(
    client: OperatorClient, session_id: str, peer: str
) -> list[pb.AgreedRecord]:
    """The agreed records of ``session_id`` in ``peer``'s ledger (the ``Records`` RPC).

    Raises:
        TransportError: the peer cannot be reached or refused the call.
    """
    from peer.wire import peer_pb2 as pb

    # OperatorClient has no public Records call yet; _call is its one RPC path (with the
    # error mapping), so going through it keeps a single place that talks to peers.
    status = await client._call(
        peer, "Records", pb.SessionRef(session_id=session_id), pb.SessionStatus
    )
    assert isinstance(status, pb.SessionStatus)
    return sorted(status.records, key=lambda r: r.round)


async def collect_rounds(
    client: OperatorClient, session_id: str, participants: Sequence[str]
) -> tuple[list[RoundRow], dict[str, str]]:
    """Each agreed round, compared across every reachable participant's ledger.

    Returns:
        the rows (from the peer holding the most records) and, per peer that could not be
        asked, why.
    """
    from peer.tls import TransportError

    answers = await asyncio.gather(
        *(fetch_records(client, session_id, p) for p in participants), return_exceptions=True
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
        row = _row(proto, participants, client.roster)
        same: list[str] = []
        other: list[str] = []
        for peer, records in held.items():
            mine = next((r for r in records if r.round == row.round), None)
            if mine is None:
                continue
            hash_ = _row(mine, participants, client.roster).record_hash
            (same if hash_ == row.record_hash else other).append(peer)
        rows.append(replace(row, held_by=tuple(sorted(same)), differs=tuple(sorted(other))))
    return rows, unreachable


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
        from peer.wire import peer_pb2 as pb

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
        if lead.current_round and key != self._round and lead.state == "running":
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


# --------------------------------------------------------------------------- driving


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
            and all(state == "finished" for state in self.states.values())
            and [row.round for row in self.rows] == list(range(1, self.planned + 1))
            and not any(row.differs for row in self.rows)
        )


async def check_reachable(client: OperatorClient, session_id: str, peers: Sequence[str]) -> None:
    """Fail before proposing anything if a peer cannot be reached, naming every such peer.

    Raises:
        UsageError: listing each unreachable peer with the transport's reason.
    """
    import grpc

    statuses = await client.status(session_id, peers)
    problems = [
        f"{peer} ({one_line(status)})"
        for peer, status in statuses.items()
        if isinstance(status, Exception)
        and getattr(status, "code", None) is not grpc.StatusCode.NOT_FOUND
    ]
    if problems:
        raise UsageError(
            f"cannot reach {len(problems)} of {len(peers)} peers: "
            + "; ".join(problems)
            + ". Nothing was proposed. Check that these peers run (peer start --config ...) "
            "at the addresses in the roster"
        )


async def propose_and_start(client: OperatorClient, proposal: SessionProposal) -> None:
    """Propose ``proposal`` to every participant and start it where all accepted.

    Raises:
        UsageError: a peer cannot be reached.
        ProposalRefused: a peer refused (its reason is in ``answers``).
    """
    from peer.operator import BeaconFailed
    from peer.tls import TransportError

    await check_reachable(client, proposal.session_id, proposal.participants)
    try:
        await client.propose(proposal)
        # Commit-reveal of the session beacon with every participant (peer/beacon.py).
        await client.start(proposal.session_id, proposal.participants)
    except (TransportError, BeaconFailed) as error:
        raise UsageError(one_line(error)) from None


async def drive_session(
    client: OperatorClient,
    session_id: str,
    participants: Sequence[str],
    view: ProgressView,
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
    from peer.wire import peer_pb2 as pb

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
            for proto in await fetch_records(client, session_id, source):
                if proto.round > view.reported_rounds:
                    view.agreed(_row(proto, participants, client.roster))
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
        UsageError: no participant knows the session.
    """
    from peer.wire import peer_pb2 as pb

    statuses = await client.status(session_id, participants)
    known = {p: s for p, s in statuses.items() if isinstance(s, pb.SessionStatus)}
    if not known:
        reasons = "; ".join(f"{p}: {one_line(s)}" for p, s in statuses.items())
        raise UsageError(f"no participant knows session {session_id!r} ({reasons})")
    waiting = [p for p, s in known.items() if s.state == "accepted"]
    if waiting:
        # The beacon needs every participant's nonce: those already running answer theirs
        # and the beacon they hold; the waiting ones then fix it and start.
        from peer.operator import BeaconFailed

        try:
            await client.start(session_id, list(participants))
        except BeaconFailed as error:
            raise UsageError(one_line(error)) from None


def default_timeout(proposal: SessionProposal) -> float:
    """Generous time for the whole session: every round may need a retry or two."""
    per_round = proposal.prepare_seconds + 8 * proposal.stage_seconds
    return proposal.rounds * per_round + 60.0


# --------------------------------------------------------------------------- command


# The example in the module docstring, shown under `ceremony run --help`.
_FILE_EXAMPLE = "federation.toml" + (__doc__ or "").split("``federation.toml``", 1)[-1].replace(
    "::", ":", 1
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
    parser.set_defaults(handler=_cmd_run)


def outcome_report(outcome: SessionOutcome) -> dict[str, Any]:
    """The JSON form of a session's outcome."""
    return {
        "session_id": outcome.session_id,
        "ok": outcome.ok,
        "states": outcome.states,
        "unreachable": outcome.unreachable,
        "timed_out": outcome.timed_out,
        "rounds": [row.as_json() for row in outcome.rows],
    }


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
    client: Any,
    proposal: Any,
    *,
    attach: bool,
    timeout: float,
    quiet: bool,
    json_output: bool,
    what: str,
    started: str,
    again: str,
) -> SessionOutcome | int:
    """Propose and start ``proposal`` (or reattach to it), then follow it with a progress
    view. Returns the outcome, or the exit code when peers refused or the user pressed
    Ctrl-C (the peers carry on: ``again`` says how to come back)."""
    from peer.operator import ProposalRefused

    sid = proposal.session_id
    view = ProgressView(
        None if quiet else sys.stderr,
        proposal.participants,
        proposal.rounds,
        live=sys.stderr.isatty() and not quiet,
    )

    async def go() -> SessionOutcome:
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
        return asyncio.run(go())
    except ProposalRefused as refused:
        for peer, reason in sorted(refused.answers.items()):
            print(f"{peer} refused {what} {sid}: {reason}", file=sys.stderr)
        if json_output:
            print(json.dumps({"session_id": sid, "ok": False, "refused": refused.answers}))
        return EXIT_FAILED
    except KeyboardInterrupt:
        view.close()
        print(f"\nstopped watching; the peers carry on with {what} {sid}. {again}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _cmd_run(args: argparse.Namespace) -> int:
    federation = load_federation(args.federation)
    client = operator_client(federation)
    proposal = build_proposal(federation, client.roster, session_id=args.attach)
    timeout = args.timeout if args.timeout is not None else default_timeout(proposal)
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, not {timeout}")
    sid = proposal.session_id
    reattach = f"ceremony run --attach {sid} --federation {args.federation}"
    outcome = propose_and_follow(
        client,
        proposal,
        attach=bool(args.attach),
        timeout=timeout,
        quiet=args.quiet,
        json_output=args.json,
        what="session",
        started=f"({proposal.rounds} rounds); Ctrl-C stops watching, not the peers",
        again=f"Reattach with: {reattach}",
    )
    if isinstance(outcome, int):
        return outcome
    if args.json:
        print(json.dumps(outcome_report(outcome), sort_keys=True))
    else:
        _print_outcome(outcome, args.federation, sys.stdout)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def add_parsers(subparsers: Any) -> None:
    """Register ``run`` on ``ceremony``'s subparsers."""
    _add_run(subparsers)
