"""The round checks of ``verify-ledger`` (:mod:`peer.ledger_check`) beyond the hash chain
and signatures: each agreed round's stored evidence re-run (the succinct check), its stored
parameters against the accepted proposal, rounds whose evidence cannot be re-checked, the
sites' signed acceptances and the vote releases, each re-checked with the roster keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .acceptances import AcceptanceStatus, check_acceptances

if TYPE_CHECKING:
    from secagg import RoundConfig, Verifier

    from .ledger import (
        Ledger,
        LedgerProblem,
        SessionInfo,
        StoredProof,
    )
    from .session import SessionProposal

__all__ = [
    "acceptance_problems",
    "agreed_aggregates",
    "evidence_problems",
    "round_parameter_problems",
    "round_proof_problems",
    "unrecheckable_rounds",
    "vote_release_problems",
]


def agreed_aggregates(ledger: Ledger) -> dict[tuple[str, int], bytes]:
    """Each agreed round's aggregate hash, from the records as stored."""
    from .ledger._verify import read_records

    return {(row.session_id, row.round): row.aggregate_hash for row in read_records(ledger)}


def round_proof_problems(ledger: Ledger, verifiers: Mapping[str, Verifier]) -> list[LedgerProblem]:
    """Re-run the succinct check (secagg/succinct.py) of every stored round's evidence
    (peer/ledger/_proofs.py) and check it is the evidence of the agreed record's aggregate.

    An edited transcript, answer, signature, aggregate or parameter fails the check (every
    item is signed over the round's parameters, and the answers over the statement); an
    evidence row without its agreed record, or of another aggregate, is reported too.
    """
    agreed = agreed_aggregates(ledger)
    return [
        problem
        for proof in ledger.round_proofs()
        for problem in evidence_problems(
            proof, agreed.get((proof.session_id, proof.round)), verifiers
        )
    ]


def evidence_problems(
    proof: StoredProof, aggregate: bytes | None, verifiers: Mapping[str, Verifier]
) -> list[LedgerProblem]:
    """:func:`round_proof_problems` of one evidence row, whose agreed record holds
    ``aggregate`` (None: no agreed record of that round)."""
    from secagg import (
        RoundConfig,
        SecAggError,
        SuccinctTranscript,
        TranscriptError,
        verify_succinct,
    )

    from .codec import CodecError, decode
    from .ledger import LedgerProblem, ProblemKind
    from .round.agreement import aggregate_hash

    def problem(message: str, peers: tuple[str, ...] = ()) -> list[LedgerProblem]:
        return [
            LedgerProblem(
                ProblemKind.ROUND_PROOF,
                message,
                session_id=proof.session_id,
                round=proof.round,
                peers=peers,
            )
        ]

    if aggregate is None:
        return problem("evidence of a round that has no agreed record")
    try:
        config = RoundConfig.from_dict(json.loads(proof.config_json))
        transcript = decode("SuccinctTranscript", proof.transcript)
    except (ValueError, TypeError, KeyError, CodecError, SecAggError) as error:
        return problem(f"the stored evidence cannot be read: {error}")
    if not isinstance(transcript, SuccinctTranscript) or (
        config.session_id,
        config.round,
    ) != (proof.session_id, proof.round):
        return problem("the stored evidence is of another round")
    try:
        verified = verify_succinct(transcript, config, verifiers, aggregator=proof.aggregator)
    except TranscriptError as error:
        return problem(f"the round's succinct check fails: {error}", (error.offender,))
    if aggregate_hash(verified.aggregate) != aggregate:
        return problem("the verified aggregate is not the one the agreed record holds")
    return []


def _proposal(session: SessionInfo) -> SessionProposal | None:
    """The session's accepted proposal, or None for a document this version cannot read."""
    from .session import ProposalError, SessionProposal

    try:
        return SessionProposal.from_document(session.proposal)
    except (ProposalError, ValueError, TypeError, KeyError):
        return None


def _problem(
    kind: str, message: str, session_id: str, round_: int | None = None, peers: tuple[str, ...] = ()
) -> LedgerProblem:
    from .ledger import LedgerProblem, ProblemKind

    return LedgerProblem(
        ProblemKind(kind), message, session_id=session_id, round=round_, peers=peers
    )


