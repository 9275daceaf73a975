"""``ceremony report``: a printable audit report of one session, from a peer's ledger.

::

    ceremony report --ledger /var/lib/peer/ledger.db --roster roster.json --ca ca.pem \\
        --session s1 --out report.pdf

For a privacy officer or an ethics board that must sign off a study: the federation and
each institution with its certificate fingerprint, the proposal (model, differential privacy
parameters, thresholds) and what the ledger shows of each site's acceptance, every round
(aggregator, dropouts, signatures), ε per hospital against its budget, the ledger check,
the agreed metrics with plots, and a plain-language statement of what the hospitals did and
did not learn about each other's patients.

The report is one self-contained HTML file (plots are inline SVG, no script, no external
file), readable in any browser and printable; ``--out *.pdf`` prints it to PDF with headless
Chromium. It reads the ledger read-only (:class:`dashboard.source.LedgerSource`) and shows
the same tables as the dashboard (:mod:`dashboard.data`), so the two never disagree.

Exit status: 0 when the report was written and the ledger check found nothing wrong, 1 when
it was written but the check failed (the report says where), 2 when it could not be made.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from peer.cli import EXIT_FAILED, EXIT_OK, UsageError

__all__ = [
    "ReportData",
    "add_parsers",
    "load_report_data",
    "render_report",
    "svg_bars",
    "svg_chart",
    "svg_heatmap",
]

# Okabe–Ito, as on the dashboard: distinguishable with the common colour blindnesses.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
_GREY = "#999999"
_PDF_TIMEOUT_S = 120


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Institution:
    """A member as the roster names it (or only its peer id, without a roster)."""

    peer_id: str
    institution: str | None
    role: str | None
    fingerprint: str | None


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything the report shows, read once.

    Attributes:
        snapshot: the session's records, attempts and the ledger check.
        ledger: the ledger's URL as it may be shown (password hidden).
        federation: the roster's federation name and version, or None without a roster.
        ca_fingerprint: the consortium CA's certificate fingerprint, or None.
        members: the roster's members (the session's participants without a roster).
        budgets: ε budget per peer (command line over proposal), possibly empty.
        generated_at: when the report was made.
        acceptances: each participant's signed acceptance of the proposal
            (:func:`peer.acceptances.check_acceptances`).
    """

    snapshot: Any  # dashboard.source.Snapshot; Any keeps the import lazy for `ceremony`.
    ledger: str
    federation: str | None
    ca_fingerprint: str | None
    members: tuple[Institution, ...]
    budgets: Mapping[str, float]
    generated_at: datetime
    acceptances: Any = None  # dashboard.data.Table (lazy import, as for snapshot)


def load_report_data(
    ledger_url: str,
    session_id: str,
    *,
    roster_path: str | None = None,
    ca_path: str | None = None,
    budgets: Mapping[str, float] | None = None,
    now: datetime | None = None,
) -> ReportData:
    """Read the session, check the whole ledger (with signatures when a roster is given).

    Raises:
        UsageError: the ledger, the roster or the session cannot be used.
    """
    from dashboard.data import acceptance_rows, budgets_from_proposal
    from dashboard.source import LedgerSource, LedgerSourceError
    from peer.identity import IdentityError, load_certificate, load_roster
    from peer.ledger import LedgerError

    roster = None
    if (roster_path is None) != (ca_path is None):
        raise UsageError("--roster and --ca go together: give both, or neither")
    if roster_path is not None and ca_path is not None:
        try:
            roster = load_roster(roster_path, load_certificate(ca_path))
        except FileNotFoundError as exc:
            raise UsageError(f"{exc.filename} does not exist") from None
        except (IdentityError, OSError, ValueError) as exc:
            raise UsageError(f"cannot use the roster: {exc}") from None
    try:
        source = LedgerSource(ledger_url, verifiers=roster.verifiers() if roster else None)
    except LedgerSourceError as exc:
        raise UsageError(f"cannot open the ledger: {exc}") from None
    try:
        # The snapshot's acceptances are checked with the roster keys (peer.acceptances).
        snapshot = source.snapshot(session_id)
    except LedgerError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    finally:
        source.close()
    if snapshot.session is None:
        known = ", ".join(s.session_id for s in snapshot.sessions) or "none"
        raise UsageError(f"no session {session_id!r} in the ledger (sessions: {known})")
    session = snapshot.session
    if roster is not None:
        members = tuple(
            Institution(e.peer_id, e.institution, e.role.value, e.cert_fingerprint_sha256)
            for e in roster.entries
        )
    else:
        members = tuple(Institution(p, None, None, None) for p in session.participants)
    known_budgets = budgets_from_proposal(session.proposal, session.participants)
    known_budgets.update(budgets or {})
    return ReportData(
        snapshot=snapshot,
        ledger=source.url,
        federation=f"{roster.federation} (roster version {roster.version})" if roster else None,
        ca_fingerprint=roster.ca_fingerprint if roster else None,
        members=members,
        budgets=known_budgets,
        generated_at=now or datetime.now(UTC),
        acceptances=acceptance_rows(snapshot.acceptances),
    )


