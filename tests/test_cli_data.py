"""`ceremony split` / `ceremony baseline` and `peer data import` / `peer data show`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peer.__main__ import main as peer_main
from peer.data import PatientStore
from peer.data.source import NO_LABEL_NOTE
from peer.kit import write_peer_config
from scripts.ceremony import main

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_RECORDS = 569


def run_json(
    capsys: pytest.CaptureFixture[str], command: str, *argv: str
) -> tuple[int, dict[str, Any]]:
    code = main([command, *argv, "--json"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured
    return code, json.loads(lines[0])


def one_error_line(capsys: pytest.CaptureFixture[str], prefix: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


def write_csv(path: Path, rows: int, *, bad: str = "") -> Path:
    """``rows`` patients with two numeric features and an M/B diagnosis label."""
    lines = ["pid,radius,texture,diagnosis"]
    for i in range(rows):
        malignant = i % 3 == 0
        lines.append(f"p{i},{10 + i % 7 + (6 if malignant else 0)},{15 + i % 5},{'BM'[malignant]}")
    path.write_text("\n".join(lines) + "\n" + bad, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- split


def test_split_dirichlet_writes_one_database_per_hospital(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--hospitals", "3", "--mode", "dirichlet", "--alpha", "0.3", "--seed", "7")
    code, report = run_json(capsys, "split", *args, "--out", str(tmp_path / "a"))
    assert code == 0
    rows = report["hospitals"]
    assert [r["hospital"] for r in rows] == ["hospital_1", "hospital_2", "hospital_3"]
    assert sum(r["records"] for r in rows) == BUNDLED_RECORDS
    assert report["seed"] == 7
    assert len(report["features"]) == 30
    for row in rows:
        store = PatientStore(row["url"])
        assert store.count() == row["records"]
        assert store.count("train") == row["train"]
        assert store.count("test") == row["test"]
        assert sum(store.diagnosis_counts().values()) == row["records"]
        assert row["labels"]["0"] + row["labels"]["1"] == row["records"]
        store.dispose()
    shares = [r["labels"]["1"] / r["records"] for r in rows]
    assert max(shares) - min(shares) > 0.2  # alpha 0.3 skews the labels
    # The same seed makes the same split.
    _, again = run_json(capsys, "split", *args, "--out", str(tmp_path / "b"))
    strip = [{k: v for k, v in r.items() if k != "url"} for r in again["hospitals"]]
    assert strip == [{k: v for k, v in r.items() if k != "url"} for r in rows]


def test_split_text_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["split", "--hospitals", "2", "--seed", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "569 records, 30 features, split iid across 2 hospitals (seed 1)" in out
    assert "% label 1" in out
    assert out.strip().splitlines()[-1].split()[:2] == ["all", "569"]


def test_split_url_template_and_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = f"sqlite:///{tmp_path}/kits/{{hospital}}/data.db"
    code, report = run_json(
        capsys, "split", "--hospitals", "2", "--names", "hospital-a", "hospital-b",
        "--url-template", template, "--seed", "3",
    )  # fmt: skip
    assert code == 0
    for name in ("hospital-a", "hospital-b"):
        assert (tmp_path / "kits" / name / "data.db").is_file()
    assert [r["url"] for r in report["hospitals"]] == [
        template.format(hospital="hospital-a"),
        template.format(hospital="hospital-b"),
    ]


def test_split_refuses_a_database_that_holds_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["split", "--hospitals", "2", "--seed", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    capsys.readouterr()
    store = PatientStore(f"sqlite:///{tmp_path / 'hospital_1.db'}")
    before = store.count()
    assert main(argv) == 2
    line = one_error_line(capsys, "ceremony split: error: ")
    assert "already holds" in line
    assert "nothing was written" in line
    assert store.count() == before
    store.dispose()


def test_split_a_csv_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_csv(tmp_path / "patients.csv", 60)
    code, report = run_json(
        capsys, "split", "--hospitals", "2", "--csv", str(csv), "--label", "diagnosis",
        "--id", "pid", "--seed", "0", "--out", str(tmp_path / "out"),
        "--min-train", "5", "--min-test", "2",
    )  # fmt: skip
    assert code == 0
    assert report["features"] == ["radius", "texture"]
    assert report["dataset"] == "patients"
    assert sum(r["records"] for r in report["hospitals"]) == 60
    assert sum(r["labels"]["1"] for r in report["hospitals"]) == 20  # M is the positive class
    assert all(PatientStore(r["url"]).has_labels() for r in report["hospitals"])


def test_split_a_csv_file_without_labels_keeps_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path / "patients.csv", 60)
    code, report = run_json(
        capsys, "split", "--hospitals", "2", "--csv", str(csv), "--target", "texture",
        "--features", "radius", "--id", "pid", "--seed", "0", "--out", str(tmp_path / "out"),
        "--min-train", "5", "--min-test", "2",
    )  # fmt: skip
    assert code == 0
    # Each hospital's labels are placeholders: its store refuses classification sessions.
    assert not any(PatientStore(r["url"]).has_labels() for r in report["hospitals"])


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--hospitals", "0"], "--hospitals must be at least 1"),
        (["--hospitals", "2", "--names", "a"], "--names gives 1 names"),
        (["--hospitals", "2", "--label", "x"], "--label only apply with --csv"),
        (["--hospitals", "2", "--url-template", "sqlite:///x.db"], "must contain {hospital}"),
        (["--hospitals", "200"], "cannot give 200 hospitals"),
        (["--hospitals", "2", "--mode", "dirichlet", "--alpha", "0"], "--alpha must be positive"),
    ],
)
def test_split_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    if "--url-template" not in argv:
        argv = [*argv, "--out", str(tmp_path)]
    assert main(["split", *argv]) == 2
    assert fragment in one_error_line(capsys, "ceremony split: error: ")
    assert not list(tmp_path.glob("*.db"))


def test_split_a_bad_csv_names_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path / "bad.csv", 30, bad="p99,,12,M\np98,11,12,X\n")
    argv = ["split", "--hospitals", "2", "--csv", str(csv), "--label", "diagnosis"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys, "ceremony split: error: ")
    assert "line 32, column 'radius': missing value" in line
    assert "column 'diagnosis': label must have exactly 2 distinct values" in line


def test_split_subprocess(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "scripts.ceremony", "split", "--hospitals", "3", "--seed", "5",
         "--mode", "dirichlet", "--out", str(tmp_path), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert sum(r["records"] for r in report["hospitals"]) == BUNDLED_RECORDS
    assert sorted(p.name for p in tmp_path.glob("*.db")) == [
        "hospital_1.db",
        "hospital_2.db",
        "hospital_3.db",
    ]


# --------------------------------------------------------------------------- baseline


def test_baseline_centralized_and_each_hospital_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    argv = ["--hospitals", "3", "--mode", "dirichlet", "--alpha", "0.5", "--seed", "7"]
    assert main(["split", *argv, "--out", str(data)]) == 0
    capsys.readouterr()
    code, report = run_json(capsys, "baseline", "--data", str(data), "--epochs", "10")
    assert code == 0
    results = report["results"]
    assert [r["setting"] for r in results] == [
        "centralized",
        "hospital_1",
        "hospital_2",
        "hospital_3",
    ]
    central = results[0]
    assert central["train_records"] == sum(r["train_records"] for r in results[1:])
    assert central["own_test"] is None
    # Every model is scored on the union of the test splits.
    assert {r["metrics"]["n"] for r in results} == {float(report["test_records"])}
    # Logistic regression on this data set: well above the 63% majority class.
    assert central["metrics"]["accuracy"] > 0.9
    assert central["metrics"]["auc"] > 0.9
    for alone in results[1:]:
        assert 0.0 <= alone["metrics"]["accuracy"] <= 1.0
        assert alone["own_test"]["n"] < report["test_records"]


def test_baseline_refuses_hospitals_with_different_features(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["split", "--hospitals", "1", "--seed", "1", "--out", str(tmp_path / "a")]) == 0
    csv = write_csv(tmp_path / "other.csv", 40)
    split_csv = ["split", "--hospitals", "1", "--csv", str(csv), "--label", "diagnosis", "--id"]
    split_csv.append("pid")
    assert main([*split_csv, "--out", str(tmp_path / "b"), "--names", "other"]) == 0
    capsys.readouterr()
    argv = ["baseline", "--data", str(tmp_path / "a"), str(tmp_path / "b" / "other.db")]
    assert main(argv) == 2
    assert "do not hold the same data set" in one_error_line(capsys, "ceremony baseline: error: ")
    assert main(["baseline", "--data", str(tmp_path / "nothing")]) == 2
    assert "no such file or directory" in one_error_line(capsys, "ceremony baseline: error: ")


# --------------------------------------------------------------------------- peer data


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A peer configuration whose files exist (the data commands never open them)."""
    site = tmp_path / "site"
    site.mkdir()
    for name in ("hospital-a.pem", "ca.pem", "roster.json", "crl.pem"):
        (site / name).write_text("", encoding="utf-8")
    key = site / "hospital-a.key"
    key.write_text("", encoding="utf-8")
    key.chmod(0o600)
    path = site / "hospital-a.toml"
    write_peer_config(path, "hospital-a", "127.0.0.1:0")
    return path


