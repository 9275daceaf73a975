"""CSV import with validation that names every bad row and column.

The whole file is read and checked before anything is written, and the write itself is one
transaction, so an import either stores every row or leaves the database unchanged.

Label policy (``label`` column):

- Numeric labels must be exactly 0 or 1 (``"0"``, ``"1"``, ``"0.0"``, ``"1.0"``); any other
  number is an error.
- Text labels are accepted only if the column has exactly two distinct values. The positive
  (label 1) value is ``positive_label`` if given; otherwise it is inferred only from a known
  pair (case-insensitive): M/B, malignant/benign, positive/negative, yes/no, true/false, Y/N.
  Any other pair is an error asking for ``positive_label``: guessing which class is the
  disease would silently invert sensitivity and specificity.

Multi-class labels (``classes = K``): the label column must hold the class indices
``0..K-1`` as numbers; anything else (text, another number) is an error on its line.

Regression targets (``target_col``): a numeric column, stored as each record's ``target``;
a missing or non-numeric value is an error on its line. A regression data set needs no label
column (``label=None``): every record then has class 0, and the store remembers that its
records carry no labels (:meth:`PatientStore.has_labels`), so that a classification session
is refused there instead of training on that constant.

The diagnosis stored with each record is the ``diagnosis_col`` value if given, else the text
label itself (e.g. ``"M"``), else ``"positive"``/``"negative"`` for numeric labels.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CSVImportError, ImportIssue
from .records import PatientRecord, Split
from .store import PatientStore

__all__ = ["ImportReport", "import_csv", "stratified_split"]

_MISSING = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
_KNOWN_POSITIVE = {
    "m": "b",
    "malignant": "benign",
    "positive": "negative",
    "yes": "no",
    "true": "false",
    "y": "n",
}
_MAX_ISSUES_PER_COLUMN = 10


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What an import stored.

    Attributes:
        path: the CSV file.
        n_records: rows stored.
        n_train: rows stored with split ``"train"``.
        n_test: rows stored with split ``"test"``.
        feature_names: the feature columns, in vector order.
        label_mapping: how each raw label value was mapped to 0/1.
        generated_ids: True if patient ids were generated from file name and line number.
    """

    path: str
    n_records: int
    n_train: int
    n_test: int
    feature_names: list[str]
    label_mapping: dict[str, int] = field(default_factory=dict)
    generated_ids: bool = False