def round_parameter_problems(
    ledger: Ledger, proofs: Sequence[StoredProof] | None = None
) -> list[LedgerProblem]:
    """Compare each stored round's parameters (the RoundConfig its evidence was checked
    under, peer/ledger/_proofs.py) with those the session's accepted proposal fixes.

    The succinct check re-runs under the *stored* parameters, and every signature in the
    transcript is over them; so evidence of a round run under other parameters than the
    hospitals accepted (a lower threshold, another graph, a smaller collusion bound) would
    still verify. This check closes that: each differing parameter is reported, naming the
    round. A proposal this version cannot read is a warning (:func:`unrecheckable_rounds`).

    Args:
        proofs: the ledger's ``round_proofs()``, when the caller read them already.
    """
    from secagg import ConfigError, RoundConfig

    sessions = {s.session_id: s for s in ledger.sessions()}
    proposals = {sid: _proposal(session) for sid, session in sessions.items()}
    beacons: dict[str, bytes | None] = {}
    problems: list[LedgerProblem] = []
    for proof in ledger.round_proofs() if proofs is None else proofs:
        proposal = proposals.get(proof.session_id)
        if proposal is None:
            continue  # no session: round_proof_problems reports it; unreadable: a warning
        try:
            stored = RoundConfig.from_dict(json.loads(proof.config_json))
        except (ValueError, TypeError, KeyError, ConfigError):
            continue  # unreadable evidence: round_proof_problems reports it
        if proof.session_id not in beacons:
            beacons[proof.session_id] = ledger.session_beacon(proof.session_id)
        beacon = beacons[proof.session_id]
        differ = _parameter_differences(stored, proposal, proof, beacon)
        if differ:
            problems.append(
                _problem(
                    "round-parameters",
                    "round parameters are not those of the accepted proposal: " + "; ".join(differ),
                    proof.session_id,
                    proof.round,
                )
            )
    return problems


def _parameter_differences(
    stored: RoundConfig, proposal: SessionProposal, proof: StoredProof, beacon: bytes | None
) -> list[str]:
    from secagg import ConfigError

    differ: list[str] = []
    if stored.round != proof.round or stored.session_id != proof.session_id:
        differ.append(f"evidence of session {stored.session_id!r} round {stored.round}")
    if stored.attempt != proof.attempt:
        differ.append(f"attempt {stored.attempt} (the evidence row says {proof.attempt})")
    if beacon is not None and stored.beacon != beacon:
        differ.append(f"beacon {stored.beacon.hex()[:16]} (the session's is {beacon.hex()[:16]})")
    if proposal.vector_length and stored.vector_length != proposal.vector_length:
        differ.append(
            f"vector_length {stored.vector_length} (the proposal fixes {proposal.vector_length})"
        )
    try:
        # The proposal's own config of this round and attempt, with the stored beacon and
        # length (checked above): only the parameters the proposal fixes are compared.
        expected = proposal.round_config(
            stored.round, stored.vector_length, attempt=stored.attempt, beacon=stored.beacon
        ).as_dict()
    except ConfigError as error:
        return [*differ, f"the proposal gives no valid parameters for this round: {error}"]
    mine = stored.as_dict()
    for key in sorted(expected):
        if key not in ("round", "session_id", "attempt", "beacon", "vector_length") and (
            mine[key] != expected[key]
        ):
            differ.append(f"{key} {mine[key]} (the proposal fixes {expected[key]})")
    return differ


def unrecheckable_rounds(
    ledger: Ledger,
    proofs: Sequence[StoredProof] | None = None,
    agreed: Mapping[tuple[str, int], bytes] | None = None,
) -> list[LedgerProblem]:
    """Warnings for what ``verify-ledger`` cannot re-check: each agreed round of a secure
    aggregation session with no stored evidence (agreed before evidence was kept, or its
    evidence could not be written), and sessions whose proposal this version cannot read.
    Not failures (the records and signatures are still checked), but never silent.

    Args:
        proofs: the ledger's ``round_proofs()``, when the caller read them already.
        agreed: each agreed (session, round)'s aggregate hash, likewise.
    """
    proofs = ledger.round_proofs() if proofs is None else proofs
    agreed = agreed_aggregates(ledger) if agreed is None else agreed
    proven = {(p.session_id, p.round) for p in proofs}
    rounds: dict[str, list[int]] = {}
    for session_id, round_ in agreed:
        rounds.setdefault(session_id, []).append(round_)
    warnings: list[LedgerProblem] = []
    for session in ledger.sessions():
        agreed_rounds = sorted(rounds.get(session.session_id, ()))
        if not agreed_rounds:
            continue
        proposal = _proposal(session)
        if proposal is None:
            warnings.append(
                _problem(
                    "not-recheckable",
                    "the proposal cannot be read by this version: round parameters not compared",
                    session.session_id,
                )
            )
        elif proposal.aggregation != "secagg":
            continue  # other protocols keep no evidence (peer/round/agreement.py)
        for round_ in agreed_rounds:
            if (session.session_id, round_) not in proven:
                warnings.append(
                    _problem(
                        "not-recheckable",
                        "no stored evidence: the round's sum cannot be re-checked",
                        session.session_id,
                        round_,
                    )
                )
    return warnings


