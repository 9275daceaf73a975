"""Multi-class and regression sessions in process: three hospitals, rounds summed in the ring.

What these show: the agreed metrics are exactly those of the *summed* statistics (computed
here independently from the union of the hospitals' test sets with the agreed model) and not
any single hospital's; every release is noisy and one record moves it by at most the
sensitivity the noise is calibrated to; labels that do not fit the task are refused with an
error naming the hospital and the column.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import create_engine, inspect
from test_training import PEERS
from test_training_inputs import ledger_for, proposal_of

from peer.data import (
    DataError,
    PatientRecord,
    PatientStore,
    diabetes_feature_names,
    diabetes_records,
    import_csv,
    split_dataset,
    standardize,
)
from peer.data.records import Base, DatasetLabels
from peer.ledger import Ledger
from peer.payloads.evaluation import (
    BinaryEvaluation,
    MulticlassEvaluation,
    RegressionEvaluation,
    multiclass_sums,
    regression_sums,
)
from peer.payloads.training import TrainingPayload, released_evaluation, training_payload
from peer.session import ProposalError, SessionProposal
from scripts.inprocess_training import local_config, local_hospitals, plain_round

BASE = {
    "kind": "training",
    "model": "logreg",
    "input_dim": 10,
    "training_rounds": 2,
    "local_steps": 30,
    "batch_size": 16,
    "lr": 0.5,
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "max_records": 1000,
    # scikit-learn ships the diabetes measurements centred and scaled to within about +-0.2.
    "feature_bound": 0.2,
    "standardize_noise": 1.0,
}
MULTICLASS = {**BASE, "task": "multiclass", "classes": 3}
# Disease progression runs from 25 to 346: centred on 180, within +-200 of it.
REGRESSION = {
    **BASE,
    "task": "regression",
    "target_bound": 200.0,
    "target_center": 180.0,
    "residual_bound": 300.0,
}


class ZeroNoise:
    """A noise generator that draws zeros: lets a test compare the agreed metrics with the
    exact ones (the real generator is injected the same way, per release)."""

    def normal(self, loc: float, scale: float, size: Any) -> npt.NDArray[np.float64]:
        return np.zeros(size)


def make_hospitals(
    tmp_path: Path,
    payload: dict[str, Any],
    records: list[PatientRecord] | None = None,
    exact: bool = False,
) -> list[TrainingPayload]:
    if records is None:
        records = diabetes_records(np.random.default_rng(0))
    parts = split_dataset(records, 3, "dirichlet", alpha=1.0, rng=np.random.default_rng(1))
    proposal = SessionProposal(
        session_id="train",
        participants=PEERS,
        rounds=payload["training_rounds"] + 2,
        threshold=3,
        payload=payload,
        bits=64,
        seed=3,
    )
    payloads = local_hospitals(
        tmp_path, proposal, parts, diabetes_feature_names(), ledger_threshold=2
    )
    if exact:
        for hospital in payloads:
            hospital.noise = ZeroNoise  # type: ignore[assignment]
    return payloads


def final_metrics(hospitals: list[TrainingPayload]) -> dict[str, Any]:
    return dict(hospitals[0].ledger.agreed_records("train")[-1].record.metrics)


def outputs_of(hospital: TrainingPayload, round_: int) -> tuple[Any, Any]:
    """The agreed model entering ``round_`` on this hospital's standardized test split."""
    from peer.training import model_outputs, set_flat_weights

    model = hospital._keras_model()
    set_flat_weights(model, hospital.global_weights(round_))
    mean, std = hospital._standardizer()
    x_test, y_test = hospital.site.arrays("test")
    return model_outputs(model, standardize(x_test, mean, std)), y_test


@pytest.mark.slow  # four rounds of DP-SGD at three hospitals
def test_multiclass_metrics_are_those_of_the_summed_statistics(tmp_path: Path) -> None:
    hospitals = make_hospitals(tmp_path, MULTICLASS, exact=True)
    for round_ in range(1, 5):
        plain_round(hospitals, round_)
    metrics = final_metrics(hospitals)
    assert metrics["round_kind"] == "evaluate"
    # Independently: the confusion matrix of the final model over the union of test sets.
    per_site = []
    for hospital in hospitals:
        logits, labels = outputs_of(hospital, 4)
        confusion = np.zeros((3, 3))
        np.add.at(confusion, (labels, np.argmax(logits, axis=1)), 1)
        per_site.append(confusion)
    union: npt.NDArray[np.float64] = np.sum(per_site, axis=0)
    assert np.allclose(metrics["confusion_matrix"], union, atol=1e-3)
    assert metrics["n"] == union.sum()
    assert metrics["accuracy"] == pytest.approx(np.trace(union) / union.sum(), abs=1e-6)
    f1 = [2 * union[c, c] / (union[:, c].sum() + union[c, :].sum()) for c in range(3)]
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1), abs=1e-6)
    for site in per_site:
        assert not np.allclose(site, union)
    assert 0.0 <= metrics["auc_ovr"] <= 1.0
    # every peer concluded the same
    assert all(final_metrics([h]) == metrics for h in hospitals)


