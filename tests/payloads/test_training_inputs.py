"""A training session's model and data: declared models under each site's policy, data from
the site's own source (an SQL query here), and the ring that follows from the payload.

The attacks: a proposal that ships a model a site does not train (a forbidden layer, code in a
Lambda, an oversized model) and a proposal that tries to choose what a site reads (its own
query). Each honest site refuses with the reason, before it reads any data.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_training import PEERS

from peer.config import Policy, load_config
from peer.ledger import Ledger
from peer.payloads import default_payload, ring_bits_for, session_rounds_for
from peer.payloads.training import training_payload
from peer.session import ProposalError, SessionProposal
from peer.training import ModelPolicy, secure_generator
from scripts.inprocess_training import local_config, plain_round

FEATURES = ("age", "creatinine", "hba1c", "bmi")


def declared_mlp(input_dim: int, extra: Any = None) -> str:
    """A declared model as a proposal carries it: the JSON keras' to_json() writes."""
    import keras

    layers = [keras.Input(shape=(input_dim,)), keras.layers.Dense(8, activation="tanh")]
    if extra is not None:
        layers.append(extra)
    layers.append(keras.layers.Dense(1))
    return str(keras.Sequential(layers).to_json())


def training(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "kind": "training",
        "model": "declared",
        "model_json": declared_mlp(len(FEATURES)),
        "training_rounds": 2,
        "local_steps": 25,
        "batch_size": 32,
        "lr": 0.5,
        "clip_norm": 1.0,
        "noise_multiplier": 0.8,
        "max_records": 1000,
        "feature_bound": [100.0, 10.0, 15.0, 60.0],
        # About the federation, not privacy: little noise on the released evaluation.
        "standardize_noise": 1.0,
        "eval_noise": 0.5,
        "loss_bound": 5.0,
    }
    payload.update(changes)
    return payload


def proposal_of(payload: dict[str, Any], **changes: Any) -> SessionProposal:
    fields: dict[str, Any] = {
        "session_id": "train",
        "participants": PEERS,
        "rounds": payload["training_rounds"] + 2,
        "threshold": 3,
        "payload": payload,
        "bits": 64,
        "seed": 5,
    }
    fields.update(changes)
    return SessionProposal(**fields)


def write_ehr(path: Path, n: int, rng: np.random.Generator, shift: float) -> None:
    """A hospital's own clinical database: one table, a label that depends on two features."""
    age = rng.normal(60 + shift, 12, n)
    creatinine = rng.lognormal(0.0 + shift / 50, 0.4, n)
    hba1c = rng.normal(6.0, 1.0, n)
    bmi = rng.normal(28, 5, n)
    risk = 0.08 * (age - 60) + 2.0 * (creatinine - 1.0) + rng.normal(0, 0.7, n)
    label = (risk > 0).astype(int)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE visits (pid TEXT, age REAL, cr REAL, hba1c REAL, bmi REAL, y INT)")
        db.executemany(
            "INSERT INTO visits VALUES (?, ?, ?, ?, ?, ?)",
            [
                (f"p{i}", *map(float, row), int(y))
                for i, (row, y) in enumerate(
                    zip(np.stack([age, creatinine, hba1c, bmi], 1), label, strict=True)
                )
            ],
        )


def sql_table(db: Path) -> dict[str, Any]:
    """The site's [data] table: the query is the site's, never the proposal's."""
    return {
        "source": "sql",
        "url": f"sqlite:///{db}",
        "query": "SELECT pid, age, cr AS creatinine, hba1c, bmi, y FROM visits",
        "id": "pid",
        "features": list(FEATURES),
        "label": "y",
    }


def site(tmp_path: Path, peer: str, policy: ModelPolicy | None = None, data: Any = None) -> Any:
    config = local_config(tmp_path, peer)
    if policy is not None:
        config = replace(config, policy=Policy(max_epsilon=1000.0, models=policy))
    return replace(config, data=data)


def ledger_for(config: Any, proposal: SessionProposal) -> Ledger:
    ledger = Ledger(config.ledger_url)
    ledger.create()
    ledger.record_proposal(
        proposal.session_id,
        proposal.document(),
        proposer="op",
        participants=PEERS,
        threshold=3,
        rounds_planned=proposal.rounds,
    )
    ledger.decide_session(proposal.session_id, accept=True)
    return ledger


