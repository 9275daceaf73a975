"""``ceremony privacy``: the epsilon of a DP-SGD schedule, the noise a target epsilon needs,
or what a hospital has spent.

A planning tool for the consortium before it proposes a training session: each local DP-SGD
step is one Poisson-sampled Gaussian mechanism (sampling rate ``q``, noise multiplier
``sigma``), and a hospital's privacy loss is the composition of all its steps, computed by
:func:`peer.training.epsilon` with Google's ``dp_accounting``. The PLD accountant (default) is
the tight one that the peers enforce budgets with; RDP is a looser, independent cross-check.

With ``--config hospital.toml`` (or ``--ledger URL --peer ID [--budget E]``) it shows what the
hospital has spent over its whole history: every release it charged (aborted attempts
included), composed with the PLD accountant at one global delta (RDP as a cross-check),
against its global budget (``policy.max_epsilon``), and what remains.

Example (the DP-SGD paper's MNIST schedule: batches of 256 of 60,000 images, 60 epochs)::

    ceremony privacy --sampling-rate 256/60000 --noise-multiplier 1.1 --steps 14040 --delta 1e-5
    ceremony privacy --sampling-rate 256/60000 --target-epsilon 2 --steps 14040 --delta 1e-5
    ceremony privacy --config hospital_a.toml
"""

from __future__ import annotations

import argparse
import json
import math
from fractions import Fraction
from typing import Any

from peer.cli import EXIT_OK, UsageError

__all__ = ["add_parsers", "parse_rate"]

ACCOUNTANTS = ("pld", "rdp")


