"""The charts that fit the task: a confusion matrix for multi-class sessions, residuals and
MAE/RMSE/R² over the rounds for regression; the headline shows the task's metrics. No
browser: the figures and the rendered page are checked as data."""

from __future__ import annotations

from typing import Any

from test_dashboard_data import session, stored

from dashboard import figures
from dashboard.app import render
from dashboard.data import (
    confusion_matrix,
    confusion_note,
    headline_keys,
    metrics_table,
    residual_histogram,
)
from dashboard.source import Snapshot
from peer.ledger import StoredRecord

CONFUSION = [[30.2, 4.0, 1.0], [5.0, 25.0, 6.4], [0.0, 3.0, 40.0]]
RESIDUALS = {"edges": [-30.0, -10.0, 10.0, 30.0], "counts": [12.0, 80.5, 9.0]}


def multiclass_records() -> tuple[StoredRecord, ...]:
    # Round 1 standardizes; rounds 2 and 3 evaluate the model entering them.
    return (
        stored(1, {"round_kind": "standardize"}),
        stored(2, {"round_kind": "train", "accuracy": 0.4, "macro_f1": 0.3, "auc_ovr": 0.5}),
        stored(
            3,
            {
                "round_kind": "evaluate",
                "accuracy": 0.81,
                "macro_f1": 0.78,
                "auc_ovr": 0.9,
                "loss": 0.6,
                "confusion_matrix": CONFUSION,
                "n": 112,  # the cells add up to 114.6: the noise clamped at 0 adds to them
            },
        ),
    )


def regression_records() -> tuple[StoredRecord, ...]:
    return (
        stored(1, {"round_kind": "standardize"}),
        stored(2, {"round_kind": "train", "mae": 150.0, "rmse": 170.0, "r2": -3.2}),
        stored(
            3,
            {
                "round_kind": "evaluate",
                "mae": 48.0,
                "rmse": 60.0,
                "r2": 0.41,
                "residual_histogram": RESIDUALS,
            },
        ),
    )


def page(records: tuple[StoredRecord, ...]) -> tuple[str, str]:
    snapshot = Snapshot((session(),), records, session(), records, (), (), None, None, (1, b""))
    out = render(snapshot)
    return str(out[2]), str(out[3])  # summary (headline cards), metrics section


def test_confusion_matrix_heatmap_from_the_agreed_record() -> None:
    records = multiclass_records()
    assert confusion_matrix(records[-1]) == CONFUSION
    assert confusion_matrix(records[1]) is None
    # A malformed matrix (not square, negative) is not drawn as if agreed.
    assert confusion_matrix(stored(3, {"confusion_matrix": [[1, 2], [3]]})) is None
    assert confusion_matrix(stored(3, {"confusion_matrix": [[1, -2], [3, 4]]})) is None
    figure = figures.confusion_figure(CONFUSION, "model after round 2")
    heatmap = figure.data[0]
    assert [list(row) for row in heatmap.z] == CONFUSION
    assert heatmap.text[0][0] == "30"
    assert figure.layout.xaxis.title.text == "Predicted class"
    assert figure.layout.yaxis.title.text == "True class"
    # Colour-blind-safe: a white-to-blue (Okabe–Ito blue) sequential scale.
    assert [c[1] for c in heatmap.colorscale] == ["#FFFFFF", figures.PALETTE[0]]
    # Without an n in the record, the note still says what the cells are.
    assert confusion_note(stored(3, {"confusion_matrix": CONFUSION})).endswith(
        "can add up to more than the number of patients evaluated."
    )
    grey = figures.confusion_figure(CONFUSION, "model after round 2", agreed=False)
    assert grey.data[0].colorscale[-1][1] == figures.NOT_AGREED_COLOR
    assert "NOT agreed" in grey.layout.title.text


