"""Real mutual TLS on 127.0.0.1: who gets in, who is refused, and what each side is told."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2

from peer.identity import (
    Clock,
    CRLError,
    IdentityError,
    KeyFileError,
    NotInRosterError,
    Role,
    RosterError,
    identity_hostname,
    system_clock,
)
from peer.identity._store import open_ca
from peer.identity.testing import LocalFederation, Member
from peer.tls import (
    Authenticator,
    HandshakeError,
    PeerRejectedError,
    PeerUnreachableError,
    TLSFiles,
    caller_identity,
    channel_credentials,
    check_peer,
    create_server,
    map_rpc_error,
    peer_channel,
    secure_channel,
    server_credentials,
)

FED = "cardio"
SERVER = "hospital-s"


# --------------------------------------------------------------------------- a tiny service


async def whoami(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    # Yield to the loop so concurrent calls interleave: each must still see its own caller.
    await asyncio.sleep(0.02)
    return f"{caller_identity().peer_id}:{request.decode()}".encode()


async def chat(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield caller_identity().peer_id.encode() + b">" + request


def sync_whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    return caller_identity().peer_id.encode()


SERVICE = grpc.method_handlers_generic_handler(
    "test.Echo",
    {
        "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami),
        "SyncWhoAmI": grpc.unary_unary_rpc_method_handler(sync_whoami),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    },
)


# --------------------------------------------------------------------------- the federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> LocalFederation:
    root = tmp_path_factory.mktemp("federation")
    now = datetime.now(UTC)
    fed = LocalFederation.create(
        root, federation=FED, peers=[SERVER, "alice", "bob", "carol"], operators=["ops"]
    )
    # Valid by the wall clock (so TLS lets it through), expires tomorrow: used with a
    # server clock set two days ahead to exercise the interceptor's own expiry check.
    fed.add_member("dora", validity_days=1)
    # Expired by the wall clock: refused by TLS itself.
    fed.add_member("eve", validity_days=1, clock=lambda: now - timedelta(days=10))
    fed.publish_roster({}, include=[SERVER, "alice", "bob", "ops", "dora", "eve"])  # no carol
    fed.revoke("bob")
    return fed


def files(member: Member) -> TLSFiles:
    return TLSFiles.of(member.cert, member.key, member.ca)


def authenticator(fed: LocalFederation, clock: Clock = system_clock) -> Authenticator:
    assert fed.roster_path is not None
    return Authenticator.from_files(fed.ca.cert_path, fed.roster_path, fed.ca.crl_path, clock)


def serve(
    fed: LocalFederation,
    test: Callable[[int], Awaitable[None]],
    auth: Authenticator | None = None,
) -> None:
    async def main() -> None:
        async with create_server(
            "127.0.0.1:0",
            files(fed.members[SERVER]),
            auth or authenticator(fed),
            handlers=[SERVICE],
            grace=0.1,
        ) as (_server, port):
            await test(port)

    asyncio.run(main())


def channel(fed: LocalFederation, port: int, member: str) -> grpc.aio.Channel:
    return secure_channel(
        f"127.0.0.1:{port}",
        files(fed.members[member]),
        server_name=identity_hostname(FED, Role.PEER, SERVER),
    )


async def call_whoami(chan: grpc.aio.Channel, payload: bytes = b"hi") -> bytes:
    result: bytes = await chan.unary_unary("/test.Echo/WhoAmI", None, None)(payload, timeout=5)
    return result


# --------------------------------------------------------------------------- accepted


def test_member_is_served_and_identified(
    fed: LocalFederation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="peer.tls")

    async def test(port: int) -> None:
        async with channel(fed, port, "alice") as chan:
            assert await call_whoami(chan) == b"alice:hi"
            sync = await chan.unary_unary("/test.Echo/SyncWhoAmI", None, None)(b"", timeout=5)
            assert sync == b"alice"
            stream = chan.stream_stream("/test.Echo/Chat", None, None)(
                iter([b"1", b"2"]), timeout=5
            )
            assert [reply async for reply in stream] == [b"alice>1", b"alice>2"]
            await check_peer(chan, target=f"127.0.0.1:{port}", peer=SERVER)
            watch = chan.unary_stream(
                "/grpc.health.v1.Health/Watch",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )(health_pb2.HealthCheckRequest(service=""), timeout=5)
            first = await watch.read()
            assert isinstance(first, health_pb2.HealthCheckResponse)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()

    serve(fed, test)
    lines = [r.getMessage() for r in caplog.records if "called by alice" in r.getMessage()]
    assert any("/test.Echo/WhoAmI called by alice (Institution alice, peer)" in m for m in lines)
    assert any("TLSv1.3" in m or "TLSv1.2" in m for m in lines)


def test_concurrent_callers_each_see_their_own_identity(fed: LocalFederation) -> None:
    async def test(port: int) -> None:
        async with channel(fed, port, "alice") as a, channel(fed, port, "ops") as o:
            calls = [call_whoami(a if i % 2 else o, str(i).encode()) for i in range(10)]
            replies = await asyncio.gather(*calls)
        assert replies == [f"{'alice' if i % 2 else 'ops'}:{i}".encode() for i in range(10)]

    serve(fed, test)


def test_peer_channel_reaches_the_member_named_in_the_roster(fed: LocalFederation) -> None:
    auth = authenticator(fed)

    async def test(port: int) -> None:
        # The real address is only known now: publish a roster with it and install it live.
        roster = fed.publish_roster(
            {SERVER: f"127.0.0.1:{port}"}, include=[SERVER, "alice", "bob", "ops", "dora", "eve"]
        )
        auth.update(roster=roster)
        async with peer_channel(roster, SERVER, files(fed.members["alice"])) as chan:
            assert await call_whoami(chan) == b"alice:hi"
        with pytest.raises(RosterError, match="rollback"):
            auth.update(roster=dataclasses.replace(roster, version=roster.version - 1))

    serve(fed, test, auth)


# --------------------------------------------------------------------------- refused


REFUSALS = [
    # (client, status the client sees, text in the details)
    ("carol", grpc.StatusCode.PERMISSION_DENIED, "NotInRosterError: 'carol'"),
    ("bob", grpc.StatusCode.UNAUTHENTICATED, "RevokedCertificateError: certificate of 'bob'"),
]


@pytest.mark.parametrize(("client", "code", "details"), REFUSALS)
def test_refused_by_the_interceptor_while_others_are_served(
    fed: LocalFederation,
    client: str,
    code: grpc.StatusCode,
    details: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="peer.tls")

    async def test(port: int) -> None:
        async with channel(fed, port, client) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_whoami(chan)
            assert caught.value.code() == code
            assert details in (caught.value.details() or "")
            mapped = map_rpc_error(caught.value, target="x", peer=SERVER)
            assert isinstance(mapped, PeerRejectedError)
            # The health service is behind the same check, and check_peer does not retry.
            slept: list[float] = []

            async def sleep(seconds: float) -> None:
                slept.append(seconds)

            with pytest.raises(PeerRejectedError, match=f"peer {SERVER} at .* refused our"):
                await check_peer(chan, target=f"127.0.0.1:{port}", peer=SERVER, sleep=sleep)
            assert slept == []
        async with channel(fed, port, "alice") as chan:
            assert await call_whoami(chan) == b"alice:hi"

    serve(fed, test)
    assert any(f"claims {client}" in r.getMessage() for r in caplog.records)


def test_expiry_is_checked_with_the_servers_clock(fed: LocalFederation) -> None:
    # TLS accepted dora's certificate (valid by the wall clock); the server's injected clock
    # is two days ahead, where it has expired.
    later = datetime.now(UTC) + timedelta(days=2)

    async def test(port: int) -> None:
        async with channel(fed, port, "dora") as chan:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_whoami(chan)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "CertificateExpiredError: certificate of 'dora'" in (caught.value.details() or "")
        async with channel(fed, port, "alice") as chan:
            assert await call_whoami(chan) == b"alice:hi"

    serve(fed, test, authenticator(fed, clock=lambda: later))


def _forge_foreign_member(fed: LocalFederation, directory: Path) -> TLSFiles:
    """mallory of federation 'neuro', signed by *our* CA key without sign_request's checks."""
    ca = open_ca(fed.ca.directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "mallory"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Neuro"),
                ]
            )
        )
        .issuer_name(ca.info.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:neuro:peer:mallory")]),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mallory.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "mallory.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return TLSFiles.of(directory / "mallory.pem", key_path, fed.ca.cert_path)


def test_wrong_federation_certificate_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    mallory = _forge_foreign_member(fed, tmp_path / "mallory")

    async def test(port: int) -> None:
        async with secure_channel(
            f"127.0.0.1:{port}", mallory, server_name=identity_hostname(FED, Role.PEER, SERVER)
        ) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_whoami(chan)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (
            "WrongFederationError: certificate of 'mallory' (Neuro) is for federation "
            "'neuro', this peer belongs to 'cardio'" in (caught.value.details() or "")
        )
        async with channel(fed, port, "alice") as chan:
            assert await call_whoami(chan) == b"alice:hi"

    serve(fed, test)


@pytest.mark.parametrize("client", ["no-certificate", "other-ca", "eve"])
def test_refused_by_tls_is_reported_as_a_handshake_failure_not_retried(
    fed: LocalFederation, tmp_path_factory: pytest.TempPathFactory, client: str
) -> None:
    ca_pem = fed.ca.cert_path.read_bytes()
    if client == "no-certificate":
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    elif client == "other-ca":
        other = LocalFederation.create(
            tmp_path_factory.mktemp("other"), federation=FED, peers=["alice"]
        )
        member = other.members["alice"]
        credentials = grpc.ssl_channel_credentials(
            ca_pem, member.key.read_bytes(), member.cert.read_bytes()
        )
    else:
        member = fed.members[client]
        credentials = grpc.ssl_channel_credentials(
            ca_pem, member.key.read_bytes(), member.cert.read_bytes()
        )

    async def test(port: int) -> None:
        target = f"127.0.0.1:{port}"
        override = [("grpc.ssl_target_name_override", identity_hostname(FED, Role.PEER, SERVER))]
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        async with grpc.aio.secure_channel(target, credentials, options=override) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call_whoami(chan)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(HandshakeError, match="did not accept our certificate"):
                await check_peer(chan, target=target, peer=SERVER, sleep=sleep, attempts=5)
        assert slept == []
        async with channel(fed, port, "alice") as chan:
            assert await call_whoami(chan) == b"alice:hi"

    serve(fed, test)


def test_server_that_is_not_the_expected_peer_is_refused_by_the_client(
    fed: LocalFederation,
) -> None:
    async def test(port: int) -> None:
        target = f"127.0.0.1:{port}"
        async with secure_channel(
            target,
            files(fed.members["alice"]),
            server_name=identity_hostname(FED, Role.PEER, "hospital-other"),
        ) as chan:
            with pytest.raises(HandshakeError, match="is not hospital-other"):
                await check_peer(chan, target=target, peer="hospital-other")

    serve(fed, test)


def test_unreachable_peer_is_retried_a_bounded_number_of_times(fed: LocalFederation) -> None:
    async def main() -> None:
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        target = "127.0.0.1:1"  # nothing listens on port 1
        async with secure_channel(target, files(fed.members["alice"])) as chan:
            with pytest.raises(PeerUnreachableError, match="cannot connect to peer x"):
                await check_peer(
                    chan, target=target, peer="x", attempts=3, retry_delay=0.5, sleep=sleep
                )
        assert slept == [0.5, 1.0]

    asyncio.run(main())


# --------------------------------------------------------------------------- server start


def test_server_refuses_to_start_with_an_unlisted_or_operator_certificate(
    fed: LocalFederation,
) -> None:
    async def start(member: str) -> None:
        async with create_server("127.0.0.1:0", files(fed.members[member]), authenticator(fed)):
            pytest.fail("should not start")

    with pytest.raises(NotInRosterError, match="'carol'"):
        asyncio.run(start("carol"))
    with pytest.raises(IdentityError, match="operator certificate, which may propose sessions"):
        asyncio.run(start("ops"))


def test_authenticator_refuses_an_older_crl(tmp_path: Path) -> None:
    small = LocalFederation.create(tmp_path, federation=FED, peers=["alice", "bob"])
    older = small.crl
    small.revoke("bob")
    auth = authenticator(small)
    with pytest.raises(CRLError, match=f"refusing CRL number {older.number}"):
        auth.update(crl=older)
    auth.update(crl=small.crl)  # the same number again is fine (e.g. a periodic reload)


def test_second_server_on_the_same_port_fails_loudly(fed: LocalFederation) -> None:
    async def test(port: int) -> None:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            async with create_server(
                f"127.0.0.1:{port}", files(fed.members[SERVER]), authenticator(fed)
            ):
                pytest.fail("two servers share a port")

    serve(fed, test)


def test_credentials_refuse_unsafe_or_mismatched_keys(fed: LocalFederation) -> None:
    alice, server = fed.members["alice"], fed.members[SERVER]
    with pytest.raises(KeyFileError, match="does not belong to certificate"):
        server_credentials(alice.cert, server.key, alice.ca)
    alice.key.chmod(0o644)
    try:
        with pytest.raises(KeyFileError, match="chmod 600"):
            channel_credentials(alice.cert, alice.key, alice.ca)
    finally:
        alice.key.chmod(0o600)


def _tls_probe(
    fed: LocalFederation, port: int, version: ssl.TLSVersion, ciphers: str | None
) -> tuple[str, str]:
    """A plain-``ssl`` handshake with alice's certificate; (version, cipher) or raises."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(fed.ca.cert_path)
    context.check_hostname = False
    context.load_cert_chain(fed.members["alice"].cert, fed.members["alice"].key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
        context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    if ciphers:
        context.set_ciphers(ciphers)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock) as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return tls.version() or "", cipher[0]


@pytest.mark.parametrize(
    ("version", "ciphers", "expected"),
    [
        (ssl.TLSVersion.TLSv1_3, None, "TLSv1.3"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256", "TLSv1.2"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0", None),  # CBC
        (ssl.TLSVersion.TLSv1_1, "ALL:@SECLEVEL=0", None),
    ],
)
def test_tls_versions_and_ciphers_enforced_by_the_server(
    fed: LocalFederation, version: ssl.TLSVersion, ciphers: str | None, expected: str | None
) -> None:
    async def test(port: int) -> None:
        probe = asyncio.to_thread(_tls_probe, fed, port, version, ciphers)
        if expected is None:
            # The server hangs up on the ClientHello: an EOF, not a local "no protocols".
            with pytest.raises(ssl.SSLEOFError):
                await probe
        else:
            negotiated, _cipher = await probe
            assert negotiated == expected

    serve(fed, test)
