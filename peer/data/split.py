"""Distributing one data set across simulated hospitals, IID or label-skewed (non-IID).

Non-IID follows the usual federated-learning benchmark recipe: for every label, the share of
that label's records given to each hospital is drawn from Dirichlet(alpha, ..., alpha); small
alpha gives strongly skewed hospitals. The same shares are applied to the train and to the test
records, so each hospital's test set looks like its own population, as it would in reality.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import SplitError
from .records import PatientRecord
from .store import PatientStore

__all__ = ["split_dataset", "write_hospital_stores"]

_MAX_DRAWS = 200


def split_dataset(
    records: Sequence[PatientRecord],
    n_hospitals: int,
    mode: Literal["iid", "dirichlet"] = "iid",
    alpha: float = 0.5,
    rng: np.random.Generator | None = None,
    *,
    min_train: int = 10,
    min_test: int = 5,
) -> list[list[PatientRecord]]:
    """Partition ``records`` into ``n_hospitals`` disjoint lists, keeping each record's split.

    Args:
        records: the whole data set.
        n_hospitals: how many parts.
        mode: ``"iid"`` (uniformly shuffled, equal sizes) or ``"dirichlet"`` (label skew).
        alpha: Dirichlet concentration (``"dirichlet"`` only); smaller is more skewed.
        rng: generator for the shuffles and Dirichlet draws.
        min_train: every hospital gets at least this many train records.
        min_test: every hospital gets at least this many test records.

    Raises:
        SplitError: the minimums cannot be met (too few records), or no Dirichlet draw met
            them within a bounded number of redraws (raise ``alpha`` or lower the minimums).
    """
    if n_hospitals < 1:
        raise ValueError(f"n_hospitals must be at least 1, not {n_hospitals}")
    if mode not in ("iid", "dirichlet"):
        raise ValueError(f"mode must be 'iid' or 'dirichlet', not {mode!r}")
    if mode == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha must be positive, not {alpha}")
    rng = rng if rng is not None else np.random.default_rng()
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    for name, part, minimum in (("train", train, min_train), ("test", test, min_test)):
        if len(part) < n_hospitals * minimum:
            raise SplitError(
                f"{len(part)} {name} records cannot give {n_hospitals} hospitals at least "
                f"{minimum} each"
            )

    if mode == "iid":
        return _merge(_iid(train, n_hospitals, rng), _iid(test, n_hospitals, rng))

    labels = sorted({r.label for r in records})
    for _ in range(_MAX_DRAWS):
        shares = {label: rng.dirichlet(np.full(n_hospitals, alpha)) for label in labels}
        train_parts = _by_shares(train, shares, n_hospitals, rng)
        test_parts = _by_shares(test, shares, n_hospitals, rng)
        if all(len(p) >= min_train for p in train_parts) and all(
            len(p) >= min_test for p in test_parts
        ):
            return _merge(train_parts, test_parts)
    raise SplitError(
        f"no Dirichlet(alpha={alpha}) draw in {_MAX_DRAWS} gave every one of {n_hospitals} "
        f"hospitals {min_train} train and {min_test} test records; raise alpha or lower the "
        "minimums"
    )


def _iid(
    records: list[PatientRecord], n: int, rng: np.random.Generator
) -> list[list[PatientRecord]]:
    order = rng.permutation(len(records))
    return [[records[int(i)] for i in chunk] for chunk in np.array_split(order, n)]


def _by_shares(
    records: list[PatientRecord],
    shares: dict[int, np.ndarray],
    n: int,
    rng: np.random.Generator,
) -> list[list[PatientRecord]]:
    parts: list[list[PatientRecord]] = [[] for _ in range(n)]
    for label, share in shares.items():
        members = [r for r in records if r.label == label]
        order = rng.permutation(len(members))
        # Largest-remainder rounding: the counts add up exactly to len(members).
        cuts = np.floor(np.cumsum(share) * len(members) + 1e-9).astype(int)
        cuts[-1] = len(members)
        start = 0
        for h in range(n):
            parts[h].extend(members[int(i)] for i in order[start : cuts[h]])
            start = cuts[h]
    return parts


def _merge(
    train_parts: list[list[PatientRecord]], test_parts: list[list[PatientRecord]]
) -> list[list[PatientRecord]]:
    return [a + b for a, b in zip(train_parts, test_parts, strict=True)]


def write_hospital_stores(
    parts: Sequence[Sequence[PatientRecord]],
    destinations: Sequence[str] | str | Path,
    *,
    feature_names: Sequence[str] | None = None,
    dataset_name: str | None = None,
    labelled: bool = True,
) -> list[PatientStore]:
    """Write one database per hospital.

    Args:
        parts: the output of :func:`split_dataset`.
        destinations: one SQLAlchemy URL per part, or a directory in which SQLite files
            ``hospital_1.db`` ... are created.
        feature_names: stored in each database's metadata.
        dataset_name: stored in each database's metadata.
        labelled: False if the records' labels are placeholders (a data set imported without
            a label column): each store then refuses classification sessions.

    Returns:
        the stores, in the order of ``parts``.
    """
    if isinstance(destinations, str | Path) and not str(destinations).count("://"):
        directory = Path(destinations)
        directory.mkdir(parents=True, exist_ok=True)
        urls = [f"sqlite:///{directory / f'hospital_{i + 1}.db'}" for i in range(len(parts))]
    elif isinstance(destinations, str | Path):
        raise ValueError("give a directory or one URL per hospital, not a single URL")
    else:
        urls = list(destinations)
    if len(urls) != len(parts):
        raise ValueError(f"{len(urls)} destinations for {len(parts)} hospitals")
    stores = []
    for url, part in zip(urls, parts, strict=True):
        store = PatientStore(url)
        store.create()
        store.add_records(
            part, feature_names=feature_names, dataset_name=dataset_name, labelled=labelled
        )
        stores.append(store)
    return stores
