"""Certificate renewal without downtime: request/sign/roster, the overlap, live reload.

The attacks each check stops are named in the test names: an expired or revoked old
certificate is refused, a certificate the roster does not list is not installed, a key that
does not belong to the certificate is not installed, and a previous certificate listed under
another member is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from peer.channels import ChannelPool
from peer.identity import (
    CertificateExpiredError,
    FingerprintMismatchError,
    RevokedCertificateError,
    RosterError,
    fingerprint,
    load_certificate,
    load_roster,
    load_signer,
    verifier_for,
)
from peer.identity.testing import LocalFederation
from peer.reload import OwnIdentity, TrustedKeys, TrustReloader
from peer.tls import Authenticator, TLSFiles
from scripts.ceremony import main

B = "hospital-b"


@pytest.fixture
def fed(tmp_path: Path) -> LocalFederation:
    return LocalFederation.create(tmp_path / "fed")


def _renewed(fed: LocalFederation, days: int = 365) -> tuple[Any, Any]:
    old = fed.members[B]
    new = fed.renew(B, validity_days=days)
    fed.publish_roster({})
    return old, new


def test_renewal_keeps_the_old_certificate_listed_as_previous(fed: LocalFederation) -> None:
    old, new = _renewed(fed)
    assert new.key != old.key
    assert new.key.name == f"{B}.next.key"
    assert load_signer(new.key).sign(b"x") != b""  # a key of its own, not a copy
    assert new.certificate().public_key() != old.certificate().public_key()
    entry = fed.roster[B]
    assert entry.cert_fingerprint_sha256 == fingerprint(new.certificate())
    assert [fingerprint(c) for c in entry.previous] == [fingerprint(old.certificate())]
    # A second roster (nothing renewed) keeps what the first one listed.
    fed.publish_roster({})
    assert fed.roster[B].previous == entry.previous
    assert fed.roster["hospital-a"].previous == ()


def test_both_certificates_are_accepted_during_the_overlap(fed: LocalFederation) -> None:
    old, new = _renewed(fed)
    auth = Authenticator(fed.ca.certificate, fed.roster, fed.crl)
    assert auth.authenticate(old.certificate()).peer_id == B
    assert auth.authenticate(new.certificate()).peer_id == B


def test_an_expired_old_certificate_is_refused(tmp_path: Path) -> None:
    fed = LocalFederation.create(tmp_path / "fed")
    fed.add_member(B, validity_days=10, subdirectory="short")  # B's certificate expires soon
    fed.publish_roster({})
    old = fed.members[B]
    new = fed.renew(B, validity_days=365)
    fed.publish_roster({})
    later = datetime.now(UTC) + timedelta(days=20)  # old expired, new still valid
    auth = Authenticator(fed.ca.certificate, fed.roster, fed.crl, clock=lambda: later)
    with pytest.raises(CertificateExpiredError, match="expired"):
        auth.authenticate(old.certificate())
    assert auth.authenticate(new.certificate()).peer_id == B
    # Its key no longer signs for B in a round either, but still verifies B's history.
    keys = TrustedKeys(fed.roster, fed.crl, clock=lambda: later)
    signature = load_signer(old.key).sign(b"record")
    assert not keys[B].verify(signature, b"record")
    assert keys[B].verify(load_signer(new.key).sign(b"record"), b"record")
    assert fed.roster.verifiers()[B].verify(signature, b"record")


def test_a_revoked_old_certificate_is_refused(fed: LocalFederation) -> None:
    old, new = _renewed(fed)
    crl = fed.revoke_certificate(old.cert)
    auth = Authenticator(fed.ca.certificate, fed.roster, crl)
    with pytest.raises(RevokedCertificateError, match="revoked"):
        auth.authenticate(old.certificate())
    assert auth.authenticate(new.certificate()).peer_id == B
    keys = TrustedKeys(fed.roster, crl)
    assert not keys[B].verify(load_signer(old.key).sign(b"m"), b"m")
    assert keys[B].verify(load_signer(new.key).sign(b"m"), b"m")


def test_a_certificate_the_roster_does_not_list_is_refused(fed: LocalFederation) -> None:
    roster = fed.roster
    new = fed.renew(B)  # signed by the CA, but no roster lists it yet
    auth = Authenticator(fed.ca.certificate, roster, fed.crl)
    with pytest.raises(FingerprintMismatchError, match="new roster"):
        auth.authenticate(new.certificate())


def test_a_previous_certificate_of_another_member_is_refused(fed: LocalFederation) -> None:
    _renewed(fed)
    assert fed.roster_path is not None
    body = json.loads(fed.roster_path.read_text())
    a_pem = next(m["certificate"] for m in body["members"] if m["peer_id"] == "hospital-a")
    for member in body["members"]:
        if member["peer_id"] == B:
            member["previous_certificates"].append(a_pem)
    document = (json.dumps(body, indent=2) + "\n").encode()
    _sign_as_ca(fed, document)
    with pytest.raises(
        RosterError, match=r"certificate of 'hospital-a'.*listed under 'hospital-b'"
    ):
        load_roster(fed.roster_path, fed.ca.certificate)


def _sign_as_ca(fed: LocalFederation, document: bytes) -> None:
    """Re-sign an edited roster with the CA key: the CA's own mistake, not a forgery."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from peer.identity._roster import _SIGNING_LABEL, _signature_envelope
    from peer.identity._store import open_ca

    ca = open_ca(fed.ca.directory)
    signature = ca.key.sign(_SIGNING_LABEL + document, ec.ECDSA(hashes.SHA256()))
    assert fed.roster_path is not None
    fed.roster_path.write_bytes(document)
    Path(str(fed.roster_path) + ".sig").write_bytes(
        _signature_envelope(signature, fed.ca.fingerprint)
    )


