"""The seam between a hospital's data and a training payload: the :class:`DataSource` protocol.

A payload needs three things from a site's data, whatever it lives in (the bundled/CSV patient
store, a read-only SQL query, a folder of DICOM or PNG images):

- ``describe()``: what a proposal is checked against -- the kind of data, feature names or
  image shape, and the number of records per split and per label. Never a record, never a
  pixel: this is what ``peer data show`` prints and what a policy may compare with a proposal.
- ``load(split)``: the whole split as arrays (tabular data: a few MB even for 100k patients).
- ``tf_dataset(split)``: the split as an unbatched ``tf.data.Dataset`` of
  ``(features, label)`` pairs, streamed from disk for images (a folder of scans does not fit
  in memory); tabular sources simply slice their arrays.

Labels are class indices (int64, 0..k-1). The split of a record is either stored with it
(the patient store, a split column) or derived from its patient id by :func:`hash_split`, so
that re-running a query or rescanning a folder gives every patient the same split without
this peer storing anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from .records import SPLITS, Split

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "NO_LABEL_NOTE",
    "ColumnSummary",
    "DataSetInfo",
    "DataSource",
    "SourceKind",
    "arrays_dataset",
    "column_summaries",
    "hash_split",
]

SourceKind = Literal["tabular", "image"]

# The note (``DataSetInfo.notes``) of a data set read without a label column, for regression
# sessions only: the patient store's and a SQL source's say the same.
NO_LABEL_NOTE = "no label column: every record has class 0 (a regression-only data set)"


@dataclass(frozen=True, slots=True)
class ColumnSummary:
    """Aggregate figures of one feature or target column (no individual value: no min or max).

    Attributes:
        name: the column.
        kind: the type found in the source (e.g. ``"float"``, ``"integer"``).
        count: records with a value.
        missing: records without one (NULL) -- 0 once a source is usable, unless the source
            drops incomplete records (then it says how many it dropped).
        mean: mean over the records with a value (None if there are none).
        std: standard deviation over the same records.
    """

    name: str
    kind: str
    count: int
    missing: int = 0
    mean: float | None = None
    std: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "missing": self.missing,
            "mean": self.mean,
            "std": self.std,
        }


@dataclass(frozen=True, slots=True)
class DataSetInfo:
    """The metadata of a data source: what a proposal is checked against, never the data.

    Attributes:
        kind: ``"tabular"`` (a feature vector per record) or ``"image"``.
        name: the data set's name (the store's, or the configuration's).
        location: where it lives (database URL with the password hidden, or a folder).
        label_counts: records per split and per class index.
        label_names: the original label value of each class index, if known.
        feature_names: tabular sources: the feature vector's columns, in order.
        image_shape: image sources: (height, width, channels) after decoding and resizing.
        columns: tabular sources: per-column summaries.
        target: the real-valued target column's summary (regression), if the source has one.
        notes: what was left out or dropped and why (e.g. a corrupt file, by name).
    """

    kind: SourceKind
    name: str
    location: str
    label_counts: Mapping[Split, Mapping[int, int]]
    label_names: tuple[str, ...] | None = None
    feature_names: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] | None = None
    columns: tuple[ColumnSummary, ...] = ()
    target: ColumnSummary | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one record's input: ``(n_features,)`` or ``(h, w, c)``."""
        if self.image_shape is not None:
            return self.image_shape
        return (len(self.feature_names),)

    @property
    def n_classes(self) -> int:
        """Classes named by the source, else the largest index seen plus one."""
        if self.label_names is not None:
            return len(self.label_names)
        seen = [label for counts in self.label_counts.values() for label in counts]
        return max(seen) + 1 if seen else 0

    def count(self, split: Split | None = None) -> int:
        """Records in one split, or in both."""
        splits = SPLITS if split is None else (split,)
        return sum(sum(self.label_counts.get(s, {}).values()) for s in splits)

    def summary_lines(self) -> list[str]:
        """A human-readable summary (what ``peer data show`` prints): counts, shapes and
        per-column aggregates, never a record."""
        shape = (
            f"images {'x'.join(map(str, self.image_shape))}"
            if self.image_shape is not None
            else f"{len(self.feature_names)} features"
        )
        classes = range(self.n_classes)
        names = self.label_names or tuple(str(c) for c in classes)
        lines = [f"{self.kind} data set {self.name!r} in {self.location}, {shape}"]
        header = "".join(f"  {'label ' + names[c]:>12}" for c in classes)
        lines.append(f"{'split':<5}  {'records':>7}{header}")
        for split in (*SPLITS, None):
            counts = self.label_counts
            row = "".join(
                f"  {sum(counts.get(s, {}).get(c, 0) for s in ((split,) if split else SPLITS)):>12}"
                for c in classes
            )
            lines.append(f"{split or 'all':<5}  {self.count(split):>7}{row}")
        # The target (regression) is one more row of the same table, marked as such.
        rows = [(column.name, column) for column in self.columns]
        if self.target is not None:
            rows.append((f"{self.target.name} (target)", self.target))
        if rows:
            lines.append(f"{'column':<24}  {'type':<16}  {'count':>7}  {'missing':>7}  mean, std")
            for name, column in rows:
                stats = (
                    f"{column.mean:.4g}, {column.std:.4g}"
                    if column.mean is not None and column.std is not None
                    else "-"
                )
                lines.append(
                    f"{name:<24}  {column.kind:<16}  {column.count:>7}  "
                    f"{column.missing:>7}  {stats}"
                )
        lines.extend(f"note: {note}" for note in self.notes)
        return lines

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "location": self.location,
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
            "label_names": list(self.label_names) if self.label_names is not None else None,
            "splits": {
                split: {
                    "records": self.count(split),
                    "labels": {
                        str(k): v for k, v in sorted(self.label_counts.get(split, {}).items())
                    },
                }
                for split in SPLITS
            },
            "features": list(self.feature_names),
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
            "columns": [column.as_json() for column in self.columns],
            "target": self.target.as_json() if self.target is not None else None,
            "notes": list(self.notes),
        }


