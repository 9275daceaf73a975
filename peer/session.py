"""Session proposals: what an operator asks the peers to do, signed, and checked by policy.

A proposal is a canonical JSON document signed by its proposer's certificate key. Every
peer checks the signature against the roster, then its own local policy (who may propose,
which models, how many participants, its privacy budget), and answers accept or refuse with
a reason. The aggregator of each round follows from the proposal and the session's beacon
(:func:`aggregator_for`, :mod:`peer.beacon`): randomness fixed only after every peer accepted.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from secagg import ConfigError, RoundConfig, Signer, Verifier
from secagg.graph import (
    GraphKind,
    colluders_per_neighbourhood,
    neighbourhood_size,
    parameter_problem,
    safe_threshold,
    validate_threshold,
)

from .config import Policy
from .identity import Roster

__all__ = [
    "ProposalError",
    "SessionProposal",
    "SignedProposal",
    "aggregator_for",
    "check_policy",
    "outbound_problem",
    "required_colluders",
]

AGGREGATIONS = ("secagg", "paillier", "cleartext")
# Payloads whose sum is released exactly (no DP noise): from any such sum the n-1 other
# participants learn the last one's input, so a site joins only if its policy opts in.
EXACT_PAYLOADS = ("vector",)
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ProposalError(ValueError):
    """A proposal that is malformed, badly signed or refused by policy (reason in the text)."""


@dataclass(frozen=True)
class SessionProposal:
    """What a session does. Payload kinds: ``vector`` (each peer contributes a vector of
    ``payload["length"]`` words; the round machinery does not care what it means),
    ``training`` and ``statistics`` (later).

    ``colluders`` is the number of participants the proposal claims may collude with a
    malicious aggregator, counting the aggregator's own peer (it is always a participant):
    at least 1. Secure aggregation thresholds must hold against it
    (:func:`secagg.graph.parameter_problem`), and each peer's policy may demand more."""

    session_id: str
    participants: tuple[str, ...]
    rounds: int
    threshold: int
    payload: Mapping[str, Any]
    graph: str = GraphKind.COMPLETE.value
    degree: int | None = None
    bits: int = 32
    aggregation: str = "secagg"
    privacy: Mapping[str, Any] = field(default_factory=dict)
    stage_seconds: float = 30.0
    # Time every peer may take to compute its contribution (training) before sending keys.
    prepare_seconds: float = 120.0
    seed: int = 0
    # Paillier sessions only: the key holder's modulus size (peers refuse below their policy).
    paillier_key_bits: int = 2048
    colluders: int = 1
    # Participants whose roster entry has no address (outbound-only sites, peer/relay.py):
    # never the aggregator. Each peer checks the list against its roster before accepting,
    # so a proposer cannot narrow the rotation to its friends (:func:`outbound_problem`).
    outbound_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _SESSION_ID.match(self.session_id):
            raise ProposalError(f"session id {self.session_id!r} must match {_SESSION_ID.pattern}")
        if len(set(self.participants)) != len(self.participants) or len(self.participants) < 2:
            raise ProposalError("a session needs at least 2 distinct participants")
        strangers = sorted(set(self.outbound_only) - set(self.participants))
        if strangers:
            raise ProposalError(
                f"outbound_only names {', '.join(strangers)}, who are not participants"
            )
        if not self.aggregators:
            raise ProposalError(
                "every participant is outbound-only: no one can be the aggregator (at least "
                "one participant must accept inbound connections)"
            )
        if not 1 <= self.rounds <= 100_000:
            raise ProposalError(f"rounds must be between 1 and 100000, not {self.rounds}")
        if self.aggregation not in AGGREGATIONS:
            raise ProposalError(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}, not {self.aggregation!r}"
            )
        if self.stage_seconds <= 0 or self.prepare_seconds < 0:
            raise ProposalError("stage_seconds must be positive and prepare_seconds non-negative")
        try:
            kind = GraphKind(self.graph)
            n = len(self.participants)
            if self.aggregation == "secagg":
                # The aggregator is a participant: a malicious one is a colluder itself.
                if not 1 <= self.colluders < n:
                    raise ProposalError(
                        f"colluders must be between 1 (the aggregator's own peer) and {n - 1}, "
                        f"not {self.colluders}"
                    )
                problem = parameter_problem(n, kind, self.degree, self.threshold, self.colluders)
                if problem is not None:
                    raise ProposalError(problem)
            else:
                validate_threshold(self.threshold, neighbourhood_size(n, kind, self.degree))
            # Validates the rest (the beacon only exists once every peer accepted).
            self.round_config(1, vector_length=max(1, self.vector_length), beacon=bytes(32))
        except (ConfigError, ValueError) as error:
            raise ProposalError(str(error)) from None

    @property
    def aggregators(self) -> tuple[str, ...]:
        """The participants that may aggregate (those that accept inbound connections),
        sorted: the rotation of :func:`aggregator_for`."""
        return tuple(sorted(set(self.participants) - set(self.outbound_only)))

    @property
    def payload_kind(self) -> str:
        return str(self.payload.get("kind", ""))

    @property
    def vector_length(self) -> int:
        return int(self.payload.get("length", 0))

    def round_config(
        self,
        round_: int,
        vector_length: int | None = None,
        *,
        attempt: int = 0,
        beacon: bytes = b"",
    ) -> RoundConfig:
        """The secagg parameters of one attempt of a round (graphs are re-drawn per attempt).

        ``beacon`` is the session's public randomness, fixed after every peer accepted; a
        SecAgg+ session must pass it, or its graph is grindable (see SECURITY.md).

        Raises:
            ConfigError: a SecAgg+ round without a beacon, or invalid parameters.
        """
        if GraphKind(self.graph) is GraphKind.SECAGG_PLUS and not beacon:
            raise ConfigError(
                "a SecAgg+ round needs the session's beacon: without it the proposer could "
                "choose the graph through the session id"
            )
        return RoundConfig(
            session_id=self.session_id,
            round=round_,
            peers=tuple(sorted(self.participants)),
            threshold=self.threshold,
            vector_length=vector_length or self.vector_length,
            bits=self.bits,
            graph_kind=GraphKind(self.graph),
            degree=self.degree,
            # Only the masking protocol's thresholds depend on the collusion bound.
            colluders=self.colluders if self.aggregation == "secagg" else 0,
            attempt=attempt,
            beacon=beacon,
        )

    def document(self) -> str:
        """The canonical JSON text that is signed."""
        data = asdict(self)
        data["participants"] = sorted(self.participants)
        if self.outbound_only:
            data["outbound_only"] = sorted(self.outbound_only)
        else:
            # Absent when empty: the documents (and digests) of sessions without
            # outbound-only sites stay what they were before the field existed.
            del data["outbound_only"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.document().encode()).digest()

    @classmethod
    def from_document(cls, document: str) -> SessionProposal:
        try:
            data = json.loads(document)
            data["participants"] = tuple(data["participants"])
            data["outbound_only"] = tuple(data.get("outbound_only", ()))
            return cls(**data)
        except ProposalError:
            raise
        except (ValueError, TypeError, KeyError) as error:
            raise ProposalError(f"malformed proposal document: {error}") from None

    @staticmethod
    def default_threshold(
        n: int, colluders: int = 1, graph: str = GraphKind.COMPLETE.value, degree: int | None = None
    ) -> int:
        """The lowest safe threshold for n participants and ``colluders`` (see
        :func:`secagg.graph.parameter_problem`)."""
        h = neighbourhood_size(n, GraphKind(graph), degree)
        return safe_threshold(h, colluders_per_neighbourhood(n, h, colluders))


