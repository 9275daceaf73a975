"""Training records read where they live: one read-only SQL query over any SQLAlchemy URL.

A site points its peer at its own database (an OMOP CDM instance, a research warehouse...)
with a query that yields one row per patient: an id column, feature columns and a label
column, a real-valued target column (regression), or both (see :class:`SQLSourceConfig`).
Nothing is used before every column is checked: the types found, missing values, labels
outside the declared classes, targets that are not finite numbers, duplicate ids, columns that
the query does not yield -- each reported with the column (and the patients) it concerns
(:class:`SourceError`).

The database is never written, by three independent layers (any one suffices for SQLite and
PostgreSQL; together they also give clear errors):

1. The query text must be one SELECT (or WITH ... SELECT) statement: comments, string
   literals and quoted identifiers are skipped, then a second statement or a writing keyword
   (INSERT, UPDATE, DELETE, CREATE, INTO, ATTACH, PRAGMA...) is refused before connecting.
   This check alone is not the guarantee: a PostgreSQL function called from a SELECT may write.
2. The connection is read-only: SQLite is opened with the ``mode=ro`` URI (the file cannot be
   written through this handle) plus ``PRAGMA query_only``; PostgreSQL sessions start with
   ``default_transaction_read_only`` and each transaction is ``SET TRANSACTION READ ONLY`` and
   checked with ``SHOW transaction_read_only`` before the query runs. Other dialects are
   refused: read-only cannot be enforced for them here.
3. The transaction is always rolled back, never committed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from .errors import DataError, SourceError, SourceIssue
from .records import SPLITS, Split
from .source import (
    NO_LABEL_NOTE,
    ColumnSummary,
    DataSetInfo,
    arrays_dataset,
    column_summaries,
    hash_split,
)
from .sql_readonly import begin_read_only, check_select_only, read_only_engine

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["SQLSource", "SQLSourceConfig", "check_select_only", "read_only_engine"]

MissingPolicy = Literal["refuse", "drop"]

# Problems listed per column before "... and N more": enough to see the pattern.
_MAX_ISSUES_PER_COLUMN = 5
_FETCH_CHUNK = 10_000


@dataclass(frozen=True, slots=True)
class SQLSourceConfig:
    """What a site declares to read its records with a query (the ``[data]`` TOML table).

    Attributes:
        url: a SQLAlchemy URL (``sqlite:///omop.db``, ``postgresql+psycopg://reader@db/omop``).
        query: one SELECT statement yielding one row per patient.
        id_column: the patient id column (unique, never NULL).
        feature_columns: numeric feature columns, in the order of the feature vector.
        label_column: the label column; None only with a ``target_column`` (a regression-only
            data set: every record then has class 0, as in the patient store).
        target_column: a numeric column holding each patient's real-valued outcome, what a
            regression session trains on (:meth:`SQLSource.targets`); None if there is none.
        classes: the label values in class-index order (e.g. ``("no", "yes")``); if None,
            labels must be integers 0..k-1.
        split_column: a column holding ``'train'``/``'test'``; if None, the split is derived
            from the patient id (:func:`~peer.data.hash_split`) with ``test_fraction``.
        test_fraction: share of patients kept for testing when there is no split column.
        split_salt: changes the derived split (the same salt gives the same split).
        missing: ``"refuse"`` (default: any NULL feature or target is an error) or ``"drop"``
            (patients with a NULL feature or target are left out, and counted per column).
        max_rows: more rows than this is an error (bounds this peer's memory).
        name: the data set's name shown by ``peer data show``.
    """

    url: str
    query: str
    id_column: str
    feature_columns: tuple[str, ...]
    label_column: str | None = None
    target_column: str | None = None
    classes: tuple[str, ...] | None = None
    split_column: str | None = None
    test_fraction: float = 0.2
    split_salt: str = ""
    missing: MissingPolicy = "refuse"
    max_rows: int = 1_000_000
    name: str = "sql"

    def __post_init__(self) -> None:
        if not self.feature_columns:
            raise ValueError("a SQL source needs at least one feature column")
        if self.label_column is None and self.target_column is None:
            raise ValueError("a SQL source needs a label column, a target column, or both")
        if self.label_column is None and self.classes is not None:
            raise ValueError("classes name the values of a label column, and there is none")
        if self.target_column is not None and self.target_column in self.feature_columns:
            # The model would be given the outcome it is asked to predict.
            raise ValueError(f"target column {self.target_column!r} is also a feature column")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), not {self.test_fraction}")
        if self.missing not in ("refuse", "drop"):
            raise ValueError(f"missing must be 'refuse' or 'drop', not {self.missing!r}")
        if self.classes is not None and len(set(self.classes)) < 2:
            raise ValueError("classes must name at least two distinct label values")


# --------------------------------------------------------------------------- validation


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, Decimal):
        return "decimal"
    return type(value).__name__


@dataclass
class _Checked:
    """A query's rows, checked: inputs, labels, targets, splits and what was found per column."""

    features: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int64]
    targets: npt.NDArray[np.float64] | None
    splits: list[Split]
    label_names: tuple[str, ...] | None
    columns: tuple[ColumnSummary, ...]
    target: ColumnSummary | None
    notes: list[str] = field(default_factory=list)


class _IssueList:
    """Issues per subject, at most a few of each kind listed."""

    def __init__(self) -> None:
        self.issues: list[SourceIssue] = []
        self._per_subject: Counter[str] = Counter()

    def add(self, subject: str | None, message: str) -> None:
        key = subject or ""
        self._per_subject[key] += 1
        if self._per_subject[key] <= _MAX_ISSUES_PER_COLUMN:
            self.issues.append(SourceIssue(subject, message))

    def finish(self) -> list[SourceIssue]:
        for subject, n in self._per_subject.items():
            if n > _MAX_ISSUES_PER_COLUMN:
                self.issues.append(
                    SourceIssue(subject or None, f"... and {n - _MAX_ISSUES_PER_COLUMN} more")
                )
        return self.issues


def _patients(ids: Sequence[Any]) -> str:
    """The first few patient ids of a list, for a message."""
    shown = ", ".join(repr(pid) for pid in ids[:_MAX_ISSUES_PER_COLUMN])
    return shown + (", ..." if len(ids) > _MAX_ISSUES_PER_COLUMN else "")


def _numeric_column(
    config: SQLSourceConfig,
    rows: Sequence[Sequence[Any]],
    at: int,
    id_at: int,
    subject: str,
    issues: _IssueList,
    notes: list[str],
) -> tuple[npt.NDArray[np.float64], str]:
    """One feature or target column checked value by value: the numbers (NaN where missing)
    and the types found. A text value or an infinite one is an issue naming the patient;
    missing values (NULL, or a NaN the database holds) are an issue under ``missing =
    "refuse"`` and a note under ``"drop"``."""
    n = len(rows)
    values = np.full(n, np.nan, dtype=np.float64)
    found: Counter[str] = Counter()
    missing: list[Any] = []
    for r, row in enumerate(rows):
        value = row[at]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            missing.append(row[id_at])
            continue
        kind = _kind_of(value)
        found[kind] += 1
        if kind not in ("boolean", "integer", "float", "decimal"):
            issues.add(
                subject,
                f"holds {kind} values, not numbers (patient {row[id_at]!r}): CAST or "
                "derive a number in the query",
            )
            continue
        number = float(value)
        if not math.isfinite(number):
            issues.add(subject, f"{number} is not a finite number (patient {row[id_at]!r})")
            continue
        values[r] = number
    if missing and config.missing == "refuse":
        issues.add(
            subject,
            f"{len(missing)} of {n} values are missing (NULL) (patients {_patients(missing)}); "
            'fill them in the query (e.g. COALESCE) or set missing = "drop"',
        )
    elif missing:
        notes.append(f"{subject}: {len(missing)} of {n} values missing")
    return values, "/".join(sorted(found)) or "empty"


def _check_rows(
    config: SQLSourceConfig, keys: Sequence[str], rows: Sequence[Sequence[Any]]
) -> tuple[_Checked | None, list[SourceIssue]]:
    issues = _IssueList()
    index: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in index:
            issues.add(f"column {key!r}", "the query yields this column twice")
        index[key] = i
    roles = [("id", config.id_column)]
    if config.label_column is not None:
        roles.append(("label", config.label_column))
    if config.target_column is not None:
        roles.append(("target", config.target_column))
    roles += [("feature", name) for name in config.feature_columns]
    if config.split_column is not None:
        roles.append(("split", config.split_column))
    available = ", ".join(repr(k) for k in keys)
    for role, name in roles:
        if name not in index:
            issues.add(
                f"column {name!r}",
                f"{role} column not yielded by the query (it yields: {available})",
            )
    if issues.issues:
        return None, issues.finish()
    notes = [
        f"column {key!r} is not used (no role in the configuration)"
        for key in keys
        if key not in {name for _, name in roles}
    ]

    id_at = index[config.id_column]
    seen_ids: dict[str, int] = {}
    for row in rows:
        pid = row[id_at]
        if pid is None:
            issues.add(f"column {config.id_column!r}", "a patient id is NULL")
            continue
        seen_ids[str(pid)] = seen_ids.get(str(pid), 0) + 1
    for pid, n in seen_ids.items():
        if n > 1:
            issues.add(f"column {config.id_column!r}", f"patient id {pid!r} occurs {n} times")

    n, d = len(rows), len(config.feature_columns)
    features = np.full((n, d), np.nan, dtype=np.float64)
    kinds: list[str] = []
    for j, name in enumerate(config.feature_columns):
        features[:, j], kind = _numeric_column(
            config, rows, index[name], id_at, f"column {name!r}", issues, notes
        )
        kinds.append(kind)
    targets: npt.NDArray[np.float64] | None = None
    target_kind = ""
    if config.target_column is not None:
        targets, target_kind = _numeric_column(
            config,
            rows,
            index[config.target_column],
            id_at,
            f"column {config.target_column!r}",
            issues,
            notes,
        )

    label_names, labels = _check_labels(config, rows, index, id_at, issues)
    splits = _splits(config, rows, index, id_at, issues)
    if issues.issues:
        return None, issues.finish()

    # Summaries over every row (a dropped patient counts as missing in its column).
    columns = column_summaries(config.feature_columns, features, kinds)
    target = None
    # Without issues, a NaN is a missing value that missing = "drop" leaves out.
    keep = np.asarray(~np.isnan(features).any(axis=1), dtype=np.bool_)
    if targets is not None and config.target_column is not None:
        target = column_summaries([config.target_column], targets[:, None], [target_kind])[0]
        keep &= np.asarray(~np.isnan(targets), dtype=np.bool_)
    if not keep.all():
        what = "feature or target" if targets is not None else "feature"
        notes.append(f"{int((~keep).sum())} of {n} patients dropped for a missing {what}")
    if config.label_column is None:
        notes.append(NO_LABEL_NOTE)
    checked = _Checked(
        features=features[keep],
        labels=labels[keep],
        targets=None if targets is None else targets[keep],
        splits=[s for s, k in zip(splits, keep, strict=True) if k],
        label_names=label_names,
        columns=columns,
        target=target,
        notes=notes,
    )
    present_classes = set(checked.labels.tolist())
    if config.label_column is not None and len(present_classes) < 2:
        problem = f"only {len(present_classes)} class among the usable patients: nothing to learn"
        if config.target_column is None:
            issues.add(f"column {config.label_column!r}", problem)
            return None, issues.finish()
        # The targets are still worth a regression session: say so, do not refuse.
        checked.notes.append(f"column {config.label_column!r}: {problem} (as a label)")
    return checked, []


def _check_labels(
    config: SQLSourceConfig,
    rows: Sequence[Sequence[Any]],
    index: dict[str, int],
    id_at: int,
    issues: _IssueList,
) -> tuple[tuple[str, ...] | None, npt.NDArray[np.int64]]:
    labels = np.zeros(len(rows), dtype=np.int64)
    if config.label_column is None:  # a regression-only data set: class 0 throughout
        return None, labels
    at, subject = index[config.label_column], f"column {config.label_column!r}"
    if config.classes is not None:
        position = {value: i for i, value in enumerate(config.classes)}
        for r, row in enumerate(rows):
            value = row[at]
            # Compare as text so that classes = ["0", "1"] matches integer labels too.
            key = None if value is None else str(int(value) if _is_integral(value) else value)
            if key is None or key not in position:
                issues.add(
                    subject,
                    f"label {value!r} of patient {row[id_at]!r} is not one of the declared "
                    f"classes {list(config.classes)}",
                )
                continue
            labels[r] = position[key]
        return config.classes, labels
    for r, row in enumerate(rows):
        value = row[at]
        if not _is_integral(value) or int(value) < 0:
            issues.add(
                subject,
                f"label {value!r} of patient {row[id_at]!r} is not a class index 0, 1, ...; "
                "declare the label values with classes = [...]",
            )
            continue
        labels[r] = int(value)
    k = int(labels.max()) + 1 if len(labels) else 0
    return tuple(str(i) for i in range(k)), labels


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool | int):
        return True
    if isinstance(value, float | Decimal):
        return math.isfinite(value) and float(value).is_integer()
    return False


