"""Unit tests of dashboard.data (ledger rows -> tables), dashboard.figures and the read-only
ledger source, without a browser."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dashboard_testlib import LedgerBuilder, proposal_text

from dashboard import figures
from dashboard.data import (
    Column,
    Table,
    budgets_from_proposal,
    default_session,
    dp_release_table,
    format_cell,
    format_time,
    hospital_privacy_table,
    metrics_table,
    participation_table,
    privacy_table,
    session_options,
    statistics_table,
    trust_table,
    verdict,
)
from dashboard.source import LedgerSource, LedgerSourceError, read_only_url
from peer.ledger import (
    AgreedRecord,
    JsonValue,
    LedgerProblem,
    LedgerReport,
    LedgerWriteError,
    ProblemKind,
    RoundAttempt,
    RoundStatus,
    SessionInfo,
    SessionStatus,
    StatisticsResult,
    StoredRecord,
)
from secagg.crypto import sha256

PEERS = ("hospital-a", "hospital-b", "hospital-c")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def session(
    session_id: str = "s1",
    status: SessionStatus = SessionStatus.RUNNING,
    created: datetime = T0,
    privacy: Mapping[str, JsonValue] | None = None,
) -> SessionInfo:
    text = proposal_text(session_id, privacy)
    return SessionInfo(
        session_id=session_id,
        proposal=text,
        proposal_hash=sha256(text.encode()),
        proposer="hospital-a",
        status=status,
        reason=None,
        created_at=created,
        participants=PEERS,
        threshold=2,
        rounds_planned=5,
    )


def stored(
    round_: int,
    metrics: Mapping[str, JsonValue],
    *,
    epsilon: Mapping[str, float] | None = None,
    signers: Sequence[str] = PEERS,
    session_id: str = "s1",
) -> StoredRecord:
    record = AgreedRecord.build(
        session_id,
        round_,
        aggregate_hash=sha256(b"agg", bytes([round_])),
        model_hash=sha256(b"model", bytes([round_])),
        metrics=metrics,
        epsilon=epsilon if epsilon is not None else dict.fromkeys(PEERS, 0.5),
        prev_hash=sha256(b"prev", bytes([round_])),
    )
    return StoredRecord(
        seq=round_,
        record=record,
        record_hash=record.record_hash(),
        signatures={p: b"sig" for p in signers},
        recorded_at=T0 + timedelta(minutes=round_),
    )


def attempt(
    round_: int,
    number: int = 1,
    *,
    status: RoundStatus = RoundStatus.AGREED,
    seconds: float | None = 12.5,
    dropped: Mapping[str, tuple[str, ...]] | None = None,
    reason: str | None = None,
) -> RoundAttempt:
    started = T0 + timedelta(minutes=round_, seconds=number)
    return RoundAttempt(
        session_id="s1",
        round=round_,
        attempt=number,
        aggregator="hospital-b",
        status=status,
        participants=PEERS,
        dropped=dropped or {},
        started_at=started,
        ended_at=None if seconds is None else started + timedelta(seconds=seconds),
        bytes_sent=1000 * number,
        bytes_received=2048,
        abort_reason=reason,
    )


# --------------------------------------------------------------------------- metrics


def test_metrics_table_orders_known_metrics_then_other_numbers() -> None:
    records = [
        stored(2, {"loss": 0.3, "accuracy": 0.9, "examples": 300, "aggregator": "hospital-b"}),
        stored(1, {"accuracy": 0.8, "note": "text", "survivors": list(PEERS), "flag": True}),
    ]
    table = metrics_table(records)
    assert table.column_keys() == ("round", "after", "accuracy", "loss", "examples", "status")
    assert table.column("round") == [1, 2]
    assert table.column("accuracy") == [0.8, 0.9]
    # A metric a round lacks is unknown, not zero.
    assert table.column("loss") == [None, 0.3]
    assert table.formatted()[0] == ["1", "1", "0.8", "—", "—", "agreed"]


def test_metrics_table_without_records_is_empty() -> None:
    table = metrics_table([])
    assert not table
    assert table.column_keys() == ("round", "after", "status")
    assert figures.quality_figure(table) is None
    assert figures.loss_figure(table) is None


def test_metrics_figures_carry_titles_units_and_values() -> None:
    table = metrics_table(
        [stored(r, {"accuracy": 0.7 + r / 10, "auc": 0.8, "loss": 1 / r}) for r in (1, 2)]
    )
    quality = figures.quality_figure(table)
    assert quality is not None
    assert quality.layout.title.text == "Global model quality"
    assert quality.layout.xaxis.title.text.startswith("Model after round")
    assert quality.layout.yaxis.title.text == "Score (0–1)"
    assert [trace.name for trace in quality.data] == ["Accuracy", "AUC"]
    assert list(quality.data[0].y) == pytest.approx([0.8, 0.9])
    loss = figures.loss_figure(table)
    assert loss is not None
    assert list(loss.data[0].y) == [1.0, 0.5]


# --------------------------------------------------------------------------- privacy


def test_privacy_table_accumulates_per_hospital_against_budget() -> None:
    records = [
        stored(1, {}, epsilon={"hospital-a": 0.5, "hospital-b": 0.25}),
        stored(2, {}, epsilon={"hospital-a": 0.75}),
    ]
    table = privacy_table(records, {"hospital-a": 1.0})
    rows = [(r["round"], r["peer"], r["cumulative"], r["remaining"]) for r in table.rows]
    assert rows == [
        (1, "hospital-a", 0.5, 0.5),
        (1, "hospital-b", 0.25, None),
        (2, "hospital-a", 1.25, -0.25),
    ]
    cumulative = figures.privacy_cumulative_figure(table)
    assert cumulative is not None
    names = [trace.name for trace in cumulative.data]
    assert names == ["hospital-a", "hospital-b", "Budget (ε = 1)"]


def test_privacy_figure_draws_one_budget_line_per_hospital_when_they_differ() -> None:
    table = privacy_table([stored(1, {})], {"hospital-a": 1.0, "hospital-b": 2.0})
    figure = figures.privacy_cumulative_figure(table)
    assert figure is not None
    budget_lines = [t for t in figure.data if "budget" in t.name]
    assert [(t.name, list(t.y)) for t in budget_lines] == [
        ("hospital-a budget (ε = 1)", [1.0, 1.0]),
        ("hospital-b budget (ε = 2)", [2.0, 2.0]),
    ]


@pytest.mark.parametrize(
    ("privacy", "expected"),
    [
        ({"epsilon": 3}, dict.fromkeys(PEERS, 3.0)),
        ({"max_epsilon": 2.5, "epsilon": 9}, dict.fromkeys(PEERS, 2.5)),
        (
            {"epsilon": 3, "budgets": {"hospital-b": 1}},
            {**dict.fromkeys(PEERS, 3.0), "hospital-b": 1.0},
        ),
        ({"budgets": {"hospital-c": 4, "hospital-a": "lots"}}, {"hospital-c": 4.0}),
        ({"epsilon": -1}, {}),
        ({}, {}),
    ],
)
def test_budgets_from_proposal(privacy: dict[str, JsonValue], expected: dict[str, float]) -> None:
    assert budgets_from_proposal(proposal_text("s1", privacy), PEERS) == expected


def test_budgets_from_unreadable_proposals_are_unknown() -> None:
    assert budgets_from_proposal("not json", PEERS) == {}
    assert budgets_from_proposal(json.dumps([1, 2]), PEERS) == {}
    assert budgets_from_proposal(json.dumps({"privacy": "strong"}), PEERS) == {}


# --------------------------------------------------------------------------- participation


def test_participation_shows_survivors_dropouts_aggregator_and_cost() -> None:
    records = [
        stored(1, {"survivors": list(PEERS), "aggregator": "hospital-a"}),
        stored(
            2,
            {"survivors": ["hospital-a", "hospital-b"], "aggregator": "hospital-c"},
            signers=("hospital-a", "hospital-b"),
        ),
    ]
    attempts = [
        attempt(1),
        attempt(2, 1, status=RoundStatus.ABORTED, seconds=4, reason="aggregator died"),
        attempt(2, 2, dropped={"masked": ("hospital-c",)}),
        attempt(3, 1, status=RoundStatus.RUNNING, seconds=None),
    ]
    table = participation_table(session(), records, attempts)
    first, second, third = table.rows
    assert first["aggregator"] == "hospital-a"
    assert first["survivors"] == "3 of 3"
    assert first["dropouts"] == "none"
    assert first["duration_s"] == 12.5
    assert second["status"] == "agreed"
    assert second["attempts"] == 2
    assert second["survivors"] == "2 of 3"
    assert second["dropouts"] == "hospital-c (at masked)"
    # From the first attempt's start to the last attempt's end; bytes over both attempts.
    assert second["duration_s"] == 1 + 12.5
    assert second["bytes_sent"] == 1000 + 2000
    assert third["status"] == "running"
    assert third["aggregator"] == "hospital-b"
    assert third.get("duration_s") is None
    duration = figures.duration_figure(table)
    assert duration is not None
    assert list(duration.data[0].x) == [1, 2]


def test_aborted_round_shows_its_reason() -> None:
    table = participation_table(
        session(), [], [attempt(1, status=RoundStatus.ABORTED, reason="too few peers")]
    )
    assert table.rows[0]["status"] == "aborted: too few peers"


# --------------------------------------------------------------------------- trust


def test_trust_table_counts_signatures_and_reports_problems_per_record() -> None:
    records = [stored(1, {}), stored(2, {}, signers=("hospital-a", "hospital-c"))]
    unchecked = trust_table(session(), records, None)
    assert unchecked.column("signatures") == ["3 of 3", "2 of 3"]
    assert unchecked.column("signers")[1] == "hospital-a, hospital-c"
    assert unchecked.column("check") == ["not checked", "not checked"]
    problem = LedgerProblem(ProblemKind.BAD_SIGNATURE, "signature of 'hospital-c' is bad", 2)
    report = LedgerReport("ledger", records=2, checkpoints=2, problems=(problem,))
    checked = trust_table(session(), records, report)
    assert checked.column("check") == ["valid", "signature of 'hospital-c' is bad"]


def test_verdict_in_words() -> None:
    assert verdict(None).status == "unchecked"
    assert "no roster given" in verdict(None).headline
    assert verdict(LedgerReport("l", 2, 2)).headline.startswith("Ledger verified")
    problem = LedgerProblem(ProblemKind.BROKEN_LINK, "prev_hash is wrong", 2, "s1", 2)
    failed = verdict(LedgerReport("l", 2, 2, (problem,)))
    assert failed.status == "problems"
    assert failed.details == (str(problem),)
    assert verdict(None, error="disk gone").status == "error"


# --------------------------------------------------------------------------- the rest


def test_statistics_table() -> None:
    result = StatisticsResult(
        query_id="q1",
        session_id="s1",
        round=1,
        query={"kind": "count", "where": "diagnosis=M"},
        result={"count": 212},
        epsilon=0.5,
        created_at=T0,
    )
    table = statistics_table([result])
    assert table.formatted() == [
        ["q1", "1", '{"kind": "count", "where": "diagnosis=M"}', '{"count": 212}', "0.500",
         "2025-03-01 12:00:00"]
    ]  # fmt: skip


def test_sessions_default_to_the_newest_running_one() -> None:
    old = session("old", SessionStatus.RUNNING, T0)
    new = session("new", SessionStatus.FINISHED, T0 + timedelta(days=1))
    assert default_session([old, new]) == "old"
    assert default_session([session("a", SessionStatus.FINISHED, T0), new]) == "new"
    assert default_session([]) is None
    options = session_options([old, new], [stored(1, {}, session_id="old")])
    assert options == [
        {"label": "new — finished, 0 of 5 rounds agreed", "value": "new"},
        {"label": "old — running, 1 of 5 rounds agreed", "value": "old"},
    ]


@pytest.mark.parametrize(
    ("value", "kind", "text"),
    [
        (None, "float", "—"),
        (0.123456, "float", "0.1235"),
        (1234567, "int", "1,234,567"),
        (0.5, "epsilon", "0.500"),
        (12.345, "seconds", "12.3"),
        (512, "bytes", "512 B"),
        (3 * 1024 * 1024, "bytes", "3.0 MiB"),
    ],
)
def test_format_cell(value: float | None, kind: str, text: str) -> None:
    assert format_cell(value, Column("x", "X", kind)) == text


def test_format_time_is_utc() -> None:
    moment = datetime(2025, 3, 1, 13, 0, 5, tzinfo=UTC).astimezone()
    assert format_time(moment) == "2025-03-01 13:00:05 UTC"
    assert format_time(datetime(2025, 3, 1, 13, 0, 5), zone=False) == "2025-03-01 13:00:05"
    assert format_time(None) == "—"


def test_table_of_nothing_is_false() -> None:
    assert not Table((Column("a", "A"),))


# --------------------------------------------------------------------------- the source


def test_read_only_urls(tmp_path: Path) -> None:
    ledger = tmp_path / "my ledger.db"
    ledger.write_bytes(b"")
    expected = f"sqlite:///file:{tmp_path}/my%20ledger.db?mode=ro&uri=true"
    assert read_only_url(f"sqlite:///{ledger}") == expected
    assert read_only_url(str(ledger)) == expected
    pg = read_only_url("postgresql+psycopg://dash:secret@db/ledger")
    assert "default_transaction_read_only" in pg
    with pytest.raises(LedgerSourceError, match="no ledger file"):
        read_only_url(f"sqlite:///{tmp_path / 'missing.db'}")
    with pytest.raises(LedgerSourceError, match="in-memory"):
        read_only_url("sqlite://")


def test_source_reads_a_real_ledger_and_cannot_write_it(tmp_path: Path) -> None:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", privacy={"epsilon": 2})
    builder.agree_round("s1", 1, {"accuracy": 0.8})
    source = LedgerSource(builder.url, verifiers=builder.verifiers())
    try:
        snapshot = source.snapshot("s1")
        assert snapshot.session is not None
        assert [r.record.round for r in snapshot.records] == [1]
        assert snapshot.report is not None
        assert snapshot.report.ok
        # Same state, same digest: the page is not redrawn.
        assert source.snapshot("s1").digest() == snapshot.digest()
        # The connection itself refuses writes.
        with pytest.raises(LedgerWriteError, match="readonly"):
            source._ledger.record_proposal(
                "s2", "{}", proposer="hospital-a", participants=PEERS, threshold=2, rounds_planned=1
            )
        builder.agree_round("s1", 2, {"accuracy": 0.85})
        later = source.snapshot("s1")
        assert later.digest() != snapshot.digest()
        assert later.report is not None
        assert later.report.records == 2
    finally:
        source.close()


def test_tampered_ledger_is_reported_on_the_page(tmp_path: Path) -> None:
    import sqlite3

    from dashboard.app import render

    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1")
    builder.agree_round("s1", 1, {"accuracy": 0.8})
    builder.agree_round("s1", 2, {"accuracy": 0.9})
    with sqlite3.connect(builder.path) as db:
        db.execute(
            "UPDATE agreed_records SET metrics = ? WHERE round = 1",
            (json.dumps({"accuracy": 0.99}),),
        )
    source = LedgerSource(builder.url, verifiers=builder.verifiers())
    try:
        snapshot = source.snapshot("s1")
    finally:
        source.close()
    assert snapshot.report is not None
    assert [p.kind for p in snapshot.report.problems] == [ProblemKind.METRICS_HASH]
    sections = render(snapshot)
    trust = str(sections[6])
    # The verdict is shown with the headline; the problems are listed under Trust.
    assert "Ledger check FAILED: 1 problem(s)" in str(sections[2])
    assert "metrics_hash" in trust
    assert "FAILED" in str(sections[2])
    assert "Ledger check FAILED at round 1 of session s1" in str(sections[0])


def test_page_without_privacy_spending_says_so(tmp_path: Path) -> None:
    from dashboard.app import render

    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1")
    builder.agree_round("s1", 1, {"summed": 3}, epsilon=dict.fromkeys(PEERS, 0.0))
    source = LedgerSource(builder.url)
    try:
        sections = render(source.snapshot("s1"))
    finally:
        source.close()
    privacy = str(sections[4])
    assert "No differential privacy was spent" in privacy
    assert "privacy-round-chart" not in privacy
    assert "Signatures counted but not verified: no roster given" in str(sections[2])


def test_training_rounds_show_their_type_and_charts_skip_text() -> None:
    records = [
        stored(1, {"round_kind": "standardize", "examples": 300, "standardization": {"m": [1]}}),
        stored(2, {"round_kind": "train", "accuracy": 0.8, "examples": 300, "n": 90}),
    ]
    table = metrics_table(records)
    assert table.column_keys() == (
        "round",
        "after",
        "round_kind",
        "accuracy",
        "examples",
        "n",
        "status",
    )
    assert table.column("round_kind") == ["standardize", "train"]
    assert table.column("accuracy") == [None, 0.8]
    # Round 2 (train) evaluates the model it starts from: the one agreed after round 1.
    assert table.column("after") == [None, 1]
    quality = figures.quality_figure(table)
    assert quality is not None
    assert list(quality.data[0].x) == [1]


def test_dp_release_table_names_every_noised_publication() -> None:
    records = [
        stored(1, {"dp": {"standardization": {"mechanism": "gaussian", "sigma": 8.0}}}),
        stored(
            2,
            {
                "accuracy": 0.8,
                "dp": {
                    "delta": 1e-5,
                    "evaluation": {"mechanism": "gaussian", "sigma": 5.0},
                    "update": {"mechanism": "poisson-gaussian", "sigma": 1.5},
                },
            },
        ),
        stored(3, {"statistics": {"age": {"type": "mean", "epsilon": 0.5}}}),
    ]
    table = dp_release_table(records)
    rows = [(r["round"], r["mechanism"], r["sigma"], r["epsilon"]) for r in table.rows]
    assert rows == [
        (1, "gaussian", 8.0, None),
        (2, "gaussian", 5.0, None),
        (2, "poisson-gaussian", 1.5, None),
        (3, "geometric", None, 0.5),
    ]
    assert not dp_release_table([stored(1, {"accuracy": 0.5})])


def test_hospital_privacy_is_composed_over_every_charged_release() -> None:
    from peer.ledger import ChargedRelease, PrivacyCharge, PrivacyKind
    from peer.training.accounting import composed_epsilon, gaussian_event

    event = gaussian_event(4.0)
    charges = [
        ChargedRelease(
            session, 1, attempt, f"v{session}{attempt}",
            PrivacyCharge("hospital-a", PrivacyKind.TRAINING, 0.9, 0.0, event), None,
        )
        for session, attempt in (("s1", 1), ("s1", 2), ("s2", 1))
    ]  # fmt: skip
    table = hospital_privacy_table(charges, {"hospital-a": 8.0})
    (row,) = table.rows
    assert row["releases"] == 3
    assert row["epsilon"] == pytest.approx(composed_epsilon([event] * 3))
    assert row["remaining"] == pytest.approx(8.0 - composed_epsilon([event] * 3))
    assert not hospital_privacy_table([], {})
