"""Ledgers with real agreed rounds for the dashboard tests.

:class:`LedgerBuilder` runs the identity ceremony (:class:`LocalFederation`: a CA, one ECDSA
key and certificate per hospital, a CA-signed roster) and writes agreed records through the
ledger's own API, each signed by every hospital's certificate key, exactly as peers do after
a round. Only the training is left out: metrics are given by the test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from peer.identity import load_signer
from peer.identity.testing import LocalFederation
from peer.ledger import (
    AgreedRecord,
    JsonValue,
    Ledger,
    PrivacyCharge,
    PrivacyKind,
    RoundStatus,
    StoredRecord,
    model_digest,
)
from secagg.crypto import Signer, Verifier, canonical, sha256

PEERS = ("hospital-a", "hospital-b", "hospital-c")


class StepClock:
    """A clock that advances a fixed step per reading, from a fixed start."""

    def __init__(self, step: timedelta = timedelta(seconds=1)) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
        self.step = step

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


def proposal_text(session_id: str, privacy: Mapping[str, JsonValue] | None = None) -> str:
    return json.dumps(
        {"session_id": session_id, "payload": {"kind": "training"}, "privacy": privacy or {}},
        sort_keys=True,
    )


@dataclass
class LedgerBuilder:
    """One hospital's ledger file, written with real signatures of every hospital."""

    path: Path
    federation: LocalFederation
    clock: StepClock = field(default_factory=StepClock)
    peers: tuple[str, ...] = PEERS

    @classmethod
    def create(cls, directory: Path, peers: Sequence[str] = PEERS) -> LedgerBuilder:
        federation = LocalFederation.create(directory / "federation", peers=peers)
        builder = cls(directory / "ledger.db", federation, peers=tuple(peers))
        with builder.open() as ledger:
            ledger.create()
        return builder

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def open(self) -> Ledger:
        return Ledger(self.url, self.clock)

    def signers(self) -> dict[str, Signer]:
        return {p: load_signer(self.federation.members[p].key) for p in self.peers}

    def verifiers(self) -> dict[str, Verifier]:
        return self.federation.roster.verifiers()

    def add_session(
        self,
        session_id: str,
        *,
        rounds: int = 3,
        threshold: int = 2,
        privacy: Mapping[str, JsonValue] | None = None,
    ) -> None:
        with self.open() as ledger:
            ledger.record_proposal(
                session_id,
                proposal_text(session_id, privacy),
                proposer=self.peers[0],
                participants=self.peers,
                threshold=threshold,
                rounds_planned=rounds,
            )
            ledger.decide_session(session_id, accept=True)

    def accept(self, session_id: str, forged_by: str | None = None) -> None:
        """Store every participant's signed acceptance of the proposal as ``Start`` does
        (peer/service.py). ``forged_by``: that member signs the last participant's
        acceptance with its own key, in the victim's name."""
        from peer.acceptances import proposal_digest
        from peer.beacon import commit, commitment_signed_bytes

        signers = self.signers()
        with self.open() as ledger:
            session = ledger.session(session_id)
            assert session is not None
            digest = proposal_digest(session)
            ledger.session_nonce(session_id, lambda: b"\x07" * 32)
            commitments = {}
            for index, peer in enumerate(self.peers):
                commitment = commit(digest, peer, bytes([index]) * 32)
                victim = forged_by is not None and peer == self.peers[-1]
                signer = signers[forged_by] if victim and forged_by else signers[peer]
                signed = commitment_signed_bytes(digest, peer, commitment)
                commitments[peer] = (commitment, signer.sign(signed))
            ledger.store_commitments(session_id, commitments)

    def agree_round(
        self,
        session_id: str,
        round_: int,
        metrics: Mapping[str, JsonValue],
        *,
        epsilon: Mapping[str, float] | None = None,
        survivors: Sequence[str] | None = None,
        aggregator: str | None = None,
        signers: Sequence[str] | None = None,
        failed_attempts: int = 0,
        bytes_sent: int = 150_000,
        bytes_received: int = 420_000,
    ) -> StoredRecord:
        """Run the bookkeeping of one round as a peer does, ending with an agreed record."""
        survivors = tuple(survivors if survivors is not None else self.peers)
        aggregator = aggregator or self.peers[(round_ - 1) % len(self.peers)]
        epsilon = dict(epsilon if epsilon is not None else dict.fromkeys(survivors, 0.25))
        keys = self.signers()
        with self.open() as ledger:
            for _ in range(failed_attempts):
                attempt = ledger.start_round(
                    session_id, round_, aggregator="hospital-dead", participants=self.peers
                )
                ledger.abort_round(
                    session_id, round_, attempt.attempt, reason="aggregator did not answer"
                )
            attempt = ledger.start_round(
                session_id, round_, aggregator=aggregator, participants=self.peers
            )
            weights = (np.arange(32, dtype="<f4") * np.float32(round_)).tobytes()
            record = AgreedRecord.build(
                session_id,
                round_,
                aggregate_hash=sha256(b"aggregate", canonical(session_id, round_)),
                model_hash=model_digest(weights),
                metrics={**metrics, "survivors": list(survivors), "aggregator": aggregator},
                epsilon=epsilon,
                prev_hash=ledger.session_head(session_id),
            )
            signed_by = signers if signers is not None else survivors
            signatures = {p: keys[p].sign(record.payload()) for p in signed_by}
            me = self.peers[0]
            stored = ledger.append_agreed(
                record,
                signatures,
                checkpoint=weights,
                privacy=[PrivacyCharge(me, PrivacyKind.TRAINING, epsilon.get(me, 0.0), 1e-6)],
                verifiers=self.verifiers(),
            )
            dropped = [p for p in self.peers if p not in survivors]
            ledger.finish_round(
                session_id,
                round_,
                attempt.attempt,
                status=RoundStatus.AGREED,
                dropped={"masked": dropped} if dropped else None,
                bytes_sent=bytes_sent,
                bytes_received=bytes_received,
            )
            return stored

    def add_statistics(
        self,
        query_id: str,
        session_id: str,
        round_: int,
        query: JsonValue,
        result: JsonValue,
        epsilon: float,
    ) -> None:
        with self.open() as ledger:
            ledger.record_statistics(
                query_id, session_id, round_, query=query, result=result, epsilon=epsilon
            )


