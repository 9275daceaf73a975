"""Pure functions that turn a peer's ledger rows into the tidy tables the dashboard shows.

Nothing here touches a database, a clock or a browser: every function takes the values the
ledger's read API returns (:class:`~peer.ledger.StoredRecord`,
:class:`~peer.ledger.RoundAttempt`, ...) and returns a :class:`Table` (named columns, one
dict per row) or a small value object. The Dash app draws charts and HTML tables from these,
and the unit tests check the numbers without a browser.

Where the figures come from, so that a privacy officer can tell what is signed:

- Global metrics and the ε each hospital spent per round come from the *agreed records*,
  which every participant signed (the ε figures are covered by ``metrics_hash``).
- Round timing and byte counts are this peer's own bookkeeping of its attempts (not signed).
- Privacy budgets are not in the records. They come from ``--budget PEER=EPS`` on the
  command line, else from the session proposal (see :func:`budgets_from_proposal`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from peer.acceptances import Acceptance, AcceptanceStatus, check_acceptances, proposal_digest
from peer.ledger import (
    ChargedRelease,
    LedgerProblem,
    LedgerReport,
    RoundAttempt,
    RoundStatus,
    SessionInfo,
    SessionStatus,
    StatisticsResult,
    StoredRecord,
)
from secagg import Verifier

__all__ = [
    "ACCEPTED",
    "ACCEPTED_UNCHECKED",
    "BAD_ACCEPTANCE",
    "ERROR_METRICS",
    "KNOWN_METRICS",
    "NOT_AGREED",
    "NO_ACCEPTANCE",
    "SCORE_METRICS",
    "Cell",
    "Column",
    "Table",
    "Verdict",
    "acceptance_rows",
    "acceptance_table",
    "banner",
    "budgets_from_proposal",
    "calibration_points",
    "compare_table",
    "confusion_matrix",
    "contributors_table",
    "default_session",
    "dp_release_table",
    "evaluated_after",
    "first_unagreed_round",
    "format_cell",
    "format_time",
    "headline_keys",
    "headline_row",
    "hospital_privacy_table",
    "metrics_table",
    "participation_table",
    "privacy_table",
    "proposal_digest",
    "residual_histogram",
    "roc_points",
    "score_histogram",
    "session_label",
    "session_options",
    "statistics_table",
    "trust_table",
    "verdict",
]

Cell = str | int | float | None
"""One value of a table: text, a number, or None for "not known"."""

KNOWN_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("auc", "AUC"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    # multi-class (peer.payloads.evaluation)
    ("macro_f1", "Macro-F1"),
    ("auc_ovr", "AUC (one-vs-rest, macro)"),
    # regression
    ("rmse", "RMSE"),
    ("mae", "MAE"),
    ("r2", "R²"),
    ("loss", "Loss"),
)
"""Model-quality metrics shown first and charted, with their display names, when present."""

SCORE_METRICS = ("accuracy", "auc", "sensitivity", "specificity", "macro_f1", "auc_ovr")
"""The metrics on a 0–1 scale (charted together)."""

ERROR_METRICS = ("rmse", "mae")
"""Regression errors, in the target's unit (charted together; R² has its own chart)."""

# What the headline shows per task, recognized by a metric only that task agrees on.
_TASK_HEADLINES = (
    ("macro_f1", ("accuracy", "macro_f1", "auc_ovr")),
    ("rmse", ("rmse", "mae", "r2")),
)

# Keys of the agreed metrics that describe the round rather than the model.
_ROUND_KEYS = frozenset({"survivors", "aggregator"})

# Display names of other agreed figures whose key alone does not say what they count.
_OTHER_LABELS = {
    "examples": "Training examples (all hospitals)",
    "n": "Test examples (all hospitals)",
}

# Round kinds of a training session (peer.learning.RoundKind) whose evaluation is of the
# model that *entered* the round, i.e. the model agreed after the previous round: a training
# round evaluates before it trains, and the final round evaluates the model the last
# training round produced.
_EVALUATES_ENTERING = frozenset({"train", "evaluate"})

NOT_AGREED = "not agreed (ledger check failed)"
"""The status of a row whose record, or one before it in its session, failed the check."""

# Keys a session proposal's ``privacy`` object may use for one ε budget that applies to every
# participant, in order of preference. The proposal format leaves ``privacy`` free-form, so
# we accept the names a proposer is likely to use rather than guess one.
_BUDGET_KEYS = ("epsilon_budget", "max_epsilon", "target_epsilon", "epsilon")


