"""Plotly figures drawn from the tables of :mod:`dashboard.data`.

Plain line and bar charts with a title, axis titles with units, and hover labels that give
the exact value. Colours are the Okabe–Ito palette, which stays distinguishable for the
common forms of colour blindness; lines also carry markers so they differ by more than hue.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from dashboard.data import (
    ERROR_METRICS,
    KNOWN_METRICS,
    NOT_AGREED,
    SCORE_METRICS,
    Cell,
    Table,
    calibration_points,
    roc_points,
)

__all__ = [
    "NOT_AGREED_COLOR",
    "PALETTE",
    "calibration_figure",
    "compare_figure",
    "confusion_figure",
    "contributors_figure",
    "duration_figure",
    "error_figure",
    "loss_figure",
    "privacy_cumulative_figure",
    "privacy_round_figure",
    "quality_figure",
    "r2_figure",
    "residual_figure",
    "roc_figure",
]

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
# Hospitals with equal figures draw on top of each other: distinct marker shapes keep every
# one visible and tell them apart without colour.
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross")

# Points of records that failed the ledger check: grey crosses, never the metric's colour.
NOT_AGREED_COLOR = "#999999"

_SCORES = SCORE_METRICS
# A sequential scale from white to the palette's blue: ordered by lightness, so it reads the
# same with every colour vision (and in greyscale print).
_HEATMAP_SCALE = [[0.0, "#FFFFFF"], [1.0, PALETTE[0]]]
_LABELS = dict(KNOWN_METRICS)

# White background and light grid, spelled out: naming a template ("plotly_white") makes
# Plotly deep-copy the whole template into every figure, which was most of the time spent
# building a page (measured: 0.25 s of 0.36 s for 100 rounds).
_GRID = {"gridcolor": "#E5ECF6", "linecolor": "#444444", "zerolinecolor": "#C8D4E3"}
_STYLE: dict[str, Any] = {
    "template": "none",
    "paper_bgcolor": "#FFFFFF",
    "plot_bgcolor": "#FFFFFF",
}

BARS_UP_TO = 200
"""Per-round charts draw bars up to this many rounds, a stepped line beyond: a browser
draws a thousand bars several times slower than one line through the same values."""

# The x axis of charts of the model: which agreed model a value belongs to.
AFTER_ROUND = "Model after round k (k = rounds agreed)"


def _layout(
    title: str, y_title: str, rounds: Sequence[int], x_title: str = "Round"
) -> dict[str, Any]:
    # Whole-round ticks while they fit; beyond that let Plotly thin them out.
    xaxis: dict[str, Any] = {"title": {"text": x_title}, "tickformat": "d", **_GRID}
    if len(set(rounds)) <= 20:
        xaxis.update(tickmode="array", tickvals=sorted(set(rounds)))
    return {
        "title": {"text": title, "x": 0, "xanchor": "left"},
        "xaxis": xaxis,
        "yaxis": {"title": {"text": y_title}, **_GRID},
        **_STYLE,
        "font": {"size": 14},
        "margin": {"l": 70, "r": 20, "t": 60, "b": 60},
        "legend": {"orientation": "h", "y": -0.25, "x": 0},
        "hovermode": "x unified",
        # Keeps the user's zoom and hidden traces when a refresh redraws the figure.
        "uirevision": title,
    }


def _rounds(table: Table) -> list[int]:
    return [int(value) for value in table.column("round") if isinstance(value, int | float)]


MARKERS_SHOWN = 40
"""Markers drawn per line of a long series: each marker is an SVG element of its own, and
20 hospitals × 1,000 rounds of them took the browser seconds; a few dozen still tell the
lines apart by shape (the line and its hover labels keep every point)."""


def _series(values: Sequence[Any]) -> Any:
    """The values of one trace: a list, or beyond :data:`BARS_UP_TO` points a float array.

    Plotly checks a list element by element in Python and sends it as JSON text, while it
    sends an array as base64 bytes that the browser reads as they are: half the time of
    drawing a 1,000-round page went to checking lists. A missing value (None: a point not
    agreed, or no value) becomes NaN, which Plotly draws as a gap, as it does None.
    """
    if len(values) <= BARS_UP_TO:
        return list(values)
    if all(isinstance(v, int) for v in values):  # rounds: 4 bytes each, not 8
        return np.array(values, dtype=np.int32)
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def _line(
    x: Sequence[Any], y: Sequence[Any], name: str, index: int, fmt: str, shape: str = "linear"
) -> go.Scatter:
    # Each later trace gets a smaller marker, so equal values show as nested shapes.
    size = max(13 - 3 * index, 6)
    marker: dict[str, Any] = {"size": size, "symbol": SYMBOLS[index % len(SYMBOLS)]}
    if len(x) > BARS_UP_TO:
        marker["maxdisplayed"] = MARKERS_SHOWN
    return go.Scatter(
        x=_series(x),
        y=_series(y),
        name=name,
        mode="lines+markers",
        line={"color": PALETTE[index % len(PALETTE)], "width": 2.5, "shape": shape},
        marker=marker,
        connectgaps=False,
        hovertemplate=f"{name}: %{{y:{fmt}}}<extra></extra>",
    )


def _evaluated(metrics: Table) -> list[Mapping[str, Cell]]:
    return [row for row in metrics.rows if row.get("after") is not None]


def _model_lines(
    figure: go.Figure, metrics: Table, keys: Sequence[str], fmt: str, first_index: int = 0
) -> None:
    """One line per metric over "model after round k", agreed points only, and the points
    of records that failed the ledger check as grey crosses in one legend entry of their
    own, so that no tampered value is drawn as agreed."""
    rows = _evaluated(metrics)
    x = [row.get("after") for row in rows]
    bad = [row.get("status") == NOT_AGREED for row in rows]
    for index, key in enumerate(keys, start=first_index):
        y = [None if b else row.get(key) for row, b in zip(rows, bad, strict=True)]
        figure.add_trace(_line(x, y, _LABELS.get(key, key), index, fmt))
    if any(bad):
        xs = [row.get("after") for row, b in zip(rows, bad, strict=True) if b for _ in keys]
        ys = [row.get(key) for row, b in zip(rows, bad, strict=True) if b for key in keys]
        names = [
            _LABELS.get(key, key) for row, b in zip(rows, bad, strict=True) if b for key in keys
        ]
        figure.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                text=names,
                name="Not agreed: ledger check failed",
                mode="markers",
                marker={
                    "color": NOT_AGREED_COLOR,
                    "symbol": "x-thin-open",
                    "size": 12,
                    "line": {"width": 2, "color": NOT_AGREED_COLOR},
                },
                hovertemplate="%{text}: %{y:" + fmt + "} (NOT agreed)<extra></extra>",
            )
        )


def quality_figure(metrics: Table) -> go.Figure | None:
    """Accuracy, AUC, sensitivity and specificity of each agreed model on a 0–1 scale (None
    if the records have none of them)."""
    keys = [key for key in _SCORES if key in metrics.column_keys()]
    rows = _evaluated(metrics)
    if not keys or not rows:
        return None
    after = [int(row.get("after") or 0) for row in rows]
    figure = go.Figure(layout=_layout("Global model quality", "Score (0–1)", after, AFTER_ROUND))
    _model_lines(figure, metrics, keys, ".4f")
    figure.update_yaxes(range=[0, 1.02])
    return figure


def loss_figure(metrics: Table) -> go.Figure | None:
    """The global loss of each agreed model (None if the records carry no loss)."""
    rows = _evaluated(metrics)
    if "loss" not in metrics.column_keys() or not rows:
        return None
    after = [int(row.get("after") or 0) for row in rows]
    figure = go.Figure(
        layout=_layout("Global loss", "Loss (cross-entropy, lower is better)", after, AFTER_ROUND)
    )
    _model_lines(figure, metrics, ["loss"], ".4f", first_index=1)
    return figure


def error_figure(metrics: Table) -> go.Figure | None:
    """RMSE and MAE of each agreed regression model, in the target's unit (None if the
    records carry neither)."""
    keys = [key for key in ERROR_METRICS if key in metrics.column_keys()]
    rows = _evaluated(metrics)
    if not keys or not rows:
        return None
    after = [int(row.get("after") or 0) for row in rows]
    figure = go.Figure(
        layout=_layout(
            "Global prediction error", "Error (target's unit, lower is better)", after, AFTER_ROUND
        )
    )
    _model_lines(figure, metrics, keys, ".4g")
    figure.update_yaxes(rangemode="tozero")
    return figure


def r2_figure(metrics: Table) -> go.Figure | None:
    """R² of each agreed regression model (None if the records carry none). 1 is perfect,
    0 is no better than predicting the mean; it can be negative."""
    rows = _evaluated(metrics)
    if "r2" not in metrics.column_keys() or not rows:
        return None
    after = [int(row.get("after") or 0) for row in rows]
    figure = go.Figure(
        layout=_layout(
            "Variance explained", "R² (1 is perfect, higher is better)", after, AFTER_ROUND
        )
    )
    _model_lines(figure, metrics, ["r2"], ".4f", first_index=2)
    return figure


def confusion_figure(
    matrix: Sequence[Sequence[float]], label: str, agreed: bool = True
) -> go.Figure:
    """The agreed confusion matrix of one multi-class evaluation as a heatmap, each cell
    labelled with its (released, noisy) count; grey when it failed the ledger check."""
    k = len(matrix)
    classes = [str(c) for c in range(k)]
    counts = [[float(c) for c in row] for row in matrix]
    scale = _HEATMAP_SCALE if agreed else [[0.0, "#FFFFFF"], [1.0, NOT_AGREED_COLOR]]
    title = f"Confusion matrix, {label}" + ("" if agreed else " (NOT agreed)")
    figure = go.Figure(
        data=go.Heatmap(
            z=counts,
            x=classes,
            y=classes,
            colorscale=scale,
            zmin=0,
            text=[[f"{c:.0f}" for c in row] for row in counts],
            texttemplate="%{text}",
            textfont={"size": 14},
            colorbar={"title": {"text": "Patients"}},
            hovertemplate="true class %{y}, predicted %{x}: %{z:.1f}<extra></extra>",
        ),
        layout={
            "title": {"text": title, "x": 0, "xanchor": "left"},
            "xaxis": {"title": {"text": "Predicted class"}, "type": "category", "side": "bottom"},
            # True class 0 at the top, as confusion matrices are printed.
            "yaxis": {"title": {"text": "True class"}, "type": "category", "autorange": "reversed"},
            **_STYLE,
            "font": {"size": 14},
            "margin": {"l": 70, "r": 20, "t": 60, "b": 60},
            "uirevision": "confusion",
        },
    )
    return figure


def residual_figure(
    edges: Sequence[float], counts: Sequence[float], label: str, agreed: bool = True
) -> go.Figure:
    """The agreed histogram of residuals (prediction − target) of one regression evaluation;
    the outer bins also hold the residuals clipped to the session's public bound."""
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    widths = [b - a for a, b in itertools.pairwise(edges)]
    figure = go.Figure(
        layout={
            "title": {
                "text": f"Residuals, {label}" + ("" if agreed else " (NOT agreed)"),
                "x": 0,
                "xanchor": "left",
            },
            "xaxis": {"title": {"text": "Prediction − target (target's unit)"}, **_GRID},
            "yaxis": {"title": {"text": "Patients (released counts)"}, **_GRID},
            **_STYLE,
            "font": {"size": 14},
            "margin": {"l": 70, "r": 20, "t": 60, "b": 60},
            "bargap": 0.05,
            "uirevision": "residuals",
        }
    )
    figure.add_trace(
        go.Bar(
            x=centres,
            y=list(counts),
            width=widths,
            name=label,
            marker={"color": PALETTE[2] if agreed else NOT_AGREED_COLOR},
            hovertemplate="residual %{x:.3g}: %{y:.1f} patients<extra></extra>",
        )
    )
    return figure