def _site(fed: LocalFederation, tmp_path: Path) -> Path:
    """hospital-b's kit files as its peer reads them: <id>.pem, <id>.key, roster, CRL."""
    site = tmp_path / "site"
    site.mkdir()
    member = fed.members[B]
    shutil.copy(member.cert, site / f"{B}.pem")
    shutil.copy(member.key, site / f"{B}.key")
    (site / f"{B}.key").chmod(0o600)
    _publish(fed, site)
    (site / "crl.pem").write_bytes(fed.crl.pem())
    return site


def _publish(fed: LocalFederation, site: Path) -> None:
    assert fed.roster_path is not None
    shutil.copy(fed.roster_path, site / "roster.json")
    shutil.copy(str(fed.roster_path) + ".sig", site / "roster.json.sig")


def _install(site: Path, cert: Path, key: Path) -> None:
    """What the site does: the new key, then the new certificate, each by rename."""
    staged_key = site / "staged.key"
    shutil.copy(key, staged_key)
    staged_key.chmod(0o600)
    staged_key.replace(site / f"{B}.key")
    staged_cert = site / "staged.pem"
    shutil.copy(cert, staged_cert)
    staged_cert.replace(site / f"{B}.pem")


def test_the_reloader_installs_a_renewed_certificate_once_the_roster_lists_it(
    fed: LocalFederation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = _site(fed, tmp_path)
    auth = Authenticator.from_files(fed.ca.cert_path, site / "roster.json", site / "crl.pem")
    own = OwnIdentity(B, site / f"{B}.pem", site / f"{B}.key", fed.ca.cert_path)
    installed: list[str] = []
    reloader = TrustReloader(
        auth,
        site / "roster.json",
        site / "crl.pem",
        identity=own,
        on_identity=lambda: installed.append(own.fingerprint),
    )
    old_fingerprint = own.fingerprint
    new = fed.renew(B)
    new_fingerprint = fingerprint(new.certificate())
    # The site installs before the new roster reached it: refused, the old pair stays.
    _install(site, new.cert, new.key)
    with caplog.at_level(logging.ERROR, logger="peer.reload"):
        assert not reloader.check()
    assert "refused the certificate/key files" in caplog.text
    assert own.fingerprint == old_fingerprint
    assert installed == []
    # The roster arrives: the pair is installed without the files changing again.
    fed.publish_roster({})
    _publish(fed, site)
    assert reloader.check()
    assert installed == [new_fingerprint]
    signature = own.signer.sign(b"after")
    assert verifier_for(new.certificate()).verify(signature, b"after")
    assert not reloader.check()  # nothing new


def test_a_round_stream_opened_after_a_renewal_closed_the_channels_dials_again(
    fed: LocalFederation,
) -> None:
    # A renewal closes every pooled channel (peer/node.py: _identity_changed) while a
    # participant may be training with its aggregator already chosen. A stub taken before
    # the training is on a closed channel: grpc refuses the call with UsageError, which once
    # stopped a peer's session (CI). The participant's dialer looks the channel up when the
    # stream opens instead.
    fed.publish_roster({"hospital-a": "127.0.0.1:1"})  # never connected: no call is made
    member = fed.members[B]
    files = TLSFiles(member.cert, member.key, member.ca)

    async def scenario() -> None:
        pool = ChannelPool(lambda: fed.roster, files)
        taken_before = pool.stub("hospital-a")
        streams = pool.round_streams("hospital-a")
        pool.forget("hospital-a", grace=900.0)  # what the renewal does
        await asyncio.sleep(0.05)  # the close runs in the background
        with pytest.raises(grpc.aio.UsageError):
            taken_before.round_stream(timeout=1.0)
        call = streams.round_stream(timeout=1.0)  # a new channel, no error
        call.cancel()
        assert pool.dialled() == ["hospital-a"]
        await pool.close()

    asyncio.run(scenario())


def test_a_key_that_does_not_belong_to_the_certificate_is_not_installed(
    fed: LocalFederation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = _site(fed, tmp_path)
    auth = Authenticator.from_files(fed.ca.cert_path, site / "roster.json", site / "crl.pem")
    own = OwnIdentity(B, site / f"{B}.pem", site / f"{B}.key", fed.ca.cert_path)
    reloader = TrustReloader(auth, site / "roster.json", site / "crl.pem", identity=own)
    old_key = fed.members[B].key
    new = fed.renew(B)
    fed.publish_roster({})
    _publish(fed, site)
    _install(site, new.cert, old_key)  # the new certificate with the old key
    with caplog.at_level(logging.ERROR, logger="peer.reload"):
        reloader.check()
    assert "does not belong to certificate" in caplog.text
    assert own.fingerprint == fingerprint(load_certificate(fed.directory / B / f"{B}.pem"))


def test_ceremony_request_renew_sign_and_roster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str) -> dict[str, Any]:
        assert main([*argv, "--json"]) == 0
        out: dict[str, Any] = json.loads(capsys.readouterr().out)
        return out

    ca, site = tmp_path / "ca", tmp_path / "site"
    run("init-ca", "--dir", str(ca), "--federation", "fed")
    ident = ("--peer-id", "h1", "--institution", "H1", "--federation", "fed")
    run("request", "--dir", str(site), *ident, "--host", "h1.example")
    run(
        "sign",
        "--ca",
        str(ca),
        "--csr",
        str(site / "h1.csr"),
        "--out",
        str(site / "h1.pem"),
        "--yes",
    )
    run(
        "roster",
        "--ca",
        str(ca),
        "--peer",
        f"{site / 'h1.pem'}=h1.example:7443",
        "--out",
        str(tmp_path / "r.json"),
    )
    # Renewing without a current key is refused; with one, a new key beside it.
    assert main(["request", "--dir", str(tmp_path / "empty"), *ident, "--renew"]) != 0
    capsys.readouterr()
    renewed = run("request", "--dir", str(site), *ident, "--host", "h1.example", "--renew")
    assert renewed["key"].endswith("h1.next.key")
    assert renewed["renew"] is True
    assert (site / "h1.key").exists()
    signed = run(
        "sign",
        "--ca",
        str(ca),
        "--csr",
        str(site / "h1.next.csr"),
        "--out",
        str(site / "h1.next.pem"),
        "--yes",
    )
    old = load_certificate(site / "h1.pem")
    assert [r["serial"] for r in signed["renews"]] == [f"{old.serial_number:X}"]
    roster = run(
        "roster",
        "--ca",
        str(ca),
        "--peer",
        f"{site / 'h1.next.pem'}=h1.example:7443",
        "--out",
        str(tmp_path / "r.json"),
    )
    [member] = roster["members"]
    assert member["fingerprint"] == signed["fingerprint"]
    assert member["previous_fingerprints"] == [fingerprint(old)]


def _presented_certificate(address: str, member: Any) -> bytes:
    """The certificate a TLS server at ``address`` presents (DER), seen with plain ssl."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(member.ca))
    context.load_cert_chain(str(member.cert), str(member.key))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    host, _, port = address.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_the_server_presents_the_renewed_certificate_from_the_next_handshake(
    tmp_path: Path,
) -> None:
    import asyncio

    from cryptography.hazmat.primitives.serialization import Encoding

    from peer.kit import LocalKit
    from peer.tls import ServerIdentity, TLSFiles, create_server

    kit = LocalKit.create(tmp_path / "kit", ("hospital-a", B))
    fed = kit.federation
    old = fed.members[B]
    new = fed.renew(B)
    fed.publish_roster({p: kit.kits[p].address for p in ("hospital-a", B)})
    assert fed.roster_path is not None
    auth = Authenticator.from_files(fed.ca.cert_path, fed.roster_path, fed.ca.crl_path)
    identity = ServerIdentity(old.cert, old.key, old.ca)
    client = fed.members["hospital-a"]
    address = kit.kits[B].address

    async def scenario() -> tuple[bytes, bytes]:
        files = TLSFiles(old.cert, old.key, old.ca)
        async with create_server(
            address, files, auth, credentials=identity.credentials(), grace=0.1
        ):
            loop = asyncio.get_running_loop()
            before = await loop.run_in_executor(None, _presented_certificate, address, client)
            identity.replace(new.cert, new.key)
            after = await loop.run_in_executor(None, _presented_certificate, address, client)
            return before, after

    before, after = asyncio.run(scenario())
    assert before == old.certificate().public_bytes(Encoding.DER)
    assert after == new.certificate().public_bytes(Encoding.DER)


def test_records_of_the_past_still_verify_after_the_old_certificate_expired(
    tmp_path: Path,
) -> None:
    fed = LocalFederation.create(tmp_path / "fed")
    fed.add_member(B, validity_days=10, subdirectory="short")
    fed.publish_roster({})
    old = fed.members[B]
    fed.renew(B)
    fed.publish_roster({})
    later = datetime.now(UTC) + timedelta(days=20)
    signature = load_signer(old.key).sign(b"record")
    live = TrustedKeys(fed.roster, fed.crl, clock=lambda: later)
    past = TrustedKeys(fed.roster, fed.crl, clock=lambda: later, for_records=True)
    assert not live[B].verify(signature, b"record")  # no longer in a round
    assert past[B].verify(signature, b"record")  # a record it signed then, caught up now
    revoked = fed.revoke_certificate(old.cert)
    past.refresh(fed.roster, revoked)
    assert not past[B].verify(signature, b"record")  # never once revoked
