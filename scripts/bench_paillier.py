"""Benchmark: Paillier aggregation against secure aggregation on the same vectors.

``python -m scripts.bench_paillier`` runs, for n peers (3) and each vector length (1,000 and
10,000 ring words), one round of :func:`secagg.simulate.simulate` (SecAgg) and of
:func:`secagg.paillier.simulate_paillier` with packed plaintexts and, up to
``--unpacked-max-length``, with one coordinate per ciphertext. Both get the same inputs.
It prints a table and writes JSON (``bench-results/paillier.json`` by default).

Figures:

* role times: the key holder (key generation + decryption), the median participant, the
  aggregator, and one verification of the published transcript;
* wall: the whole in-memory round, every role run one after the other in this process
  (transcript verification by one peer included, for both backends; SecAgg takes
  milliseconds, so its figures are medians of 5 runs after a warm-up run);
* bytes per peer: median payload a participant sends and receives in the stage messages
  (the transcript is reported separately for Paillier);
* ratios Paillier / SecAgg of the same run.

Paillier keys are made by :class:`secagg.paillier.OpenSSLPrimes`, the production path. The
unpacked runs cost one full modular exponentiation per coordinate and peer; beyond
``--unpacked-max-length`` they are not run (the JSON records why, with an estimate scaled
from the largest unpacked run, marked as such).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peer.cli import EXIT_FAILED, EXIT_OK, ArgumentParser, UsageError, run_command
from secagg import ConfigError
from secagg.paillier import DEFAULT_KEY_BITS, OpenSSLPrimes, simulate_paillier
from secagg.simulate import simulate

__all__ = ["build_parser", "main", "run"]

PROG = "bench_paillier"
DEFAULT_OUTPUT = Path("bench-results") / "paillier.json"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--peers", type=int, default=3, help="number of peers (default 3)")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[1000, 10000],
        help="vector lengths in ring words (default 1000 10000)",
    )
    parser.add_argument(
        "--key-bits", type=int, default=DEFAULT_KEY_BITS, help="Paillier key size (default 2048)"
    )
    parser.add_argument(
        "--unpacked-max-length",
        type=int,
        default=1000,
        help="run the one-coordinate-per-ciphertext variant up to this length (default 1000)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1024-bit keys and lengths 100 and 1000 (a smoke test; not for figures)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON output file")
    return parser


SECAGG_REPEATS = 5


def _secagg_row(n: int, m: int, inputs: np.ndarray[Any, Any], seed: int) -> dict[str, Any]:
    """SecAgg takes milliseconds, so it is the median of a few runs (after one warm-up run:
    the first round in a process pays one-off set-up costs)."""
    simulate(n, min(m, 16), seed=seed)
    runs = []
    for _ in range(SECAGG_REPEATS):
        started = time.perf_counter()
        result = simulate(n, m, inputs=inputs, seed=seed)
        runs.append((time.perf_counter() - started, result))
    wall = statistics.median(w for w, _ in runs)
    totals = [r.timings_s["total"] for _, r in runs]
    return {
        "backend": "secagg",
        "m": m,
        "ok": all(r.ok for _, r in runs),
        "repeats": SECAGG_REPEATS,
        "key_holder_s": None,
        "participant_s": statistics.median(t["participant_median"] for t in totals),
        "aggregator_s": statistics.median(t["aggregator"] for t in totals),
        "verify_s": None,
        "wall_s": wall,
        "bytes_sent_per_peer": runs[0][1].bytes_per_peer["sent"],
        "bytes_received_per_peer": runs[0][1].bytes_per_peer["received"],
    }


def _paillier_row(
    n: int, m: int, inputs: np.ndarray[Any, Any], seed: int, key_bits: int, packed: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    result = simulate_paillier(
        n,
        m,
        inputs=inputs,
        seed=seed,
        key_bits=key_bits,
        packed=packed,
        keygen=OpenSSLPrimes(),
        insecure_small_keys=key_bits < DEFAULT_KEY_BITS,
    )
    wall = time.perf_counter() - started
    times = result.timings_s
    return {
        "backend": "paillier-packed" if packed else "paillier-unpacked",
        "m": m,
        "ok": result.ok,
        "ciphertexts_per_peer": result.ciphertexts_per_peer,
        "key_holder_s": times["key_holder_total"],
        "key_holder_keygen_s": times["key_holder_keygen"],
        "key_holder_decrypt_s": times["key_holder_decrypt"],
        "participant_s": times["participant_total"],
        "participant_encrypt_s": times["participant_encrypt"],
        "participant_endorse_s": times["participant_endorse"],
        "aggregator_s": times["aggregator"],
        "verify_s": times["verify"],
        "wall_s": wall,
        "bytes_sent_per_peer": result.bytes_per_peer["sent"],
        "bytes_received_per_peer": result.bytes_per_peer["received"],
        "key_holder_bytes_sent": result.bytes_per_peer["key_holder_sent"],
        "transcript_bytes": result.transcript_bytes,
        "error": result.aborted or result.transcript_error,
    }


_RATIO_FIELDS = ("participant_s", "aggregator_s", "wall_s", "bytes_sent_per_peer")


def _ratios(row: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    return {
        field: row[field] / baseline[field]
        for field in _RATIO_FIELDS
        if row.get(field) is not None and baseline.get(field)
    }


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_table(rows: Sequence[dict[str, Any]], out: Any) -> None:
    header = (
        f"{'backend':<18} {'m':>6} {'ct/peer':>7} {'keyhold s':>9} {'partic s':>9} "
        f"{'aggreg s':>9} {'verify s':>9} {'wall s':>9} {'sent B':>9} {'recv B':>9} "
        f"{'x partic':>9} {'x aggreg':>9} {'x wall':>8} {'x bytes':>8}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in rows:
        if row.get("skipped"):
            print(f"{row['backend']:<18} {row['m']:>6}  not run: {row['skipped']}", file=out)
            continue
        ratio = row.get("ratio_to_secagg", {})
        print(
            f"{row['backend']:<18} {row['m']:>6} {row.get('ciphertexts_per_peer', '-')!s:>7} "
            f"{_fmt_s(row['key_holder_s']):>9} {_fmt_s(row['participant_s']):>9} "
            f"{_fmt_s(row['aggregator_s']):>9} {_fmt_s(row['verify_s']):>9} "
            f"{_fmt_s(row['wall_s']):>9} {row['bytes_sent_per_peer']:>9.0f} "
            f"{row['bytes_received_per_peer']:>9.0f} "
            + " ".join(
                f"{ratio[f]:>{w}.1f}" if f in ratio else f"{'-':>{w}}"
                for f, w in zip(_RATIO_FIELDS, (9, 9, 8, 8), strict=True)
            ),
            file=out,
        )


def run(args: argparse.Namespace, out: Any = sys.stdout) -> int:
    """Run the benchmark described by ``args``; return the exit code."""
    lengths: list[int] = [100, 1000] if args.quick else list(args.lengths)
    key_bits: int = 1024 if args.quick else args.key_bits
    if args.peers < 3:
        raise UsageError("Paillier needs at least 3 peers (t endorsers besides the key holder)")
    if any(m < 1 for m in lengths):
        raise UsageError("vector lengths must be positive")
    load_before = _load()
    rows: list[dict[str, Any]] = []
    per_ciphertext_s: float | None = None  # unpacked encryption time per ciphertext
    largest_unpacked = 0
    for m in lengths:
        inputs = (
            np.random.default_rng(args.seed)
            .integers(0, 1 << 32, size=(args.peers, m), dtype=np.uint64)
            .astype(np.uint32)
        )
        baseline = _secagg_row(args.peers, m, inputs, args.seed)
        rows.append(baseline)
        print(f"m={m}: secagg done, running paillier (packed)...", file=sys.stderr)
        for packed in (True, False):
            if not packed and m > args.unpacked_max_length:
                estimate = None if per_ciphertext_s is None else round(per_ciphertext_s * m, 1)
                rows.append(
                    {
                        "backend": "paillier-unpacked",
                        "m": m,
                        "skipped": f"m > --unpacked-max-length {args.unpacked_max_length}",
                        "estimated_participant_encrypt_s": estimate,
                        "estimate_basis": (
                            "scaled linearly from the measured unpacked run at "
                            f"m={largest_unpacked}"
                            if estimate is not None
                            else None
                        ),
                    }
                )
                continue
            if not packed:
                print(f"m={m}: running paillier (unpacked)...", file=sys.stderr)
            row = _paillier_row(args.peers, m, inputs, args.seed, key_bits, packed)
            row["ratio_to_secagg"] = _ratios(row, baseline)
            rows.append(row)
            if not packed and m >= largest_unpacked:
                largest_unpacked = m
                per_ciphertext_s = row["participant_encrypt_s"] / row["ciphertexts_per_peer"]
    _print_table(rows, out)
    report = {
        "benchmark": "paillier",
        "command": " ".join(["python -m scripts.bench_paillier", *getattr(args, "argv", [])]),
        "peers": args.peers,
        "key_bits": key_bits,
        "keygen": "OpenSSLPrimes (pyca RSA primes)",
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "gmpy2": _has_gmpy2(),
            "load_average_before": load_before,
            "load_average_after": _load(),
        },
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}", file=out)
    failed = [r for r in rows if not r.get("skipped") and not r["ok"]]
    for row in failed:
        print(f"FAILED: {row['backend']} m={row['m']}: {row.get('error')}", file=out)
    return EXIT_FAILED if failed else EXIT_OK


def _load() -> list[float] | None:
    """The 1/5/15-minute load averages: times on a busy machine are inflated."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _has_gmpy2() -> bool:
    """phe uses gmpy2 for modular arithmetic when installed (several times faster)."""
    try:
        import gmpy2  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with ``argv`` (default: the process arguments); return the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(handler=run, argv=arguments)  # argv is recorded with the results
    return run_command(parser, arguments, prog=lambda _: PROG, expected=(ConfigError,))


if __name__ == "__main__":
    raise SystemExit(main())
