"""Revocation and renewal that take effect while the peer runs: the roster and CRL, and this
peer's own certificate and key, are reloaded when their files change (polled) or on SIGHUP,
and the signing keys in use follow them.

Renewal (``ceremony request --renew``): the roster lists a member's new certificate and keeps
the old one as previous. :class:`TrustedKeys` accepts either key of a member while the old
certificate is valid and not revoked; :class:`OwnIdentity` switches this peer's TLS pair and
its :class:`RotatingSigner` to the renewed files once they check out (see SECURITY.md).

Theory of operation
-------------------
The CA publishes a new CRL (``ceremony revoke``) or roster; the site copies the file into
its kit. :class:`TrustReloader` notices the change (size or mtime of the file, or of the
roster's ``.sig``, every ``interval`` seconds, or at once after :meth:`TrustReloader.trigger`,
which the peer calls on SIGHUP), loads the file and **verifies its CA signature** before
anything changes. A file that does not verify, or that would roll back (a lower CRL number or
roster version, refused by :meth:`peer.tls.Authenticator.update`), is refused with an error in
the log and the state in use stays; the same bad file is not reported again at every poll.

Once installed, the new state is used by

* the TLS interceptor, for every RPC from then on (a revoked caller is refused);
* :class:`TrustedKeys`, the live map of signing keys every protocol message and agreed
  record is checked against: a member whose certificate is revoked (or who left the roster)
  has no key in it, so its signatures no longer count towards any threshold;
* the ``on_change`` callback, with which the peer closes the open streams of callers who
  are no longer allowed.

The rule for signatures, stated once: *a signature counts only if the signer's certificate
is not revoked in the CRL this peer holds when it checks the signature.* Records already in
the ledger were checked (and agreed) before the revocation reached this peer and stay valid;
any record checked afterwards (a round still running, a catch-up) needs its threshold from
signers that are not revoked. The CRL's revocation dates are not used: an agreed record
carries no trusted time, so "agreed before the revocation date" could not be checked.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from secagg import Signer, Verifier
from secagg.crypto import signer_from_private_key

from .identity import (
    Clock,
    IdentityError,
    KeyFileError,
    RevocationList,
    Role,
    Roster,
    fingerprint,
    load_certificate,
    load_crl,
    load_private_key,
    load_roster,
    load_signer,
    system_clock,
    verifier_for,
)
from .tls import Authenticator, ServerIdentity

__all__ = ["OwnIdentity", "RotatingSigner", "TrustReloader", "TrustedKeys", "revoked_members"]

logger = logging.getLogger("peer.reload")

Stamp = tuple[tuple[int, int] | None, ...]


def revoked_members(roster: Roster, crl: RevocationList) -> frozenset[str]:
    """Roster members whose certificate's serial number is in ``crl``."""
    serials = crl.serial_numbers
    return frozenset(e.peer_id for e in roster.entries if e.certificate.serial_number in serials)


@dataclass(frozen=True, slots=True)
class _LiveKeys:
    """A member's current key, and the keys of its previous (renewed) certificates while
    those are within their validity: the overlap of a renewal, and not a moment longer."""

    current: Verifier
    previous: tuple[tuple[x509.Certificate, Verifier], ...]
    clock: Clock
    expired_ok: bool

    def verify(self, signature: bytes, data: bytes) -> bool:
        if self.current.verify(signature, data):
            return True
        now = self.clock()
        return any(
            (self.expired_ok or cert.not_valid_before_utc <= now <= cert.not_valid_after_utc)
            and verifier.verify(signature, data)
            for cert, verifier in self.previous
        )


