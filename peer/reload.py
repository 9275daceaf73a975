"""Revocation that takes effect while the peer runs: the roster and CRL are reloaded when
their files change (polled) or on SIGHUP, and the signing keys in use follow them.

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
from pathlib import Path

from secagg import Verifier

from .identity import (
    IdentityError,
    RevocationList,
    Roster,
    load_crl,
    load_roster,
)
from .tls import Authenticator

__all__ = ["TrustReloader", "TrustedKeys", "revoked_members"]

logger = logging.getLogger("peer.reload")

Stamp = tuple[tuple[int, int] | None, ...]


def revoked_members(roster: Roster, crl: RevocationList) -> frozenset[str]:
    """Roster members whose certificate's serial number is in ``crl``."""
    serials = crl.serial_numbers
    return frozenset(e.peer_id for e in roster.entries if e.certificate.serial_number in serials)


class TrustedKeys(Mapping[str, Verifier]):
    """The protocol-signature keys of every roster member that is not revoked, kept current
    by :meth:`refresh` (a Mapping, so it stands wherever a ``{peer: Verifier}`` is used)."""

    def __init__(self, roster: Roster, crl: RevocationList) -> None:
        self._keys: dict[str, Verifier] = {}
        self.refresh(roster, crl)

    def refresh(self, roster: Roster, crl: RevocationList) -> None:
        revoked = revoked_members(roster, crl)
        self._keys = {p: v for p, v in roster.verifiers().items() if p not in revoked}

    def __getitem__(self, peer_id: str) -> Verifier:
        return self._keys[peer_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


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
    """

    def __init__(
        self,
        authenticator: Authenticator,
        roster_path: Path,
        crl_path: Path,
        *,
        on_change: Callable[[], None] = lambda: None,
        interval: float = 2.0,
    ) -> None:
        self.authenticator = authenticator
        self.roster_path = Path(roster_path)
        self.crl_path = Path(crl_path)
        self.on_change = on_change
        self.interval = interval
        self._seen = self._stamps()
        self._wake = asyncio.Event()

    def _stamps(self) -> tuple[Stamp, Stamp]:
        sig = self.roster_path.with_name(self.roster_path.name + ".sig")
        return (_stamp(self.roster_path), _stamp(sig)), (_stamp(self.crl_path),)

    def trigger(self) -> None:
        """Look at the files now (the SIGHUP handler); a forced reload even if unchanged."""
        self._seen = ((None,), (None,))
        self._wake.set()

    def check(self) -> bool:
        """Load whichever file changed since the last look; whether a new one was installed."""
        roster_stamp, crl_stamp = self._stamps()
        seen_roster, seen_crl = self._seen
        self._seen = (roster_stamp, crl_stamp)
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
        return installed

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
