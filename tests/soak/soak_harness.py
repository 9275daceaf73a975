"""Helpers of the soak and disk-fault tests: a seeded crash schedule, a thread that carries it
out against real peer processes, and the checks that no round was lost, split or changed.

The processes themselves come from ``tests/network/network_harness.py`` (same harness as the
network tests), so a soak failure can be replayed there by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))

from network_harness import Network, PeerProcess

from peer.ledger import AgreedRecord, Ledger, model_digest, verify_ledger
from peer.operator import OperatorClient
from peer.wire import peer_pb2 as pb

__all__ = [
    "CrashEvent",
    "Crasher",
    "Kill",
    "Network",
    "PeerProcess",
    "consistency_problems",
    "kill_schedule",
    "mounted_tmpfs",
    "verify_copy",
]

logger = logging.getLogger("tests.soak")


@dataclass(frozen=True)
class Kill:
    """One planned crash: SIGKILL ``peer`` ``delay`` s after round ``round`` is first seen
    running, and start it again ``downtime`` s later."""

    round: int
    peer: str
    delay: float
    downtime: float


def kill_schedule(
    rng: random.Random,
    peers: Sequence[str],
    rounds: int,
    *,
    fraction: float = 1 / 3,
    max_delay: float = 2.0,
    max_downtime: float = 3.0,
) -> list[Kill]:
    """About ``fraction`` of the rounds, each with a random victim, moment and downtime."""
    chosen = sorted(rng.sample(range(1, rounds + 1), max(1, round(rounds * fraction))))
    return [
        Kill(
            r,
            rng.choice(list(peers)),
            round(rng.uniform(0.0, max_delay), 3),
            round(rng.uniform(0.2, max_downtime), 3),
        )
        for r in chosen
    ]


@dataclass
class CrashEvent:
    """What the crasher actually did (the plan can slip when a restart takes long)."""

    kill: Kill
    seen_round: int  # the furthest round any peer reported when the SIGKILL was sent
    stage: str  # the victim's stage at that moment, as it last reported it
    killed: bool


@dataclass
class Crasher:
    """Carries out a kill schedule from a thread while the session runs.

    It polls every peer's Status (the furthest ``current_round`` among running peers), and
    for each planned kill waits for its round, sleeps its delay, sends SIGKILL to the victim's
    PID and starts the victim again after its downtime, in the background, so that the next
    kill can land while a victim is still restarting. At most ``max_down`` peers are down at
    once (a kill waits until then); a kill whose victim is down or still starting is skipped.
    """

    network: Network
    session_id: str
    schedule: Sequence[Kill]
    max_down: int = 1
    poll: float = 0.1
    events: list[CrashEvent] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="crasher", daemon=True)
        self._restarts: list[threading.Thread] = []
        self._restart_errors: list[BaseException] = []
        self._restarting: set[str] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop, let restarts in progress complete, and re-raise what went wrong."""
        self._stop.set()
        self._thread.join(timeout=120)
        for restart in self._restarts:
            restart.join(timeout=120)
        if self.error is not None:
            raise self.error
        if self._restart_errors:
            raise self._restart_errors[0]

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as error:  # re-raised in the test's thread by stop()
            self.error = error

    def _down(self) -> int:
        return sum(1 for t in self._restarts if t.is_alive())

    def _restart_later(self, process: PeerProcess, downtime: float) -> None:
        def restart() -> None:
            time.sleep(downtime)
            try:
                process.start()
            except BaseException as error:
                self._restart_errors.append(error)
            finally:
                self._restarting.discard(process.peer_id)

        self._restarting.add(process.peer_id)

        thread = threading.Thread(target=restart, name=f"restart-{process.peer_id}")
        self._restarts.append(thread)
        thread.start()

    async def _run(self) -> None:
        operator = self.network.operator()
        operator.timeout = 2.0
        peers = list(self.network.peers)
        try:
            for kill in self.schedule:
                while not self._stop.is_set():
                    seen, _ = await self._progress(operator, peers)
                    if seen >= kill.round and self._down() < self.max_down:
                        break
                    await asyncio.sleep(self.poll)
                if self._stop.is_set():
                    return
                await asyncio.sleep(kill.delay)
                seen, stages = await self._progress(operator, peers)
                process = self.network.peers[kill.peer]
                # A victim still down or starting up is left alone (the kill is skipped).
                killed = process.alive() and kill.peer not in self._restarting
                if killed:
                    assert process.process is not None
                    os.kill(process.process.pid, signal.SIGKILL)
                    process.process.wait(timeout=10)
                    self._restart_later(process, kill.downtime)
                event = CrashEvent(kill, seen, stages.get(kill.peer, "unreachable"), killed)
                self.events.append(event)
                logger.info("crash %s", event)
        finally:
            await operator.close()

    async def _progress(
        self, operator: OperatorClient, peers: list[str]
    ) -> tuple[int, dict[str, str]]:
        statuses = await operator.status(self.session_id, peers)
        rounds = [
            s.current_round
            for s in statuses.values()
            if isinstance(s, pb.SessionStatus) and s.state == "running"
        ]
        stages = {
            p: f"{s.state} round {s.current_round} {s.current_stage}".rstrip()
            for p, s in statuses.items()
            if isinstance(s, pb.SessionStatus)
        }
        return max(rounds, default=0), stages


