"""CSV import: validation names rows and columns, and a failed import changes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peer.data import CSVImportError, DataError, PatientStore, import_csv
from peer.data.source import NO_LABEL_NOTE


def _write(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path: Path) -> PatientStore:
    s = PatientStore(f"sqlite:///{tmp_path / 'p.db'}")
    s.create()
    return s


GOOD = """
pid,diagnosis,radius,texture,target
a1,M,17.9,10.3,1
a2,B,13.5,14.3,0
a3,M,20.5,17.7,1
a4,B,11.4,20.3,0
a5,B,12.1,18.0,0
"""


def test_good_csv_is_stored(tmp_path: Path, store: PatientStore) -> None:
    path = _write(tmp_path / "good.csv", GOOD)
    report = import_csv(
        store,
        path,
        label="target",
        id_col="pid",
        diagnosis_col="diagnosis",
        test_fraction=0.4,
        rng=np.random.default_rng(1),
    )
    assert report.n_records == 5
    assert report.feature_names == ["radius", "texture"]
    assert report.n_train + report.n_test == 5
    assert report.n_test == 2  # round(0.4 * 2) malignant + round(0.4 * 3) benign
    assert store.count() == 5
    assert store.feature_names() == ["radius", "texture"]
    assert store.diagnosis_counts() == {"M": 2, "B": 3}
    x_train, y_train = store.load("train")
    x_test, y_test = store.load("test")
    assert x_train.dtype == np.float32
    assert x_train.shape == (3, 2)
    assert sorted(np.concatenate([y_train, y_test]).tolist()) == [0, 0, 0, 1, 1]
    all_x = np.concatenate([x_train, x_test])
    assert np.float32(17.9) in all_x[:, 0]


def test_text_labels_with_two_known_values_map_malignant_to_one(
    tmp_path: Path, store: PatientStore
) -> None:
    text = GOOD.replace("target", "label_txt").replace(",1\n", ",M\n").replace(",0\n", ",B\n")
    text = text.replace(",1\n", ",M\n")
    path = _write(tmp_path / "mb.csv", text.replace("a5,B,12.1,18.0,0", "a5,B,12.1,18.0,B"))
    report = import_csv(
        store,
        path,
        label="label_txt",
        id_col="pid",
        diagnosis_col="diagnosis",
        rng=np.random.default_rng(0),
    )
    assert report.label_mapping == {"B": 0, "M": 1}


def test_unknown_text_label_pair_needs_positive_label(tmp_path: Path, store: PatientStore) -> None:
    path = _write(tmp_path / "xy.csv", "f,outcome\n1,alpha\n2,beta\n3,alpha\n")
    with pytest.raises(CSVImportError, match="pass positive_label"):
        import_csv(store, path, label="outcome", rng=np.random.default_rng(0))
    report = import_csv(
        store, path, label="outcome", positive_label="beta", rng=np.random.default_rng(0)
    )
    assert report.label_mapping == {"alpha": 0, "beta": 1}
    assert report.generated_ids
    assert store.count() == 3
    assert set(store.diagnosis_counts()) == {"alpha", "beta"}


def _assert_unchanged(store: PatientStore, before: int) -> None:
    assert store.count() == before


def test_missing_values_are_reported_with_line_and_column(
    tmp_path: Path, store: PatientStore
) -> None:
    import_csv(
        store,
        _write(tmp_path / "good.csv", GOOD),
        label="target",
        id_col="pid",
        diagnosis_col="diagnosis",
        rng=np.random.default_rng(0),
    )
    bad = GOOD.replace("a2,B,13.5,14.3,0", "b2,B,,14.3,0").replace(
        "a4,B,11.4,20.3,0", "b4,B,11.4,NA,0"
    )
    bad = bad.replace("a1,", "b1,").replace("a3,", "b3,").replace("a5,", "b5,")
    with pytest.raises(CSVImportError) as info:
        import_csv(
            store,
            _write(tmp_path / "bad.csv", bad),
            label="target",
            id_col="pid",
            diagnosis_col="diagnosis",
            rng=np.random.default_rng(0),
        )
    issues = {(i.line, i.column) for i in info.value.issues}
    assert issues == {(3, "radius"), (5, "texture")}
    assert "line 3, column 'radius': missing value" in str(info.value)
    _assert_unchanged(store, 5)


def test_text_feature_column_is_named(tmp_path: Path, store: PatientStore) -> None:
    text = "pid,site,radius,target\np1,left,1.0,1\np2,right,2.0,0\n"
    with pytest.raises(CSVImportError, match="'site': is not numeric") as info:
        import_csv(
            store,
            _write(tmp_path / "t.csv", text),
            label="target",
            id_col="pid",
            rng=np.random.default_rng(0),
        )
    assert [i.column for i in info.value.issues] == ["site"]
    _assert_unchanged(store, 0)
    # Excluding the column makes the same file importable.
    report = import_csv(
        store,
        tmp_path / "t.csv",
        label="target",
        id_col="pid",
        feature_cols=["radius"],
        rng=np.random.default_rng(0),
    )
    assert report.n_records == 2


def test_wrong_label_column(tmp_path: Path, store: PatientStore) -> None:
    path = _write(tmp_path / "good.csv", GOOD)
    with pytest.raises(CSVImportError, match="label column not found") as info:
        import_csv(store, path, label="outcome", id_col="pid", rng=np.random.default_rng(0))
    assert "'target'" in str(info.value)  # lists the available columns
    _assert_unchanged(store, 0)


def test_non_binary_numeric_label(tmp_path: Path, store: PatientStore) -> None:
    path = _write(tmp_path / "l.csv", "f,target\n1,0\n2,2\n3,1\n")
    with pytest.raises(CSVImportError, match="line 3, column 'target': numeric label must be"):
        import_csv(store, path, label="target", rng=np.random.default_rng(0))
    _assert_unchanged(store, 0)


def test_duplicate_ids_in_file_and_in_database(tmp_path: Path, store: PatientStore) -> None:
    dup = GOOD.replace("a3,", "a1,")
    with pytest.raises(CSVImportError, match="duplicate patient id 'a1'"):
        import_csv(
            store,
            _write(tmp_path / "d.csv", dup),
            label="target",
            id_col="pid",
            diagnosis_col="diagnosis",
            rng=np.random.default_rng(0),
        )
    path = _write(tmp_path / "good.csv", GOOD)
    import_csv(
        store,
        path,
        label="target",
        id_col="pid",
        diagnosis_col="diagnosis",
        rng=np.random.default_rng(0),
    )
    # Importing the same file again clashes with stored ids: the transaction rolls back whole.
    with pytest.raises(DataError, match="duplicate patient id"):
        import_csv(
            store,
            path,
            label="target",
            id_col="pid",
            diagnosis_col="diagnosis",
            rng=np.random.default_rng(0),
        )
    _assert_unchanged(store, 5)


def test_class_indices_are_imported_and_bad_ones_named(tmp_path: Path, store: PatientStore) -> None:
    bad = _write(tmp_path / "bad.csv", "f,stage\n1,0\n2,3\n3,1.5\n4,severe\n5,2\n")
    with pytest.raises(CSVImportError) as info:
        import_csv(store, bad, label="stage", classes=3, rng=np.random.default_rng(0))
    message = str(info.value)
    assert "line 3, column 'stage': class label must be an integer 0..2: '3'" in message
    assert "line 4, column 'stage': class label must be an integer 0..2: '1.5'" in message
    assert "line 5, column 'stage': class label must be an integer 0..2: 'severe'" in message
    _assert_unchanged(store, 0)
    good = _write(tmp_path / "good.csv", "f,stage\n1,0\n2,2\n3,1\n4,2\n5,0\n6,1\n")
    import_csv(store, good, label="stage", classes=3, rng=np.random.default_rng(0))
    assert sorted(r.label for r in store.records()) == [0, 0, 1, 1, 2, 2]


def test_regression_targets_are_imported_and_bad_ones_named(
    tmp_path: Path, store: PatientStore
) -> None:
    bad = _write(tmp_path / "bad.csv", "f,los\n1,3.5\n2,\n3,abc\n4,inf\n")
    with pytest.raises(CSVImportError) as info:
        import_csv(store, bad, label=None, target_col="los", rng=np.random.default_rng(0))
    message = str(info.value)
    assert "line 3, column 'los': missing target: ''" in message
    assert "line 4, column 'los': target must be a number: 'abc'" in message
    assert "line 5, column 'los': target must be a number: 'inf'" in message
    _assert_unchanged(store, 0)
    good = _write(tmp_path / "good.csv", "f,los\n1,3.5\n2,10\n3,0.25\n4,7\n5,1\n")
    import_csv(store, good, label=None, target_col="los", rng=np.random.default_rng(0))
    records = store.records()
    assert sorted(r.target for r in records if r.target is not None) == [0.25, 1, 3.5, 7, 10]
    assert store.feature_names() == ["f"]  # the target is not a feature
    assert {r.diagnosis for r in records} == {"unlabelled"}


def test_a_store_remembers_an_import_without_labels(tmp_path: Path, store: PatientStore) -> None:
    """Records imported with a target and no label column all have class 0: the store says
    it has no labels (so that classification sessions are refused), and keeps saying so
    when labelled records are added later (the first ones' 0 is still a placeholder)."""
    labelled = _write(tmp_path / "labelled.csv", "pid,f,y\np1,1,0\np2,2,1\np3,3,1\n")
    import_csv(store, labelled, label="y", id_col="pid", rng=np.random.default_rng(0))
    assert store.has_labels()
    assert store.describe().notes == ()
    regression = _write(tmp_path / "los.csv", "pid,f,los\nq1,1,3.5\nq2,2,10\nq3,3,7\n")
    import_csv(
        store, regression, None, id_col="pid", target_col="los", rng=np.random.default_rng(0)
    )
    assert not store.has_labels()
    assert store.describe().notes == (NO_LABEL_NOTE,)
    more = _write(tmp_path / "more.csv", "pid,f,y\nr1,1,0\nr2,2,1\n")
    import_csv(store, more, label="y", id_col="pid", rng=np.random.default_rng(0))
    assert not store.has_labels()
    # Durably: in the database, not in the object.
    assert not PatientStore(f"sqlite:///{tmp_path / 'p.db'}").has_labels()
