"""`ceremony stats`: query parsing, then real statistics sessions between three peer processes,
the privacy budget running out, and the command run as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peer.cli import UsageError
from peer.data import (
    BUNDLED_DATASET_NAME,
    PatientRecord,
    breast_cancer_feature_names,
    breast_cancer_records,
    split_dataset,
    write_hospital_stores,
)
from scripts.ceremony import main
from scripts.ceremony_stats import histogram_query, mean_query, statistics_spec

sys.path.insert(0, str(Path(__file__).parent / "network"))
from network_harness import Network  # type: ignore[import-not-found, unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 1.0  # each peer's policy.max_epsilon


# --------------------------------------------------------------------------- parsing


def test_histogram_and_mean_shorthands() -> None:
    assert histogram_query("mean radius:5,10,20") == {
        "name": "mean radius histogram",
        "type": "histogram",
        "feature": "mean radius",
        "edges": [5.0, 10.0, 20.0],
    }
    # A feature name may hold colons: the edges follow the last one.
    assert histogram_query("a:b:1,2")["feature"] == "a:b"
    assert mean_query("mean area:0:3000")["bounds"] == [0.0, 3000.0]
    assert mean_query("x:y:-1:1")["feature"] == "x:y"
    with pytest.raises(UsageError, match="FEATURE:EDGES"):
        histogram_query("no edges")
    with pytest.raises(UsageError, match="comma-separated numbers"):
        histogram_query("radius:1,two")
    with pytest.raises(UsageError, match="FEATURE:LO:HI"):
        mean_query("area:3000")
    with pytest.raises(UsageError, match="must be numbers"):
        mean_query("area:zero:3000")


def test_spec_from_options_and_files(tmp_path: Path) -> None:
    spec = statistics_spec(
        epsilon=0.5, count_categories=[], means=["mean area:0:3000"], max_records=1000
    )
    assert [q.name for q in spec.queries] == ["diagnoses", "mean area mean"]
    assert spec.queries[0].categories == ("benign", "malignant")  # type: ignore[union-attr]
    assert spec.epsilon == 0.5
    assert spec.max_records == 1000

    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"name": "d", "type": "count", "categories": ["M", "B"]}]))
    assert statistics_spec(epsilon=1.0, query_file=listed).queries[0].name == "d"
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(
        json.dumps(
            {
                "epsilon": 2.0,
                "split": "test",
                "queries": [{"name": "d", "type": "count", "categories": ["M"]}],
            }
        )
    )
    from_file = statistics_spec(epsilon=None, query_file=wrapped)
    assert (from_file.epsilon, from_file.split) == (2.0, "test")
    assert statistics_spec(epsilon=0.3, query_file=wrapped).epsilon == 0.3  # option wins


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epsilon": 1.0}, "no query"),
        ({"epsilon": None, "count_categories": []}, "--epsilon is required"),
        ({"epsilon": -1.0, "count_categories": []}, "'epsilon' must be finite and positive"),
        ({"epsilon": 1.0, "histograms": ["r:3,2"]}, "strictly increasing"),
        ({"epsilon": 1.0, "means": ["a:1:1"]}, "lower < upper"),
        ({"epsilon": 1.0, "count_categories": ["x", "x"]}, "lists a diagnosis twice"),
    ],
)
def test_bad_specs_name_the_problem(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        statistics_spec(**kwargs)


def test_query_file_and_shorthands_are_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text("[]")
    with pytest.raises(UsageError, match="not both"):
        statistics_spec(epsilon=1.0, query_file=path, count_categories=[])
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        statistics_spec(epsilon=1.0, query_file=path)
    with pytest.raises(UsageError, match="no such file"):
        statistics_spec(epsilon=1.0, query_file=tmp_path / "missing.json")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "federation.toml"
    assert main(["stats", "--federation", str(missing), "--count-by-diagnosis"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ceremony stats: error: --epsilon is required (the epsilon each hospital spends)"
    ]
    argv = ["stats", "--federation", str(missing), "--count-by-diagnosis", "--epsilon", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no such federation file" in err[0]


# --------------------------------------------------------------------------- real peers


def _federation_file(network: Network) -> Path:
    cert, key, ca = network.kit.operator_files()
    roster = network.kit.federation.roster_path
    path: Path = network.directory / "federation.toml"
    # No [session.payload] or rounds: `stats` brings its own.
    path.write_text(
        f"""[operator]
