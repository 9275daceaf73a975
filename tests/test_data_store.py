"""Patient store, bundled and synthetic data, hospital splits, federated standardization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peer.data import (
    DataError,
    PatientRecord,
    PatientStore,
    SchemaMismatchError,
    SplitError,
    breast_cancer_feature_names,
    breast_cancer_records,
    global_standardizer,
    local_feature_stats,
    split_dataset,
    synthetic_records,
    write_hospital_stores,
)
from peer.data.records import Base


def test_bundled_records_label_malignant_as_one() -> None:
    records = breast_cancer_records(np.random.default_rng(0))
    assert len(records) == 569
    assert {r.features.shape for r in records} == {(30,)}
    malignant = [r for r in records if r.label == 1]
    assert len(malignant) == 212
    assert {r.diagnosis for r in malignant} == {"malignant"}
    assert sum(r.split == "test" for r in records) == round(0.2 * 212) + round(0.2 * 357)


def test_store_round_trip_and_schema_check(tmp_path: Path) -> None:
    store = PatientStore(f"sqlite:///{tmp_path / 'h.db'}")
    store.create()
    records = synthetic_records(50, 4, np.random.default_rng(3))
    assert store.add_records(records, dataset_name="syn") == 50
    x, y = store.load("train")
    train = [r for r in records if r.split == "train"]
    np.testing.assert_array_equal(x, np.stack([r.features for r in train]).astype(np.float32))
    np.testing.assert_array_equal(y, [r.label for r in train])
    assert store.records()[0].features.tolist() == records[0].features.tolist()
    assert store.dataset_name() == "syn"
    assert store.feature_names() == ["f0", "f1", "f2", "f3"]
    wrong = PatientRecord("other", "x", np.zeros(5), 0, "train")
    with pytest.raises(SchemaMismatchError, match="5 features"):
        store.add_records([wrong])
    assert store.count() == 50


def _ids(parts: list[list[PatientRecord]]) -> list[str]:
    return [r.patient_id for part in parts for r in part]


@pytest.mark.parametrize("mode", ["iid", "dirichlet"])
def test_split_is_a_disjoint_partition(mode: str) -> None:
    records = breast_cancer_records(np.random.default_rng(0))
    parts = split_dataset(records, 3, mode, alpha=0.5, rng=np.random.default_rng(5))  # type: ignore[arg-type]
    ids = _ids(parts)
    assert len(ids) == len(set(ids)) == 569
    assert all(sum(r.split == "train" for r in p) >= 10 for p in parts)
    assert all(sum(r.split == "test" for r in p) >= 5 for p in parts)


def test_dirichlet_split_is_skewed_and_iid_is_not() -> None:
    records = breast_cancer_records(np.random.default_rng(0))
    overall = np.mean([r.label for r in records])

    def max_skew(parts: list[list[PatientRecord]]) -> float:
        return float(max(abs(np.mean([r.label for r in p]) - overall) for p in parts))

    iid = [
        max_skew(split_dataset(records, 3, "iid", rng=np.random.default_rng(s))) for s in range(5)
    ]
    non_iid = [
        max_skew(split_dataset(records, 3, "dirichlet", alpha=0.3, rng=np.random.default_rng(s)))
        for s in range(5)
    ]
    assert max(iid) < 0.08
    assert np.mean(non_iid) > 0.2


def test_split_impossible_minimum_is_a_clear_error() -> None:
    records = synthetic_records(40, 3, np.random.default_rng(0))
    with pytest.raises(SplitError, match="cannot give 5 hospitals at least 10"):
        split_dataset(records, 5, "iid", rng=np.random.default_rng(0))


def test_write_hospital_stores(tmp_path: Path) -> None:
    records = breast_cancer_records(np.random.default_rng(0))
    parts = split_dataset(records, 3, "dirichlet", rng=np.random.default_rng(1))
    stores = write_hospital_stores(
        parts, tmp_path, feature_names=breast_cancer_feature_names(), dataset_name="wdbc"
    )
    assert [s.count() for s in stores] == [len(p) for p in parts]
    assert stores[0].feature_names()[0] == "mean radius"


def test_federated_standardizer_equals_pooled_statistics() -> None:
    rng = np.random.default_rng(2)
    parts = [rng.normal(5.0, 3.0, size=(n, 4)) for n in (10, 50, 7)]
    total = np.sum([local_feature_stats(p) for p in parts], axis=0)
    mean, std = global_standardizer(total, 4)
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pooled.std(axis=0), rtol=1e-10)
    with pytest.raises(ValueError, match="length 9"):
        global_standardizer(total[:-1], 4)


def test_a_store_created_before_targets_and_label_flags_still_reads(tmp_path: Path) -> None:
    """The oldest stores have only ``patients`` and ``dataset_meta`` (``create_all`` never
    alters an existing database; the later tables appear only when it runs again): every
    read works, as for a store whose records have no target, and the store is labelled."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = PatientStore(url)
    oldest = [Base.metadata.tables[name] for name in ("patients", "dataset_meta")]
    Base.metadata.create_all(store.engine, tables=oldest)
    store.add_records(breast_cancer_records(np.random.default_rng(0))[:40])
    assert [r.target for r in store.records()] == [None] * 40
    assert store.target_summary() is None
    info = store.describe()
    assert (info.count(), info.target, info.notes) == (40, None, ())
    assert store.has_labels()
    with pytest.raises(DataError, match="column 'target' is missing for"):
        store.targets("train")