def peer_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = peer_main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return code, json.loads(out[0])


def test_peer_data_import_then_show(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path / "patients.csv", 30)
    code, report = peer_json(
        capsys, "data", "import", "--config", str(config), "--csv", str(csv),
        "--label", "diagnosis", "--id", "pid", "--test-fraction", "0.2", "--seed", "1",
    )  # fmt: skip
    assert code == 0
    assert report["records"] == 30
    assert (report["train"], report["test"]) == (24, 6)  # 20% of each label: 2 M + 4 B
    assert report["label_mapping"] == {"B": 0, "M": 1}
    assert report["database"] == f"sqlite:///{config.parent / 'data.db'}"

    code, shown = peer_json(capsys, "data", "show", "--config", str(config))
    assert code == 0
    assert shown["features"] == ["radius", "texture"]
    assert shown["splits"]["train"] == {
        "records": 24,
        "labels": {"0": 16, "1": 8},
        "diagnoses": {"B": 16, "M": 8},
    }
    assert shown["splits"]["test"]["records"] == 6
    assert peer_main(["data", "show", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "train       24       16        8  B 16, M 8" in text


def test_peer_data_import_rejects_a_bad_file_and_changes_nothing(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_csv(tmp_path / "good.csv", 10)
    base = ["data", "import", "--config", str(config), "--label", "diagnosis", "--id", "pid"]
    assert peer_main([*base, "--csv", str(good)]) == 0
    capsys.readouterr()
    store = PatientStore(f"sqlite:///{config.parent / 'data.db'}")
    before = [(r.patient_id, r.features.tolist(), r.label, r.split) for r in store.records()]

    bad = write_csv(tmp_path / "bad.csv", 5, bad="p50,abc,12,M\np51,,12,B\n")
    code, report = peer_json(capsys, *base, "--csv", str(bad))
    assert code == 2
    assert report["ok"] is False
    assert {"line": 7, "column": "radius", "message": "not a finite number: 'abc'"} in report[
        "issues"
    ]
    assert {"line": 8, "column": "radius", "message": "missing value"} in report["issues"]

    assert peer_main([*base, "--csv", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("peer data import: error: ")
    assert "nothing was imported" in err[0]
    assert "  line 7, column 'radius': not a finite number: 'abc'" in err

    # Not binary, and a non-numeric column named by the option the user would type.
    text_col = tmp_path / "text.csv"
    text_col.write_text("pid,site,radius,y\na,x,1,0\nb,y,2,1\nc,z,3,2\n", encoding="utf-8")
    assert peer_main([*base[:-4], "--label", "y", "--id", "pid", "--csv", str(text_col)]) == 2
    text = capsys.readouterr().err
    assert "column 'site': is not numeric" in text
    assert "--features" in text
    assert "line 4, column 'y': numeric label must be 0 or 1: '2'" in text

    # Patients already stored: refused as a whole.
    assert peer_main([*base, "--csv", str(good)]) == 2
    line = one_error_line(capsys, "peer: error: ")
    assert "duplicate patient id" in line
    assert "unchanged" in line
    assert [
        (r.patient_id, r.features.tolist(), r.label, r.split) for r in store.records()
    ] == before
    store.dispose()


def test_peer_data_show_reports_an_imported_target(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path / "patients.csv", 30)
    argv = ["data", "import", "--config", str(config), "--csv", str(csv), "--id", "pid"]
    argv += ["--label", "diagnosis", "--features", "radius", "--target", "texture"]
    assert peer_main(argv) == 0
    capsys.readouterr()
    code, shown = peer_json(capsys, "data", "show", "--config", str(config))
    assert code == 0
    texture = [15 + i % 5 for i in range(30)]
    mean = sum(texture) / len(texture)
    assert shown["target"]["count"] == 30
    assert shown["target"]["missing"] == 0
    assert shown["target"]["mean"] == pytest.approx(mean)
    assert peer_main(["data", "show", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert f"target: 30 values, 0 missing, mean {mean:.4g}, std " in text
    assert shown["labelled"] is True
    assert "no label column" not in text


def test_peer_data_show_says_when_the_store_has_no_label_column(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_csv(tmp_path / "patients.csv", 30)
    argv = ["data", "import", "--config", str(config), "--csv", str(csv), "--id", "pid"]
    argv += ["--features", "radius", "--target", "texture"]  # a regression data set: no --label
    assert peer_main(argv) == 0
    assert f"label: none ({NO_LABEL_NOTE})" in capsys.readouterr().out.splitlines()
    code, shown = peer_json(capsys, "data", "show", "--config", str(config))
    assert code == 0
    assert shown["labelled"] is False
    assert shown["splits"]["train"]["labels"] == {"0": 24}  # placeholders, not outcomes
    assert peer_main(["data", "show", "--config", str(config)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert f"note: {NO_LABEL_NOTE}; classification sessions are refused" in text


def test_peer_data_user_errors(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert peer_main(["data", "show", "--config", str(config)]) == 2
    assert "holds no patient data yet" in one_error_line(capsys, "peer: error: ")
    assert peer_main(["data", "show", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "no such configuration file" in one_error_line(capsys, "peer: error: ")
    assert peer_main(["data", "import", "--config", str(config), "--csv", "x.csv"]) == 2
    # --label is optional since regression data sets (--target) have none; one is needed.
    assert "--label" in one_error_line(capsys, "peer: error: ")
    argv = ["data", "import", "--config", str(config), "--csv", "x.csv", "--label", "y"]
    assert peer_main([*argv, "--test-fraction", "1.5"]) == 2
    assert "--test-fraction" in one_error_line(capsys, "peer: error: ")


def test_peer_data_subprocess(tmp_path: Path, config: Path) -> None:
    csv = write_csv(tmp_path / "patients.csv", 12)
    completed = subprocess.run(
        [sys.executable, "-m", "peer", "data", "import", "--config", str(config), "--csv",
         str(csv), "--label", "diagnosis", "--id", "pid"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "hospital-a: imported 12 records" in completed.stdout
    assert "label: 'B' -> 0, 'M' -> 1" in completed.stdout
