"""Institution identities: the consortium CA, certificates, the signed roster, revocation.

The ceremony, in order::

    init_ca(ca_dir, "cardio", "Cardio Consortium Root CA")     # once, at the CA
    create_request(site_dir, "hospital-a", "Hospital A", "cardio", ["a.example.org"])
                                                               # at the hospital: key stays
    sign_request(ca_dir, "hospital-a.csr", "hospital-a.pem")   # at the CA: only CSRs travel
    build_roster(ca_dir, [("hospital-a.pem", "a.example.org:7443"), ...]).write("roster.json")
    revoke(ca_dir, cert, "key_compromise")                     # when needed; new crl.pem

and on every peer, for every RPC, :func:`check_peer_certificate` decides who the caller is.

Fingerprints are always written ``SHA256:AB:CD:...`` (see :func:`fingerprint`). All keys are
ECDSA P-256; private keys are created with mode 0600 and refused when group/world readable.
Time is injected (:data:`Clock`, ``now``) so tests can fix it.
"""

from peer.identity._ca import (
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    RequestPaths,
    create_request,
    init_ca,
    issued_certificates,
    sign_request,
)
from peer.identity._check import PeerIdentity, check_peer_certificate, load_signer, verifier_for
from peer.identity._errors import (
    AuthenticationError,
    AuthorizationError,
    CAError,
    CertificateExpiredError,
    CertificateRejectedError,
    CRLError,
    CSRError,
    FingerprintMismatchError,
    IdentityError,
    InvalidNameError,
    KeyFileError,
    MalformedCertificateError,
    NotInRosterError,
    RevokedCertificateError,
    RosterError,
    StaleCRLError,
    UnknownCAError,
    WrongFederationError,
)
from peer.identity._files import (
    check_key_permissions,
    load_certificate,
    load_private_key,
    parse_certificate,
    read_private_key_pem,
)
from peer.identity._names import (
    IDENTITY_DNS_SUFFIX,
    Clock,
    Role,
    fingerprint,
    identity_hostname,
    identity_uri,
    normalize_fingerprint,
    parse_identity_uri,
    system_clock,
    validate_address,
    validate_federation,
    validate_peer_id,
)
from peer.identity._revocation import (
    DEFAULT_CRL_DAYS,
    RevocationList,
    current_crl,
    load_crl,
    parse_crl,
    refresh_crl,
    revoke,
)
from peer.identity._roster import (
    Roster,
    RosterEntry,
    SignedRoster,
    build_roster,
    current_roster,
    load_roster,
    parse_roster,
    signature_path,
)
from peer.identity._store import CAInfo, ca_info
from peer.identity._x509 import ca_federation

__all__ = [
    "DEFAULT_CA_DAYS",
    "DEFAULT_CERT_DAYS",
    "DEFAULT_CRL_DAYS",
    "IDENTITY_DNS_SUFFIX",
    "AuthenticationError",
    "AuthorizationError",
    "CAError",
    "CAInfo",
    "CRLError",
    "CSRError",
    "CertificateExpiredError",
    "CertificateRejectedError",
    "Clock",
    "FingerprintMismatchError",
    "IdentityError",
    "InvalidNameError",
    "KeyFileError",
    "MalformedCertificateError",
    "NotInRosterError",
    "PeerIdentity",
    "RequestPaths",
    "RevocationList",
    "RevokedCertificateError",
    "Role",
    "Roster",
    "RosterEntry",
    "RosterError",
    "SignedRoster",
    "StaleCRLError",
    "UnknownCAError",
    "WrongFederationError",
    "build_roster",
    "ca_federation",
    "ca_info",
    "check_key_permissions",
    "check_peer_certificate",
    "create_request",
    "current_crl",
    "current_roster",
    "fingerprint",
    "identity_hostname",
    "identity_uri",
    "init_ca",
    "issued_certificates",
    "load_certificate",
    "load_crl",
    "load_private_key",
    "load_roster",
    "load_signer",
    "normalize_fingerprint",
    "parse_certificate",
    "parse_crl",
    "parse_identity_uri",
    "parse_roster",
    "read_private_key_pem",
    "refresh_crl",
    "revoke",
    "sign_request",
    "signature_path",
    "system_clock",
    "validate_address",
    "validate_federation",
    "validate_peer_id",
    "verifier_for",
]
