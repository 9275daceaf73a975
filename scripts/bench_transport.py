"""Benchmark: whole rounds over the real transport, secure aggregation against cleartext.

``python -m scripts.bench transport`` (or ``ceremony bench transport``) starts n real peer
processes (``python -m peer start``) on 127.0.0.1 with mutual TLS, gives each the same fixed
vector of m ring words, and lets an operator run sessions that sum those vectors, alternating
``aggregation="plain"`` (minimal FedAvg: every peer uploads its vector in the clear and the
aggregator returns the sum alone; the insecure baseline, accepted only because the benchmark
federation's policy sets ``allow_cleartext = true``) and ``aggregation="secagg"`` (masked
secure aggregation), several rounds each, on the same running peers. ``--with-cleartext``
adds the older baseline ``aggregation="cleartext"``, which publishes every input to every
peer (verification by download): its cost grows as n·m per peer, like the secure round's
transcript today, so it is kept to show that cost, not as the baseline. It prints a table
and writes JSON (``bench-results/transport.json``).

Theory of operation
-------------------
* **Same work, side by side.** Both kinds of session run on the same processes, the same
  vectors, the same agreement (every peer checks the published transcript, signs the
  record, stores it). Sessions alternate in ABBA order (plain, secure, secure, plain, ...)
  so that a drift in machine load hits both alike.
* **Round time** comes from the peers' ledgers (``Ledger.round_attempts``): round r of a
  session lasts from the moment the last peer stored round r-1 (for r = 1: the first peer
  starting it) to the moment the last peer stored round r. These periods add up to the
  session's span, so nothing is counted twice; the first round of a session also pays for
  the session start (every peer loads its payload and dials the first aggregator), so the
  headline figure is the median over the later rounds, and the first rounds are reported
  on their own.
* **Bytes** are the peers' own counts of message bytes on their round stream (fragment
  payloads, as stored in the ledger's rounds table): what a participant sends and receives.
  The aggregator relays everything, so its extra traffic is the sum of the participants'
  counts; it is reported as well. gRPC, HTTP/2 and TLS framing add a fraction of a percent
  (1 MiB fragments); as a cross-check the loopback interface's byte counter
  (``/proc/net/dev``, which includes TCP/IP headers and anything else using loopback on
  the machine while the session runs) is recorded per session.
* **Correctness.** Every round must be agreed at every peer on its first attempt, and the
  agreed sum of the last round (a peer's stored checkpoint) must equal the sum computed
  here; otherwise the benchmark fails rather than report times of a different computation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from peer.cli import EXIT_FAILED, EXIT_OK, ArgumentParser, UsageError, run_command
from peer.config import Policy
from peer.kit import LocalKit, write_peer_config
from peer.ledger import Checkpoint, Ledger, RoundAttempt, RoundStatus
from peer.operator import OperatorClient, ProposalRefused
from peer.session import SessionProposal, required_colluders
from peer.tls import PeerUnreachableError
from peer.wire import peer_pb2 as pb
from secagg import ConfigError

from .bench_machine import machine_info

__all__ = [
    "DEFAULT_OUTPUT",
    "FULL",
    "QUICK",
    "TARGET_BYTES_RATIO",
    "TARGET_RATIO",
    "TransportBenchError",
    "TransportSizes",
    "add_arguments",
    "print_report",
    "round_periods",
    "run",
]

PROG = "bench transport"
BENCH_HELP = "whole rounds over gRPC + mTLS with real peer processes: secure vs minimal plain"
DEFAULT_OUTPUT = Path("bench-results") / "transport.json"
# secure round time / plain round time at n = 10, m = 1,000,000 (see BENCHMARKS.md).
TARGET_RATIO = 1.5
TARGET_BYTES_RATIO = 1.2  # secure / minimal plain bytes per peer (issue 11)
TARGET_AT = (10, 1_000_000)
VECTOR_FILE = "vector.npy"
BASELINE = "plain"  # minimal FedAvg: what secure aggregation is compared with
KINDS = (BASELINE, "secagg")
FULL_TRANSCRIPT = "cleartext"  # the older baseline, with --with-cleartext


class TransportBenchError(RuntimeError):
    """A peer did not start, a session did not finish, or a round was not what was asked."""


@dataclass(frozen=True)
class TransportSizes:
    """The problem sizes of one run: every (n, m) pair is measured."""

    peers: tuple[int, ...]
    lengths: tuple[int, ...]
    rounds: int  # rounds per session
    pairs: int  # sessions of each kind per (n, m)


FULL = TransportSizes(peers=(5, 10), lengths=(100_000, 1_000_000), rounds=3, pairs=3)
QUICK = TransportSizes(peers=(3,), lengths=(1000,), rounds=1, pairs=1)


# --------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``transport`` benchmark's arguments."""
    parser.add_argument(
        "--quick", action="store_true", help="n=3, m=1000, one round of each kind (seconds)"
    )
    parser.add_argument(
        "--peers", type=int, nargs="+", help=f"numbers of peers (default {FULL.peers})"
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", help=f"vector lengths in words (default {FULL.lengths})"
    )
    parser.add_argument("--rounds", type=int, help=f"rounds per session (default {FULL.rounds})")
    parser.add_argument(
        "--pairs",
        type=int,
        help=f"sessions of each kind per (n, m), interleaved (default {FULL.pairs})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the federation (kits, ledgers, peer logs) here instead of a temporary directory",
    )
    parser.add_argument(
        "--output", type=Path, help=f"where to write the JSON results (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--with-cleartext",
        action="store_true",
        help="also run the older baseline that publishes every input (plain + full transcript)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _sizes(args: argparse.Namespace) -> TransportSizes:
    base = QUICK if args.quick else FULL
    sizes = TransportSizes(
        peers=tuple(args.peers) if args.peers else base.peers,
        lengths=tuple(args.lengths) if args.lengths else base.lengths,
        rounds=args.rounds if args.rounds is not None else base.rounds,
        pairs=args.pairs if args.pairs is not None else base.pairs,
    )
    if any(n < 2 or n > 26 for n in sizes.peers):
        raise UsageError("--peers must be between 2 and 26")
    if any(m < 1 for m in sizes.lengths):
        raise UsageError("--lengths must be positive")
    if sizes.rounds < 1 or sizes.pairs < 1:
        raise UsageError("--rounds and --pairs must be at least 1")
    return sizes


# --------------------------------------------------------------------------- peers


@dataclass
class _PeerProcess:
    peer_id: str
    config: Path
    log_path: Path
    process: subprocess.Popen[str] | None = None

    def start(self, timeout: float) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            self.process = subprocess.Popen(  # noqa: S603 -- our own interpreter and arguments
                [sys.executable, "-m", "peer", "start", "--config", str(self.config)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        stdout = self.process.stdout
        assert stdout is not None
        # The peer prints one JSON line when it listens; a peer that fails to start exits.
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        try:
            event = json.loads(line) if line else {}
        except json.JSONDecodeError:
            event = {}
        if event.get("event") != "ready":
            self.stop()
            raise TransportBenchError(
                f"peer {self.peer_id} did not start within {timeout:.0f} s; "
                f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
            )

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Federation:
    """n peer processes of one benchmark federation, and the operator's files."""

    kit: LocalKit
    peers: dict[str, _PeerProcess]
    vectors: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def running(cls, directory: Path, n: int, stage_seconds: float) -> Iterator[_Federation]:
        # Letters while they last (the transport rows), numbers beyond (the scale rows).
        ids = [
            f"hospital-{chr(ord('a') + i)}" if n <= 26 else f"hospital-{i:02d}" for i in range(n)
        ]
        # The insecure baseline must be allowed explicitly, by every peer's own policy.
        # Exact vector sums are what the benchmark measures: allowed explicitly too.
        policy: dict[str, object] = {"allow_cleartext": True, "allow_exact_payloads": True}
        kit = LocalKit.create(directory, ids, stage_seconds=stage_seconds, policy=policy)
        peers: dict[str, _PeerProcess] = {}
        for peer_id, site in kit.kits.items():
            write_peer_config(
                site.config,
                peer_id,
                site.address,
                stage_seconds=stage_seconds,
                policy={"allowed_operators": [kit.operator], **policy},
                extra=f'payload_file = "{VECTOR_FILE}"',
            )
            peers[peer_id] = _PeerProcess(peer_id, site.config, site.directory / "peer.log")
        federation = cls(kit, peers)
        try:
            for process in peers.values():
                process.start(timeout=120.0)
            yield federation
        finally:
            for process in peers.values():
                process.stop()

    def write_vectors(self, length: int, seed: int) -> np.ndarray[Any, Any]:
        """Give every peer a fresh random vector of ``length`` words; return their sum.

        The peers read the file when a session is proposed, so this must happen between
        sessions.
        """
        rng = np.random.default_rng(seed)
        total = np.zeros(length, dtype=np.uint32)
        for peer_id, site in self.kit.kits.items():
            vector = rng.integers(0, 2**32, size=length, dtype=np.uint64).astype(np.uint32)
            np.save(site.directory / VECTOR_FILE, vector)
            self.vectors[peer_id] = vector
            np.add(total, vector, out=total)
        return total

    def operator(self) -> OperatorClient:
        cert, key, ca = self.kit.operator_files()
        roster = self.kit.federation.roster_path
        assert roster is not None
        return OperatorClient.from_files(self.kit.operator, cert, key, ca, roster)

    def ledger(self, peer_id: str) -> Ledger:
        return Ledger(f"sqlite:///{self.kit.kits[peer_id].directory / 'ledger.db'}")

    def pids(self) -> list[int]:
        return [p.process.pid for p in self.peers.values() if p.process is not None]

    def logs_tail(self) -> str:
        return "\n".join(f"===== {p.peer_id}\n{_tail(p.log_path, 8)}" for p in self.peers.values())


# --------------------------------------------------------------------------- sessions


def _cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU time consumed so far by the processes ``pids`` (Linux), or None."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
                # Fields after the command name (which may hold spaces) start at "state".
                fields = stat.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return total / ticks


def _loopback_bytes() -> int | None:
    """Bytes transmitted by the loopback interface so far (Linux), or None."""
    try:
        with open("/proc/net/dev", encoding="utf-8") as dev:
            for line in dev:
                name, _, counters = line.partition(":")
                if name.strip() == "lo":
                    return int(counters.split()[8])  # transmit bytes
    except (OSError, ValueError, IndexError):
        return None
    return None


async def _drive(
    operator: OperatorClient, proposal: SessionProposal, timeout: float
) -> tuple[float, float]:
    """Propose, start and wait for ``proposal``; return (propose seconds, run seconds)."""
    started = time.perf_counter()
    await operator.propose(proposal)
    proposed = time.perf_counter()
    await operator.start(proposal.session_id, proposal.participants)
    statuses = await operator.wait(
        proposal.session_id, proposal.participants, timeout=timeout, poll=0.2, require_all=True
    )
    finished = time.perf_counter()
    unfinished = {
        peer: (s.state if isinstance(s, pb.SessionStatus) else str(s))
        for peer, s in statuses.items()
        if not (isinstance(s, pb.SessionStatus) and s.state == "finished")
    }
    if unfinished:
        raise TransportBenchError(f"session {proposal.session_id} ended badly: {unfinished}")
    return proposed - started, finished - proposed


def _seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def round_periods(attempts: Mapping[str, Sequence[RoundAttempt]], rounds: int) -> list[float]:
    """Seconds each round of a session took, federation-wide, from every peer's attempts.

    Round r ends when the last peer has ended its attempt at r; it starts when round r-1
    ended (round 1: when the first peer started it). The periods add up to the session's
    span, so time spent waiting for slow peers is counted once, in the round it delays.

    Args:
        attempts: per peer, its attempts at rounds 1..rounds in order, one each.

    Raises:
        TransportBenchError: a peer has no ended attempt for some round.
    """
    periods: list[float] = []
    previous: datetime | None = None
    for r in range(1, rounds + 1):
        this = [rows[r - 1] for rows in attempts.values()]
        if any(a.round != r or a.ended_at is None for a in this):
            raise TransportBenchError(f"round {r} has not ended at every peer")
        if previous is None:
            previous = min(a.started_at for a in this)
        end = max(a.ended_at for a in this if a.ended_at is not None)
        periods.append(_seconds(end, previous))
        previous = end
    return periods


def _session_row(
    federation: _Federation,
    proposal: SessionProposal,
    expected_sum: np.ndarray[Any, Any],
    propose_s: float,
    run_s: float,
    loopback: int | None,
    cpu_s: float | None,
) -> dict[str, Any]:
    """What the peers' ledgers say about one finished session, checked."""
    sid, rounds = proposal.session_id, proposal.rounds
    attempts: dict[str, list[RoundAttempt]] = {}
    checkpoint: Checkpoint | None = None
    for peer_id in federation.peers:
        with federation.ledger(peer_id) as ledger:
            attempts[peer_id] = ledger.round_attempts(sid)
            if peer_id == proposal.participants[0]:
                checkpoint = ledger.get_checkpoint(sid, rounds)
    for peer_id, rows in attempts.items():
        agreed = [a.round for a in rows if a.status == RoundStatus.AGREED]
        if agreed != list(range(1, rounds + 1)) or len(rows) != rounds:
            summary = [(a.round, a.attempt, a.status.value, a.abort_reason) for a in rows]
            raise TransportBenchError(
                f"session {sid}: {peer_id} did not agree every round on the first attempt: "
                f"{summary}"
            )
    if checkpoint is None:
        raise TransportBenchError(f"session {sid}: no agreed result for round {rounds}")
    aggregate = np.frombuffer(checkpoint.weights, dtype="<u4")
    if not np.array_equal(aggregate, expected_sum):
        raise TransportBenchError(f"session {sid}: the agreed sum is not the sum of the vectors")
    periods = round_periods(attempts, rounds)
    every = [a for rows in attempts.values() for a in rows]
    peer_times = [_seconds(a.ended_at, a.started_at) for a in every if a.ended_at is not None]
    sent = [a.bytes_sent for a in every]
    received = [a.bytes_received for a in every]
    n = len(federation.peers)
    return {
        "session_id": sid,
        "aggregation": proposal.aggregation,
        "n": n,
        "m": proposal.vector_length,
        "rounds": rounds,
        "propose_s": propose_s,
        "run_s": run_s,
        "round_s": periods,
        "peer_attempt_median_s": statistics.median(peer_times),
        "aggregators": [rows[0].aggregator for rows in zip(*attempts.values(), strict=True)],
        "bytes_sent_per_peer_median": statistics.median(sent),
        "bytes_received_per_peer_median": statistics.median(received),
        # The aggregator relays every participant stream (its own included).
        "aggregator_bytes_out_per_round": sum(received) / rounds,
        "aggregator_bytes_in_per_round": sum(sent) / rounds,
        "loopback_tx_bytes_per_peer_round": (
            loopback / (n * rounds) if loopback is not None else None
        ),
        # All peers together, proposal included; on an oversubscribed machine the round
        # cannot take less wall time than this divided by the number of cores.
        "cpu_s_per_round": cpu_s / rounds if cpu_s is not None else None,
        "sum_verified": True,
    }


def _run_session(
    federation: _Federation,
    aggregation: str,
    session_id: str,
    length: int,
    rounds: int,
    expected_sum: np.ndarray[Any, Any],
    stage_seconds: float,
) -> dict[str, Any]:
    participants = tuple(federation.peers)
    # The collusion bound every peer's default policy demands (10 %, at least 1): from
    # n = 20 on it is more than the proposal's default of 1.
    colluders = required_colluders(len(participants), Policy())
    proposal = SessionProposal(
        session_id,
        participants,
        rounds=rounds,
        threshold=SessionProposal.default_threshold(len(participants), colluders),
        colluders=colluders,
        payload={"kind": "vector", "length": length},
        aggregation=aggregation,
        stage_seconds=stage_seconds,
        prepare_seconds=stage_seconds,
    )
    timeout = 120.0 + rounds * stage_seconds * 4

    async def go() -> tuple[float, float]:
        operator = federation.operator()
        try:
            return await _drive(operator, proposal, timeout)
        finally:
            await operator.close()

    pids = federation.pids()
    before, cpu_before = _loopback_bytes(), _cpu_seconds(pids)
    try:
        propose_s, run_s = asyncio.run(go())
    # A peer that cannot be reached (e.g. its TLS handshake timed out while 50 peers start
    # on 2 cores) fails the row with the peers' logs, like any other failed session.
    except (TransportBenchError, TimeoutError, ProposalRefused, PeerUnreachableError) as error:
        raise TransportBenchError(f"{error}\n{federation.logs_tail()}") from None
    after, cpu_after = _loopback_bytes(), _cpu_seconds(pids)
    loopback = after - before if after is not None and before is not None else None
    cpu = cpu_after - cpu_before if cpu_after is not None and cpu_before is not None else None
    return _session_row(federation, proposal, expected_sum, propose_s, run_s, loopback, cpu)


# --------------------------------------------------------------------------- summary


def _kind_summary(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    later = [s for row in sessions for s in row["round_s"][1:]]
    first = [row["round_s"][0] for row in sessions]
    steady = later or first
    return {
        "sessions": len(sessions),
        "round_median_s": statistics.median(steady),
        "round_min_s": min(steady),
        "round_max_s": max(steady),
        "rounds_in_median": len(steady),
        "median_excludes_first_rounds": bool(later),
        "first_round_median_s": statistics.median(first),
        "peer_attempt_median_s": statistics.median(r["peer_attempt_median_s"] for r in sessions),
        "bytes_sent_per_peer": statistics.median(r["bytes_sent_per_peer_median"] for r in sessions),
        "bytes_received_per_peer": statistics.median(
            r["bytes_received_per_peer_median"] for r in sessions
        ),
        "aggregator_bytes_out_per_round": statistics.median(
            r["aggregator_bytes_out_per_round"] for r in sessions
        ),
        "loopback_tx_bytes_per_peer_round": _median_or_none(
            [r["loopback_tx_bytes_per_peer_round"] for r in sessions]
        ),
        "cpu_s_per_round": _median_or_none([r["cpu_s_per_round"] for r in sessions]),
    }


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _config_row(n: int, m: int, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    plain = _kind_summary([s for s in sessions if s["aggregation"] == BASELINE])
    secure = _kind_summary([s for s in sessions if s["aggregation"] == "secagg"])
    ratio = secure["round_median_s"] / plain["round_median_s"]
    full = [s for s in sessions if s["aggregation"] == FULL_TRANSCRIPT]
    return {
        "n": n,
        "m": m,
        "plain": plain,
        "secure": secure,
        "cleartext_full_transcript": _kind_summary(full) if full else None,
        # secure bytes / minimal plain bytes, sent + received by one participant per round
        "bytes_ratio": (secure["bytes_sent_per_peer"] + secure["bytes_received_per_peer"])
        / (plain["bytes_sent_per_peer"] + plain["bytes_received_per_peer"]),
        "ratio": ratio,
        "bytes_received_ratio": secure["bytes_received_per_peer"]
        / plain["bytes_received_per_peer"],
        "bytes_sent_ratio": secure["bytes_sent_per_peer"] / plain["bytes_sent_per_peer"],
        "cpu_ratio": (
            secure["cpu_s_per_round"] / plain["cpu_s_per_round"]
            if secure["cpu_s_per_round"] and plain["cpu_s_per_round"]
            else None
        ),
        "sessions": sessions,
    }


def _targets(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    targets = []
    for row in configs:
        if (row["n"], row["m"]) == TARGET_AT:
            targets.append(
                {
                    "what": f"secure / minimal plain round time (n={row['n']}, m={row['m']})",
                    "measured": row["ratio"],
                    "target": TARGET_RATIO,
                    "met": row["ratio"] <= TARGET_RATIO,
                }
            )
            targets.append(
                {
                    "what": (
                        f"secure / minimal plain bytes per peer, sent + received "
                        f"(n={row['n']}, m={row['m']})"
                    ),
                    "measured": row["bytes_ratio"],
                    "target": TARGET_BYTES_RATIO,
                    "met": row["bytes_ratio"] <= TARGET_BYTES_RATIO,
                }
            )
    return targets


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """The human-readable table of a report."""
    header = (
        f"{'n':>3} {'m':>10} {'plain s':>8} {'secure s':>9} {'ratio':>6} "
        f"{'1st plain':>9} {'1st sec':>8} {'cpu plain':>9} {'cpu sec':>8} "
        f"{'sent plain':>11} {'sent sec':>11} {'recv plain':>11} {'recv sec':>11}"
    )
    print(header, file=out)
    for row in report["configs"]:
        plain, secure = row["plain"], row["secure"]
        print(
            f"{row['n']:>3} {row['m']:>10,} {plain['round_median_s']:>8.3f} "
            f"{secure['round_median_s']:>9.3f} {row['ratio']:>5.2f}x "
            f"{plain['first_round_median_s']:>9.3f} {secure['first_round_median_s']:>8.3f} "
            f"{_or_dash(plain['cpu_s_per_round']):>9} {_or_dash(secure['cpu_s_per_round']):>8} "
            f"{plain['bytes_sent_per_peer']:>11,.0f} {secure['bytes_sent_per_peer']:>11,.0f} "
            f"{plain['bytes_received_per_peer']:>11,.0f} "
            f"{secure['bytes_received_per_peer']:>11,.0f}",
            file=out,
        )
    for row in report["configs"]:
        full = row.get("cleartext_full_transcript")
        if full:
            print(
                f"n={row['n']} m={row['m']:,} cleartext with full transcript: "
                f"{full['round_median_s']:.3f} s, recv {full['bytes_received_per_peer']:,.0f} B",
                file=out,
            )
    print(
        "plain = aggregation 'plain' (minimal FedAvg: upload, get the sum back), secure = "
        "'secagg'. Round times (s): median over the "
        "rounds after each session's first, from the ledgers; cpu: CPU seconds of all peers "
        "per round; sent/recv: bytes one participant puts on / takes off its round stream "
        "per round (median).",
        file=out,
    )
    if report["quick"]:
        print("targets: none at quick sizes", file=out)
    for target in report["targets"]:
        verdict = "met" if target["met"] else "MISSED"
        print(
            f"target {target['what']}: {target['measured']:.2f}x "
            f"(<= {target['target']}x) {verdict}",
            file=out,
        )


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------- run


def _write(report: dict[str, Any], output: Path, *, partial: bool) -> None:
    report["partial"] = partial
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)
        handle.write("\n")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`).

    Prints the table to ``out`` (default stdout) and progress to stderr; returns the exit
    code: 0 when every session ran and checked out (a missed target is reported, not an
    error), 1 when a peer or a session failed (the error names it).
    """
    out = out if out is not None else sys.stdout
    sizes = _sizes(args)
    output: Path = args.output or DEFAULT_OUTPUT
    err: TextIO = sys.stderr

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=err, flush=True)

    # Deadlines far above the expected stage times: a peer missing one would drop out and
    # the round would measure something else (the run then fails instead).
    stage_seconds = 30.0 if args.quick else 120.0
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "transport",
        "quick": bool(args.quick),
        "command": " ".join(["python -m scripts.bench", *getattr(args, "argv", ["transport"])]),
        "machine": machine_info(),
        "sizes": {
            "peers": list(sizes.peers),
            "lengths": list(sizes.lengths),
            "rounds_per_session": sizes.rounds,
            "sessions_per_kind": sizes.pairs,
        },
        "configs": [],
        "targets": [],
    }
    try:
        _measure(sizes, args, report, output, stage_seconds, log)
    except TransportBenchError as error:
        print(f"bench transport: failed: {error}", file=err)
        return EXIT_FAILED
    report["total_wall_s"] = time.perf_counter() - started
    _write(report, output, partial=False)
    print_report(report, out)
    print(f"results written to {output}", file=out)
    return EXIT_OK


def _measure(
    sizes: TransportSizes,
    args: argparse.Namespace,
    report: dict[str, Any],
    output: Path,
    stage_seconds: float,
    log: Callable[[str], None],
) -> None:
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            workdir: Path = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="transport-")))
        for n in sizes.peers:
            log(f"starting {n} peers ...")
            with _Federation.running(workdir / f"n{n}", n, stage_seconds) as federation:
                for m in sizes.lengths:
                    expected = federation.write_vectors(m, seed=n * 1_000_003 + m)
                    sessions: list[dict[str, Any]] = []
                    for pair in range(sizes.pairs):
                        # ABBA: plain first in even pairs, secure first in odd ones.
                        kinds = (*KINDS, FULL_TRANSCRIPT) if args.with_cleartext else KINDS
                        order = kinds if pair % 2 == 0 else kinds[::-1]
                        for aggregation in order:
                            sid = f"bench-n{n}-m{m}-{aggregation}-{pair}"
                            log(f"  n={n} m={m:,} {aggregation} session {pair + 1} ...")
                            row = _run_session(
                                federation,
                                aggregation,
                                sid,
                                m,
                                sizes.rounds,
                                expected,
                                stage_seconds,
                            )
                            log(
                                "    rounds " + ", ".join(f"{s:.2f}" for s in row["round_s"]) + " s"
                            )
                            sessions.append(row)
                    report["configs"].append(_config_row(n, m, sessions))
                    report["targets"] = _targets(report["configs"])
                    _write(report, output, partial=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.bench_transport``: the same as ``python -m scripts.bench transport``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(prog=PROG, description=BENCH_HELP)
    add_arguments(parser)
    # Recorded with the results as bench.py records it (the benchmark's name first).
    parser.set_defaults(handler=run, argv=["transport", *arguments])
    return run_command(parser, arguments, prog=lambda _: PROG, expected=(ConfigError,))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
