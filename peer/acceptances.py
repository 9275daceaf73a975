"""Each participant's signed acceptance of a session proposal, as a ledger stores it.

A peer accepts a proposal by answering a beacon commitment signed with its certificate key
over (proposal digest, peer, commitment) (:mod:`peer.beacon`); the proposer hands every
participant the whole set at ``Start``, and each peer checks and stores it before the
session runs. So every ledger holds every participant's signed acceptance, and anyone with
the roster can check it later: the dashboard shows it, the audit report lists it.

This module is the one place that re-checks a stored acceptance, so the dashboard, the
report and any ledger check give the same verdict for the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from peer.beacon import commitment_signed_bytes
from peer.ledger import SessionInfo
from peer.session import ProposalError, SessionProposal
from secagg.crypto import Verifier

__all__ = ["Acceptance", "AcceptanceStatus", "check_acceptances", "proposal_digest"]


class AcceptanceStatus(Enum):
    """What a ledger shows of one participant's acceptance."""

    VERIFIED = "accepted: signature verified"
    UNCHECKED = "accepted: signed (not verified: no roster)"
    FORGED = "signature does NOT verify"
    MISSING = "no acceptance recorded"
    NOT_PARTICIPANT = "signed by a peer that is not a participant"


@dataclass(frozen=True, slots=True)
class Acceptance:
    """One participant's acceptance: its signed commitment (None when none is stored)."""

    peer: str
    status: AcceptanceStatus
    commitment: bytes | None


def proposal_digest(session: SessionInfo) -> bytes:
    """The digest participants sign when they accept the proposal (peer/beacon.py)."""
    try:
        return SessionProposal.from_document(session.proposal).digest
    except ProposalError:
        return session.proposal_hash  # a document of another version: its plain SHA-256


def check_acceptances(
    session: SessionInfo,
    commitments: Mapping[str, tuple[bytes, bytes]] | None,
    verifiers: Mapping[str, Verifier] | None,
) -> tuple[Acceptance, ...]:
    """Each participant's acceptance of ``session``'s proposal, in participant order, then
    each acceptance stored for a peer that is not a participant (``NOT_PARTICIPANT``).

    A signature verifies only with the roster key of the participant it names, over this
    proposal's digest: an acceptance signed by another member in its name, or copied from
    another session's proposal, is :attr:`AcceptanceStatus.FORGED`; so is one from a
    participant the roster does not know.

    Args:
        commitments: ``{peer: (commitment, signature)}`` from the ledger, or None when it
            holds none (the session never started there).
        verifiers: roster keys by peer id, or None to report the signatures unverified.
    """
    digest = proposal_digest(session)
    found = commitments or {}
    out: list[Acceptance] = []
    for peer in session.participants:
        entry = found.get(peer)
        if entry is None:
            out.append(Acceptance(peer, AcceptanceStatus.MISSING, None))
            continue
        commitment, signature = entry
        if verifiers is None:
            status = AcceptanceStatus.UNCHECKED
        else:
            verifier = verifiers.get(peer)
            signed = commitment_signed_bytes(digest, peer, commitment)
            ok = verifier is not None and verifier.verify(signature, signed)
            status = AcceptanceStatus.VERIFIED if ok else AcceptanceStatus.FORGED
        out.append(Acceptance(peer, status, commitment))
    for peer in sorted(set(found) - set(session.participants)):
        out.append(Acceptance(peer, AcceptanceStatus.NOT_PARTICIPANT, found[peer][0]))
    return tuple(out)
