"""``ceremony split`` and ``ceremony baseline``: simulated hospitals and what to compare with.

``split`` distributes one data set (the bundled breast-cancer data by default, or a CSV file
validated by :func:`peer.data.import_csv`) across N simulated hospitals, IID or label-skewed
(:func:`peer.data.split_dataset`), and writes one patient database per hospital
(:func:`peer.data.write_hospital_stores`). Its table shows how skewed the hospitals are.

``baseline`` answers "how good could it be?" before anyone pays for privacy: it trains, *without*
DP and without any federation, (1) one model on the union of every hospital's training
records (centralized: the upper bound a federation tries to approach) and (2) one model per
hospital on its own records alone (what a hospital gets by not collaborating), and evaluates
every model on the union of all hospitals' test records.

Standardization follows what each setting could do in reality: the centralized model uses the
mean and standard deviation of the union's training records (the same statistics a federated
session agrees on in its ``standardize`` round, computed from the same sums,
:func:`peer.data.global_standardizer`); a hospital alone only knows its own records, so its
model is trained and evaluated with its *local* statistics, as it would be deployed. On
label-skewed splits this is part of why hospitals alone do worse.

Examples::

    ceremony split --hospitals 3 --mode dirichlet --alpha 0.5 --seed 7 --out data/
    ceremony split --hospitals 3 --names hospital-a hospital-b hospital-c \\
        --url-template 'sqlite:///kits/{hospital}/data.db'
    ceremony split --hospitals 4 --csv patients.csv --label diagnosis --id patient_id --out data/
    ceremony baseline --data data/ --model logreg --epochs 30
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from peer.cli import EXIT_OK, UsageError, one_line

if TYPE_CHECKING:
    from peer.data import PatientRecord

__all__ = [
    "BaselineResult",
    "HospitalData",
    "add_parsers",
    "baseline",
    "destination_urls",
    "load_hospitals",
    "source_records",
]

_ISSUES_SHOWN = 5
_OPTION_OF = {
    "feature_cols": "--features",
    "positive_label": "--positive-label",
    "target_col": "--target",
}


# --------------------------------------------------------------------------- split


def _csv_error(error: Exception) -> UsageError:
    """A one-line :class:`UsageError` from a CSV validation error (first few issues)."""
    from peer.data import CSVImportError

    if not isinstance(error, CSVImportError):
        return UsageError(one_line(error))
    shown = "; ".join(str(issue) for issue in error.issues[:_ISSUES_SHOWN])
    for argument, option in _OPTION_OF.items():  # the user typed options, not arguments
        shown = shown.replace(argument, option)
    more = len(error.issues) - _ISSUES_SHOWN
    tail = f"; ... and {more} more" if more > 0 else ""
    return UsageError(f"{error.path}: {len(error.issues)} problem(s): {shown}{tail}")


def source_records(
    args: argparse.Namespace, rng: np.random.Generator
) -> tuple[list[PatientRecord], list[str], str]:
    """The records to split: ``--csv`` (validated like ``peer data import``) or the bundled
    data set, with their feature names and data set name.

    The CSV goes through :func:`peer.data.import_csv` into an in-memory database, so it gets
    exactly the validation (and label policy) a hospital's own import applies.

    Raises:
        UsageError: CSV options without ``--csv``, or a file that fails validation.
    """
    from peer.data import (
        BUNDLED_DATASET_NAME,
        DataError,
        PatientStore,
        breast_cancer_feature_names,
        breast_cancer_records,
        import_csv,
    )

    csv_options = {
        "--label": args.label,
        "--id": args.id,
        "--features": args.features,
        "--diagnosis": args.diagnosis,
        "--positive-label": args.positive_label,
        "--classes": args.classes,
        "--target": args.target,
    }
    if args.csv is None:
        given = [name for name, value in csv_options.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --csv FILE")
        records = breast_cancer_records(rng, test_fraction=args.test_fraction)
        return records, breast_cancer_feature_names(), BUNDLED_DATASET_NAME
    if args.label is None and args.target is None:
        raise UsageError(
            "--csv needs --label COLUMN (the outcome class) or --target COLUMN (a "
            "regression outcome)"
        )
    store = PatientStore("sqlite://")  # in memory: the one connection lives with the engine
    try:
        import_csv(
            store,
            args.csv,
            args.label,
            id_col=args.id,
            feature_cols=_feature_list(args.features),
            diagnosis_col=args.diagnosis,
            test_fraction=args.test_fraction,
            rng=rng,
            positive_label=args.positive_label,
            classes=args.classes,
            target_col=args.target,
        )
        return store.records(), store.feature_names(), store.dataset_name() or args.csv.stem
    except DataError as error:
        raise _csv_error(error) from None
    finally:
        store.dispose()


def _feature_list(values: Sequence[str] | None) -> list[str] | None:
    """``--features a,b --features c`` -> ``[a, b, c]``."""
    if values is None:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def destination_urls(names: Sequence[str], out: Path | None, template: str | None) -> list[str]:
    """One database URL per hospital: ``<out>/<name>.db`` or ``template`` with ``{hospital}``
    (the name) and ``{index}`` (1-based) filled in.

    Raises:
        UsageError: a template without ``{hospital}`` or ``{index}``, or that does not format.
    """
    if template is None:
        assert out is not None
        directory = out.resolve()
        return [f"sqlite:///{directory / f'{name}.db'}" for name in names]
    if "{hospital}" not in template and "{index}" not in template:
        raise UsageError(
            f"--url-template {template!r} must contain {{hospital}} or {{index}}, "
            "or every hospital would write to the same database"
        )
    try:
        urls = [template.format(hospital=n, index=i + 1) for i, n in enumerate(names)]
    except (KeyError, IndexError, ValueError) as error:
        raise UsageError(
            f"--url-template {template!r}: only {{hospital}} and {{index}} can be filled in "
            f"({error!r})"
        ) from None
    for url in urls:
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return urls


def _check_empty(urls: Sequence[str]) -> None:
    """Refuse to add a simulated hospital's records to a database that already holds some:
    mixing two splits would silently duplicate or clash with patients."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from peer.data import PatientStore

    for url in urls:
        store = PatientStore(url)
        try:
            held = store.count() if inspect(store.engine).has_table("patients") else 0
        except SQLAlchemyError as error:
            raise UsageError(f"cannot open {store.url}: {one_line(error)}") from None
        finally:
            store.dispose()
        if held:
            raise UsageError(
                f"{store.url} already holds {held} patient records; choose an empty "
                "destination (nothing was written)"
            )