cert = "{cert}"
key = "{key}"
ca = "{ca}"
roster = "{roster}"

[session]
participants = {json.dumps(list(network.peers))}
stage_seconds = 5
prepare_seconds = 10
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Network, list[Any]]]:
    root = tmp_path_factory.mktemp("stats")
    network = Network.create(root / "network", 3, start=False, policy={"max_epsilon": BUDGET})
    records = breast_cancer_records(np.random.default_rng(0))
    parts = split_dataset(records, 3, mode="dirichlet", alpha=0.6, rng=np.random.default_rng(3))
    write_hospital_stores(
        parts,
        [f"sqlite:///{network.kit.kits[p].directory / 'data.db'}" for p in network.peers],
        feature_names=breast_cancer_feature_names(),
        dataset_name=BUNDLED_DATASET_NAME,
    )
    try:
        for process in network.peers.values():
            process.start()
        yield network, parts
    finally:
        network.stop()


def _stats(
    capsys: pytest.CaptureFixture[str], federation: Path, *argv: str
) -> tuple[int, dict[str, Any], str]:
    code = main(["stats", "--federation", str(federation), *argv, "--json", "--quiet"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured
    return code, json.loads(lines[0]), captured.err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_agreed_statistics_then_the_budget_runs_out(
    network: tuple[Network, list[list[PatientRecord]]], capsys: pytest.CaptureFixture[str]
) -> None:
    net, parts = network
    federation = _federation_file(net)
    union = [r for part in parts for r in part]
    code, report, err = _stats(
        capsys,
        federation,
        "--count-by-diagnosis",
        "--mean",
        "mean area:0:3000",
        "--epsilon",
        "0.8",
        "--max-records",
        "1000",
        "--session-id",
        "stats-first",
    )
    assert code == 0, (report, err, net.logs())
    assert report["ok"] is True
    assert report["session_id"] == "stats-first"
    (round_,) = report["rounds"]
    assert round_["signatures"] == 3
    assert sorted(round_["held_by"]) == sorted(net.peers)  # the same record in every ledger
    assert round_["epsilon"] == pytest.approx(dict.fromkeys(net.peers, 0.8))
    counts = report["statistics"]["diagnoses"]["counts"]
    for diagnosis in ("benign", "malignant"):
        true = sum(r.diagnosis == diagnosis for r in union)
        # Each of 3 hospitals adds two-sided geometric noise of epsilon 0.4 (std ~3.5).
        assert abs(counts[diagnosis] - true) < 40, (diagnosis, counts, true)
    area = report["statistics"]["mean area mean"]
    assert 0.0 <= area["mean"] <= 3000.0
    assert area["count"] == pytest.approx(len(union), abs=60)

    # Attaching to the finished session reads the same agreed answers back from the ledgers.
    code, attached, _ = _stats(capsys, federation, "--attach", "stats-first")
    assert code == 0
    assert attached["statistics"] == report["statistics"]
    assert attached["rounds"][0]["record_hash"] == round_["record_hash"]

    # 0.8 of the budget of 1.0 is spent: a second 0.8 is refused by every peer, each saying why.
    code, report, err = _stats(
        capsys,
        federation,
        "--count-by-diagnosis",
        "--epsilon",
        "0.8",
        "--session-id",
        "stats-second",
    )
    assert code == 1
    assert report["ok"] is False
    assert sorted(report["refused"]) == sorted(net.peers)
    refusals = [line for line in err.splitlines() if "refused statistics session" in line]
    assert len(refusals) == 3, err
    for peer in net.peers:
        assert any(line.startswith(f"{peer} refused") and "budget" in line for line in refusals)
    assert "0.8" in report["refused"][next(iter(net.peers))]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_subprocess_text_output(network: tuple[Network, list[list[PatientRecord]]]) -> None:
    net, _ = network
    federation = _federation_file(net)
    # 0.1 fits the remaining budget whether or not the other test ran first.
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.ceremony",
            "stats",
            "--federation",
            str(federation),
            "--histogram",
            "mean radius:5,10,15,20,30",
            "--epsilon",
            "0.1",
            "--max-records",
            "1000",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, (completed.stdout, completed.stderr, net.logs())
    out = completed.stdout
    assert "agreed by 3 ledgers, 3 valid signatures" in out
    assert "mean radius histogram (histogram, epsilon 0.1)" in out
    assert "[20, 30]" in out  # the last bin is closed
    assert "[5, 10)" in out
