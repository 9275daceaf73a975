"""`ceremony run` end to end: identities made with the CLI, peers started from the kits.

The module fixture runs the whole ceremony through ``ceremony`` (init-ca, request x3 + an
operator, sign, roster, kit), then starts ``python -m peer start --config <kit>`` for each
hospital. A fourth hospital is in the roster but never started, to play a peer that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peer.kit import free_port
from scripts.ceremony import main
from scripts.ceremony_run import until_interrupted

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
FEDERATION = "cardio"
RUNNING = ("hospital-a", "hospital-b", "hospital-c")
DOWN = "hospital-d"


@dataclass
class Federation:
    root: Path
    kits: dict[str, Path]  # peer id -> its config
    processes: dict[str, subprocess.Popen[str]]

    def federation_file(
        self, name: str, session: str, participants: tuple[str, ...] = RUNNING, rounds: int = 2
    ) -> Path:
        path = self.root / name
        listed = ", ".join(f'"{p}"' for p in participants)
        path.write_text(
            f"""[operator]
cert = "op/operator-1.pem"
key = "op/operator-1.key"
ca = "ca/ca.pem"
roster = "roster.json"

[session]
id = "{session}"
participants = [{listed}]
rounds = {rounds}
stage_seconds = 5
prepare_seconds = 5

