"""`python -m scripts.study_flchain --quick`: the accuracy study runs end to end on real data.

Tiny settings (one epsilon, two seeds, a few steps): this checks the pipeline (encoding,
non-IID split, calibration, every configuration, intervals, targets, JSON), not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts import study_flchain

pytestmark = pytest.mark.slow  # PLD noise calibration takes tens of seconds on a busy machine


def test_encoding_leaves_out_the_cause_of_death_and_is_finite() -> None:
    x, y = study_flchain.load_flchain()
    assert x.shape == (7874, len(study_flchain.FEATURES))
    assert "chapter" not in " ".join(study_flchain.FEATURES)
    assert np.all(np.isfinite(x))
    assert 0.25 < y.mean() < 0.30


def test_quick_study_writes_complete_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "flchain.json"
    assert study_flchain.main(["--quick", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    hospitals = result["data"]["hospitals"]
    assert len(hospitals) == study_flchain.HOSPITALS
    # Non-IID by age: older hospitals, more deaths.
    ages = [h["mean_age"] for h in hospitals]
    assert ages == sorted(ages)
    assert hospitals[-1]["death_rate"] > 3 * hospitals[0]["death_rate"]
    assert sum(h["records"] for h in hospitals) + result["data"]["test_records"] == 7874
    (row,) = result["by_epsilon"]
    assert row["epsilon"] == 3.0
    entries = [result["centralized_nonprivate"], row["centralized_dp"], *row["alone_dp"]]
    entries += [row["federated_fedavg"], row["federated_fedadam"]]
    for entry in entries:
        low, high = entry["accuracy_ci95"]
        assert 0.0 <= low <= entry["accuracy"] <= high <= 1.0
        assert len(entry["per_seed"]) == 2
    # Every hospital's spend in the federation is within the target.
    assert all(0 < e <= 3.0 + 1e-6 for e in row["federated_fedavg"]["epsilon_per_hospital"])
    assert row["federated_fedavg"]["sigma"] > 0
    assert set(row["targets"]) == {
        "federated_ge_centralized_dp_minus_1pt",
        "federated_above_every_hospital_disjoint_ci",
    }
    assert "centralized non-private" in capsys.readouterr().out
