"""``ceremony``: the consortium's operator tool.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments
and ``_cmd_<name>(args) -> int`` runs it. ``main`` dispatches; errors in the arguments or
input files are one line on stderr with exit code 2 (see :mod:`peer.cli`).

Subcommands:

* ``simulate`` — one secure aggregation round in memory, with dropouts or a malicious
  aggregator, checked against the plain sum; timings and bytes per peer.
* ``bench`` — benchmarks (``ceremony bench secagg``), delegated to :mod:`scripts.bench`.
* ``init-ca``, ``request``, ``sign``, ``roster``, ``revoke``, ``kit``, ``verify-ledger`` —
  the identity ceremony and the ledger check (:mod:`scripts.ceremony_identity`).
* ``run`` — propose a session to the peers, start it and watch it (:mod:`scripts.ceremony_run`,
  on the operator library :mod:`peer.operator`).
* ``demo`` — a whole federation on this machine, then the dashboard
  (:mod:`scripts.ceremony_demo`).
* ``stats`` — federated DP statistics (counts, histograms, means) over the peers' patients
  (:mod:`scripts.ceremony_stats`).
* ``privacy`` — epsilon of a DP-SGD schedule, or the noise for a target
  (:mod:`scripts.ceremony_privacy`).
* ``report`` — a printable audit report (HTML or PDF) of one session from a peer's ledger
  (:mod:`scripts.ceremony_report`).
* ``export`` — the agreed metrics of a ledger as TensorBoard or MLflow runs
  (:mod:`scripts.ceremony_export`).
* ``split``, ``baseline`` — split a data set across simulated hospitals; non-private
  reference accuracies (:mod:`scripts.ceremony_data`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from peer.cli import (
    EXIT_FAILED,
    EXIT_OK,
    ArgumentParser,
    UsageError,
    run_command,
)
from peer.operator import OperatorError
from secagg import ConfigError, GraphKind, Stage, recommend_parameters
from secagg.graph import minimum_threshold
from secagg.simulate import Attack, Progress, SimulationResult, simulate, too_many_drops

from . import (
    ceremony_data,
    ceremony_demo,
    ceremony_export,
    ceremony_identity,
    ceremony_privacy,
    ceremony_report,
    ceremony_run,
    ceremony_stats,
)

__all__ = ["build_parser", "main"]

PROG = "ceremony"
RING_BITS = 32
# Default SecAgg+ parameters when --degree is omitted: recommend_parameters for at least
# this dropout fraction (or the fraction actually requested, if larger) and this fraction of
# peers colluding with the aggregator, at its default 2^-40 failure probability.
DEFAULT_DROPOUT_FRACTION = 0.1
DEFAULT_CORRUPTION_FRACTION = 0.05
# Progress on stderr from this many peers on (or whenever stderr is a terminal).
PROGRESS_FROM_PEERS = 100


# --------------------------------------------------------------------------- simulate


def _add_simulate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run one secure aggregation round in memory and check it",
        description=(
            "Run one SecAgg / SecAgg+ round with N in-memory peers, the same protocol objects "
            "a real peer drives, with dropouts or a malicious aggregator injected. Exit code 0 "
            "when the round verified (or, under --attack, the honest peers refused), 1 when "
            "it did not, 2 for bad arguments."
        ),
    )
    parser.add_argument("--peers", type=int, required=True, metavar="N", help="number of peers")
    parser.add_argument(
        "--length", type=int, required=True, metavar="M", help="vector length (ring words)"
    )
    parser.add_argument(
        "--threshold",
        type=int,
        metavar="T",
        help="shares needed to unmask (default: a strict majority of each neighbourhood)",
    )
    parser.add_argument(
        "--graph",
        choices=[kind.value for kind in GraphKind],
        default=GraphKind.COMPLETE.value,
        help="neighbour graph: complete (SecAgg) or secagg+ (sparse, O(log n) neighbours)",
    )
    parser.add_argument(
        "--degree",
        type=int,
        metavar="K",
        help=(
            "SecAgg+ neighbours per peer, even (default: recommend_parameters for "
            f"max({DEFAULT_DROPOUT_FRACTION:.0%}, requested) dropouts and "
            f"{DEFAULT_CORRUPTION_FRACTION:.0%} corrupted peers)"
        ),
    )
    parser.add_argument(
        "--drop",
        action="extend",
        nargs="+",
        default=[],
        metavar="STAGE:COUNT",
        help=(
            "COUNT peers (chosen by the seed) drop out at STAGE, one of "
            + ", ".join(stage.value for stage in Stage)
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation (default 0)")
    parser.add_argument(
        "--inputs", type=Path, metavar="X.npy", help="an (N, M) uint32 array of inputs"
    )
    parser.add_argument(
        "--output", type=Path, metavar="Y.npy", help="write the aggregate (uint32) here"
    )
    parser.add_argument(
        "--attack",
        choices=[attack.value for attack in Attack],
        help="play a malicious aggregator and report how the honest peers refused",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(handler=_cmd_simulate)


def _parse_drops(specs: Sequence[str]) -> dict[Stage, int]:
    stages = ", ".join(stage.value for stage in Stage)
    drops: dict[Stage, int] = {}
    for spec in specs:
        name, sep, count_text = spec.partition(":")
        if not sep:
            raise UsageError(f"--drop {spec}: expected STAGE:COUNT, e.g. masked:3")
        try:
            stage = Stage(name)
        except ValueError:
            raise UsageError(f"--drop {spec}: unknown stage {name!r} (stages: {stages})") from None
        try:
            count = int(count_text)
        except ValueError:
            raise UsageError(f"--drop {spec}: COUNT must be an integer") from None
        if count < 0:
            raise UsageError(f"--drop {spec}: COUNT must not be negative")
        drops[stage] = drops.get(stage, 0) + count
    return drops


def _load_inputs(path: Path, peers: int, length: int) -> np.ndarray[Any, np.dtype[np.uint32]]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"--inputs {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"--inputs {path}: not a readable .npy array ({error})") from None
    if not isinstance(loaded, np.ndarray):
        raise UsageError(f"--inputs {path}: expected one .npy array, not an .npz archive")
    if loaded.dtype != np.uint32:
        raise UsageError(f"--inputs {path}: dtype is {loaded.dtype}, expected uint32")
    if loaded.shape != (peers, length):
        raise UsageError(
            f"--inputs {path}: shape is {loaded.shape}, expected ({peers}, {length}) "
            "for --peers and --length"
        )
    return loaded


def _round_parameters(args: argparse.Namespace, drops: dict[Stage, int]) -> tuple[int | None, int]:
    """The SecAgg+ degree (None for the complete graph) and the threshold of the round."""
    n = args.peers
    if args.graph == GraphKind.COMPLETE.value:
        if args.degree is not None:
            raise UsageError("--degree only applies to --graph secagg+")
        return None, args.threshold if args.threshold is not None else minimum_threshold(n)
    if args.degree is not None:
        if args.degree < 2 or args.degree % 2:
            raise UsageError(f"--degree must be even and at least 2, not {args.degree}")
        if args.degree > n - 1:
            raise UsageError(f"--degree {args.degree} is above the {n - 1} other peers")
        degree = args.degree
        default_threshold = minimum_threshold(degree + 1)
    else:
        fraction = max(DEFAULT_DROPOUT_FRACTION, sum(drops.values()) / n)
        try:
            degree, default_threshold = recommend_parameters(
                n, min(fraction, 0.99), DEFAULT_CORRUPTION_FRACTION
            )
        except ConfigError as error:
            raise UsageError(f"{error}; pass --degree and --threshold") from None
    threshold = args.threshold if args.threshold is not None else default_threshold
    return degree, threshold


def _cmd_simulate(args: argparse.Namespace) -> int:
    if args.peers < 2:
        raise UsageError(f"--peers must be at least 2, not {args.peers}")
    if args.length < 1:
        raise UsageError(f"--length must be at least 1, not {args.length}")
    if args.threshold is not None and not 1 <= args.threshold <= args.peers:
        raise UsageError(
            f"--threshold {args.threshold} must be between 1 and the number of peers {args.peers}"
        )
    drops = _parse_drops(args.drop)
    degree, threshold = _round_parameters(args, drops)
    problem = too_many_drops(args.peers, threshold, drops)
    if problem is not None:
        raise UsageError(problem)
    inputs = _load_inputs(args.inputs, args.peers, args.length) if args.inputs else None
    if args.output is not None and not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: directory {args.output.parent} does not exist")

    show_progress = not args.quiet and (sys.stderr.isatty() or args.peers >= PROGRESS_FROM_PEERS)
    result = simulate(
        args.peers,
        args.length,
        threshold=threshold,
        graph=GraphKind(args.graph),
        degree=degree,
        drops=drops,
        seed=args.seed,
        inputs=inputs,
        bits=RING_BITS,
        attack=Attack(args.attack) if args.attack else None,
        progress=_ProgressPrinter(sys.stderr) if show_progress else None,
    )
    if args.output is not None and result.aggregate is not None and args.attack is None:
        with args.output.open("wb") as handle:
            np.save(handle, np.asarray(result.aggregate, dtype=np.uint32), allow_pickle=False)
    report = _simulation_report(args, result, degree, threshold)
    if args.json:
        print(json.dumps(report, indent=None, sort_keys=True))
    else:
        _print_summary(report, sys.stdout)
    return EXIT_OK if result.ok else EXIT_FAILED


class _ProgressPrinter:
    """Stage names as they finish, plus a live counter when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._last = -1.0

    def __call__(self, event: Progress) -> None:
        if event.finished:
            end = "\r\x1b[K" if self._live else ""
            print(
                f"{end}{PROG} simulate: {event.stage.value} done "
                f"({event.total} participants, {event.elapsed_s:.1f} s elapsed)",
                file=self._stream,
                flush=True,
            )
        elif self._live and event.elapsed_s - self._last >= 0.2:
            self._last = event.elapsed_s
            print(
                f"\r{PROG} simulate: {event.stage.value} {event.done}/{event.total}",
                end="",
                file=self._stream,
                flush=True,
            )


