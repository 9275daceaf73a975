"""A hospital's local patient data: storage, import, bundled and synthetic data, splitting,
and the data sources a training payload reads (:class:`DataSource`: the patient store, a
read-only SQL query, an image folder).

Nothing in this package talks to other peers; the only cross-hospital computation it supports
(standardization) produces vectors that secure aggregation sums elsewhere.
"""

from __future__ import annotations

from .datasets import (
    BUNDLED_DATASET_NAME,
    breast_cancer_feature_names,
    breast_cancer_records,
    diabetes_feature_names,
    diabetes_records,
    synthetic_records,
)
from .errors import (
    CSVImportError,
    DataError,
    ImportIssue,
    ReadOnlyError,
    SchemaMismatchError,
    SourceError,
    SourceIssue,
    SplitError,
)
from .images import ImageFolderSource, ImageSourceConfig
from .importer import ImportReport, import_csv, stratified_split
from .records import Base, DatasetMeta, PatientRecord, PatientRow, Split
from .source import ColumnSummary, DataSetInfo, DataSource, hash_split
from .sources import DataFile, SourceConfigError, data_source, read_data_file
from .split import split_dataset, write_hospital_stores
from .sql import SQLSource, SQLSourceConfig, check_select_only, read_only_engine
from .stats import global_standardizer, local_feature_stats, standardize
from .store import PatientStore

__all__ = [
    "BUNDLED_DATASET_NAME",
    "Base",
    "CSVImportError",
    "ColumnSummary",
    "DataError",
    "DataFile",
    "DataSetInfo",
    "DataSource",
    "DatasetMeta",
    "ImageFolderSource",
    "ImageSourceConfig",
    "ImportIssue",
    "ImportReport",
    "PatientRecord",
    "PatientRow",
    "PatientStore",
    "ReadOnlyError",
    "SQLSource",
    "SQLSourceConfig",
    "SchemaMismatchError",
    "SourceConfigError",
    "SourceError",
    "SourceIssue",
    "Split",
    "SplitError",
    "breast_cancer_feature_names",
    "breast_cancer_records",
    "check_select_only",
    "data_source",
    "diabetes_feature_names",
    "diabetes_records",
    "global_standardizer",
    "hash_split",
    "import_csv",
    "local_feature_stats",
    "read_data_file",
    "read_only_engine",
    "split_dataset",
    "standardize",
    "stratified_split",
    "synthetic_records",
    "write_hospital_stores",
]
