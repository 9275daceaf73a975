"""``ceremony demo``: a whole federation on this machine, with nothing prepared.

What it does, in order, all of it kept in the work folder (printed first):

1. the identity ceremony: a consortium CA, three hospitals each with its own key, CSR and
   certificate, an operator, a signed roster and CRL (:class:`peer.kit.LocalKit`);
2. the bundled breast-cancer data set split non-IID (Dirichlet label skew) into each
   hospital's own patient database;
3. three peers as separate processes (``python -m peer start --config ...``) on 127.0.0.1 with
   mutual TLS;
4. a session proposed and watched exactly as ``ceremony run`` does it: federated DP-SGD with
   secure aggregation, live progress, then the agreed metrics per round;
5. every peer's ledger checked (:func:`peer.ledger.verify_ledger`);
6. the dashboard over one hospital's ledger at http://127.0.0.1:8050 until Ctrl-C.

Every process it starts runs in its own process group and is stopped in a ``finally`` block,
on Ctrl-C, on SIGTERM and on errors alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from peer.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError
from peer.operator import (
    OperatorClient,
    ProposalRefused,
    SessionOutcome,
    default_timeout,
    drive_session,
    propose_and_start,
)

from .ceremony_demo_imaging import imaging_payload, prepare_imaging
from .ceremony_run import ProgressView, print_rounds

if TYPE_CHECKING:
    from peer.kit import LocalKit
    from peer.session import SessionProposal

__all__ = ["ChildProcess", "add_parsers", "demo_proposal"]

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
FEDERATION = "demo"
DEFAULT_ROUNDS = 3
DEFAULT_PORT = 8050
# Privacy budget of each demo hospital (its local policy). With the demo's DP-SGD parameters
# (batch 8, 20 steps a round, noise 1.5) the smallest hospital of the default split (~60
# training records) spends about epsilon 3.7 on DP-SGD over 3 rounds and 4.8 over 5; with the
# noisy standardization and evaluation releases its composed total is about 4.2 and 5.4 (PLD
# accountant, delta 1e-5); a session that would overspend is refused by the peers, with the
# reason shown.
MAX_EPSILON = 10.0
STAGE_SECONDS = 20.0
PREPARE_SECONDS = 120.0
DIRICHLET_ALPHA = 0.5
PAYLOAD_KINDS = ("training", "vector")
TASKS = ("tabular", "imaging")
READY_SECONDS = 90.0
STOP_SECONDS = 10.0


# --------------------------------------------------------------------------- the session


def bundled_feature_bounds() -> list[float]:
    """Per-feature bounds for the bundled (public) data set: 1.5 x its largest |value|."""
    from sklearn.datasets import load_breast_cancer

    largest = abs(load_breast_cancer().data).max(axis=0) * 1.5
    return [float(f"{value:.2g}") for value in largest]


def demo_proposal(
    kind: str, rounds: int, session_id: str = "demo", task: str = "tabular"
) -> SessionProposal:
    """The demo's session: the one place that decides what the peers compute.

    ``training`` is federated DP-SGD (peer/payloads/training.py): ``rounds`` training rounds plus a
    standardization round before and an evaluation round after. ``vector`` is a plain
    secure sum of each hospital's label counts (see :func:`_write_vector_payloads`): fast,
    no TensorFlow, and still the whole protocol.
    """
    from peer.session import SessionProposal

    common: dict[str, Any] = {
        "participants": HOSPITALS,
        "threshold": 3,  # 3 hospitals, the aggregator may collude: all must sign
        "stage_seconds": STAGE_SECONDS,
        "prepare_seconds": PREPARE_SECONDS,
        "privacy": {"max_epsilon": MAX_EPSILON},
    }
    if kind == "training" and task == "imaging":
        payload = imaging_payload(rounds)
        return SessionProposal(session_id, rounds=rounds + 2, payload=payload, bits=64, **common)
    if kind == "training":
        payload = {
            "kind": "training",
            "model": "logreg",
            "input_dim": 30,
            "training_rounds": rounds,
            "local_steps": 20,
            "batch_size": 8,
            "lr": 0.5,
            "clip_norm": 1.0,
            "noise_multiplier": 1.5,
            "delta": 1e-5,
            "max_records": 1000,
            # Standardization is released with DP noise scaled to each feature's declared
            # bound, so the bounds must be tight; the bundled data set is public, so its
            # ranges are too (a real consortium declares clinical ranges).
            "feature_bound": bundled_feature_bounds(),
            "loss_bound": 5.0,
        }
        return SessionProposal(session_id, rounds=rounds + 2, payload=payload, bits=64, **common)
    return SessionProposal(
        session_id, rounds=rounds, payload={"kind": "vector", "length": 4}, **common
    )


def _write_vector_payloads(kit: LocalKit, parts: Sequence[Sequence[Any]]) -> None:
    """Vector sessions: each hospital contributes its label counts (train and test)."""
    import numpy as np

    from peer.kit import write_peer_config

    for peer_id, records in zip(HOSPITALS, parts, strict=True):
        counts = np.zeros(4, dtype=np.uint32)
        for record in records:
            counts[(2 if record.split == "test" else 0) + int(record.label)] += 1
        site = kit.kits[peer_id]
        np.save(site.directory / "vector.npy", counts)
        write_peer_config(
            site.config,
            peer_id,
            site.address,
            stage_seconds=STAGE_SECONDS,
            # A secure sum of exact counts: the other two hospitals learn this one's counts
            # from it, so each demo hospital opts in explicitly (sites refuse by default).
            policy={**_policy(kit.operator), "allow_exact_payloads": True},
            extra='payload_file = "vector.npy"\n',
        )


def _policy(operator: str) -> dict[str, object]:
    return {"allowed_operators": [operator], "max_epsilon": MAX_EPSILON}


# --------------------------------------------------------------------------- processes


@dataclass
class ChildProcess:
    """A process the demo started, in its own process group (so stopping it stops its
    children too, and the terminal's Ctrl-C reaches only the demo, which then stops it)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log: Path, stdout: int | None) -> ChildProcess:
        with log.open("ab") as handle:
            process = subprocess.Popen(  # noqa: S603 -- our own interpreter and arguments
                list(argv),
                stdout=stdout if stdout is not None else handle,
                stderr=handle,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, deadline: float) -> None:
        """Wait for the peer's one ``{"event": "ready"}`` line on stdout.

        Raises:
            RuntimeError: it exited or did not get ready in time (with its log's last line).
        """
        stream: IO[bytes] | None = self.process.stdout
        assert stream is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{self.name} did not start in time ({self._last_log()})")
            readable, _, _ = select.select([stream], [], [], min(remaining, 0.5))
            if readable:
                line = stream.readline()
                if not line:
                    raise RuntimeError(f"{self.name} exited at start ({self._last_log()})")
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") == "ready":
                        return

    def _last_log(self) -> str:
        lines = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return f"log {self.log}: {lines[-1] if lines else 'empty'}"

    def stop(self) -> None:
        """SIGTERM to the group, then SIGKILL if it has not exited in time."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@dataclass
class Children:
    """Everything the demo started; :meth:`stop_all` in a ``finally``."""

    processes: list[ChildProcess] = field(default_factory=list)

    def add(self, child: ChildProcess) -> ChildProcess:
        self.processes.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.processes):
            child.stop()

    @property
    def pids(self) -> dict[str, int]:
        return {child.name: child.pid for child in self.processes}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the same path as Ctrl-C, so the ``finally`` blocks stop the children."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_port(port: int, child: ChildProcess, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and child.alive():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------- steps


def _say(args: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def _workdir(args: argparse.Namespace) -> Path:
    if args.workdir is None:
        return Path(tempfile.mkdtemp(prefix="ceremony-demo-"))
    workdir: Path = args.workdir.resolve()
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise UsageError(f"--workdir {workdir} exists and is not an empty folder; pick a new one")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _prepare(args: argparse.Namespace, workdir: Path) -> LocalKit:
    import numpy as np

    from peer.data import (
        BUNDLED_DATASET_NAME,
        breast_cancer_feature_names,
        breast_cancer_records,
        split_dataset,
        write_hospital_stores,
    )
    from peer.kit import LocalKit

    kit = LocalKit.create(
        workdir / "federation",
        list(HOSPITALS),
        federation=FEDERATION,
        stage_seconds=STAGE_SECONDS,
        policy={"max_epsilon": MAX_EPSILON},
    )
    _say(
        args,
        f"CA and {len(HOSPITALS)} hospital kits: root fingerprint {kit.federation.ca.fingerprint}",
    )
    if args.task == "imaging":
        prepare_imaging(
            workdir,
            kit,
            seed=args.seed,
            stage_seconds=STAGE_SECONDS,
            policy=_policy(kit.operator),
            say=lambda text: _say(args, text),
        )
        return kit
    rng = np.random.default_rng(args.seed)
    records = breast_cancer_records(rng)
    parts = split_dataset(records, len(HOSPITALS), "dirichlet", alpha=DIRICHLET_ALPHA, rng=rng)
    stores = write_hospital_stores(
        parts,
        [f"sqlite:///{kit.kits[p].directory / 'data.db'}" for p in HOSPITALS],
        feature_names=breast_cancer_feature_names(),
        dataset_name=BUNDLED_DATASET_NAME,
    )
    for store in stores:
        store.dispose()
    for peer_id, part in zip(HOSPITALS, parts, strict=True):
        malignant = sum(r.label for r in part)
        _say(
            args,
            f"  {peer_id}: {len(part)} patients ({malignant / len(part):.0%} malignant), "
            f"kit {kit.kits[peer_id].directory}",
        )
    if args.payload == "vector":
        _write_vector_payloads(kit, parts)
    return kit


def _start_peers(kit: LocalKit, children: Children) -> None:
    started = [
        children.add(
            ChildProcess.start(
                peer_id,
                [sys.executable, "-m", "peer", "start", "--config", str(kit.kits[peer_id].config)],
                kit.kits[peer_id].directory / "peer.log",
                stdout=subprocess.PIPE,
            )
        )
        for peer_id in HOSPITALS
    ]
    deadline = time.monotonic() + READY_SECONDS
    for child in started:  # they start in parallel; wait for each in turn
        child.wait_ready(deadline)


def _run_session(
    args: argparse.Namespace, kit: LocalKit, proposal: SessionProposal
) -> SessionOutcome:
    cert, key, ca = kit.operator_files()
    roster = kit.federation.roster_path
    assert roster is not None
    view = ProgressView(sys.stderr, proposal.participants, proposal.rounds, sys.stderr.isatty())

    async def go() -> SessionOutcome:
        client = OperatorClient.from_files(kit.operator, cert, key, ca, roster)
        try:
            await propose_and_start(client, proposal)
            return await drive_session(
                client,
                proposal.session_id,
                proposal.participants,
                view,
                rounds=proposal.rounds,
                timeout=default_timeout(proposal),
            )
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    finally:
        view.close()


def _verify_ledgers(kit: LocalKit) -> dict[str, list[str]]:
    return {peer_id: kit.ledger_problems(peer_id) for peer_id in HOSPITALS}


def _start_dashboard(
    args: argparse.Namespace, kit: LocalKit, workdir: Path, children: Children
) -> ChildProcess | None:
    if importlib.util.find_spec("dashboard.__main__") is None:
        _say(args, "the dashboard is not available in this installation (no dashboard package)")
        return None
    site = kit.kits[HOSPITALS[0]].directory
    argv = [
        sys.executable,
        "-m",
        "dashboard",
        "--ledger",
        f"sqlite:///{site / 'ledger.db'}",
        "--port",
        str(args.port),
        "--roster",
        str(site / "roster.json"),
        "--ca",
        str(site / "ca.pem"),
        *(arg for p in HOSPITALS for arg in ("--budget", f"{p}={MAX_EPSILON:g}")),
    ]
    child = children.add(ChildProcess.start("dashboard", argv, workdir / "dashboard.log", None))
    if not _wait_for_port(args.port, child, READY_SECONDS):
        raise UsageError(
            f"the dashboard did not come up on port {args.port} (is the port in use? "
            f"try --port); see {child.log}"
        )
    return child


def _report(
    workdir: Path,
    outcome: SessionOutcome,
    problems: Mapping[str, list[str]],
    children: Children,
    payload: str,
) -> dict[str, Any]:
    report = outcome.as_json()
    report.update(
        workdir=str(workdir),
        payload=payload,
        ledger_verified=not any(problems.values()),
        ledger_problems=dict(problems),
        pids=children.pids,
    )
    return report


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, not {args.rounds}")
    if args.task == "imaging" and args.payload != "training":
        raise UsageError("--task imaging trains a model: it goes with --payload training")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, not {args.port}")
    if not args.no_dashboard and not _port_free(args.port):
        raise UsageError(f"port {args.port} is in use: pass another --port or --no-dashboard")
    workdir = _workdir(args)
    _say(args, f"demo folder (kept): {workdir}")
    children = Children()
    interrupted = reported = False
    code = EXIT_OK
    try:
        with _sigterm_as_interrupt():
            kit = _prepare(args, workdir)
            _start_peers(kit, children)
            _say(
                args,
                f"peers running: {', '.join(f'{p} (pid {children.pids[p]})' for p in HOSPITALS)}",
            )
            proposal = demo_proposal(args.payload, args.rounds, task=args.task)
            outcome = _run_session(args, kit, proposal)
            problems = _verify_ledgers(kit)
            report = _report(workdir, outcome, problems, children, args.payload)
            report["task"] = args.task
            if not (outcome.ok and report["ledger_verified"]):
                code = EXIT_FAILED
            dashboard = (
                None if args.no_dashboard else _start_dashboard(args, kit, workdir, children)
            )
            report["pids"] = children.pids
            report["dashboard"] = f"http://127.0.0.1:{args.port}" if dashboard else None
            _show(args, report, outcome)
            reported = True
            if dashboard is not None:
                _say(args, f"dashboard: http://127.0.0.1:{args.port}  (Ctrl-C stops the demo)")
                while dashboard.alive():
                    time.sleep(0.5)
                _say(args, f"the dashboard stopped; see {dashboard.log}")
                code = EXIT_FAILED
    except KeyboardInterrupt:
        interrupted = True
    except ProposalRefused as refused:
        for peer, reason in sorted(refused.answers.items()):
            print(f"{peer} refused the demo session: {reason}", file=sys.stderr)
        code = EXIT_FAILED
    except RuntimeError as error:  # a peer did not start
        raise UsageError(str(error)) from None
    finally:
        children.stop_all()
    if interrupted:
        print(f"\nstopped; everything is kept in {workdir}", file=sys.stderr)
        # Ctrl-C is how the dashboard phase ends; before it, the demo was cut short.
        return code if reported else EXIT_INTERRUPTED
    return code


def _show(args: argparse.Namespace, report: dict[str, Any], outcome: SessionOutcome) -> None:
    if args.json:
        print(json.dumps(report, sort_keys=True), flush=True)
        return
    print_rounds(outcome.rows, sys.stdout)
    verdict = "verified" if report["ledger_verified"] else "PROBLEMS"
    print(f"ledgers of {', '.join(HOSPITALS)}: {verdict}")
    for peer_id, found in report["ledger_problems"].items():
        for problem in found:
            print(f"  {peer_id}: {problem}")
    print(f"everything is kept in {report['workdir']}", flush=True)


def add_parsers(subparsers: Any) -> None:
    """Register ``demo`` on ``ceremony``'s subparsers."""
    parser = subparsers.add_parser(
        "demo",
        help="a whole federation on this machine: CA, 3 hospital peers, rounds, dashboard",
        description=(
            "With nothing prepared: create a CA and three hospitals, split the bundled "
            "breast-cancer data non-IID across them, start three peers (mTLS on 127.0.0.1), "
            "run federated DP-SGD with secure aggregation, show the agreed metrics and serve "
            "the dashboard until Ctrl-C. Exit 0 when every round was agreed and every ledger "
            "verifies."
        ),
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        metavar="N",
        help=f"training rounds (default {DEFAULT_ROUNDS}); the session adds a "
        "standardization and a final evaluation round",
    )
    parser.add_argument("--workdir", type=Path, metavar="DIR", help="keep everything here")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"dashboard port (default {DEFAULT_PORT})"
    )
    parser.add_argument("--no-dashboard", action="store_true", help="stop after the rounds")
    parser.add_argument(
        "--payload",
        choices=PAYLOAD_KINDS,
        default="training",
        help="training (DP-SGD, default) or vector (a secure sum of label counts, fast)",
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="tabular",
        help="tabular (the bundled breast-cancer data, default) or imaging (a small CNN on "
        "synthetic DICOM scans: lesion vs no lesion, non-IID over the 3 hospitals)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (stdout)")
    parser.set_defaults(handler=_cmd_demo)