def _split_rows(
    parts: Sequence[Sequence[PatientRecord]], names: Sequence[str], urls: Sequence[str]
) -> list[dict[str, Any]]:
    rows = []
    for name, url, part in zip(names, urls, parts, strict=True):
        labels = Counter(r.label for r in part)
        rows.append(
            {
                "hospital": name,
                "url": url,
                "records": len(part),
                "train": sum(1 for r in part if r.split == "train"),
                "test": sum(1 for r in part if r.split == "test"),
                "labels": {"0": labels.get(0, 0), "1": labels.get(1, 0)},
                "diagnoses": dict(sorted(Counter(r.diagnosis for r in part).items())),
            }
        )
    return rows


def _print_split(rows: Sequence[Mapping[str, Any]], header: str) -> None:
    print(header)
    width = max(len("hospital"), *(len(r["hospital"]) for r in rows))
    print(
        f"{'hospital':<{width}}  {'records':>7}  {'train':>5}  {'test':>5}  "
        f"{'label 0':>7}  {'label 1':>7}  {'% label 1':>9}  database"
    )
    totals = Counter[str]()
    for row in rows:
        zero, one = row["labels"]["0"], row["labels"]["1"]
        share = 100.0 * one / row["records"] if row["records"] else math.nan
        print(
            f"{row['hospital']:<{width}}  {row['records']:>7}  {row['train']:>5}  "
            f"{row['test']:>5}  {zero:>7}  {one:>7}  {share:>8.1f}%  {row['url']}"
        )
        totals.update(records=row["records"], train=row["train"], test=row["test"])
        totals.update(zero=zero, one=one)
    share = 100.0 * totals["one"] / totals["records"] if totals["records"] else math.nan
    print(
        f"{'all':<{width}}  {totals['records']:>7}  {totals['train']:>5}  {totals['test']:>5}  "
        f"{totals['zero']:>7}  {totals['one']:>7}  {share:>8.1f}%"
    )


