"""Real peer processes on 127.0.0.1 with real mTLS, for the network tests.

``Network.create(tmp_path, n)`` runs the identity ceremony, writes one kit per hospital
(with a payload vector each), and starts ``python -m peer start --config ...`` per hospital.
Each peer's log goes to ``<kit>/peer.log``; on a failing test the logs are printed.

The kits opt in to exact ``vector`` payloads (``allow_exact_payloads``), which real sites
refuse by default, and each peer's beacon nonce is fixed (``TEST_NONCE_ENV``) so that a
test knows who aggregates each round before the peers start (:func:`expected_aggregator`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from peer.beacon import TEST_NONCE_ENV, beacon_of
from peer.kit import LocalKit
from peer.ledger import Ledger, StoredRecord
from peer.operator import OperatorClient
from peer.session import SessionProposal, aggregator_for
from peer.wire import peer_pb2 as pb

if TYPE_CHECKING:
    from peer.node import PeerNode

T = TypeVar("T")

VECTOR_FILE = "vector.npy"


def fixed_nonce(peer_id: str) -> bytes:
    """The beacon nonce the harness fixes for ``peer_id`` (tests only)."""
    return hashlib.sha256(b"network-harness/beacon-nonce/" + peer_id.encode()).digest()


def fixed_beacon(proposal: SessionProposal) -> bytes:
    """The beacon of ``proposal`` between harness peers (their nonces are fixed)."""
    return beacon_of(proposal.digest, {p: fixed_nonce(p) for p in proposal.participants})


def expected_aggregator(proposal: SessionProposal, round_: int, attempt: int = 0) -> str:
    """Who aggregates (round, attempt) of ``proposal`` between harness peers."""
    return aggregator_for(proposal, round_, attempt, fixed_beacon(proposal))


@dataclass
class PeerProcess:
    peer_id: str
    config: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None

    def start(self, extra_env: Mapping[str, str] | None = None, timeout: float = 60.0) -> None:
        env = {**os.environ, **self.env, **(extra_env or {})}
        log = self.log_path.open("a", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peer", "start", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line or time.monotonic() > deadline:
            raise RuntimeError(f"{self.peer_id} did not start:\n{self.log_path.read_text()}")
        event = json.loads(line)
        assert event["event"] == "ready", line

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def _default_threshold(ids: tuple[str, ...], kwargs: dict[str, Any]) -> int:
    """Secure aggregation: the lowest safe threshold against the declared colluders (the
    aggregator at least); other aggregations: a strict majority."""
    if kwargs.get("aggregation", "secagg") != "secagg":
        return len(ids) // 2 + 1
    return SessionProposal.default_threshold(
        len(ids),
        int(kwargs.get("colluders", 1)),
        kwargs.get("graph", "complete"),
        kwargs.get("degree"),
    )


@dataclass
class Network:
    directory: Path
    kit: LocalKit
    peers: dict[str, PeerProcess]
    vectors: dict[str, np.ndarray[Any, Any]]

    @classmethod
    def create(
        cls,
        directory: Path,
        n: int,
        *,
        length: int = 1000,
        stage_seconds: float = 4.0,
        seed: int = 0,
        env: Mapping[str, Mapping[str, str]] | None = None,
        start: bool = True,
        policy: Mapping[str, object] | None = None,
        outbound_only: Sequence[str] = (),
    ) -> Network:
        ids = [f"hospital-{chr(ord('a') + i)}" for i in range(n)]
        # The tests sum exact vectors: every kit opts in (a real site refuses by default).
        policy = {"allow_exact_payloads": True, **(policy or {})}
        kit = LocalKit.create(
            directory, ids, stage_seconds=stage_seconds, policy=policy, outbound_only=outbound_only
        )
        rng = np.random.default_rng(seed)
        vectors: dict[str, np.ndarray[Any, Any]] = {}
        peers: dict[str, PeerProcess] = {}
        for peer_id in ids:
            site = kit.kits[peer_id]
            vectors[peer_id] = rng.integers(0, 2**32, size=length, dtype=np.uint64).astype(
                np.uint32
            )
            np.save(site.directory / VECTOR_FILE, vectors[peer_id])
            config = site.config.read_text(encoding="utf-8")
            site.config.write_text(
                config.replace("\n[tls]", f'\npayload_file = "{VECTOR_FILE}"\n[tls]', 1),
                encoding="utf-8",
            )
            peers[peer_id] = PeerProcess(
                peer_id,
                site.config,
                site.directory / "peer.log",
                env={
                    TEST_NONCE_ENV: fixed_nonce(peer_id).hex(),
                    **(env or {}).get(peer_id, {}),
                },
            )
        network = cls(directory, kit, peers, vectors)
        if start:
            for process in peers.values():
                process.start()
        return network

    def stop(self) -> None:
        for process in self.peers.values():
            process.stop()

    def logs(self) -> str:
        """Every peer's log, after a summary of their errors (a long CI output is cut in
        the middle: the summary keeps what failed in sight)."""
        parts, errors = [], []
        for process in self.peers.values():
            log = process.log_path
            text = log.read_text("utf-8") if log.exists() else ""
            errors += [
                f"{process.peer_id}: {line}"
                for line in text.splitlines()
                if " ERROR " in line or line.startswith(("Traceback", "  File", "grpc.", "peer."))
            ][:40]
            parts.append(f"===== {process.peer_id}\n" + text)
        return "\n".join(["===== errors", *errors, *parts])

    # ------------------------------------------------------------------ operator side

    def operator(self) -> OperatorClient:
        cert, key, ca = self.kit.operator_files()
        roster = self.kit.federation.roster_path
        assert roster is not None
        return OperatorClient.from_files(self.kit.operator, cert, key, ca, roster)

    def proposal(
        self, session_id: str = "s1", rounds: int = 2, threshold: int | None = None, **kwargs: Any
    ) -> SessionProposal:
        ids = tuple(self.peers)
        length = len(next(iter(self.vectors.values())))
        return SessionProposal(
            session_id,
            ids,
            rounds=rounds,
            threshold=threshold if threshold is not None else _default_threshold(ids, kwargs),
            payload={"kind": "vector", "length": length},
            # As build_proposal does: the roster's outbound-only peers never aggregate.
            outbound_only=tuple(p for p in ids if not self.kit.federation.roster[p].inbound),
            stage_seconds=float(kwargs.pop("stage_seconds", 4.0)),
            prepare_seconds=float(kwargs.pop("prepare_seconds", 4.0)),
            **kwargs,
        )

    def run_session(
        self, proposal: SessionProposal, timeout: float = 120.0, expect_all: bool = False
    ) -> dict[str, pb.SessionStatus | Exception]:
        async def go() -> dict[str, pb.SessionStatus | Exception]:
            operator = self.operator()
            try:
                await operator.propose(proposal)
                await operator.start(proposal.session_id, proposal.participants)
                return await operator.wait(
                    proposal.session_id,
                    proposal.participants,
                    timeout=timeout,
                    require_all=expect_all,
                )
            finally:
                await operator.close()

        return asyncio.run(go())

    def aggregator(self, proposal: SessionProposal, round_: int, attempt: int = 0) -> str:
        return expected_aggregator(proposal, round_, attempt)

    # ------------------------------------------------------------------ ledger side

    def ledger(self, peer_id: str) -> Ledger:
        return self.kit.ledger(peer_id)

    def set_storage(self, peer_id: str, *, data: str, ledger: str) -> None:
        """Point a peer's [storage] at other SQLAlchemy URLs (before it starts)."""
        config = self.kit.kits[peer_id].config
        text = config.read_text(encoding="utf-8")
        text = text.replace('data = "sqlite:///data.db"', f'data = "{data}"')
        text = text.replace('ledger = "sqlite:///ledger.db"', f'ledger = "{ledger}"')
        config.write_text(text, encoding="utf-8")

    def records(self, peer_id: str, session_id: str) -> list[StoredRecord]:
        with self.ledger(peer_id) as ledger:
            return ledger.agreed_records(session_id)

    def aggregate_of(self, peer_id: str, session_id: str, round_: int) -> np.ndarray[Any, Any]:
        with self.ledger(peer_id) as ledger:
            checkpoint = ledger.get_checkpoint(session_id, round_)
        assert checkpoint is not None, f"{peer_id} has no result for round {round_}"
        return np.frombuffer(checkpoint.weights, dtype="<u4").astype(np.uint32)

    def plain_sum(self, peers: Sequence[str]) -> np.ndarray[Any, Any]:
        total = np.zeros_like(next(iter(self.vectors.values())))
        for peer_id in peers:
            np.add(total, self.vectors[peer_id], out=total)
        return total

    def verify(self, peer_id: str) -> list[str]:
        return self.kit.ledger_problems(peer_id)


async def serving_in_process(nodes: list[PeerNode], body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` while ``nodes`` (peers built in this process) serve; stop them and close
    their ledgers after."""
    ready = [asyncio.Event() for _ in nodes]

    def setter(event: asyncio.Event) -> Callable[[int], None]:
        return lambda _port: event.set()

    serving = [
        asyncio.create_task(n.serve(on_ready=setter(e))) for n, e in zip(nodes, ready, strict=True)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 30)
        return await body()
    finally:
        for node in nodes:
            node.stop()
        await asyncio.gather(*serving, return_exceptions=True)
        for node in nodes:
            node.ledger.close()
