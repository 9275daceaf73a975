"""The Dash app: a read-only page over one peer's ledger, refreshed while sessions run.

:func:`create_app` builds the app without starting a server, so tests can drive it with any
WSGI server (or call its callback directly). Everything is served from the app itself: Dash's
component scripts locally (``serve_locally=True``), no external stylesheet or script, and the
one stylesheet from ``dashboard/assets/``, so the page works on a hospital network with no
internet access.

A :class:`dcc.Interval` asks the server every ``interval_s`` seconds for the ledger's state;
the page is redrawn only when what it shows changed (a :class:`Snapshot` digest kept in the
browser), so a zoomed chart stays zoomed between rounds.

The headline, the ledger check and its banner are always shown; below them one part of the
page at a time (see :data:`VIEWS`) is sent and drawn, so that a page over 1,000 rounds of 20
hospitals loads in about a second instead of mounting every chart and table at once.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dash
import plotly.graph_objects as go
from dash import dcc, html
from dash.development.base_component import Component

from dashboard import figures
from dashboard.data import (
    BAD_ACCEPTANCE,
    NOT_AGREED,
    Column,
    Table,
    Verdict,
    acceptance_rows,
    banner,
    budgets_from_proposal,
    compare_table,
    confusion_matrix,
    confusion_note,
    contributors_table,
    default_session,
    dp_release_table,
    first_unagreed_round,
    format_time,
    headline_keys,
    headline_row,
    hospital_privacy_table,
    metrics_table,
    participation_table,
    privacy_table,
    residual_histogram,
    score_histogram,
    session_options,
    statistics_table,
    trust_table,
    verdict,
)
from dashboard.source import LedgerSource, Snapshot
from peer.ledger import Clock, LedgerError, system_clock
from secagg.crypto import Verifier

__all__ = ["ASSETS", "TITLE", "create_app", "render"]

logger = logging.getLogger("dashboard")

TITLE = "Consortium ledger"
ASSETS = Path(__file__).resolve().parent / "assets"

# Ids of the containers the refresh callback fills, in the order of its outputs.
_SECTIONS = (
    "banner",
    "session-facts",
    "summary",
    "metrics",
    "privacy",
    "participation",
    "trust",
    "stats",
    "compare-body",
)

# The parts of the page below the headline, one shown at a time (a keyboard-usable radio
# group): drawing every chart and table of a 1,000-round session at once took the browser
# seconds (plotly drawing, React mounting thousands of cells). The headline, the ledger check
# and its banner are always shown; each part is drawn when picked, from the page the server
# drew once for the ledger state.
VIEWS = (
    ("metrics", "Global model"),
    ("privacy", "Privacy"),
    ("participation", "Participation"),
    ("trust", "Trust"),
    ("stats", "Federated statistics"),
    ("compare", "Sessions side by side"),
)
DEFAULT_VIEW = "metrics"
_VIEWS_LABEL: dict[str, Any] = {"aria-label": "Part of the page shown"}
# The view each section of _SECTIONS belongs to (the others are always shown).
_VIEW_OF = {
    "metrics": "metrics",
    "privacy": "privacy",
    "participation": "participation",
    "trust": "trust",
    "stats": "stats",
    "compare-body": "compare",
}

MAX_ROWS = 60
"""Rows drawn per table that has no pager; the CSV export has them all."""

PAGE_ROWS = 25
"""Rows per page of a paged table (see :func:`_table`)."""

# The tables with a pager, by id: the name of their rows in :func:`export_table`.
_PAGED = {
    "metrics-table": "metrics",
    "privacy-table": "privacy",
    "participation-table": "participation",
    "trust-table": "signatures",
    "stats-table": "statistics",
}

# The tables offered as CSV, by the name in their URL.
EXPORTS = ("metrics", "privacy", "participation", "signatures", "statistics")

# Tone (CSS class) of each verdict status.
_TONES = {"verified": "good", "intact": "good", "problems": "bad", "error": "bad"}

# Warnings of the ledger check listed under Trust (their number is always shown).
_WARNINGS_LISTED = 25


# --------------------------------------------------------------------------- building blocks


def _body_rows(table: Table) -> list[html.Tr]:
    return [
        html.Tr(
            [html.Td(text, className=_css(c)) for c, text in zip(table.columns, cells, strict=True)]
        )
        for cells in table.formatted()
    ]


def _pager_status(start: int, end: int, total: int) -> str:
    return f"Rows {start + 1:,}–{end:,} of {total:,}"


def _table(table: Table, *, table_id: str, caption: str) -> html.Div:
    """An HTML table (real <table>/<th> markup, so screen readers can navigate it).

    A long table of the session (:data:`_PAGED`) shows its last :data:`PAGE_ROWS` rows with
    a pager under it: "Earlier rows" and "Later rows" are buttons (Tab, then Enter), and the
    server sends the rows asked for; a 1,000-round session with 20 hospitals has 20,000
    privacy rows, which would take seconds to mount at once. Other tables show their last
    :data:`MAX_ROWS` rows. Every row is also in the CSV export.
    """
    total = len(table.rows)
    paged = table_id in _PAGED and total > PAGE_ROWS
    if paged:
        caption = (
            f"{caption} — {total:,} rows, {PAGE_ROWS} at a time "
            "(every row: the CSV links under the session)"
        )
        table = Table(table.columns, table.rows[-PAGE_ROWS:])
    elif total > MAX_ROWS:
        caption = (
            f"{caption} — last {MAX_ROWS} of {total:,} rows "
            "(all rows: the CSV links under the session)"
        )
        table = Table(table.columns, table.rows[-MAX_ROWS:])
    head = html.Thead(
        html.Tr([html.Th(c.label, scope="col", className=_css(c)) for c in table.columns])
    )
    body_id: dict[str, Any] = {"id": {"type": "rows-body", "table": table_id}} if paged else {}
    body = html.Tbody(_body_rows(table), **body_id)
    aria: dict[str, Any] = {"aria-label": caption}
    # A focusable, labelled region: keyboard users can tab to a wide table and scroll it
    # with the arrow keys; screen readers announce it by its caption.
    wrap = html.Div(
        html.Table([html.Caption(caption), head, body], id=table_id, className="data"),
        className="table-wrap",
        tabIndex="0",
        role="region",
        **aria,
    )
    if not paged:
        return wrap
    live: dict[str, Any] = {"aria-live": "polite"}
    pager = html.Div(
        [
            html.Button("Earlier rows", id={"type": "rows-earlier", "table": table_id}),
            html.Span(
                _pager_status(total - PAGE_ROWS, total, total),
                id={"type": "rows-status", "table": table_id},
                **live,
            ),
            html.Button("Later rows", id={"type": "rows-later", "table": table_id}, disabled=True),
            dcc.Store(id={"type": "rows-end", "table": table_id}, data=total),
        ],
        className="pager",
    )
    return html.Div([wrap, pager])


def page_of_rows(
    snapshot: Snapshot,
    budgets: Mapping[str, float],
    table_id: str,
    end: int | None,
    step: int,
) -> tuple[list[html.Tr], str, int, bool, bool]:
    """The rows of a paged table after moving ``step`` rows from the page ending at row
    ``end`` (exclusive; None: the last page): its rows, the pager's text, the new end, and
    whether "Earlier rows" and "Later rows" are disabled."""
    table = export_table(snapshot, _PAGED[table_id], budgets)
    total = len(table.rows)
    current = total if end is None else end
    new_end = min(max(current + step, min(PAGE_ROWS, total)), total)
    start = max(new_end - PAGE_ROWS, 0)
    rows = _body_rows(Table(table.columns, table.rows[start:new_end]))
    return rows, _pager_status(start, new_end, total), new_end, start == 0, new_end >= total


def _css(column: Column) -> str | None:
    if column.kind in {"int", "float", "epsilon", "seconds", "bytes"}:
        return "num"
    return "time" if column.kind == "time" else None


def _graph(figure: Any, graph_id: str) -> dcc.Graph:
    return dcc.Graph(
        id=graph_id,
        figure=figure,
        config={"displaylogo": False, "responsive": True},
        className="chart",
    )


def _empty(text: str) -> html.P:
    return html.P(text, className="empty")


def _card(label: str, value: str, card_id: str, tone: str = "") -> html.Div:
    return html.Div(
        [html.Div(label, className="card-label"), html.Div(value, className="card-value")],
        id=card_id,
        className=f"card {tone}".strip(),
    )


# --------------------------------------------------------------------------- sections


def _session_facts(snapshot: Snapshot) -> list[Any]:
    session = snapshot.session
    if session is None:
        return [_empty("This ledger holds no session yet.")]
    facts: list[tuple[str, Any]] = [
        ("Status", session.status.value),
        ("Hospitals", ", ".join(session.participants)),
        ("Signatures required", f"{session.threshold} of {len(session.participants)}"),
        ("Rounds planned", str(session.rounds_planned)),
        ("Proposed by", session.proposer),
        ("Recorded", format_time(session.created_at)),
    ]
    if session.reason:
        facts.append(("Reason", session.reason))
    facts.append(("Acceptance of the proposal", _acceptance_summary(snapshot)))
    items: list[Any] = []
    for term, value in facts:
        items += [html.Dt(term), html.Dd(value)]
    session_path = quote(session.session_id, safe="")
    links: list[Any] = ["Download every row (CSV): "]
    for index, name in enumerate(EXPORTS):
        if index:
            links.append(", ")
        links.append(html.A(name, href=f"export/{session_path}/{name}.csv", download=""))
    return [html.Dl(items, className="facts"), html.P(links, className="exports")]


def _acceptance_summary(snapshot: Snapshot) -> html.Span:
    """One line on the participants' signed acceptances (the table is under Trust)."""
    counts: dict[str, list[str]] = {}
    for acceptance in snapshot.acceptances:
        counts.setdefault(acceptance.status.value, []).append(acceptance.peer)
    total = len(snapshot.acceptances)
    forged = counts.pop(BAD_ACCEPTANCE, [])
    parts = [f"{len(peers)} of {total}: {status}" for status, peers in counts.items()]
    if forged:
        # Named first: a signature that does not verify is what a reader must not miss.
        parts.insert(0, f"{len(forged)} of {total}: {BAD_ACCEPTANCE} ({', '.join(forged)})")
    text = "; ".join(parts) + " (details under Trust)" if parts else "none recorded"
    return html.Span(text, id="acceptance-summary", className="bad-text" if forged else None)


