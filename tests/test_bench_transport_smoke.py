"""`bench transport --quick`: real peer processes, one plain and one secure session, in seconds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from peer.ledger import RoundAttempt, RoundStatus
from scripts import bench
from scripts.bench_transport import TransportBenchError, round_periods

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _attempt(round_: int, start: float, end: float | None) -> RoundAttempt:
    return RoundAttempt(
        session_id="s",
        round=round_,
        attempt=1,
        aggregator="a",
        status=RoundStatus.AGREED if end is not None else RoundStatus.RUNNING,
        participants=("a", "b"),
        dropped={},
        started_at=T0 + timedelta(seconds=start),
        ended_at=None if end is None else T0 + timedelta(seconds=end),
        bytes_sent=0,
        bytes_received=0,
        abort_reason=None,
    )


def test_round_periods_count_each_wait_once() -> None:
    # Round 1 runs from the first start (0.5) to the last end (3.0); round 2 from there to
    # the last end of round 2 (7.0), although peer a started it early and waited.
    attempts = {
        "a": [_attempt(1, 0.5, 2.0), _attempt(2, 2.0, 6.0)],
        "b": [_attempt(1, 1.0, 3.0), _attempt(2, 3.0, 7.0)],
    }
    periods = round_periods(attempts, 2)
    assert periods == pytest.approx([2.5, 4.0])
    assert sum(periods) == pytest.approx(7.0 - 0.5)


def test_round_periods_refuse_an_unfinished_round() -> None:
    attempts = {"a": [_attempt(1, 0.0, 1.0)], "b": [_attempt(1, 0.0, None)]}
    with pytest.raises(TransportBenchError, match="round 1"):
        round_periods(attempts, 1)


def test_quick_transport_bench_runs_real_peers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "results" / "transport.json"
    code = bench.main(
        ["transport", "--quick", "--quiet", "--with-cleartext", "--output", str(output)]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(output.read_text())
    assert report["benchmark"] == "transport"
    assert report["quick"] is True
    assert report["partial"] is False
    [row] = report["configs"]
    n, m = row["n"], row["m"]
    assert (n, m) == (3, 1000)
    kinds = sorted(s["aggregation"] for s in row["sessions"])
    assert kinds == ["cleartext", "plain", "secagg"]
    for session in row["sessions"]:
        assert session["sum_verified"] is True
        assert len(session["round_s"]) == session["rounds"] == 1
        assert len(session["aggregators"]) == 1
        # A participant sends at least its vector. Minimal FedAvg ("plain") returns only
        # the sum; the full-transcript round ("cleartext") every input and the sum, (n + 1)
        # vectors of 4-byte words; the secure round (succinct verification) only the sum,
        # with signed items and answers besides.
        assert session["bytes_sent_per_peer_median"] >= 4 * m
        received = session["bytes_received_per_peer_median"]
        if session["aggregation"] == "plain":
            assert 4 * m <= received < 2 * 4 * m
        elif session["aggregation"] == "cleartext":
            assert received >= (n + 1) * 4 * m
        else:
            assert 4 * m <= received < (n + 1) * 4 * m
    plain, secure = row["plain"], row["secure"]
    assert plain["round_median_s"] > 0
    assert secure["round_median_s"] > 0
    assert row["ratio"] == pytest.approx(secure["round_median_s"] / plain["round_median_s"])
    # Keys, encrypted shares and unmasking shares ride on top of the masked vector.
    assert secure["bytes_sent_per_peer"] > plain["bytes_sent_per_peer"]
    assert row["bytes_ratio"] == pytest.approx(
        (secure["bytes_sent_per_peer"] + secure["bytes_received_per_peer"])
        / (plain["bytes_sent_per_peer"] + plain["bytes_received_per_peer"])
    )
    full = row["cleartext_full_transcript"]
    assert full is not None
    assert full["bytes_received_per_peer"] > plain["bytes_received_per_peer"]
    assert report["targets"] == []  # the target is stated for n=10, m=1,000,000 only
    out = capsys.readouterr().out
    assert str(output) in out
    assert f"{m:,}" in out


def test_invalid_sizes_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["transport", "--peers", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--peers" in err
