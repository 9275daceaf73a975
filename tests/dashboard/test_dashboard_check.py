"""The ledger check without keys, what a failed check marks, and the figures of the model.

The attacks are the issue's: a metric, a checkpoint or a signature count edited directly in
the peer's ledger.db, with the dashboard started without ``--roster/--ca``.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest
from dashboard_testlib import PEERS, LedgerBuilder
from test_dashboard_data import session, stored

from dashboard import figures
from dashboard.app import render
from dashboard.data import (
    NOT_AGREED,
    banner,
    calibration_points,
    compare_table,
    contributors_table,
    evaluated_after,
    first_unagreed_round,
    headline_row,
    metrics_table,
    roc_points,
    verdict,
)
from dashboard.source import LedgerSource
from peer.ledger import Ledger, LedgerProblem, LedgerReport, ProblemKind, verify_ledger


def _three_rounds(tmp_path: Path) -> LedgerBuilder:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=3)
    for round_, accuracy in ((1, 0.812), (2, 0.901), (3, 0.938)):
        builder.agree_round("s1", round_, {"accuracy": accuracy})
    return builder


def _edit_metric(path: Path, round_: int, key: str, value: float) -> None:
    with sqlite3.connect(path) as db:
        (text,) = db.execute(
            "SELECT metrics FROM agreed_records WHERE round = ?", (round_,)
        ).fetchone()
        metrics = json.loads(text)
        metrics[key] = value
        db.execute(
            "UPDATE agreed_records SET metrics = ? WHERE round = ?", (json.dumps(metrics), round_)
        )


# --------------------------------------------------------------------------- keyless check


def test_keyless_check_passes_an_honest_ledger_and_says_signatures_were_not_verified(
    tmp_path: Path,
) -> None:
    builder = _three_rounds(tmp_path)
    with builder.open() as ledger:
        report = verify_ledger(ledger, None)
    assert report.ok
    assert report.records == 3
    assert report.checkpoints == 3
    assert not report.signatures_checked
    assert "signatures counted but not verified" in str(report)
    assert verdict(report).status == "intact"


def test_keyless_check_finds_an_edited_metric(tmp_path: Path) -> None:
    builder = _three_rounds(tmp_path)
    _edit_metric(builder.path, 3, "accuracy", 0.998)
    with builder.open() as ledger:
        report = verify_ledger(ledger, None)
    assert [(p.kind, p.round) for p in report.problems] == [(ProblemKind.METRICS_HASH, 3)]


def test_keyless_check_finds_an_edited_checkpoint(tmp_path: Path) -> None:
    builder = _three_rounds(tmp_path)
    with sqlite3.connect(builder.path) as db:
        db.execute("UPDATE checkpoints SET weights = ? WHERE round = 2", (b"\0" * 128,))
    with builder.open() as ledger:
        report = verify_ledger(ledger, None)
    assert [(p.kind, p.round) for p in report.problems] == [(ProblemKind.CHECKPOINT_HASH, 2)]


def test_keyless_check_counts_signatures(tmp_path: Path) -> None:
    builder = _three_rounds(tmp_path)
    with sqlite3.connect(builder.path) as db:
        (seq,) = db.execute("SELECT seq FROM agreed_records WHERE round = 2").fetchone()
        db.execute("DELETE FROM record_signatures WHERE seq = ? AND peer_id != ?", (seq, PEERS[0]))
    with builder.open() as ledger:
        report = verify_ledger(ledger, None)
    assert [(p.kind, p.round) for p in report.problems] == [(ProblemKind.TOO_FEW_SIGNATURES, 2)]


def test_keyless_check_cannot_tell_a_forged_signature(tmp_path: Path) -> None:
    """The limit of checking without keys, stated as a test: only the roster shows this."""
    builder = _three_rounds(tmp_path)
    with sqlite3.connect(builder.path) as db:
        db.execute(
            "UPDATE record_signatures SET signature = ? WHERE peer_id = ?", (b"x" * 64, PEERS[1])
        )
    with builder.open() as ledger:
        assert verify_ledger(ledger, None).ok
        keyed = verify_ledger(ledger, builder.verifiers())
    assert {p.kind for p in keyed.problems} == {ProblemKind.BAD_SIGNATURE}


def test_source_rechecks_a_record_edited_in_place(tmp_path: Path) -> None:
    """An edit leaves the ledger's head unchanged: the check must re-run anyway."""
    builder = _three_rounds(tmp_path)
    source = LedgerSource(builder.url, recheck_s=3600)
    try:
        before = source.snapshot("s1")
        assert before.report is not None
        assert before.report.ok
        _edit_metric(builder.path, 2, "accuracy", 0.999)
        after = source.snapshot("s1")
    finally:
        source.close()
    assert after.head == before.head
    assert after.report is not None
    assert [p.round for p in after.report.problems] == [2]