def _summary(snapshot: Snapshot, metrics: Table, check: Verdict) -> list[Any]:
    tone = _TONES.get(check.status, "neutral")
    # The verdict's sentence is always shown with the headline, whichever part is picked.
    verdict_line: list[Any] = [
        html.P(check.headline, id="verdict", className=f"verdict {tone}", role="status")
    ]
    if check.warnings:
        # Not failures (the records themselves passed), but never silent: the reader sees
        # what could not be re-checked; the list is under Trust.
        first = check.warnings[0]
        more = (
            f" (and {len(check.warnings) - 1} more, listed under Trust)"
            if len(check.warnings) > 1
            else ""
        )
        verdict_line.append(
            html.P(
                f"{len(check.warnings)} warning(s), not re-checkable: {first}{more}",
                id="check-warnings",
                className="verdict neutral",
            )
        )
    session = snapshot.session
    if session is None:
        return verdict_line
    cards = [
        _card(
            "Rounds agreed",
            f"{len(snapshot.records)} of {session.rounds_planned}",
            "card-rounds",
        )
    ]
    head = headline_row(metrics)
    if head is not None:
        # The final model once every planned round is agreed; until then the latest one.
        final = len(snapshot.records) >= session.rounds_planned and head is metrics.rows[-1]
        which = "final model" if final else "latest model"
        after = f"{which}, after round {head.get('after')}"
        agreed = head.get("status") != NOT_AGREED
        labels = {c.key: c.label for c in metrics.columns}
        for key in headline_keys(metrics):
            value = head.get(key)
            if isinstance(value, int | float):
                cards.append(
                    _card(
                        f"{labels[key]}, {after}",
                        f"{float(value):.4g}" if agreed else "NOT AGREED",
                        f"card-{key}",
                        "" if agreed else "bad",
                    )
                )
    if snapshot.records:
        latest = snapshot.records[-1]
        cards.append(
            _card(
                f"Signatures, round {latest.record.round}",
                f"{len(latest.signatures)} of {len(session.participants)}",
                "card-signatures",
            )
        )
    label = {
        "verified": "verified",
        "intact": "hashes verified",
        "problems": "FAILED",
        "error": "not checked",
        "unchecked": "not checked",
    }[check.status]
    cards.append(_card("Ledger check", label, "card-check", _TONES.get(check.status, "")))
    return [html.Div(cards, className="cards"), *verdict_line]


