"""``ceremony export``: the agreed metrics of a ledger as TensorBoard or MLflow runs.

::

    ceremony export --ledger /var/lib/peer/ledger.db [--roster roster.json --ca ca.pem] \\
        [--session s1 ...] (--tensorboard runs/ | --mlflow file:./mlruns)

So a data scientist sees federated runs beside their other experiments: **one run per
session** (TensorBoard: ``DIR/<session id>/``; MLflow: a run named after the session in
experiment ``--experiment``), the agreed metrics per round as steps (step = the round
number; ``model_after_round`` says which model a round evaluated, see
:func:`dashboard.data.evaluated_after`), each hospital's cumulative ε as
``epsilon_spent/<peer>``, and the proposal as parameters (task, model and training
parameters, differential privacy, threshold, the proposal hash, the ledger verdict).

**Only what verifies is exported.** The ledger is read and checked exactly as the dashboard
and the audit report do (:func:`scripts.ceremony_report.load_report_data`: hash chain,
record and metrics hashes, checkpoints, and signatures with ``--roster/--ca``). From the
first round of a session whose record fails the check, nothing of that session is
exported, and the command says which rounds were skipped and why. A session already
exported (same proposal hash) is skipped too, so running the export again adds only what is new.

TensorBoard and MLflow are optional (``pip install 'hospital-secagg[export]'``) and imported
only by this command. TensorBoard files are written with TensorBoard's own event writer,
without TensorFlow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer.cli import EXIT_FAILED, EXIT_OK, UsageError

__all__ = ["SessionRun", "add_parsers", "runs_of_ledger", "write_mlflow", "write_tensorboard"]

_MAX_PARAM = 500  # longer values (a model's JSON) are exported as their hash and length
PROPOSAL_HASH_TAG = "hospital_secagg.proposal_hash"


@dataclass(frozen=True, slots=True)
class SessionRun:
    """What one session exports.

    Attributes:
        steps: ``(round, {metric: value})`` for every round that verified, in round order.
        skipped: ``(first skipped round, why)`` when the ledger check failed in this session.
    """

    session_id: str
    proposal_hash: str
    params: dict[str, str]
    steps: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    skipped: tuple[int, str] | None = None


def _flatten(prefix: str, value: object, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in sorted(value.items()):
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
        return
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > _MAX_PARAM:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        text = f"sha256:{digest} ({len(text)} characters; the full text is in the proposal)"
    out[prefix] = text


def _params(data: Any) -> dict[str, str]:
    session = data.snapshot.session
    try:
        proposal = json.loads(session.proposal)
    except ValueError:
        proposal = {}
    params: dict[str, str] = {
        "session": session.session_id,
        "proposer": session.proposer,
        "participants": ",".join(session.participants),
        "threshold": f"{session.threshold} of {len(session.participants)}",
        "rounds_planned": str(session.rounds_planned),
        "proposal_hash": session.proposal_hash.hex(),
        "ledger": data.ledger,
    }
    if isinstance(proposal, dict):
        payload = proposal.get("payload", {})
        _flatten("payload", payload if isinstance(payload, dict) else {}, params)
        privacy = proposal.get("privacy", {})
        _flatten("privacy", privacy if isinstance(privacy, dict) else {}, params)
        for key in ("aggregation", "graph", "colluders"):
            if key in proposal:
                _flatten(key, proposal[key], params)
    for peer, budget in sorted(data.budgets.items()):
        params[f"epsilon_budget.{peer}"] = repr(budget)
    return params


def _session_run(data: Any) -> SessionRun:
    from dashboard.data import banner, evaluated_after, first_unagreed_round, metrics_table

    snapshot = data.snapshot
    session = snapshot.session
    records = snapshot.records
    first_bad = first_unagreed_round(snapshot.report, session.session_id, records)
    table = metrics_table(records, first_bad)
    metric_keys = [c.key for c in table.columns if c.kind == "float"]
    params = _params(data)
    checked = "signatures verified" if data.federation else "checked without keys"
    params["ledger_check"] = (
        f"passed ({checked})" if first_bad is None else f"failed at round {first_bad}"
    )
    run = SessionRun(session.session_id, session.proposal_hash.hex(), params)
    cumulative: dict[str, float] = {}
    by_round = {stored.record.round: stored for stored in records}
    for row in table.rows:
        round_ = int(row["round"])  # type: ignore[arg-type]  # always an int (metrics_table)
        if first_bad is not None and round_ >= first_bad:
            break
        values = {
            key: float(value)
            for key in metric_keys
            if isinstance(value := row.get(key), int | float) and math.isfinite(value)
        }
        stored = by_round[round_]
        after = evaluated_after(stored)
        if after is not None:
            values["model_after_round"] = float(after)
        for peer, epsilon in sorted(stored.record.epsilon.items()):
            cumulative[peer] = cumulative.get(peer, 0.0) + float(epsilon)
            values[f"epsilon_spent/{peer}"] = cumulative[peer]
        run.steps.append((round_, values))
    if first_bad is not None:
        why = banner(snapshot.report, session.session_id, records) or "the ledger check failed"
        return SessionRun(run.session_id, run.proposal_hash, params, run.steps, (first_bad, why))
    return run


def runs_of_ledger(
    ledger_url: str,
    session_ids: Sequence[str] = (),
    *,
    roster_path: str | None = None,
    ca_path: str | None = None,
) -> list[SessionRun]:
    """One :class:`SessionRun` per session (``session_ids``, or every session).

    Raises:
        UsageError: the ledger, the roster or a session cannot be used.
    """
    from dashboard.source import LedgerSource, LedgerSourceError
    from peer.ledger import LedgerError

    from .ceremony_report import load_report_data

    if not session_ids:
        try:
            source = LedgerSource(ledger_url)
        except LedgerSourceError as exc:
            raise UsageError(f"cannot open the ledger: {exc}") from None
        try:
            session_ids = [s.session_id for s in source.sessions()]
        except LedgerError as exc:
            raise UsageError(str(exc).splitlines()[0]) from None
        finally:
            source.close()
        if not session_ids:
            raise UsageError(f"the ledger {ledger_url} holds no session")
    return [
        _session_run(load_report_data(ledger_url, sid, roster_path=roster_path, ca_path=ca_path))
        for sid in session_ids
    ]


# --------------------------------------------------------------------------- TensorBoard


def write_tensorboard(runs: Sequence[SessionRun], directory: Path) -> dict[str, str]:
    """Event files under ``directory/<session id>/``; what happened to each session."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    from tensorboard.plugins.hparams import plugin_data_pb2

    # TensorBoard's record writer on a plain file: its EventFileWriter would import all of
    # TensorFlow (seconds) only to open a file.
    from tensorboard.summary.writer.record_writer import RecordWriter

    outcome: dict[str, str] = {}
    for run in runs:
        run_dir = directory / run.session_id
        if run_dir.is_dir() and any(run_dir.glob("events.out.tfevents.*")):
            outcome[run.session_id] = f"already exported in {run_dir} (delete it to export again)"
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        start = plugin_data_pb2.SessionStartInfo(group_name=run.session_id, start_time_secs=now)
        for key, value in run.params.items():
            start.hparams[key].string_value = value
        hparams = summary_pb2.Summary.Value(
            tag=hparams_metadata.SESSION_START_INFO_TAG,
            metadata=hparams_metadata.create_summary_metadata(
                plugin_data_pb2.HParamsPluginData(session_start_info=start)
            ),
        )
        hparams.tensor.CopyFrom(hparams_metadata.NULL_TENSOR)
        events = [
            event_pb2.Event(wall_time=now, file_version="brain.Event:2"),
            event_pb2.Event(wall_time=now, summary=summary_pb2.Summary(value=[hparams])),
        ]
        for round_, values in run.steps:
            summary = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=key, simple_value=value)
                    for key, value in sorted(values.items())
                ]
            )
            events.append(event_pb2.Event(wall_time=now, step=round_, summary=summary))
        path = run_dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.hospital-secagg"
        with path.open("wb") as file:
            writer = RecordWriter(file)
            for event in events:
                writer.write(event.SerializeToString())
        outcome[run.session_id] = f"{len(run.steps)} round(s) written to {run_dir}"
    return outcome