def test_source_rechecks_checkpoints_after_recheck_interval(tmp_path: Path) -> None:
    builder = _three_rounds(tmp_path)
    now = [0.0]
    source = LedgerSource(builder.url, recheck_s=60, monotonic=lambda: now[0])
    try:
        assert source.snapshot("s1").report.ok  # type: ignore[union-attr]
        with sqlite3.connect(builder.path) as db:
            db.execute("UPDATE checkpoints SET weights = ? WHERE round = 1", (b"\0" * 128,))
        now[0] = 30.0
        assert source.snapshot("s1").report.ok  # type: ignore[union-attr]
        now[0] = 61.0
        report = source.snapshot("s1").report
    finally:
        source.close()
    assert report is not None
    assert [p.kind for p in report.problems] == [ProblemKind.CHECKPOINT_HASH]


def test_tampered_round_and_later_ones_are_not_shown_as_agreed(tmp_path: Path) -> None:
    builder = _three_rounds(tmp_path)
    _edit_metric(builder.path, 2, "accuracy", 0.999)
    source = LedgerSource(builder.url)
    try:
        snapshot = source.snapshot("s1")
    finally:
        source.close()
    assert first_unagreed_round(snapshot.report, "s1", snapshot.records) == 2
    sections = render(snapshot)
    page = str(sections)
    assert "Ledger check FAILED at round 2 of session s1" in str(sections[0])
    assert "NOT AGREED" in str(sections[2])
    table = metrics_table(snapshot.records, 2)
    assert table.column("status") == ["agreed", NOT_AGREED, NOT_AGREED]
    quality = figures.quality_figure(table)
    assert quality is not None
    agreed, grey = quality.data
    assert list(agreed.y) == [0.812, None, None]
    assert grey.name == "Not agreed: ledger check failed"
    assert list(grey.y) == [0.999, 0.938]
    assert "0.999" not in str(sections[2])  # the headline never shows a tampered value
    assert "metrics_hash" in page


def test_problems_of_another_session_leave_this_one_agreed() -> None:
    records = [stored(1, {"accuracy": 0.8}), stored(2, {"accuracy": 0.9})]
    other = LedgerProblem(ProblemKind.METRICS_HASH, "edited", seq=7, session_id="s2", round=1)
    report = LedgerReport("l", 3, 0, (other,))
    assert first_unagreed_round(report, "s1", records) is None
    text = banner(report, "s1", records)
    assert text is not None
    assert "outside this session's records" in text
    proposal = LedgerProblem(ProblemKind.PROPOSAL_HASH, "edited", session_id="s1")
    assert first_unagreed_round(LedgerReport("l", 2, 0, (proposal,)), "s1", records) == 1
    assert banner(LedgerReport("l", 2, 0), "s1", records) is None


# --------------------------------------------------------------------------- model figures


def test_training_evaluations_belong_to_the_model_entering_the_round() -> None:
    records = [
        stored(1, {"round_kind": "standardize", "examples": 300}),
        stored(2, {"round_kind": "train", "accuracy": 0.23}),
        stored(3, {"round_kind": "train", "accuracy": 0.85}),
        stored(4, {"round_kind": "evaluate", "accuracy": 0.91}),
    ]
    assert [evaluated_after(r) for r in records] == [None, 1, 2, 3]
    head = headline_row(metrics_table(records))
    assert head is not None
    assert (head.get("after"), head.get("accuracy")) == (3, 0.91)
    # Other sessions' metrics describe their own round.
    assert evaluated_after(stored(5, {"accuracy": 0.5})) == 5