@pytest.mark.slow  # four rounds of DP-SGD at three hospitals
def test_regression_metrics_are_those_of_the_summed_statistics(tmp_path: Path) -> None:
    hospitals = make_hospitals(tmp_path, REGRESSION, exact=True)
    for round_ in range(1, 5):
        plain_round(hospitals, round_)
    metrics = final_metrics(hospitals)
    residuals, targets, site_mae = [], [], []
    for hospital in hospitals:
        outputs, _ = outputs_of(hospital, 4)
        y = hospital.site.arrays("test")[1]
        r = np.clip(outputs.reshape(-1) * 200.0 + 180.0 - y, -300.0, 300.0)
        residuals.append(r)
        targets.append(y)
        site_mae.append(np.abs(r).mean())
    r, y = np.concatenate(residuals), np.concatenate(targets)
    assert metrics["n"] == len(y)
    assert metrics["mae"] == pytest.approx(np.abs(r).mean(), rel=1e-6)
    assert metrics["rmse"] == pytest.approx(math.sqrt(np.square(r).mean()), rel=1e-6)
    r2 = 1 - np.square(r).sum() / np.square(y - y.mean()).sum()
    assert metrics["r2"] == pytest.approx(r2, abs=1e-6)
    assert all(abs(mae - metrics["mae"]) > 1e-3 for mae in site_mae)
    histogram = metrics["residual_histogram"]
    assert histogram["edges"][0] == -300.0
    assert histogram["edges"][-1] == 300.0
    assert sum(histogram["counts"]) == pytest.approx(len(y), abs=1e-3)
    counts, _ = np.histogram(r, bins=np.asarray(histogram["edges"]))
    assert np.allclose(histogram["counts"], counts, atol=1e-3)


@pytest.mark.slow  # four rounds of DP-SGD at three hospitals
def test_training_lowers_the_regression_error_under_real_noise(tmp_path: Path) -> None:
    payload = {**REGRESSION, "eval_noise": 1.0}
    hospitals = make_hospitals(tmp_path, payload)
    for round_ in range(1, 5):
        plain_round(hospitals, round_)
    records: list[dict[str, Any]] = [
        dict(s.record.metrics) for s in hospitals[0].ledger.agreed_records("train")
    ]
    assert records[-1]["rmse"] < records[1]["rmse"], records
    assert records[-1]["r2"] > records[1]["r2"]


@pytest.mark.parametrize(
    "evaluation",
    [
        MulticlassEvaluation(20, 50.0, classes=4),
        RegressionEvaluation(20, 50.0, target_bound=10.0, residual_bound=5.0),
    ],
)
def test_one_record_moves_the_release_by_at_most_its_sensitivity(evaluation: Any) -> None:
    """The attack: a hospital's test set holds one patient with extreme values (a huge loss,
    target, residual). Adding or removing that patient must not move the scaled release by
    more than the sensitivity the Gaussian noise is calibrated to."""
    rng = np.random.default_rng(0)
    released = np.ones(evaluation.length(), dtype=bool)
    released[list(evaluation.withheld())] = False
    for _ in range(200):
        n = int(rng.integers(1, 20))
        outputs: npt.NDArray[Any]
        labels: npt.NDArray[Any]
        if isinstance(evaluation, MulticlassEvaluation):
            outputs = rng.normal(0, 50, (n, 4))
            labels = rng.integers(0, 4, n)

            def sums(o: Any, y: Any) -> Any:
                return multiclass_sums(o, y, 20, 50.0)
        else:
            outputs = rng.normal(0, 1e3, n)
            labels = rng.normal(0, 1e3, n)

            def sums(o: Any, y: Any) -> Any:
                return regression_sums(o, y, 20, 10.0, 5.0)

        change = (sums(outputs, labels) - sums(outputs[1:], labels[1:])) / evaluation.scale()
        assert np.linalg.norm(change[released]) <= evaluation.sensitivity + 1e-9