# --------------------------------------------------------------------------- MLflow


def write_mlflow(runs: Sequence[SessionRun], uri: str, experiment: str) -> dict[str, str]:
    """One MLflow run per session in ``experiment`` at tracking ``uri``."""
    from mlflow.exceptions import MlflowException

    try:
        return _write_mlflow(runs, uri, experiment)
    except MlflowException as exc:
        # e.g. MLflow 3 refuses a file: store unless MLFLOW_ALLOW_FILE_STORE=true is set.
        raise UsageError(f"MLflow at {uri}: {exc.message}") from None


def _write_mlflow(runs: Sequence[SessionRun], uri: str, experiment: str) -> dict[str, str]:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    outcome: dict[str, str] = {}
    for run in runs:
        existing = client.search_runs(
            [experiment_id], filter_string=f"tags.`{PROPOSAL_HASH_TAG}` = '{run.proposal_hash}'"
        )
        if existing:
            outcome[run.session_id] = f"already exported as run {existing[0].info.run_id}"
            continue
        created = client.create_run(
            experiment_id,
            run_name=run.session_id,
            tags={PROPOSAL_HASH_TAG: run.proposal_hash, "hospital_secagg.session": run.session_id},
        )
        run_id = created.info.run_id
        stamp = int(time.time() * 1000)
        metrics = [
            Metric(key, value, stamp, round_)
            for round_, values in run.steps
            for key, value in sorted(values.items())
        ]
        params = [Param(key, value) for key, value in sorted(run.params.items())]
        # log_batch takes at most 100 params and 1000 metrics per call.
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        if run.skipped is not None:
            client.log_batch(run_id, tags=[RunTag("hospital_secagg.skipped", run.skipped[1])])
        client.set_terminated(run_id, "FINISHED" if run.skipped is None else "FAILED")
        outcome[run.session_id] = f"{len(run.steps)} round(s) logged as run {run_id}"
    return outcome


