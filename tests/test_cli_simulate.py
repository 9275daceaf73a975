"""`ceremony simulate`: the JSON contract, the .npy round trip, attacks and bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scripts.ceremony import main

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["advertise", "share", "masked", "consistency", "unmask", "prove"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["simulate", *argv, "--json", "--quiet"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return code, json.loads(lines[0])


def test_json_fields_and_drops(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(
        capsys, "--peers", "8", "--length", "50", "--drop", "masked:2", "unmask:1", "--seed", "3"
    )
    assert code == 0
    assert report["ok"] is True
    assert report["correct"] is True
    assert set(report["dropped"]) == set(STAGES)
    masked = report["dropped"]["masked"]
    assert len(masked) == 2
    assert len(report["dropped"]["unmask"]) == 1
    # Peers dropped at masked are out of the sum; a peer dropped at unmask is still in it.
    assert sorted(report["survivors"]) == sorted(set(range(8)) - set(masked))
    assert set(report["dropped"]["unmask"]) <= set(report["survivors"])
    for stage in [*STAGES, "total"]:
        timing = report["timings_s"][stage]
        assert timing["aggregator"] >= 0
        assert timing["participant_median"] >= 0
    assert report["timings_s"]["masked"]["participant_median"] > 0
    # Each peer sends at least its masked vector (50 words of 4 bytes).
    assert report["bytes_per_peer"]["sent"] > 200
    assert report["bytes_per_peer"]["received"] > 0
    assert report["threshold"] == 5


def test_seed_chooses_the_dropped_peers(capsys: pytest.CaptureFixture[str]) -> None:
    picks = set()
    for seed in range(4):
        _, report = run_json(
            capsys, "--peers", "9", "--length", "4", "--drop", "masked:3", "--seed", str(seed)
        )
        picks.add(tuple(report["dropped"]["masked"]))
    assert len(picks) > 1


def test_inputs_output_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    inputs = rng.integers(0, 2**32, size=(7, 33), dtype=np.uint64).astype(np.uint32)
    inputs_path, output_path = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(inputs_path, inputs)
    code, report = run_json(
        capsys,
        *("--peers", "7", "--length", "33", "--drop", "masked:2", "--seed", "11"),
        *("--inputs", str(inputs_path), "--output", str(output_path)),
    )
    assert code == 0
    aggregate = np.load(output_path)
    assert aggregate.dtype == np.uint32
    assert aggregate.shape == (33,)
    survivors = report["survivors"]
    assert len(survivors) == 5
    expected = inputs[survivors].sum(axis=0, dtype=np.uint64) % 2**32
    np.testing.assert_array_equal(aggregate, expected.astype(np.uint32))
    # The dropped peers' inputs are really left out: the sum over everyone differs.
    everyone = inputs.sum(axis=0, dtype=np.uint64) % 2**32
    assert not np.array_equal(aggregate, everyone.astype(np.uint32))


def test_secagg_plus_graph(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(
        capsys,
        *("--peers", "12", "--length", "20", "--graph", "secagg+", "--degree", "4"),
        *("--drop", "masked:1"),
    )
    assert code == 0
    assert report["ok"]
    assert report["graph"] == "secagg+"
    assert report["degree"] == 4
    assert report["threshold"] == 3
    assert len(report["survivors"]) == 11


@pytest.mark.parametrize(
    "attack",
    [
        "both-shares",
        "substitute-key",
        "split-survivors",
        "replay",
        "wrong-sum",
        "two-view",
        "two-view-stealth",
        "isolate",
    ],
)
def test_attacks_are_refused(capsys: pytest.CaptureFixture[str], attack: str) -> None:
    code, report = run_json(capsys, "--peers", "6", "--length", "8", "--attack", attack)
    assert code == 0, report
    assert report["ok"] is True
    assert report["attack"] == attack
    if attack == "wrong-sum":
        assert "differs" in report["transcript_error"]
    else:
        assert report["refusals"], report
        assert all(reason.startswith("aggregator:") for reason in report["refusals"].values())


def test_two_view_attack_text_summary_names_the_aggregator(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            *("simulate", "--peers", "10", "--length", "4", "--graph", "secagg+"),
            *("--degree", "4", "--attack", "two-view", "--quiet"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "refused: peer-" in out
    assert "aggregator: survivor peer-000 masked with only 0 other survivors" in out
    assert "verdict: attack detected" in out


def test_text_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--peers", "5", "--length", "10", "--drop", "masked:1", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    for stage in STAGES:
        assert stage in out
    assert "survivors: 4 of 5" in out
    assert "verdict: OK" in out
    assert "expansion" in out


def test_aborted_round_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    # Not certain up front (5 of 8 remain, threshold 2, quorum 5), but on this sparse ring
    # the seed's dropouts leave a dropped peer's mask key with too few share holders: the
    # round stops.
    code, report = run_json(
        capsys,
        *("--peers", "8", "--length", "4", "--graph", "secagg+", "--degree", "2"),
        *("--drop", "masked:3", "--threshold", "2", "--seed", "0"),
    )
    assert code == 1
    assert report["ok"] is False
    assert "needed" in report["aborted"]
    assert report["survivors"] == []


BAD_ARGUMENTS = [
    (["--peers", "5", "--length", "4", "--threshold", "6"], "threshold"),
    (["--peers", "5", "--length", "4", "--threshold", "2"], "too weak"),
    (["--peers", "5", "--length", "4", "--drop", "masked:3"], "at most 2 peers may drop"),
    (["--peers", "5", "--length", "4", "--drop", "share:1", "unmask:2"], "at most 2"),
    (["--peers", "5", "--length", "4", "--drop", "sharing:1"], "unknown stage"),
    (["--peers", "5", "--length", "4", "--drop", "masked"], "STAGE:COUNT"),
    (["--peers", "5", "--length", "4", "--drop", "masked:x"], "integer"),
    (["--peers", "5", "--length", "4", "--drop", "masked:-1"], "negative"),
    (["--peers", "9", "--length", "4", "--graph", "secagg+", "--degree", "3"], "even"),
    (["--peers", "5", "--length", "4", "--degree", "2"], "--degree only applies"),
    (["--peers", "1", "--length", "4"], "--peers"),
    (["--peers", "5", "--length", "0"], "--length"),
    (["--peers", "5", "--length", "4", "--graph", "star"], "invalid choice"),
    (["--peers", "five", "--length", "4"], "invalid int"),
    (["--length", "4"], "--peers"),
    (["--peers", "5", "--length", "4", "--inputs", "/nonexistent/x.npy"], "no such file"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code = main(["simulate", *argv, "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert needle in lines[0]


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.zeros((5, 4), dtype=np.int64), "dtype is int64"),
        (np.zeros((5, 4), dtype=np.float32), "dtype is float32"),
        (np.zeros((4, 4), dtype=np.uint32), "shape is (4, 4)"),
        (np.zeros(20, dtype=np.uint32), "shape is (20,)"),
    ],
)
def test_bad_input_arrays(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, array: np.ndarray[Any, Any], needle: str
) -> None:
    path = tmp_path / "x.npy"
    np.save(path, array)
    code = main(["simulate", "--peers", "5", "--length", "4", "--inputs", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert needle in err
    assert "Traceback" not in err


def test_not_an_npy_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    path.write_text("patient_id,value\n1,2\n")
    code = main(["simulate", "--peers", "5", "--length", "4", "--inputs", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_subprocess_json() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.ceremony",
            *("simulate", "--peers", "6", "--length", "16", "--drop", "masked:1", "--json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["ok"] is True
    assert len(report["survivors"]) == 5
    assert len(report["dropped"]["masked"]) == 1


def test_subprocess_bad_argument() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.ceremony",
            "simulate",
            "--peers",
            "4",
            "--length",
            "2",
            "--drop",
            "unknown:1",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.count("\n") == 1
    assert "Traceback" not in completed.stderr
    assert "unknown stage" in completed.stderr