def _model_charts(snapshot: Snapshot, metrics: Table) -> list[Any]:
    """ROC curve and calibration of the latest evaluated model, from its agreed score
    histograms, or a sentence saying why they cannot be drawn."""
    head = headline_row(metrics)
    if head is None:
        return []
    stored = next((r for r in snapshot.records if r.record.round == head.get("round")), None)
    label = f"model after round {head.get('after')}"
    agreed = head.get("status") != NOT_AGREED
    # Multi-class and regression evaluations: the chart that fits the task.
    matrix = confusion_matrix(stored) if stored is not None else None
    if matrix is not None and stored is not None:
        return [
            _graph(figures.confusion_figure(matrix, label, agreed), "confusion-chart"),
            html.P(confusion_note(stored), id="confusion-note", className="note"),
        ]
    residuals = residual_histogram(stored) if stored is not None else None
    if residuals is not None:
        return [_graph(figures.residual_figure(*residuals, label, agreed), "residual-chart")]
    histogram = score_histogram(stored) if stored is not None else None
    if histogram is None:
        return [
            _empty(
                "ROC curve and calibration: the agreed records carry no score histograms "
                "(metric score_histogram), so they cannot be drawn; the AUC above is "
                "computed from the histograms before they are summarised."
            )
        ]
    parts = [
        _graph(figure, graph_id)
        for graph_id, figure in (
            ("roc-chart", figures.roc_figure(*histogram, label, agreed)),
            ("calibration-chart", figures.calibration_figure(*histogram, label, agreed)),
        )
        if figure is not None
    ]
    return [html.Div(parts, className="charts two")] if parts else []


def _metrics_section(snapshot: Snapshot, metrics: Table) -> list[Any]:
    if not metrics:
        return [_empty("No rounds agreed yet: the global metrics appear here after round 1.")]
    parts: list[Any] = [
        _graph(figure, graph_id)
        for graph_id, figure in (
            ("quality-chart", figures.quality_figure(metrics)),
            ("error-chart", figures.error_figure(metrics)),
            ("r2-chart", figures.r2_figure(metrics)),
            ("loss-chart", figures.loss_figure(metrics)),
        )
        if figure is not None
    ]
    notes: list[Any] = []
    if not any(column.kind == "float" for column in metrics.columns):
        notes.append(_empty("The agreed records carry no numeric metrics."))
    if "round_kind" in metrics.column_keys():
        notes.append(
            html.P(
                "A training round evaluates the model it starts from, so its figures belong "
                "to the model agreed after the previous round; the last round evaluates the "
                "final model. The model after round 1 is the untrained one (round 1 only "
                "agrees on the standardization).",
                className="note",
            )
        )
    return [
        html.Div(parts, className="charts two"),
        *_model_charts(snapshot, metrics),
        *notes,
        _table(
            metrics,
            table_id="metrics-table",
            caption="Agreed global metrics per round (signed by the hospitals)",
        ),
    ]


