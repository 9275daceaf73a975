"""Server optimizers in the training payload: every peer concludes the same bytes, and the
adaptive state comes back from the ledger after a restart or a catch-up.

The three hospitals run in process (rounds summed in the ring, no network), as in
``test_training.py``, whose fixtures and round driver are reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_training import PAYLOAD, PEERS, make_proposal

from peer.data import (
    breast_cancer_feature_names,
    breast_cancer_records,
    split_dataset,
)
from peer.ledger import Ledger
from peer.payloads.training import TrainingPayload, training_payload
from peer.session import ProposalError
from peer.training.server_optim import OptimizerKind
from scripts.inprocess_training import local_config, local_hospitals, plain_round

ADAM = {**PAYLOAD, "training_rounds": 2, "optimizer": "fedadam", "server_lr": 0.05}


def make_hospitals(tmp_path: Path, payload: dict[str, object]) -> list[TrainingPayload]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    parts = split_dataset(
        breast_cancer_records(np.random.default_rng(0)),
        3,
        "dirichlet",
        alpha=0.5,
        rng=np.random.default_rng(1),
    )
    rounds = int(str(payload["training_rounds"])) + 2
    proposal = make_proposal(payload=payload, rounds=rounds)
    return local_hospitals(
        tmp_path, proposal, parts, breast_cancer_feature_names(), ledger_threshold=2
    )


def restarted(hospital: TrainingPayload, tmp_path: Path) -> TrainingPayload:
    """The same peer after a restart: a new payload object, nothing kept in memory."""
    config = local_config(tmp_path, hospital.me)
    fresh = training_payload(hospital.proposal, config, Ledger(config.ledger_url))
    fresh.rng = np.random.default_rng(7)
    return fresh


@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_agree_bit_for_bit_and_survive_restart_and_catch_up(
    tmp_path: Path, optimizer: str
) -> None:
    hospitals = make_hospitals(tmp_path, {**ADAM, "optimizer": optimizer})
    plain_round(hospitals, 1)
    p = hospitals[0].spec.n_parameters()
    # Round 2 without hospital-c (down): a and b agree; c catches up afterwards by storing
    # the agreed record with its checkpoint, as peer.catchup does after verifying it.
    a, b, c = hospitals
    models = plain_round([a, b], 2)
    assert models[0] == models[1]
    stored = a.ledger.agreed_records("train")[-1]
    checkpoint = a.ledger.get_checkpoint("train", 2)
    assert checkpoint is not None
    assert len(checkpoint.weights) == 3 * p * 4, "weights, then m and v (float32)"
    c.ledger.append_agreed(stored.record, {}, checkpoint=checkpoint.weights, min_signatures=0)
    state = a.server_state(3)
    assert np.any(state.m != 0), "the first adaptive step moved the first moment"
    # Everybody restarts: the state each concludes round 3 from is read from its ledger.
    fresh = [restarted(h, tmp_path) for h in (a, b, c)]
    for h in fresh:
        assert np.array_equal(h.server_state(3).m, state.m)
        assert np.array_equal(h.server_state(3).v, state.v)
    models = plain_round(fresh, 3)
    assert len(set(models)) == 1, "every peer concludes the same bytes"
    # Known answer: the round-3 model is the optimizer rule applied to the agreed state.
    weights = np.frombuffer(models[0], dtype="<f4")[:p].astype(np.float64)
    base = a.global_weights(3).astype(np.float64)
    spec = a.spec
    opt = spec.server_optimizer()
    assert opt.kind is OptimizerKind(optimizer)
    moved = weights - base
    assert np.all(np.abs(moved) <= opt.step_bound(spec.update_bound()) * (1 + 1e-6))
    # The final evaluation round stores the trained weights alone (no optimizer state).
    final = plain_round(fresh, 4)
    assert np.array_equal(np.frombuffer(final[0], dtype="<f4"), weights.astype(np.float32))


def test_fedavg_checkpoints_are_the_weights_alone(tmp_path: Path) -> None:
    hospitals = make_hospitals(tmp_path, PAYLOAD)
    plain_round(hospitals, 1)
    models = plain_round(hospitals, 2)
    assert len(models[0]) == hospitals[0].spec.n_parameters() * 4


def test_an_adaptive_step_is_bounded_whatever_the_contributions(tmp_path: Path) -> None:
    """The attack of test_training.test_a_participant_cannot_inflate_its_weight against
    FedAdam: the clamped pseudo-gradient keeps one step within server_lr * U / tau."""
    hospitals = make_hospitals(tmp_path, ADAM)
    plain_round(hospitals, 1)
    payload = hospitals[0]
    honest = [h.prepare(2) for h in hospitals[:2]]
    bound = payload.spec.server_optimizer().step_bound(payload.spec.update_bound())
    attack = np.full(payload.vector_length(2), np.iinfo(np.uint64).max // 2, dtype=np.uint64)
    result = payload.conclude(2, honest[0].vector + honest[1].vector + attack, PEERS)
    p = payload.spec.n_parameters()
    moved = np.frombuffer(result.model, dtype="<f4")[:p].astype(np.float64) - (
        payload.global_weights(2).astype(np.float64)
    )
    assert np.all(np.isfinite(moved))
    assert np.all(np.abs(moved) <= bound * (1 + 1e-6))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": "fedsgdm"}, "optimizer must be one of 'fedavg', 'fedadam', 'fedyogi'"),
        ({"optimizer": "fedadam", "server_lr": -1}, r"invalid server_lr \(> 0, finite\)"),
        ({"optimizer": "fedadam", "beta1": 1.0}, r"invalid beta1 \(in \[0, 1\)\)"),
        ({"optimizer": "fedyogi", "beta2": -0.1}, r"invalid beta2"),
        ({"optimizer": "fedadam", "tau": 0}, r"invalid tau \(> 0, finite\)"),
        ({"optimizer": "fedadam", "server_lr": "0.1"}, "server_lr must be a number"),
        ({"optimizer": "fedadam", "tau": True}, "tau must be a number"),
        ({"beta1": 0.9}, "beta1 only apply to optimizer 'fedadam' or 'fedyogi'"),
        ({"prox_mu": -0.5}, r"invalid prox_mu \(>= 0, finite\)"),
        ({"prox_mu": float("inf")}, r"invalid prox_mu"),
        ({"prox_mu": "0.1"}, "prox_mu must be a number, not '0.1'"),
    ],
)
def test_optimizer_parameters_are_validated(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    config = local_config(tmp_path, "hospital-a")
    with pytest.raises(ProposalError, match=message):
        training_payload(
            make_proposal(payload={**PAYLOAD, **changes}), config, Ledger(config.ledger_url)
        )


def test_fedprox_spends_exactly_what_dp_sgd_spends(tmp_path: Path) -> None:
    """The proximal term is not data-dependent: the released mechanisms (and so every
    hospital's epsilon) do not depend on mu."""
    plain = make_hospitals(tmp_path / "plain", PAYLOAD)[0]
    prox = make_hospitals(tmp_path / "prox", {**PAYLOAD, "prox_mu": 0.5})[0]
    assert prox.spec.prox_mu == 0.5
    for round_ in (1, 2, 3):
        assert plain.round_events(round_) == prox.round_events(round_)
    assert plain.epsilon_needed() == prox.epsilon_needed()