def _unit_square(title: str, x_title: str, y_title: str) -> go.Figure:
    figure = go.Figure(
        layout={
            "title": {"text": title, "x": 0, "xanchor": "left"},
            "xaxis": {"title": {"text": x_title}, "range": [0, 1], **_GRID},
            "yaxis": {"title": {"text": y_title}, "range": [0, 1.02], **_GRID},
            **_STYLE,
            "font": {"size": 14},
            "margin": {"l": 70, "r": 20, "t": 60, "b": 60},
            "legend": {"orientation": "h", "y": -0.25, "x": 0},
            "uirevision": title,
        }
    )
    figure.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            name="Chance" if "ROC" in title else "Perfect calibration",
            line={"color": "#000000", "dash": "dot", "width": 1.5},
            hoverinfo="skip",
        )
    )
    return figure


def roc_figure(
    positive: Sequence[float], negative: Sequence[float], label: str, agreed: bool = True
) -> go.Figure | None:
    """The ROC curve of one evaluation from its agreed score histograms (None when a class
    has no example)."""
    points = roc_points(positive, negative)
    if not points:
        return None
    figure = _unit_square(
        f"ROC curve, {label}", "False positive rate (1 − specificity)", "True positive rate"
    )
    figure.add_trace(
        go.Scatter(
            x=[p[0] for p in points],
            y=[p[1] for p in points],
            mode="lines+markers",
            name=label if agreed else f"{label}: NOT agreed",
            line={"color": PALETTE[0] if agreed else NOT_AGREED_COLOR, "width": 2.5},
            hovertemplate="FPR %{x:.3f}, TPR %{y:.3f}<extra></extra>",
        )
    )
    return figure


