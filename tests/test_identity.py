"""Identity ceremony, roster, revocation and the certificate decision function."""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peer.identity import (
    CAError,
    CertificateExpiredError,
    CRLError,
    CSRError,
    FingerprintMismatchError,
    InvalidNameError,
    KeyFileError,
    MalformedCertificateError,
    NotInRosterError,
    PeerIdentity,
    RevokedCertificateError,
    Role,
    RosterError,
    StaleCRLError,
    UnknownCAError,
    WrongFederationError,
    build_roster,
    ca_info,
    check_peer_certificate,
    create_request,
    fingerprint,
    identity_hostname,
    init_ca,
    load_certificate,
    load_crl,
    load_roster,
    load_signer,
    normalize_fingerprint,
    refresh_crl,
    revoke,
    sign_request,
    signature_path,
    validate_peer_id,
    verifier_for,
)
from peer.identity._store import open_ca
from peer.identity.testing import LocalFederation

FED = "cardio"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def fed(tmp_path: Path) -> LocalFederation:
    return LocalFederation.create(
        tmp_path,
        federation=FED,
        peers=["hospital-a", "hospital-b"],
        operators=["ops"],
        clock=lambda: T0,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- ceremony


def test_full_ceremony(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", FED, "Cardio Root CA", clock=lambda: T0)
    assert re.fullmatch(r"SHA256:([0-9A-F]{2}:){31}[0-9A-F]{2}", ca.fingerprint)
    assert ca.fingerprint == fingerprint(load_certificate(ca.cert_path))
    assert mode(ca.key_path) == 0o600
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    usage = ca.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature

    site = tmp_path / "site-a"
    request = create_request(site, "hospital-a", "Hôpital A", FED, ["a.example.org"], ["10.0.0.5"])
    assert mode(request.key) == 0o600
    csr = x509.load_pem_x509_csr(request.csr.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-a"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:cardio:peer:hospital-a"]
    assert san.get_values_for_type(x509.DNSName) == ["a.example.org"]

    cert = sign_request(ca.directory, request.csr, site / "hospital-a.pem", 30, clock=lambda: T0)
    assert load_certificate(site / "hospital-a.pem") == cert
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.not_valid_after_utc == T0 + timedelta(days=30)
    assert cert.not_valid_before_utc < T0
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    cert_san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(cert_san.get_values_for_type(x509.DNSName)) == {
        "a.example.org",
        identity_hostname(FED, Role.PEER, "hospital-a"),
    }
    assert [str(ip) for ip in cert_san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    # The CA keeps a copy of everything it issued.
    assert (ca.directory / "issued" / f"{cert.serial_number:X}.pem").exists()

    signed = build_roster(ca.directory, [(site / "hospital-a.pem", "a.example.org:7443")])
    roster_path, sig_path = signed.write(tmp_path / "dist" / "roster.json")
    roster = load_roster(roster_path, ca.certificate)
    assert sig_path == signature_path(roster_path)
    assert roster.federation == FED
    assert roster.version == 1
    (entry,) = roster.entries
    assert (entry.peer_id, entry.institution, entry.role, entry.address) == (
        "hospital-a",
        "Hôpital A",
        Role.PEER,
        "a.example.org:7443",
    )
    assert entry.cert_fingerprint_sha256 == fingerprint(cert)
    assert json.loads(roster_path.read_text())["members"][0]["peer_id"] == "hospital-a"
    # Each new roster from the same CA has a higher version.
    assert build_roster(ca.directory, []).roster.version == 2


def test_roster_lets_every_peer_verify_every_members_signature(fed: LocalFederation) -> None:
    message = b"advertise keys, round 3"
    signature = load_signer(fed.members["hospital-a"].key).sign(message)
    verifiers = fed.roster.verifiers()
    assert verifiers["hospital-a"].verify(signature, message)
    assert not verifiers["hospital-b"].verify(signature, message)
    assert not verifiers["hospital-a"].verify(signature, message + b"!")
    assert verifier_for(fed.members["hospital-a"].certificate()).verify(signature, message)


def test_init_ca_refuses_to_replace_an_existing_ca(fed: LocalFederation) -> None:
    with pytest.raises(CAError, match="already holds a CA"):
        init_ca(fed.ca.directory, FED, "Again")


# --------------------------------------------------------------------------- roster integrity


def test_tampered_roster_is_refused(fed: LocalFederation) -> None:
    assert fed.roster_path is not None
    text = fed.roster_path.read_text()
    fed.roster_path.write_text(text.replace("127.0.0.1:1", "203.0.113.9:1", 1))
    with pytest.raises(RosterError, match="modified after the CA signed it"):
        load_roster(fed.roster_path, fed.ca.certificate)


def test_unsigned_roster_is_refused(fed: LocalFederation) -> None:
    assert fed.roster_path is not None
    signature_path(fed.roster_path).unlink()
    with pytest.raises(RosterError, match=r"is not signed: its signature file .*\.sig is missing"):
        load_roster(fed.roster_path, fed.ca.certificate)


def test_roster_signature_of_another_roster_is_refused(fed: LocalFederation) -> None:
    assert fed.roster_path is not None
    other = build_roster(fed.ca.directory, [(fed.members["hospital-a"].cert, "h:1")])
    signature_path(fed.roster_path).write_bytes(other.signature)
    with pytest.raises(RosterError, match="modified after the CA signed it"):
        load_roster(fed.roster_path, fed.ca.certificate)


def test_roster_from_another_ca_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    assert fed.roster_path is not None
    other = init_ca(tmp_path / "other-ca", FED, "Impostor CA")
    with pytest.raises(RosterError, match=r"signed by CA .* but this peer trusts CA"):
        load_roster(fed.roster_path, other.certificate)


def test_roster_with_a_garbled_signature_file_is_refused(fed: LocalFederation) -> None:
    assert fed.roster_path is not None
    signature_path(fed.roster_path).write_text("not json")
    with pytest.raises(RosterError, match="signature file is malformed"):
        load_roster(fed.roster_path, fed.ca.certificate)


def test_build_roster_refuses_foreign_certificates_and_bad_entries(
    fed: LocalFederation, tmp_path: Path
) -> None:
    other = LocalFederation.create(tmp_path / "other", federation=FED, peers=["hospital-x"])
    with pytest.raises(RosterError, match="not issued by this federation's CA"):
        build_roster(fed.ca.directory, [(other.members["hospital-x"].cert, "h:1")])
    a = fed.members["hospital-a"].cert
    with pytest.raises(RosterError, match="appears twice"):
        build_roster(fed.ca.directory, [(a, "h:1"), (a, "h:2")])
    # A peer without an address is an outbound-only site (peer/relay.py), not an error.
    (outbound,) = build_roster(fed.ca.directory, [(a, None)]).roster.entries
    assert outbound.address is None
    assert not outbound.inbound
    with pytest.raises(RosterError, match="invalid peer address"):
        build_roster(fed.ca.directory, [(a, "no-port")])
    with pytest.raises(RosterError, match="operator, which runs no peer"):
        build_roster(fed.ca.directory, [(fed.members["ops"].cert, "h:1")])


# --------------------------------------------------------------------------- CSR checks


def test_csr_from_another_federation_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    request = create_request(tmp_path / "x", "hospital-x", "X", "neuro", ["x.example.org"])
    with pytest.raises(CSRError, match="CSR is for federation 'neuro', this CA is for 'cardio'"):
        sign_request(fed.ca.directory, request.csr, tmp_path / "x.pem")
    assert not (tmp_path / "x.pem").exists()


def test_role_must_match_the_csr(fed: LocalFederation, tmp_path: Path) -> None:
    request = create_request(tmp_path / "o", "ops-2", "Ops", FED, role=Role.OPERATOR)
    with pytest.raises(CSRError, match=r"asks for role 'operator'.*signed as 'peer'"):
        sign_request(fed.ca.directory, request.csr, tmp_path / "o.pem")
    cert = sign_request(fed.ca.directory, request.csr, tmp_path / "o.pem", role=Role.OPERATOR)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:cardio:operator:ops-2"]


def test_csr_whose_cn_differs_from_its_uri_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    key = open_ca(fed.ca.directory).key  # any P-256 key will do to sign a CSR
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "hospital-b"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "A"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:cardio:peer:hospital-a")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "bad.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CSRError, match="CN='hospital-b' does not match the id 'hospital-a'"):
        sign_request(fed.ca.directory, path, tmp_path / "bad.pem")


def test_corrupted_csr_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    path = tmp_path / "garbage.csr"
    path.write_text(
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(CSRError, match="is not a certificate signing request"):
        sign_request(fed.ca.directory, path, tmp_path / "out.pem")


def test_certificate_may_not_outlive_the_ca(fed: LocalFederation, tmp_path: Path) -> None:
    request = create_request(tmp_path / "z", "hospital-z", "Z", FED)
    with pytest.raises(CSRError, match="would outlive the CA certificate"):
        sign_request(fed.ca.directory, request.csr, tmp_path / "z.pem", validity_days=20_000)


@pytest.mark.parametrize(
    "peer_id", ["", "A", "-a", "a-", "a_b", "a.b", "a" * 64, "hospital a", "é"]
)
def test_invalid_peer_ids_are_refused(peer_id: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError, match="invalid peer id"):
        create_request(tmp_path, peer_id, "Inst", FED)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a key


@pytest.mark.parametrize("peer_id", ["a", "hospital-a", "h0", "a" * 63, "0-9"])
def test_valid_peer_ids_are_accepted(peer_id: str) -> None:
    assert validate_peer_id(peer_id) == peer_id


@pytest.mark.parametrize(
    ("hostnames", "ips", "message"),
    [
        (["*.example.org"], [], "invalid DNS hostname"),
        (["x.peer.cardio.secagg.invalid"], [], "reserved"),
        ([], ["10.0.0.300"], "invalid IP address"),
    ],
)
def test_invalid_sans_are_refused(
    hostnames: list[str], ips: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidNameError, match=message):
        create_request(tmp_path, "hospital-a", "A", FED, hostnames, ips)


# --------------------------------------------------------------------------- key files


def test_keys_are_created_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        request = create_request(tmp_path / "site", "hospital-a", "A", FED)
        ca = init_ca(tmp_path / "ca", FED, "CA")
    finally:
        os.umask(previous)
    assert mode(request.key) == 0o600
    assert mode(ca.key_path) == 0o600
    assert mode(tmp_path / "site") == 0o700


@pytest.mark.parametrize("unsafe", [0o644, 0o640, 0o604, 0o660])
def test_group_or_world_readable_key_is_refused(fed: LocalFederation, unsafe: int) -> None:
    key = fed.members["hospital-a"].key
    key.chmod(unsafe)
    with pytest.raises(KeyFileError, match=rf"mode 0{unsafe:o}.*chmod 600 {re.escape(str(key))}"):
        load_signer(key)
    key.chmod(0o600)
    assert load_signer(key).sign(b"x")


def test_existing_key_is_never_overwritten(fed: LocalFederation) -> None:
    member = fed.members["hospital-a"]
    before = member.key.read_bytes()
    with pytest.raises(KeyFileError, match="already exists; refusing to overwrite"):
        create_request(member.key.parent, "hospital-a", "A", FED)
    assert member.key.read_bytes() == before


def test_ca_operations_refuse_an_unsafe_ca_key(fed: LocalFederation) -> None:
    fed.ca.key_path.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"CA key: .*chmod 600"):
        refresh_crl(fed.ca.directory)


# --------------------------------------------------------------------------- revocation


def test_revocation_is_signed_numbered_and_explained(fed: LocalFederation) -> None:
    cert = fed.members["hospital-b"].certificate()
    initial = fed.crl
    crl = revoke(fed.ca.directory, cert, "key_compromise", clock=lambda: T0)
    assert crl.number == initial.number + 1
    assert crl.serial_numbers == {cert.serial_number}
    reloaded = load_crl(fed.ca.crl_path, fed.ca.certificate)
    assert reloaded.serial_numbers == {cert.serial_number}
    with pytest.raises(CAError, match=r"already revoked .* reason keyCompromise"):
        revoke(fed.ca.directory, cert.serial_number, "superseded")
    refreshed = refresh_crl(fed.ca.directory, clock=lambda: T0 + timedelta(days=1))
    assert refreshed.serial_numbers == crl.serial_numbers
    assert refreshed.number == crl.number + 1


def test_revoke_refuses_unknown_serials_and_reasons(fed: LocalFederation) -> None:
    with pytest.raises(CAError, match="was not issued by this CA"):
        revoke(fed.ca.directory, 12345)
    with pytest.raises(InvalidNameError, match="unknown revocation reason 'lost-it'"):
        revoke(fed.ca.directory, fed.members["hospital-a"].cert, "lost-it")


def test_tampered_or_foreign_crl_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    fed.revoke("hospital-b")
    der = bytearray(fed.crl.crl.public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the signature
    (tmp_path / "bad.crl").write_bytes(bytes(der))
    with pytest.raises(CRLError, match="signature does not verify"):
        load_crl(tmp_path / "bad.crl", fed.ca.certificate)
    other = init_ca(tmp_path / "other", FED, "Other CA")
    with pytest.raises(CRLError, match=r"was issued by .*Other CA"):
        load_crl(other.crl_path, fed.ca.certificate)


# --------------------------------------------------------------------------- the decision


def check(fed: LocalFederation, cert: x509.Certificate | bytes, now: datetime = T0) -> PeerIdentity:
    return check_peer_certificate(cert, fed.ca.certificate, fed.roster, fed.crl, now)


def test_member_is_identified(fed: LocalFederation) -> None:
    cert = fed.members["hospital-a"].certificate()
    identity = check(fed, cert.public_bytes(serialization.Encoding.PEM))
    assert identity == check(fed, cert.public_bytes(serialization.Encoding.DER))
    assert (identity.peer_id, identity.institution, identity.role) == (
        "hospital-a",
        "Institution hospital-a",
        Role.PEER,
    )
    operator = check(fed, fed.members["ops"].certificate())
    assert operator.role is Role.OPERATOR


def test_certificate_of_another_ca_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    other = LocalFederation.create(tmp_path / "o", federation=FED, peers=["hospital-a"])
    with pytest.raises(UnknownCAError, match="not this federation's CA") as caught:
        check(fed, other.members["hospital-a"].certificate())
    assert caught.value.fingerprint is not None


@pytest.mark.parametrize(
    ("now", "message"),
    [
        (T0 + timedelta(days=3), "expired at 2030-01-03T12:00:00"),
        (T0 - timedelta(hours=1), "is not valid until"),
    ],
)
def test_certificate_outside_its_validity_is_refused(
    fed: LocalFederation, now: datetime, message: str
) -> None:
    member = fed.add_member("hospital-short", validity_days=2, clock=lambda: T0)
    fed.publish_roster({}, clock=lambda: T0)
    assert check(fed, member.certificate(), T0 + timedelta(days=1))
    with pytest.raises(CertificateExpiredError, match=message) as caught:
        check(fed, member.certificate(), now)
    assert caught.value.peer_id == "hospital-short"


def test_certificate_not_in_roster_is_refused(fed: LocalFederation) -> None:
    fed.publish_roster({}, include=["hospital-a"])
    with pytest.raises(NotInRosterError, match=r"'hospital-b' .* not in roster version 2"):
        check(fed, fed.members["hospital-b"].certificate())


def test_reissued_certificate_not_yet_in_roster_is_refused(fed: LocalFederation) -> None:
    old = fed.members["hospital-a"].certificate()
    new = fed.add_member("hospital-a", subdirectory="hospital-a-renewed", clock=lambda: T0)
    with pytest.raises(FingerprintMismatchError, match="roster version 1 lists"):
        check(fed, new.certificate())
    assert check(fed, old)


def test_revoked_certificate_is_refused(fed: LocalFederation) -> None:
    fed.revoke("hospital-b", clock=lambda: T0)
    with pytest.raises(RevokedCertificateError, match=r"'hospital-b' .*revoked.*keyCompromise"):
        check(fed, fed.members["hospital-b"].certificate())
    assert check(fed, fed.members["hospital-a"].certificate())


def test_stale_crl_fails_closed(fed: LocalFederation) -> None:
    with pytest.raises(StaleCRLError, match="install a fresh CRL"):
        check(fed, fed.members["hospital-a"].certificate(), T0 + timedelta(days=91))


def _forge(fed: LocalFederation, uri: str, common_name: str) -> x509.Certificate:
    """A certificate our CA key signed without going through sign_request's checks."""
    ca = open_ca(fed.ca.directory)
    subject_key = load_certificate(fed.members["hospital-a"].cert).public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Forged"),
                ]
            )
        )
        .issuer_name(ca.info.certificate.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def test_certificate_for_another_federation_is_refused(fed: LocalFederation) -> None:
    forged = _forge(fed, "urn:neuro:peer:hospital-a", "hospital-a")
    with pytest.raises(WrongFederationError, match=r"for federation 'neuro'.*belongs to 'cardio'"):
        check(fed, forged)


def test_certificate_whose_cn_differs_from_its_uri_is_refused(fed: LocalFederation) -> None:
    forged = _forge(fed, "urn:cardio:peer:hospital-a", "hospital-b")
    with pytest.raises(MalformedCertificateError, match="CN='hospital-b' does not match"):
        check(fed, forged)


def test_ca_certificate_and_garbage_are_refused(fed: LocalFederation) -> None:
    with pytest.raises(MalformedCertificateError, match="is a CA certificate"):
        check(fed, fed.ca.certificate)
    with pytest.raises(MalformedCertificateError, match="cannot parse"):
        check(fed, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_naive_time_is_a_caller_bug(fed: LocalFederation) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check(fed, fed.members["hospital-a"].certificate(), datetime(2030, 1, 1))


# --------------------------------------------------------------------------- names


def test_fingerprints_are_accepted_in_common_spellings(fed: LocalFederation) -> None:
    canonical = fed.ca.fingerprint
    bare = canonical.removeprefix("SHA256:").replace(":", "")
    assert normalize_fingerprint(bare.lower()) == canonical
    assert normalize_fingerprint("sha256 Fingerprint=" + canonical[7:]) == canonical
    with pytest.raises(InvalidNameError):
        normalize_fingerprint("SHA256:AB:CD")


def test_ca_info_reads_the_federation_back(fed: LocalFederation) -> None:
    info = ca_info(fed.ca.directory)
    assert (info.federation, info.fingerprint) == (FED, fed.ca.fingerprint)
