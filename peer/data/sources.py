"""Which :class:`~peer.data.DataSource` a peer reads: the ``[data]`` table of its TOML file.

Without a ``[data]`` table (or with ``source = "store"``) the peer reads its patient store,
``[storage] data`` (the bundled set or CSV imports). Otherwise::

    [data]                          # records from a read-only SQL query
    source = "sql"
    name = "omop-ckd"
    url = "sqlite:///omop.db"       # any SQLAlchemy URL; relative sqlite paths: this folder
    query = '''
        SELECT p.person_id, 2024 - p.year_of_birth AS age, ...
        FROM person p ...'''
    id = "person_id"
    features = ["age", "hba1c"]
    label = "ckd"
    classes = ["0", "1"]            # optional: label values in class order
    target_column = "egfr"          # optional: a real-valued outcome (regression sessions);
                                    # with it, label may be left out (a regression-only set)
    missing = "refuse"              # or "drop"
    split = { test_fraction = 0.2 } # or { column = "split" }

    [data]                          # or images from a folder
    source = "images"
    folder = "scans"
    labels = "scans/labels.csv"     # columns: file, label (names settable, see below)
    image_size = [64, 64]           # a training session's image table overrides these
    channels = 1                    # three (every site decodes as the session declares)
    normalization = "max_value"     # or "min_max"
    format = "auto"                 # or "dicom", "png", "jpeg"
    split = { test_fraction = 0.2, salt = "" }

Optional keys of both: ``name``, ``classes``, ``split``; of images: ``file_column``,
``label_column``; of SQL: ``max_rows``, ``target_column`` (then ``label`` is optional).
Paths are relative to the TOML file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .images import ImageFolderSource, ImageSourceConfig
from .source import DataSource
from .sql import SQLSource, SQLSourceConfig
from .store import PatientStore

__all__ = ["DataFile", "SourceConfigError", "data_source", "read_data_file"]


class SourceConfigError(DataError):
    """The ``[data]`` table is missing a key or has a bad value (named in the text)."""


def _sqlite_relative(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and "?" not in url:
        rest = url[len(prefix) :]
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str((base / rest).resolve())
    return url


@dataclass(frozen=True, slots=True)
class DataFile:
    """The parts of a TOML file (a peer's configuration, or a file with only a ``[data]``
    table) that say where the peer's data is.

    Attributes:
        path: the file.
        peer_id: its ``peer_id``, if it has one.
        table: its ``[data]`` table, or None.
        store_url: its ``[storage] data`` URL (default ``sqlite:///data.db``), relative sqlite
            paths resolved against the file's folder.
    """

    path: Path
    peer_id: str | None
    table: dict[str, Any] | None
    store_url: str

    def source(self) -> DataSource:
        """The data source the file declares."""
        return data_source(self.table, self.path.parent, self.store_url)


def read_data_file(path: Path) -> DataFile:
    """Read the data-related keys of a TOML file.

    Raises:
        SourceConfigError: the file cannot be read, is not TOML, or has a bad ``[data]``.
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise SourceConfigError(f"{path}: cannot read: {error}") from None
    table = document.get("data")
    if table is not None and not isinstance(table, dict):
        raise SourceConfigError(f"{path}: [data] must be a table")
    storage = document.get("storage", {})
    url = storage.get("data") if isinstance(storage, dict) else None
    peer_id = document.get("peer_id")
    return DataFile(
        path=path,
        peer_id=peer_id if isinstance(peer_id, str) else None,
        table=table,
        store_url=_sqlite_relative(
            url if isinstance(url, str) else "sqlite:///data.db", path.parent
        ),
    )


def data_source(table: dict[str, Any] | None, base: Path, store_url: str) -> DataSource:
    """The data source a ``[data]`` table declares (paths relative to ``base``); the patient
    store at ``store_url`` when there is no table or it says ``source = "store"``.

    Raises:
        SourceConfigError: naming the key at fault.
    """
    if table is None:
        return PatientStore(store_url)
    where = "[data]"
    keys = _Keys(table, where)
    kind = keys.get("source", str, "store")
    split = keys.get("split", dict, {})
    split_keys = _Keys(split, f"{where} split")
    classes = keys.get("classes", list, None)
    if classes is not None:
        classes = tuple(str(c) for c in classes)
    common: dict[str, Any] = {
        "classes": classes,
        "test_fraction": float(split_keys.get("test_fraction", (int, float), 0.2)),
        "split_salt": split_keys.get("salt", str, ""),
        "split_column": split_keys.get("column", str, None),
    }
    split_keys.done()
    try:
        if kind == "store":
            # The store keeps its own split and binary labels: no classes or split keys.
            keys.read -= {"classes", "split"}
            keys.done()
            return PatientStore(store_url)
        if kind == "sql":
            sql = SQLSourceConfig(
                url=_sqlite_relative(keys.get("url", str), base),
                query=keys.get("query", str),
                id_column=keys.get("id", str),
                feature_columns=tuple(_strings(keys.get("features", list), f"{where} features")),
                # A label, a target (regression), or both: SQLSourceConfig checks one is given.
                label_column=keys.get("label", str, None),
                target_column=keys.get("target_column", str, None),
                missing=keys.get("missing", str, "refuse"),
                max_rows=keys.get("max_rows", int, 1_000_000),
                name=keys.get("name", str, "sql"),
                **common,
            )
            keys.done()
            return SQLSource(sql)
        if kind == "images":
            folder = (base / keys.get("folder", str)).resolve()
            labels = (base / keys.get("labels", str)).resolve()
            size = _strings(keys.get("image_size", list), f"{where} image_size", kind=int)
            if len(size) != 2:
                raise SourceConfigError(f"{where}: 'image_size' must be [height, width]")
            images = ImageSourceConfig(
                folder=folder,
                labels_csv=labels,
                image_size=(size[0], size[1]),
                channels=keys.get("channels", int, 1),
                normalization=keys.get("normalization", str, "max_value"),
                format=keys.get("format", str, "auto"),
                file_column=keys.get("file_column", str, "file"),
                label_column=keys.get("label_column", str, "label"),
                name=keys.get("name", str, "images"),
                **common,
            )
            keys.done()
            return ImageFolderSource(images)
    except ValueError as error:
        if isinstance(error, SourceConfigError):
            raise
        raise SourceConfigError(f"{where}: {error}") from None
    raise SourceConfigError(f"{where}: 'source' must be store, sql or images, not {kind!r}")


class _Keys:
    """Typed reads from a TOML table; ``done()`` refuses keys nobody read (typos)."""

    def __init__(self, table: dict[str, Any], where: str) -> None:
        self.table, self.where, self.read = table, where, set[str]()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.read.add(key)
        if key not in self.table:
            if default is ...:
                raise SourceConfigError(f"{self.where}: missing required key '{key}'")
            return default
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise SourceConfigError(f"{self.where}: '{key}' has the wrong type: {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.read)
        if unknown:
            raise SourceConfigError(f"{self.where}: unknown key(s) {', '.join(unknown)}")


def _strings(values: list[Any], where: str, kind: type = str) -> list[Any]:
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise SourceConfigError(f"{where} must be a non-empty list of {kind.__name__}")
    return values