def test_every_released_coordinate_is_noisy_and_withheld_ones_are_zero(tmp_path: Path) -> None:
    hospitals = make_hospitals(tmp_path, REGRESSION)
    spec = hospitals[0].spec
    sums = np.arange(spec.eval_length(), dtype=np.float64)
    out = released_evaluation(sums, spec, np.random.default_rng(1))
    withheld = list(spec.evaluation().withheld())
    assert withheld
    assert np.all(out[withheld] == 0)
    noise = np.delete(out - sums / spec.evaluation().scale(), withheld)
    assert np.all(noise != 0)
    assert spec.eval_std() == pytest.approx(spec.eval_noise * math.sqrt(5))


def test_labels_outside_the_classes_are_refused_naming_the_hospital(tmp_path: Path) -> None:
    records = diabetes_records(np.random.default_rng(0), classes=4)  # labels 0..3
    # Refused when the (3-class) proposal arrives, before anything is trained or released.
    with pytest.raises(ValueError, match=r"hospital-a's labels go up to 3; .* 3 classes"):
        make_hospitals(tmp_path, MULTICLASS, records=records)


def test_a_regression_session_needs_every_target(tmp_path: Path) -> None:
    records = [
        PatientRecord(r.patient_id, r.diagnosis, r.features, r.label, r.split, target=None)
        if i % 50 == 0
        else r
        for i, r in enumerate(diabetes_records(np.random.default_rng(0)))
    ]
    # Refused when the proposal arrives, before anything is trained or released.
    with pytest.raises(DataError, match=r"column 'target' is missing for .*patients diab-"):
        make_hospitals(tmp_path, REGRESSION, records=records)


@pytest.mark.parametrize(
    ("changes", "bad"),
    [
        ({"task": "regression"}, "target_bound"),
        ({"task": "binary", "target_bound": 5.0}, "target_bound"),
        ({"task": "binary", "classes": 3}, "classes"),
        ({"task": "multiclass", "classes": 1}, "classes"),
        ({"task": "ranking"}, "task"),
        ({"task": "regression", "target_bound": 5.0, "residual_bound": -1.0}, "residual_bound"),
        ({"task": "binary", "target_center": 1.0}, "target_center"),
    ],
)
def test_task_parameters_are_checked(tmp_path: Path, changes: dict[str, Any], bad: str) -> None:
    proposal = SessionProposal(
        session_id="train",
        participants=PEERS,
        rounds=4,
        threshold=3,
        payload={**BASE, **changes},
        bits=64,
        seed=3,
    )
    config = local_config(tmp_path, "hospital-a")
    with pytest.raises(ProposalError, match=rf"invalid .*{bad}"):
        training_payload(proposal, config, Ledger(config.ledger_url))


def test_the_store_keeps_class_indices_and_targets(tmp_path: Path) -> None:
    store = PatientStore(f"sqlite:///{tmp_path / 'data.db'}")
    store.create()
    records = diabetes_records(np.random.default_rng(0), classes=5)[:40]
    store.add_records(records)
    assert set(store.load("train")[1].tolist()) <= set(range(5))
    stored = store.records()
    assert [(r.label, r.target) for r in stored] == [(r.label, r.target) for r in records]
    train = [r.target for r in records if r.split == "train"]
    assert store.targets("train").tolist() == train
    assert store.describe().label_names == tuple(str(c) for c in range(5))
    with pytest.raises(ValueError, match="class index"):
        PatientRecord("p", "d", np.zeros(3), -1, "train")
    with pytest.raises(ValueError, match="target must be a finite number"):
        PatientRecord("p", "d", np.zeros(3), 0, "train", target=math.nan)


def progression_csv(path: Path, id_prefix: str = "") -> Path:
    """A hospital's export for a regression session: the diabetes features and the disease
    progression, no label column (what ``peer data import --target`` alone is for)."""
    names = diabetes_feature_names()
    lines = [",".join(["pid", *names, "progression"])]
    for record in diabetes_records(np.random.default_rng(0))[:150]:
        pid = id_prefix + record.patient_id
        lines.append(",".join([pid, *map(repr, record.features.tolist())]))
        lines[-1] += f",{record.target}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_store_without_labels_refuses_classification_sessions(tmp_path: Path) -> None:
    """The attack (or mistake): a binary or multi-class session proposed to a site whose
    records were imported with a target and no label, so that every label is 0. Training
    on that constant would be useless and still spend the site's privacy budget: the site
    refuses when the proposal arrives, naming itself and what to do (as a SQL source
    without a label column does, tests/payloads/test_training_sql_regression.py)."""
    config = local_config(tmp_path, "hospital-a")
    store = PatientStore(config.data_url)
    csv = progression_csv(tmp_path / "progression.csv")
    import_csv(store, csv, None, id_col="pid", target_col="progression")
    for payload in (BASE, MULTICLASS):
        with pytest.raises(
            ValueError,
            match=r"hospital-a's patient store holds records imported without a label column "
            r".*not classification ones; import the records with --label COL",
        ):
            training_payload(proposal_of(payload), config, Ledger(config.ledger_url))
    # The same store serves the regression session its targets were imported for.
    proposal = proposal_of(REGRESSION)
    hospital = training_payload(proposal, config, ledger_for(config, proposal))
    assert hospital.site.arrays("train")[1].max() > 25  # progression values, not labels