def parse_rate(text: str) -> float:
    """A sampling rate given as a decimal (``0.00427``) or a fraction (``256/60000``).

    Raises:
        argparse.ArgumentTypeError: not a number or fraction.
    """
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or a fraction such as 256/60000"
        ) from None
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def _add_privacy(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "privacy",
        help="epsilon of a DP-SGD schedule, or the noise multiplier for a target epsilon",
        description=(
            "Compute the (epsilon, delta) privacy loss of T Poisson-sampled DP-SGD steps\n"
            "with sampling rate Q and noise multiplier S, or, with --target-epsilon instead\n"
            "of --noise-multiplier, the smallest noise multiplier that keeps epsilon at or\n"
            "below the target. Exit 0, or 2 for bad arguments."
        ),
        epilog="Example" + (__doc__ or "").split("Example", 1)[-1].replace("::", ":", 1),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    spent = parser.add_argument_group("what a hospital has spent (instead of a schedule)")
    spent.add_argument(
        "--config", metavar="TOML", help="the hospital's peer configuration (ledger, id, budget)"
    )
    spent.add_argument("--ledger", metavar="URL", help="a peer's ledger (SQLAlchemy URL)")
    spent.add_argument("--peer", metavar="ID", help="the hospital whose charges to compose")
    spent.add_argument("--budget", type=_positive_float, metavar="E", help="its global budget")
    parser.add_argument(
        "--sampling-rate",
        type=parse_rate,
        metavar="Q",
        help="probability that an example joins a step's batch (batch size / records), "
        "e.g. 0.004 or 256/60000",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--noise-multiplier",
        type=_positive_float,
        metavar="S",
        help="noise standard deviation / clip norm (print epsilon)",
    )
    which.add_argument(
        "--target-epsilon",
        type=_positive_float,
        metavar="E",
        help="print the smallest noise multiplier with epsilon <= E",
    )
    parser.add_argument("--steps", type=int, metavar="T", help="local steps, over all rounds")
    parser.add_argument("--delta", type=float, metavar="D", help="e.g. 1e-5")
    parser.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="pld",
        help="privacy loss distribution (tight, default) or Rényi DP (looser)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_privacy)


def _cmd_spent(args: argparse.Namespace) -> int:
    from peer.ledger import Ledger, LedgerError
    from peer.privacy import privacy_statement
    from peer.training.accounting import GLOBAL_DELTA

    url, peer, budget = args.ledger, args.peer, args.budget
    if args.config:
        from peer.config import ConfigFileError, load_config

        try:
            config = load_config(args.config)
        except ConfigFileError as error:
            raise UsageError(str(error)) from None
        url, peer = url or config.ledger_url, peer or config.peer_id
        budget = budget if budget is not None else config.policy.max_epsilon
    if not url or not peer:
        raise UsageError("give --config, or --ledger and --peer")
    delta = args.delta if args.delta is not None else GLOBAL_DELTA
    if not 0.0 < delta < 1.0:
        raise UsageError(f"--delta must be in (0, 1), not {delta:g}")
    try:
        with Ledger(url) as ledger:
            statement = privacy_statement(ledger, peer, budget, delta)
    except (LedgerError, ValueError) as error:
        raise UsageError(f"cannot read the privacy charges of {peer}: {error}") from None
    if args.json:
        print(json.dumps(statement.to_json(), sort_keys=True))
        return EXIT_OK
    shown = "no budget given" if budget is None else f"budget {budget:g}"
    print(
        f"{peer}: epsilon {statement.epsilon:.4f} spent ({shown}"
        + ("" if statement.remaining is None else f", {statement.remaining:.4f} remaining")
        + f") at delta {delta:g}, composed over {len(statement.releases)} release(s) "
        f"(PLD; RDP cross-check {statement.epsilon_rdp:.4f})"
    )
    for release in statement.releases:
        event = release.charge.event
        mechanism = "no event: added up" if event is None else str(event.get("mechanism"))
        print(
            f"  {release.session_id} round {release.round} attempt {release.attempt}: "
            f"{release.charge.kind.value}, +{release.charge.epsilon:.4f} ({mechanism})"
        )
    return EXIT_OK


def _cmd_privacy(args: argparse.Namespace) -> int:
    from peer.training import calibrate_noise, epsilon

    if args.config or args.ledger:
        return _cmd_spent(args)
    q, steps, delta = args.sampling_rate, args.steps, args.delta
    missing = [
        name
        for name, value in (("--sampling-rate", q), ("--steps", steps), ("--delta", delta))
        if value is None
    ]
    if args.noise_multiplier is None and args.target_epsilon is None:
        missing.append("--noise-multiplier or --target-epsilon")
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (or give --config / --ledger)")
    if not 0.0 < q <= 1.0:
        raise UsageError(f"--sampling-rate must be in (0, 1], not {q:g}")
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, not {steps}")
    if not 0.0 < delta < 1.0:
        raise UsageError(f"--delta must be in (0, 1), not {delta:g}")
    try:
        if args.target_epsilon is not None:
            sigma = calibrate_noise(q, steps, delta, args.target_epsilon, args.accountant)
        else:
            sigma = args.noise_multiplier
        # For a calibrated sigma this is the epsilon actually reached (just below the target).
        eps = epsilon(q, sigma, steps, delta, args.accountant)
    except ValueError as error:
        raise UsageError(str(error)) from None
    report: dict[str, Any] = {
        "accountant": args.accountant,
        "sampling_rate": q,
        "steps": steps,
        "delta": delta,
        "noise_multiplier": sigma,
        "epsilon": eps,
        "target_epsilon": args.target_epsilon,
    }
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return EXIT_OK
    schedule = (
        f"{steps} steps at sampling rate {q:.6g}, delta {delta:g}, "
        f"{args.accountant.upper()} accountant"
    )
    if args.target_epsilon is not None:
        print(f"noise multiplier {sigma:.4f} (epsilon {eps:.4f} <= {args.target_epsilon:g})")
    else:
        print(f"epsilon {eps:.4f} (noise multiplier {sigma:g})")
    print(schedule)
    return EXIT_OK


def add_parsers(subparsers: Any) -> None:
    """Register ``privacy`` on ``ceremony``'s subparsers."""
    _add_privacy(subparsers)
