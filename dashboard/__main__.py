"""``dashboard`` — serve a peer's ledger as a web page, read-only.

::

    dashboard --ledger /var/lib/peer/ledger.db
    dashboard --ledger sqlite:////var/lib/peer/ledger.db --roster roster.json --ca ca.pem \\
        --budget hospital-a=8 --budget hospital-b=8 --port 8050

    dashboard --ledger ledger.db --listen 0.0.0.0 --port 8443 \\
        --tls-cert dashboard.pem --tls-key dashboard.key --ca ca.pem

It binds 127.0.0.1 by default: the page has no login of its own. To serve it on another
address, ``--listen`` requires TLS with client certificates (``--tls-cert``, ``--tls-key`` and
the consortium CA as ``--ca``): only a browser presenting a certificate issued by the
consortium CA gets a page; anything else is refused during the TLS handshake. Without them
the command refuses to start and says why.
Exit status 2 means the arguments, the ledger, the roster or the certificates could not be
used (one line on stderr says why).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Sequence
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

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
    parser.add_argument(
        "--listen",
        "--host",
        dest="host",
        default=DEFAULT_HOST,
        metavar="ADDRESS",
        help="address to bind (%(default)s); any address that is not loopback requires "
        "--tls-cert, --tls-key and --ca",
    )
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
    parser.add_argument(
        "--ca",
        metavar="PATH",
        help="consortium CA certificate: checks the roster's signature (--roster) and, with "
        "TLS, the browsers' client certificates",
    )
    parser.add_argument(
        "--tls-cert", metavar="PATH", help="this server's certificate (PEM) to serve HTTPS"
    )
    parser.add_argument("--tls-key", metavar="PATH", help="the private key of --tls-cert (PEM)")
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


def _verifiers(roster: str | None, ca: str | None, tls: bool = False) -> dict[str, Verifier] | None:
    if roster is None and (ca is None or tls):
        # With TLS, --ca alone is the CA of the browsers' certificates.
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


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """A server TLS context that requires a client certificate issued by ``ca``.

    Raises:
        UsageError: a file is missing or unusable (the message names it).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise UsageError(
            f"cannot read --tls-cert/--tls-key: {exc.filename} does not exist"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use --tls-cert {cert} with --tls-key {key}: {exc}") from None
    try:
        context.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise UsageError(f"CA certificate {ca} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use the CA certificate {ca}: {exc}") from None
    return context


def _tls_settings(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context asked for, or None for plain HTTP on loopback.

    Raises:
        UsageError: TLS options incomplete, or a non-loopback address without TLS.
    """
    given = [args.tls_cert is not None, args.tls_key is not None]
    if any(given) and not all(given):
        raise UsageError("--tls-cert and --tls-key go together: give both, or neither")
    if all(given):
        if args.ca is None:
            raise UsageError(
                "TLS needs --ca, the consortium CA that issued the browsers' client certificates"
            )
        return tls_context(args.tls_cert, args.tls_key, args.ca)
    if not _is_loopback(args.host):
        raise UsageError(
            f"refusing to listen on {args.host} without TLS: the dashboard has no login, so "
            "beyond this machine it needs client certificates from the consortium CA "
            "(give --tls-cert, --tls-key and --ca), or reach it through an SSH tunnel"
        )
    return None


class _TLSHandler(WSGIRequestHandler):
    """Runs the TLS handshake in the request's own thread, with a timeout.

    The listening socket is wrapped with ``do_handshake_on_connect=False``: otherwise the
    handshake would run in the accepting thread, and one client that connects and sends
    nothing would stop every other client from being served.
    """

    timeout = 30

    def handle(self) -> None:
        connection: Any = self.connection
        try:
            connection.do_handshake()
        except (OSError, ssl.SSLError) as exc:
            # Most often a browser without a consortium certificate: refused, nothing served.
            log.info("TLS handshake with %s refused: %s", self.client_address[0], exc)
            return
        super().handle()


def _server(args: argparse.Namespace, app: Any, context: ssl.SSLContext | None) -> BaseWSGIServer:
    if context is None:
        return make_server(args.host, args.port, app, threaded=True)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=_TLSHandler)
    plain: socket.socket = server.socket
    server.socket = context.wrap_socket(plain, server_side=True, do_handshake_on_connect=False)
    # werkzeug reads ssl_context to tell the app the scheme is https.
    server.ssl_context = context
    return server


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
        context = _tls_settings(args)
        verifiers = _verifiers(args.roster, args.ca, tls=context is not None)
        _check_ledger(args.ledger)
        app = create_app(
            args.ledger,
            verifiers=verifiers,
            interval_s=args.interval,
            budgets=dict(args.budget),
            warm_up=threading.Event(),  # the first reader does not wait for the check
        )
        server = _server(args, app.server, context)
    except UsageError as exc:
        print(f"dashboard: error: {exc}", file=sys.stderr)
        return 2
    except (LedgerSourceError, ValueError) as exc:
        print(f"dashboard: error: {_first_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dashboard: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    checked = (
        "signatures verified against the roster"
        if verifiers
        else "hashes checked, signatures not verified: no roster given"
    )
    scheme = "http" if context is None else "https"
    access = "" if context is None else ", client certificates from the consortium CA required"
    print(
        f"dashboard: serving {shown_url(args.ledger)} ({checked}{access}) at "
        f"{scheme}://{args.host}:{server.server_port}/"
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