def calibration_figure(
    positive: Sequence[float], negative: Sequence[float], label: str, agreed: bool = True
) -> go.Figure | None:
    """Observed fraction of positives per bin of predicted probability (None if empty)."""
    points = calibration_points(positive, negative)
    if not points:
        return None
    figure = _unit_square(
        f"Calibration, {label}", "Predicted probability (bin centre)", "Observed fraction positive"
    )
    figure.add_trace(
        go.Scatter(
            x=[p[0] for p in points],
            y=[p[1] for p in points],
            customdata=[p[2] for p in points],
            mode="lines+markers",
            name=label if agreed else f"{label}: NOT agreed",
            line={"color": PALETTE[1] if agreed else NOT_AGREED_COLOR, "width": 2.5},
            marker={"symbol": "square", "size": 9},
            hovertemplate="predicted %{x:.2f}: observed %{y:.3f} (%{customdata} examples)"
            "<extra></extra>",
        )
    )
    return figure


def _bars(x: Sequence[int], y: Sequence[Any], *, name: str, color: str, **kwargs: Any) -> Any:
    if len(x) <= BARS_UP_TO:
        return go.Bar(x=list(x), y=list(y), name=name, marker={"color": color}, **kwargs)
    return go.Scatter(
        x=_series(x),
        y=_series(y),
        name=name,
        mode="lines",
        line={"color": color, "width": 1.5, "shape": "hvh"},
        **kwargs,
    )