# --------------------------------------------------------------------------- model policy


@pytest.mark.parametrize(
    ("layer", "site_policy", "reason"),
    [
        ("BatchNormalization", ModelPolicy(), "BatchNormalization\\) refused: it mixes"),
        ("Conv1D", ModelPolicy(frozenset({"InputLayer", "Dense"})), "not in this site's allowed"),
        (None, ModelPolicy(max_parameters=20), "more than this site's limit of 20"),
    ],
)
def test_a_site_refuses_a_model_its_policy_forbids_with_the_reason(
    tmp_path: Path, layer: str | None, site_policy: ModelPolicy, reason: str
) -> None:
    import keras

    extra = {
        None: None,
        "BatchNormalization": keras.layers.BatchNormalization(),
        "Conv1D": keras.layers.Reshape((8, 1)),
    }[layer]
    model_json = declared_mlp(len(FEATURES), extra)
    if layer == "Conv1D":  # a Conv1D over the hidden layer, then flattened
        model_json = str(
            keras.Sequential(
                [
                    keras.Input(shape=(len(FEATURES),)),
                    keras.layers.Reshape((len(FEATURES), 1)),
                    keras.layers.Conv1D(2, 2),
                    keras.layers.Flatten(),
                    keras.layers.Dense(1),
                ]
            ).to_json()
        )
    proposal = proposal_of(training(model_json=model_json))
    # The site has no data at all: the model is refused before any data is read.
    config = site(tmp_path, "hospital-a", site_policy, data=None)
    # BatchNormalization is refused by every site (it is no model this project trains).
    with pytest.raises(
        ProposalError, match=f"(hospital-a's model policy|training payload): .*{reason}"
    ):
        default_payload(proposal, config, Ledger(config.ledger_url))


def test_a_model_shipping_code_is_refused_before_keras_sees_it(tmp_path: Path) -> None:
    document = json.loads(declared_mlp(len(FEATURES)))
    document["config"]["layers"][1]["class_name"] = "Lambda"
    document["config"]["layers"][1]["config"]["function"] = "os.system"
    proposal = proposal_of(training(model_json=json.dumps(document)))
    config = site(tmp_path, "hospital-a", ModelPolicy())
    with pytest.raises(ProposalError, match="Lambda\\) refused: it carries code"):
        default_payload(proposal, config, Ledger(config.ledger_url))


def test_the_policy_comes_from_the_sites_configuration(tmp_path: Path) -> None:
    for name in ("a.pem", "a.key", "ca.pem", "roster.json", "crl.pem"):
        (tmp_path / name).write_text("")
    (tmp_path / "a.toml").write_text(
        'peer_id = "hospital-a"\nlisten = "127.0.0.1:0"\n'
        '[tls]\ncert = "a.pem"\nkey = "a.key"\nca = "ca.pem"\nroster = "roster.json"\n'
        'crl = "crl.pem"\n[policy]\nmax_epsilon = 5.0\n'
        '[policy.models]\nallowed_layers = ["InputLayer", "Dense"]\nmax_parameters = 5000\n'
    )
    policy = load_config(tmp_path / "a.toml").policy
    assert policy.models == ModelPolicy(frozenset({"InputLayer", "Dense"}), 5000)
    assert policy.max_epsilon == 5.0
    # Without the table: the secure default (BatchNormalization and Lambda never allowed).
    default = Policy().models
    assert "Conv2D" in default.allowed_layers
    assert "BatchNormalization" not in default.allowed_layers


def test_the_presets_are_declared_models_under_the_same_policy(tmp_path: Path) -> None:
    proposal = proposal_of(training(model="mlp", model_json=None, input_dim=4, hidden=[300]))
    proposal = proposal_of({k: v for k, v in proposal.payload.items() if v is not None})
    config = site(tmp_path, "hospital-a", ModelPolicy(max_parameters=1000))
    with pytest.raises(ProposalError, match="1,801 parameters, more than this site's limit"):
        default_payload(proposal, config, Ledger(config.ledger_url))


# --------------------------------------------------------------------------- what a site reads


