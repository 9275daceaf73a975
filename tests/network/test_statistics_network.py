"""A statistics session between real peer processes over gRPC + mTLS on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from network_harness import Network

from peer.data import (
    BUNDLED_DATASET_NAME,
    breast_cancer_feature_names,
    breast_cancer_records,
    split_dataset,
    write_hospital_stores,
)
from peer.ledger import RoundStatus
from peer.payloads.statistics import StatisticsSpec
from peer.session import SessionProposal

EPSILON = 1e6  # large: the answers must equal the pooled data's


pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    network = Network.create(tmp_path / "network", 3, start=False)
    yield network
    network.stop()


def test_statistics_session_between_peer_processes(network: Network) -> None:
    run_statistics_session(network)


def run_statistics_session(network: Network, data_urls: dict[str, str] | None = None) -> None:
    """Split the bundled data over the peers, run an exact-answer statistics session, and
    check the agreed answers, the privacy charges and the stored results at every peer.

    ``data_urls`` overrides where a peer's patient data lives (its config must say the same).
    """
    ids, parts, proposal = _setup(network, data_urls)
    for process in network.peers.values():
        process.start()
    statuses = network.run_session(proposal)
    states = {p: getattr(s, "state", repr(s)) for p, s in statuses.items()}
    assert set(states.values()) == {"finished"}, network.logs()

    union = [r for part in parts for r in part]
    area = np.array([r.features[breast_cancer_feature_names().index("mean area")] for r in union])
    reference = network.records(ids[0], "stats-1")
    assert len(reference) == 1
    for peer_id in ids:
        stored = network.records(peer_id, "stats-1")
        assert [s.record_hash for s in stored] == [reference[0].record_hash]
        assert network.verify(peer_id) == []
    record = reference[0].record
    statistics: Any = record.metrics["statistics"]
    for diagnosis in ("benign", "malignant"):
        true = sum(r.diagnosis == diagnosis for r in union)
        assert abs(statistics["diagnoses"]["counts"][diagnosis] - true) <= 1
    assert statistics["area"]["mean"] == pytest.approx(float(area.mean()), rel=1e-3)
    assert dict(record.epsilon) == pytest.approx(dict.fromkeys(ids, EPSILON))
    for peer_id in ids:
        with network.ledger(peer_id) as ledger:
            spent = ledger.privacy_spent(peer_id)
            assert spent.statistics_epsilon == pytest.approx(EPSILON)
            assert spent.training_epsilon == 0.0
            saved = {r.query_id: r.result for r in ledger.statistics_results("stats-1")}
        assert saved == {
            "stats-1/1/diagnoses": statistics["diagnoses"],
            "stats-1/1/area": statistics["area"],
        }


def _setup(
    network: Network, data_urls: dict[str, str] | None = None
) -> tuple[list[str], list[Any], SessionProposal]:
    """Patient data at every peer, a budget for the exact-answer epsilon, and the session."""
    records = breast_cancer_records(np.random.default_rng(0))
    parts = split_dataset(records, 3, mode="dirichlet", alpha=0.6, rng=np.random.default_rng(3))
    ids = list(network.peers)
    kits = [network.kit.kits[p] for p in ids]
    urls = {p: f"sqlite:///{network.kit.kits[p].directory / 'data.db'}" for p in ids}
    urls.update(data_urls or {})
    write_hospital_stores(
        parts,
        [urls[p] for p in ids],
        feature_names=breast_cancer_feature_names(),
        dataset_name=BUNDLED_DATASET_NAME,
    )
    for kit in kits:  # a budget that allows the exact-answer epsilon
        text = kit.config.read_text(encoding="utf-8")
        kit.config.write_text(
            text.replace("[policy]\n", "[policy]\nmax_epsilon = 1e7\n", 1), encoding="utf-8"
        )
    spec = StatisticsSpec.from_payload(
        {
            "kind": "statistics",
            "epsilon": EPSILON,
            "max_records": 1000,
            "queries": [
                {"name": "diagnoses", "type": "count", "categories": ["benign", "malignant"]},
                {"name": "area", "type": "mean", "feature": "mean area", "bounds": [0, 3000]},
            ],
        }
    )
    proposal = SessionProposal(
        "stats-1",
        tuple(ids),
        rounds=1,
        threshold=3,
        payload=spec.to_payload(),
        stage_seconds=4.0,
        prepare_seconds=10.0,
    )
    return ids, parts, proposal


def test_a_release_to_an_aggregator_that_aborts_after_unmasking_is_charged(
    network: Network,
) -> None:
    """Issue 9 item 5 over real gRPC: the round-1 aggregator unmasks the sum, then publishes
    a wrong aggregate, so its attempt is not agreed (the round is retried with the next
    aggregator). Every peer that sent its noisy answers to the liar has them charged in its
    ledger anyway (before they left), once per distinct value: the retry sends the same
    answers, so it is not charged again."""
    ids, _, proposal = _setup(network)
    liar = network.aggregator(proposal, 1)
    for peer_id, process in network.peers.items():
        process.start({"HOSPITAL_SECAGG_TAMPER_TRANSCRIPT": "1"} if peer_id == liar else None)
    network.run_session(proposal)
    for peer_id in ids:
        agreed = network.records(peer_id, "stats-1")
        assert all(r.record.metrics.get("aggregator") != liar for r in agreed), (
            "the liar's attempt must not be agreed"
        )
        with network.ledger(peer_id) as ledger:
            attempts = ledger.round_attempts("stats-1", 1)
            charges = ledger.privacy_charges(peer_id, "stats-1")
            spent = ledger.privacy_spent(peer_id)
        assert any(a.aggregator == liar and a.status is not RoundStatus.AGREED for a in attempts), (
            [(a.attempt, a.aggregator, a.status) for a in attempts],
            network.logs(),
        )
        # Charged although nothing was agreed: one value (statistics reuse their answers
        # for every attempt of a round), one charge.
        assert len(charges) == 1, (charges, network.logs())
        assert charges[0].round == 1
        assert spent.statistics_epsilon == pytest.approx(EPSILON)