def test_a_store_created_before_the_label_flag_is_labelled(tmp_path: Path) -> None:
    """A database created before the ``dataset_labels`` table (``create_all`` adds a missing
    table but never alters an existing database, so old stores simply lack it) keeps serving
    classification sessions: until targets existed every import had a label column. Built
    here as the oldest stores were: before the ``patient_targets`` table too."""
    config = local_config(tmp_path, "hospital-a")
    engine = create_engine(config.data_url)
    oldest = [Base.metadata.tables[name] for name in ("patients", "dataset_meta")]
    Base.metadata.create_all(engine, tables=oldest)
    engine.dispose()
    store = PatientStore(config.data_url)
    records = [replace(r, target=None) for r in diabetes_records(np.random.default_rng(0))]
    store.add_records(records, feature_names=diabetes_feature_names())
    assert not inspect(store.engine).has_table(DatasetLabels.__tablename__)
    assert store.has_labels()
    assert store.describe().notes == ()
    proposal = proposal_of(MULTICLASS)
    training_payload(proposal, config, ledger_for(config, proposal))  # accepted
    # Opened by this version (the tables are created, empty): still labelled, until records
    # without labels arrive.
    store.create()
    assert store.has_labels()
    more = progression_csv(tmp_path / "more.csv", id_prefix="new-")
    import_csv(store, more, None, id_col="pid", target_col="progression")
    assert not store.has_labels()
    with pytest.raises(ValueError, match="imported without a label column"):
        training_payload(proposal_of(BASE), config, Ledger(config.ledger_url))


def test_the_released_regression_count_is_unbiased_although_its_histogram_is_clamped() -> None:
    # 88 test records whose residuals fill 3 of 20 cells: 17 cells are empty, and clamping
    # each noisy cell at 0 before summing added about 0.4 sigma per empty cell to n (at
    # eval_noise 1: n of 95-109 for 88 records, RMSE and MAE biased low by the same ratio).
    evaluation = RegressionEvaluation(20, 4.0, target_bound=200.0, residual_bound=300.0)
    rng = np.random.default_rng(5)
    residuals = rng.normal(0.0, 20.0, 88)
    sums = regression_sums(residuals, np.zeros(88), 20, 200.0, 300.0)
    scaled = sums / evaluation.scale()
    sigma = 1.0 * evaluation.sensitivity  # eval_noise 1
    counts, histograms = [], []
    for _ in range(4000):
        noisy = scaled + rng.normal(0.0, sigma, scaled.shape)
        noisy[list(evaluation.withheld())] = 0.0
        released = evaluation.from_release(noisy)
        counts.append(evaluation.agreed_metrics(released)["n"])
        histograms.append(released[5:])
    # Standard error of the mean: sqrt(20) * 2.24 / sqrt(4000) ~ 0.16 (rounding adds < 0.01).
    assert abs(np.mean(counts) - 88) < 0.8, np.mean(counts)
    assert np.min(histograms) >= 0.0  # what readers see is still a histogram


def _noisy_releases(
    evaluation: BinaryEvaluation | MulticlassEvaluation, sums: npt.NDArray[np.float64], draws: int
) -> list[dict[str, Any]]:
    """The agreed metrics of ``draws`` releases of ``sums`` at eval_noise 1."""
    rng = np.random.default_rng(11)
    scaled = sums / evaluation.scale()
    out = []
    for _ in range(draws):
        noisy = scaled + rng.normal(0.0, evaluation.sensitivity, scaled.shape)
        noisy[list(evaluation.withheld())] = 0.0
        out.append(evaluation.agreed_metrics(evaluation.from_release(noisy)))
    return out


