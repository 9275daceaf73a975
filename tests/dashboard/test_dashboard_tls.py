"""Serving the dashboard beyond localhost: TLS with client certificates, or no start at all.

The attacks: someone on the hospital network opens the page without a certificate, or with
a certificate from a CA of their own making. Both are refused during the TLS handshake; a
browser holding a consortium member's certificate gets the page.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard_testlib import LedgerBuilder
from test_dashboard_cli import assert_one_line_error, run_main

from peer.identity.testing import LocalFederation

pytestmark = pytest.mark.timeout(180)


def test_refuses_another_address_without_tls(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    builder = LedgerBuilder.create(tmp_path)
    code, err = run_main(capsys, "--ledger", builder.url, "--listen", "0.0.0.0", "--port", "0")
    assert code == 2
    assert_one_line_error(err, "refusing to listen on 0.0.0.0 without TLS", "--tls-cert")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--tls-cert", "x.pem"), "--tls-cert and --tls-key go together"),
        (("--tls-cert", "x.pem", "--tls-key", "x.key"), "TLS needs --ca"),
        (("--tls-cert", "/no/cert.pem", "--tls-key", "/no/k", "--ca", "/no/ca"), "does not exist"),
    ],
)
def test_incomplete_tls_options_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: tuple[str, ...], fragment: str
) -> None:
    builder = LedgerBuilder.create(tmp_path)
    code, err = run_main(
        capsys, "--ledger", builder.url, "--listen", "0.0.0.0", "--port", "0", *extra
    )
    assert code == 2
    assert_one_line_error(err, fragment)


@pytest.fixture
def tls_dashboard(tmp_path: Path) -> Iterator[tuple[int, LedgerBuilder]]:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1")
    builder.agree_round("s1", 1, {"accuracy": 0.75})
    # The dashboard serves with a consortium certificate of its own host's hospital.
    server = builder.federation.members["hospital-a"]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dashboard",
            "--ledger",
            str(builder.path),
            "--listen",
            "0.0.0.0",
            "--port",
            "0",
            "--tls-cert",
            str(server.cert),
            "--tls-key",
            str(server.key),
            "--ca",
            str(builder.federation.ca.cert_path),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        line = ""
        while "serving" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "dashboard exited before serving"
        match = re.search(r"https://0\.0\.0\.0:(\d+)/", line)
        assert match, line
        assert "client certificates from the consortium CA required" in line
        yield int(match[1]), builder
    finally:
        process.terminate()
        process.wait(timeout=10)


def _get(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> bytes:
    """GET / over TLS as a browser would (server checked against ``ca``); the bytes read."""
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
        return received


def test_consortium_certificate_gets_the_page(tls_dashboard: tuple[int, LedgerBuilder]) -> None:
    port, builder = tls_dashboard
    reader = builder.federation.members["hospital-b"]
    page = _get(port, builder.federation.ca.cert_path, reader.cert, reader.key)
    assert page.startswith(b"HTTP/1.1 200")
    assert b"Consortium ledger" in page


def test_no_client_certificate_is_refused(tls_dashboard: tuple[int, LedgerBuilder]) -> None:
    port, builder = tls_dashboard
    # TLS 1.3 reports the server's refusal at the first read rather than in the handshake.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _get(port, builder.federation.ca.cert_path)


def test_certificate_of_another_ca_is_refused(
    tls_dashboard: tuple[int, LedgerBuilder], tmp_path: Path
) -> None:
    port, builder = tls_dashboard
    intruder = LocalFederation.create(tmp_path / "intruder", peers=("hospital-b",))
    forged = intruder.members["hospital-b"]
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _get(port, builder.federation.ca.cert_path, forged.cert, forged.key)
    # The refused handshakes did not stop the server.
    reader = builder.federation.members["hospital-c"]
    assert _get(port, builder.federation.ca.cert_path, reader.cert, reader.key).startswith(
        b"HTTP/1.1 200"
    )


def test_a_silent_client_does_not_block_others(tls_dashboard: tuple[int, LedgerBuilder]) -> None:
    port, builder = tls_dashboard
    reader = builder.federation.members["hospital-b"]
    with socket.create_connection(("127.0.0.1", port), timeout=20):
        # Connected, never says a word: the handshake waits in its own thread.
        page = _get(port, builder.federation.ca.cert_path, reader.cert, reader.key)
    assert page.startswith(b"HTTP/1.1 200")