def test_roc_and_calibration_from_score_histograms() -> None:
    positive = [0.0, 1.0, 3.0, 6.0]
    negative = [5.0, 3.0, 1.0, 1.0]
    points = roc_points(positive, negative)
    assert points[0] == (0.0, 0.0)
    assert points[-1] == (1.0, 1.0)
    assert points[1] == pytest.approx((0.1, 0.6))
    # The area under the curve (trapezoids) is the AUC of the same histograms as the peers
    # compute it (ties in a bin count one half).
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(points))
    n_pos, n_neg = sum(positive), sum(negative)
    below = [sum(negative[:i]) for i in range(len(negative))]
    auc = sum(p * (b + 0.5 * n) for p, b, n in zip(positive, below, negative, strict=False)) / (
        n_pos * n_neg
    )
    assert area == pytest.approx(auc)
    assert calibration_points(positive, negative) == [
        (0.125, 0.0, 5),
        (0.375, 0.25, 4),
        (0.625, 0.75, 4),
        (0.875, 6 / 7, 7),
    ]
    assert roc_points([0.0, 0.0], [1.0, 2.0]) == []
    roc = figures.roc_figure(positive, negative, "model after round 3")
    assert roc is not None
    assert roc.layout.xaxis.title.text.startswith("False positive rate")


def test_page_draws_roc_and_calibration_when_histograms_are_agreed() -> None:
    from dashboard.source import Snapshot

    histogram = {"positive": [0, 1, 3, 6], "negative": [5, 3, 1, 1]}
    records = (stored(1, {"accuracy": 0.8, "auc": 0.85, "score_histogram": histogram}),)
    snapshot = Snapshot((session(),), records, session(), records, (), (), None, None, (1, b""))
    metrics = str(render(snapshot)[3])
    assert "roc-chart" in metrics
    assert "calibration-chart" in metrics
    without = (stored(1, {"accuracy": 0.8}),)
    plain = Snapshot((session(),), without, session(), without, (), (), None, None, (1, b""))
    assert "carry no score histograms" in str(render(plain)[3])


def test_participation_counts_contributing_hospitals() -> None:
    records = [
        stored(1, {"survivors": list(PEERS), "examples": 900}),
        stored(2, {"survivors": ["hospital-a", "hospital-b"], "examples": 600}),
    ]
    table = contributors_table(session(), records)
    assert table.column("contributors") == [3, 2]
    assert table.column("participants") == [3, 3]
    figure = figures.contributors_figure(table)
    assert figure is not None
    assert list(figure.data[0].y) == [3, 2]


def test_two_sessions_compared() -> None:
    first = [stored(r, {"accuracy": 0.7 + r / 20, "auc": 0.8}) for r in (1, 2)]
    second = [stored(r, {"accuracy": 0.8 + r / 20, "auc": 0.9}, session_id="s2") for r in (1, 2, 3)]
    table = compare_table(("s1", metrics_table(first)), ("s2", metrics_table(second)))
    rows = {row["metric"]: row for row in table.rows}
    assert (rows["Model after round"]["a"], rows["Model after round"]["b"]) == (2, 3)
    assert rows["Accuracy"]["a"] == pytest.approx(0.8)
    assert rows["Accuracy"]["b"] == pytest.approx(0.95)
    assert rows["Accuracy"]["difference"] == pytest.approx(0.15)
    figure = figures.compare_figure(
        "accuracy", [("s1", metrics_table(first)), ("s2", metrics_table(second))]
    )
    assert figure is not None
    assert [trace.name for trace in figure.data] == ["s1", "s2"]
    # A tampered final evaluation is not compared.
    tampered = compare_table(("s1", metrics_table(first)), ("s2", metrics_table(second, 3)))
    accuracy = next(row for row in tampered.rows if row["metric"] == "Accuracy")
    assert accuracy["b"] == "not agreed"
    assert accuracy["difference"] is None


