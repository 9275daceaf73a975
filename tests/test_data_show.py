"""`peer data show --config FILE` for every source: SQL, images, the patient store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine
from test_data_images import dicom_folder
from test_data_sql import fingerprint

from peer.__main__ import main as peer_main
from peer.data import (
    PatientRecord,
    PatientStore,
    breast_cancer_feature_names,
    breast_cancer_records,
    diabetes_feature_names,
    diabetes_records,
)
from peer.data.omop import OMOP_COHORT_QUERY, OMOP_REGRESSION_QUERY, write_synthetic_omop
from peer.data.source import NO_LABEL_NOTE

SQL_TABLE = f"""
peer_id = "hospital-a"

[data]
source = "sql"
name = "omop-ckd"
url = "sqlite:///omop.db"
query = '''{OMOP_COHORT_QUERY}'''
id = "person_id"
features = ["age", "female", "hba1c", "creatinine"]
label = "ckd"
classes = ["0", "1"]
missing = "drop"
split = {{ test_fraction = 0.25 }}
"""

# What `peer data show --json` may print: metadata and aggregates, never a record.
SHOWN_KEYS = {
    "peer",
    "kind",
    "name",
    "location",
    "input_shape",
    "n_classes",
    "label_names",
    "splits",
    "features",
    "image_shape",
    "columns",
    "target",
    "notes",
}


def show(capsys: pytest.CaptureFixture[str], config: Path) -> tuple[int, dict[str, Any], str]:
    code = peer_main(["data", "show", "--config", str(config), "--json"])
    out_json = capsys.readouterr()
    text_code = peer_main(["data", "show", "--config", str(config)])
    out_text = capsys.readouterr()
    assert text_code == code
    lines = out_json.out.strip().splitlines()
    assert len(lines) == 1, out_json
    return code, json.loads(lines[0]), out_text.out + out_text.err


def test_show_a_sql_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'omop.db'}")
    write_synthetic_omop(engine, 80, np.random.default_rng(3))
    engine.dispose()
    config = tmp_path / "hospital_a.toml"
    config.write_text(SQL_TABLE, encoding="utf-8")
    code, shown, text = show(capsys, config)
    assert code == 0
    assert set(shown) == SHOWN_KEYS
    assert shown["peer"] == "hospital-a"
    assert shown["kind"] == "tabular"
    assert shown["location"] == f"sqlite:///{tmp_path / 'omop.db'}"
    assert shown["features"] == ["age", "female", "hba1c", "creatinine"]
    records = shown["splits"]["train"]["records"] + shown["splits"]["test"]["records"]
    hba1c = next(c for c in shown["columns"] if c["name"] == "hba1c")
    assert hba1c["missing"] + records == 80
    assert set(hba1c) == {"name", "kind", "count", "missing", "mean", "std"}  # no min/max
    assert text.startswith("hospital-a: tabular data set 'omop-ckd' in sqlite:///")
    assert "label 0" in text
    assert "hba1c" in text
    assert "dropped for a missing feature" in text


# A regression-only data set: the latest creatinine as the target, no label column.
SQL_REGRESSION_TABLE = f"""
peer_id = "hospital-a"