@dataclass(frozen=True)
class SignedProposal:
    proposal: SessionProposal
    proposer: str
    signature: bytes

    @classmethod
    def sign(cls, proposal: SessionProposal, proposer: str, signer: Signer) -> SignedProposal:
        return cls(proposal, proposer, signer.sign(_signed_bytes(proposal.document(), proposer)))

    @classmethod
    def verify(
        cls, document: str, proposer: str, signature: bytes, verifiers: Mapping[str, Verifier]
    ) -> SignedProposal:
        """Parse and check the proposer's signature.

        Raises:
            ProposalError: unknown proposer, bad signature or malformed document.
        """
        verifier = verifiers.get(proposer)
        if verifier is None:
            raise ProposalError(f"proposer {proposer!r} is not in the roster")
        if not verifier.verify(signature, _signed_bytes(document, proposer)):
            raise ProposalError(f"proposal signature of {proposer} does not verify")
        return cls(SessionProposal.from_document(document), proposer, signature)


def _signed_bytes(document: str, proposer: str) -> bytes:
    return b"hospital-secagg/proposal/v1\x00" + proposer.encode() + b"\x00" + document.encode()


def check_policy(
    proposal: SessionProposal,
    proposer: str,
    proposer_is_peer: bool,
    me: str,
    policy: Policy,
    epsilon_spent: float = 0.0,
    epsilon_needed: float = 0.0,
) -> str | None:
    """Why this peer refuses ``proposal``, or None to accept.

    Deny by default: the proposer must be named by the policy (an operator in
    ``allowed_operators``, a peer in ``allowed_peer_proposers``), and exact payloads need
    ``allow_exact_payloads``.
    """
    if proposer_is_peer and proposer not in policy.allowed_peer_proposers:
        return (
            f"peer {proposer} is not allowed to propose sessions here "
            "(not in this institution's allowed_peer_proposers)"
        )
    if not proposer_is_peer and proposer not in policy.allowed_operators:
        return f"operator {proposer} is not allowed to propose sessions here"
    if me not in proposal.participants:
        return f"{me} is not a participant of session {proposal.session_id}"
    if proposal.aggregation == "cleartext" and not policy.allow_cleartext:
        return "cleartext aggregation reveals every input; this institution does not allow it"
    if (
        proposal.aggregation == "paillier"
        and proposal.paillier_key_bits < policy.min_paillier_key_bits
    ):
        return (
            f"Paillier keys of {proposal.paillier_key_bits} bits are below this institution's "
            f"minimum of {policy.min_paillier_key_bits}"
        )
    if len(proposal.participants) < policy.min_participants:
        return (
            f"{len(proposal.participants)} participants, this institution requires at least "
            f"{policy.min_participants}"
        )
    if proposal.payload_kind in EXACT_PAYLOADS and not policy.allow_exact_payloads:
        return (
            f"payload {proposal.payload_kind!r} releases an exact sum, from which the other "
            f"{len(proposal.participants) - 1} participants learn this institution's input; "
            "this institution does not allow exact payloads (allow_exact_payloads)"
        )
    model = str(proposal.payload.get("model", proposal.payload_kind))
    if model not in policy.allowed_models:
        return f"model {model!r} is not allowed here (allowed: {', '.join(policy.allowed_models)})"
    if proposal.rounds > policy.max_rounds:
        return f"{proposal.rounds} rounds exceed the local maximum of {policy.max_rounds}"
    if (
        proposal.payload_kind == "vector"
        and not 1 <= proposal.vector_length <= policy.max_vector_length
    ):
        return (
            f"vector length {proposal.vector_length} exceeds the local maximum "
            f"{policy.max_vector_length}"
        )
    if proposal.aggregation == "secagg":
        refusal = _secagg_parameter_refusal(proposal, policy)
        if refusal is not None:
            return refusal
    if epsilon_spent + epsilon_needed > policy.max_epsilon + 1e-12:
        return (
            f"privacy budget: this session needs epsilon {epsilon_needed:.3g}, "
            f"{epsilon_spent:.3g} of {policy.max_epsilon:.3g} already spent"
        )
    return None