def test_the_released_multiclass_count_and_accuracy_are_unbiased() -> None:
    # 88 test records, 3 classes, a good model: 4 of the 6 off-diagonal cells are empty.
    # Clamping each noisy cell before summing added about 0.4 sigma (sigma = sqrt 5) per
    # near-empty cell to n: about 94 for 88 records, and the accuracy 0.92 read about 0.86.
    evaluation = MulticlassEvaluation(10, 4.0, classes=3)
    logits = np.zeros((88, 3))
    labels = np.repeat([0, 1, 2], [30, 30, 28])
    predicted = labels.copy()
    predicted[:7] = 1  # 7 of class 0 taken for class 1: 81 of 88 correct
    logits[np.arange(88), predicted] = 3.0
    sums = multiclass_sums(logits, labels, 10, 4.0)
    assert sums[1 : 1 + 9].reshape(3, 3).tolist() == [[23, 7, 0], [0, 30, 0], [0, 0, 28]]
    metrics = _noisy_releases(evaluation, sums, 4000)
    # Standard errors: n sqrt(9) * 2.24 / sqrt(4000) ~ 0.11; accuracy well under 0.005.
    assert abs(np.mean([m["n"] for m in metrics]) - 88) < 0.6
    assert abs(np.mean([m["accuracy"] for m in metrics]) - 81 / 88) < 0.01
    shown = np.array([m["confusion_matrix"] for m in metrics])
    assert shown.min() >= 0.0  # what readers see is still a matrix of counts


def test_the_released_binary_count_and_accuracy_are_unbiased() -> None:
    # TP 40, FP 0, TN 45, FN 3: one empty cell (clamping it added about 0.7 to n).
    evaluation = BinaryEvaluation(10, 4.0)
    sums = np.zeros(evaluation.length())
    sums[:7] = [30.0, 85, 40, 0, 45, 3, 88]
    sums[7 + 9], sums[7 + 10] = 43, 45  # every positive in the top bin, negatives at the bottom
    metrics = _noisy_releases(evaluation, sums, 4000)
    assert abs(np.mean([m["n"] for m in metrics]) - 88) < 0.3
    assert abs(np.mean([m["accuracy"] for m in metrics]) - 85 / 88) < 0.005
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in metrics)


@pytest.mark.parametrize(
    "evaluation",
    [
        BinaryEvaluation(4, 4.0),
        MulticlassEvaluation(4, 4.0, classes=3),
        RegressionEvaluation(4, 4.0, target_bound=1.0, residual_bound=2.0),
    ],
    ids=lambda e: e.task.value,
)
def test_a_count_that_rounds_to_zero_gives_no_ratios(
    evaluation: BinaryEvaluation | MulticlassEvaluation | RegressionEvaluation,
) -> None:
    # A release whose cells sum to 0.3: it used to show n = 0 beside finite error figures.
    total = np.zeros(evaluation.length())
    counts = {"binary": slice(2, 6), "multiclass": slice(1, 10), "regression": slice(5, 9)}
    cells = counts[evaluation.task.value]
    total[cells] = 0.3 / (cells.stop - cells.start)
    total[0] = 0.05
    metrics = evaluation.agreed_metrics(evaluation.from_release(total))
    assert metrics["n"] == 0
    ratios = {k: v for k, v in metrics.items() if isinstance(v, float)}
    assert ratios == {}, ratios


def test_regression_metrics_stay_bounded_however_the_noise_falls() -> None:
    # Review of from_release (the count summed before clamping): whatever the noise (or a
    # participant's arbitrary contribution: there are no range proofs) makes of the summed
    # release, n is never negative, a count of 0 gives no error figures, and a tiny n cannot
    # blow up MAE or RMSE: their sums are clipped to n * r and n * r^2 first.
    evaluation = RegressionEvaluation(8, 4.0, target_bound=1.0, residual_bound=2.0)
    rng = np.random.default_rng(7)
    for scale in (1e-6, 0.1, 1.0, 100.0):
        for _ in range(500):
            statistics = evaluation.from_release(rng.normal(0.0, scale, evaluation.length()))
            n = float(statistics[4])
            metrics = evaluation.agreed_metrics(statistics)
            assert n >= 0.0
            if n == 0.0:
                assert metrics["mae"] is metrics["rmse"] is metrics["r2"] is None
            else:
                assert 0.0 <= metrics["mae"] <= 2.0 + 1e-9
                assert 0.0 <= metrics["rmse"] <= 2.0 + 1e-9
            assert all(c >= 0 for c in metrics["residual_histogram"]["counts"])