def acceptance_problems(
    ledger: Ledger,
    verifiers: Mapping[str, Verifier],
    agreed: Mapping[tuple[str, int], bytes] | None = None,
) -> tuple[list[LedgerProblem], list[LedgerProblem]]:
    """Re-check every stored signed acceptance with the roster keys
    (:func:`peer.acceptances.check_acceptances`).

    Returns:
        The problems (a forged or missing acceptance, or one by a non-participant, each
        naming the peer and the session) and the warnings (a session with agreed rounds
        whose acceptances this ledger does not hold, e.g. from before they were stored).

    ``agreed``: each agreed (session, round)'s aggregate hash, when the caller read them.
    """
    agreed = agreed_aggregates(ledger) if agreed is None else agreed
    with_rounds = {session_id for session_id, _ in agreed}
    problems: list[LedgerProblem] = []
    warnings: list[LedgerProblem] = []
    what = {
        AcceptanceStatus.FORGED: "signature does not verify under its roster key",
        AcceptanceStatus.MISSING: "no signed acceptance stored, though the others are",
        AcceptanceStatus.NOT_PARTICIPANT: "an acceptance by a peer that is not a participant",
    }
    for session in ledger.sessions():
        state = ledger.beacon_state(session.session_id)
        if state is None or state.commitments is None:
            if session.session_id in with_rounds:
                warnings.append(
                    _problem(
                        "not-recheckable",
                        "the participants' signed acceptances are not stored in this ledger",
                        session.session_id,
                    )
                )
            continue
        for acceptance in check_acceptances(session, state.commitments, verifiers):
            peer, status = acceptance.peer, acceptance.status
            if status in what:
                problems.append(
                    _problem(
                        "acceptance",
                        f"acceptance of the proposal by {peer}: {what[status]}",
                        session.session_id,
                        peers=(peer,),
                    )
                )
    return problems, warnings


def vote_release_problems(ledger: Ledger, verifiers: Mapping[str, Verifier]) -> list[LedgerProblem]:
    """Re-check the evidence of every vote this peer released (peer/ledger/_votes.py): at
    least ``n - t + c + 1`` valid statements (the proposal's n, t and c) of the releasing
    attempt, by distinct participants, none naming the released record. Each statement that
    does not verify is reported naming its peer, and a release with too few valid ones is
    reported naming the round."""
    from .ledger import release_quorum, statement_problem

    problems: list[LedgerProblem] = []
    for session in ledger.sessions():
        releases = ledger.released_votes(session.session_id)
        proposal = _proposal(session) if releases else None
        if proposal is None:
            continue  # nothing released, or an unreadable proposal (a warning already)
        colluders = proposal.colluders if proposal.aggregation == "secagg" else 0
        needed = release_quorum(len(session.participants), session.threshold, colluders)
        for release in releases:
            where = (
                f"release of the vote for record {release.record_hash.hex()[:16]} in attempt "
                f"{release.released_attempt}"
            )
            valid: set[str] = set()
            for statement in release.evidence:
                why = statement_problem(
                    statement,
                    session_id=session.session_id,
                    round_=release.round,
                    attempt=release.released_attempt,
                    participants=session.participants,
                    verifiers=verifiers,
                )
                if why is None and statement.vote_hash == release.record_hash:
                    why = f"{statement.peer_id} states it signed the released record"
                if why is not None:
                    problems.append(
                        _problem(
                            "vote-release",
                            f"{where}: {why}",
                            session.session_id,
                            release.round,
                            (statement.peer_id,),
                        )
                    )
                else:
                    valid.add(statement.peer_id)
            if len(valid) < needed:
                problems.append(
                    _problem(
                        "vote-release",
                        f"{where}: {len(valid)} valid statements of peers that did not "
                        f"sign it, {needed} needed",
                        session.session_id,
                        release.round,
                    )
                )
    return problems