def test_multiclass_page_shows_its_metrics_and_the_confusion_matrix() -> None:
    summary, metrics = page(multiclass_records())
    assert "confusion-chart" in metrics
    # A clinician adding up the cells is told why they exceed n.
    assert "confusion-note" in metrics
    assert "so the cells can add up to more than the n = 112 evaluated" in metrics
    assert "roc-chart" not in metrics
    assert "quality-chart" in metrics
    for card in ("card-accuracy", "card-macro_f1", "card-auc_ovr"):
        assert card in summary
    assert "card-loss" not in summary
    assert headline_keys(metrics_table(multiclass_records())) == [
        "accuracy",
        "macro_f1",
        "auc_ovr",
    ]
    quality = figures.quality_figure(metrics_table(multiclass_records()))
    assert quality is not None
    assert {trace.name for trace in quality.data} == {
        "Accuracy",
        "Macro-F1",
        "AUC (one-vs-rest, macro)",
    }
    # x axis: the model after round k (round 2 evaluates the model after round 1).
    assert list(quality.data[0].x) == [1, 2]
    assert quality.layout.xaxis.title.text == figures.AFTER_ROUND


def test_regression_residuals_and_error_curves() -> None:
    records = regression_records()
    assert residual_histogram(records[-1]) == (RESIDUALS["edges"], RESIDUALS["counts"])
    bad_edges: dict[str, Any] = {"edges": [0.0, -1.0, 2.0], "counts": [1.0, 2.0]}
    assert residual_histogram(stored(3, {"residual_histogram": bad_edges})) is None
    short: dict[str, Any] = {"edges": [0.0, 1.0], "counts": [1.0, 2.0]}
    assert residual_histogram(stored(3, {"residual_histogram": short})) is None
    table = metrics_table(records)
    errors = figures.error_figure(table)
    assert errors is not None
    assert [trace.name for trace in errors.data] == ["RMSE", "MAE"]
    assert list(errors.data[0].y) == [170.0, 60.0]
    assert list(errors.data[0].x) == [1, 2]
    assert errors.layout.xaxis.title.text == figures.AFTER_ROUND
    r2 = figures.r2_figure(table)
    assert r2 is not None
    assert list(r2.data[0].y) == [-3.2, 0.41]
    residuals = figures.residual_figure(RESIDUALS["edges"], RESIDUALS["counts"], "model")
    bars = residuals.data[0]
    assert list(bars.x) == [-20.0, 0.0, 20.0]
    assert list(bars.y) == RESIDUALS["counts"]
    assert bars.marker.color in figures.PALETTE
    # R² can be negative: it is not drawn on the 0–1 score chart.
    assert figures.quality_figure(table) is None


def test_regression_page_shows_its_metrics_and_charts() -> None:
    summary, metrics = page(regression_records())
    for chart in ("residual-chart", "error-chart", "r2-chart"):
        assert chart in metrics
    assert "confusion-chart" not in metrics
    assert "carry no score histograms" not in metrics
    for card in ("card-rmse", "card-mae", "card-r2"):
        assert card in summary
    assert "0.41" in summary


def test_binary_headline_is_unchanged() -> None:
    records = (stored(1, {"accuracy": 0.8, "auc": 0.85, "loss": 0.4}),)
    assert headline_keys(metrics_table(records)) == ["accuracy", "auc"]


def test_dp_release_table_names_the_task_metrics() -> None:
    from dashboard.data import dp_release_table

    dp: dict[str, Any] = {"evaluation": {"mechanism": "gaussian", "sigma": 5.0}}
    regression = stored(3, {"rmse": 50.0, "dp": dp})
    multiclass = stored(3, {"macro_f1": 0.5, "dp": dp})
    binary = stored(3, {"accuracy": 0.5, "dp": dp})
    assert "RMSE" in str(dp_release_table([regression]).rows[0]["published"])
    assert "macro-F1" in str(dp_release_table([multiclass]).rows[0]["published"])
    assert "AUC, loss" in str(dp_release_table([binary]).rows[0]["published"])