def contributors_figure(contributors: Table) -> go.Figure | None:
    """Hospitals contributing to each agreed round, against the session's participants
    (None without records naming their survivors)."""
    rows = [row for row in contributors.rows if row.get("contributors") is not None]
    if not rows:
        return None
    rounds = [int(row.get("round") or 0) for row in rows]
    figure = go.Figure(layout=_layout("Hospitals contributing per round", "Hospitals", rounds))
    figure.add_trace(
        _bars(
            rounds,
            [row.get("contributors") for row in rows],
            name="Contributing (survivors)",
            color=PALETTE[2],
            hovertemplate="%{y} hospitals contributed<extra></extra>",
        )
    )
    total = max(int(row.get("participants") or 0) for row in rows)
    figure.add_trace(
        go.Scatter(
            x=[min(rounds) - 0.5, max(rounds) + 0.5],
            y=[total, total],
            mode="lines",
            name=f"In the session ({total})",
            line={"color": "#000000", "dash": "dash", "width": 2},
            hoverinfo="skip",
        )
    )
    figure.update_yaxes(rangemode="tozero", dtick=1 if total <= 20 else None)
    return figure


def compare_figure(key: str, sessions: Sequence[tuple[str, Table]]) -> go.Figure | None:
    """One metric of several sessions over "model after round k" (None if none has it)."""
    present = [(name, table) for name, table in sessions if key in table.column_keys()]
    if not present:
        return None
    label = _LABELS.get(key, key)
    after = [int(r.get("after") or 0) for _, t in present for r in _evaluated(t)]
    figure = go.Figure(layout=_layout(f"{label}: sessions compared", label, after, AFTER_ROUND))
    for index, (name, table) in enumerate(present):
        rows = _evaluated(table)
        y = [None if row.get("status") == NOT_AGREED else row.get(key) for row in rows]
        figure.add_trace(_line([row.get("after") for row in rows], y, name, index, ".4f"))
    return figure