def test_opening_read_only_ledger_for_keyless_check_does_not_write(tmp_path: Path) -> None:
    builder = _three_rounds(tmp_path)
    before = builder.path.read_bytes()
    source = LedgerSource(builder.url)
    try:
        source.snapshot("s1")
    finally:
        source.close()
    assert builder.path.read_bytes() == before
    with Ledger(builder.url) as ledger:
        assert len(ledger.agreed_records()) == 3


# --------------------------------------------------------------------------- large ledgers


def test_long_tables_show_their_last_page_and_page_through_every_row() -> None:
    """A long table shows its last PAGE_ROWS rows with a pager; "Earlier rows" reaches
    every row down to the first, "Later rows" comes back, and the pager stops at both ends."""
    from dashboard.app import PAGE_ROWS, page_of_rows
    from dashboard.source import Snapshot

    total = 2 * PAGE_ROWS + 10
    records = tuple(stored(r, {"accuracy": r / 100}) for r in range(1, total + 1))
    snapshot = Snapshot((session(),), records, session(), records, (), (), None, None, (1, b""))
    metrics = render(snapshot)[3]
    text = str(metrics)
    assert f"{total:,} rows, {PAGE_ROWS} at a time" in text
    assert text.count("Tr(") == PAGE_ROWS + 1  # the header row and the last page
    assert f"Rows {total - PAGE_ROWS + 1}–{total} of {total}" in text

    def first_rounds(end: int | None, step: int) -> tuple[list[str], str, int, bool, bool]:
        rows, status, new_end, no_earlier, no_later = page_of_rows(
            snapshot, {}, "metrics-table", end, step
        )
        return [str(r.children[0].children) for r in rows], status, new_end, no_earlier, no_later

    rounds, status, end, no_earlier, no_later = first_rounds(total, -PAGE_ROWS)
    assert rounds[0] == str(total - 2 * PAGE_ROWS + 1)
    assert len(rounds) == PAGE_ROWS
    assert (no_earlier, no_later) == (False, False)
    rounds, status, end, no_earlier, no_later = first_rounds(end, -PAGE_ROWS)
    assert rounds[0] == "1"  # the first rows, a full page
    assert len(rounds) == PAGE_ROWS
    assert status == f"Rows 1–{PAGE_ROWS} of {total}"
    assert (no_earlier, no_later) == (True, False)
    rounds, status, end, no_earlier, no_later = first_rounds(end, -PAGE_ROWS)
    assert rounds[0] == "1"  # stops at the first page
    for _ in range(3):
        rounds, status, end, no_earlier, no_later = first_rounds(end, PAGE_ROWS)
    assert rounds[-1] == str(total)  # stops at the last page
    assert end == total
    assert no_later


def test_every_row_is_exported_as_csv(tmp_path: Path) -> None:
    from dashboard.app import create_app

    builder = _three_rounds(tmp_path)
    _edit_metric(builder.path, 3, "accuracy", 0.998)
    client = create_app(builder.url).server.test_client()
    response = client.get("/export/s1/metrics.csv")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    lines = response.get_data(as_text=True).splitlines()
    assert lines[0] == "Round,Model after round,Accuracy,Status"
    assert lines[1:] == [
        "1,1,0.812,agreed",
        "2,2,0.901,agreed",
        "3,3,0.998,not agreed (ledger check failed)",
    ]
    privacy = client.get("/export/s1/privacy.csv").get_data(as_text=True).splitlines()
    assert len(privacy) == 1 + 3 * len(PEERS)
    assert client.get("/export/s1/secrets.csv").status_code == 404
    assert client.get("/export/nope/metrics.csv").status_code == 404


def test_long_sessions_draw_lines_instead_of_bars() -> None:
    from dashboard.figures import BARS_UP_TO

    def figure_of(rounds: int) -> object:
        records = [stored(r, {"survivors": list(PEERS)}) for r in range(1, rounds + 1)]
        figure = figures.contributors_figure(contributors_table(session(), records))
        assert figure is not None
        return figure.data[0].type

    assert figure_of(BARS_UP_TO) == "bar"
    assert figure_of(BARS_UP_TO + 1) == "scatter"
