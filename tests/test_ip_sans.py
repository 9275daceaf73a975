"""IP addresses go into IP address SANs, and a peer can be reached by IP over mTLS."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peer.identity import (
    CSRError,
    InvalidNameError,
    create_request,
    identity_uri,
    init_ca,
    sign_request,
)
from peer.identity._names import Role, validate_hostname
from peer.identity.testing import LocalFederation, Member
from peer.tls import Authenticator, HandshakeError, TLSFiles, check_peer, create_server
from peer.tls import secure_channel as open_channel
from scripts.ceremony import main as ceremony

FED = "cardio"


def sans(item: x509.Certificate | x509.CertificateSigningRequest) -> tuple[list[str], list[str]]:
    san = item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        list(san.get_values_for_type(x509.DNSName)),
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
    )


def test_hosts_are_sorted_into_dns_and_ip_sans_and_the_ca_keeps_them(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", FED, "Cardio root CA")
    request = create_request(
        tmp_path / "site",
        "hospital-a",
        "Hospital A",
        FED,
        ["a.example.org", "10.1.2.3", "[2001:db8::5]"],
        ips=["10.1.2.3", "192.168.0.9"],  # a repeat is listed once
    )
    csr = x509.load_pem_x509_csr(request.csr.read_bytes())
    assert sans(csr) == (["a.example.org"], ["10.1.2.3", "2001:db8::5", "192.168.0.9"])
    cert = sign_request(ca.directory, request.csr, tmp_path / "a.pem")
    dns, ips = sans(cert)
    assert "10.1.2.3" not in dns
    assert dns == ["a.example.org", "hospital-a.peer.cardio.secagg.invalid"]
    assert ips == ["10.1.2.3", "2001:db8::5", "192.168.0.9"]


def test_ceremony_request_host_ip_goes_into_an_ip_san(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = ceremony(
        [
            "request",
            "--dir",
            str(tmp_path),
            "--peer-id",
            "hospital-a",
            "--institution",
            "Hospital A",
            "--federation",
            FED,
            "--host",
            "10.1.2.3",
            "a.example.org",
            "--json",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ip"] == ["10.1.2.3"]
    assert report["dns"] == ["a.example.org"]
    csr = x509.load_pem_x509_csr((tmp_path / "hospital-a.csr").read_bytes())
    assert (
        x509.IPAddress(ipaddress.ip_address("10.1.2.3"))
        in csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    )


def test_an_ip_is_not_a_hostname() -> None:
    with pytest.raises(InvalidNameError, match="IP address SAN"):
        validate_hostname("10.1.2.3")
    assert validate_hostname("10.example.org") == "10.example.org"


def test_ca_refuses_a_csr_with_an_ip_in_a_dns_san(tmp_path: Path) -> None:
    # A CSR made by hand (or by an old version) that claims DNS:10.1.2.3.
    ca = init_ca(tmp_path / "ca", FED, "Cardio root CA")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "hospital-a"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hospital A"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("10.1.2.3"),
                    x509.UniformResourceIdentifier(identity_uri(FED, Role.PEER, "hospital-a")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "legacy.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CSRError, match=r"'10\.1\.2\.3' is an IP address"):
        sign_request(ca.directory, path, tmp_path / "a.pem")


# --------------------------------------------------------------------------- mTLS by IP


def files(member: Member) -> TLSFiles:
    return TLSFiles(member.cert, member.key, member.ca)


async def dial_by_ip(fed: LocalFederation, server: str, client: str) -> None:
    """Serve ``server`` on 127.0.0.1 and health-check it by IP, with gRPC's default name
    check (no target name override): the server certificate must carry IP 127.0.0.1."""
    assert fed.roster_path is not None
    auth = Authenticator.from_files(fed.ca.cert_path, fed.roster_path, fed.ca.crl_path)
    async with (
        create_server("127.0.0.1:0", files(fed.members[server]), auth, grace=0.1) as (_, port),
        open_channel(f"127.0.0.1:{port}", files(fed.members[client])) as channel,
    ):
        await check_peer(channel, target=f"127.0.0.1:{port}", peer=server, attempts=1)


def test_peer_reached_by_ip_with_an_ip_san_certificate(tmp_path: Path) -> None:
    fed = LocalFederation.create(tmp_path, federation=FED, peers=[])
    fed.add_member("hospital-a", hostnames=(), ips=())
    # The hospital asks for its IP the way the README says: ceremony request --host <ip>.
    fed.add_member("hospital-ip", hostnames=["127.0.0.1"], ips=())
    fed.add_member("hospital-dns", hostnames=["localhost"], ips=())
    fed.publish_roster({})
    cert = fed.members["hospital-ip"].certificate()
    assert sans(cert)[1] == ["127.0.0.1"]

    asyncio.run(dial_by_ip(fed, "hospital-ip", "hospital-a"))
    # Without the IP in an IP SAN, the client's TLS layer refuses the server.
    with pytest.raises(HandshakeError, match="does not carry the expected identity"):
        asyncio.run(dial_by_ip(fed, "hospital-dns", "hospital-a"))


def test_roster_address_by_ip_reaches_exactly_that_member(tmp_path: Path) -> None:
    # peer_channel dials the roster's IP and checks the reserved identity name instead of
    # the IP (grpc.ssl_target_name_override): it works with or without an IP SAN, and only
    # the member the roster names at that address is accepted.
    from peer.tls import peer_channel

    fed = LocalFederation.create(tmp_path, federation=FED, peers=[])
    for peer_id in ("hospital-a", "hospital-b", "hospital-c"):
        fed.add_member(peer_id, hostnames=(), ips=())

    async def dial(server: str, expected: str) -> None:
        assert fed.roster_path is not None
        auth = Authenticator.from_files(fed.ca.cert_path, fed.roster_path, fed.ca.crl_path)
        async with create_server("127.0.0.1:0", files(fed.members[server]), auth, grace=0.1) as (
            _,
            port,
        ):
            roster = fed.publish_roster({expected: f"127.0.0.1:{port}"})
            async with peer_channel(roster, expected, files(fed.members["hospital-a"])) as chan:
                await check_peer(chan, target=f"127.0.0.1:{port}", peer=expected, attempts=1)

    fed.publish_roster({})
    asyncio.run(dial("hospital-b", "hospital-b"))
    # hospital-c answers at the address the roster gives for hospital-b: refused by TLS.
    with pytest.raises(HandshakeError, match="does not carry the expected identity"):
        asyncio.run(dial("hospital-c", "hospital-b"))