def _splits(
    config: SQLSourceConfig,
    rows: Sequence[Sequence[Any]],
    index: dict[str, int],
    id_at: int,
    issues: _IssueList,
) -> list[Split]:
    if config.split_column is None:
        return [
            hash_split(str(row[id_at]), config.test_fraction, config.split_salt) for row in rows
        ]
    at, subject = index[config.split_column], f"column {config.split_column!r}"
    splits: list[Split] = []
    for row in rows:
        value = row[at]
        if value == "train" or value == "test":
            splits.append(value)
        else:
            issues.add(subject, f"split {value!r} of patient {row[id_at]!r} is not 'train'/'test'")
            splits.append("train")
    return splits


# --------------------------------------------------------------------------- the source


class SQLSource:
    """A :class:`~peer.data.DataSource` over one read-only query (see the module header).

    The query runs once, on the first call that needs it; every later call uses that result.

    Raises (from ``describe``, ``load``, ``tf_dataset``):
        ReadOnlyError: the query or the database cannot be made read-only; nothing ran.
        SourceError: the query failed, or its columns have problems (each one listed).
    """

    def __init__(self, config: SQLSourceConfig) -> None:
        self.config = config
        self._checked: _Checked | None = None

    @property
    def location(self) -> str:
        try:
            return make_url(self.config.url).render_as_string(hide_password=True)
        except ArgumentError:
            return "(invalid URL)"

    def _rows(self) -> tuple[list[str], list[Sequence[Any]]]:
        check_select_only(self.config.query)
        engine = read_only_engine(self.config.url)
        where = self.location
        driver_error = engine.dialect.loaded_dbapi.Error
        try:
            with engine.connect() as connection:
                try:
                    begin_read_only(connection, where)
                    return self._fetch(connection, where)
                finally:
                    connection.rollback()
        except (SQLAlchemyError, driver_error) as error:
            detail = " ".join(str(getattr(error, "orig", None) or error).split())
            raise SourceError(where, [SourceIssue(None, f"the query failed: {detail}")]) from None
        finally:
            engine.dispose()

    def _fetch(self, connection: Connection, where: str) -> tuple[list[str], list[Sequence[Any]]]:
        """Run the query on the driver's cursor as one statement, enforced by the database
        (independently of :func:`check_select_only`): sqlite3 refuses a second statement,
        and psycopg's ``prepare=True`` uses PostgreSQL's extended query protocol, in which
        the server refuses a second statement. The text is sent as written (no parameter
        or ``:name`` processing)."""
        # Any: psycopg's execute takes prepare=, beyond the DBAPI interface SQLAlchemy types.
        cursor: Any = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            if connection.dialect.name == "postgresql":
                cursor.execute(self.config.query, prepare=True)
            else:
                cursor.execute(self.config.query)
            keys = [str(column[0]) for column in cursor.description or ()]
            rows: list[Sequence[Any]] = []
            while chunk := cursor.fetchmany(_FETCH_CHUNK):
                rows.extend(tuple(row) for row in chunk)
                if len(rows) > self.config.max_rows:
                    raise SourceError(
                        where,
                        [
                            SourceIssue(
                                None,
                                f"the query yields more than max_rows = "
                                f"{self.config.max_rows} rows",
                            )
                        ],
                    )
            return keys, rows
        finally:
            cursor.close()

    def _data(self) -> _Checked:
        if self._checked is None:
            keys, rows = self._rows()
            checked, issues = _check_rows(self.config, keys, rows)
            if checked is None:
                raise SourceError(self.location, issues)
            self._checked = checked
        return self._checked

    def describe(self) -> DataSetInfo:
        data = self._data()
        counts: dict[Split, dict[int, int]] = {}
        for split in SPLITS:
            chosen = data.labels[[s == split for s in data.splits]]
            values, n = np.unique(chosen, return_counts=True)
            counts[split] = {int(v): int(c) for v, c in zip(values, n, strict=True)}
        return DataSetInfo(
            kind="tabular",
            name=self.config.name,
            location=self.location,
            label_counts=counts,
            label_names=data.label_names,
            feature_names=self.config.feature_columns,
            columns=data.columns,
            target=data.target,
            notes=tuple(data.notes),
        )

    def load(self, split: Split) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        chosen = self._chosen(split)
        data = self._data()
        return data.features[chosen].astype(np.float32), data.labels[chosen]

    def targets(self, split: Split) -> npt.NDArray[np.float64]:
        """The real-valued targets (regression) of one split, in the order of :meth:`load`.

        Raises:
            DataError: the configuration declares no ``target_column``.
            SourceError: as :meth:`describe` (a NULL, text or non-finite target is one).
        """
        if self.config.target_column is None:
            raise DataError(
                f"{self.location}: this SQL source declares no target_column, so it has no "
                "regression targets"
            )
        data = self._data()
        assert data.targets is not None  # checked with the target column
        return data.targets[self._chosen(split)]

    def _chosen(self, split: Split) -> npt.NDArray[np.bool_]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        return np.array([s == split for s in self._data().splits], dtype=bool)

    def tf_dataset(self, split: Split) -> tf.data.Dataset:
        return arrays_dataset(*self.load(split))