@dataclass(frozen=True, slots=True)
class Column:
    """A column of a :class:`Table`.

    Attributes:
        key: the key of the value in each row.
        label: the header shown to the user, with its unit where it has one.
        kind: how values are written: ``text``, ``int``, ``float`` (4 significant digits),
            ``epsilon`` (3 decimals), ``seconds`` (1 decimal), ``bytes`` (KiB/MiB) or
            ``time`` (already text, from :func:`format_time`).
    """

    key: str
    label: str
    kind: str = "text"


@dataclass(frozen=True, slots=True)
class Table:
    """A tidy table: named columns and one mapping per row (missing keys read as None)."""

    columns: tuple[Column, ...]
    rows: tuple[Mapping[str, Cell], ...] = ()

    def column(self, key: str) -> list[Cell]:
        """The values of one column, top to bottom."""
        return [row.get(key) for row in self.rows]

    def column_keys(self) -> tuple[str, ...]:
        """The column keys, left to right."""
        return tuple(column.key for column in self.columns)

    def formatted(self) -> list[list[str]]:
        """Every row as display text, in column order."""
        return [[format_cell(row.get(c.key), c) for c in self.columns] for row in self.rows]

    def __bool__(self) -> bool:
        return bool(self.rows)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking the ledger, in words.

    Attributes:
        status: ``verified`` (everything, signatures included), ``intact`` (every check
            that needs no key passed; signatures counted but not verified, no roster),
            ``problems``, ``unchecked`` (no check ran) or ``error``.
        headline: one sentence for the page.
        details: one sentence per problem found.
        warnings: one sentence per thing the check could not re-check (a round without
            stored evidence, a proposal this version cannot read): not failures, but shown.
    """

    status: str
    headline: str
    details: tuple[str, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default_factory=tuple)


# --------------------------------------------------------------------------- formatting


def format_time(value: datetime | None, *, zone: bool = True) -> str:
    """A timestamp as ``YYYY-MM-DD HH:MM:SS UTC`` (without `` UTC`` when ``zone`` is
    false, for table columns whose header names the zone); naive values are taken as UTC."""
    if value is None:
        return "—"
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    text = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{text} UTC" if zone else text


def _format_bytes(value: float) -> str:
    if value < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_cell(value: Cell, column: Column) -> str:
    """The text shown for ``value`` in ``column`` ("—" when it is not known)."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if column.kind == "int":
        return f"{int(value):,}"
    if column.kind == "epsilon":
        return f"{value:.3f}"
    if column.kind == "seconds":
        return f"{value:.1f}"
    if column.kind == "bytes":
        return _format_bytes(float(value))
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


# --------------------------------------------------------------------------- sessions


def _rounds_agreed(records: Sequence[StoredRecord], session_id: str) -> int:
    return sum(1 for stored in records if stored.record.session_id == session_id)


def session_label(session: SessionInfo, rounds_agreed: int) -> str:
    """The text of a session in the selector, e.g. ``s1 — running, 2 of 5 rounds agreed``."""
    return (
        f"{session.session_id} — {session.status.value}, "
        f"{rounds_agreed} of {session.rounds_planned} rounds agreed"
    )


def default_session(sessions: Sequence[SessionInfo]) -> str | None:
    """The session to show first: the newest running one, else the newest of all."""
    if not sessions:
        return None
    running = [s for s in sessions if s.status is SessionStatus.RUNNING]
    chosen = max(running or sessions, key=lambda s: (s.created_at, s.session_id))
    return chosen.session_id


def session_options(
    sessions: Sequence[SessionInfo], records: Sequence[StoredRecord]
) -> list[dict[str, str]]:
    """Options of the session selector, newest first."""
    ordered = sorted(sessions, key=lambda s: (s.created_at, s.session_id), reverse=True)
    return [
        {"label": session_label(s, _rounds_agreed(records, s.session_id)), "value": s.session_id}
        for s in ordered
    ]


# --------------------------------------------------------------------------- metrics


