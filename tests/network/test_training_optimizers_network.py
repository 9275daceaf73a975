"""FedAdam over real gRPC: 3 hospital processes agree on every model and optimizer state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from network_harness import Network
from test_training_network import TRAINING, TRAINING_CLEAR_EVAL

from peer.data import (
    breast_cancer_feature_names,
    breast_cancer_records,
    split_dataset,
    write_hospital_stores,
)
from peer.session import SessionProposal

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

FEDADAM = {**TRAINING_CLEAR_EVAL, "optimizer": "fedadam", "server_lr": 0.1}


def test_fedadam_session_trains_and_every_peer_stores_the_same_state(tmp_path: Path) -> None:
    network = Network.create(tmp_path, 3, start=False, policy={"max_epsilon": 1000.0})
    parts = split_dataset(
        breast_cancer_records(np.random.default_rng(1)),
        3,
        "dirichlet",
        alpha=0.5,
        rng=np.random.default_rng(2),
    )
    write_hospital_stores(
        parts,
        [f"sqlite:///{network.kit.kits[p].directory / 'data.db'}" for p in network.peers],
        feature_names=breast_cancer_feature_names(),
        dataset_name="breast-cancer",
    )
    try:
        for process in network.peers.values():
            process.start()
        proposal = SessionProposal(
            "adam",
            tuple(network.peers),
            rounds=4,
            threshold=3,
            payload=FEDADAM,
            bits=64,
            stage_seconds=10.0,
            prepare_seconds=60.0,
            seed=7,
        )
        statuses = network.run_session(proposal, timeout=400)
        assert {s.state for s in statuses.values() if not isinstance(s, Exception)} == {
            "finished"
        }, network.logs()
        reference = network.records("hospital-a", "adam")
        assert [r.record.round for r in reference] == [1, 2, 3, 4], network.logs()
        p = TRAINING["input_dim"] + 1  # type: ignore[operator]
        for round_ in (2, 3):
            stored = {
                peer: network.ledger(peer).get_checkpoint("adam", round_) for peer in network.peers
            }
            blobs = [c.weights if c is not None else None for c in stored.values()]
            assert None not in blobs, "every peer holds the round's checkpoint"
            (blob,) = set(blobs)  # ... the same one
            assert blob is not None
            assert len(blob) == 3 * p * 4, "weights, then FedAdam's m and v"
        for peer_id in network.peers:
            mine = network.records(peer_id, "adam")
            assert [(r.record, r.record_hash) for r in mine] == [
                (r.record, r.record_hash) for r in reference
            ]
            assert network.verify(peer_id) == []
        initial_loss = float(str(reference[1].record.metrics["loss"]))
        final_loss = float(str(reference[3].record.metrics["loss"]))
        assert final_loss < initial_loss, (initial_loss, final_loss)
    finally:
        network.stop()
