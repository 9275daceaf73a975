"""`python -m scripts.study_imaging --quick`: the imaging study runs end to end on DICOM files.

Tiny settings (60 images per hospital, two seeds, a few steps): this checks the pipeline
(DICOM written and read back through the image source, non-IID lesion shares, the cnn
preset, calibration, every configuration, intervals, JSON), not accuracy. Writing and reading
the task alone takes a few seconds and is not marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts import study_imaging


def test_the_task_is_read_back_from_dicom_files_with_non_iid_lesion_shares(
    tmp_path: Path,
) -> None:
    settings = study_imaging.Settings(images_per_hospital=80, test_images=30, size=24)
    hospitals, (x_test, y_test), data = study_imaging.make_task(tmp_path, settings)
    # Real DICOM files on disk, one per image, and the source skipped none of them.
    written = sorted((tmp_path / "hospitals").rglob("*.dcm"))
    assert len(written) == 3 * 80
    assert written[0].read_bytes()[128:132] == b"DICM"
    for meta in data["hospitals"]:
        assert meta["images"] == 80
        assert not [n for n in meta["notes"] if "skipped" in n], meta["notes"]
    # Decoded as declared: 24x24x1 in [0, 1], 12-bit max-value normalization.
    for x, y in [*hospitals, (x_test, y_test)]:
        assert x.shape[1:] == (24, 24, 1)
        assert x.dtype == np.float32
        assert x.min() >= 0.0
        assert x.max() <= 1.0
        assert set(np.unique(y)) <= {0, 1}
    shares = [h["lesion_share"] for h in data["hospitals"]]
    assert shares == sorted(shares)
    assert shares[2] - shares[0] > 0.3
    assert len(y_test) == 30
    assert data["test_images"] == 30


@pytest.mark.slow  # PLD calibration and TensorFlow tracing: tens of seconds
def test_quick_study_writes_complete_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "imaging.json"
    assert study_imaging.main(["--quick", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["epsilon"] == 3.0
    assert result["data"]["image_size"] == [32, 32]
    assert len(result["data"]["hospitals"]) == len(study_imaging.HOSPITALS)
    # The model is the project's cnn preset, as a session declares it.
    spec = study_imaging.cnn_spec(study_imaging.QUICK)
    assert result["model"]["parameters"] == spec.n_parameters()
    entries = [result["centralized_nonprivate"], result["centralized_dp"]]
    entries += [*result["alone_dp"], result["federated_fedavg"]]
    for entry in entries:
        for metric in ("accuracy", "auc"):
            low, high = entry[f"{metric}_ci95"]
            assert 0.0 <= low <= high <= 1.0
        assert entry["accuracy_ci95"][0] <= entry["accuracy"] <= entry["accuracy_ci95"][1]
        assert len(entry["per_seed"]) == 2
    # Every hospital's spend in the federation, and the centralized one, within the target.
    assert all(0 < e <= 3.0 + 1e-6 for e in result["federated_fedavg"]["epsilon_per_hospital"])
    assert 0 < result["centralized_dp"]["epsilon_spent"] <= 3.0 + 1e-6
    assert result["federated_fedavg"]["sigma"] > 0
    assert set(result["comparison"]) == {
        "accuracy_points_below_centralized_dp",
        "auc_below_centralized_dp",
        "accuracy_intervals_overlap",
        "auc_intervals_overlap",
    }
    out = capsys.readouterr().out
    assert "32x32 pixels" in out
    assert "federated DP (FedAvg)" in out
