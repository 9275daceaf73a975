"""Benchmark: secure rounds at scale on real peer processes, and the aggregator's memory.

``python -m scripts.bench scale`` (or ``python -m scripts.bench_scale``) runs, for each row
``N x M`` (default ``10x1000000 20x1000000 50x1000000 10x10000000``), one secure-aggregation
session of ``--rounds`` rounds over N real peer processes (``python -m peer start``, mutual
TLS on 127.0.0.1, a vector payload of M words: no TensorFlow), the federation of
scripts/bench_transport.py. Per row it reports

* **round wall time**: the median round period from the peers' ledgers, over the rounds
  after the first (which also pays for the session start) when there are several;
* **CPU seconds per peer per round**: all peer processes' user + system time over the
  session (/proc/PID/stat), divided by N and by the rounds;
* **bytes per peer per round**: what one participant sends plus receives on its round stream
  (median over peers and rounds, from the ledgers);
* **aggregator peak RSS**: VmHWM (/proc/PID/status) of the process of the peer that was
  aggregator of the last round, after the session, next to its VmRSS before the session and
  to the median VmHWM of the other peers. VmHWM is the whole process's peak: it includes
  that peer's own participant role (which today receives the full transcript, n + 1
  vectors) and the transcript the aggregator encodes for everyone.

The aggregator role alone is measured in process as well (``--in-process``, the default
rows ``50x1000000 10x10000000``): a round of real ``secagg`` participants and one
``Aggregator`` with the peer's on-disk spool, with tracemalloc counting only what the
aggregator's own calls allocate (numpy reports its buffers to tracemalloc): the bytes it
retains after each stage and the peak during its calls, without and with building the
transcript. Every row checks that the agreed (or computed) sum is the sum of the inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from peer.cli import EXIT_FAILED, EXIT_OK, ArgumentParser, UsageError, run_command
from peer.spool import FileSpool
from secagg import Aggregator, ConfigError, DeterministicRandom, Participant, RoundConfig
from secagg.testing import peer_ids, test_identities

from .bench_machine import machine_info
from .bench_transport import TransportBenchError, _Federation, _run_session, _write

__all__ = ["DEFAULT_OUTPUT", "aggregator_memory", "main", "parse_row"]

PROG = "bench scale"
BENCH_HELP = "secure rounds at n = 10..50 and m up to 10^7 on real peers; aggregator memory"
DEFAULT_OUTPUT = Path("bench-results") / "scale.json"
DEFAULT_ROWS = ("10x1000000", "20x1000000", "50x1000000", "10x10000000")
DEFAULT_IN_PROCESS = ("50x1000000", "10x10000000")
QUICK_ROWS = ("3x1000",)
QUICK_IN_PROCESS = ("4x2000",)
MIB = 1024 * 1024


def parse_row(text: str) -> tuple[int, int]:
    """``"NxM"`` -> (N, M)."""
    n_text, sep, m_text = text.lower().partition("x")
    try:
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise UsageError(f"a row is N x M peers x words, e.g. 10x1000000, not {text!r}") from None
    if not sep or n < 2 or m < 1:
        raise UsageError(f"a row needs N >= 2 peers and M >= 1 words, not {text!r}")
    return n, m


# --------------------------------------------------------------------------- /proc


def _status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM, VmRSS), or None off Linux."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------- real peers


def _real_row(
    workdir: Path, n: int, m: int, rounds: int, stage_seconds: float, log: Callable[[str], None]
) -> dict[str, Any]:
    log(f"starting {n} peers for m={m:,} ...")
    started = time.perf_counter()
    with _Federation.running(workdir / f"n{n}-m{m}", n, stage_seconds) as federation:
        expected = federation.write_vectors(m, seed=n * 1_000_003 + m)
        pids = {p.peer_id: p.process.pid for p in federation.peers.values() if p.process}
        rss_before = {u: _status_kib(pid, "VmRSS") for u, pid in pids.items()}
        log(f"  n={n} m={m:,} secagg session, {rounds} round(s) ...")
        row = _run_session(
            federation, "secagg", f"scale-n{n}-m{m}", m, rounds, expected, stage_seconds
        )
        hwm = {u: _status_kib(pid, "VmHWM") for u, pid in pids.items()}
    last_aggregator = row["aggregators"][-1]
    others = [v for u, v in hwm.items() if u != last_aggregator and v is not None]
    steady = row["round_s"][1:] or row["round_s"]
    cpu = row["cpu_s_per_round"]
    result = {
        "n": n,
        "m": m,
        "rounds": rounds,
        "round_s": row["round_s"],
        "round_median_s": statistics.median(steady),
        "median_excludes_first_round": len(row["round_s"]) > 1,
        "cpu_s_per_peer_round": cpu / n if cpu is not None else None,
        "bytes_sent_per_peer_round": row["bytes_sent_per_peer_median"],
        "bytes_received_per_peer_round": row["bytes_received_per_peer_median"],
        "bytes_per_peer_round": row["bytes_sent_per_peer_median"]
        + row["bytes_received_per_peer_median"],
        "loopback_tx_bytes_per_peer_round": row["loopback_tx_bytes_per_peer_round"],
        "aggregator": last_aggregator,
        "aggregator_peak_rss_mib": _mib(hwm.get(last_aggregator)),
        "aggregator_rss_before_mib": _mib(rss_before.get(last_aggregator)),
        "other_peers_peak_rss_median_mib": _mib(statistics.median(others)) if others else None,
        "sum_verified": row["sum_verified"],
        "wall_s": time.perf_counter() - started,
    }
    log(
        f"    round {result['round_median_s']:.2f} s, aggregator peak RSS "
        f"{result['aggregator_peak_rss_mib']} MiB"
    )
    return result


def _mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


# --------------------------------------------------------------------------- in process


class _Meter:
    """Counts what the measured calls allocate and keep, with tracemalloc."""

    def __init__(self) -> None:
        self.retained = 0
        self.peak = 0

    def call(self, work: Callable[[], Any]) -> Any:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = work()
        current, peak = tracemalloc.get_traced_memory()
        self.peak = max(self.peak, self.retained + peak - before)
        self.retained += current - before
        return result


def aggregator_memory(n: int, m: int, spool_parent: Path | None = None) -> dict[str, Any]:
    """One honest secure round in memory; what the aggregator alone allocates (bytes).

    The participants' own memory (n inputs, n masked inputs) is not counted: only the
    allocations made inside the aggregator's calls, and what of them it keeps.
    """
    peers = peer_ids(n)
    config = RoundConfig("scale", 1, peers, n // 2 + 1, m)
    signers, verifiers = test_identities(peers, 0)
    rng = np.random.default_rng(n * 7919 + m)
    inputs = {u: rng.integers(0, 2**32, size=m, dtype=np.uint64).astype(np.uint32) for u in peers}
    participants = {
        u: Participant(
            config, u, signers[u], verifiers, inputs[u], DeterministicRandom(f"scale/{u}"), "agg"
        )
        for u in peers
    }
    spool = FileSpool(spool_parent)
    meter = _Meter()
    tracemalloc.start()
    try:
        aggregator: Aggregator = meter.call(
            lambda: Aggregator(config, verifiers, "agg", spool=spool)
        )
        replies: dict[str, Any] = {u: p.start() for u, p in participants.items()}
        per_stage: dict[str, int] = {}
        while True:
            stage = aggregator.stage.value
            for u in list(replies):
                message = replies.pop(u)  # the driver keeps no message once delivered
                meter.call(functools.partial(aggregator.receive, message))
                del message
            outgoing = meter.call(aggregator.close_stage)
            per_stage[stage] = meter.retained
            if not outgoing:
                break
            replies = {u: participants[u].receive(msg) for u, msg in outgoing.items()}
        peak_without_transcript = meter.peak
        assert aggregator.result is not None
        total = np.zeros(m, dtype=np.uint32)
        for vector in inputs.values():
            total += vector
        if not np.array_equal(aggregator.result.aggregate, total):
            raise TransportBenchError(f"in-process round n={n} m={m}: wrong sum")
        transcript = meter.call(aggregator.transcript)
        peak_with_transcript = meter.peak
        del transcript
    finally:
        tracemalloc.stop()
        spool.close()
    vector_bytes = 4 * m
    return {
        "n": n,
        "m": m,
        "vector_mib": vector_bytes / MIB,
        "retained_after_stage_mib": {k: v / MIB for k, v in per_stage.items()},
        "peak_without_transcript_mib": peak_without_transcript / MIB,
        "peak_without_transcript_vectors": peak_without_transcript / vector_bytes,
        "peak_with_transcript_mib": peak_with_transcript / MIB,
        "peak_with_transcript_vectors": peak_with_transcript / vector_bytes,
        "sum_verified": True,
    }


# --------------------------------------------------------------------------- report


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """The human-readable tables of a report."""
    if report["rows"]:
        print(
            f"{'n':>3} {'m':>11} {'round s':>8} {'cpu s/peer':>10} {'bytes/peer':>13} "
            f"{'agg peak RSS':>12} {'agg RSS before':>14} {'others peak':>11}",
            file=out,
        )
    for row in report["rows"]:
        cpu = row["cpu_s_per_peer_round"]
        print(
            f"{row['n']:>3} {row['m']:>11,} {row['round_median_s']:>8.2f} "
            f"{'-' if cpu is None else f'{cpu:.2f}':>10} {row['bytes_per_peer_round']:>13,.0f} "
            f"{_or_dash(row['aggregator_peak_rss_mib']):>9} MiB "
            f"{_or_dash(row['aggregator_rss_before_mib']):>10} MiB "
            f"{_or_dash(row['other_peers_peak_rss_median_mib']):>7} MiB",
            file=out,
        )
    for row in report["in_process"]:
        print(
            f"in process n={row['n']} m={row['m']:,}: aggregator peak "
            f"{row['peak_without_transcript_mib']:.1f} MiB "
            f"({row['peak_without_transcript_vectors']:.2f} vectors) through unmasking, "
            f"{row['peak_with_transcript_mib']:.1f} MiB "
            f"({row['peak_with_transcript_vectors']:.2f} vectors) with the full transcript",
            file=out,
        )


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# --------------------------------------------------------------------------- run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rows",
        nargs="*",
        help=f"real-peer rows N x M (default {' '.join(DEFAULT_ROWS)}; none: skip)",
    )
    parser.add_argument(
        "--in-process",
        nargs="*",
        help=f"in-process aggregator rows N x M (default {' '.join(DEFAULT_IN_PROCESS)})",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds per session (default 2)")
    parser.add_argument("--quick", action="store_true", help=f"rows {QUICK_ROWS}, seconds")
    parser.add_argument("--workdir", type=Path, help="keep the federations here")
    parser.add_argument(
        "--output", type=Path, help=f"where to write the JSON results (default {DEFAULT_OUTPUT})"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the rows; 0 when every row ran and checked out, 1 when one failed."""
    out = out if out is not None else sys.stdout
    rows = [parse_row(r) for r in (args.rows if args.rows is not None else _rows(args))]
    in_process = [
        parse_row(r)
        for r in (args.in_process if args.in_process is not None else _in_process(args))
    ]
    if args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    output: Path = args.output or DEFAULT_OUTPUT

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    stage_seconds = 30.0 if args.quick else 300.0
    report: dict[str, Any] = {
        "benchmark": "scale",
        "quick": bool(args.quick),
        "command": " ".join(["python -m scripts.bench", *getattr(args, "argv", ["scale"])]),
        "machine": machine_info(),
        "load_average": os.getloadavg(),
        "rows": [],
        "in_process": [],
    }
    try:
        with contextlib.ExitStack() as stack:
            if args.workdir is not None:
                workdir: Path = args.workdir
                workdir.mkdir(parents=True, exist_ok=True)
            else:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-")))
            for n, m in in_process:
                log(f"in process n={n} m={m:,} ...")
                report["in_process"].append(aggregator_memory(n, m, workdir))
                _write(report, output, partial=True)
            for n, m in rows:
                report["rows"].append(_real_row(workdir, n, m, args.rounds, stage_seconds, log))
                _write(report, output, partial=True)
    except TransportBenchError as error:
        print(f"bench scale: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    report["load_average_after"] = os.getloadavg()
    _write(report, output, partial=False)
    print_report(report, out)
    print(f"results written to {output}", file=out)
    return EXIT_OK


def _rows(args: argparse.Namespace) -> Sequence[str]:
    return QUICK_ROWS if args.quick else DEFAULT_ROWS


def _in_process(args: argparse.Namespace) -> Sequence[str]:
    return QUICK_IN_PROCESS if args.quick else DEFAULT_IN_PROCESS


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.bench_scale``: the same as ``python -m scripts.bench scale``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(prog=PROG, description=BENCH_HELP)
    add_arguments(parser)
    parser.set_defaults(handler=run, argv=["scale", *arguments])
    return run_command(parser, arguments, prog=lambda _: PROG, expected=(ConfigError,))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