class EvidenceLedger:
    """A ledger of a secure-aggregation session as a peer keeps it: the accepted proposal
    (n = 5, t = 4, c = 1, vectors of 24), each round run in memory (secagg.simulate) and
    agreed with every peer's signature, and, unless told otherwise, the round's evidence
    (its parameters and succinct transcript) that ``peer verify-ledger`` re-checks.

    The peers are the simulator's, with its deterministic test keys (:meth:`verifiers`)."""

    SESSION = "study"
    PEERS, LENGTH, THRESHOLD, COLLUDERS = 5, 24, 4, 1

    def __init__(self, directory: Path) -> None:
        from peer.session import SessionProposal
        from secagg import testing
        from secagg.simulate import simulate

        self.path = directory / "ledger.db"
        self.peers = simulate(
            self.PEERS, self.LENGTH, threshold=self.THRESHOLD, colluders=self.COLLUDERS
        ).peers
        self._signers, self._verifiers = testing.test_identities(self.peers, 3)
        proposal = SessionProposal(
            self.SESSION,
            participants=self.peers,
            rounds=5,
            threshold=self.THRESHOLD,
            payload={"kind": "vector", "length": self.LENGTH},
            colluders=self.COLLUDERS,
        )
        with self.open() as ledger:
            ledger.create()
            ledger.record_proposal(
                self.SESSION,
                proposal.document(),
                proposer=self.peers[0],
                participants=self.peers,
                threshold=self.THRESHOLD,
                rounds_planned=5,
            )
            ledger.decide_session(self.SESSION, accept=True)

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def open(self) -> Ledger:
        return Ledger(self.url, StepClock())

    def verifiers(self) -> dict[str, Verifier]:
        return dict(self._verifiers)

    def accept(self) -> None:
        """Store every participant's signed acceptance of the proposal (as ``Start`` does)."""
        from peer.acceptances import proposal_digest
        from peer.beacon import commit, commitment_signed_bytes

        with self.open() as ledger:
            session = ledger.session(self.SESSION)
            assert session is not None
            digest = proposal_digest(session)
            ledger.session_nonce(self.SESSION, lambda: b"\x07" * 32)
            commitments = {}
            for index, peer in enumerate(self.peers):
                commitment = commit(digest, peer, bytes([index]) * 32)
                signed = commitment_signed_bytes(digest, peer, commitment)
                commitments[peer] = (commitment, self._signers[peer].sign(signed))
            ledger.store_commitments(self.SESSION, commitments)

    def agree(self, round_: int, *, evidence: bool = True) -> None:
        """Run round ``round_`` under the accepted parameters and store it as a peer does."""
        from peer.codec import encode
        from peer.ledger import StoredProof
        from peer.round.agreement import aggregate_hash
        from secagg import RoundConfig
        from secagg.simulate import simulate

        result = simulate(
            self.PEERS,
            self.LENGTH,
            threshold=self.THRESHOLD,
            colluders=self.COLLUDERS,
            session_id=self.SESSION,
            round_=round_,
            seed=3,  # the identities' seed (secagg.testing)
        )
        transcript = result.succinct
        assert transcript is not None
        with self.open() as ledger:
            record = AgreedRecord.build(
                self.SESSION,
                round_,
                aggregate_hash=aggregate_hash(transcript.statement.aggregate),
                model_hash=sha256(b"model", canonical(round_)),
                metrics={"accuracy": 0.5 + round_ / 100, "survivors": list(transcript.survivors)},
                epsilon={},
                prev_hash=ledger.session_head(self.SESSION),
            )
            ledger.append_agreed(
                record, {u: self._signers[u].sign(record.payload()) for u in self.peers}
            )
            if evidence:
                config = RoundConfig(
                    self.SESSION,
                    round_,
                    self.peers,
                    self.THRESHOLD,
                    self.LENGTH,
                    colluders=self.COLLUDERS,
                )
                ledger.store_round_proof(
                    StoredProof(
                        self.SESSION,
                        round_,
                        0,
                        transcript.aggregator,
                        json.dumps(config.as_dict(), sort_keys=True),
                        encode(transcript)[1],
                    )
                )