def _privacy_section(
    privacy: Table,
    budgets: Mapping[str, float],
    released: Table | None = None,
    hospital: Table | None = None,
) -> list[Any]:
    overall = (
        [
            _table(
                hospital,
                table_id="hospital-privacy-table",
                caption="This hospital's privacy over all its sessions: every release it "
                "charged (aborted attempts included), composed by the accountant, against "
                "its global budget",
            )
        ]
        if hospital
        else []
    )
    if not privacy:
        if overall:
            return overall

        return [_empty("No privacy spending recorded yet: it appears with the first round.")]
    note = (
        "Budgets: " + ", ".join(f"{peer} ε = {eps:g}" for peer, eps in sorted(budgets.items()))
        if budgets
        else "No budget known for this session (give --budget PEER=EPS, or put it in the "
        "proposal's privacy section)."
    )
    spent = any(value for value in privacy.column("epsilon"))
    if not spent:
        note += (
            " No differential privacy was spent in this session: every hospital's ε is 0 "
            "in every round (e.g. a plain secure sum, which adds no noise)."
        )
    charts = [
        _graph(figure, graph_id)
        for graph_id, figure in (
            ("privacy-round-chart", figures.privacy_round_figure(privacy)),
            ("privacy-cumulative-chart", figures.privacy_cumulative_figure(privacy)),
        )
        if figure is not None and spent
    ]
    return [
        *overall,
        html.P(note, className="note"),
        html.Div(charts, className="charts two"),
        _table(
            privacy,
            table_id="privacy-table",
            caption="Differential privacy spent per hospital and round (ε, signed in the record)",
        ),
        *(
            [
                _table(
                    released,
                    table_id="dp-release-table",
                    caption="Published numbers released under differential privacy "
                    "(noised at each hospital before they leave it). A hospital's total over "
                    "all its sessions, composed: `ceremony privacy --config hospital.toml`",
                )
            ]
            if released
            else []
        ),
    ]


def _participation_section(participation: Table, contributors: Table) -> list[Any]:
    if not participation:
        return [_empty("No round has started yet.")]
    charts = [
        _graph(figure, graph_id)
        for graph_id, figure in (
            ("contributors-chart", figures.contributors_figure(contributors)),
            ("duration-chart", figures.duration_figure(participation)),
        )
        if figure is not None
    ]
    return [
        html.Div(charts, className="charts two"),
        _table(
            participation,
            table_id="participation-table",
            caption="Rounds: participants, dropouts and aggregator (signed); "
            "timing and bytes as this peer saw them",
        ),
    ]


def _trust_section(trust: Table, check: Verdict, acceptances: Table) -> list[Any]:
    parts: list[Any] = []
    if check.details:
        parts.append(html.Ul([html.Li(detail) for detail in check.details], id="problems"))
    if check.warnings:
        # A ledger of rounds agreed before evidence was kept warns once per round: the
        # first ones are listed (``peer verify-ledger`` prints them all).
        shown = [html.Li(warning) for warning in check.warnings[:_WARNINGS_LISTED]]
        if len(check.warnings) > _WARNINGS_LISTED:
            shown.append(html.Li(f"… and {len(check.warnings) - _WARNINGS_LISTED} more"))
        parts.append(html.Ul(shown, id="warnings", className="neutral-text"))
    if trust:
        parts.append(
            _table(trust, table_id="trust-table", caption="Signatures of each agreed record")
        )
    if acceptances:
        parts.append(
            _table(
                acceptances,
                table_id="acceptance-table",
                caption="Each hospital's signed acceptance of the session's proposal (a "
                "commitment bound to the proposal, signed with its certificate key)",
            )
        )
    return parts


def _stats_section(stats: Table) -> list[Any]:
    if not stats:
        return [_empty("No federated statistics recorded for this session.")]
    return [
        _table(
            stats,
            table_id="stats-table",
            caption="Federated differentially private statistics (results as agreed)",
        )
    ]


def _banner(snapshot: Snapshot) -> list[Any]:
    session_id = snapshot.session.session_id if snapshot.session else None
    text = banner(snapshot.report, session_id, snapshot.records)
    if snapshot.check_error is not None:
        text = f"The ledger could not be checked: {snapshot.check_error}"
    if text is None:
        return []
    return [html.P(text, id="check-banner", className="banner bad", role="alert")]


def _compare_section(snapshot: Snapshot, other: Snapshot | None) -> list[Any]:
    if snapshot.session is None:
        return []
    if other is None or other.session is None:
        return [_empty("Pick a second session above to compare it with this one.")]
    name_a, name_b = snapshot.session.session_id, other.session.session_id
    tables = [
        (name, metrics_table(s.records, first_unagreed_round(s.report, name, s.records)))
        for name, s in ((name_a, snapshot), (name_b, other))
    ]
    charts = [
        _graph(figure, f"compare-{key}-chart")
        for key in ("accuracy", "auc", "loss")
        if (figure := figures.compare_figure(key, tables)) is not None
    ]
    return [
        html.Div(charts, className="charts two"),
        _table(
            compare_table(tables[0], tables[1]),
            table_id="compare-table",
            caption=f"Final (latest evaluated) model of {name_a} and {name_b}",
        ),
    ]


