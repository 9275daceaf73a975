"""Images where they live: a folder of DICOM or PNG/JPEG files and a labels CSV.

The labels CSV names each image file (relative to the folder) and its label, optionally its
split; a file not listed is not used. Every listed file is decoded once when the source is
scanned (one at a time, nothing kept), so that a corrupt or missing file is reported by name
and left out *before* training, and the per-label counts a proposal is checked against are the
counts of images that will really be used. Training then streams the files from disk through
``tf.data`` (decode, normalize, resize per element): a folder of scans never has to fit in
memory.

Declared preprocessing (the proposal's, so that every site feeds the model the same thing):

- ``image_size`` (height, width): bilinear resize after normalization;
- ``channels``: 1 (grayscale; colour is averaged) or 3 (grayscale is repeated);
- ``normalization``: ``"max_value"`` divides by the largest value the file's pixel type can
  hold (255 for 8-bit PNG/JPEG, 2^BitsStored - 1 for DICOM, signed DICOM shifted first), so
  intensities stay comparable across images; ``"min_max"`` maps each image's own range to
  [0, 1] (a constant image becomes zeros).

Only the metadata (counts per label, image shape, skipped files) leaves this module towards a
proposal or ``peer data show``; never a pixel.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import SourceError, SourceIssue
from .records import SPLITS, Split
from .source import DataSetInfo, hash_split

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["ImageFolderSource", "ImageSourceConfig"]

ImageFormat = Literal["auto", "dicom", "png", "jpeg"]
Normalization = Literal["max_value", "min_max"]

_EXTENSIONS: dict[str, ImageFormat] = {
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
}
_MAX_ISSUES = 20
# Largest image (pixel values over all frames and samples) a file may declare: 8192x8192.
_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True, slots=True)
class ImageSourceConfig:
    """What a site declares to read an image folder (the ``[data]`` TOML table).

    Attributes:
        folder: the folder holding the images.
        labels_csv: a CSV file (header row) with a file column and a label column.
        image_size: (height, width) every image is resized to.
        channels: 1 or 3.
        normalization: ``"max_value"`` or ``"min_max"`` (module header).
        format: ``"dicom"``, ``"png"``, ``"jpeg"`` or ``"auto"`` (by file extension).
        file_column: the CSV column naming the file, relative to ``folder``.
        label_column: the CSV column holding the label.
        classes: the label values in class-index order; if None, labels must be 0..k-1.
        split_column: a CSV column holding ``train``/``test``; if None, the split is derived
            from the file name (:func:`~peer.data.hash_split`) with ``test_fraction``.
        test_fraction: share of images kept for testing without a split column.
        split_salt: changes the derived split.
        name: the data set's name.
    """

    folder: Path
    labels_csv: Path
    image_size: tuple[int, int]
    channels: int = 1
    normalization: Normalization = "max_value"
    format: ImageFormat = "auto"
    file_column: str = "file"
    label_column: str = "label"
    classes: tuple[str, ...] | None = None
    split_column: str | None = None
    test_fraction: float = 0.2
    split_salt: str = ""
    name: str = "images"

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h < 1 or w < 1 or h * w > 4096 * 4096:
            raise ValueError(f"image_size must be two positive sizes, not {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.normalization not in ("max_value", "min_max"):
            raise ValueError(
                f"normalization must be 'max_value' or 'min_max', not {self.normalization!r}"
            )
        if self.format not in ("auto", "dicom", "png", "jpeg"):
            raise ValueError(f"format must be auto, dicom, png or jpeg, not {self.format!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), not {self.test_fraction}")


@dataclass(frozen=True, slots=True)
class _Entry:
    path: Path
    label: int
    split: Split
    format: ImageFormat


# --------------------------------------------------------------------------- decoding


def _dicom_pixels(path: str, channels: int, normalization: Normalization) -> npt.NDArray[Any]:
    """One DICOM file as a normalized float32 (height, width, channels) array.

    Raises:
        ValueError: the file is not a readable single-frame DICOM image (pydicom's reason).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path)
        samples = int(getattr(dataset, "SamplesPerPixel", 1))
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        declared = int(dataset.Rows) * int(dataset.Columns) * samples * frames
        if declared > _MAX_PIXELS:
            # Checked before decoding: a header may claim any size.
            raise ValueError(f"{declared} pixel values declared, more than {_MAX_PIXELS}")
        pixels = np.asarray(dataset.pixel_array)
    except InvalidDicomError as err:
        raise ValueError(f"not a readable DICOM image ({err})") from None
    except Exception as err:
        # A corrupt or unsupported file can fail anywhere inside pydicom (struct, EOF,
        # missing tags, a compressed transfer syntax without its decoder...): whatever the
        # reason, the file is unusable and is reported by name rather than stopping the scan.
        raise ValueError(f"not a readable DICOM image ({type(err).__name__}: {err})") from None
    if frames != 1 or pixels.ndim != (3 if samples > 1 else 2):
        raise ValueError(f"{frames} frame(s) of shape {pixels.shape}: one 2-D image expected")
    image = pixels.astype(np.float64)
    if normalization == "max_value":
        bits = int(getattr(dataset, "BitsStored", 8 * pixels.dtype.itemsize))
        if int(getattr(dataset, "PixelRepresentation", 0)) == 1:
            image = image + 2.0 ** (bits - 1)  # signed: shift to 0 .. 2^bits - 1
        image = image / (2.0**bits - 1.0)
    if image.ndim == 2:
        image = image[:, :, None]
    return _to_channels(_min_max(image) if normalization == "min_max" else image, channels)


def _min_max(image: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _to_channels(image: npt.NDArray[np.float64], channels: int) -> npt.NDArray[np.float32]:
    if image.shape[2] != channels:
        image = image.mean(axis=2, keepdims=True) if channels == 1 else np.repeat(image, 3, 2)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _decoder(config: ImageSourceConfig) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """The ``tf.data`` map function: (path, format, label) -> (image, label)."""
    import tensorflow as tf

    h, w = config.image_size
    channels, normalization = config.channels, config.normalization

    def dicom(path: Any) -> Any:
        def read(raw: bytes) -> npt.NDArray[np.float32]:
            return _dicom_pixels(raw.decode(), channels, normalization)

        image = tf.numpy_function(read, [path], tf.float32, stateful=False)
        image.set_shape([None, None, channels])
        return image

    def png_or_jpeg(path: Any) -> Any:
        # dtype=float32 scales by the pixel type's maximum (255, or 65535 for 16-bit PNG).
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=channels, dtype=tf.float32, expand_animations=False
        )
        if normalization == "min_max":
            low, high = tf.reduce_min(image), tf.reduce_max(image)
            image = tf.math.divide_no_nan(image - low, high - low)
        return image

    def decode(path: Any, is_dicom: Any, label: Any) -> tuple[Any, Any]:
        image = tf.cond(is_dicom, lambda: dicom(path), lambda: png_or_jpeg(path))
        image = tf.image.resize(image, (h, w), method="bilinear")
        image.set_shape([h, w, channels])
        return image, label

    return decode


def _check_decodes(entry: _Entry, config: ImageSourceConfig) -> tuple[int, int]:
    """Decode one file fully (then drop it); returns its native (height, width).

    Raises:
        ValueError: why the file cannot be used.
    """
    if entry.format == "dicom":
        image = _dicom_pixels(str(entry.path), config.channels, config.normalization)
        return int(image.shape[0]), int(image.shape[1])
    import tensorflow as tf

    try:
        image = tf.io.decode_image(
            tf.io.read_file(str(entry.path)), channels=config.channels, expand_animations=False
        )
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        message = " ".join(str(error.message).split())
        raise ValueError(f"not a readable {entry.format.upper()} image ({message})") from None
    return int(image.shape[0]), int(image.shape[1])


# --------------------------------------------------------------------------- the source


class ImageFolderSource:
    """A :class:`~peer.data.DataSource` over an image folder (see the module header).

    The folder is scanned once, on the first call that needs it.

    Raises (from ``describe``, ``load``, ``tf_dataset``):
        SourceError: the labels CSV cannot be read or has problems (each listed), or no
            image is usable. A corrupt or missing image alone is not an error: it is left
            out and named in ``describe().notes``.
    """

    def __init__(self, config: ImageSourceConfig) -> None:
        self.config = config
        self._entries: list[_Entry] | None = None
        self._notes: list[str] = []
        self._labels: tuple[str, ...] = ()

    @property
    def location(self) -> str:
        return str(self.config.folder)

    def _format_of(self, path: Path) -> ImageFormat | None:
        if self.config.format != "auto":
            return self.config.format
        return _EXTENSIONS.get(path.suffix.lower())

    def _read_labels(self) -> tuple[list[dict[str, str]], list[SourceIssue]]:
        config, where = self.config, f"labels file {str(self.config.labels_csv)!r}"
        try:
            with config.labels_csv.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                header = list(reader.fieldnames or [])
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            return [], [SourceIssue(where, f"cannot be read: {error}")]
        wanted = [config.file_column, config.label_column]
        if config.split_column is not None:
            wanted.append(config.split_column)
        absent = [c for c in wanted if c not in header]
        if absent:
            return [], [
                SourceIssue(where, f"has no column {c!r} (columns: {', '.join(header)})")
                for c in absent
            ]
        return rows, []

    def _scan(self) -> list[_Entry]:
        if self._entries is not None:
            return self._entries
        config = self.config
        rows, issues = self._read_labels()
        if issues:
            raise SourceError(self.location, issues)
        folder = config.folder.resolve()
        position = {v: i for i, v in enumerate(config.classes)} if config.classes else None
        candidates: list[_Entry] = []
        skipped: list[str] = []
        for line, row in enumerate(rows, start=2):
            name, value = row[config.file_column] or "", (row[config.label_column] or "").strip()
            subject = f"labels file line {line}"
            path = (folder / name).resolve()
            if not name or not path.is_relative_to(folder):
                issues.append(SourceIssue(subject, f"file {name!r} is not inside {folder}"))
                continue
            if position is not None:
                label = position.get(value)
            else:
                label = int(value) if value.isdigit() else None
            if label is None:
                expected = list(config.classes) if config.classes else "a class index 0, 1, ..."
                issues.append(SourceIssue(subject, f"label {value!r} is not {expected}"))
                continue
            if config.split_column is not None:
                split = (row[config.split_column] or "").strip()
                if split not in SPLITS:
                    issues.append(SourceIssue(subject, f"split {split!r} is not train/test"))
                    continue
            else:
                split = hash_split(name, config.test_fraction, config.split_salt)
            image_format = self._format_of(path)
            if image_format is None:
                issues.append(
                    SourceIssue(
                        subject, f'file {name!r}: unknown extension (set format = "dicom"...)'
                    )
                )
                continue
            candidates.append(_Entry(path, label, split, image_format))
        if issues:
            raise SourceError(self.location, issues[:_MAX_ISSUES])
        entries: list[_Entry] = []
        sizes: Counter[tuple[int, int]] = Counter()
        for entry in candidates:
            name = str(entry.path.relative_to(folder))
            if not entry.path.is_file():
                skipped.append(f"file {name!r} skipped: no such file")
                continue
            try:
                sizes[_check_decodes(entry, config)] += 1
            except ValueError as error:
                skipped.append(f"file {name!r} skipped: {error}")
                continue
            entries.append(entry)
        if not entries:
            raise SourceError(
                self.location,
                [SourceIssue(None, "no usable image"), *(SourceIssue(None, s) for s in skipped)],
            )
        k = max(e.label for e in entries) + 1
        self._labels = config.classes or tuple(str(i) for i in range(k))
        native = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sizes.most_common(5))
        self._notes = [*skipped, f"native sizes: {native}"]
        self._entries = entries
        return entries

    def describe(self) -> DataSetInfo:
        entries = self._scan()
        counts: dict[Split, dict[int, int]] = {split: {} for split in SPLITS}
        for entry in entries:
            counts[entry.split][entry.label] = counts[entry.split].get(entry.label, 0) + 1
        h, w = self.config.image_size
        return DataSetInfo(
            kind="image",
            name=self.config.name,
            location=self.location,
            label_counts={s: dict(sorted(c.items())) for s, c in counts.items()},
            label_names=self._labels,
            image_shape=(h, w, self.config.channels),
            notes=tuple(self._notes),
        )

    def tf_dataset(self, split: Split, indices: npt.ArrayLike | None = None) -> tf.data.Dataset:
        """Streams the split's images from disk, decoded, normalized and resized.

        Args:
            indices: only these images of the split, in this order (a DP-SGD step's Poisson
                sample): the others are not read at all.
        """
        import tensorflow as tf

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        entries = [e for e in self._scan() if e.split == split]
        if indices is not None:
            entries = [entries[int(i)] for i in np.asarray(indices, dtype=np.int64)]
        paths = tf.constant([str(e.path) for e in entries], dtype=tf.string)
        is_dicom = tf.constant([e.format == "dicom" for e in entries], dtype=tf.bool)
        labels = tf.constant([e.label for e in entries], dtype=tf.int64)
        dataset = tf.data.Dataset.from_tensor_slices((paths, is_dicom, labels))
        return dataset.map(_decoder(self.config), num_parallel_calls=tf.data.AUTOTUNE)

    def load(self, split: Split) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The whole split in memory (small folders and tests; training streams instead)."""
        h, w = self.config.image_size
        images, labels = [], []
        for image, label in self.tf_dataset(split).as_numpy_iterator():
            images.append(image)
            labels.append(label)
        if not images:
            shape = (0, h, w, self.config.channels)
            return np.zeros(shape, dtype=np.float32), np.zeros((0,), dtype=np.int64)
        return np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64)
