"""``peer`` — run a hospital's peer, and the peer-side maintenance commands.

peer start --config hospital_a.toml [--log-format json]
peer verify-ledger --config hospital_a.toml [--json]
peer doctor --config hospital_a.toml [--json]
peer data import --config hospital_a.toml --csv patients.csv --label diagnosis [--id pid] [--json]
peer data show --config hospital_a.toml [--json]   (any source: store, SQL, images)

Exit codes: 0 done, 1 a check failed (verify-ledger, doctor), 2 a mistake in the arguments, the
configuration or the input file (one line on stderr saying what; for a CSV that fails
validation, one more line per problem naming its row and column).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import ledger_check
from .cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ArgumentParser,
    UsageError,
    one_line,
    run_command,
)

if TYPE_CHECKING:
    from .config import PeerConfig
    from .data import CSVImportError

__all__ = ["main"]


def _load_config(path: str) -> PeerConfig:
    from .config import ConfigFileError, load_config

    try:
        return load_config(path)
    except (ConfigFileError, OSError, ValueError) as error:
        raise UsageError(str(error)) from None


def _start(args: argparse.Namespace) -> int:
    from .beacon import TEST_NONCE_ENV, nonce_source_from_env
    from .config import ConfigFileError, load_config
    from .faults import from_environment
    from .identity import IdentityError
    from .logs import configure_logging
    from .node import PeerNode

    configure_logging(args.log_format)
    try:
        config = load_config(args.config)
        nonce_rng = nonce_source_from_env(os.environ)
        if nonce_rng is not None:
            logging.getLogger("peer").warning(
                "peer=%s beacon nonces are fixed by %s: for tests only",
                config.peer_id,
                TEST_NONCE_ENV,
            )
        node = PeerNode(config, nonce_rng=nonce_rng, faults=from_environment())
    except (ConfigFileError, IdentityError, OSError, ValueError) as error:
        raise UsageError(str(error)) from None

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, node.stop)

        def ready(port: int) -> None:
            # One machine-readable line on stdout, for supervisors and tests.
            print(json.dumps({"event": "ready", "peer": config.peer_id, "port": port}), flush=True)

        await node.serve(on_ready=ready)

    try:
        asyncio.run(run())
    except (IdentityError, OSError) as error:
        raise UsageError(str(error)) from None
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    report = run_doctor(args.config)
    print(report.to_json() if args.json else report.to_text())
    return report.exit_code


# --------------------------------------------------------------------------- data


# The importer's messages name its Python arguments; here the user typed options.
_OPTION_OF = {
    "feature_cols": "--features",
    "positive_label": "--positive-label",
    "target_col": "--target",
}


def _as_options(message: str) -> str:
    for argument, option in _OPTION_OF.items():
        message = message.replace(argument, option)
    return message


def _import_failure(error: CSVImportError, as_json: bool) -> int:
    """Report every problem of a rejected CSV: a summary line, then one line per problem."""
    issues = error.issues
    print(
        f"peer data import: error: {error.path}: {len(issues)} problem(s), nothing was "
        "imported (the database is unchanged)",
        file=sys.stderr,
    )
    for issue in issues:
        print(f"  {_as_options(str(issue))}", file=sys.stderr)
    if as_json:
        problems = [
            {"line": i.line, "column": i.column, "message": _as_options(i.message)} for i in issues
        ]
        print(json.dumps({"ok": False, "path": error.path, "issues": problems}, sort_keys=True))
    return EXIT_USAGE


def _data_import(args: argparse.Namespace) -> int:
    import numpy as np
    from sqlalchemy.exc import SQLAlchemyError

    from .data import CSVImportError, DataError, PatientStore, import_csv
    from .data.source import NO_LABEL_NOTE

    if not 0.0 <= args.test_fraction < 1.0:
        raise UsageError(f"--test-fraction must be in [0, 1), not {args.test_fraction}")
    if args.label is None and args.target is None:
        raise UsageError("give --label COL (the outcome class), --target COL (regression), or both")
    config = _load_config(args.config)
    features = None
    if args.features is not None:
        features = [n.strip() for value in args.features for n in value.split(",") if n.strip()]
    store = PatientStore(config.data_url)
    try:
        report = import_csv(
            store,
            args.csv,
            args.label,
            id_col=args.id,
            feature_cols=features,
            diagnosis_col=args.diagnosis,
            test_fraction=args.test_fraction,
            # The train/test assignment is not secret; --seed makes it reproducible.
            rng=np.random.default_rng(args.seed),
            positive_label=args.positive_label,
            classes=args.classes,
            target_col=args.target,
        )
    except CSVImportError as error:
        return _import_failure(error, args.json)
    except DataError as error:
        raise UsageError(
            f"{args.csv}: {error} (nothing was imported; the database is unchanged)"
        ) from None
    except SQLAlchemyError as error:
        raise UsageError(f"cannot write to {store.url}: {one_line(error)}") from None
    finally:
        store.dispose()
    result = {
        "ok": True,
        "peer": config.peer_id,
        "database": store.url,
        "path": report.path,
        "records": report.n_records,
        "train": report.n_train,
        "test": report.n_test,
        "features": report.feature_names,
        "label_mapping": report.label_mapping,
        "generated_ids": report.generated_ids,
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return EXIT_OK
    mapping = ", ".join(
        f"{raw!r} -> {label}" for raw, label in sorted(report.label_mapping.items())
    )
    print(
        f"{config.peer_id}: imported {report.n_records} records from {report.path} into "
        f"{store.url} ({report.n_train} train, {report.n_test} test)"
    )
    print(f"features ({len(report.feature_names)}): {', '.join(report.feature_names)}")
    print(f"label: {mapping}" if args.label is not None else f"label: none ({NO_LABEL_NOTE})")
    if report.generated_ids:
        print("patient ids generated from the file name and line number (no --id column)")
    return EXIT_OK


def _data_summary(config: PeerConfig) -> dict[str, Any]:
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from .data import DataError, PatientStore

    store = PatientStore(config.data_url)
    try:
        if not inspect(store.engine).has_table("patients"):
            raise UsageError(
                f"{store.url} holds no patient data yet; import some with: peer data import "
                f"--config {config.path} --csv FILE --label COLUMN"
            )
        splits: dict[str, dict[str, Any]] = {}
        for split in ("train", "test"):
            records = store.records(split)
            splits[split] = {
                "records": len(records),
                "labels": {str(k): v for k, v in sorted(Counter(r.label for r in records).items())},
                "diagnoses": dict(sorted(Counter(r.diagnosis for r in records).items())),
            }
        return {
            "peer": config.peer_id,
            "database": store.url,
            "dataset": store.dataset_name(),
            "features": store.feature_names(),
            "splits": splits,
            # Aggregates of the regression target, as the [data] sources report it.
            "target": target.as_json() if (target := store.target_summary()) else None,
            # False after an import with --target and no --label: every label is 0.
            "labelled": store.has_labels(),
        }
    except (SQLAlchemyError, DataError) as error:
        raise UsageError(f"cannot read {store.url}: {one_line(error)}") from None
    finally:
        store.dispose()


def _source_show(args: argparse.Namespace) -> int | None:
    """``peer data show`` for a file with a ``[data]`` table (SQL, images, store); None if
    the file has none (the store summary below then applies, as before)."""
    from pathlib import Path

    from .data import DataError, SourceError, read_data_file

    try:
        file = read_data_file(Path(args.config))
        if file.table is None:
            return None
        info = file.source().describe()
    except SourceError as error:
        # Like a rejected CSV: a summary line, then one line per problem.
        print(
            f"peer data show: error: {error.source}: {len(error.issues)} problem(s), nothing "
            "was used",
            file=sys.stderr,
        )
        for issue in error.issues:
            print(f"  {issue}", file=sys.stderr)
        if args.json:
            problems = [{"subject": i.subject, "message": i.message} for i in error.issues]
            print(json.dumps({"ok": False, "source": error.source, "issues": problems}))
        return EXIT_USAGE
    except DataError as error:
        raise UsageError(str(error)) from None
    peer = file.peer_id or file.path.stem
    if args.json:
        print(json.dumps({"peer": peer, **info.as_json()}, sort_keys=True))
    else:
        print(f"{peer}: " + "\n".join(info.summary_lines()))
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from .data.source import NO_LABEL_NOTE

    shown = _source_show(args)
    if shown is not None:
        return shown
    summary = _data_summary(_load_config(args.config))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return EXIT_OK
    features = summary["features"]
    print(
        f"{summary['peer']}: data set {summary['dataset']!r} in {summary['database']}, "
        f"{len(features)} features"
    )
    print(f"{'split':<5}  {'records':>7}  {'label 0':>7}  {'label 1':>7}  diagnoses")
    total: Counter[str] = Counter()
    for split, part in summary["splits"].items():
        labels = part["labels"]
        diagnoses = ", ".join(f"{d} {n}" for d, n in part["diagnoses"].items()) or "-"
        print(
            f"{split:<5}  {part['records']:>7}  {labels.get('0', 0):>7}  "
            f"{labels.get('1', 0):>7}  {diagnoses}"
        )
        total.update(part["diagnoses"])
    records = sum(part["records"] for part in summary["splits"].values())
    everyone = ", ".join(f"{d} {n}" for d, n in sorted(total.items())) or "-"
    print(f"{'all':<5}  {records:>7}  {'':>7}  {'':>7}  {everyone}")
    target = summary["target"]
    if target is not None:
        print(
            f"target: {target['count']} values, {target['missing']} missing, "
            f"mean {target['mean']:.4g}, std {target['std']:.4g}"
        )
    if not summary["labelled"]:
        print(f"note: {NO_LABEL_NOTE}; classification sessions are refused")
    return EXIT_OK


def _add_data(commands: Any) -> None:
    data = commands.add_parser("data", help="the peer's patient database: import, show")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    importer = actions.add_parser(
        "import",
        help="import a CSV file of patient records into the peer's data database",
        description=(
            "Validate a CSV file (header row, UTF-8) and store its records in the data "
            "database of the peer's configuration, with a label-stratified train/test split. "
            "Every problem is reported with its line and column (missing values, "
            "non-numeric columns, a label that is not binary, duplicate ids), and then "
            "nothing is imported. Numeric labels must be 0/1; text labels need exactly two "
            "values (M/B, malignant/benign, positive/negative, yes/no... are recognized; "
            "otherwise name the positive one with --positive-label). With --classes K the "
            "labels are class indices 0..K-1; --target COL stores a numeric regression "
            "outcome."
        ),
    )
    importer.add_argument("--config", required=True, help="the peer's TOML configuration")
    importer.add_argument("--csv", required=True, metavar="FILE", help="the CSV file")
    importer.add_argument(
        "--label", metavar="COL", help="the label column (binary, or class indices with --classes)"
    )
    importer.add_argument(
        "--classes", type=int, metavar="K", help="labels are class indices 0..K-1 (multi-class)"
    )
    importer.add_argument(
        "--target", metavar="COL", help="a numeric regression outcome column (stored as target)"
    )
    importer.add_argument(
        "--id", metavar="COL", help="the patient id column (default: file name and line)"
    )
    importer.add_argument(
        "--features",
        action="append",
        metavar="COLS",
        help="feature columns, comma-separated, in order (default: all the other columns)",
    )
    importer.add_argument(
        "--diagnosis",
        metavar="COL",
        help="a diagnosis text column (default: a text label itself, or positive/negative)",
    )
    importer.add_argument("--positive-label", metavar="V", help="the label value meaning 1")
    importer.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="share of each label kept for testing (default 0.2)",
    )
    importer.add_argument(
        "--seed", type=int, help="seed of the train/test assignment (default: random)"
    )
    importer.add_argument("--json", action="store_true", help="print one JSON object")
    importer.set_defaults(handler=_data_import)
    show = actions.add_parser(
        "show",
        help="records per split, label and diagnosis in the peer's data database",
        description=(
            "Summarize the peer's data: records per split and label, feature names or image "
            "shape, per-column type/missing/mean/std -- never a patient's record. Reads the "
            "source the file's [data] table declares (sql, images, store), else the peer's "
            "patient database ([storage] data)."
        ),
    )
    show.add_argument("--config", required=True, help="the peer's TOML configuration")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(handler=_data_show)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="peer", description="A hospital's secure aggregation peer.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run the peer (mTLS gRPC server and session runner)")
    start.add_argument("--config", required=True, help="the peer's TOML configuration")
    start.add_argument("--log-format", choices=("text", "json"), default="text")
    start.set_defaults(handler=_start)
    verify = commands.add_parser(
        "verify-ledger", help="check the ledger's hash chain and signatures"
    )
    ledger_check.add_arguments(verify)
    doctor = commands.add_parser(
        "doctor",
        help="check this site before joining and whenever something is wrong",
        description=(
            "Check the configuration, file permissions, certificates, roster, CRL, databases, "
            "disk space, TensorFlow, the clock and every roster peer; print OK/WARN/FAIL per "
            "item with what to do. Exit 1 when anything FAILs."
        ),
    )
    doctor.add_argument("--config", required=True, help="the peer's TOML configuration")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(handler=_doctor)
    _add_data(commands)
    try:
        # Every error names the tool only ("peer: error: ..."), whichever the subcommand.
        return run_command(parser, argv, prog=lambda _: "peer")
    except KeyboardInterrupt:
        logging.getLogger("peer").info("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
