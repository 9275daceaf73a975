"""A training session in one process: each hospital a :class:`TrainingPayload` over its own
SQLite files, the ring sum replaced by a plain sum (mod 2^64, as the ring's).

What the payload tests (tests/payloads/) and the study scripts drive: every hospital
prepares, the sum is formed, every hospital concludes and stores the agreed record with its
checkpoint, exactly as peer.round does after a secure round, minus the network and the
signatures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from peer.config import PeerConfig, Policy
from peer.data import PatientRecord, write_hospital_stores
from peer.ledger import AgreedRecord, Ledger
from peer.session import SessionProposal
from secagg.crypto import sha256

if TYPE_CHECKING:
    from peer.payloads.training import TrainingPayload

__all__ = ["local_config", "local_hospitals", "plain_round"]


def local_config(root: Path, peer: str, max_epsilon: float = 1000.0) -> PeerConfig:
    """A peer configuration whose data and ledger are SQLite files under ``root`` (no TLS
    files are read in process)."""
    return PeerConfig(
        path=root / f"{peer}.toml",
        peer_id=peer,
        listen="127.0.0.1:0",
        data_url=f"sqlite:///{root / peer}-data.db",
        ledger_url=f"sqlite:///{root / peer}-ledger.db",
        policy=Policy(max_epsilon=max_epsilon),
        cert=root / f"{peer}.cert",
        key=root / f"{peer}.key",
        ca=root / f"{peer}.ca",
        roster=root / f"{peer}.roster",
        crl=root / f"{peer}.crl",
    )


def local_hospitals(
    root: Path,
    proposal: SessionProposal,
    parts: Sequence[Sequence[PatientRecord]],
    feature_names: Sequence[str],
    *,
    max_epsilon: float = 1000.0,
    ledger_threshold: int | None = None,
) -> list[TrainingPayload]:
    """One hospital per participant of ``proposal``, holding ``parts[i]``, that accepted the
    proposal; each payload's generator is seeded with 7 (tests re-seed as they need)."""
    from peer.payloads.training import training_payload

    configs = [local_config(root, peer, max_epsilon) for peer in proposal.participants]
    write_hospital_stores(parts, [c.data_url for c in configs], feature_names=feature_names)
    hospitals = []
    for config in configs:
        ledger = Ledger(config.ledger_url)
        ledger.create()
        ledger.record_proposal(
            proposal.session_id,
            proposal.document(),
            proposer="op",
            participants=proposal.participants,
            threshold=proposal.threshold if ledger_threshold is None else ledger_threshold,
            rounds_planned=proposal.rounds,
        )
        ledger.decide_session(proposal.session_id, accept=True)
        hospital = training_payload(proposal, config, ledger)
        hospital.rng = np.random.default_rng(7)
        hospitals.append(hospital)
    return hospitals


def plain_round(payloads: Sequence[TrainingPayload], round_: int) -> list[bytes]:
    """Every hospital prepares (its release charged first, as the round driver does), the
    sum is formed, every hospital concludes and stores; the round's models."""
    session_id = payloads[0].proposal.session_id
    participants = tuple(p.me for p in payloads)
    contributions = [p.prepare(round_) for p in payloads]
    for payload, contribution in zip(payloads, contributions, strict=True):
        payload.ledger.charge_release(
            session_id, round_, 1, contribution.release_id, contribution.charge(payload.me)
        )
    total = np.zeros_like(contributions[0].vector)
    for contribution in contributions:
        np.add(total, contribution.vector, out=total)
    results = [p.conclude(round_, total, participants) for p in payloads]
    for payload, result in zip(payloads, results, strict=True):
        ledger = payload.ledger
        record = AgreedRecord.build(
            session_id,
            round_,
            aggregate_hash=sha256(total.tobytes()),
            model_hash=sha256(result.model),
            metrics=dict(result.metrics),
            epsilon={p.me: c.epsilon for p, c in zip(payloads, contributions, strict=True)},
            prev_hash=ledger.session_head(session_id),
        )
        ledger.append_agreed(record, {}, checkpoint=result.model, min_signatures=0)
    return [r.model for r in results]