def _add_split(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "split",
        help="split a data set across simulated hospitals, one patient database each",
        description=(
            "Distribute the bundled breast-cancer data set (or --csv FILE) across N\n"
            "simulated hospitals, IID or label-skewed (Dirichlet), keeping each record's\n"
            "train/test split, and write one patient database per hospital. Prints the\n"
            "records and labels per hospital. Exit 0, or 2 for bad arguments or data."
        ),
        epilog="Examples:" + (__doc__ or "").split("Examples::", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hospitals", type=int, required=True, metavar="N")
    parser.add_argument(
        "--mode",
        choices=("iid", "dirichlet"),
        default="iid",
        help="iid: equal shuffled shares; dirichlet: label skew (default iid)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        metavar="A",
        help="Dirichlet concentration: smaller is more skewed (default 0.5)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", help="seed of the split (default: random, printed)"
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, metavar="DIR", help="write DIR/<hospital>.db")
    where.add_argument(
        "--url-template",
        metavar="URL",
        help="a SQLAlchemy URL per hospital, e.g. 'sqlite:///kits/{hospital}/data.db'",
    )
    parser.add_argument(
        "--names", nargs="+", metavar="NAME", help="hospital names (default hospital_1 ...)"
    )
    parser.add_argument("--min-train", type=int, default=10, metavar="K", help="default 10")
    parser.add_argument("--min-test", type=int, default=5, metavar="K", help="default 5")
    source = parser.add_argument_group("CSV source (default: the bundled data set)")
    source.add_argument("--csv", type=Path, metavar="FILE")
    source.add_argument(
        "--label", metavar="COL", help="the label column (binary, or class indices with --classes)"
    )
    source.add_argument(
        "--classes", type=int, metavar="K", help="labels are class indices 0..K-1 (multi-class)"
    )
    source.add_argument(
        "--target", metavar="COL", help="a numeric regression outcome column (stored as target)"
    )
    source.add_argument("--id", metavar="COL", help="the patient id column")
    source.add_argument(
        "--features",
        action="append",
        metavar="COLS",
        help="feature columns, comma-separated (default: every other column)",
    )
    source.add_argument("--diagnosis", metavar="COL", help="a diagnosis text column")
    source.add_argument("--positive-label", metavar="V", help="the label value meaning 1")
    parser.add_argument("--test-fraction", type=float, default=0.2, metavar="F", help="default 0.2")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_split)


def _cmd_split(args: argparse.Namespace) -> int:
    from peer.data import DataError, split_dataset, write_hospital_stores

    n = args.hospitals
    if n < 1:
        raise UsageError(f"--hospitals must be at least 1, not {n}")
    if not 0.0 <= args.test_fraction < 1.0:
        raise UsageError(f"--test-fraction must be in [0, 1), not {args.test_fraction}")
    if args.mode == "dirichlet" and not args.alpha > 0:
        raise UsageError(f"--alpha must be positive, not {args.alpha}")
    names = list(args.names) if args.names else [f"hospital_{i + 1}" for i in range(n)]
    if len(names) != n:
        raise UsageError(f"--names gives {len(names)} names for --hospitals {n}")
    if len(set(names)) != n:
        raise UsageError("--names must not repeat a name")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    rng = np.random.default_rng(seed)
    records, feature_names, dataset_name = source_records(args, rng)
    try:
        parts = split_dataset(
            records,
            n,
            args.mode,
            args.alpha,
            rng,
            min_train=args.min_train,
            min_test=args.min_test,
        )
    except DataError as error:
        raise UsageError(f"{error} (--min-train, --min-test)") from None
    urls = destination_urls(names, args.out, args.url_template)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    _check_empty(urls)
    try:
        stores = write_hospital_stores(
            parts,
            urls,
            feature_names=feature_names,
            dataset_name=dataset_name,
            # A CSV split with --target alone has placeholder labels: the stores say so.
            labelled=args.csv is None or args.label is not None,
        )
    except DataError as error:
        raise UsageError(one_line(error)) from None
    for store in stores:
        store.dispose()
    rows = _split_rows(parts, names, urls)
    if args.json:
        report = {
            "dataset": dataset_name,
            "mode": args.mode,
            "alpha": args.alpha if args.mode == "dirichlet" else None,
            "seed": seed,
            "features": feature_names,
            "hospitals": rows,
        }
        print(json.dumps(report, sort_keys=True))
    else:
        skew = f", alpha {args.alpha:g}" if args.mode == "dirichlet" else ""
        _print_split(
            rows,
            f"{dataset_name}: {len(records)} records, {len(feature_names)} features, split "
            f"{args.mode}{skew} across {n} hospitals (seed {seed})",
        )
    return EXIT_OK


# --------------------------------------------------------------------------- baseline


@dataclass(frozen=True)
class HospitalData:
    """One hospital's records, as loaded from its database."""

    name: str
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


@dataclass(frozen=True)
class BaselineResult:
    """One non-private reference model and how it scores.

    Attributes:
        setting: ``"centralized"`` or the hospital's name (trained on its records alone).
        train_records: examples the model was trained on.
        metrics: accuracy, loss, AUC, sensitivity, specificity (and n) on the union of every
            hospital's test records (:func:`peer.training.metrics_from_sums`).
        own_test: the same on the training hospital's own test records (None: centralized).
    """

    setting: str
    train_records: int
    metrics: Mapping[str, float]
    own_test: Mapping[str, float] | None = None

    def as_json(self) -> dict[str, Any]:
        def clean(values: Mapping[str, float] | None) -> dict[str, float | None] | None:
            if values is None:
                return None
            return {k: (None if math.isnan(v) else v) for k, v in values.items()}

        return {
            "setting": self.setting,
            "train_records": self.train_records,
            "metrics": clean(self.metrics),
            "own_test": clean(self.own_test),
        }


def _data_urls(items: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, URL)`` per hospital: a directory gives its ``*.db`` files (sorted), a file is
    a SQLite database, anything with ``://`` is a SQLAlchemy URL."""
    found: list[tuple[str, str]] = []
    for item in items:
        if "://" in item:
            found.append((item.rsplit("/", 1)[-1].removesuffix(".db") or item, item))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(path.glob("*.db"))
            if not files:
                raise UsageError(f"--data {item}: no *.db files in this directory")
            found += [(f.stem, f"sqlite:///{f.resolve()}") for f in files]
        elif path.is_file():
            found.append((path.stem, f"sqlite:///{path.resolve()}"))
        else:
            raise UsageError(f"--data {item}: no such file or directory (or give a URL)")
    names = [name for name, _ in found]
    if len(set(names)) != len(names):  # e.g. two directories both holding hospital_1.db
        found = [(url, url) for _, url in found]
    return found


def load_hospitals(items: Sequence[str]) -> list[HospitalData]:
    """Every hospital's train and test records, checking they share one feature layout.

    Raises:
        UsageError: unreadable database, no training records, or different features.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from peer.data import DataError, PatientStore

    hospitals: list[HospitalData] = []
    reference: tuple[str, list[str]] | None = None
    for name, url in _data_urls(items):
        store = PatientStore(url)
        try:
            features = store.feature_names()
            x_train, y_train = store.load("train")
            x_test, y_test = store.load("test")
        except (SQLAlchemyError, DataError) as error:
            raise UsageError(
                f"{store.url}: cannot read patient records ({one_line(error)})"
            ) from None
        finally:
            store.dispose()
        if len(y_train) == 0:
            raise UsageError(f"{store.url}: no training records")
        if reference is None:
            reference = (store.url, features)
        elif features != reference[1]:
            raise UsageError(
                f"{store.url} has features {features[:3]}... ({len(features)}), but "
                f"{reference[0]} has {reference[1][:3]}... ({len(reference[1])}): "
                "the hospitals do not hold the same data set"
            )
        hospitals.append(HospitalData(name, x_train, y_train, x_test, y_test))
    return hospitals


def baseline(
    hospitals: Sequence[HospitalData],
    *,
    model: str = "logreg",
    hidden: Sequence[int] = (64, 32),
    epochs: float = 30.0,
    batch_size: int = 32,
    lr: float = 0.5,
    seed: int = 0,
) -> list[BaselineResult]:
    """Centralized training on the union, then each hospital alone; all non-private.

    Training is :func:`peer.training.local_train` with ``clip_norm=None`` (plain SGD with
    Poisson sampling, the same optimizer DP-SGD uses minus clipping and noise), from the same
    initial weights (``seed``) in every setting. See the module docstring for how each
    setting is standardized.

    Raises:
        ValueError: bad hyper-parameters (from the training library).
    """
    from peer.data import global_standardizer, local_feature_stats, standardize
    from peer.training import (
        ModelSpec,
        build_model,
        evaluate_sums,
        local_train,
        metrics_from_sums,
        secure_generator,
    )

    if not hospitals:
        raise ValueError("no hospitals")
    d = hospitals[0].x_train.shape[1]
    spec = ModelSpec(model, d, tuple(hidden))  # type: ignore[arg-type]
    x_test = np.concatenate([h.x_test for h in hospitals])
    y_test = np.concatenate([h.y_test for h in hospitals])

    def fit(
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.int64],
        mean: npt.NDArray[np.float64],
        std: npt.NDArray[np.float64],
    ) -> Any:
        trained = build_model(spec, seed)
        local_train(
            trained,
            standardize(x, mean, std),
            y,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            clip_norm=None,
            noise_multiplier=0.0,
            # Not secret (no DP here): a seeded generator makes the baseline reproducible.
            rng=secure_generator(seed.to_bytes(8, "little", signed=True)),
        )
        return trained

    def score(
        trained: Any,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.int64],
        mean: npt.NDArray[np.float64],
        std: npt.NDArray[np.float64],
    ) -> dict[str, float]:
        return metrics_from_sums(evaluate_sums(trained, standardize(x, mean, std), y))

    # Summing the hospitals' sums is exactly what a federation's standardize round does.
    mean, std = global_standardizer(
        np.sum([local_feature_stats(h.x_train) for h in hospitals], axis=0), d
    )
    x_all = np.concatenate([h.x_train for h in hospitals])
    y_all = np.concatenate([h.y_train for h in hospitals])
    central = fit(x_all, y_all, mean, std)
    results = [BaselineResult("centralized", len(y_all), score(central, x_test, y_test, mean, std))]
    for h in hospitals:
        own_mean, own_std = global_standardizer(local_feature_stats(h.x_train), d)
        alone = fit(h.x_train, h.y_train, own_mean, own_std)
        results.append(
            BaselineResult(
                h.name,
                len(h.y_train),
                score(alone, x_test, y_test, own_mean, own_std),
                score(alone, h.x_test, h.y_test, own_mean, own_std),
            )
        )
    return results


def _print_baseline(
    results: Sequence[BaselineResult], n_test: int, args: argparse.Namespace
) -> None:
    model = args.model + (f" {args.hidden}" if args.model == "mlp" else "")
    print(
        f"non-private {model}, {args.epochs:g} epochs, batch {args.batch_size}, lr {args.lr:g}, "
        f"seed {args.seed}; evaluated on the union of the test splits ({n_test} patients)"
    )
    width = max(len("setting"), *(len(r.setting) + len(" alone") for r in results))
    print(
        f"{'setting':<{width}}  {'train':>6}  {'accuracy':>8}  {'AUC':>6}  {'loss':>6}  "
        f"{'sensitivity':>11}  {'specificity':>11}  {'own test acc':>12}"
    )
    for r in results:
        name = r.setting if r.own_test is None else f"{r.setting} alone"
        m = r.metrics
        own = "-" if r.own_test is None else f"{r.own_test['accuracy']:.4f}"
        print(
            f"{name:<{width}}  {r.train_records:>6}  {m['accuracy']:>8.4f}  {m['auc']:>6.3f}  "
            f"{m['loss']:>6.3f}  {m['sensitivity']:>11.3f}  {m['specificity']:>11.3f}  {own:>12}"
        )
    print(
        "standardized with the union's training statistics (centralized) or each hospital's "
        "own (alone)"
    )


_BASELINE_HELP = """\
Train without DP and without any federation (1) one model on the union of every
hospital's training records (centralized: what a federation tries to approach) and
(2) one model per hospital on its own records alone (what it gets by not
collaborating); evaluate every model on the union of all hospitals' test records.
Exit 0, or 2 for bad arguments or unreadable data.

Standardization: the centralized model uses the mean and standard deviation of the
union's training records (the statistics a federated session agrees on in its
standardize round); a hospital alone only knows its own records, so its model is
trained and evaluated with its local statistics, as it would be deployed."""


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated widths") from None
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: widths must be positive")
    return widths


def _add_baseline(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "baseline",
        help="non-private reference accuracies: centralized and each hospital alone",
        description=_BASELINE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="DIR_OR_URL",
        help="a directory of <hospital>.db files (as `ceremony split` writes), database "
        "files, or SQLAlchemy URLs",
    )
    parser.add_argument("--model", choices=("logreg", "mlp"), default="logreg")
    parser.add_argument(
        "--hidden",
        type=_parse_hidden,
        default=(64, 32),
        metavar="W,W",
        help="hidden widths of the mlp (default 64,32)",
    )
    parser.add_argument("--epochs", type=float, default=30.0, metavar="E", help="default 30")
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="B", help="expected batch (default 32)"
    )
    parser.add_argument("--lr", type=float, default=0.5, metavar="LR", help="default 0.5")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and sampling")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_baseline)


def _cmd_baseline(args: argparse.Namespace) -> int:
    if not args.epochs > 0 or not args.lr > 0 or args.batch_size < 1:
        raise UsageError("--epochs, --lr and --batch-size must be positive")
    hospitals = load_hospitals(args.data)
    try:
        results = baseline(
            hospitals,
            model=args.model,
            hidden=args.hidden,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
        )
    except ValueError as error:
        raise UsageError(one_line(error)) from None
    n_test = sum(len(h.y_test) for h in hospitals)
    if args.json:
        report = {
            "model": args.model,
            "hidden": list(args.hidden) if args.model == "mlp" else None,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "test_records": n_test,
            "results": [r.as_json() for r in results],
        }
        print(json.dumps(report, sort_keys=True))
    else:
        _print_baseline(results, n_test, args)
    return EXIT_OK


def add_parsers(subparsers: Any) -> None:
    """Register ``split`` and ``baseline`` on ``ceremony``'s subparsers."""
    _add_split(subparsers)
    _add_baseline(subparsers)