@pytest.mark.parametrize("key", ["query", "url", "data"])
def test_a_proposal_cannot_say_what_a_site_reads(tmp_path: Path, key: str) -> None:
    payload = training(**{key: "SELECT * FROM visits; DROP TABLE visits"})
    config = site(tmp_path, "hospital-a")
    with pytest.raises(ProposalError, match=f"{key} refused: a proposal never says what a site"):
        training_payload(proposal_of(payload), config, Ledger(config.ledger_url))


def test_an_imaging_session_is_refused_by_a_site_with_tabular_data(tmp_path: Path) -> None:
    db = tmp_path / "ehr.db"
    write_ehr(db, 50, np.random.default_rng(0), 0.0)
    payload = training(model="cnn", image={"size": [16, 16]}, feature_bound=1.0)
    del payload["model_json"]
    config = site(tmp_path, "hospital-a", data=sql_table(db))
    with pytest.raises(ValueError, match="hospital-a has no image data"):
        training_payload(proposal_of(payload), config, Ledger(config.ledger_url))


# --------------------------------------------------------------------------- the ring


def test_the_ring_and_rounds_follow_from_the_payload(tmp_path: Path) -> None:
    payload = training()
    assert ring_bits_for(payload) == 64
    assert ring_bits_for({"kind": "vector"}) == 32
    assert session_rounds_for(payload) == 4
    config = site(tmp_path, "hospital-a")
    with pytest.raises(ProposalError, match="write bits = 64 in \\[session\\], or leave bits out"):
        training_payload(proposal_of(payload, bits=32), config, Ledger(config.ledger_url))


# --------------------------------------------------------------------------- an SQL session


@pytest.mark.slow
def test_a_session_over_each_sites_sql_database_trains_a_declared_model(tmp_path: Path) -> None:
    proposal = proposal_of(training())
    payloads = []
    for index, peer in enumerate(PEERS):
        db = tmp_path / f"{peer}-ehr.db"
        write_ehr(db, 300, np.random.default_rng(index), shift=5.0 * index)
        config = site(tmp_path, peer, data=sql_table(db))
        payload = training_payload(proposal, config, ledger_for(config, proposal))
        # Fixed randomness (quantization, released noise, DP-SGD sampling and noise): the
        # outcome of this test does not depend on the draw.
        payload.rng = np.random.default_rng(index)
        payload.noise = lambda i=index: np.random.default_rng(100 + i)  # type: ignore[misc]
        payload._noise = secure_generator(f"sql-session-{index}".encode())
        payloads.append(payload)
    # A declared model is trained with the per-layer DP-SGD trainer.
    from peer.training import LayerwiseDPSGD

    payloads[0]._keras_model()
    assert isinstance(payloads[0]._trainer, LayerwiseDPSGD)
    models = [plain_round(payloads, r) for r in range(1, proposal.rounds + 1)]
    assert all(len(set(m)) == 1 for m in models)  # every site concluded the same
    records = [r.record for r in payloads[0].ledger.agreed_records("train")]
    assert [m["round_kind"] for m in (r.metrics for r in records)] == [
        "standardize",
        "train",
        "train",
        "evaluate",
    ]
    # the SQL databases were read, not written
    for peer in PEERS:
        with sqlite3.connect(tmp_path / f"{peer}-ehr.db") as connection:
            assert connection.execute("SELECT count(*) FROM visits").fetchone() == (300,)
    before = float(str(records[1].metrics["loss"]))
    after = float(str(records[3].metrics["loss"]))
    assert after < before, (before, after)
    assert float(str(records[3].metrics["accuracy"])) > 0.7, records[3].metrics


def test_a_model_whose_output_does_not_fit_the_task_is_refused_on_arrival(
    tmp_path: Path,
) -> None:
    import keras

    two_outputs = keras.Sequential(
        [keras.Input(shape=(len(FEATURES),)), keras.layers.Dense(2)]
    ).to_json()
    db = tmp_path / "ehr.db"
    write_ehr(db, 60, np.random.default_rng(0), 0.0)
    config = site(tmp_path, "hospital-a", data=sql_table(db))
    with pytest.raises(ProposalError, match="a binary task needs 1 output"):
        training_payload(
            proposal_of(training(model_json=two_outputs)), config, Ledger(config.ledger_url)
        )