def consistency_problems(network: Network, session_id: str, rounds: int) -> list[str]:
    """Every way the peers' ledgers break the federation's promises, in plain sentences.

    Checks: each ledger verifies; each round 1..``rounds`` is agreed by every peer with the
    identical record, or by none; each agreed result is the plain sum of the vectors of the
    survivors its record names.
    """
    problems: list[str] = []
    held: dict[str, dict[int, tuple[AgreedRecord, bytes]]] = {}
    for peer_id in network.peers:
        problems += [f"{peer_id}: ledger does not verify: {p}" for p in network.verify(peer_id)]
        records = network.records(peer_id, session_id)
        numbers = [r.record.round for r in records]
        if len(numbers) != len(set(numbers)):
            problems.append(f"{peer_id}: a round is stored twice: {numbers}")
        held[peer_id] = {r.record.round: (r.record, r.record_hash) for r in records}
    for round_ in range(1, rounds + 1):
        holders = sorted(p for p in held if round_ in held[p])
        if not holders:
            continue
        if len(holders) != len(held):
            missing = sorted(set(held) - set(holders))
            problems.append(f"round {round_}: agreed at {holders} but missing at {missing}")
        hashes = {held[p][round_][1] for p in holders}
        if len(hashes) > 1:
            problems.append(f"round {round_}: peers hold {len(hashes)} different records")
        for peer_id in holders:
            record = held[peer_id][round_][0]
            survivors = [str(p) for p in _as_list(record.metrics.get("survivors"))]
            expected = network.plain_sum(survivors).astype("<u4").tobytes()
            if record.model_hash != model_digest(expected):
                problems.append(
                    f"round {round_}: {peer_id}'s record is not the sum over {survivors}"
                )
            # A peer that caught up on several rounds at once holds the latest checkpoint
            # only; the record's model hash above covers every round.
            with network.ledger(peer_id) as ledger:
                checkpoint = ledger.get_checkpoint(session_id, round_)
            if checkpoint is not None and checkpoint.weights != expected:
                problems.append(
                    f"round {round_}: {peer_id}'s stored result is not the sum over {survivors}"
                )
    extra = sorted({r for p in held for r in held[p] if not 1 <= r <= rounds})
    if extra:
        problems.append(f"rounds outside 1..{rounds} were agreed: {extra}")
    return problems


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def verify_copy(network: Network, ledger_file: Path, scratch: Path) -> list[str]:
    """verify_ledger on a copy of a ledger file (and its WAL), so a faulty original is not
    touched; returns the problems found."""
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / ledger_file.name
    for suffix in ("", "-wal"):
        source = Path(str(ledger_file) + suffix)
        if source.exists():
            shutil.copyfile(source, Path(str(copy) + suffix))
    with Ledger(f"sqlite:///{copy}") as ledger:
        report = verify_ledger(ledger, network.kit.federation.roster.verifiers())
    return [str(p) for p in report.problems]


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path | str]:
    """A fresh tmpfs of ``size`` at ``where``, or the reason it cannot be had here.

    Yields the mount point, or a string saying why no filesystem could be mounted (not root,
    no mount permission in this container, ...), so the caller can skip with that reason.
    """
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield "mounting a tmpfs needs root"
        return
    mount = shutil.which("mount")
    if mount is None:
        yield "no mount command"
        return
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        yield f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}"
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