# --------------------------------------------------------------------------- SVG charts


@dataclass(frozen=True, slots=True)
class Series:
    """One line of a chart: points with None for "no value" (the line breaks there)."""

    name: str
    x: Sequence[float]
    y: Sequence[float | None]
    color: str
    dashed: bool = False


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def svg_chart(
    title: str,
    x_title: str,
    y_title: str,
    series: Sequence[Series],
    *,
    y_range: tuple[float, float] | None = None,
    x_range: tuple[float, float] | None = None,
    integer_x: bool = True,
) -> str:
    """A line chart as inline SVG, with axes, ticks, a legend and a title: printable and
    readable without a browser script. Each series has its own colour *and* marker shape."""
    width, height = 640, 340
    left, right, top, bottom = 70, 20, 40, 90
    xs = [x for s in series for x in s.x]
    ys = [y for s in series for y in s.y if y is not None]
    if not xs or not ys:
        return ""
    x0, x1 = x_range or (min(xs), max(xs))
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0, y1 = y_range or (min(0.0, min(ys)), max(ys) * 1.05 or 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{esc(title)}" class="chart">',
        f'<text x="{left}" y="22" font-size="16" font-weight="600">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#888"/>',
    ]
    for y in _ticks(y0, y1):
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
            'stroke="#e5e5e5"/>'
            f'<text x="{left - 6}" y="{py(y) + 4:.1f}" font-size="12" text-anchor="end">'
            f"{y:.3g}</text>"
        )
    x_ticks = sorted(set(xs)) if integer_x and len(set(xs)) <= 15 else _ticks(x0, x1)
    for x in x_ticks:
        label = f"{x:.0f}" if integer_x else f"{x:.2g}"
        parts.append(
            f'<text x="{px(x):.1f}" y="{top + plot_h + 18}" font-size="12" '
            f'text-anchor="middle">{label}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 40}" font-size="13" '
        f'text-anchor="middle">{esc(x_title)}</text>'
        f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" font-size="13" '
        f'text-anchor="middle">{esc(y_title)}</text>'
    )
    shapes = ("circle", "square", "diamond", "triangle")
    for index, s in enumerate(series):
        segment: list[str] = []
        segments: list[list[str]] = []
        for x, value in zip(s.x, s.y, strict=True):
            if value is None:
                if segment:
                    segments.append(segment)
                segment = []
                continue
            segment.append(f"{px(x):.1f},{py(value):.1f}")
        if segment:
            segments.append(segment)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        for points in segments:
            parts.append(
                f'<polyline points="{" ".join(points)}" fill="none" stroke="{s.color}" '
                f'stroke-width="2.5"{dash}/>'
            )
        shape = shapes[index % len(shapes)]
        for x, value in zip(s.x, s.y, strict=True):
            if value is not None and not s.dashed:
                parts.append(_marker(shape, px(x), py(value), s.color))
        legend_x = left + (index % 3) * 190
        legend_y = top + plot_h + 60 + (index // 3) * 18
        parts.append(
            _marker(shape, legend_x, legend_y - 4, s.color)
            + f'<text x="{legend_x + 10}" y="{legend_y}" font-size="12">{esc(s.name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_heatmap(title: str, matrix: Sequence[Sequence[float]], color: str = PALETTE[0]) -> str:
    """A confusion matrix as inline SVG: rows = true class (0 at the top), columns =
    predicted; each cell's shade runs from white to ``color`` with its count written in it
    (lightness alone carries the value, so it reads with any colour vision and in grey)."""
    k = len(matrix)
    cell = min(60, 360 // max(k, 1))
    left, top = 110, 50
    width, height = left + k * cell + 30, top + k * cell + 60
    peak = max((v for row in matrix for v in row), default=0.0) or 1.0
    red, green, blue = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{esc(title)}" class="chart">',
        f'<text x="10" y="22" font-size="16" font-weight="600">{esc(title)}</text>',
    ]
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            share = max(0.0, min(1.0, value / peak))
            fill = "#" + "".join(
                f"{round(255 + (c - 255) * share):02x}" for c in (red, green, blue)
            )
            ink = "#ffffff" if share > 0.6 else "#1a1a1a"
            x, y = left + j * cell, top + i * cell
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" '
                f'stroke="#888"/><text x="{x + cell / 2}" y="{y + cell / 2 + 5}" '
                f'font-size="13" text-anchor="middle" fill="{ink}">{value:.0f}</text>'
            )
        parts.append(
            f'<text x="{left - 8}" y="{top + i * cell + cell / 2 + 5}" font-size="12" '
            f'text-anchor="end">{i}</text>'
        )
    for j in range(k):
        parts.append(
            f'<text x="{left + j * cell + cell / 2}" y="{top + k * cell + 18}" font-size="12" '
            f'text-anchor="middle">{j}</text>'
        )
    parts.append(
        f'<text x="{left + k * cell / 2}" y="{top + k * cell + 40}" font-size="13" '
        'text-anchor="middle">Predicted class</text>'
        f'<text transform="translate(60 {top + k * cell / 2}) rotate(-90)" font-size="13" '
        'text-anchor="middle">True class</text></svg>'
    )
    return "".join(parts)


def svg_bars(
    title: str,
    x_title: str,
    y_title: str,
    edges: Sequence[float],
    counts: Sequence[float],
    color: str = PALETTE[2],
) -> str:
    """A histogram (bins between ``edges``, one count each) as inline SVG."""
    width, height = 640, 320
    left, right, top, bottom = 70, 20, 40, 70
    if len(edges) != len(counts) + 1 or not counts:
        return ""
    x0, x1 = edges[0], edges[-1]
    y1 = max(max(counts), 1e-9) * 1.05
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - y / y1 * plot_h

    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{esc(title)}" class="chart">',
        f'<text x="{left}" y="22" font-size="16" font-weight="600">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#888"/>',
    ]
    for y in _ticks(0.0, y1):
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
            'stroke="#e5e5e5"/>'
            f'<text x="{left - 6}" y="{py(y) + 4:.1f}" font-size="12" text-anchor="end">'
            f"{y:.3g}</text>"
        )
    for x in _ticks(x0, x1):
        parts.append(
            f'<text x="{px(x):.1f}" y="{top + plot_h + 18}" font-size="12" '
            f'text-anchor="middle">{x:.3g}</text>'
        )
    for low, high, count in zip(edges, edges[1:], counts, strict=False):
        parts.append(
            f'<rect x="{px(low) + 0.5:.1f}" y="{py(count):.1f}" '
            f'width="{max(px(high) - px(low) - 1, 0.5):.1f}" '
            f'height="{top + plot_h - py(count):.1f}" fill="{color}"/>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{top + plot_h + 40}" font-size="13" '
        f'text-anchor="middle">{esc(x_title)}</text>'
        f'<text transform="translate(16 {top + plot_h / 2}) rotate(-90)" font-size="13" '
        f'text-anchor="middle">{esc(y_title)}</text></svg>'
    )
    return "".join(parts)


