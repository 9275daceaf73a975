"""`bench secagg --quick`: runs end to end in seconds and writes complete results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import bench
from scripts.ceremony import main as ceremony_main


def test_quick_secagg_bench_writes_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "results" / "secagg.json"
    code = bench.main(["secagg", "--quick", "--quiet", "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["quick"] is True
    assert report["machine"]["nproc"] >= 1
    masking = report["masking"]
    assert masking["floor_s"] > 0
    assert masking["mask_input_s"] > 0
    assert masking["ratio"] == pytest.approx(masking["mask_input_s"] / masking["floor_s"])
    # The participant's whole masked stage against the same floor (issue 11).
    assert masking["masked_stage_ratio"] == pytest.approx(
        masking["masked_stage_s"] / masking["floor_s"]
    )
    assert masking["masked_stage_cpu_ratio"] > 0
    assert [row["dropouts"] for row in report["unmask"]] == [0, 1]
    assert all(row["aggregator_unmask_s"] > 0 for row in report["unmask"])
    # The masked vector dominates what a peer sends: a little above 4 bytes per word.
    assert 1.0 < report["bytes"]["expansion"] < 1.5
    graphs = {(row["n"], row["graph"], row["dropout_fraction"]) for row in report["scaling"]}
    assert (12, "secagg+", 0.3) in graphs
    assert (12, "complete", 0.3) in graphs
    for row in report["scaling"]:
        assert row["survivors"] == row["n"] - row["dropped"]
        assert row["aggregator_s"] > 0
        assert row["participant_median_s"] > 0
    # The largest complete graph is timed on a sample of participants.
    sampled = [r for r in report["scaling"] if r["n"] == 12 and r["graph"] == "complete"]
    assert all(r["timed_participants"] == 4 for r in sampled)
    # A sparse graph's peers send fewer share ciphertexts than the complete graph's.
    by_graph = {r["graph"]: r for r in report["curve"] if r["n"] == 12}
    assert by_graph["secagg+"]["bytes_sent_per_peer"] < by_graph["complete"]["bytes_sent_per_peer"]
    assert {t["what"].split(" (")[0] for t in report["targets"]} >= {
        "participant masking / keystream floor",
        "aggregator",
        "participant",
    }
    out = capsys.readouterr().out
    assert "targets" in out
    assert str(output) in out


def test_ceremony_bench_delegates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "secagg.json"
    assert ceremony_main(["bench", "secagg", "--quick", "--quiet", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["benchmark"] == "secagg"


def test_unknown_benchmark_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["nonexistent"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "invalid choice" in err
