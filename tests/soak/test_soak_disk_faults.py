"""Disk faults under a peer's ledger while a session runs: a file that turns read-only, a full
disk.

A peer that cannot record a round must refuse it before it sends anything, say so in its log,
keep its earlier records intact, and catch up once the fault is gone; the other peers carry
on (3 peers, t = 2: two are enough). The faults are real: ``chattr +i`` on the ledger's files
(writes through already-open descriptors fail too, exactly as when a volume turns read-only),
and a small tmpfs filled to the last byte. Both need root; elsewhere the tests skip with the
reason, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from soak_harness import Network, consistency_problems, mounted_tmpfs, verify_copy

from peer.ledger import Ledger
from peer.operator import OperatorClient
from peer.wire import peer_pb2 as pb

PEERS = 4  # t = 3 of 4 keeps agreeing while one ledger is broken
THRESHOLD = 3
ROUNDS = 8
STAGE_SECONDS = 3.0
FAULT_AFTER = 2  # rounds the victim has agreed before its disk fails
WHILE_FAULTY = 2  # rounds the others agree while the victim's ledger cannot be written
SESSION = "disk"

pytestmark = pytest.mark.timeout(300)


def unavailable(reason: str) -> None:
    """Skip, or fail under CI, where the fault must be exercised."""
    if os.environ.get("CI"):
        pytest.fail(f"cannot inject the fault under CI: {reason}")
    pytest.skip(reason)


# ---------------------------------------------------------------------------- the faults


class LedgerFault:
    """Something that breaks writes to a ledger, and mends them."""

    def inject(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError


@dataclass
class ImmutableFiles(LedgerFault):
    """``chattr +i`` on the ledger database and its WAL: no process, not even root, may
    write them any more, through new or already-open descriptors."""

    files: list[Path]

    @staticmethod
    def why_not(directory: Path) -> str | None:
        """None if this filesystem honours ``chattr +i``; else why not."""
        chattr = shutil.which("chattr")
        if chattr is None:
            return "no chattr command"
        probe = directory / ".immutable-probe"
        probe.write_bytes(b"probe")
        try:
            done = subprocess.run(
                [chattr, "+i", str(probe)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                return f"chattr +i is not supported here: {done.stderr.strip()}"
            try:
                with probe.open("ab"):
                    pass
            except PermissionError:
                return None
            return "chattr +i did not make the file read-only"
        finally:
            subprocess.run([chattr, "-i", str(probe)], capture_output=True, check=False)
            probe.unlink()

    def inject(self) -> None:
        existing = [str(f) for f in self.files if f.exists()]
        subprocess.run(["chattr", "+i", *existing], check=True)

    def remove(self) -> None:
        existing = [str(f) for f in self.files if f.exists()]
        subprocess.run(["chattr", "-i", *existing], check=True)


@dataclass
class FullDisk(LedgerFault):
    """A filler file that takes every free byte of the ledger's filesystem."""

    filler: Path

    def inject(self) -> None:
        block = b"\0" * 65536
        with self.filler.open("wb", buffering=0) as out:
            try:
                while True:
                    out.write(block)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
            with contextlib.suppress(OSError):  # the last few bytes
                while True:
                    out.write(b"\0" * 512)
        usage = shutil.disk_usage(self.filler.parent)
        assert usage.free < 4096, f"the disk still has {usage.free} bytes free"

    def remove(self) -> None:
        self.filler.unlink()


# ---------------------------------------------------------------------------- the scenario


async def until(
    operator: OperatorClient,
    peers: list[str],
    done: Callable[[dict[str, pb.SessionStatus]], bool],
    what: str,
    timeout: float = 120.0,
) -> dict[str, pb.SessionStatus]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        answers = await operator.status(SESSION, peers)
        statuses = {p: s for p, s in answers.items() if isinstance(s, pb.SessionStatus)}
        if len(statuses) == len(peers) and done(statuses):
            return statuses
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}: {answers}")
        await asyncio.sleep(0.2)


def refused_attempts(log: str) -> list[tuple[int, int]]:
    """(round, attempt) of every round the peer refused because it could not record it."""
    pattern = re.compile(r"round=(\d+) attempt=(\d+) outcome=refused .*cannot record the round")
    return [(int(m[1]), int(m[2])) for m in pattern.finditer(log)]