def _peers(privacy: Table) -> list[str]:
    return sorted({str(peer) for peer in privacy.column("peer")})


def _by_peer(privacy: Table) -> dict[str, list[Mapping[str, Cell]]]:
    """The rows of each hospital, hospitals in name order (one pass over the rows)."""
    groups: dict[str, list[Mapping[str, Cell]]] = {peer: [] for peer in _peers(privacy)}
    for row in privacy.rows:
        groups[str(row.get("peer"))].append(row)
    return groups


def privacy_round_figure(privacy: Table) -> go.Figure | None:
    """ε each hospital spent in each round, as grouped bars, or beyond :data:`BARS_UP_TO`
    rounds as one stepped line per hospital (None without records)."""
    if not privacy:
        return None
    rounds = _rounds(privacy)
    figure = go.Figure(layout=_layout("ε spent per round, by hospital", "ε (this round)", rounds))
    # 20 hospitals × 1,000 rounds are 20,000 bars: most of a reader's wait in the browser.
    stepped = len(set(rounds)) > BARS_UP_TO
    for index, (peer, rows) in enumerate(_by_peer(privacy).items()):
        x = [row.get("round") for row in rows]
        y = [row.get("epsilon") for row in rows]
        if stepped:
            figure.add_trace(_line(x, y, peer, index, ".3f", shape="hvh"))
            continue
        figure.add_trace(
            go.Bar(
                x=x,
                y=y,
                name=peer,
                marker={"color": PALETTE[index % len(PALETTE)]},
                hovertemplate=f"{peer}: ε %{{y:.3f}}<extra></extra>",
            )
        )
    figure.update_layout(barmode="group")
    figure.update_yaxes(rangemode="tozero")
    return figure


def privacy_cumulative_figure(privacy: Table) -> go.Figure | None:
    """Each hospital's running ε total in the session against its budget (None without
    records).

    Budgets are dashed lines: one black line when every hospital with a budget has the same
    one, else one per hospital in its colour.
    """
    if not privacy:
        return None
    rounds = _rounds(privacy)
    figure = go.Figure(
        layout=_layout("Cumulative ε against budget", "ε spent in session (total)", rounds)
    )
    # Half a round past each end, so that a budget line shows even after a single round.
    span = [min(rounds) - 0.5, max(rounds) + 0.5]
    budgets: dict[str, float] = {}
    for index, (peer, rows) in enumerate(_by_peer(privacy).items()):
        x = [row.get("round") for row in rows]
        figure.add_trace(_line(x, [row.get("cumulative") for row in rows], peer, index, ".3f"))
        budget = rows[-1].get("budget")
        if isinstance(budget, int | float):
            budgets[peer] = float(budget)
    shared = set(budgets.values())
    lines: list[tuple[str, float, str]] = (
        [("Budget", shared.pop(), "#000000")]
        if len(shared) == 1
        else [
            (f"{peer} budget", eps, PALETTE[index % len(PALETTE)])
            for index, peer in enumerate(_peers(privacy))
            if (eps := budgets.get(peer)) is not None
        ]
    )
    for name, eps, color in lines:
        figure.add_trace(
            go.Scatter(
                x=span,
                y=[eps, eps],
                name=f"{name} (ε = {eps:g})",
                mode="lines",
                line={"color": color, "dash": "dash", "width": 2},
                hovertemplate=f"{name}: ε {eps:g}<extra></extra>",
            )
        )
    figure.update_yaxes(rangemode="tozero")
    return figure


def duration_figure(participation: Table) -> go.Figure | None:
    """How long each round took, with its aggregator on hover (None if no round ended)."""
    rows = [row for row in participation.rows if row.get("duration_s") is not None]
    if not rows:
        return None
    rounds = [int(row.get("round") or 0) for row in rows]
    figure = go.Figure(layout=_layout("Round duration", "Duration (seconds)", rounds))
    figure.add_trace(
        _bars(
            rounds,
            [row.get("duration_s") for row in rows],
            name="Duration",
            color=PALETTE[0],
            customdata=[[row.get("aggregator") or "—", row.get("status") or ""] for row in rows],
            hovertemplate=(
                "%{y:.1f} s, aggregator %{customdata[0]} (%{customdata[1]})<extra></extra>"
            ),
        )
    )
    figure.update_layout(showlegend=False)
    return figure