def _number(value: object) -> float | None:
    """A finite JSON number as float; anything else (bools, text, lists) as None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _by_round(records: Iterable[StoredRecord]) -> list[StoredRecord]:
    return sorted(records, key=lambda stored: stored.record.round)


def evaluated_after(stored: StoredRecord) -> int | None:
    """The round after which the evaluated model was agreed ("model after round k"), or
    None when the round evaluated no model (a standardization round).

    A training session's train and evaluate rounds evaluate the model entering the round,
    which is the model agreed after the previous round (see :mod:`peer.learning`); other
    sessions' metrics describe their own round.
    """
    kind = stored.record.metrics.get("round_kind")
    if kind == "standardize":
        return None
    if kind in _EVALUATES_ENTERING or stored.record.metrics.get("evaluated") == (
        "model entering this round"
    ):
        return stored.record.round - 1
    return stored.record.round


def metrics_table(records: Sequence[StoredRecord], first_bad_round: int | None = None) -> Table:
    """Agreed global metrics, one row per agreed round.

    Columns: ``round``, ``after`` (the round after which the evaluated model was agreed,
    see :func:`evaluated_after`), ``round_kind`` (text) when records name it, then the
    :data:`KNOWN_METRICS` that any record has, then any other numeric metric (e.g.
    ``examples``) in name order, and ``status``: ``agreed``, or :data:`NOT_AGREED` from
    ``first_bad_round`` on (the first round whose record failed the ledger check: that
    record and every later one of the session cannot be trusted). Non-numeric metrics and
    the round bookkeeping (``survivors``, ``aggregator``) are left out; a round lacking a
    metric has None there.
    """
    ordered = _by_round(records)
    present: set[str] = set()
    for stored in ordered:
        for key, value in stored.record.metrics.items():
            if key not in _ROUND_KEYS and _number(value) is not None:
                present.add(key)
    known = [(key, label) for key, label in KNOWN_METRICS if key in present]
    known_keys = {key for key, _ in known}
    others = sorted(present - known_keys)
    # Training sessions say what each round did (standardize, train, evaluate).
    kinds = any(isinstance(stored.record.metrics.get("round_kind"), str) for stored in ordered)
    columns = (
        Column("round", "Round", "int"),
        Column("after", "Model after round", "int"),
        *((Column("round_kind", "Round type"),) if kinds else ()),
        *(Column(key, label, "float") for key, label in known),
        *(
            Column(key, _OTHER_LABELS.get(key, key.replace("_", " ").capitalize()), "float")
            for key in others
        ),
        Column("status", "Status"),
    )
    rows: list[dict[str, Cell]] = []
    for stored in ordered:
        round_ = stored.record.round
        row: dict[str, Cell] = {"round": round_, "after": evaluated_after(stored)}
        for column in columns[2:-1]:
            value = stored.record.metrics.get(column.key)
            row[column.key] = (
                value if column.kind == "text" and isinstance(value, str) else (_number(value))
            )
        bad = first_bad_round is not None and round_ >= first_bad_round
        row["status"] = NOT_AGREED if bad else "agreed"
        rows.append(row)
    return Table(columns, tuple(rows))


def headline_row(metrics: Table) -> Mapping[str, Cell] | None:
    """The row of the latest evaluated model (the final model once the session is over):
    the last row that has a :data:`KNOWN_METRICS` value. None when no model was evaluated.
    """
    keys = [key for key, _ in KNOWN_METRICS if key in metrics.column_keys()]
    for row in reversed(metrics.rows):
        if row.get("after") is not None and any(row.get(k) is not None for k in keys):
            return row
    return None


def headline_keys(metrics: Table) -> list[str]:
    """The metrics the headline shows: the task's (multi-class: accuracy, macro-F1 and
    one-vs-rest AUC; regression: RMSE, MAE and R²), else the first two numeric columns."""
    keys = metrics.column_keys()
    for marker, task_keys in _TASK_HEADLINES:
        if marker in keys:
            return [key for key in task_keys if key in keys]
    return [column.key for column in metrics.columns if column.kind == "float"][:2]


# --------------------------------------------------------------------------- ledger check


def _problem_rounds(
    problem: LedgerProblem, session_id: str, rounds_by_seq: Mapping[int, int]
) -> int | None:
    if problem.seq is not None and problem.seq in rounds_by_seq:
        return rounds_by_seq[problem.seq]
    if problem.session_id != session_id:
        return None
    if problem.round is not None:
        return problem.round
    # A problem of the session itself (its proposal hash): every round is affected.
    return min(rounds_by_seq.values(), default=1)


def first_unagreed_round(
    report: LedgerReport | None, session_id: str, records: Sequence[StoredRecord]
) -> int | None:
    """The first round of ``session_id`` from which its records cannot be trusted, or None.

    A record that fails a check breaks the session's chain there: it and every later record
    of the session (which link to it) are not what the hospitals agreed. Problems located
    at another session's record do not count; a gap in ``seq`` shows as a broken link at
    the next record of the session the deleted record belonged to.
    """
    if report is None or report.ok:
        return None
    rounds_by_seq = {stored.seq: stored.record.round for stored in records}
    found = [
        r
        for problem in report.problems
        if (r := _problem_rounds(problem, session_id, rounds_by_seq)) is not None
    ]
    return min(found, default=None)


def banner(
    report: LedgerReport | None, session_id: str | None, records: Sequence[StoredRecord]
) -> str | None:
    """The sentence of the red banner at the top of the page, or None when the check found
    nothing wrong: names the first failing round of the shown session and what is wrong."""
    if report is None or report.ok:
        return None
    if session_id is not None:
        first = first_unagreed_round(report, session_id, records)
        if first is not None:
            rounds_by_seq = {stored.seq: stored.record.round for stored in records}
            what = next(
                problem
                for problem in report.problems
                if _problem_rounds(problem, session_id, rounds_by_seq) == first
            )
            return (
                f"Ledger check FAILED at round {first} of session {session_id}: "
                f"{what.message}. The figures of round {first} and later are NOT what the "
                f"hospitals agreed; they are greyed out below."
            )
    first_problem = report.problems[0]
    return (
        f"Ledger check FAILED ({len(report.problems)} problem(s)) outside this session's "
        f"records: {first_problem}. This session's figures passed the check."
    )


# --------------------------------------------------------------------------- model quality


def score_histogram(stored: StoredRecord) -> tuple[list[float], list[float]] | None:
    """The agreed score histograms (positives, negatives) of a binary evaluation, or None.

    They are read from the agreed metric ``score_histogram``: ``{"positive": [...],
    "negative": [...]}``, one count per equal-width bin of the predicted probability over
    [0, 1] (the layout of :func:`peer.training.evaluate_sums`).
    """
    value = stored.record.metrics.get("score_histogram")
    if not isinstance(value, dict):
        return None
    pos, neg = value.get("positive"), value.get("negative")
    if not isinstance(pos, list) or not isinstance(neg, list) or len(pos) != len(neg):
        return None
    counts_pos = [_number(c) for c in pos]
    counts_neg = [_number(c) for c in neg]
    if len(pos) < 2 or any(c is None or c < 0 for c in [*counts_pos, *counts_neg]):
        return None
    return [float(c or 0) for c in counts_pos], [float(c or 0) for c in counts_neg]


def confusion_matrix(stored: StoredRecord) -> list[list[float]] | None:
    """The agreed confusion matrix of a multi-class evaluation (rows = true class, columns =
    predicted, released noisy counts), or None when the record has no well-formed one."""
    value = stored.record.metrics.get("confusion_matrix")
    if not isinstance(value, list) or len(value) < 2:
        return None
    rows = []
    for row in value:
        if not isinstance(row, list) or len(row) != len(value):
            return None
        cells = [_number(c) for c in row]
        if any(c is None or c < 0 for c in cells):
            return None
        rows.append([float(c or 0) for c in cells])
    return rows


def confusion_note(stored: StoredRecord) -> str:
    """What a reader of a released confusion matrix must know: its cells are noisy and shown
    clamped at 0, so they can add up to more than the number of patients evaluated (the
    record's n is summed before clamping, which is unbiased; peer/payloads/evaluation.py).
    Seen in a 3-peer test: cells adding up to 84 for n = 79."""
    n = _number(stored.record.metrics.get("n"))
    evaluated = "the number of patients evaluated" if n is None else f"the n = {n:.0f} evaluated"
    return (
        "Rows are the true class, columns the predicted class; each cell is the released "
        "(noisy) count summed over the hospitals. A count the noise made negative is shown "
        f"as 0, so the cells can add up to more than {evaluated}."
    )


def residual_histogram(stored: StoredRecord) -> tuple[list[float], list[float]] | None:
    """The agreed residual histogram of a regression evaluation as ``(edges, counts)``
    (``len(edges) == len(counts) + 1``, ascending edges), or None when absent or malformed."""
    value = stored.record.metrics.get("residual_histogram")
    if not isinstance(value, dict):
        return None
    edges, counts = value.get("edges"), value.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or len(counts) < 1:
        return None
    if len(edges) != len(counts) + 1:
        return None
    e = [_number(x) for x in edges]
    c = [_number(x) for x in counts]
    if any(x is None for x in e) or any(x is None or x < 0 for x in c):
        return None
    edge_values = [float(x or 0) for x in e]
    if any(b <= a for a, b in itertools.pairwise(edge_values)):
        return None
    return edge_values, [float(x or 0) for x in c]


def roc_points(positive: Sequence[float], negative: Sequence[float]) -> list[tuple[float, float]]:
    """The ROC curve ``(false positive rate, true positive rate)`` from score histograms,
    one point per bin edge from the highest threshold (0, 0) to the lowest (1, 1); empty
    when either class has no example."""
    n_pos, n_neg = sum(positive), sum(negative)
    if n_pos <= 0 or n_neg <= 0:
        return []
    points = [(0.0, 0.0)]
    tp = fp = 0.0
    for p, n in zip(reversed(positive), reversed(negative), strict=True):
        tp += p
        fp += n
        points.append((fp / n_neg, tp / n_pos))
    return points


def calibration_points(
    positive: Sequence[float], negative: Sequence[float]
) -> list[tuple[float, float, int]]:
    """Reliability: ``(bin centre, observed fraction of positives, examples)`` for every
    non-empty bin of the predicted probability."""
    width = 1.0 / len(positive)
    return [
        ((i + 0.5) * width, p / (p + n), round(p + n))
        for i, (p, n) in enumerate(zip(positive, negative, strict=True))
        if p + n > 0
    ]


# --------------------------------------------------------------------------- comparison


def compare_table(first: tuple[str, Table], second: tuple[str, Table]) -> Table:
    """The final (latest evaluated) model's metrics of two sessions side by side.

    Args:
        first, second: each session's name and :func:`metrics_table` (built with its
            first failing round, so that a value that failed the ledger check is shown as
            :data:`NOT_AGREED` rather than compared).

    Rows: ``model after round``, then each :data:`KNOWN_METRICS` either session has;
    columns: the metric, each session's value and the difference (second minus first).
    """
    (name_a, table_a), (name_b, table_b) = first, second
    head_a, head_b = headline_row(table_a), headline_row(table_b)
    columns = (
        Column("metric", "Final model"),
        Column("a", name_a, "float"),
        Column("b", name_b, "float"),
        Column("difference", f"{name_b} − {name_a}", "float"),
    )

    def value(row: Mapping[str, Cell] | None, key: str) -> float | None:
        cell = row.get(key) if row is not None else None
        return float(cell) if isinstance(cell, int | float) else None

    def shown(row: Mapping[str, Cell] | None, key: str) -> Cell:
        if row is not None and row.get("status") == NOT_AGREED:
            return "not agreed"
        return value(row, key)

    rows: list[dict[str, Cell]] = [
        {
            "metric": "Model after round",
            "a": value(head_a, "after"),
            "b": value(head_b, "after"),
        }
    ]
    present = set(table_a.column_keys()) | set(table_b.column_keys())
    for key, label in KNOWN_METRICS:
        if key not in present:
            continue
        a, b = shown(head_a, key), shown(head_b, key)
        rows.append(
            {
                "metric": label,
                "a": a,
                "b": b,
                "difference": b - a if isinstance(a, float) and isinstance(b, float) else None,
            }
        )
    return Table(columns, tuple(rows))


# --------------------------------------------------------------------------- privacy


def budgets_from_proposal(proposal: str, participants: Sequence[str]) -> dict[str, float]:
    """The ε budget of each participant, read from a session proposal document.

    The proposal's ``privacy`` object may hold ``budgets`` (``{peer_id: epsilon}``) and/or
    one number for every participant under ``epsilon_budget``, ``max_epsilon``,
    ``target_epsilon`` or ``epsilon`` (the first present wins); a per-peer entry beats the
    common number. Anything unreadable is ignored: the budget is then simply not shown.
    """
    try:
        document = json.loads(proposal)
    except ValueError:
        return {}
    privacy = document.get("privacy") if isinstance(document, dict) else None
    if not isinstance(privacy, dict):
        return {}
    budgets: dict[str, float] = {}
    for key in _BUDGET_KEYS:
        common = _number(privacy.get(key))
        if common is not None and common > 0:
            budgets = dict.fromkeys(participants, common)
            break
    per_peer = privacy.get("budgets")
    if isinstance(per_peer, dict):
        for peer_id, value in per_peer.items():
            eps = _number(value)
            if isinstance(peer_id, str) and eps is not None and eps > 0:
                budgets[peer_id] = eps
    return budgets


def privacy_table(records: Sequence[StoredRecord], budgets: Mapping[str, float]) -> Table:
    """ε spent per hospital per agreed round, its running total in the session, and what is
    left of the hospital's budget (when a budget is known).

    One row per (round, peer) that the round's record names; rows are ordered by round, then
    peer. ``remaining`` is negative when a hospital went over its budget.
    """
    columns = (
        Column("round", "Round", "int"),
        Column("peer", "Hospital"),
        Column("epsilon", "ε this round", "epsilon"),
        Column("cumulative", "ε spent in session", "epsilon"),
        Column("budget", "ε budget", "epsilon"),
        Column("remaining", "ε remaining", "epsilon"),
    )
    totals: dict[str, float] = {}
    rows: list[dict[str, Cell]] = []
    for stored in _by_round(records):
        for peer_id in sorted(stored.record.epsilon):
            eps = float(stored.record.epsilon[peer_id])
            totals[peer_id] = totals.get(peer_id, 0.0) + eps
            budget = budgets.get(peer_id)
            rows.append(
                {
                    "round": stored.record.round,
                    "peer": peer_id,
                    "epsilon": eps,
                    "cumulative": totals[peer_id],
                    "budget": budget,
                    "remaining": None if budget is None else budget - totals[peer_id],
                }
            )
    return Table(columns, tuple(rows))


def hospital_privacy_table(
    charges: Sequence[ChargedRelease], budgets: Mapping[str, float]
) -> Table:
    """Each hospital with charges in this ledger (the ledger's owner: a peer charges only
    itself) over *all* its sessions: ε composed by the accountant (PLD at the global δ, RDP
    as a cross-check), its budget and what remains. Every charged release counts, aborted
    attempts included.
    """
    from peer.privacy import compose_charges

    columns = (
        Column("peer", "Hospital"),
        Column("releases", "Releases charged", "int"),
        Column("epsilon", "ε spent, all sessions (PLD)", "epsilon"),
        Column("epsilon_rdp", "RDP cross-check", "epsilon"),
        Column("budget", "Global ε budget", "epsilon"),
        Column("remaining", "ε remaining", "epsilon"),
    )
    rows: list[dict[str, Cell]] = []
    for peer_id in sorted({c.charge.peer_id for c in charges}):
        statement = compose_charges(peer_id, charges, budgets.get(peer_id))
        rows.append(
            {
                "peer": peer_id,
                "releases": len(statement.releases),
                "epsilon": statement.epsilon,
                "epsilon_rdp": statement.epsilon_rdp,
                "budget": statement.budget,
                "remaining": statement.remaining,
            }
        )
    return Table(columns, tuple(rows))


_RELEASED_AS = {
    "standardization": "feature mean and standard deviation (and the record count)",
    "update": "global model update",
    "evaluation": "evaluation metrics (accuracy, AUC, loss, confusion counts, n)",
}
# The evaluation of the other tasks, recognized by a metric only that task agrees on.
_EVALUATION_OF_TASK = {
    "macro_f1": "evaluation metrics (accuracy, macro-F1, one-vs-rest AUC, confusion matrix, "
    "loss, n)",
    "rmse": "evaluation metrics (MAE, RMSE, R², residual histogram, n)",
}


def dp_release_table(records: Sequence[StoredRecord]) -> Table:
    """Which published numbers are differentially private, and with which mechanism.

    Read from the agreed records: a training round's ``dp`` metrics (Gaussian noise
    multipliers of each released part) and a statistics round's per-query ε (geometric
    mechanism). Every released number of these payloads is noised before it leaves a
    hospital; a number not listed here was not released under DP.
    """
    columns = (
        Column("round", "Round", "int"),
        Column("published", "Published numbers", "text"),
        Column("mechanism", "Mechanism", "text"),
        Column("sigma", "Noise multiplier σ", "float"),
        Column("epsilon", "ε (pure DP)", "epsilon"),
    )
    rows: list[dict[str, Cell]] = []
    for stored in _by_round(records):
        metrics = stored.record.metrics
        dp = metrics.get("dp")
        if isinstance(dp, Mapping):
            for part, info in sorted(dp.items()):
                if isinstance(info, Mapping):
                    rows.append(
                        {
                            "round": stored.record.round,
                            "published": next(
                                (
                                    text
                                    for key, text in _EVALUATION_OF_TASK.items()
                                    if part == "evaluation" and key in metrics
                                ),
                                _RELEASED_AS.get(part, part),
                            ),
                            "mechanism": str(info.get("mechanism", "")),
                            "sigma": _number(info.get("sigma")),
                            "epsilon": None,
                        }
                    )
        statistics = metrics.get("statistics")
        if isinstance(statistics, Mapping):
            for name, result in sorted(statistics.items()):
                if isinstance(result, Mapping):
                    rows.append(
                        {
                            "round": stored.record.round,
                            "published": f"{name} ({result.get('type', '?')})",
                            "mechanism": "geometric",
                            "sigma": None,
                            "epsilon": _number(result.get("epsilon")),
                        }
                    )
    return Table(columns, tuple(rows))


# --------------------------------------------------------------------------- participation


def _survivors(stored: StoredRecord) -> list[str] | None:
    value = stored.record.metrics.get("survivors")
    if isinstance(value, list | tuple) and all(isinstance(p, str) for p in value):
        return sorted(str(p) for p in value)
    return None


def contributors_table(session: SessionInfo, records: Sequence[StoredRecord]) -> Table:
    """How many hospitals contributed to each agreed round (the survivors the record
    names, signed) out of the session's participants.

    Record counts per hospital are not shown: a hospital's exact count is not released
    (only the sum over the survivors, which is not differentially private either), so the
    number of contributing hospitals is the participation figure the ledger can vouch for.
    """
    columns = (
        Column("round", "Round", "int"),
        Column("contributors", "Hospitals contributing", "int"),
        Column("participants", "Hospitals in the session", "int"),
    )
    rows: list[dict[str, Cell]] = []
    for stored in _by_round(records):
        survivors = _survivors(stored)
        rows.append(
            {
                "round": stored.record.round,
                "contributors": None if survivors is None else len(survivors),
                "participants": len(session.participants),
            }
        )
    return Table(columns, tuple(rows))


def _names(peers: Iterable[str]) -> str:
    listed = ", ".join(peers)
    return listed or "none"


def participation_table(
    session: SessionInfo, records: Sequence[StoredRecord], attempts: Sequence[RoundAttempt]
) -> Table:
    """Who took part in each round, who aggregated, how long it took and what it cost.

    One row per round that was agreed or attempted. For an agreed round the survivors and
    aggregator come from the signed record; dropouts are the session's participants that are
    not survivors (with the protocol stage, when this peer's attempt recorded it). Times and
    bytes are this peer's own: from the start of its first attempt to the end of its last,
    bytes summed over its attempts.
    """
    columns = (
        Column("round", "Round", "int"),
        Column("status", "Status"),
        Column("attempts", "Attempts", "int"),
        Column("aggregator", "Aggregator"),
        Column("survivors", "Participants"),
        Column("dropouts", "Dropped out"),
        Column("started", "Started (UTC)", "time"),
        Column("duration_s", "Duration (s)", "seconds"),
        Column("bytes_sent", "Sent (this peer)", "bytes"),
        Column("bytes_received", "Received (this peer)", "bytes"),
    )
    by_round: dict[int, list[RoundAttempt]] = {}
    for attempt in attempts:
        by_round.setdefault(attempt.round, []).append(attempt)
    agreed = {stored.record.round: stored for stored in records}
    rows: list[dict[str, Cell]] = []
    for round_ in sorted(set(by_round) | set(agreed)):
        tries = sorted(by_round.get(round_, []), key=lambda a: a.attempt)
        stored = agreed.get(round_)
        last = tries[-1] if tries else None
        row: dict[str, Cell] = {"round": round_, "attempts": len(tries) or None}
        if stored is not None:
            row["status"] = RoundStatus.AGREED.value
            aggregator = stored.record.metrics.get("aggregator")
            row["aggregator"] = str(aggregator) if aggregator is not None else None
            survivors = _survivors(stored)
            if survivors is not None:
                stages: dict[str, str] = {}
                for attempt in tries:
                    if attempt.status is RoundStatus.AGREED:
                        for stage, peers in attempt.dropped.items():
                            for peer_id in peers:
                                stages.setdefault(peer_id, stage)
                dropped = [p for p in sorted(session.participants) if p not in survivors]
                row["survivors"] = f"{len(survivors)} of {len(session.participants)}"
                row["dropouts"] = _names(
                    f"{p} (at {stages[p]})" if p in stages else p for p in dropped
                )
        elif last is not None:
            row["status"] = last.status.value
            row["aggregator"] = last.aggregator
            if last.abort_reason:
                row["status"] = f"{last.status.value}: {last.abort_reason}"
        if tries:
            started = tries[0].started_at
            ended = max((a.ended_at for a in tries if a.ended_at is not None), default=None)
            row["started"] = format_time(started, zone=False)
            if ended is not None and (last is None or last.status is not RoundStatus.RUNNING):
                row["duration_s"] = (ended - started).total_seconds()
            row["bytes_sent"] = sum(a.bytes_sent for a in tries)
            row["bytes_received"] = sum(a.bytes_received for a in tries)
        rows.append(row)
    return Table(columns, tuple(rows))


# --------------------------------------------------------------------------- trust


def trust_table(
    session: SessionInfo, records: Sequence[StoredRecord], report: LedgerReport | None
) -> Table:
    """For each agreed round: who signed, how many of how many, and what the check found.

    ``check`` is ``valid`` when the ledger was verified and nothing is wrong at the record,
    ``hashes valid, signatures not verified`` when it was checked without a roster, the
    problems found there otherwise, and ``not checked`` when no check ran.
    """
    columns = (
        Column("round", "Round", "int"),
        Column("signatures", "Signatures"),
        Column("threshold", "Required", "int"),
        Column("signers", "Signed by"),
        Column("check", "Check"),
        Column("recorded", "Recorded (UTC)", "time"),
    )
    rows: list[dict[str, Cell]] = []
    for stored in _by_round(records):
        if report is None:
            check = "not checked"
        else:
            problems = report.at(stored.seq)
            if problems:
                check = "; ".join(p.message for p in problems)
            elif report.signatures_checked:
                check = "valid"
            else:
                check = "hashes valid, signatures not verified"
        rows.append(
            {
                "round": stored.record.round,
                "signatures": f"{len(stored.signatures)} of {len(session.participants)}",
                "threshold": session.threshold,
                "signers": _names(sorted(stored.signatures)),
                "check": check,
                "recorded": format_time(stored.recorded_at, zone=False),
            }
        )
    return Table(columns, tuple(rows))


def verdict(report: LedgerReport | None, *, error: str | None = None) -> Verdict:
    """The ledger check in words: verified, problems found, not checked, or failed."""
    if error is not None:
        return Verdict("error", f"The ledger could not be checked: {error}")
    if report is None:
        return Verdict(
            "unchecked",
            "Signatures not checked: no roster given (start the dashboard with "
            "--roster and --ca to verify them).",
        )
    counted = f"{report.records} agreed record(s), {report.checkpoints} checkpoint(s)"
    warnings = tuple(str(warning) for warning in report.warnings)
    if report.ok and not report.signatures_checked:
        return Verdict(
            "intact",
            f"Ledger intact: hash chain, record, metrics and proposal hashes, checkpoints "
            f"and round parameters verified ({counted}). Signatures counted but not "
            "verified: no roster given (start the dashboard with --roster and --ca to verify "
            "them, the signed acceptances and each round's evidence).",
            warnings=warnings,
        )
    if report.ok:
        return Verdict(
            "verified",
            f"Ledger verified: hash chain intact and every signature valid; acceptances, "
            f"round evidence and parameters re-checked ({counted}).",
            warnings=warnings,
        )
    return Verdict(
        "problems",
        f"Ledger check FAILED: {len(report.problems)} problem(s) in {counted}.",
        tuple(str(problem) for problem in report.problems),
        warnings,
    )


# --------------------------------------------------------------------------- statistics


def _compact(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(", ", ": "))
    except (TypeError, ValueError):
        return repr(value)


def statistics_table(results: Sequence[StatisticsResult]) -> Table:
    """Federated differentially private statistics results, oldest first."""
    columns = (
        Column("query_id", "Query"),
        Column("round", "Round", "int"),
        Column("query", "Asked"),
        Column("result", "Result"),
        Column("epsilon", "ε", "epsilon"),
        Column("created", "Computed (UTC)", "time"),
    )
    rows: tuple[dict[str, Cell], ...] = tuple(
        {
            "query_id": result.query_id,
            "round": result.round,
            "query": _compact(result.query),
            "result": _compact(result.result),
            "epsilon": result.epsilon,
            "created": format_time(result.created_at, zone=False),
        }
        for result in results
    )
    return Table(columns, rows)


# --------------------------------------------------------------------------- acceptances

# The checking is peer.acceptances' (shared with the audit report); these are its words.
ACCEPTED = AcceptanceStatus.VERIFIED.value
ACCEPTED_UNCHECKED = AcceptanceStatus.UNCHECKED.value
BAD_ACCEPTANCE = AcceptanceStatus.FORGED.value
NO_ACCEPTANCE = AcceptanceStatus.MISSING.value


def acceptance_rows(acceptances: Sequence[Acceptance]) -> Table:
    """The table of checked acceptances (:func:`peer.acceptances.check_acceptances`)."""
    rows: tuple[dict[str, Cell], ...] = tuple(
        {
            "peer": a.peer,
            "status": a.status.value,
            "commitment": a.commitment.hex()[:16] + "…" if a.commitment is not None else None,
        }
        for a in acceptances
    )
    columns = (
        Column("peer", "Hospital"),
        Column("status", "Acceptance of the proposal"),
        Column("commitment", "Signed commitment (beginning)"),
    )
    return Table(columns, rows)


def acceptance_table(
    session: SessionInfo,
    commitments: Mapping[str, tuple[bytes, bytes]] | None,
    verifiers: Mapping[str, Verifier] | None,
) -> Table:
    """Each participant's signed acceptance of the proposal, as this ledger holds it,
    checked with the roster keys when given (see :mod:`peer.acceptances`).

    Args:
        commitments: ``{peer: (commitment, signature)}`` from the ledger, or None when this
            ledger has none (the session never started here).
        verifiers: roster keys, or None to show the signatures unverified.
    """
    return acceptance_rows(check_acceptances(session, commitments, verifiers))
