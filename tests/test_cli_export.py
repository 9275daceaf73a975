"""``ceremony export``: a ledger's agreed metrics as TensorBoard and MLflow runs, read back.

The event files are read with TensorBoard's EventAccumulator and the MLflow file store with
MlflowClient, as a data scientist's tools would read them. A ledger whose last record was
edited exports only the rounds before the edit, and says so.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dashboard"))
from dashboard_testlib import PEERS, LedgerBuilder

from scripts.ceremony import main

pytestmark = pytest.mark.timeout(300)


def _study(tmp_path: Path) -> LedgerBuilder:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("study-1", rounds=3, privacy={"epsilon_budget": 3.0, "delta": 1e-5})
    for round_, accuracy in ((1, 0.5), (2, 0.8), (3, 0.938)):
        builder.agree_round(
            "study-1",
            round_,
            {"accuracy": accuracy, "loss": 1 - accuracy, "examples": 900},
            epsilon=dict.fromkeys(PEERS, 0.5),
        )
    builder.add_session("study-2", rounds=1)
    builder.agree_round("study-2", 1, {"accuracy": 0.7}, epsilon=dict.fromkeys(PEERS, 0.0))
    return builder


def _roster_args(builder: LedgerBuilder) -> list[str]:
    roster = builder.federation.roster_path
    assert roster is not None
    return ["--roster", str(roster), "--ca", str(builder.federation.ca.cert_path)]


def _tamper_round_3(builder: LedgerBuilder) -> None:
    with sqlite3.connect(builder.path) as db:
        (text,) = db.execute(
            "SELECT metrics FROM agreed_records WHERE session_id = 'study-1' AND round = 3"
        ).fetchone()
        metrics = json.loads(text)
        metrics["accuracy"] = 0.998
        db.execute(
            "UPDATE agreed_records SET metrics = ? WHERE session_id = 'study-1' AND round = 3",
            (json.dumps(metrics),),
        )


def _scalars(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    # simple_value is a float32: compare at its precision.
    scalars = {
        tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    start = metadata.parse_session_start_info_plugin_data(content)
    return scalars, {k: v.string_value for k, v in start.hparams.items()}


def test_tensorboard_export_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    builder = _study(tmp_path)
    out = tmp_path / "tb"
    code = main(
        ["export", "--ledger", builder.url, *_roster_args(builder), "--tensorboard", str(out)]
    )
    assert code == 0, capsys.readouterr()
    scalars, params = _scalars(out / "study-1")
    assert scalars["accuracy"] == [(1, 0.5), (2, 0.8), (3, 0.938)]
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    assert scalars[f"epsilon_spent/{PEERS[0]}"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert params["session"] == "study-1"
    assert params["privacy.epsilon_budget"] == "3.0"
    assert params["payload.kind"] == "training"
    assert params["ledger_check"] == "passed (signatures verified)"
    assert params["participants"] == ",".join(PEERS)
    scalars_2, _ = _scalars(out / "study-2")
    assert scalars_2["accuracy"] == [(1, 0.7)]
    # Again: nothing is written twice.
    capsys.readouterr()
    assert main(["export", "--ledger", builder.url, "--tensorboard", str(out)]) == 0
    assert "already exported" in capsys.readouterr().out
    assert len(list((out / "study-1").glob("events.out.tfevents.*"))) == 1


def test_mlflow_export_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    builder = _study(tmp_path)
    uri = f"file:{tmp_path / 'mlruns'}"
    argv = ["export", "--ledger", builder.url, *_roster_args(builder), "--mlflow", uri]
    # MLflow 3 keeps the file store only for those who opt in; without it, a clear error.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert main(argv) == 2
    assert "MLFLOW_ALLOW_FILE_STORE" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main([*argv, "--session", "study-1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] == {}
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("hospital-secagg")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "study-1"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.8), (3, 0.938)]
    assert run.data.params["privacy.delta"] == "1e-05"
    assert run.data.params["threshold"] == f"2 of {len(PEERS)}"
    # Exporting every session adds only study-2.
    assert main(argv) == 0
    assert "already exported" in capsys.readouterr().out
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["study-1", "study-2"]


def test_only_what_verifies_is_exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    builder = _study(tmp_path)
    _tamper_round_3(builder)
    out = tmp_path / "tb"
    # Without a roster the keyless check still sees the edited metrics.
    code = main(
        ["export", "--ledger", builder.url, "--session", "study-1", "--tensorboard", str(out)]
    )
    assert code == 1
    printed = capsys.readouterr().out
    assert "SKIPPED rounds 3 and later" in printed
    assert "round 3 of session study-1" in printed
    scalars, params = _scalars(out / "study-1")
    assert scalars["accuracy"] == [(1, 0.5), (2, 0.8)]  # never 0.998
    assert params["ledger_check"] == "failed at round 3"


def test_bad_requests_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = _study(tmp_path)
    code = main(["export", "--ledger", builder.url, "--session", "nope", "--tensorboard", "x"])
    assert code == 2
    assert "no session 'nope'" in capsys.readouterr().err
