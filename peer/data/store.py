"""A hospital's local patient database, behind one small class.

Any SQLAlchemy URL works (SQLite files by default, PostgreSQL in production); only portable
Core/ORM constructs are used. Writes happen in one transaction each, so a failed import leaves
the database exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, Select, create_engine, func, insert, inspect, null, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import DataError, SchemaMismatchError
from .records import (
    FEATURE_DTYPE,
    SPLITS,
    Base,
    DatasetLabels,
    DatasetMeta,
    PatientRecord,
    PatientRow,
    PatientTarget,
    Split,
)
from .source import NO_LABEL_NOTE, ColumnSummary, DataSetInfo, arrays_dataset, column_summaries

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["PatientStore"]

# Rows per INSERT statement batch: bounded so that a 100k-record import does not build one
# giant parameter list in memory, large enough that per-statement overhead is negligible.
_INSERT_CHUNK = 10_000


class PatientStore:
    """The patient records of one hospital, in a SQLAlchemy database (a
    :class:`~peer.data.DataSource`).

    Args:
        url: a SQLAlchemy database URL, e.g. ``"sqlite:///data/patients.db"`` or
            ``"postgresql+psycopg://user@host/hospital"``.
    """

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url)

    @property
    def url(self) -> str:
        """The database URL with any password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def create(self) -> None:
        """Create the tables if they do not exist (idempotent)."""
        Base.metadata.create_all(self.engine)

    def dispose(self) -> None:
        """Close every pooled connection (call before deleting a SQLite file)."""
        self.engine.dispose()

    # ------------------------------------------------------------------ writes

    def add_records(
        self,
        records: Iterable[PatientRecord],
        *,
        feature_names: Sequence[str] | None = None,
        dataset_name: str | None = None,
        labelled: bool = True,
    ) -> int:
        """Insert records in a single transaction: all of them or, on any error, none.

        The first write to an empty database also records the data set's metadata: its
        ``feature_names`` (default ``f0, f1, ...``) and ``dataset_name`` (default
        ``"unnamed"``). Later writes must match the stored feature count (and names, if
        given).

        ``labelled=False`` says the records' labels are placeholders (imported without a
        label column, for regression): the data set is then unlabelled for good
        (:meth:`has_labels`), whatever is added later.

        Returns:
            the number of records inserted.

        Raises:
            SchemaMismatchError: a record's feature count (or the given names) differ from
                the stored data set, or from each other.
            DataError: a patient id is duplicated (in ``records`` or already stored).
        """
        rows = []
        targets = []
        n_features: int | None = None
        for record in records:
            if n_features is None:
                n_features = record.features.shape[0]
            elif record.features.shape[0] != n_features:
                raise SchemaMismatchError(
                    f"patient {record.patient_id} has {record.features.shape[0]} features, "
                    f"the others have {n_features}"
                )
            rows.append(record.to_row())
            if record.target is not None:
                targets.append({"patient_id": record.patient_id, "target": float(record.target)})
        if n_features is None:
            return 0
        with Session(self.engine) as session, session.begin():
            meta = session.get(DatasetMeta, 1)
            if meta is None:
                names = list(feature_names) if feature_names is not None else None
                if names is None:
                    names = [f"f{i}" for i in range(n_features)]
                if len(names) != n_features:
                    raise SchemaMismatchError(
                        f"{len(names)} feature names given for {n_features} features"
                    )
                session.add(
                    DatasetMeta(
                        id=1,
                        name=dataset_name or "unnamed",
                        n_features=n_features,
                        feature_names=names,
                    )
                )
            else:
                if meta.n_features != n_features:
                    raise SchemaMismatchError(
                        f"records have {n_features} features but data set {meta.name!r} in "
                        f"{self.url} has {meta.n_features}"
                    )
                if feature_names is not None and list(feature_names) != meta.feature_names:
                    raise SchemaMismatchError(
                        f"feature names differ from those of data set {meta.name!r}"
                    )
            if not labelled:  # no row means labelled (records.py): only this is written
                session.merge(DatasetLabels(id=1, labelled=False))
            try:
                # A Core insert on the table (not the ORM entity) skips per-row ORM
                # bookkeeping: it halves the time of a 100k-record import.
                statement = insert(Base.metadata.tables[PatientRow.__tablename__])
                for start in range(0, len(rows), _INSERT_CHUNK):
                    session.execute(statement, rows[start : start + _INSERT_CHUNK])
                targets_table = insert(Base.metadata.tables[PatientTarget.__tablename__])
                for start in range(0, len(targets), _INSERT_CHUNK):
                    session.execute(targets_table, targets[start : start + _INSERT_CHUNK])
                session.flush()
            except IntegrityError as exc:
                raise DataError(
                    f"could not store records in {self.url}: duplicate patient id or invalid "
                    f"value ({exc.orig})"
                ) from exc
        return len(rows)

    # ------------------------------------------------------------------ reads

    def count(self, split: Split | None = None) -> int:
        """Number of stored records, optionally of one split only."""
        query = select(func.count()).select_from(PatientRow)
        if split is not None:
            query = query.where(PatientRow.split == _check_split(split))
        with Session(self.engine) as session:
            return int(session.execute(query).scalar_one())

    def load(self, split: Split) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Features and labels of one split, in insertion order.

        Returns:
            ``(features, labels)``: float32 array of shape (n, d) and int64 array of shape (n,).
        """
        query = (
            select(PatientRow.features, PatientRow.label)
            .where(PatientRow.split == _check_split(split))
            .order_by(PatientRow.id)
        )
        with Session(self.engine) as session:
            meta = session.get(DatasetMeta, 1)
            rows = session.execute(query).all()
        d = meta.n_features if meta is not None else 0
        if not rows:
            return np.zeros((0, d), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        assert meta is not None
        blob = b"".join(row[0] for row in rows)
        if len(blob) != len(rows) * d * FEATURE_DTYPE.itemsize:
            raise DataError(f"{self.url}: stored feature vectors do not all have {d} values")
        features = np.frombuffer(blob, dtype=FEATURE_DTYPE).reshape(len(rows), d)
        labels = np.fromiter((row[1] for row in rows), dtype=np.int64, count=len(rows))
        return features.astype(np.float32), labels

    def targets(self, split: Split) -> npt.NDArray[np.float64]:
        """The real-valued targets (regression) of one split, in the order of :meth:`load`.

        Raises:
            DataError: a record of the split has no target (the message names the column
                and the first patients concerned).
        """
        target, join = self._targets()
        query = (
            join(select(PatientRow.patient_id, target))
            .where(PatientRow.split == _check_split(split))
            .order_by(PatientRow.id)
        )
        with Session(self.engine) as session:
            rows = session.execute(query).all()
        missing = [patient for patient, target in rows if target is None]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(
                f"{self.url}: column 'target' is missing for {len(missing)} {split} record(s) "
                f"(patients {shown}); a regression session needs a target for every record"
            )
        return np.fromiter((row[1] for row in rows), dtype=np.float64, count=len(rows))

    def records(self, split: Split | None = None) -> list[PatientRecord]:
        """Every stored record (optionally of one split) as :class:`PatientRecord` objects."""
        target, join = self._targets()
        query = join(select(PatientRow, target)).order_by(PatientRow.id)
        if split is not None:
            query = query.where(PatientRow.split == _check_split(split))
        with Session(self.engine) as session:
            return [
                PatientRecord(
                    patient_id=row.patient_id,
                    diagnosis=row.diagnosis,
                    features=np.frombuffer(row.features, dtype=FEATURE_DTYPE).astype(np.float64),
                    label=row.label,
                    split=_check_split(row.split),
                    target=target,
                )
                for row, target in session.execute(query).all()
            ]

    def feature_names(self) -> list[str]:
        """The data set's feature names (empty before the first record is added)."""
        with Session(self.engine) as session:
            meta = session.get(DatasetMeta, 1)
            return list(meta.feature_names) if meta is not None else []

    def _targets(self) -> tuple[Any, Callable[[Select[Any]], Select[Any]]]:
        """Each patient row's target, for a query: the column and the outer join that adds
        it. A database created before regression targets has no ``patient_targets`` table
        (``create_all`` adds it only when the store is created again): there every target
        is NULL, so reading it works as for a store without targets."""
        if not inspect(self.engine).has_table(PatientTarget.__tablename__):
            return null().label("target"), lambda query: query
        return PatientTarget.target, lambda query: query.outerjoin(
            PatientTarget, PatientTarget.patient_id == PatientRow.patient_id
        )

    def has_labels(self) -> bool:
        """Whether the records carry labels: False once records were stored without a label
        column (``peer data import --target`` alone), whose class 0 is only a placeholder.

        A database without the ``dataset_labels`` table or its row counts as labelled: it
        was created before the table existed, when every import had a label column.
        """
        if not inspect(self.engine).has_table(DatasetLabels.__tablename__):
            return True
        with Session(self.engine) as session:
            row = session.get(DatasetLabels, 1)
            return row is None or row.labelled

    def dataset_name(self) -> str | None:
        """The data set's name, or None before the first record is added."""
        with Session(self.engine) as session:
            meta = session.get(DatasetMeta, 1)
            return meta.name if meta is not None else None

    def describe(self) -> DataSetInfo:
        """The data set's metadata: feature names, records per split and label, and
        per-column summaries (the :class:`~peer.data.DataSource` protocol)."""
        query = select(PatientRow.split, PatientRow.label, func.count()).group_by(
            PatientRow.split, PatientRow.label
        )
        with Session(self.engine) as session:
            counts: dict[Split, dict[int, int]] = {split: {} for split in SPLITS}
            for split, label, n in session.execute(query).all():
                counts[_check_split(split)][int(label)] = int(n)
        names = self.feature_names()
        features = np.concatenate([self.load(split)[0] for split in SPLITS])
        return DataSetInfo(
            kind="tabular",
            name=self.dataset_name() or "unnamed",
            location=self.url,
            label_counts=counts,
            # Class indices 0..K-1 (PatientRecord checks them); binary data sets are 0/1.
            label_names=tuple(
                str(c)
                for c in range(max([1, *(k for split in counts.values() for k in split)]) + 1)
            ),
            feature_names=tuple(names),
            columns=column_summaries(names, features, ["float"] * len(names)),
            target=self.target_summary(),
            notes=() if self.has_labels() else (NO_LABEL_NOTE,),
        )

    def target_summary(self) -> ColumnSummary | None:
        """The ``target`` column over every record (those without one count as missing);
        None if no record has a target (not a regression data set)."""
        target, join = self._targets()
        query = join(select(target).select_from(PatientRow))
        with Session(self.engine) as session:
            values = np.array(
                [np.nan if t is None else t for t in session.execute(query).scalars()],
                dtype=np.float64,
            )
        if np.isnan(values).all():  # also when there are no records
            return None
        return column_summaries(["target"], values[:, None], ["float"])[0]

    def tf_dataset(self, split: Split) -> tf.data.Dataset:
        """One split as an unbatched ``tf.data.Dataset`` of ``(features, label)``."""
        return arrays_dataset(*self.load(split))

    def diagnosis_counts(self) -> dict[str, int]:
        """Number of records per diagnosis (both splits)."""
        query = select(PatientRow.diagnosis, func.count()).group_by(PatientRow.diagnosis)
        with Session(self.engine) as session:
            return {diagnosis: int(n) for diagnosis, n in session.execute(query).all()}


def _check_split(split: str) -> Split:
    if split == "train":
        return "train"
    if split == "test":
        return "test"
    raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