def render(
    snapshot: Snapshot,
    budgets: Mapping[str, float] | None = None,
    compare: Snapshot | None = None,
    view: str | None = None,
) -> list[list[Any] | None]:
    """The children of each section (see ``_SECTIONS``) for one snapshot.

    Args:
        budgets: ε budget per peer from the command line; they override the budgets read
            from the session proposal.
        compare: the snapshot of a second session to compare with, if one was picked.
        view: draw only the always-shown sections and those of this part of the page
            (:data:`VIEWS`); the others are None. None draws every section.
    """
    session = snapshot.session
    known: dict[str, float] = {}
    if session is not None:
        known = budgets_from_proposal(session.proposal, session.participants)
    known.update(budgets or {})
    first_bad = (
        first_unagreed_round(snapshot.report, session.session_id, snapshot.records)
        if session is not None
        else None
    )
    # The headline (always shown) needs the metrics table; the rest is built only for
    # the sections drawn.
    metrics = metrics_table(snapshot.records, first_bad)
    check = verdict(snapshot.report, error=snapshot.check_error)

    def privacy() -> list[Any]:
        return _privacy_section(
            privacy_table(snapshot.records, known),
            known,
            dp_release_table(snapshot.records),
            hospital_privacy_table(snapshot.charges, known),
        )

    def participation() -> list[Any]:
        if session is None:
            return _participation_section(Table(()), Table(()))
        return _participation_section(
            participation_table(session, snapshot.records, snapshot.attempts),
            contributors_table(session, snapshot.records),
        )

    def trust() -> list[Any]:
        table = (
            trust_table(session, snapshot.records, snapshot.report)
            if session is not None
            else Table(())
        )
        return _trust_section(table, check, acceptance_rows(snapshot.acceptances))

    builders: dict[str, Callable[[], list[Any]]] = {
        "banner": lambda: _banner(snapshot),
        "session-facts": lambda: _session_facts(snapshot),
        "summary": lambda: _summary(snapshot, metrics, check),
        "metrics": lambda: _metrics_section(snapshot, metrics),
        "privacy": privacy,
        "participation": participation,
        "trust": trust,
        "stats": lambda: _stats_section(statistics_table(snapshot.statistics)),
        "compare-body": lambda: _compare_section(snapshot, compare),
    }
    return [
        builders[name]() if view is None or _VIEW_OF.get(name, view) == view else None
        for name in _SECTIONS
    ]


# --------------------------------------------------------------------------- the app


def _section(
    title: str, section_id: str, intro: str, children: Any, hidden: bool, extra: Sequence[Any] = ()
) -> html.Section:
    """One part of the page (see :data:`VIEWS`), hidden unless it is the one picked."""
    return html.Section(
        [
            html.H2(title),
            html.P(intro, className="intro"),
            *extra,
            html.Div(children, id=section_id),
        ],
        id=f"{_VIEW_OF[section_id]}-panel",
        hidden=hidden,
    )


# The page's own outputs after the sections: the panels' hidden flags, then these.
_TAIL = ("error", "updated", "digest")


def _blank() -> list[Any]:
    return [[], None, [], *([None] * len(_SECTIONS)), *[v != DEFAULT_VIEW for v, _ in VIEWS]] + [
        None
    ] * len(_TAIL)


def _layout(source_url: str, interval_s: float, page: Sequence[Any] | None = None) -> html.Div:
    """The page, with the content of ``page`` (a :func:`_refresh` answer) already in place.

    Serving the drawn page in the layout saves the browser a round trip (layout, then the
    refresh callback, then the charts' script); the refresh callback runs at the ticks, when
    a session or another part of the page is picked, not at load.
    """
    blank = _blank()
    if page is None:
        page = blank  # the static layout Dash checks callback ids against
    # The ledger could not be read: the error and the time, nothing else (the next tick
    # tries again).
    page = [b if part is dash.no_update else part for part, b in zip(page, blank, strict=True)]
    options, value, others, *rest = page
    sections = dict(zip(_SECTIONS, rest, strict=False))
    hidden = dict(zip((v for v, _ in VIEWS), rest[len(_SECTIONS) :], strict=False))
    error, updated, digest = rest[len(_SECTIONS) + len(VIEWS) :]
    intros = {
        "metrics": "What the hospitals agreed on after each round, computed under secure "
        "aggregation: no hospital's own figures are visible to the others.",
        "privacy": "Differential privacy (ε) each hospital spent on its patients' data. "
        "Lower ε means stronger privacy; totals must stay within the budget.",
        "participation": "Which hospitals contributed to each round, who dropped out, and "
        "which peer relayed the masked updates (the aggregator, trusted for nothing).",
        "trust": "Every agreed record is signed by the hospitals and chained to the "
        "previous one, so a changed or deleted round is detected. Each hospital also signed "
        "its acceptance of the session's proposal before the session ran.",
        "stats": "Cohort counts, histograms and means computed with differential privacy "
        "and summed securely.",
        "compare-body": "Compare the session shown above with another one (e.g. two privacy "
        "budgets or two model architectures).",
    }
    titles = dict(VIEWS)
    compare_picker = [
        html.Label("Compare with", htmlFor="compare", className="session-label"),
        dcc.Dropdown(id="compare", options=others, clearable=True, searchable=False),
    ]
    panels = [
        _section(
            titles[_VIEW_OF[name]],
            name,
            intros[name],
            sections[name],
            bool(hidden[_VIEW_OF[name]]),
            compare_picker if name == "compare-body" else (),
        )
        for name in _SECTIONS
        if name in _VIEW_OF
    ]
    return html.Div(
        [
            html.Header(
                [
                    html.H1(TITLE),
                    html.P(
                        f"Ledger {source_url} — read-only, refreshed every {interval_s:g} s",
                        id="source",
                    ),
                    html.P(updated, id="updated"),
                ]
            ),
            html.Div(error, id="error", role="alert"),
            html.Div(sections["banner"], id="banner"),
            html.Section(
                [
                    html.Label("Session", htmlFor="session", className="session-label"),
                    dcc.Dropdown(
                        id="session",
                        options=options,
                        value=value,
                        clearable=False,
                        searchable=False,
                    ),
                    html.Div(sections["session-facts"], id="session-facts"),
                ],
                className="session-bar",
            ),
            html.Div(sections["summary"], id="summary"),
            html.Main(
                [
                    # Native radio buttons: Tab reaches the group, the arrow keys pick a
                    # part (dcc.Tabs draws <div>s that a keyboard cannot reach).
                    html.Div(
                        dcc.RadioItems(
                            id="view",
                            options=[{"label": label, "value": v} for v, label in VIEWS],
                            value=DEFAULT_VIEW,
                            inline=True,
                            className="views",
                        ),
                        role="radiogroup",
                        **_VIEWS_LABEL,
                    ),
                    *panels,
                ]
            ),
            dcc.Interval(id="tick", interval=int(interval_s * 1000), n_intervals=0),
            dcc.Store(id="digest", data=digest),
        ],
        className="page",
    )


