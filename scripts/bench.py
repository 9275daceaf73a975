"""Benchmarks: ``python -m scripts.bench secagg`` (or ``ceremony bench secagg``).

Each benchmark is an entry of :data:`BENCHMARKS`: a function adding its arguments to its
subparser and a function running it. ``secagg`` is here; ``training``, ``transport`` and
``paillier`` are to be registered the same way (one ``_add_<name>``/``_run_<name>`` pair and
one line in :data:`BENCHMARKS`).

Every figure is measured in the run that reports it; ratios compare figures of the same run
(e.g. masking time against the AES-CTR keystream floor measured just before it), so they mean
something even on a busy machine, where absolute times vary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from unittest import mock

import numpy as np

from peer.cli import EXIT_OK, ArgumentParser, run_command
from secagg import (
    AggregatorMessage,
    ConfigError,
    DeterministicRandom,
    GraphKind,
    KeyPair,
    Participant,
    ParticipantMessage,
    RoundConfig,
    Signer,
    Stage,
    Verifier,
)
from secagg import simulate as simulation
from secagg.graph import (
    colluders_per_neighbourhood,
    consistency_quorum,
    recommend_parameters,
    safe_threshold,
)
from secagg.masking import mask_input
from secagg.prg import MaskExpander, keystream_floor
from secagg.simulate import Progress, SimulationResult, simulate
from secagg.testing import peer_ids

from . import bench_scale, bench_transport
from .bench_machine import machine_info

__all__ = ["BENCHMARKS", "Benchmark", "build_parser", "main"]

PROG = "bench"
DEFAULT_OUTPUT_DIR = Path("bench-results")

# Targets (see BENCHMARKS.md for where they come from).
TARGET_MASKING_RATIO = 2.0  # participant masking / keystream floor, n=10, m=1e6
TARGET_MASKED_STAGE_RATIO = 1.5  # participant's whole masked stage (simulate) / floor (issue 11)
TARGET_UNMASK_1DROP_S = 0.060  # aggregator unmask stage, n=10, m=1e6, 1 dropout
TARGET_AGGREGATOR_500_S = 15.0  # n=500, m=1e5, 30% dropouts
TARGET_PARTICIPANT_500_S = 0.15
TARGET_EXPANSION = 1.05  # bytes sent per peer / float32 vector in the clear, n=10, m=1e6

# SecAgg+ degree of the scaling runs: recommend_parameters for 10% dropouts and 5% colluding
# peers at a 2^-40 failure probability (k = 60, t = 34 at n = 100; k = 90, t = 57 at n = 500
# since issue 9's bounds). It is fixed across the dropout rates so that the curves compare
# one graph; at 30% dropouts it is below what recommend_parameters asks for (k = 402 at
# n = 500), see BENCHMARKS.md.
SECAGG_PLUS_DROPOUT = 0.1
SECAGG_PLUS_CORRUPTION = 0.05


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how to declare its arguments and how to run it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class _Sizes:
    """The problem sizes of one secagg run (full or --quick)."""

    mask_n: int
    mask_m: int
    repeats: int
    scaling_n: tuple[int, ...]
    scaling_m: int
    dropouts: tuple[float, ...]
    curve_n: tuple[int, ...]
    sample_from: int  # complete graphs with at least this many peers time a sample
    sample: int
    plus_degree: int | None = None  # fixed SecAgg+ degree, or None for the recommended one


FULL = _Sizes(10, 1_000_000, 5, (100, 500), 100_000, (0.0, 0.1, 0.3), (10, 50, 100, 500), 500, 25)
QUICK = _Sizes(5, 20_000, 2, (8, 12), 2_000, (0.0, 0.3), (6, 8, 12), 12, 4, plus_degree=8)


# --------------------------------------------------------------------------- machine


# --------------------------------------------------------------------------- secagg parts


def _median_time(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _masking(sizes: _Sizes) -> dict[str, Any]:
    """Participant masking (self mask + n-1 pairwise masks) against the keystream floor."""
    n, m = sizes.mask_n, sizes.mask_m
    peers = peer_ids(n)
    config = RoundConfig("bench", 0, peers, n // 2 + 1, m)
    rng = DeterministicRandom("bench/masking")
    keys = {u: KeyPair.generate(rng) for u in peers}
    me = peers[0]
    x = np.zeros(m, dtype=np.uint32)
    seed = rng.token_bytes(32)
    publics = {v: keys[v].public for v in peers[1:]}
    expander = MaskExpander(m)
    floor_work = keystream_floor(n, m)
    # Interleaved, so that load from other processes hits both measurements alike.
    floors, maskings, fresh_buffers, stages = [], [], [], []
    cpu_ratios = []
    for repeat in range(sizes.repeats):
        floors.append(_median_time(floor_work, 1))
        # The participant's whole masked stage as `ceremony simulate` times it (share
        # decryption and checks, masking, digest, signature), in the same interleaving.
        round_ = simulate(n, m, seed=repeat, verify=False)
        stages.append(round_.timings_s[Stage.MASKED.value]["participant_median"])
        # The same in CPU time of this thread (on a shared machine, far less noisy), against
        # the floor simulate times right after each participant's masked stage.
        round_ = simulate(n, m, seed=repeat, verify=False, clock=time.thread_time)
        cpu_ratios.append(round_.timings_s[Stage.MASKED.value]["floor_ratio"])
        maskings.append(
            _median_time(lambda: mask_input(config, me, x, seed, keys[me], publics, expander), 1)
        )
        fresh_buffers.append(
            _median_time(lambda: mask_input(config, me, x, seed, keys[me], publics), 1)
        )
    floor = statistics.median(floors)
    masking = statistics.median(maskings)
    fresh = statistics.median(fresh_buffers)
    stage = statistics.median(stages)
    return {
        "n": n,
        "m": m,
        "repeats": sizes.repeats,
        "floor_s": floor,
        "mask_input_s": masking,
        "mask_input_fresh_buffers_s": fresh,
        "ratio": masking / floor,
        "target_ratio": TARGET_MASKING_RATIO,
        "met": masking / floor <= TARGET_MASKING_RATIO,
        "masked_stage_s": stage,
        "masked_stage_ratio": stage / floor,
        "masked_stage_target_ratio": TARGET_MASKED_STAGE_RATIO,
        "masked_stage_met": stage / floor <= TARGET_MASKED_STAGE_RATIO,
        "masked_stage_cpu_ratio": statistics.median(cpu_ratios),
    }


class _CountingVerifier:
    """Counts signature verifications, attributed to whoever is acting (``actor[0]``)."""

    def __init__(self, inner: Verifier, counts: Counter[str], actor: list[str]) -> None:
        self._inner, self._counts, self._actor = inner, counts, actor

    def verify(self, signature: bytes, data: bytes) -> bool:
        self._counts[self._actor[0]] += 1
        return self._inner.verify(signature, data)


@contextmanager
def _counting_signature_checks() -> Iterator[Counter[str]]:
    """Within the block, every verification the simulator's peers make is counted per
    participant ("aggregator" for the aggregator's). Memoised verifications of untimed
    participants (``timed_sample``) never reach the counter: read timed ones only."""
    counts: Counter[str] = Counter()
    actor = ["aggregator"]
    identities = simulation.test_identities
    receive = Participant.receive

    def counting_identities(
        peers: Sequence[str], seed: int
    ) -> tuple[dict[str, Signer], dict[str, Verifier]]:
        signers, verifiers = identities(peers, seed)
        return signers, {u: _CountingVerifier(v, counts, actor) for u, v in verifiers.items()}

    def acting_receive(self: Participant, message: AggregatorMessage) -> ParticipantMessage:
        actor[0] = self.me
        try:
            return receive(self, message)
        finally:
            actor[0] = "aggregator"

    with (
        mock.patch.object(simulation, "test_identities", counting_identities),
        mock.patch.object(Participant, "receive", acting_receive),
    ):
        yield counts


def _run(
    n: int,
    m: int,
    *,
    graph: GraphKind,
    degree: int | None,
    threshold: int | None,
    drops: int,
    seed: int,
    sample: int | None,
    log: Callable[[str], None],
    colluders: int = 0,
    checks: Counter[str] | None = None,
) -> tuple[SimulationResult, float]:
    label = f"n={n} m={m} {graph.value} drops={drops}" + (f" sample={sample}" if sample else "")
    last = [time.perf_counter()]

    def progress(event: Progress) -> None:
        now = time.perf_counter()
        if (event.finished and event.elapsed_s > 5) or now - last[0] > 30:
            last[0] = now
            state = "done" if event.finished else f"{event.done}/{event.total}"
            log(f"  {label}: {event.stage.value} {state} ({event.elapsed_s:.0f} s)")

    start = time.perf_counter()
    with _counting_signature_checks() as counts:
        result = simulate(
            n,
            m,
            threshold=threshold,
            graph=graph,
            degree=degree,
            drops={Stage.MASKED: drops} if drops else None,
            seed=seed,
            verify=False,
            progress=progress,
            timed_sample=sample,
            colluders=colluders,
        )
    wall = time.perf_counter() - start
    if checks is not None:
        checks.update(counts)
    if not result.ok:
        raise RuntimeError(f"benchmark round {label} failed: {result.aborted}")
    return result, wall


def _unmask(sizes: _Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    """Aggregator unmask stage and bytes per peer, n=10, m=1e6, with 0 and 1 dropouts."""
    n, m = sizes.mask_n, sizes.mask_m
    rows = []
    sent = []
    for drops in (0, 1):
        stage_times = []
        participant_masked = []
        for rep in range(max(1, sizes.repeats // 2)):
            result, _ = _run(
                n,
                m,
                graph=GraphKind.COMPLETE,
                degree=None,
                threshold=None,
                drops=drops,
                seed=rep,
                sample=None,
                log=log,
            )
            stage_times.append(result.timings_s[Stage.UNMASK.value]["aggregator"])
            participant_masked.append(result.timings_s[Stage.MASKED.value]["participant_median"])
            sent.append(result.bytes_per_peer["sent"])
        unmask_s = statistics.median(stage_times)
        # The least the stage can cost: one keystream per survivor's self mask and per
        # (survivor, dropped neighbour) pair, each added into the sum.
        survivors = n - drops
        floor_masks = survivors + survivors * drops
        floor = _median_time(keystream_floor(floor_masks, m), sizes.repeats)
        rows.append(
            {
                "dropouts": drops,
                "aggregator_unmask_s": unmask_s,
                "keystream_floor_s": floor,
                "keystream_floor_masks": floor_masks,
                "participant_masked_stage_s": statistics.median(participant_masked),
                "runs": len(stage_times),
                "target_s": TARGET_UNMASK_1DROP_S if drops == 1 else None,
                "met": unmask_s <= TARGET_UNMASK_1DROP_S if drops == 1 else None,
            }
        )
    plain = 4 * m
    expansion = statistics.median(sent) / plain
    return {
        "n": n,
        "m": m,
        "unmask": rows,
        "bytes": {
            "sent_per_peer": statistics.median(sent),
            "plain_float32": plain,
            "expansion": expansion,
            "target": TARGET_EXPANSION,
            "met": expansion <= TARGET_EXPANSION,
        },
    }


def _colluders(n: int) -> int:
    """The collusion bound of a scaling row: 5 % of n (5 at n = 100, 25 at n = 500, as
    recommend_parameters assumes; 0 for the tiny --quick rosters)."""
    return int(SECAGG_PLUS_CORRUPTION * n)


def _secagg_plus_parameters(n: int, sizes: _Sizes) -> tuple[int | None, int | None]:
    if sizes.plus_degree is not None and sizes.plus_degree < n - 1:
        h = sizes.plus_degree + 1
        colluders = _colluders(n)
        return sizes.plus_degree, safe_threshold(h, colluders_per_neighbourhood(n, h, colluders))
    degree, threshold = recommend_parameters(n, SECAGG_PLUS_DROPOUT, SECAGG_PLUS_CORRUPTION)
    if degree >= n - 1:
        return None, None  # the recommendation is the complete graph at this size
    return degree, threshold


def _scaling_row(
    n: int, m: int, graph: GraphKind, fraction: float, sizes: _Sizes, log: Callable[[str], None]
) -> dict[str, Any]:
    if graph is GraphKind.SECAGG_PLUS:
        degree, threshold = _secagg_plus_parameters(n, sizes)
        if degree is None:
            graph = GraphKind.COMPLETE
    else:
        degree, threshold = None, None
    sample = sizes.sample if graph is GraphKind.COMPLETE and n >= sizes.sample_from else None
    drops = round(fraction * n)
    # The collusion bound the SecAgg+ degree was chosen for sets the consistency quorum (and
    # the complete graph's threshold) of both graphs, so they compare like for like.
    colluders = _colluders(n)
    if graph is GraphKind.COMPLETE:
        threshold = safe_threshold(n, colluders)
    checks: Counter[str] = Counter()
    result, wall = _run(
        n,
        m,
        graph=graph,
        degree=degree,
        threshold=threshold,
        drops=drops,
        seed=0,
        sample=sample,
        log=log,
        colluders=colluders,
        checks=checks,
    )
    peers = result.peers
    finishers = [peers[i] for i in result.timed if i in result.survivors] or [
        peers[i] for i in result.timed
    ]
    return {
        "n": n,
        "m": m,
        "graph": graph.value,
        "degree": degree if degree is not None else n - 1,
        "threshold": threshold if threshold is not None else n // 2 + 1,
        "colluders": colluders,
        "quorum": consistency_quorum(n, colluders),
        "signature_checks_per_participant": statistics.median(checks[u] for u in finishers),
        "signature_checks_aggregator": checks["aggregator"],
        "dropout_fraction": fraction,
        "dropped": drops,
        "survivors": len(result.survivors),
        "aggregator_s": result.timings_s["total"]["aggregator"],
        "aggregator_unmask_s": result.timings_s[Stage.UNMASK.value]["aggregator"],
        "participant_median_s": result.timings_s["total"]["participant_median"],
        "participant_stage_median_s": {
            stage.value: result.timings_s[stage.value]["participant_median"] for stage in Stage
        },
        "aggregator_stage_s": {
            stage.value: result.timings_s[stage.value]["aggregator"] for stage in Stage
        },
        "bytes_sent_per_peer": result.bytes_per_peer["sent"],
        "bytes_received_per_peer": result.bytes_per_peer["received"],
        "timed_participants": len(result.timed),
        "wall_s": wall,
    }


def _run_secagg(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    output: Path = args.output or DEFAULT_OUTPUT_DIR / "secagg.json"
    if not output.parent.exists():
        output.parent.mkdir(parents=True)
    err: TextIO = sys.stderr

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=err, flush=True)

    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "secagg",
        "quick": bool(args.quick),
        "command": " ".join(["python -m scripts.bench", *args.argv]),
        "machine": machine_info(),
    }
    log("masking vs keystream floor ...")
    report["masking"] = _masking(sizes)
    log("aggregator unmask, bytes per peer ...")
    report.update(_unmask(sizes, log))
    _write(report, output, partial=True)
    scaling: list[dict[str, Any]] = []
    report["scaling"] = scaling
    _write(report, output, partial=True)
    for n in sizes.scaling_n:
        for graph in (GraphKind.SECAGG_PLUS, GraphKind.COMPLETE):
            # Highest dropout rate first: it is the case with targets, and the results file
            # is rewritten after every row, so an interrupted run still has it.
            for fraction in sorted(sizes.dropouts, reverse=True):
                log(f"scaling n={n} {graph.value} {fraction:.0%} dropouts ...")
                scaling.append(_scaling_row(n, sizes.scaling_m, graph, fraction, sizes, log))
                _write(report, output, partial=True)
    curve = []
    for n in sizes.curve_n:
        for graph in (GraphKind.SECAGG_PLUS, GraphKind.COMPLETE):
            known = [
                row
                for row in scaling
                if row["n"] == n and row["dropout_fraction"] == 0.0 and row["graph"] == graph.value
            ]
            if not known:
                log(f"per-peer curve n={n} {graph.value} ...")
                known = [_scaling_row(n, sizes.scaling_m, graph, 0.0, sizes, log)]
            if known[0] not in curve:
                curve.append(known[0])
    report["curve"] = curve
    report["targets"] = _targets(report, sizes)
    report["total_wall_s"] = time.perf_counter() - started
    _write(report, output, partial=False)
    _print_report(report, sys.stdout)
    print(f"results written to {output}")
    return EXIT_OK


def _write(report: dict[str, Any], output: Path, *, partial: bool) -> None:
    report["partial"] = partial
    with output.open("w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _targets(report: dict[str, Any], sizes: _Sizes) -> list[dict[str, Any]]:
    masking = report["masking"]
    one_drop = report["unmask"][1]
    targets = [
        {
            "what": f"participant masking / keystream floor (n={sizes.mask_n}, m={sizes.mask_m})",
            "measured": masking["ratio"],
            "target": TARGET_MASKING_RATIO,
            "met": masking["met"],
        },
        {
            "what": (
                f"participant masked stage (simulate) / keystream floor "
                f"(n={sizes.mask_n}, m={sizes.mask_m})"
            ),
            "measured": masking["masked_stage_ratio"],
            "target": TARGET_MASKED_STAGE_RATIO,
            "met": masking["masked_stage_met"],
        },
        {
            "what": f"aggregator unmask, 1 dropout (n={sizes.mask_n}, m={sizes.mask_m}) [s]",
            "measured": one_drop["aggregator_unmask_s"],
            "target": TARGET_UNMASK_1DROP_S,
            "met": one_drop["met"],
        },
        {
            "what": f"bytes sent per peer / float32 vector (n={sizes.mask_n}, m={sizes.mask_m})",
            "measured": report["bytes"]["expansion"],
            "target": TARGET_EXPANSION,
            "met": report["bytes"]["met"],
        },
    ]
    largest = max(sizes.scaling_n)
    for row in report["scaling"]:
        if row["n"] == largest and row["dropout_fraction"] == max(sizes.dropouts):
            for key, target, unit in (
                ("aggregator_s", TARGET_AGGREGATOR_500_S, "aggregator"),
                ("participant_median_s", TARGET_PARTICIPANT_500_S, "participant"),
            ):
                targets.append(
                    {
                        "what": (
                            f"{unit} (n={row['n']}, m={row['m']}, {row['graph']}, "
                            f"{row['dropout_fraction']:.0%} dropouts) [s]"
                        ),
                        "measured": row[key],
                        "target": target,
                        "met": row[key] <= target,
                    }
                )
    return targets


def _print_report(report: dict[str, Any], out: TextIO) -> None:
    masking = report["masking"]
    print(
        f"masking n={masking['n']} m={masking['m']:,}: mask_input {masking['mask_input_s']:.4f} s, "
        f"keystream floor {masking['floor_s']:.4f} s, ratio {masking['ratio']:.2f}x; "
        f"whole masked stage {masking['masked_stage_s']:.4f} s, "
        f"ratio {masking['masked_stage_ratio']:.2f}x "
        f"(in thread CPU time {masking['masked_stage_cpu_ratio']:.2f}x)",
        file=out,
    )
    for row in report["unmask"]:
        print(
            f"aggregator unmask n={report['n']} m={report['m']:,} dropouts={row['dropouts']}: "
            f"{row['aggregator_unmask_s'] * 1e3:.1f} ms (keystream floor of its "
            f"{row['keystream_floor_masks']} masks: {row['keystream_floor_s'] * 1e3:.1f} ms)",
            file=out,
        )
    print(
        f"bytes sent per peer: {report['bytes']['sent_per_peer']:,.0f} "
        f"(float32 in the clear: {report['bytes']['plain_float32']:,}; "
        f"expansion {report['bytes']['expansion']:.4f}x)",
        file=out,
    )
    header = (
        f"{'n':>4} {'graph':<9} {'k':>4} {'t':>4} {'drop':>5} {'agg s':>8} {'unmask s':>9} "
        f"{'part s':>7} {'sent/peer':>11} {'timed':>5} {'wall s':>7}"
    )
    print(header, file=out)
    for row in report["scaling"] + [r for r in report["curve"] if r not in report["scaling"]]:
        print(
            f"{row['n']:>4} {row['graph']:<9} {row['degree']:>4} {row['threshold']:>4} "
            f"{row['dropout_fraction']:>5.0%} {row['aggregator_s']:>8.2f} "
            f"{row['aggregator_unmask_s']:>9.2f} {row['participant_median_s']:>7.3f} "
            f"{row['bytes_sent_per_peer']:>11,.0f} {row['timed_participants']:>5} "
            f"{row['wall_s']:>7.0f}",
            file=out,
        )
    if report["quick"]:
        print("targets (quick sizes: the targets apply to the full run only):", file=out)
    else:
        print("targets:", file=out)
    for target in report["targets"]:
        verdict = "met" if target["met"] else "MISSED"
        print(
            f"  {target['what']}: {target['measured']:.4g} (target <= {target['target']}) "
            f"{verdict}",
            file=out,
        )


def _add_secagg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"where to write the JSON results (default {DEFAULT_OUTPUT_DIR}/secagg.json)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _delegated(module: str) -> Benchmark:
    """A benchmark with a ``main(argv)`` of its own: its options are passed through."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("options", nargs=argparse.REMAINDER, help=f"options of {module}")

    def run(args: argparse.Namespace) -> int:
        import importlib

        main_function = importlib.import_module(module).main
        return int(main_function(list(args.options)))

    return Benchmark(f"see python -m {module} --help", add_arguments, run)


BENCHMARKS: dict[str, Benchmark] = {
    "secagg": Benchmark(
        "secure aggregation: masking, unmasking, scaling to 500 peers, bytes per peer",
        _add_secagg,
        _run_secagg,
    ),
    "transport": Benchmark(
        bench_transport.BENCH_HELP,
        bench_transport.add_arguments,
        bench_transport.run,
    ),
    "scale": Benchmark(bench_scale.BENCH_HELP, bench_scale.add_arguments, bench_scale.run),
    "training": _delegated(f"{__package__}.bench_training"),
    "paillier": _delegated(f"{__package__}.bench_paillier"),
}


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` argument parser, one subcommand per registered benchmark."""
    parser = ArgumentParser(prog=PROG, description="Run a benchmark and write its results.")
    subparsers = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, benchmark in BENCHMARKS.items():
        sub = subparsers.add_parser(name, help=benchmark.help, description=benchmark.help)
        benchmark.add_arguments(sub)
        sub.set_defaults(handler=benchmark.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bench`` with ``argv`` (default: the process arguments); return the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(argv=arguments)  # recorded with the results
    return run_command(
        parser, arguments, prog=lambda args: f"{PROG} {args.benchmark}", expected=(ConfigError,)
    )


if __name__ == "__main__":
    raise SystemExit(main())