[session.payload]
kind = "vector"
length = 64
""",
            encoding="utf-8",
        )
        return path


def ceremony(*argv: str) -> None:
    assert main([*argv, "--json"]) == 0, argv


def start_peer(config: Path) -> subprocess.Popen[str]:
    log = (config.parent / "peer.log").open("a", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "peer", "start", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    log.close()
    return process


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("ceremony")
    ca = root / "ca"
    ceremony("init-ca", "--dir", str(ca), "--federation", FEDERATION)
    peers = (*RUNNING, DOWN)
    for peer_id in peers:
        site = root / "sites" / peer_id
        ceremony(
            "request",
            "--dir",
            str(site),
            "--peer-id",
            peer_id,
            "--institution",
            f"Hospital {peer_id[-1].upper()}",
            "--federation",
            FEDERATION,
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
        )
        csr = str(site / f"{peer_id}.csr")
        ceremony("sign", "--ca", str(ca), "--csr", csr, "--out", str(site / f"{peer_id}.pem"))
    op = root / "op"
    ceremony(
        "request",
        "--dir",
        str(op),
        "--peer-id",
        "operator-1",
        "--institution",
        "Consortium office",
        "--federation",
        FEDERATION,
        "--operator",
    )
    ceremony(
        "sign",
        "--ca",
        str(ca),
        "--csr",
        str(op / "operator-1.csr"),
        "--out",
        str(op / "operator-1.pem"),
        "--operator",
    )
    addresses = {p: f"127.0.0.1:{free_port()}" for p in peers}
    ceremony(
        "roster",
        "--ca",
        str(ca),
        "--peer",
        *(f"{root / 'sites' / p / p}.pem={addresses[p]}" for p in peers),
        "--operator",
        str(op / "operator-1.pem"),
        "--out",
        str(root / "roster.json"),
    )
    kits = {}
    for peer_id in peers:
        kit = root / "kits" / peer_id
        ceremony(
            "kit",
            "--ca",
            str(ca),
            "--peer-cert",
            f"{root / 'sites' / peer_id / peer_id}.pem",
            "--address",
            addresses[peer_id],
            "--roster",
            str(root / "roster.json"),
            "--out",
            str(kit),
            "--key",
            f"{root / 'sites' / peer_id / peer_id}.key",
            "--stage-seconds",
            "5",
        )
        kits[peer_id] = kit / f"{peer_id}.toml"
        # These sessions sum exact vectors, which a site refuses unless it opts in.
        text = kits[peer_id].read_text(encoding="utf-8")
        kits[peer_id].write_text(
            text.replace("[policy]\n", "[policy]\nallow_exact_payloads = true\n", 1),
            encoding="utf-8",
        )
    processes = {p: start_peer(kits[p]) for p in RUNNING}
    try:
        for peer_id, process in processes.items():
            assert process.stdout is not None
            line = process.stdout.readline()
            assert '"ready"' in line, (kits[peer_id].parent / "peer.log").read_text()
        yield Federation(root, kits, processes)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    code = main(["run", *argv, "--json"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured
    return code, json.loads(lines[0]), captured.err


def test_run_agrees_and_every_ledger_verifies(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    path = federation.federation_file("federation.toml", "s1")
    started = time.monotonic()
    code, report, err = run_json(capsys, "--federation", str(path))
    assert code == 0, err
    assert time.monotonic() - started < 60
    assert report["ok"] is True
    assert report["states"] == dict.fromkeys(RUNNING, "finished")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert row["signatures"] == 3
        assert row["held_by"] == list(RUNNING)  # the same record in every ledger
        assert row["dropped"] == []
        assert row["aggregator"] in RUNNING
        assert row["metrics"] == {"summed": 3}
    # Progress went to stderr: one "agreed" line per round, naming the aggregator.
    for row in report["rounds"]:
        assert f"round {row['round']} agreed: aggregator {row['aggregator']}" in err

    for peer_id in RUNNING:
        assert main(["verify-ledger", "--config", str(federation.kits[peer_id]), "--json"]) == 0
        verified = json.loads(capsys.readouterr().out)
        assert verified["ok"] is True
        assert verified["records"] == 2

    # Reattaching to the finished session shows the same agreed rounds.
    code, again, _ = run_json(capsys, "--federation", str(path), "--attach", "s1")
    assert code == 0
    assert [r["record_hash"] for r in again["rounds"]] == [
        r["record_hash"] for r in report["rounds"]
    ]

    # The same session id with another plan: every peer refuses, each reason shown, exit 1.
    changed = federation.federation_file("changed.toml", "s1", rounds=3)
    code, refused, err = run_json(capsys, "--federation", str(changed))
    assert code == 1
    assert sorted(refused["refused"]) == list(RUNNING)
    for peer_id in RUNNING:
        assert f"{peer_id} refused session s1: session id s1 is already used" in err


def test_ctrl_c_stops_watching_not_the_peers(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    path = federation.federation_file("long.toml", "s-int", rounds=6)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "scripts.ceremony", "run", "--federation", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert watcher.stderr is not None
        first = watcher.stderr.readline()
        assert "session s-int started on 3 peers" in first, first
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 130
    assert f"Reattach with: ceremony run --attach s-int --federation {path}" in err
    assert "Traceback" not in err
    # The peers went on without the operator watching; reattaching shows every round.
    code, report, _ = run_json(capsys, "--federation", str(path), "--attach", "s-int")
    assert code == 0
    assert [r["round"] for r in report["rounds"]] == list(range(1, 7))


def test_run_with_a_peer_down_names_it(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    path = federation.federation_file("down.toml", "s-down", ("hospital-a", "hospital-b", DOWN))
    code = main(["run", "--federation", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert "cannot reach 1 of 3 peers: hospital-d" in err
    # Nothing was proposed to the peers that were up.
    assert main(["run", "--federation", str(path), "--attach", "s-down"]) == 2
    assert "no participant knows session 's-down'" in capsys.readouterr().err


def test_verify_ledger_of_a_peer_that_never_ran(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify-ledger", "--config", str(federation.kits[DOWN])]) == 2
    assert "no ledger at" in capsys.readouterr().err


BAD_FILES = {
    "not-toml": ("[operator\ncert = 1", "not valid TOML"),
    "no-session": (
        '[operator]\ncert = "op/operator-1.pem"\nkey = "k"\nca = "c"\nroster = "r"\n',
        "missing [session]",
    ),
    "missing-file": (
        '[operator]\ncert = "nope.pem"\nkey = "k"\nca = "c"\nroster = "r"\n'
        '[session]\nrounds = 1\n[session.payload]\nkind = "vector"\nlength = 4\n',
        "'cert' = 'nope.pem': no such file",
    ),
    "wrong-type": (
        '[operator]\ncert = "op/operator-1.pem"\nkey = "op/operator-1.key"\nca = "ca/ca.pem"\n'
        'roster = "roster.json"\n[session]\nrounds = "two"\n[session.payload]\nkind = "vector"\n',
        "'rounds' has the wrong type",
    ),
    "typo": (
        '[operator]\ncert = "op/operator-1.pem"\nkey = "op/operator-1.key"\nca = "ca/ca.pem"\n'
        'roster = "roster.json"\n[session]\nrounds = 1\nthreshhold = 2\n'
        '[session.payload]\nkind = "vector"\n',
        "unknown key 'threshhold'",
    ),
    "no-payload-kind": (
        '[operator]\ncert = "op/operator-1.pem"\nkey = "op/operator-1.key"\nca = "ca/ca.pem"\n'
        'roster = "roster.json"\n[session]\nrounds = 1\n',
        "missing 'kind'",
    ),
    "stranger": (
        '[operator]\ncert = "op/operator-1.pem"\nkey = "op/operator-1.key"\nca = "ca/ca.pem"\n'
        'roster = "roster.json"\n[session]\nrounds = 1\nparticipants = ["hospital-a", "zz"]\n'
        '[session.payload]\nkind = "vector"\nlength = 4\n',
        "participants zz are not peers in the roster",
    ),
    "bad-threshold": (
        '[operator]\ncert = "op/operator-1.pem"\nkey = "op/operator-1.key"\nca = "ca/ca.pem"\n'
        'roster = "roster.json"\n[session]\nrounds = 1\nthreshold = 9\n'
        'participants = ["hospital-a", "hospital-b"]\n'
        '[session.payload]\nkind = "vector"\nlength = 4\n',
        "threshold 9",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_federation_file(
    federation: Federation, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    text, expected = BAD_FILES[case]
    path = federation.root / f"bad-{case}.toml"
    path.write_text(text, encoding="utf-8")
    code = main(["run", "--federation", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert expected in err
    assert str(path) in err or "roster" in err


def test_missing_federation_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--federation", str(tmp_path / "nope.toml")]) == 2
    assert "no such federation file" in capsys.readouterr().err


async def _swallows_one_cancellation(started: asyncio.Event) -> str:
    """Work that turns its first cancellation into a normal result, as a cancelled grpc call
    does (it raises an RpcError, which a status poll records as an unreachable peer)."""
    started.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(30)
    await asyncio.sleep(0.2)  # ... and carries on watching
    return "watched to the end"


def _interrupt_when(started: asyncio.Event) -> None:
    async def send() -> None:
        await started.wait()
        os.kill(os.getpid(), signal.SIGINT)

    asyncio.get_running_loop().create_task(send())


def test_ctrl_c_stops_watching_even_when_a_cancellation_is_swallowed() -> None:
    # The attack on the exit code: asyncio.run's own Ctrl-C handling cancels the main task,
    # and the swallowed cancellation lets the watch run on and end "normally" (a CI run saw
    # exit 0 instead of 130 this way).
    async def plain() -> str:
        started = asyncio.Event()
        _interrupt_when(started)
        return await _swallows_one_cancellation(started)

    assert asyncio.run(plain()) == "watched to the end"

    async def guarded() -> str | None:
        started = asyncio.Event()
        _interrupt_when(started)
        return await until_interrupted(_swallows_one_cancellation(started))

    assert asyncio.run(guarded()) is None
    # Without Ctrl-C the work's own result (or error) comes through.
    assert asyncio.run(until_interrupted(asyncio.sleep(0, result="done"))) == "done"


def test_ctrl_c_handling_is_given_back_when_the_work_fails() -> None:
    # Review of until_interrupted: the SIGINT handler it installs must not outlive it, or a
    # later Ctrl-C (after a refused proposal, say) would only set an event nobody waits for.
    async def fails() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("refused")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="refused"):
            await until_interrupted(fails())
        # The loop's handler is gone: Ctrl-C raises KeyboardInterrupt again.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    asyncio.run(main())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # and a Ctrl-C after the loop stops the program
        signal.raise_signal(signal.SIGINT)