[data]
source = "sql"
name = "omop-creatinine"
url = "sqlite:///omop.db"
query = '''{OMOP_REGRESSION_QUERY}'''
id = "person_id"
features = ["age", "female", "hba1c"]
target_column = "creatinine"
missing = "drop"
"""


def test_show_a_sql_source_with_a_target_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'omop.db'}")
    write_synthetic_omop(engine, 80, np.random.default_rng(3))
    engine.dispose()
    config = tmp_path / "hospital_a.toml"
    config.write_text(SQL_REGRESSION_TABLE, encoding="utf-8")
    code, shown, text = show(capsys, config)
    assert code == 0
    target = shown["target"]
    assert set(target) == {"name", "kind", "count", "missing", "mean", "std"}  # no min/max
    assert (target["name"], target["kind"], target["count"], target["missing"]) == (
        "creatinine",
        "float",
        80,
        0,
    )
    assert 0.5 < target["mean"] < 2.0  # serum creatinine, mg/dL
    assert shown["features"] == ["age", "female", "hba1c"]  # the target is not a feature
    assert [c["name"] for c in shown["columns"]] == shown["features"]
    row = next(line for line in text.splitlines() if line.startswith("creatinine (target)"))
    assert row.split()[2:5] == ["float", "80", "0"]
    assert f"{target['mean']:.4g}, {target['std']:.4g}" in row
    assert "no label column" in text
    # A data set without a target shows none.
    config.write_text(SQL_TABLE, encoding="utf-8")
    assert show(capsys, config)[1]["target"] is None


def test_show_refuses_a_writing_query_and_names_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'omop.db'}"
    write_synthetic_omop(create_engine(url), 20, np.random.default_rng(3))
    before = fingerprint(url)
    config = tmp_path / "evil.toml"
    config.write_text(
        SQL_TABLE.replace(OMOP_COHORT_QUERY, "DELETE FROM person RETURNING person_id"),
        encoding="utf-8",
    )
    code = peer_main(["data", "show", "--config", str(config)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0] == "peer data show: error: query: 2 problem(s), nothing was used"
    assert err[1] == "  must start with SELECT or WITH, not DELETE"
    assert err[2].startswith("  DELETE: a source query only reads")
    assert fingerprint(url) == before


def test_show_reports_bad_columns_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_synthetic_omop(
        create_engine(f"sqlite:///{tmp_path / 'omop.db'}"), 20, np.random.default_rng(3)
    )
    config = tmp_path / "bad.toml"
    config.write_text(
        SQL_TABLE.replace('"creatinine"]', '"egfr"]').replace('"drop"', '"refuse"'),
        encoding="utf-8",
    )
    code = peer_main(["data", "show", "--config", str(config), "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.splitlines()[1].startswith("  column 'egfr': feature column not yielded")
    assert json.loads(captured.out)["issues"][0]["subject"] == "column 'egfr'"


def test_show_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dicom_folder(tmp_path)
    config = tmp_path / "imaging.toml"
    config.write_text(
        """
        [data]
        source = "images"
        name = "lesions"
        folder = "scans"
        labels = "scans/labels.csv"
        image_size = [16, 16]
        classes = ["no lesion", "lesion"]
        split = { column = "split" }
        """,
        encoding="utf-8",
    )
    code, shown, text = show(capsys, config)
    assert code == 0
    assert shown["peer"] == "imaging"  # no peer_id: the file's name
    assert shown["kind"] == "image"
    assert shown["image_shape"] == [16, 16, 1]
    assert shown["splits"]["train"]["labels"] == {"0": 6, "1": 3}
    assert shown["label_names"] == ["no lesion", "lesion"]
    assert any(n.startswith("file 'corrupt.dcm' skipped") for n in shown["notes"])
    assert "images 16x16x1" in text
    assert "label lesion" in text
    assert "note: file 'corrupt.dcm' skipped" in text


def show_store(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    records: list[PatientRecord],
    **add: Any,
) -> tuple[int, dict[str, Any], str]:
    """``peer data show`` of a patient store holding ``records`` (added with ``add``)."""
    store = PatientStore(f"sqlite:///{tmp_path / 'data.db'}")
    store.create()
    store.add_records(records, **add)
    store.dispose()
    config = tmp_path / "store.toml"
    config.write_text(
        '[storage]\ndata = "sqlite:///data.db"\n\n[data]\nsource = "store"\n', encoding="utf-8"
    )
    return show(capsys, config)


def test_show_the_patient_store_through_a_data_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = breast_cancer_records(np.random.default_rng(0))
    code, shown, text = show_store(
        tmp_path, capsys, records, feature_names=breast_cancer_feature_names(), dataset_name="bc"
    )
    assert code == 0
    assert shown["name"] == "bc"
    assert len(shown["features"]) == 30
    assert shown["splits"]["train"]["records"] + shown["splits"]["test"]["records"] == 569
    assert "30 features" in text
    assert shown["target"] is None  # imported without --target
    assert "no label column" not in text  # a labelled store


def test_show_a_store_imported_without_a_label_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As `peer data import --target progression` (no --label) stores them: every label 0.
    records = [replace(r, label=0) for r in diabetes_records(np.random.default_rng(0))]
    code, shown, text = show_store(
        tmp_path, capsys, records, feature_names=diabetes_feature_names(), labelled=False
    )
    assert code == 0
    assert shown["notes"] == [NO_LABEL_NOTE]
    assert f"note: {NO_LABEL_NOTE}" in text.splitlines()


def test_show_the_stores_target_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = diabetes_records(np.random.default_rng(0))
    # Ten patients without a target: counted as missing, not hidden.
    records = [
        PatientRecord(r.patient_id, r.diagnosis, r.features, r.label, r.split, target=None)
        if i < 10
        else r
        for i, r in enumerate(records)
    ]
    code, shown, text = show_store(
        tmp_path, capsys, records, feature_names=diabetes_feature_names(), dataset_name="diabetes"
    )
    assert code == 0
    progression = [r.target for r in records if r.target is not None]
    target = shown["target"]
    assert (target["name"], target["count"], target["missing"]) == ("target", 432, 10)
    assert target["mean"] == pytest.approx(np.mean(progression))
    assert target["std"] == pytest.approx(np.std(progression))
    assert any(line.startswith("target (target)") for line in text.splitlines())


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('source = "ftp"', "'source' must be store, sql or images"),
        ('source = "images"\nfolder = "x"', "missing required key 'labels'"),
        ('source = "store"\nurl = "sqlite:///x.db"', "unknown key(s) url"),
        ('source = "store"\nsplit = { test_fraction = 0.5 }', "unknown key(s) split"),
        (
            'source = "images"\nfolder = "x"\nlabels = "x.csv"\nimage_size = [8, 8]\nchannels = 2',
            "channels must be 1 or 3",
        ),
    ],
)
def test_a_bad_data_table_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, message: str
) -> None:
    config = tmp_path / "x.toml"
    config.write_text(f"[data]\n{table}\n", encoding="utf-8")
    code = peer_main(["data", "show", "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith("peer: error: [data]")
    assert message in err[0]