class TrustedKeys(Mapping[str, Verifier]):
    """The protocol-signature keys of every roster member that is not revoked, kept current
    by :meth:`refresh` (a Mapping, so it stands wherever a ``{peer: Verifier}`` is used).

    A member's key is the one of its current certificate; after a renewal, the key of a
    previous certificate counts too until that certificate expires (checked at each
    signature, on ``clock``) or is revoked (at refresh), so that a peer which has not yet
    switched to its new key is not dropped from a round.

    With ``for_records``, the keys check agreed records of the past (catch-up): a previous
    certificate's key still counts after the certificate expired (it signed those records
    while it was valid; a record carries no trusted time), never once it is revoked.
    """

    def __init__(
        self,
        roster: Roster,
        crl: RevocationList,
        clock: Clock = system_clock,
        *,
        for_records: bool = False,
    ) -> None:
        self._keys: dict[str, Verifier] = {}
        self._clock = clock
        self._for_records = for_records
        self.refresh(roster, crl)

    def refresh(self, roster: Roster, crl: RevocationList) -> None:
        revoked = revoked_members(roster, crl)
        serials = crl.serial_numbers
        self._keys = {
            e.peer_id: _LiveKeys(
                verifier_for(e.certificate),
                tuple((c, verifier_for(c)) for c in e.previous if c.serial_number not in serials),
                self._clock,
                self._for_records,
            )
            for e in roster.entries
            if e.peer_id not in revoked
        }

    def __getitem__(self, peer_id: str) -> Verifier:
        return self._keys[peer_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class RotatingSigner:
    """A :class:`secagg.Signer` whose key is replaced on renewal (:meth:`install`).

    Everything that signs for this peer (rounds, records, accepts) holds this one object, so
    a renewal reaches all of them at once; a message is signed by the key in use at that
    moment, and the others accept either key during the overlap (:class:`TrustedKeys`).
    """

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    def install(self, signer: Signer) -> None:
        self._signer = signer

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data)


class OwnIdentity:
    """This peer's certificate and key in use: what its TLS server presents and what signs.

    :meth:`install` switches to the files at ``cert``/``key`` once they form a pair that the
    peer's own trust state accepts for this peer (CA, validity, CRL, listed in the roster
    as current or previous certificate); otherwise the pair in use stays.
    """

    def __init__(self, me: str, cert: Path, key: Path, ca: Path) -> None:
        self.me = me
        self.cert_path, self.key_path = Path(cert), Path(key)
        self.server = ServerIdentity(cert, key, ca)
        self.signer = RotatingSigner(load_signer(key))
        self.fingerprint = fingerprint(load_certificate(cert))

    def install(self, authenticator: Authenticator) -> bool:
        """Use the certificate and key files if they changed; whether they were installed.

        Raises:
            IdentityError: the certificate is not acceptable for this peer, or the key
                does not belong to it (KeyFileError).
            OSError: a file cannot be read.
        """
        cert = load_certificate(self.cert_path)
        if fingerprint(cert) == self.fingerprint:
            return False
        identity = authenticator.authenticate(cert)
        if identity.peer_id != self.me or identity.role is not Role.PEER:
            raise IdentityError(
                f"{self.cert_path} is {identity.peer_id}'s {identity.role.value} certificate, "
                f"not a peer certificate of {self.me}"
            )
        key = load_private_key(self.key_path)
        if key.public_key() != cert.public_key():
            raise KeyFileError(
                f"private key {self.key_path} does not belong to certificate {self.cert_path} "
                "(install both files of the renewal)"
            )
        self.server.replace(self.cert_path, self.key_path)
        self.signer.install(signer_from_private_key(key))
        self.fingerprint = identity.fingerprint
        logger.warning(
            "installed certificate %s (serial %X, valid until %s) and its key from %s",
            identity.fingerprint,
            identity.serial_number,
            identity.not_valid_after.isoformat(),
            self.cert_path,
        )
        return True


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


