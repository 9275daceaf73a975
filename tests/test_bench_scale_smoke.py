"""`bench scale --quick`: one real-peer row and one in-process aggregator row, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peer.cli import UsageError
from scripts import bench
from scripts.bench_scale import aggregator_memory, parse_row


def test_parse_row() -> None:
    assert parse_row("10x1000000") == (10, 1_000_000)
    for bad in ("10", "1x5", "ax3", "3x0"):
        with pytest.raises(UsageError):
            parse_row(bad)


def test_aggregator_memory_stays_near_one_vector_until_the_transcript(tmp_path: Path) -> None:
    # Large enough vectors that fixed-size buffers (the masking PRG's and the linear check's
    # chunks, about 1 MiB) and Python's own allocations do not dominate the count.
    row = aggregator_memory(6, 1_000_000, tmp_path)
    assert row["sum_verified"] is True
    # The running sum, the aggregate and chunk buffers: a few vectors, not n.
    assert row["peak_without_transcript_vectors"] < 4
    # The full transcript (every input, published until verification needs less) is n + 1.
    assert row["peak_with_transcript_vectors"] > 6
    assert list(tmp_path.iterdir()) == []  # the spool is gone


def test_quick_scale_bench_runs_real_peers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "scale.json"
    code = bench.main(["scale", "--quick", "--quiet", "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(output.read_text())
    assert report["benchmark"] == "scale"
    assert report["partial"] is False
    [row] = report["rows"]
    assert (row["n"], row["m"]) == (3, 1000)
    assert row["sum_verified"] is True
    assert row["round_median_s"] > 0
    assert row["bytes_per_peer_round"] >= 2 * 4 * 1000
    assert row["aggregator_peak_rss_mib"] >= row["aggregator_rss_before_mib"] > 0
    [memory] = report["in_process"]
    assert memory["sum_verified"] is True
    assert "aggregator peak" in capsys.readouterr().out


def test_the_aggregators_peak_does_not_grow_with_the_number_of_peers(tmp_path: Path) -> None:
    # The aggregator object alone (tracemalloc over its calls, participants not counted):
    # twice the peers, the same peak within half a vector. An aggregator that kept each
    # masked input (or anything of vector size per peer) until unmasking would add 4 vectors.
    # The transport's share (grpc's buffers per stream) is tests/round/test_round_read_ahead.py
    # and test_round_call_memory.py.
    few = aggregator_memory(4, 500_000, tmp_path)
    many = aggregator_memory(8, 500_000, tmp_path)
    assert few["sum_verified"]
    assert many["sum_verified"]
    growth = many["peak_without_transcript_vectors"] - few["peak_without_transcript_vectors"]
    assert growth < 0.5, f"{growth:.2f} vectors more for 4 more peers"
