"""``peer`` — run a hospital's peer, and the peer-side maintenance commands.

peer start --config hospital_a.toml [--log-format json]
peer verify-ledger --config hospital_a.toml [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence

__all__ = ["main"]


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def _start(args: argparse.Namespace) -> int:
    from .config import ConfigFileError, load_config
    from .identity import IdentityError
    from .logs import configure_logging
    from .node import PeerNode

    configure_logging(args.log_format)
    try:
        config = load_config(args.config)
        node = PeerNode(config)
    except (ConfigFileError, IdentityError, OSError, ValueError) as error:
        raise UserError(str(error)) from None

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
        raise UserError(str(error)) from None
    return 0


def _verify_ledger(args: argparse.Namespace) -> int:
    from .config import ConfigFileError, load_config
    from .identity import load_certificate, load_roster
    from .ledger import Ledger, verify_ledger

    try:
        config = load_config(args.config)
        roster = load_roster(config.roster, load_certificate(config.ca))
    except (ConfigFileError, ValueError, OSError) as error:
        raise UserError(str(error)) from None
    ledger = Ledger(config.ledger_url)
    report = verify_ledger(ledger, roster.verifiers(), min_signatures=args.min_signatures)
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": [str(p) for p in report.problems]}))
    else:
        print(str(report))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="peer", description="A hospital's secure aggregation peer."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run the peer (mTLS gRPC server and session runner)")
    start.add_argument("--config", required=True, help="the peer's TOML configuration")
    start.add_argument("--log-format", choices=("text", "json"), default="text")
    start.set_defaults(handler=_start)
    verify = commands.add_parser(
        "verify-ledger", help="check the ledger's hash chain and signatures"
    )
    verify.add_argument("--config", required=True)
    verify.add_argument("--min-signatures", type=int, default=None)
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_verify_ledger)
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
        return result
    except UserError as error:
        print(f"peer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("peer").info("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