def _marker(shape: str, x: float, y: float, color: str) -> str:
    if shape == "square":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{color}"/>'
    if shape == "diamond":
        return (
            f'<polygon points="{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} '
            f'{x - 5:.1f},{y:.1f}" fill="{color}"/>'
        )
    if shape == "triangle":
        return (
            f'<polygon points="{x:.1f},{y - 5:.1f} {x + 5:.1f},{y + 4:.1f} '
            f'{x - 5:.1f},{y + 4:.1f}" fill="{color}"/>'
        )
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>'


# --------------------------------------------------------------------------- HTML


_CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; color: #1a1a1a; margin: 2rem auto;
       max-width: 52rem; line-height: 1.45; font-size: 11pt; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; border-bottom: 2px solid #d0d4d9; margin-top: 2rem;
     break-after: avoid; }
table { border-collapse: collapse; width: 100%; margin: 0.6rem 0; font-size: 10pt; }
th, td { border: 1px solid #d0d4d9; padding: 0.25rem 0.5rem; text-align: left;
         vertical-align: top; }
th { background: #f5f7f9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr { break-inside: avoid; }
.verdict { padding: 0.6rem 1rem; border: 2px solid; border-radius: 6px; font-weight: 700; }
.good { color: #0b6e2f; background: #e6f4ea; border-color: #0b6e2f; }
.bad { color: #a50e0e; background: #fce8e6; border-color: #a50e0e; }
.neutral { color: #6b4e00; background: #fff4d6; border-color: #c99a00; }
.muted { color: #555; }
.fingerprint { font-family: "DejaVu Sans Mono", monospace; font-size: 8pt;
               word-break: break-all; }
svg.chart { display: block; margin: 0.8rem 0; break-inside: avoid; max-width: 100%;
            height: auto; font-family: "DejaVu Sans", Arial, sans-serif; }
@page { size: A4; margin: 16mm; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], numeric: set[int]) -> str:
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dl(items: Sequence[tuple[str, object]]) -> str:
    return _table(("", ""), [(k, v) for k, v in items], set()).replace(
        '<thead><tr><th scope="col"></th><th scope="col"></th></tr></thead>', ""
    )


def _proposal(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _params(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} = {_params(v)}" for k, v in sorted(value.items())) or "none"
    if isinstance(value, list):
        return "[" + ", ".join(_params(v) for v in value) + "]"
    return str(value)


def _plain_statement(data: ReportData, eps_total: Mapping[str, float]) -> str:
    session = data.snapshot.session
    records = data.snapshot.records
    dp = any(eps > 0 for eps in eps_total.values())
    survivors = [
        len(r.record.metrics["survivors"])
        for r in records
        if isinstance(r.record.metrics.get("survivors"), list)
    ]
    fewest = min(survivors, default=len(session.participants))
    learned = [
        "the global model after every round and the agreed figures in this report, which are "
        "computed over all contributing hospitals' data together;",
        "which hospitals contributed to each round, and the total number of examples summed "
        "over them;",
    ]
    not_learned = [
        "no patient record left any hospital: each hospital trained and evaluated on its own "
        "data, and only sent a masked vector;",
        "no hospital, and not the aggregator of a round, saw another hospital's own model "
        "update, its own metrics or its own patient counts: secure aggregation reveals only "
        "the sum over the hospitals that contributed to the round.",
    ]
    if fewest <= 2:
        learned.append(
            f"in a round with only {fewest} contributing hospitals, each of them can work out "
            "the other's contribution from the sum and its own: such rounds protect patients "
            "only through differential privacy."
        )
    if dp:
        dp_text = (
            "The model updates were trained with differential privacy: the ε figures in this "
            "report bound what anyone, including the other hospitals and whoever receives the "
            "final model, can infer about any single patient from them (lower ε, stronger "
            "protection). The evaluation figures (accuracy, AUC, counts) are exact sums and "
            "are not covered by differential privacy."
        )
    else:
        dp_text = (
            "No differential privacy was spent in this session (ε = 0 for every hospital): "
            "the published sums are exact. They hide each hospital's own contribution among "
            "the others, but carry no formal bound on what they reveal about a patient."
        )
    return (
        "<p>In plain words: the hospitals of this session "
        f"({_e(', '.join(session.participants))}) learned</p><ul>"
        + "".join(f"<li>{_e(item)}</li>" for item in learned)
        + "</ul><p>and did not learn</p><ul>"
        + "".join(f"<li>{_e(item)}</li>" for item in not_learned)
        + f"</ul><p>{_e(dp_text)}</p>"
    )


def render_report(data: ReportData) -> str:
    """The report as one self-contained HTML document."""
    from dashboard.data import (
        NOT_AGREED,
        banner,
        first_unagreed_round,
        format_time,
        metrics_table,
        participation_table,
        privacy_table,
        score_histogram,
        trust_table,
        verdict,
    )

    snapshot = data.snapshot
    session = snapshot.session
    records = snapshot.records
    check = verdict(snapshot.report, error=snapshot.check_error)
    first_bad = first_unagreed_round(snapshot.report, session.session_id, records)
    metrics = metrics_table(records, first_bad)
    privacy = privacy_table(records, data.budgets)
    participation = participation_table(session, records, snapshot.attempts)
    trust = trust_table(session, records, snapshot.report)
    proposal = _proposal(session.proposal)
    payload = proposal.get("payload", {})
    tone = {"verified": "good", "intact": "neutral", "problems": "bad", "error": "bad"}
    out: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Audit report — session {_e(session.session_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Audit report — session {_e(session.session_id)}</h1>",
        f"<p class='muted'>Made {_e(format_time(data.generated_at))} from the ledger "
        f"{_e(data.ledger)}. Every figure below is read from the ledger's "
        "agreed records, which the hospitals signed, unless it says otherwise.</p>",
        f"<p class='verdict {tone.get(check.status, 'neutral')}' id='verdict'>"
        f"{_e(check.headline)}</p>",
    ]
    failed = banner(snapshot.report, session.session_id, records)
    if failed:
        out.append(f"<p class='verdict bad'>{_e(failed)}</p>")
    if check.details:
        out.append("<ul>" + "".join(f"<li>{_e(d)}</li>" for d in check.details) + "</ul>")

    # -- what the hospitals learned
    totals: dict[str, float] = {}
    for row in privacy.rows:
        totals[str(row.get("peer"))] = float(row.get("cumulative") or 0.0)
    out.append("<h2>What the hospitals learned, and what they did not</h2>")
    out.append(_plain_statement(data, totals))

    # -- federation
    out.append("<h2>Federation and institutions</h2>")
    if data.federation:
        out.append(
            _dl(
                [
                    ("Federation", data.federation),
                    ("Consortium CA certificate", data.ca_fingerprint),
                ]
            ).replace("<td>SHA256:", "<td class='fingerprint'>SHA256:")
        )
    else:
        out.append(
            "<p class='muted'>No roster was given (--roster and --ca): the institutions' "
            "names and certificate fingerprints cannot be shown, and the signatures below "
            "were counted but not verified.</p>"
        )
    signed_count = {
        m.peer_id: sum(1 for r in records if m.peer_id in r.signatures) for m in data.members
    }
    out.append(
        _table(
            (
                "Peer",
                "Institution",
                "Role",
                "Certificate fingerprint (SHA-256)",
                "In this session",
                "Signed agreed records",
            ),
            [
                (
                    m.peer_id,
                    m.institution or "—",
                    m.role or "—",
                    m.fingerprint or "— (no roster)",
                    "yes" if m.peer_id in session.participants else "no",
                    f"{signed_count[m.peer_id]} of {len(records)}",
                )
                for m in data.members
            ],
            {5},
        ).replace("<td>SHA256:", "<td class='fingerprint'>SHA256:")
    )

    # -- proposal
    out.append("<h2>Proposal and acceptance</h2>")
    out.append(
        _dl(
            [
                ("Proposed by", session.proposer),
                ("Recorded", format_time(session.created_at)),
                ("Hospitals", ", ".join(session.participants)),
                (
                    "Signatures required per round",
                    f"{session.threshold} of {len(session.participants)}",
                ),
                ("Rounds planned", session.rounds_planned),
                ("Task", payload.get("kind", "—") if isinstance(payload, dict) else "—"),
                ("Model and training parameters", _params(payload)),
                ("Differential privacy", _params(proposal.get("privacy", {}))),
                ("Proposal hash (SHA-256)", session.proposal_hash.hex()),
                (
                    "This peer's decision",
                    session.status.value + (f" ({session.reason})" if session.reason else ""),
                ),
            ]
        )
    )
    out.append(
        "<p>Acceptance: a hospital accepts a proposal by signing, with its certificate key, a "
        "commitment bound to this very proposal (the first step of the session beacon); "
        "the proposer hands every participant the whole set before the session runs, and "
        "each hospital checks and stores it. So this ledger holds every participant's own "
        "signed acceptance"
        + (
            ", verified below against the roster's keys.</p>"
            if data.federation
            else "; without a roster (--roster and --ca) the signatures are shown but not "
            "verified.</p>"
        )
    )
    if data.acceptances is not None:
        table = data.acceptances
        out.append(
            _table([c.label for c in table.columns], table.formatted(), set()).replace(
                "<td>signature does NOT verify", "<td class='bad'>signature does NOT verify"
            )
        )

    # -- rounds
    out.append("<h2>Rounds</h2>")
    signatures = {row.get("round"): row for row in trust.rows}
    out.append(
        _table(
            (
                "Round",
                "Status",
                "Aggregator",
                "Contributed",
                "Dropped out",
                "Signatures",
                "Signed by",
                "Check",
            ),
            [
                (
                    row.get("round"),
                    row.get("status") or "—",
                    row.get("aggregator") or "—",
                    row.get("survivors") or "—",
                    row.get("dropouts") or "—",
                    signatures.get(row.get("round"), {}).get("signatures", "—"),
                    signatures.get(row.get("round"), {}).get("signers", "—"),
                    signatures.get(row.get("round"), {}).get("check", "—"),
                )
                for row in participation.rows
            ],
            {0},
        )
    )

    # -- privacy
    out.append("<h2>Differential privacy spent (ε per hospital)</h2>")
    privacy_rows = []
    for peer in sorted({str(p) for p in privacy.column("peer")}):
        budget = data.budgets.get(peer)
        spent = totals.get(peer, 0.0)
        privacy_rows.append(
            (
                peer,
                f"{spent:.3f}",
                "—" if budget is None else f"{budget:.3f}",
                "—" if budget is None else f"{budget - spent:.3f}",
            )
        )
    out.append(
        _table(
            ("Hospital", "ε spent in this session", "ε budget", "ε remaining"),
            privacy_rows,
            {1, 2, 3},
        )
    )
    out.append(
        "<p class='muted'>ε as recorded in the session's signed records (the sum over its "
        "rounds); spending in other sessions of the same hospitals is not included.</p>"
    )
    if not data.budgets:
        out.append(
            "<p class='muted'>No budget is known for this session (none in the proposal's "
            "privacy section, none given with --budget).</p>"
        )

    # -- metrics
    out.append("<h2>Agreed metrics</h2>")
    out.append(_final_model(metrics, session.rounds_planned, len(records), NOT_AGREED))
    out.append(_metrics_html(metrics, NOT_AGREED))
    out.append(_task_charts(records, first_bad))
    head = next(
        (
            r
            for r in reversed(records)
            if score_histogram(r) is not None and (first_bad is None or r.record.round < first_bad)
        ),
        None,
    )
    if head is not None:
        histogram = score_histogram(head)
        assert histogram is not None
        out.append(_roc_svg(histogram, head))
    out.append("</body></html>")
    return "".join(out)


def _task_charts(records: Sequence[Any], first_bad: int | None) -> str:
    """The confusion matrix (multi-class) or residual histogram (regression) of the latest
    evaluation that passed the ledger check; empty for other sessions."""
    from dashboard.data import (
        confusion_matrix,
        confusion_note,
        evaluated_after,
        residual_histogram,
    )

    for stored in reversed(records):
        if first_bad is not None and stored.record.round >= first_bad:
            continue
        label = f"model after round {evaluated_after(stored)}"
        matrix = confusion_matrix(stored)
        if matrix is not None:
            note = html.escape(confusion_note(stored))
            heatmap = svg_heatmap(f"Confusion matrix, {label}", matrix)
            return f"{heatmap}<p class='muted'>{note}</p>"
        residuals = residual_histogram(stored)
        if residuals is not None:
            return svg_bars(
                f"Residuals, {label}",
                "Prediction − target (target's unit)",
                "Patients (released counts)",
                *residuals,
            ) + (
                "<p class='muted'>Residuals beyond the session's public bound are counted "
                "in the outer bins.</p>"
            )
    return ""


def _final_model(metrics: Any, planned: int, agreed: int, not_agreed: str) -> str:
    from dashboard.data import KNOWN_METRICS, headline_row

    head = headline_row(metrics)
    if head is None:
        return "<p>No model was evaluated in this session.</p>"
    which = "Final agreed model" if agreed >= planned else "Latest model (session not finished)"
    if head.get("status") == not_agreed:
        return (
            f"<p class='verdict bad'>{which}, after round {_e(head.get('after'))}: its "
            "evaluation failed the ledger check and is not reported as agreed.</p>"
        )
    figures = ", ".join(
        f"{label} {float(value):.4g}"
        for key, label in KNOWN_METRICS
        if isinstance(value := head.get(key), int | float)
    )
    return (
        f"<p id='final'><strong>{which}, after round {_e(head.get('after'))}:</strong> "
        f"{_e(figures)}. A training round evaluates the model it starts from, so each "
        "evaluation below is listed with the round after which its model was agreed.</p>"
    )


def _metrics_html(metrics: Any, not_agreed: str) -> str:
    from dashboard.data import ERROR_METRICS, KNOWN_METRICS, SCORE_METRICS, format_cell

    columns = metrics.columns
    rows = [[format_cell(row.get(c.key), c) for c in columns] for row in metrics.rows]
    numeric = {i for i, c in enumerate(columns) if c.kind in {"int", "float"}}
    parts = [_table([c.label for c in columns], rows, numeric)]
    evaluated = [r for r in metrics.rows if r.get("after") is not None]
    x = [float(r.get("after")) for r in evaluated]
    agreed = [r.get("status") != not_agreed for r in evaluated]
    scores = [
        Series(
            label,
            x,
            [r.get(key) if ok else None for r, ok in zip(evaluated, agreed, strict=True)],
            PALETTE[i],
        )
        for i, (key, label) in enumerate(
            (k, v) for k, v in KNOWN_METRICS if k in SCORE_METRICS and k in metrics.column_keys()
        )
    ]
    if scores and x:
        parts.append(
            svg_chart(
                "Global model quality",
                "Model after round k",
                "Score (0–1)",
                scores,
                y_range=(0.0, 1.0),
            )
        )
    labels = dict(KNOWN_METRICS)

    def series(key: str, color: str) -> Series:
        values = [r.get(key) if ok else None for r, ok in zip(evaluated, agreed, strict=True)]
        return Series(labels[key], x, values, color)

    errors = [
        series(key, PALETTE[i])
        for i, key in enumerate(ERROR_METRICS)
        if key in metrics.column_keys()
    ]
    if errors and x:
        parts.append(
            svg_chart(
                "Global prediction error",
                "Model after round k",
                "Error (target's unit, lower is better)",
                errors,
            )
        )
    if "r2" in metrics.column_keys() and x:
        parts.append(
            svg_chart(
                "Variance explained",
                "Model after round k",
                "R² (1 is perfect)",
                [series("r2", PALETTE[2])],
            )
        )
    if "loss" in metrics.column_keys() and x:
        loss = [r.get("loss") if ok else None for r, ok in zip(evaluated, agreed, strict=True)]
        parts.append(
            svg_chart(
                "Global loss",
                "Model after round k",
                "Loss (lower is better)",
                [Series("Loss", x, loss, PALETTE[1])],
            )
        )
    if not all(agreed):
        parts.append(
            "<p class='bad verdict'>Values of rounds that failed the ledger check are listed "
            "in the table as not agreed and left out of the charts.</p>"
        )
    return "".join(parts)


def _roc_svg(histogram: tuple[list[float], list[float]], stored: Any) -> str:
    from dashboard.data import calibration_points, evaluated_after, roc_points

    label = f"model after round {evaluated_after(stored)}"
    roc = roc_points(*histogram)
    calibration = calibration_points(*histogram)
    parts = []
    if roc:
        parts.append(
            svg_chart(
                f"ROC curve, {label}",
                "False positive rate",
                "True positive rate",
                [
                    Series(label, [p[0] for p in roc], [p[1] for p in roc], PALETTE[0]),
                    Series("Chance", [0.0, 1.0], [0.0, 1.0], "#000000", dashed=True),
                ],
                y_range=(0.0, 1.0),
                x_range=(0.0, 1.0),
                integer_x=False,
            )
        )
    if calibration:
        parts.append(
            svg_chart(
                f"Calibration, {label}",
                "Predicted probability",
                "Observed fraction positive",
                [
                    Series(
                        label,
                        [p[0] for p in calibration],
                        [p[1] for p in calibration],
                        PALETTE[1],
                    ),
                    Series("Perfect calibration", [0.0, 1.0], [0.0, 1.0], "#000000", True),
                ],
                y_range=(0.0, 1.0),
                x_range=(0.0, 1.0),
                integer_x=False,
            )
        )
    return "".join(parts)


# --------------------------------------------------------------------------- PDF


def chromium_binary() -> str | None:
    """The headless browser used to print PDFs, if one is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def print_pdf(html_path: Path, pdf_path: Path) -> None:
    """Print ``html_path`` to ``pdf_path`` with headless Chromium.

    Raises:
        UsageError: no Chromium, or it did not produce the PDF (its stderr says why).
    """
    browser = chromium_binary()
    if browser is None:
        raise UsageError(
            "a PDF needs Chromium (apt-get install chromium); write --out report.html instead"
        )
    with tempfile.TemporaryDirectory(prefix="ceremony-report-") as profile:
        result = subprocess.run(  # noqa: S603 -- a fixed argv; the paths are ours
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                f"--user-data-dir={profile}",
                "--no-pdf-header-footer",
                f"--print-to-pdf={pdf_path}",
                html_path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=_PDF_TIMEOUT_S,
            check=False,
        )
    if not pdf_path.is_file() or pdf_path.stat().st_size == 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"Chromium did not print {pdf_path}: {detail[0]}")


# --------------------------------------------------------------------------- command


def _budget(text: str) -> tuple[str, float]:
    # Imported when used: the dashboard module pulls in Dash, which other commands skip.
    from dashboard.__main__ import parse_budget

    return parse_budget(text)


def _add_report(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="a printable audit report of one session (HTML or PDF)",
        description=(
            "Write an audit report of one session from a peer's ledger: federation and "
            "certificates, proposal, rounds, privacy spent, the ledger check and the agreed "
            "metrics. Exit 0 when the ledger check passed, 1 when it failed (the report "
            "says where), 2 when no report could be made."
        ),
    )
    parser.add_argument(
        "--ledger", required=True, metavar="URL", help="the peer's ledger (URL or SQLite path)"
    )
    parser.add_argument("--session", required=True, metavar="ID", help="the session to report")
    parser.add_argument("--out", required=True, type=Path, metavar="report.html|report.pdf")
    parser.add_argument("--roster", metavar="PATH", help="signed roster, to verify signatures")
    parser.add_argument("--ca", metavar="PATH", help="consortium CA certificate for --roster")
    parser.add_argument(
        "--budget",
        type=_budget,
        action="append",
        default=[],
        metavar="PEER=EPS",
        help="ε budget of a hospital (repeatable); overrides the proposal's",
    )
    parser.set_defaults(handler=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    out: Path = args.out
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".pdf"):
        raise UsageError(f"--out must end in .html or .pdf, not {out.name!r}")
    if not out.parent.is_dir():
        raise UsageError(f"the directory of --out does not exist: {out.parent}")
    data = load_report_data(
        args.ledger,
        args.session,
        roster_path=args.roster,
        ca_path=args.ca,
        budgets=dict(args.budget),
    )
    document = render_report(data)
    if suffix == ".pdf":
        with tempfile.TemporaryDirectory(prefix="ceremony-report-") as directory:
            html_path = Path(directory) / "report.html"
            html_path.write_text(document, encoding="utf-8")
            print_pdf(html_path, out)
    else:
        out.write_text(document, encoding="utf-8")
    report = data.snapshot.report
    ok = report is not None and report.ok
    state = "ledger check passed" if ok else "ledger check FAILED (see the report)"
    print(f"report of session {args.session} written to {out} ({state})")
    return EXIT_OK if ok else EXIT_FAILED


def add_parsers(subparsers: Any) -> None:
    """Register ``report`` on ``ceremony``'s subparsers."""
    _add_report(subparsers)