@dataclass
class FaultRun:
    victim: str
    agreed_before: int  # records the victim held when the fault was injected
    copy_problems: list[str]
    copy_rounds: int
    logs: str  # every peer's log up to the victim's restart
    victim_log: str


def run_with_fault(
    network: Network,
    victim: str,
    ledger_file: Path,
    fault: LedgerFault,
    scratch: Path,
) -> FaultRun:
    """Run a session; break the victim's ledger after FAULT_AFTER of its rounds, keep it
    broken while the others agree WHILE_FAULTY more, then mend it and restart the victim."""
    proposal = network.proposal(
        SESSION,
        rounds=ROUNDS,
        threshold=THRESHOLD,
        stage_seconds=STAGE_SECONDS,
        prepare_seconds=STAGE_SECONDS,
    )
    peers = list(network.peers)
    others = [p for p in peers if p != victim]

    async def scenario() -> FaultRun:
        operator = network.operator()
        operator.timeout = 5.0
        try:
            await operator.propose(proposal)
            await operator.start(SESSION, peers)
            statuses = await until(
                operator,
                peers,
                lambda s: s[victim].rounds_agreed >= FAULT_AFTER,
                f"{victim} to agree {FAULT_AFTER} rounds",
            )
            fault.inject()
            agreed_before = statuses[victim].rounds_agreed
            target = max(s.rounds_agreed for s in statuses.values()) + WHILE_FAULTY
            await until(
                operator,
                peers,
                lambda s: all(s[p].rounds_agreed >= min(target, ROUNDS) for p in others),
                f"the others to agree {WHILE_FAULTY} rounds without {victim}",
            )
            copy_problems = verify_copy(network, ledger_file, scratch)
            with Ledger(f"sqlite:///{scratch / ledger_file.name}") as copy:
                copy_rounds = len(copy.agreed_records(SESSION))
            logs = network.logs()
            victim_log = network.peers[victim].log_path.read_text(encoding="utf-8")
            # Mended, and started again with its normal configuration.
            await asyncio.get_running_loop().run_in_executor(None, network.peers[victim].stop)
            fault.remove()
            await asyncio.get_running_loop().run_in_executor(None, network.peers[victim].start)
            await operator.wait(SESSION, peers, timeout=180.0, require_all=True)
            return FaultRun(victim, agreed_before, copy_problems, copy_rounds, logs, victim_log)
        finally:
            await operator.close()

    return asyncio.run(scenario())


def check_fault_run(network: Network, run: FaultRun) -> None:
    logs = network.logs()
    refused = refused_attempts(run.victim_log)
    assert refused, f"{run.victim} never said it cannot record a round\n{logs}"
    # Its records up to the fault are intact (verified on a copy, the original untouched).
    assert run.copy_problems == [], run.copy_problems
    assert run.copy_rounds >= run.agreed_before
    # It refused before sending anything: while broken, no aggregator saw it join a round it
    # refused, and it aggregated none of them.
    for round_, attempt in refused:
        joined = f"round={round_} attempt={attempt} role=aggregator participant={run.victim} "
        aggregated = f"peer={run.victim} session={SESSION} round={round_} attempt={attempt} "
        assert joined not in run.logs, f"{run.victim} joined round {round_} it refused\n{logs}"
        assert f"{aggregated}role=aggregator" not in run.victim_log, (
            f"{run.victim} aggregated round {round_} attempt {attempt} it cannot record\n{logs}"
        )
    # The others carried on: with t = 2 of 3 every round is agreed, by every peer (the victim
    # caught up), and the rounds it refused are signed and summed without it.
    problems = consistency_problems(network, SESSION, ROUNDS)
    assert problems == [], "\n".join(problems) + "\n" + logs
    records = network.records(run.victim, SESSION)
    assert [r.record.round for r in records] == list(range(1, ROUNDS + 1)), logs
    # A round the victim signed just before its write failed carries its signature: it then
    # stays on that round (rounds are never skipped), refusing it until it can record it.
    signed_then_failed = {
        int(m)
        for m in re.findall(
            r"round=(\d+) attempt=\d+ outcome=refused in \S+ 'cannot write the ledger",
            run.victim_log,
        )
    }
    for stored in records:
        if stored.record.round in {r for r, _ in refused} - signed_then_failed:
            assert run.victim not in stored.signatures
            survivors = stored.record.metrics.get("survivors")
            assert isinstance(survivors, list)
            assert run.victim not in survivors