def import_csv(
    store: PatientStore,
    path: str | Path,
    label: str | None,
    id_col: str | None = None,
    feature_cols: Sequence[str] | None = None,
    diagnosis_col: str | None = None,
    test_fraction: float = 0.2,
    rng: np.random.Generator | None = None,
    *,
    positive_label: str | None = None,
    classes: int | None = None,
    target_col: str | None = None,
    dataset_name: str | None = None,
    delimiter: str = ",",
) -> ImportReport:
    """Validate a CSV file of patient records and store it in one transaction.

    Args:
        store: the destination (its tables are created if needed).
        path: the CSV file (UTF-8, with a header row).
        label: the name of the label column (binary, or class indices with ``classes``);
            None only with ``target_col`` (a regression data set).
        id_col: the patient id column; if None, ids ``<file stem>-<line>`` are generated.
        feature_cols: the feature columns in order; default every column except the label,
            id and diagnosis columns.
        diagnosis_col: a column holding the diagnosis text (see module docstring).
        test_fraction: fraction of records assigned to the test split, stratified by label.
        rng: generator for the train/test assignment (default: fresh OS entropy).
        positive_label: for text labels, the value meaning label 1.
        classes: the labels are class indices ``0..classes-1`` (a multi-class data set).
        target_col: a numeric column stored as each record's regression target.
        dataset_name: stored in the metadata (default: the file stem).
        delimiter: the field separator.

    Returns:
        an :class:`ImportReport`.

    Raises:
        CSVImportError: listing every problem found (missing values with line and column,
            non-numeric feature columns, a missing or non-binary label column, duplicate ids).
            The database is unchanged.
        DataError: the records clash with what is already stored (e.g. an id already
            present); the database is unchanged.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), not {test_fraction}")
    if label is None and target_col is None:
        raise ValueError("give a label column, a target column, or both")
    if classes is not None and classes < 2:
        raise ValueError(f"classes must be at least 2, not {classes}")
    path = Path(path)
    source = str(path)
    issues: list[ImportIssue] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise CSVImportError(source, [ImportIssue(None, None, "the file is empty")])
            header = [name.strip() for name in header]
            lines: list[tuple[int, list[str]]] = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                lines.append((reader.line_num, [cell.strip() for cell in row]))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CSVImportError(source, [ImportIssue(None, None, f"cannot read file: {exc}")]) from exc

    columns = _resolve_columns(
        header, label, id_col, feature_cols, diagnosis_col, issues, target_col
    )
    if issues:
        raise CSVImportError(source, issues)
    if not lines:
        raise CSVImportError(source, [ImportIssue(None, None, "the file has no data rows")])
    index = {name: i for i, name in enumerate(header)}

    for line, row in lines:
        if len(row) != len(header):
            issues.append(
                ImportIssue(line, None, f"has {len(row)} fields, the header has {len(header)}")
            )
    if issues:
        raise CSVImportError(source, issues)

    features = _parse_features(lines, index, columns.features, issues)
    mapping: dict[str, int] = {}
    text_labels = False
    if label is None:
        labels = [0] * len(lines)
    elif classes is not None:
        labels = _parse_classes(lines, index[label], label, classes, issues)
    else:
        labels, mapping, text_labels = _parse_labels(
            lines, index[label], label, positive_label, issues
        )
    targets: list[float | None] = [None] * len(lines)
    if target_col is not None:
        targets = [*_parse_targets(lines, index[target_col], target_col, issues)]
    ids = _parse_ids(lines, index, id_col, path.stem, issues)
    if diagnosis_col is not None:
        diagnoses = [row[index[diagnosis_col]] for _, row in lines]
        for (line, _), text in zip(lines, diagnoses, strict=True):
            if text.lower() in _MISSING:
                issues.append(ImportIssue(line, diagnosis_col, "missing diagnosis"))
    if issues:
        raise CSVImportError(source, issues)
    if diagnosis_col is None:
        if text_labels and label is not None:
            diagnoses = [row[index[label]] for _, row in lines]
        elif label is None:
            diagnoses = ["unlabelled"] * len(lines)
        elif classes is not None:
            diagnoses = [f"class {y}" for y in labels]
        else:
            diagnoses = ["positive" if y == 1 else "negative" for y in labels]

    rng = rng if rng is not None else np.random.default_rng()
    splits = stratified_split(np.asarray(labels), test_fraction, rng)
    records = [
        PatientRecord(pid, diag, features[i], int(labels[i]), splits[i], target=targets[i])
        for i, (pid, diag) in enumerate(zip(ids, diagnoses, strict=True))
    ]
    store.create()
    store.add_records(
        records,
        feature_names=columns.features,
        dataset_name=dataset_name or path.stem,
        labelled=label is not None,
    )
    n_test = sum(1 for s in splits if s == "test")
    return ImportReport(
        path=source,
        n_records=len(records),
        n_train=len(records) - n_test,
        n_test=n_test,
        feature_names=list(columns.features),
        label_mapping=mapping,
        generated_ids=id_col is None,
    )


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> list[Split]:
    """Assign ``round(test_fraction * n_c)`` records of each class ``c`` to the test split."""
    splits: list[Split] = ["train"] * len(labels)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        n_test = round(test_fraction * len(members))
        for i in rng.permutation(members)[:n_test]:
            splits[int(i)] = "test"
    return splits


@dataclass(frozen=True, slots=True)
class _Columns:
    features: list[str]


def _resolve_columns(
    header: list[str],
    label: str | None,
    id_col: str | None,
    feature_cols: Sequence[str] | None,
    diagnosis_col: str | None,
    issues: list[ImportIssue],
    target_col: str | None = None,
) -> _Columns:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            issues.append(ImportIssue(1, name, "the header names this column twice"))
        seen.add(name)
    available = ", ".join(repr(h) for h in header)
    for role, wanted in (
        ("label", label),
        ("id", id_col),
        ("diagnosis", diagnosis_col),
        ("target", target_col),
    ):
        if wanted is not None and wanted not in seen:
            issues.append(
                ImportIssue(1, wanted, f"{role} column not found in header (columns: {available})")
            )
    reserved = {label, id_col, diagnosis_col, target_col} - {None}
    if feature_cols is None:
        features = [name for name in header if name not in reserved]
    else:
        features = list(feature_cols)
        for name in features:
            if name not in seen:
                issues.append(ImportIssue(1, name, "feature column not found in header"))
            elif name in reserved:
                issues.append(
                    ImportIssue(
                        1, name, "is the label, id, diagnosis or target column, not a feature"
                    )
                )
    if not features:
        issues.append(ImportIssue(None, None, "no feature columns"))
    return _Columns(features)


def _parse_features(
    lines: list[tuple[int, list[str]]],
    index: dict[str, int],
    names: list[str],
    issues: list[ImportIssue],
) -> np.ndarray:
    out = np.zeros((len(lines), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        col = index[name]
        missing: list[int] = []
        non_numeric: list[tuple[int, str]] = []
        for i, (line, row) in enumerate(lines):
            cell = row[col]
            if cell.lower() in _MISSING:
                missing.append(line)
                continue
            try:
                value = float(cell)
            except ValueError:
                non_numeric.append((line, cell))
                continue
            if not math.isfinite(value):
                non_numeric.append((line, cell))
                continue
            out[i, j] = value
        if non_numeric and len(non_numeric) + len(missing) == len(lines):
            issues.append(
                ImportIssue(
                    None,
                    name,
                    f"is not numeric (e.g. {non_numeric[0][1]!r} on line {non_numeric[0][0]}); "
                    "exclude it with feature_cols or encode it as numbers",
                )
            )
            continue
        for line, cell in non_numeric[:_MAX_ISSUES_PER_COLUMN]:
            issues.append(ImportIssue(line, name, f"not a finite number: {cell!r}"))
        for line in missing[:_MAX_ISSUES_PER_COLUMN]:
            issues.append(ImportIssue(line, name, "missing value"))
        hidden = max(0, len(non_numeric) - _MAX_ISSUES_PER_COLUMN)
        hidden += max(0, len(missing) - _MAX_ISSUES_PER_COLUMN)
        if hidden:
            issues.append(ImportIssue(None, name, f"{hidden} more bad values not listed"))
    return out


def _parse_labels(
    lines: list[tuple[int, list[str]]],
    col: int,
    name: str,
    positive_label: str | None,
    issues: list[ImportIssue],
) -> tuple[list[int], dict[str, int], bool]:
    raw = [row[col] for _, row in lines]
    bad = [(line, value) for (line, _), value in zip(lines, raw, strict=True) if not value]
    for line, _ in bad[:_MAX_ISSUES_PER_COLUMN]:
        issues.append(ImportIssue(line, name, "missing label"))
    if bad:
        return [], {}, False
    numeric = all(_as_number(value) is not None for value in raw)
    if numeric:
        mapping: dict[str, int] = {}
        labels = []
        for (line, _), value in zip(lines, raw, strict=True):
            number = _as_number(value)
            if number not in (0.0, 1.0):
                issues.append(ImportIssue(line, name, f"numeric label must be 0 or 1: {value!r}"))
                continue
            labels.append(int(number))
            mapping[value] = int(number)
        return labels, mapping, False
    distinct = sorted(set(raw))
    if len(distinct) != 2:
        shown = ", ".join(repr(v) for v in distinct[:10])
        issues.append(
            ImportIssue(
                None,
                name,
                f"label must have exactly 2 distinct values, found {len(distinct)}: {shown}",
            )
        )
        return [], {}, True
    positive = _positive_value(distinct, positive_label)
    if positive is None:
        if positive_label is not None:
            message = f"positive_label {positive_label!r} is neither {distinct[0]!r} nor "
            message += f"{distinct[1]!r}"
        else:
            message = f"cannot tell which of {distinct[0]!r} and {distinct[1]!r} is the "
            message += "positive class; pass positive_label"
        issues.append(ImportIssue(None, name, message))
        return [], {}, True
    mapping = {value: int(value == positive) for value in distinct}
    return [mapping[value] for value in raw], mapping, True


def _parse_classes(
    lines: list[tuple[int, list[str]]],
    col: int,
    name: str,
    classes: int,
    issues: list[ImportIssue],
) -> list[int]:
    labels, bad = [], []
    for line, row in lines:
        number = _as_number(row[col])
        if (
            number is None
            or not math.isfinite(number)
            or number != int(number)
            or not 0 <= number < classes
        ):
            bad.append((line, row[col]))
            continue
        labels.append(int(number))
    for line, value in bad[:_MAX_ISSUES_PER_COLUMN]:
        issues.append(
            ImportIssue(line, name, f"class label must be an integer 0..{classes - 1}: {value!r}")
        )
    if len(bad) > _MAX_ISSUES_PER_COLUMN:
        hidden = len(bad) - _MAX_ISSUES_PER_COLUMN
        issues.append(ImportIssue(None, name, f"{hidden} more bad values not listed"))
    return labels


def _parse_targets(
    lines: list[tuple[int, list[str]]], col: int, name: str, issues: list[ImportIssue]
) -> list[float]:
    targets, bad = [], []
    for line, row in lines:
        number = _as_number(row[col])
        if number is None or not math.isfinite(number):
            bad.append((line, row[col]))
            continue
        targets.append(number)
    for line, value in bad[:_MAX_ISSUES_PER_COLUMN]:
        message = "missing target" if value.lower() in _MISSING else "target must be a number"
        issues.append(ImportIssue(line, name, f"{message}: {value!r}"))
    if len(bad) > _MAX_ISSUES_PER_COLUMN:
        hidden = len(bad) - _MAX_ISSUES_PER_COLUMN
        issues.append(ImportIssue(None, name, f"{hidden} more bad values not listed"))
    return targets


def _positive_value(distinct: list[str], positive_label: str | None) -> str | None:
    if positive_label is not None:
        return positive_label if positive_label in distinct else None
    lowered = [value.lower() for value in distinct]
    for pos, neg in _KNOWN_POSITIVE.items():
        if sorted((pos, neg)) == sorted(lowered):
            return distinct[lowered.index(pos)]
    return None


def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _parse_ids(
    lines: list[tuple[int, list[str]]],
    index: dict[str, int],
    id_col: str | None,
    stem: str,
    issues: list[ImportIssue],
) -> list[str]:
    if id_col is None:
        return [f"{stem}-{line}" for line, _ in lines]
    first_line: dict[str, int] = {}
    ids = []
    for line, row in lines:
        pid = row[index[id_col]]
        if pid.lower() in _MISSING:
            issues.append(ImportIssue(line, id_col, "missing patient id"))
        elif pid in first_line:
            issues.append(
                ImportIssue(
                    line, id_col, f"duplicate patient id {pid!r} (first on line {first_line[pid]})"
                )
            )
        else:
            first_line[pid] = line
        ids.append(pid)
    return ids
