"""Plotly figures drawn from the tables of :mod:`dashboard.data`.

Plain line and bar charts with a title, axis titles with units, and hover labels that give
the exact value. Colours are the Okabe–Ito palette, which stays distinguishable for the
common forms of colour blindness; lines also carry markers so they differ by more than hue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from dashboard.data import KNOWN_METRICS, Table

__all__ = [
    "PALETTE",
    "duration_figure",
    "loss_figure",
    "other_metrics_figure",
    "privacy_cumulative_figure",
    "privacy_round_figure",
    "quality_figure",
]

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
# Hospitals with equal figures draw on top of each other: distinct marker shapes keep every
# one visible and tell them apart without colour.
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross")

_SCORES = ("accuracy", "auc", "sensitivity", "specificity")
_LABELS = dict(KNOWN_METRICS)


def _layout(title: str, y_title: str, rounds: Sequence[int]) -> dict[str, Any]:
    # Whole-round ticks while they fit; beyond that let Plotly thin them out.
    xaxis: dict[str, Any] = {"title": {"text": "Round"}, "tickformat": "d"}
    if len(set(rounds)) <= 20:
        xaxis.update(tickmode="array", tickvals=sorted(set(rounds)))
    return {
        "title": {"text": title, "x": 0, "xanchor": "left"},
        "xaxis": xaxis,
        "yaxis": {"title": {"text": y_title}},
        "template": "plotly_white",
        "font": {"size": 14},
        "margin": {"l": 70, "r": 20, "t": 60, "b": 60},
        "legend": {"orientation": "h", "y": -0.25, "x": 0},
        "hovermode": "x unified",
        # Keeps the user's zoom and hidden traces when a refresh redraws the figure.
        "uirevision": title,
    }


def _rounds(table: Table) -> list[int]:
    return [int(value) for value in table.column("round") if isinstance(value, int | float)]


def _line(x: Sequence[Any], y: Sequence[Any], name: str, index: int, fmt: str) -> go.Scatter:
    # Each later trace gets a smaller marker, so equal values show as nested shapes.
    size = max(13 - 3 * index, 6)
    return go.Scatter(
        x=list(x),
        y=list(y),
        name=name,
        mode="lines+markers",
        line={"color": PALETTE[index % len(PALETTE)], "width": 2.5},
        marker={"size": size, "symbol": SYMBOLS[index % len(SYMBOLS)]},
        connectgaps=False,
        hovertemplate=f"{name}: %{{y:{fmt}}}<extra></extra>",
    )


def quality_figure(metrics: Table) -> go.Figure | None:
    """Accuracy, AUC, sensitivity and specificity per round on a 0–1 scale (None if the
    records have none of them)."""
    keys = [key for key in _SCORES if key in metrics.column_keys()]
    if not keys:
        return None
    rounds = _rounds(metrics)
    figure = go.Figure(layout=_layout("Global model quality per round", "Score (0–1)", rounds))
    for index, key in enumerate(keys):
        figure.add_trace(_line(rounds, metrics.column(key), _LABELS[key], index, ".4f"))
    figure.update_yaxes(range=[0, 1.02])
    return figure


def loss_figure(metrics: Table) -> go.Figure | None:
    """The global loss per round (None if the records carry no loss)."""
    if "loss" not in metrics.column_keys():
        return None
    rounds = _rounds(metrics)
    figure = go.Figure(
        layout=_layout("Global loss per round", "Loss (cross-entropy, lower is better)", rounds)
    )
    figure.add_trace(_line(rounds, metrics.column("loss"), "Loss", 1, ".4f"))
    return figure


def other_metrics_figure(metrics: Table) -> go.Figure | None:
    """Every other numeric agreed figure per round (None if there is none)."""
    known = {key for key, _ in KNOWN_METRICS} | {"round"}
    columns = [c for c in metrics.columns if c.key not in known and c.kind == "float"]
    if not columns:
        return None
    rounds = _rounds(metrics)
    figure = go.Figure(layout=_layout("Other agreed figures per round", "Value", rounds))
    for index, column in enumerate(columns):
        figure.add_trace(_line(rounds, metrics.column(column.key), column.label, index, ".4g"))
    return figure


def _peers(privacy: Table) -> list[str]:
    return sorted({str(peer) for peer in privacy.column("peer")})


def privacy_round_figure(privacy: Table) -> go.Figure | None:
    """ε each hospital spent in each round, as grouped bars (None without records)."""
    if not privacy:
        return None
    rounds = _rounds(privacy)
    figure = go.Figure(layout=_layout("ε spent per round, by hospital", "ε (this round)", rounds))
    for index, peer in enumerate(_peers(privacy)):
        rows = [row for row in privacy.rows if row.get("peer") == peer]
        figure.add_trace(
            go.Bar(
                x=[row.get("round") for row in rows],
                y=[row.get("epsilon") for row in rows],
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
    for index, peer in enumerate(_peers(privacy)):
        rows = [row for row in privacy.rows if row.get("peer") == peer]
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
        go.Bar(
            x=rounds,
            y=[row.get("duration_s") for row in rows],
            customdata=[[row.get("aggregator") or "—", row.get("status") or ""] for row in rows],
            name="Duration",
            marker={"color": PALETTE[0]},
            hovertemplate=(
                "%{y:.1f} s, aggregator %{customdata[0]} (%{customdata[1]})<extra></extra>"
            ),
        )
    )
    figure.update_layout(showlegend=False)
    return figure