def victim_of(network: Network) -> str:
    # The aggregator of a round during the fault, so that side is exercised as well.
    proposal = network.proposal(SESSION, rounds=ROUNDS, threshold=THRESHOLD)
    return network.aggregator(proposal, FAULT_AFTER + 2)


@pytest.fixture
def stop_afterwards() -> Iterator[list[Network]]:
    networks: list[Network] = []
    yield networks
    for network in networks:
        network.stop()


@pytest.mark.slow
def test_read_only_ledger_refuses_rounds_then_catches_up(
    tmp_path: Path, stop_afterwards: list[Network]
) -> None:
    network = Network.create(tmp_path / "ro", PEERS, stage_seconds=STAGE_SECONDS, start=False)
    stop_afterwards.append(network)
    victim = victim_of(network)
    ledger_file = network.kit.kits[victim].directory / "ledger.db"
    reason = ImmutableFiles.why_not(ledger_file.parent)
    if reason is not None:
        unavailable(reason)
    fault = ImmutableFiles([ledger_file, Path(f"{ledger_file}-wal")])
    for process in network.peers.values():
        process.start()
    try:
        run = run_with_fault(network, victim, ledger_file, fault, tmp_path / "copy")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            fault.remove()
    network.stop()
    check_fault_run(network, run)
    assert "readonly" in network.logs() or "disk I/O error" in network.logs()


@pytest.mark.slow
def test_full_disk_refuses_rounds_then_catches_up(
    tmp_path: Path, stop_afterwards: list[Network]
) -> None:
    network = Network.create(tmp_path / "full", PEERS, stage_seconds=STAGE_SECONDS, start=False)
    stop_afterwards.append(network)
    victim = victim_of(network)
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        if isinstance(disk, str):
            unavailable(disk)
            return
        # The kit keeps its normal configuration; its ledger.db is a link to the small disk
        # (SQLite follows the link, so the WAL lives there too).
        ledger_file = disk / "ledger.db"
        (network.kit.kits[victim].directory / "ledger.db").symlink_to(ledger_file)
        fault = FullDisk(disk / "filler")
        for process in network.peers.values():
            process.start()
        try:
            run = run_with_fault(network, victim, ledger_file, fault, tmp_path / "copy")
            network.stop()
            check_fault_run(network, run)
        finally:
            network.stop()
    assert "database or disk is full" in network.logs()


# ---------------------------------------------------------------------------- in one process


def test_refusal_comes_before_either_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Deterministic companion of the tests above: a peer whose ledger cannot record the
    round it would aggregate neither aggregates nor dials anyone, and logs why."""
    import peer.node as node_module
    import peer.runner as runner_module
    from peer.config import load_config
    from peer.kit import LocalKit
    from peer.ledger import LedgerWriteError
    from peer.payloads import VectorPayload
    from peer.round import RoundStatusKind
    from peer.session import SessionProposal, aggregator_for

    ids = ["hospital-a", "hospital-b", "hospital-c"]
    kit = LocalKit.create(tmp_path / "kit", ids, stage_seconds=STAGE_SECONDS)
    proposal = SessionProposal(
        SESSION, tuple(ids), rounds=2, threshold=3, payload={"kind": "vector", "length": 8}
    )
    beacon = bytes(32)  # any: this test runs one round by hand, without the commit-reveal
    me = aggregator_for(proposal, 1, 0, beacon)
    node = node_module.PeerNode(load_config(kit.kits[me].config))

    def full(*_args: object, **_kwargs: object) -> None:
        raise LedgerWriteError("cannot write the ledger at test: database or disk is full")

    async def must_not_dial(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a peer that cannot record the round dialled the aggregator")

    monkeypatch.setattr(node.ledger, "start_round", full)
    monkeypatch.setattr(runner_module, "participate", must_not_dial)
    caplog.set_level(logging.WARNING, logger="peer.node")
    session = runner_module.Session(proposal, beacon)
    outcome = asyncio.run(node.runner.one_round(session, VectorPayload(8), 1, 0, me))
    node.ledger.close()
    assert outcome.status is RoundStatusKind.REFUSED
    assert outcome.reason.startswith(runner_module.CANNOT_RECORD)
    assert node.runner.rounds == {}, "it set up the aggregator side of a round it cannot record"
    assert "outcome=refused cannot record the round" in caplog.text
    assert "database or disk is full" in caplog.text
