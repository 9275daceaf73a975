"""`ceremony privacy`: known epsilons, calibration round trip, one-line argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peer.training import epsilon
from scripts.ceremony import main

ROOT = Path(__file__).resolve().parent.parent
# The DP-SGD paper's MNIST schedule (Abadi et al. 2016): batches of 256 of 60,000, 60 epochs.
MNIST = ["--sampling-rate", "256/60000", "--steps", "14040", "--delta", "1e-5"]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["privacy", *argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return code, json.loads(out[0])


@pytest.mark.parametrize(("accountant", "expected"), [("rdp", 2.59), ("pld", 2.38)])
def test_known_epsilon_of_the_mnist_schedule(
    capsys: pytest.CaptureFixture[str], accountant: str, expected: float
) -> None:
    code, report = run_json(capsys, *MNIST, "--noise-multiplier", "1.1", "--accountant", accountant)
    assert code == 0
    assert report["epsilon"] == pytest.approx(expected, abs=0.01)
    assert report["sampling_rate"] == pytest.approx(256 / 60000)
    assert report["accountant"] == accountant


def test_text_output_names_epsilon_and_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", *MNIST, "--noise-multiplier", "1.1", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "epsilon 2.59" in out
    assert "14040 steps" in out
    assert "RDP" in out


def test_target_epsilon_gives_the_smallest_sufficient_noise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    schedule = ["--sampling-rate", "0.01", "--steps", "2000", "--delta", "1e-5"]
    code, report = run_json(capsys, *schedule, "--target-epsilon", "1.5", "--accountant", "rdp")
    assert code == 0
    sigma = report["noise_multiplier"]
    assert report["target_epsilon"] == 1.5
    assert report["epsilon"] <= 1.5
    # Calibrated within its tolerance: a little less noise would overshoot the target.
    assert epsilon(0.01, sigma - 0.01, 2000, 1e-5, "rdp") > 1.5


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--sampling-rate", "2", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"],
         "--sampling-rate must be in (0, 1]"),
        (["--sampling-rate", "1/0", "--noise-multiplier", "1", "--steps", "3", "--delta", "1e-5"],
         "not a number or a fraction"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "0", "--delta", "1e-5"],
         "--steps must be at least 1"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "1", "--steps", "3", "--delta", "2"],
         "--delta must be in (0, 1)"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "-1", "--steps", "3", "--delta", "0.1"],
         "must be a positive number"),
        (["--sampling-rate", "0.1", "--noise-multiplier", "1", "--target-epsilon", "1",
          "--steps", "3", "--delta", "0.1"],
         "not allowed with argument"),
        (["--sampling-rate", "0.1", "--steps", "3", "--delta", "0.1"],
         "missing --noise-multiplier or --target-epsilon"),
        (["--ledger", "sqlite://"], "give --config, or --ledger and --peer"),
    ],
)  # fmt: skip
def test_bad_arguments_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    assert main(["privacy", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ceremony privacy: error: ")
    assert fragment in lines[0]


def test_subprocess() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "scripts.ceremony", "privacy", *MNIST, "--noise-multiplier",
         "1.1", "--accountant", "rdp", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["epsilon"] == pytest.approx(2.59, abs=0.01)
    helped = subprocess.run(
        [sys.executable, "-m", "scripts.ceremony", "privacy", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert helped.returncode == 0
    assert "--target-epsilon" in helped.stdout
    assert "256/60000" in helped.stdout


def test_a_hospitals_spending_is_composed_over_all_its_sessions(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Two sessions, three charged releases (one of an aborted attempt): the figure shown is
    the accountant's composition of all three against the global budget, not a sum per
    session."""
    from peer.ledger import Ledger, PrivacyCharge, PrivacyKind
    from peer.training.accounting import composed_epsilon, gaussian_event, pure_event

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    events = [gaussian_event(4.0), gaussian_event(4.0), pure_event(0.3)]
    with Ledger(url) as ledger:
        ledger.create()
        for session in ("s1", "s2"):
            ledger.record_proposal(
                session, "{}", proposer="op", participants=["a", "b"], threshold=2,
                rounds_planned=1,
            )  # fmt: skip
        for (session, attempt), event in zip(
            [("s1", 1), ("s1", 2), ("s2", 1)], events, strict=True
        ):
            charge = PrivacyCharge("a", PrivacyKind.TRAINING, 0.1, 0.0, event)
            ledger.charge_release(session, 1, attempt, f"v{attempt}{session}", charge)
    code, report = run_json(capsys, "--ledger", url, "--peer", "a", "--budget", "8")
    assert code == 0
    expected = composed_epsilon(events)
    assert report["epsilon"] == pytest.approx(expected)
    assert report["epsilon"] < 0.926 * 2 + 0.3  # tighter than adding up per release
    assert report["epsilon_rdp"] >= report["epsilon"] - 1e-3
    assert report["remaining"] == pytest.approx(8 - expected)
    assert [(r["session"], r["attempt"]) for r in report["releases"]] == [
        ("s1", 1), ("s1", 2), ("s2", 1)
    ]  # fmt: skip
    assert main(["privacy", "--ledger", url, "--peer", "a"]) == 0
    assert "composed over 3 release(s)" in capsys.readouterr().out