def create_app(
    ledger_url: str,
    *,
    verifiers: Mapping[str, Verifier] | None = None,
    interval_s: float = 5.0,
    budgets: Mapping[str, float] | None = None,
    clock: Clock = system_clock,
    warm_up: threading.Event | None = None,
) -> dash.Dash:
    """Build the dashboard over the ledger at ``ledger_url`` (opened read-only).

    Args:
        ledger_url: a SQLAlchemy URL or a SQLite file path (see
            :func:`dashboard.source.read_only_url`).
        verifiers: roster keys by peer id; when given the whole ledger is verified (once per
            new record) and the verdict shown, otherwise the page says signatures were not
            checked.
        interval_s: seconds between refreshes.
        budgets: ε budget per peer, overriding any found in the session proposal.
        clock: the time shown as "last checked".
        warm_up: when given, the ledger is read and checked, and the first page drawn, in
            the background from now on, and the event is set once that is done (or failed:
            the page then says why). Checking a long ledger with the roster takes seconds
            (20,000 signatures: about 4 s here); done at start, the first reader does not
            wait for it.

    Raises:
        LedgerSourceError: the URL cannot be opened read-only (malformed, in-memory, or a
            SQLite file that does not exist).
        ValueError: ``interval_s`` is not positive.
    """
    if not interval_s > 0:
        raise ValueError(f"the refresh interval must be positive, not {interval_s}")
    source = LedgerSource(ledger_url, verifiers=verifiers)
    app = dash.Dash(
        __name__,
        title=TITLE,
        # An empty title disables Dash's "Updating..." tab title on every refresh.
        update_title="",
        assets_folder=str(ASSETS),
        serve_locally=True,
        external_stylesheets=[],
        external_scripts=[],
        meta_tags=[{"name": "viewport", "content": "width=device-width, initial-scale=1"}],
    )
    known = dict(budgets or {})
    cache = PageCache()
    # Plotly's script is otherwise fetched only once the first chart is mounted, after the
    # layout arrived; deferred, it loads and compiles while the server answers.
    app.config.external_scripts.append({"src": _plotly_script_url(app), "defer": "defer"})
    _register_vendor(app)
    # Dash checks callback ids against a static layout, so it need not draw a page for it.
    app.validation_layout = _layout(source.url, interval_s)  # type: ignore[assignment]
    prefetch = Prefetch(lambda: _refresh(source, known, clock, None, None, None, cache))

    def read_while_the_scripts_load() -> None:
        from flask import request

        if request.method == "GET" and request.path == app.config.routes_pathname_prefix:
            prefetch.start()

    app.server.before_request(read_while_the_scripts_load)

    app.layout = lambda: _layout(source.url, interval_s, prefetch.take())
    _register(app, source, known, clock, cache)
    if warm_up is not None:
        threading.Thread(
            target=_warm_up,
            args=(lambda: _refresh(source, known, clock, None, None, None, cache), warm_up),
            name="dashboard-warm-up",
            daemon=True,
        ).start()
    return app


def _warm_up(first_page: Callable[[], list[Any]], done: threading.Event) -> None:
    """Read, check and draw the first page before anyone asks (signatures found genuine are
    remembered, the page is kept in the page cache); then set ``done``."""
    started = time.monotonic()
    try:
        first_page()
    except Exception:  # the page shows the problem when asked; the server keeps running
        logger.exception("dashboard: the first read of the ledger failed")
    else:
        logger.info(
            "dashboard: ledger read and checked, first page drawn in %.1f s",
            time.monotonic() - started,
        )
    finally:
        done.set()


