"""A regression session over each site's own SQL database (an OMOP cohort query whose target
column is the latest serum creatinine), in process: what the payload trains on is the query's
target column, in the order of its features; a site whose source cannot serve the session's
task refuses it when the proposal arrives, naming itself and why."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine
from test_training import PEERS
from test_training_inputs import ledger_for, proposal_of

from peer.data import SQLSource, data_source
from peer.data.omop import (
    OMOP_COHORT_QUERY,
    OMOP_REGRESSION_FEATURES,
    OMOP_REGRESSION_QUERY,
    write_synthetic_omop,
)
from peer.ledger import Ledger
from peer.payloads.training import training_payload
from scripts.inprocess_training import local_config, plain_round

# Latest creatinine (mg/dL, about 0.5-2.2 here) from age, sex and mean HbA1c.
REGRESSION = {
    "kind": "training",
    "model": "logreg",
    "input_dim": len(OMOP_REGRESSION_FEATURES),
    "task": "regression",
    "target_center": 1.3,
    "target_bound": 1.5,
    "training_rounds": 1,
    "local_steps": 5,
    "batch_size": 16,
    "lr": 0.5,
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "max_records": 1000,
    "feature_bound": [100.0, 1.0, 15.0],
    "standardize_noise": 1.0,
}


def regression_table(db: Path) -> dict[str, Any]:
    """A site's [data] table: a regression-only data set (no label)."""
    return {
        "source": "sql",
        "url": f"sqlite:///{db}",
        "query": OMOP_REGRESSION_QUERY,
        "id": "person_id",
        "features": list(OMOP_REGRESSION_FEATURES),
        "target_column": "creatinine",
        "missing": "drop",
    }


def omop_site(tmp_path: Path, peer: str, index: int, table: dict[str, Any]) -> Any:
    db = tmp_path / f"{peer}-omop.db"
    engine = create_engine(f"sqlite:///{db}")
    write_synthetic_omop(engine, 80, np.random.default_rng(index))
    engine.dispose()
    return replace(local_config(tmp_path, peer), data={**table, "url": f"sqlite:///{db}"})


def test_a_regression_round_prepares_a_contribution_from_sql_targets(tmp_path: Path) -> None:
    proposal = proposal_of(REGRESSION)
    hospitals = []
    for index, peer in enumerate(PEERS):
        config = omop_site(tmp_path, peer, index, regression_table(tmp_path))
        hospital = training_payload(proposal, config, ledger_for(config, proposal))
        hospital.rng = np.random.default_rng(index)
        hospitals.append(hospital)
        # What the site trains on: the query's target column, not its (all-zero) labels.
        source = data_source(config.data, config.directory, config.data_url)
        assert isinstance(source, SQLSource)
        x, y = hospital.site.arrays("train")
        np.testing.assert_array_equal(y, source.targets("train"))
        np.testing.assert_array_equal(x, source.load("train")[0])
        assert 0.3 < float(np.mean(y)) < 2.5  # creatinine values, not class indices
    plain_round(hospitals, 1)  # the pooled standardization
    before = hospitals[0].global_weights(2)
    contributions = [h.prepare(2) for h in hospitals]
    for contribution in contributions:
        assert contribution.epsilon > 0  # a DP-SGD release...
        assert np.any(contribution.vector != 0)  # ...of a model update
    models = plain_round(hospitals, 2)
    assert len(set(models)) == 1  # every site concluded the same model
    assert not np.array_equal(hospitals[0].global_weights(3), before)


def test_a_site_refuses_a_task_its_sql_source_cannot_serve(tmp_path: Path) -> None:
    # A regression session at a site whose query yields a label but no target column.
    labelled = {
        **regression_table(tmp_path),
        "query": OMOP_COHORT_QUERY,
        "features": ["age", "female", "hba1c"],
        "label": "ckd",
    }
    del labelled["target_column"]
    config = omop_site(tmp_path, "hospital-a", 0, labelled)
    with pytest.raises(
        ValueError, match="hospital-a's \\[data\\] source has no regression targets"
    ):
        training_payload(proposal_of(REGRESSION), config, Ledger(config.ledger_url))
    # A binary session at a site with only a target: its labels would all be 0.
    config = omop_site(tmp_path, "hospital-b", 1, regression_table(tmp_path))
    binary = {k: v for k, v in REGRESSION.items() if not k.startswith("target")}
    with pytest.raises(ValueError, match="hospital-b's \\[data\\] SQL source declares no label"):
        training_payload(
            proposal_of({**binary, "task": "binary"}), config, Ledger(config.ledger_url)
        )
