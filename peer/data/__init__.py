"""A hospital's local patient data: storage, import, bundled and synthetic data, splitting.

Nothing in this package talks to other peers; the only cross-hospital computation it supports
(standardization) produces vectors that secure aggregation sums elsewhere.
"""

from __future__ import annotations

from .datasets import (
    BUNDLED_DATASET_NAME,
    breast_cancer_feature_names,
    breast_cancer_records,
    synthetic_records,
)
from .errors import CSVImportError, DataError, ImportIssue, SchemaMismatchError, SplitError
from .importer import ImportReport, import_csv, stratified_split
from .records import Base, DatasetMeta, PatientRecord, PatientRow, Split
from .split import split_dataset, write_hospital_stores
from .stats import global_standardizer, local_feature_stats, standardize
from .store import PatientStore

__all__ = [
    "BUNDLED_DATASET_NAME",
    "Base",
    "CSVImportError",
    "DataError",
    "DatasetMeta",
    "ImportIssue",
    "ImportReport",
    "PatientRecord",
    "PatientRow",
    "PatientStore",
    "SchemaMismatchError",
    "Split",
    "SplitError",
    "breast_cancer_feature_names",
    "breast_cancer_records",
    "global_standardizer",
    "import_csv",
    "local_feature_stats",
    "split_dataset",
    "standardize",
    "stratified_split",
    "synthetic_records",
    "write_hospital_stores",
]
