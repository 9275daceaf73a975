"""The patient record, as plain data, and the SQLAlchemy tables that store it.

Storage choice for the feature vector: a little-endian float64 blob (``LargeBinary``), not a
JSON list. It round-trips every value bit-exactly (JSON would depend on the float formatting
of each database driver), it is 2-3x smaller than the JSON text, and loading a whole split is a
single ``numpy.frombuffer`` over the concatenated blobs instead of parsing 30 numbers per row
in Python: that is what makes 100,000-record hospitals practical. ``LargeBinary`` maps to
BLOB on SQLite and BYTEA on PostgreSQL, so no backend-specific SQL is needed. The vector length
is recorded once in :class:`DatasetMeta` and checked on every write and read.

Labels: ``label`` is a class index (0/1 for the binary task, ``0..K-1`` for a K-class one).
A real-valued outcome for regression sessions is the optional ``target``, kept in its own
table (:class:`PatientTarget`) so that databases created before it existed keep working: the
table is simply created next to them, and a record without a target is reported by name when
a regression session needs one.

Whether the records carry labels at all is kept in :class:`DatasetLabels`, again its own table
for the same reason. A data set imported with a target and no label column gives every record
class 0: it can train regression sessions, and a classification session must be refused
rather than "learn" that constant. No row there means labelled: only a write without labels
stores one, and every database created before the table existed has none and is labelled
(until regression targets existed, every import had a label column).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "FEATURE_DTYPE",
    "Base",
    "DatasetLabels",
    "DatasetMeta",
    "PatientRecord",
    "PatientRow",
    "PatientTarget",
    "Split",
]

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")

# Explicit byte order so that a database copied between machines reads back identically.
FEATURE_DTYPE = np.dtype("<f8")


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """One patient: the shape of the original article's records plus a train/test split.

    Attributes:
        patient_id: the hospital's identifier, unique within one database.
        diagnosis: human-readable diagnosis (e.g. ``"malignant"``).
        features: the numeric feature vector (stored as float64).
        label: the class index: 1 for the positive class (the disease) of a binary task,
            ``0..K-1`` for a K-class one.
        split: ``"train"`` or ``"test"``.
        target: the real-valued outcome for regression sessions (e.g. a lab value), if any.
    """

    patient_id: str
    diagnosis: str
    features: npt.NDArray[np.float64] = field(repr=False)
    label: int
    split: Split
    target: float | None = None

    def __post_init__(self) -> None:
        if not self.patient_id:
            raise ValueError("patient_id must be a non-empty string")
        if (
            isinstance(self.label, bool)
            or not isinstance(self.label, int | np.integer)
            or self.label < 0
        ):
            raise ValueError(
                f"patient {self.patient_id}: label must be a class index 0, 1, ..., "
                f"not {self.label!r}"
            )
        if self.target is not None and not np.isfinite(self.target):
            raise ValueError(
                f"patient {self.patient_id}: target must be a finite number, not {self.target!r}"
            )
        if self.split not in SPLITS:
            raise ValueError(
                f"patient {self.patient_id}: split must be 'train' or 'test', not {self.split!r}"
            )
        features = np.asarray(self.features, dtype=np.float64)
        if features.ndim != 1:
            raise ValueError(f"patient {self.patient_id}: features must be a 1-d vector")
        if not np.all(np.isfinite(features)):
            raise ValueError(f"patient {self.patient_id}: features contain NaN or infinity")
        object.__setattr__(self, "features", features)

    def to_row(self) -> dict[str, Any]:
        """The column values for a bulk ``insert(PatientRow)``."""
        return {
            "patient_id": self.patient_id,
            "diagnosis": self.diagnosis,
            "features": self.features.astype(FEATURE_DTYPE, copy=False).tobytes(),
            "label": self.label,
            "split": self.split,
        }


class Base(DeclarativeBase):
    """Declarative base of the patient-data tables (separate from the ledger's tables)."""


class PatientRow(Base):
    """A stored patient record."""

    __tablename__ = "patients"
    __table_args__ = (
        # Class indices. Databases created before multi-class sessions keep their original
        # constraint (label IN (0, 1)) and accept binary labels only.
        CheckConstraint("label >= 0", name="ck_patients_label_class"),
        CheckConstraint("split IN ('train', 'test')", name="ck_patients_split"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    diagnosis: Mapped[str] = mapped_column(String(128), nullable=False)
    features: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    label: Mapped[int] = mapped_column(Integer, nullable=False)
    split: Mapped[str] = mapped_column(String(5), nullable=False, index=True)


class PatientTarget(Base):
    """The real-valued outcome of a patient, for regression sessions."""

    __tablename__ = "patient_targets"

    patient_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("patients.patient_id"), primary_key=True
    )
    target: Mapped[float] = mapped_column(Float, nullable=False)


class DatasetMeta(Base):
    """The single row describing the data set held by this database."""

    __tablename__ = "dataset_meta"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), nullable=False)
    n_features: Mapped[int] = mapped_column(Integer, nullable=False)
    feature_names: Mapped[list[str]] = mapped_column(JSON, nullable=False)


class DatasetLabels(Base):
    """Whether the data set's records carry labels (at most one row; none means labelled).

    ``labelled`` is False once any records were stored without a label column (a
    regression-only import): their class 0 is a placeholder, not an outcome, so the data set
    as a whole stays unlabelled even if labelled records are added later.
    """

    __tablename__ = "dataset_labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    labelled: Mapped[bool] = mapped_column(Boolean, nullable=False)