def _simulation_report(
    args: argparse.Namespace, result: SimulationResult, degree: int | None, threshold: int
) -> dict[str, Any]:
    plain_bytes = args.length * 4  # the same vector sent in the clear as float32
    correct = (
        None
        if result.aggregate is None or result.expected is None
        else bool(np.array_equal(result.aggregate, result.expected))
    )
    return {
        "peers": args.peers,
        "length": args.length,
        "graph": args.graph,
        "degree": degree,
        "threshold": threshold,
        "seed": args.seed,
        "attack": args.attack,
        "survivors": list(result.survivors),
        "dropped": result.dropped,
        "timings_s": result.timings_s,
        "bytes_per_peer": result.bytes_per_peer,
        "plain_float32_bytes": plain_bytes,
        "expansion": result.bytes_per_peer["sent"] / plain_bytes,
        "correct": correct,
        "aborted": result.aborted,
        "refusals": result.refusals,
        "transcript_error": result.transcript_error,
        "output": str(args.output) if args.output is not None else None,
        "ok": result.ok,
    }


def _format_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def _print_summary(report: dict[str, Any], out: TextIO) -> None:
    graph = report["graph"] + (f" (degree {report['degree']})" if report["degree"] else "")
    print(
        f"SecAgg round: {report['peers']} peers, {report['length']:,} words, {graph} graph, "
        f"threshold {report['threshold']}, seed {report['seed']}"
        + (f", attack {report['attack']}" if report["attack"] else ""),
        file=out,
    )
    print(f"{'stage':<12} {'dropped':>7} {'aggregator':>12} {'participant':>12}", file=out)
    timings = report["timings_s"]
    for stage in Stage:
        dropped = len(report["dropped"].get(stage.value, []))
        t = timings[stage.value]
        print(
            f"{stage.value:<12} {dropped:>7} {t['aggregator']:>10.3f} s "
            f"{t['participant_median']:>10.3f} s",
            file=out,
        )
    total = timings["total"]
    print(
        f"{'total':<12} {'':>7} {total['aggregator']:>10.3f} s "
        f"{total['participant_median']:>10.3f} s   (participant: median)",
        file=out,
    )
    for stage, indices in report["dropped"].items():
        if indices:
            shown = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
            print(f"dropped at {stage}: {shown}", file=out)
    print(f"survivors: {len(report['survivors'])} of {report['peers']}", file=out)
    sent, received = report["bytes_per_peer"]["sent"], report["bytes_per_peer"]["received"]
    print(
        f"bytes per peer (median): sent {_format_bytes(sent)}, received "
        f"{_format_bytes(received)}; plain float32 vector "
        f"{_format_bytes(report['plain_float32_bytes'])}"
        f" (expansion {report['expansion']:.3f}x)",
        file=out,
    )
    if report["attack"]:
        for peer, reason in sorted(report["refusals"].items())[:5]:
            print(f"refused: {peer}: {reason}", file=out)
        if len(report["refusals"]) > 5:
            print(f"refused: ... and {len(report['refusals']) - 5} more peers", file=out)
        if report["transcript_error"]:
            print(f"transcript rejected: {report['transcript_error']}", file=out)
        if report["aborted"]:
            print(f"round stopped: {report['aborted']}", file=out)
        verdict = "attack detected" if report["ok"] else "ATTACK NOT DETECTED"
    elif report["aborted"]:
        verdict = f"ABORTED: {report['aborted']}"
    elif report["ok"]:
        verdict = (
            f"OK: aggregate equals the plain sum over the {len(report['survivors'])} survivors"
        )
        if report["output"]:
            verdict += f"; written to {report['output']}"
    else:
        reason = report["transcript_error"] or "aggregate differs from the plain sum"
        verdict = f"FAILED: {reason}"
    print(f"verdict: {verdict}", file=out)


# --------------------------------------------------------------------------- bench


def _add_bench(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark (see `ceremony bench --help`)",
        description="Benchmarks; the arguments are those of scripts/bench.py.",
        add_help=False,
    )
    parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench  # only the bench command pays for importing it

    return bench.main(args.bench_args)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The ``ceremony`` argument parser with every subcommand."""
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ceremony_identity.add_parsers(subparsers)
    ceremony_run.add_parsers(subparsers)
    ceremony_demo.add_parsers(subparsers)
    ceremony_stats.add_parsers(subparsers)
    ceremony_privacy.add_parsers(subparsers)
    ceremony_data.add_parsers(subparsers)
    ceremony_report.add_parsers(subparsers)
    ceremony_export.add_parsers(subparsers)
    _add_simulate(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ceremony`` with ``argv`` (default: the process arguments); return the exit code."""
    return run_command(
        build_parser(),
        argv,
        prog=lambda args: f"{PROG} {args.command}",
        expected=(ConfigError, OperatorError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