class Prefetch:
    """The page's read of the ledger, started when a browser asks for the page's HTML and
    taken by the layout request that follows.

    Between the two the browser loads and runs Dash's scripts (about 0.2 s), and the server
    would sit idle; reading the ledger then (about 0.3 s for 1,000 rounds of 20
    hospitals) takes that read off the reader's wait. The layout request takes the read
    started at most ``max_age_s`` before (it cannot be older than the page request it
    follows by more than that); otherwise, or when none is waiting, it reads anew. At most
    one read is started at a time (a page request while one runs starts none), so asking
    for the page repeatedly costs no more reads than loading it. Whatever the page shows is
    checked again at the browser's next refresh.
    """

    def __init__(
        self,
        compute: Callable[[], list[Any]],
        max_age_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._compute = compute
        self._max_age_s = max_age_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._slot: tuple[float, Future[list[Any]]] | None = None

    def start(self) -> None:
        """Start a read in the background, unless one is running."""
        with self._lock:
            if self._slot is not None and not self._slot[1].done():
                return
            future: Future[list[Any]] = Future()
            self._slot = (self._monotonic(), future)

        def run() -> None:
            try:
                future.set_result(self._compute())
            except BaseException as exc:  # handed to the request that takes it
                future.set_exception(exc)

        threading.Thread(target=run, name="dashboard-prefetch", daemon=True).start()

    def take(self) -> list[Any]:
        """The page read started for this load, or a new read."""
        with self._lock:
            slot, self._slot = self._slot, None
        if slot is None or self._monotonic() - slot[0] > self._max_age_s:
            return self._compute()
        return slot[1].result()


VENDOR = Path(__file__).resolve().parent / "vendor"

# plotly.js's "cartesian" partial bundle (npm plotly.js-cartesian-dist-min, MIT, licence in
# vendor/): the bar, heatmap and scatter traces the charts use, 1.5 MB instead of the full
# 4.8 MB bundle, whose compiling took a third of a page load. It must be the plotly.js
# version plotly.py writes figures for; for any other, the full bundle is served.
PLOTLY_PARTIAL = "plotly-cartesian-4.1.1.min.js"
PLOTLY_PARTIAL_VERSION = "4.1.1"


def _register_vendor(app: dash.Dash) -> None:
    def vendor(name: str) -> Any:
        from flask import abort, send_from_directory

        if name != PLOTLY_PARTIAL:
            abort(404)
        # The file name carries the version: browsers may keep it for a year unasked.
        return send_from_directory(VENDOR, name, max_age=365 * 24 * 3600)

    app.server.add_url_rule("/_vendor/<name>", "vendor", vendor)


def _plotly_script_url(app: dash.Dash) -> str:
    """The URL of the plotly.js bundle for the charts: the partial bundle when it matches
    the installed plotly, else the full one that Dash serves, fingerprinted as Dash does
    its own scripts so that browsers keep it without asking again."""
    import plotly
    from dash.fingerprint import build_fingerprint
    from plotly.offline import get_plotlyjs_version

    prefix: str = app.config.requests_pathname_prefix
    if get_plotlyjs_version() == PLOTLY_PARTIAL_VERSION and (VENDOR / PLOTLY_PARTIAL).is_file():
        return f"{prefix}_vendor/{PLOTLY_PARTIAL}"

    bundle = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    path: str = build_fingerprint(  # type: ignore[no-untyped-call]
        "package_data/plotly.min.js", plotly.__version__, int(bundle.stat().st_mtime)
    )
    return f"{prefix}_dash-component-suites/plotly/{path}"


def export_table(snapshot: Snapshot, name: str, budgets: Mapping[str, float]) -> Table:
    """Every row of one of the page's tables (see :data:`EXPORTS`) for the snapshot's session.

    Raises:
        KeyError: ``name`` is not an exported table.
    """
    session = snapshot.session
    assert session is not None
    known = budgets_from_proposal(session.proposal, session.participants)
    known.update(budgets)
    first_bad = first_unagreed_round(snapshot.report, session.session_id, snapshot.records)
    builders: dict[str, Callable[[], Table]] = {
        "metrics": lambda: metrics_table(snapshot.records, first_bad),
        "privacy": lambda: privacy_table(snapshot.records, known),
        "participation": lambda: participation_table(session, snapshot.records, snapshot.attempts),
        "signatures": lambda: trust_table(session, snapshot.records, snapshot.report),
        "statistics": lambda: statistics_table(snapshot.statistics),
    }
    return builders[name]()


def _csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([column.label for column in table.columns])
    for row in table.rows:
        writer.writerow(["" if row.get(c.key) is None else row.get(c.key) for c in table.columns])
    return buffer.getvalue()


def _register_exports(app: dash.Dash, source: LedgerSource, budgets: dict[str, float]) -> None:
    def export(session_id: str, name: str) -> Any:
        from flask import Response, abort

        if name not in EXPORTS:
            abort(404)
        try:
            snapshot = source.snapshot(session_id)
        except LedgerError:
            abort(503)
        if snapshot.session is None:
            abort(404)
        filename = f"{session_id}-{name}.csv".replace('"', "")
        return Response(
            _csv(export_table(snapshot, name, budgets)),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    app.server.add_url_rule("/export/<session_id>/<name>.csv", "export", export)


def _register(
    app: dash.Dash,
    source: LedgerSource,
    budgets: dict[str, float],
    clock: Clock,
    cache: PageCache,
) -> None:
    _register_exports(app, source, budgets)
    outputs = [
        dash.Output("session", "options"),
        dash.Output("session", "value"),
        dash.Output("compare", "options"),
    ]
    outputs += [dash.Output(section, "children") for section in _SECTIONS]
    outputs += [dash.Output(f"{view}-panel", "hidden") for view, _ in VIEWS]
    outputs += [
        dash.Output("error", "children"),
        dash.Output("updated", "children"),
        dash.Output("digest", "data"),
    ]

    _register_pager(app, source, budgets)

    @app.callback(
        outputs,
        dash.Input("tick", "n_intervals"),
        dash.Input("session", "value"),
        dash.Input("compare", "value"),
        dash.Input("view", "value"),
        dash.State("digest", "data"),
        # The layout already holds the page of the ledger as it is: nothing to do at load
        # (a request, and the server's read of the whole ledger, saved for every reader).
        prevent_initial_call=True,
    )
    def refresh(
        _tick: int | None,
        selected: str | None,
        compared: str | None,
        view: str | None,
        shown: str | None,
    ) -> list[Any]:
        return _refresh(
            source, budgets, clock, selected, shown, compared, cache, view or DEFAULT_VIEW
        )


def _register_pager(app: dash.Dash, source: LedgerSource, budgets: dict[str, float]) -> None:
    def key(kind: str) -> dict[str, Any]:
        return {"type": kind, "table": dash.MATCH}

    @app.callback(
        dash.Output(key("rows-body"), "children"),
        dash.Output(key("rows-status"), "children"),
        dash.Output(key("rows-end"), "data"),
        dash.Output(key("rows-earlier"), "disabled"),
        dash.Output(key("rows-later"), "disabled"),
        dash.Input(key("rows-earlier"), "n_clicks"),
        dash.Input(key("rows-later"), "n_clicks"),
        dash.State(key("rows-end"), "data"),
        dash.State("session", "value"),
        # A table redrawn at a tick starts again at its last page: nothing to ask.
        prevent_initial_call=True,
    )
    def page(_earlier: int | None, _later: int | None, end: int | None, selected: str) -> Any:
        trigger = dash.ctx.triggered_id
        if not isinstance(trigger, Mapping) or trigger.get("table") not in _PAGED:
            raise dash.exceptions.PreventUpdate
        step = -PAGE_ROWS if trigger.get("type") == "rows-earlier" else PAGE_ROWS
        try:
            snapshot = source.snapshot(selected)
        except LedgerError:
            raise dash.exceptions.PreventUpdate from None  # the next tick shows the error
        if snapshot.session is None:
            raise dash.exceptions.PreventUpdate
        return list(page_of_rows(snapshot, budgets, str(trigger["table"]), end, step))


class PageCache:
    """The last few pages drawn, by snapshot digest and part of the page picked.

    Drawing a page of a long session takes seconds (thousands of chart points and table
    cells); every browser that opens the page, or switches back to a session, would pay it
    again. Equal digests draw the same page, so it is drawn once per ledger state and part,
    also when several browsers ask for a new state at the same moment (after a new round
    every open page's refresh does): the first draws, the others wait for its page.
    """

    def __init__(self, size: int = 24) -> None:
        self._size = size
        self._pages: dict[str, list[Any]] = {}
        self._drawing: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, draw: Callable[[], list[Any]]) -> list[Any]:
        """The page of ``digest``, drawn by ``draw`` if it is not kept."""
        with self._lock:
            page = self._pages.get(digest)
            if page is not None:
                return page
            drawing = self._drawing.setdefault(digest, threading.Lock())
        with drawing:
            with self._lock:
                page = self._pages.get(digest)
            if page is not None:
                return page  # drawn by the request this one waited for
            try:
                page = draw()
            finally:
                with self._lock:
                    self._drawing.pop(digest, None)
            with self._lock:
                self._pages[digest] = page
                while len(self._pages) > self._size:
                    del self._pages[next(iter(self._pages))]
        return page


def _plain(component: Any) -> Any:
    """``component`` with each chart's figure as plain dicts and lists, in place.

    Dash serialises a Plotly figure object through a deep copy at every request; a drawn
    page is sent many times (every browser, every session switch), so the copy is made once.
    """
    if isinstance(component, list):
        for part in component:
            _plain(part)
    elif isinstance(component, dcc.Graph):
        figure = getattr(component, "figure", None)
        if isinstance(figure, go.Figure):
            component.figure = figure.to_plotly_json()  # type: ignore[attr-defined]
    elif isinstance(component, Component):
        _plain(getattr(component, "children", None))
    return component


def _refresh(
    source: LedgerSource,
    budgets: Mapping[str, float],
    clock: Callable[[], datetime],
    selected: str | None,
    shown: str | None,
    compared: str | None = None,
    cache: PageCache | None = None,
    view: str = DEFAULT_VIEW,
) -> list[Any]:
    """The callback's answer: the session picker, each section (only those of ``view`` and
    the always-shown ones filled), the panels' hidden flags, the error, the time and the
    digest of what is shown (``dash.no_update`` where nothing changed since ``shown``)."""
    keep = dash.no_update
    unchanged = [keep] * (3 + len(_SECTIONS) + len(VIEWS))
    checked = f"Last checked {format_time(clock())}"
    try:
        if selected is None:
            # The first load: pick the session to show before reading it.
            selected = default_session(source.sessions())
        snapshot = source.snapshot(selected)
        if snapshot.session is None:
            chosen = default_session(snapshot.sessions)
            if chosen is not None:
                snapshot = source.snapshot(chosen)
        other = None
        if compared is not None and snapshot.session is not None:
            other = source.snapshot(compared)
            if other.session is None or other.session.session_id == snapshot.session.session_id:
                other = None
    except LedgerError as exc:
        problem = html.P(f"Cannot read the ledger: {exc}", className="verdict bad")
        return [*unchanged, problem, checked, keep]
    if view not in _VIEW_OF.values():
        view = DEFAULT_VIEW
    state = snapshot.digest() + (other.digest() if other is not None else "")
    # The browser keeps the digest of what it shows: the ledger state and the part picked.
    digest = f"{state}:{view}"
    if digest == shown:
        return [*unchanged, None, checked, keep]

    def draw() -> list[Any]:
        options: Sequence[dict[str, str]] = session_options(snapshot.sessions, snapshot.all_records)
        value = snapshot.session.session_id if snapshot.session else None
        others = [option for option in options if option["value"] != value]
        return [options, value, others, *_plain(render(snapshot, budgets, other, view))]

    # Only the picked part is drawn and sent: the first page after a new round draws the
    # headline and one part, not all six; each other part is drawn once per ledger state,
    # when first picked.
    page = cache.get(digest, draw) if cache is not None else draw()
    hidden = [name != view for name, _ in VIEWS]
    return [*page, *hidden, None, checked, digest]