# --------------------------------------------------------------------------- CLI


def _add_export(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="the agreed metrics of a ledger as TensorBoard or MLflow runs",
        description=(
            "Export the agreed metrics of each session of a peer's ledger as one run per "
            "session (metrics per round as steps, the proposal as parameters). Only what "
            "passes the ledger check is exported; skipped rounds are named. Exit 0 when "
            "everything was exported, 1 when something was skipped, 2 on a usage error."
        ),
    )
    parser.add_argument("--ledger", required=True, metavar="URL", help="the peer's ledger")
    parser.add_argument(
        "--session", action="append", default=[], metavar="ID", help="a session (repeatable)"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--tensorboard", type=Path, metavar="DIR", help="TensorBoard log dir")
    target.add_argument("--mlflow", metavar="URI", help="MLflow tracking URI, e.g. file:./mlruns")
    parser.add_argument(
        "--experiment", default="hospital-secagg", metavar="NAME", help="MLflow experiment"
    )
    parser.add_argument("--roster", metavar="PATH", help="signed roster, to verify signatures")
    parser.add_argument("--ca", metavar="PATH", help="consortium CA certificate for --roster")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    module = "tensorboard" if args.tensorboard is not None else "mlflow"
    try:
        __import__(module)
    except ImportError:
        raise UsageError(
            f"{module} is not installed: pip install 'hospital-secagg[export]'"
        ) from None
    runs = runs_of_ledger(args.ledger, args.session, roster_path=args.roster, ca_path=args.ca)
    if args.tensorboard is not None:
        outcome = write_tensorboard(runs, args.tensorboard)
    else:
        outcome = write_mlflow(runs, args.mlflow, args.experiment)
    skipped = {
        run.session_id: f"rounds {run.skipped[0]} and later not exported: {run.skipped[1]}"
        for run in runs
        if run.skipped is not None
    }
    if args.json:
        print(json.dumps({"exported": outcome, "skipped": skipped}, indent=2))
    else:
        for session_id, what in outcome.items():
            print(f"session {session_id}: {what}")
            if session_id in skipped:
                print(f"  SKIPPED {skipped[session_id]}")
    return EXIT_FAILED if skipped else EXIT_OK


def add_parsers(subparsers: Any) -> None:
    """Register ``export`` on ``ceremony``'s subparsers."""
    _add_export(subparsers)