class DataSource(Protocol):
    """Where a training payload reads one hospital's records from (see the module header).

    Implemented by :class:`~peer.data.PatientStore`, :class:`~peer.data.SQLSource` and
    :class:`~peer.data.ImageFolderSource`.
    """

    def describe(self) -> DataSetInfo:
        """Metadata and per-label counts; raises :class:`~peer.data.DataError` (or a
        subclass naming every problem) if the data cannot be used."""
        ...

    def load(self, split: Split) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``(inputs, labels)`` of one split: float32 of shape ``(n, *input_shape)``, int64
        of shape ``(n,)``."""
        ...

    def tf_dataset(self, split: Split) -> tf.data.Dataset:
        """One split as an unbatched ``tf.data.Dataset`` of ``(input, label)``."""
        ...


def hash_split(key: str, test_fraction: float, salt: str = "") -> Split:
    """The split of a record derived from its key (a patient id or file name).

    SHA-256 is used as a well-mixed, platform-independent hash (not for secrecy: the split
    is not secret). ``salt`` lets a site draw a different split of the same records.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), not {test_fraction}")
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_fraction * 2**64 else "train"


def column_summaries(
    names: Sequence[str], features: npt.NDArray[np.floating[Any]], kinds: Sequence[str]
) -> tuple[ColumnSummary, ...]:
    """Count, mean and standard deviation of each column of a (n, d) array (NaN = missing)."""
    summaries = []
    for j, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        column = np.asarray(features[:, j], dtype=np.float64)
        present = column[~np.isnan(column)]
        mean = float(present.mean()) if present.size else None
        std = float(present.std()) if present.size else None
        summaries.append(
            ColumnSummary(
                name=name,
                kind=kind,
                count=int(present.size),
                missing=int(column.size - present.size),
                mean=mean if mean is None or math.isfinite(mean) else None,
                std=std,
            )
        )
    return tuple(summaries)


def arrays_dataset(
    features: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> tf.data.Dataset:
    """An unbatched ``tf.data.Dataset`` over in-memory arrays (TensorFlow imported lazily:
    ``peer data show`` and the CLI never pay for it)."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((features, labels))
