"""``dashboard`` — serve a peer's ledger as a web page, read-only.

::

    dashboard --ledger /var/lib/peer/ledger.db
    dashboard --ledger sqlite:////var/lib/peer/ledger.db --roster roster.json --ca ca.pem \\
        --budget hospital-a=8 --budget hospital-b=8 --port 8050

It binds 127.0.0.1 by default: the page has no login, so reach it from another machine
through an SSH tunnel or a reverse proxy with authentication rather than ``--host 0.0.0.0``.
Exit status 2 means the arguments, the ledger or the roster could not be used (one line on
stderr says why).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence

from werkzeug.serving import make_server

from dashboard.app import create_app
from dashboard.source import LedgerSource, LedgerSourceError, shown_url
from peer.identity import IdentityError, load_certificate, load_roster
from peer.ledger import LedgerError
from secagg.crypto import Verifier

__all__ = ["main", "parse_budget"]

log = logging.getLogger("dashboard")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050


class UsageError(Exception):
    """A problem with what the user asked for; the message is shown as is."""


def parse_budget(text: str) -> tuple[str, float]:
    """``PEER=EPS`` as ``(peer, eps)``.

    Raises:
        argparse.ArgumentTypeError: malformed, or ε not a positive number.
    """
    peer_id, sep, value = text.partition("=")
    if not sep or not peer_id.strip():
        raise argparse.ArgumentTypeError(f"expected PEER=EPS, got {text!r}")
    try:
        eps = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ε of {peer_id!r} is not a number: {value!r}") from None
    if not eps > 0 or eps == float("inf"):
        raise argparse.ArgumentTypeError(f"ε budget of {peer_id!r} must be positive, not {value}")
    return peer_id.strip(), eps


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 86_400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dashboard",
        description="Serve the agreed metrics, privacy spending and signatures of a peer's "
        "ledger as a web page (read-only).",
    )
    parser.add_argument(
        "--ledger",
        required=True,
        metavar="URL",
        help="the peer's ledger: a SQLAlchemy URL (sqlite:////path/ledger.db, "
        "postgresql+psycopg://...) or the path of its SQLite file",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (%(default)s)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to bind, 0 for any (%(default)s)"
    )
    parser.add_argument(
        "--interval",
        type=_positive,
        default=5.0,
        metavar="SECONDS",
        help="seconds between page refreshes (%(default)s)",
    )
    parser.add_argument(
        "--roster", metavar="PATH", help="signed roster (with PATH.sig) to verify signatures"
    )
    parser.add_argument("--ca", metavar="PATH", help="consortium CA certificate for --roster")
    parser.add_argument(
        "--budget",
        type=parse_budget,
        action="append",
        default=[],
        metavar="PEER=EPS",
        help="ε budget of a hospital for the shown session (repeatable); overrides the "
        "proposal's privacy section",
    )
    return parser


def _verifiers(roster: str | None, ca: str | None) -> dict[str, Verifier] | None:
    if roster is None and ca is None:
        return None
    if roster is None or ca is None:
        raise UsageError("--roster and --ca go together: give both, or neither")
    try:
        ca_cert = load_certificate(ca)
    except FileNotFoundError:
        raise UsageError(f"CA certificate {ca} does not exist") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the CA certificate: {exc}") from None
    try:
        return load_roster(roster, ca_cert).verifiers()
    except IdentityError as exc:
        raise UsageError(f"cannot use the roster: {exc}") from None


def _check_ledger(url: str) -> None:
    try:
        source = LedgerSource(url)
    except LedgerSourceError as exc:
        raise UsageError(f"cannot open the ledger: {exc}") from None
    try:
        source.probe()
    except LedgerError as exc:
        raise UsageError(_first_line(str(exc))) from None
    finally:
        source.close()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the dashboard until interrupted; returns the exit status."""
    args = _parser().parse_args(argv)
    # force: log to the stderr of this call (tests call main() several times in-process).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    # One request line per refresh per browser would drown anything useful.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        if not 0 <= args.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, not {args.port}")
        verifiers = _verifiers(args.roster, args.ca)
        _check_ledger(args.ledger)
        app = create_app(
            args.ledger,
            verifiers=verifiers,
            interval_s=args.interval,
            budgets=dict(args.budget),
        )
        server = make_server(args.host, args.port, app.server, threaded=True)
    except UsageError as exc:
        print(f"dashboard: error: {exc}", file=sys.stderr)
        return 2
    except (LedgerSourceError, ValueError) as exc:
        print(f"dashboard: error: {_first_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dashboard: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        log.warning(
            "listening on %s: the dashboard has no login; anyone who can reach this address "
            "can read the ledger's agreed metrics",
            args.host,
        )
    checked = "signatures verified against the roster" if verifiers else "no roster given"
    print(
        f"dashboard: serving {shown_url(args.ledger)} ({checked}) at http://{args.host}:{server.server_port}/"
        " — Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