class TrustReloader:
    """Reload the roster and CRL of ``authenticator`` when their files change.

    Args:
        authenticator: the trust state to update (shared with the server's interceptor).
        roster_path, crl_path: the signed files named in the peer's configuration.
        on_change: called after a new roster or CRL was installed.
        interval: seconds between two looks at the files.
        identity: this peer's certificate and key, reinstalled when their files change
            (a renewal), or None to leave them alone.
        on_identity: called after a new certificate and key were installed.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        roster_path: Path,
        crl_path: Path,
        *,
        on_change: Callable[[], None] = lambda: None,
        interval: float = 2.0,
        identity: OwnIdentity | None = None,
        on_identity: Callable[[], None] = lambda: None,
    ) -> None:
        self.authenticator = authenticator
        self.identity = identity
        self.on_identity = on_identity
        self.roster_path = Path(roster_path)
        self.crl_path = Path(crl_path)
        self.on_change = on_change
        self.interval = interval
        self._seen = self._stamps()
        self._wake = asyncio.Event()

    def _stamps(self) -> tuple[Stamp, Stamp, Stamp]:
        sig = self.roster_path.with_name(self.roster_path.name + ".sig")
        own: Stamp = ()
        if self.identity is not None:
            own = (_stamp(self.identity.cert_path), _stamp(self.identity.key_path))
        return (_stamp(self.roster_path), _stamp(sig)), (_stamp(self.crl_path),), own

    def trigger(self) -> None:
        """Look at the files now (the SIGHUP handler); a forced reload even if unchanged."""
        self._seen = ((None,), (None,), (None,))
        self._wake.set()

    def check(self) -> bool:
        """Load whichever file changed since the last look; whether a new one was installed."""
        roster_stamp, crl_stamp, own_stamp = self._stamps()
        seen_roster, seen_crl, seen_own = self._seen
        self._seen = (roster_stamp, crl_stamp, own_stamp)
        installed = False
        ca = self.authenticator.ca_certificate
        if roster_stamp != seen_roster:
            installed |= self._install(
                "roster", self.roster_path, lambda: load_roster(self.roster_path, ca)
            )
        if crl_stamp != seen_crl:
            installed |= self._install("CRL", self.crl_path, lambda: load_crl(self.crl_path, ca))
        if installed:
            self.on_change()
        # A renewed certificate may arrive before the roster that lists it: try it again
        # whenever the trust state changed, not only when its own files did.
        if self.identity is not None and (own_stamp != seen_own or installed):
            installed |= self._install_identity(self.identity)
        return installed

    def _install_identity(self, identity: OwnIdentity) -> bool:
        try:
            if not identity.install(self.authenticator):
                return False
        except (IdentityError, OSError) as error:
            logger.error(
                "refused the certificate/key files %s, %s: %s; keeping certificate %s",
                identity.cert_path,
                identity.key_path,
                error,
                identity.fingerprint,
            )
            return False
        self.on_identity()
        return True

    def _install(self, what: str, path: Path, load: Callable[[], Roster | RevocationList]) -> bool:
        auth = self.authenticator
        try:
            new = load()
            if isinstance(new, Roster):
                if new == auth.roster:
                    return False
                auth.update(roster=new)
                logger.warning("installed roster version %d from %s", new.version, path)
            else:
                if new.number == auth.crl.number and new.serial_numbers == auth.crl.serial_numbers:
                    return False
                auth.update(crl=new)
                logger.warning(
                    "installed CRL number %d from %s (%d revoked certificate(s))",
                    new.number,
                    path,
                    len(new.serial_numbers),
                )
        except (IdentityError, OSError) as error:
            in_use = (
                f"version {auth.roster.version}"
                if what == "roster"
                else f"number {auth.crl.number}"
            )
            logger.error("refused the new %s file %s: %s; keeping %s", what, path, error, in_use)
            return False
        return True

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll until ``stopping`` is set."""
        while not stopping.is_set():
            self._wake.clear()
            try:
                self.check()
            except Exception:  # a bug here must not stop revocation for good
                logger.exception("checking the roster and CRL files failed")
            waits = [
                asyncio.ensure_future(self._wake.wait()),
                asyncio.ensure_future(stopping.wait()),
            ]
            try:
                await asyncio.wait(
                    waits, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for wait in waits:
                    wait.cancel()