def required_colluders(n: int, policy: Policy) -> int:
    """The collusion bound this institution assumes for n participants: its policy's
    fraction of them, and never fewer than the aggregator itself."""
    return max(1, math.ceil(policy.assumed_colluders_fraction * n - 1e-9))


def _secagg_parameter_refusal(proposal: SessionProposal, policy: Policy) -> str | None:
    """Why the proposal's graph, degree and threshold are too weak for this institution:
    minimum degree and threshold as a function of n follow from the collusion it assumes."""
    n = len(proposal.participants)
    assumed = required_colluders(n, policy)
    if proposal.colluders < assumed:
        return (
            f"the proposal assumes {proposal.colluders} colluding participants; this "
            f"institution assumes {assumed} of {n} ({policy.assumed_colluders_fraction:.0%}, "
            "and at least the aggregator)"
        )
    problem = parameter_problem(
        n, GraphKind(proposal.graph), proposal.degree, proposal.threshold, assumed
    )
    return None if problem is None else f"unsafe secure aggregation parameters: {problem}"


def aggregator_for(proposal: SessionProposal, round_: int, attempt: int, beacon: bytes) -> str:
    """The aggregator of (round, attempt): a rotation over the sorted participants that
    accept inbound connections (:attr:`SessionProposal.aggregators`).

    The starting point is a hash of (beacon, round): the beacon is fixed only after every
    peer accepted (:mod:`peer.beacon`), so neither the proposer (through the session id) nor
    any peer can choose who aggregates. Each retry of a round (its aggregator died) moves to
    the next participant. Every peer computes the same choice: it depends only on the signed
    proposal and the beacon, never on this peer's own roster or connectivity.
    """
    if not beacon:
        raise ValueError(f"session {proposal.session_id} has no beacon yet: it was not started")
    peers: Sequence[str] = proposal.aggregators
    seed = hashlib.sha256(
        b"hospital-secagg/aggregator/v2\x00" + beacon + round_.to_bytes(8, "big")
    ).digest()
    start = int.from_bytes(seed[:8], "big")
    return peers[(start + attempt) % len(peers)]


def outbound_problem(proposal: SessionProposal, roster: Roster) -> str | None:
    """Why ``proposal``'s outbound-only list does not match ``roster``, or None.

    The list decides who may aggregate; it must name exactly the participants whose roster
    entry has no address. Naming an inbound peer would let a proposer narrow the rotation
    (to an accomplice); leaving out an outbound-only one would make it the aggregator of
    rounds nobody can join.
    """
    expected = {
        p for p in proposal.participants if (e := roster.get(p)) is not None and not e.inbound
    }
    if expected != set(proposal.outbound_only):
        return (
            f"the proposal lists outbound-only participants "
            f"[{', '.join(sorted(proposal.outbound_only))}], but the roster version "
            f"{roster.version} says [{', '.join(sorted(expected))}]"
        )
    return None
