"""``ceremony report``: the audit report of one session, checked as a reader sees it.

The HTML is read for its content; the PDF is printed by headless Chromium, then turned back
into text (``pdftotext``) and into page images (``pdftoppm``) to check that the words and
the plots are on the pages. Without Chromium or poppler-utils those tests skip, except under
CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dashboard"))
from dashboard_testlib import PEERS, LedgerBuilder

from scripts.ceremony import main
from scripts.ceremony_report import chromium_binary

pytestmark = pytest.mark.timeout(300)

HISTOGRAM = {"positive": [0, 0, 1, 2, 5, 12], "negative": [20, 9, 4, 2, 1, 0]}


def _study(tmp_path: Path) -> LedgerBuilder:
    """A training session as peer.payloads.training records it: standardize, train, evaluate."""
    builder = LedgerBuilder.create(tmp_path)
    privacy = {"epsilon_budget": 3.0, "noise_multiplier": 1.1, "delta": 1e-5}
    builder.add_session("study-1", rounds=4, privacy=privacy)
    builder.agree_round(
        "study-1",
        1,
        {"round_kind": "standardize", "examples": 900},
        epsilon=dict.fromkeys(PEERS, 0.0),
    )
    for round_, kind, accuracy, auc in (
        (2, "train", 0.23, 0.15),
        (3, "train", 0.88, 0.91),
        (4, "evaluate", 0.938, 0.962),
    ):
        builder.agree_round(
            "study-1",
            round_,
            {
                "round_kind": kind,
                "accuracy": accuracy,
                "auc": auc,
                "loss": 1 - accuracy,
                "n": 56,
                "examples": 900,
                "score_histogram": HISTOGRAM,
                "evaluated": "model entering this round",
            },
            epsilon=dict.fromkeys(PEERS, 0.0 if kind == "evaluate" else 0.8),
            survivors=PEERS[:2] if round_ == 3 else PEERS,
        )
    return builder


def _roster_args(builder: LedgerBuilder) -> list[str]:
    roster = builder.federation.roster_path
    assert roster is not None
    return ["--roster", str(roster), "--ca", str(builder.federation.ca.cert_path)]


def _needs(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None and tool != "chromium"]
    if "chromium" in tools and chromium_binary() is None:
        missing.append("chromium")
    if missing:
        reason = f"{', '.join(missing)} not installed (apt-get install chromium poppler-utils)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the report test must run in CI)")
        pytest.skip(reason)


def test_html_report_holds_what_an_ethics_board_asks_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = _study(tmp_path)
    out = tmp_path / "report.html"
    code = main(
        [
            "report",
            "--ledger",
            builder.url,
            "--session",
            "study-1",
            "--out",
            str(out),
            *_roster_args(builder),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "ledger check passed" in capsys.readouterr().out
    page = out.read_text()
    # Federation and every institution with its certificate fingerprint.
    for member in builder.federation.members.values():
        assert member.peer_id in page
        fingerprint = builder.federation.roster.get(member.peer_id)
        assert fingerprint is not None
        assert fingerprint.cert_fingerprint_sha256 in page
    assert builder.federation.roster.ca_fingerprint in page
    # Proposal with its DP parameters and thresholds; each site's participation.
    assert "noise_multiplier = 1.1" in page
    assert "2 of 3" in page
    assert "4 of 4" in page
    assert "3 of 4" in page
    # Every round: aggregator, dropouts, signatures.
    assert "hospital-c (at masked)" in page
    assert page.count("hash chain intact and every signature valid") == 1
    # ε per hospital against budget: 0.8 + 0.8 (hospital-c: 0.8 + 0, dropped in round 3).
    assert "1.600" in page
    assert "3.000" in page
    assert "1.400" in page
    # The agreed metrics with plots, the final model named as such.
    assert "0.938" in page
    assert page.count("<svg") == 4  # quality, loss, ROC, calibration
    assert "ROC curve, model after round 3" in page
    assert "Final agreed model, after round 3:</strong> Accuracy 0.938, AUC 0.962" in page
    assert f"from the ledger {builder.url}." in page
    assert "What the hospitals learned, and what they did not" in page
    assert "no patient record left any hospital" in page
    assert "<script" not in page
    assert "http://" not in page.replace("http://www.w3.org", "")


def test_report_of_a_tampered_ledger_says_so_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = _study(tmp_path)
    with sqlite3.connect(builder.path) as db:
        (text,) = db.execute("SELECT metrics FROM agreed_records WHERE round = 4").fetchone()
        metrics = json.loads(text)
        metrics["accuracy"] = 0.998
        db.execute("UPDATE agreed_records SET metrics = ? WHERE round = 4", (json.dumps(metrics),))
    out = tmp_path / "report.html"
    # Without a roster: the keyless check still finds the edit.
    code = main(["report", "--ledger", builder.url, "--session", "study-1", "--out", str(out)])
    assert code == 1
    assert "ledger check FAILED" in capsys.readouterr().out
    page = out.read_text()
    assert "Ledger check FAILED at round 4 of session study-1" in page
    assert "not agreed (ledger check failed)" in page
    assert "Final agreed model, after round 3: its evaluation failed the ledger check" in page
    assert "0.998" not in page.split("Agreed metrics")[1].split("<table>")[0]
    assert "No roster was given" in page


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--session", "nope", "--out", "r.html"], "no session 'nope'"),
        (["--session", "study-1", "--out", "r.txt"], "must end in .html or .pdf"),
        (["--session", "study-1", "--out", "/no/dir/r.html"], "does not exist"),
        (["--session", "study-1", "--out", "r.html", "--roster", "x.json"], "go together"),
    ],
)
def test_bad_requests_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    builder = _study(tmp_path)
    os.chdir(tmp_path)
    code = main(["report", "--ledger", builder.url, *args])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert fragment in err


def test_pdf_pages_show_the_text_and_the_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _needs("chromium", "pdftotext", "pdftoppm")
    builder = _study(tmp_path)
    out = tmp_path / "report.pdf"
    code = main(
        [
            "report",
            "--ledger",
            builder.url,
            "--session",
            "study-1",
            "--out",
            str(out),
            *_roster_args(builder),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes().startswith(b"%PDF")
    text = subprocess.run(
        ["pdftotext", "-layout", str(out), "-"], capture_output=True, text=True, check=True
    ).stdout
    for expected in (
        "Audit report — session study-1",
        "Ledger verified",
        "What the hospitals learned",
        "Federation and institutions",
        "Proposal and acceptance",
        "Differential privacy spent",
        "Global model quality",
        "ROC curve, model after round 3",
    ):
        assert expected in text, expected
    # Pages as images (PPM: raw RGB, read without an imaging library).
    subprocess.run(["pdftoppm", "-r", "50", str(out), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.ppm"))
    assert len(pages) >= 2
    # The plots are drawn: the pages hold many pixels of the plot colours (Okabe–Ito blue
    # and vermillion), which no text or table uses.
    plot_pixels = sum(_pixels_near(path, (0x00, 0x72, 0xB2)) for path in pages)
    plot_pixels += sum(_pixels_near(path, (0xD5, 0x5E, 0x00)) for path in pages)
    assert plot_pixels > 500, plot_pixels


def _pixels_near(path: Path, color: tuple[int, int, int], tolerance: int = 40) -> int:
    data = path.read_bytes()
    # Binary PPM: "P6\n<width> <height>\n<max>\n" then RGB bytes.
    magic, size, maximum, pixels = data.split(b"\n", 3)
    assert magic == b"P6"
    assert maximum == b"255"
    width, height = (int(v) for v in size.split())
    rgb = np.frombuffer(pixels[: width * height * 3], dtype=np.uint8).reshape(-1, 3)
    near = np.all(np.abs(rgb.astype(np.int16) - np.array(color)) < tolerance, axis=1)
    return int(near.sum())


def test_each_sites_signed_acceptance_is_listed_and_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = _study(tmp_path)
    builder.accept("study-1")
    out = tmp_path / "report.html"
    argv = ["report", "--ledger", builder.url, "--session", "study-1", "--out", str(out)]
    assert main([*argv, *_roster_args(builder)]) == 0, capsys.readouterr().err
    section = out.read_text().split("Proposal and acceptance")[1].split("<h2>")[0]
    for peer in PEERS:
        assert f"<td>{peer}</td><td>accepted: signature verified</td>" in section, section
    # Without a roster: shown as signed, not claimed verified.
    assert main(argv) == 0
    section = out.read_text().split("Proposal and acceptance")[1].split("<h2>")[0]
    assert section.count("accepted: signed (not verified: no roster)") == len(PEERS)


def test_an_acceptance_signed_by_another_member_does_not_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The attack: hospital-a signs an acceptance in hospital-c's name.
    builder = _study(tmp_path)
    builder.accept("study-1", forged_by=PEERS[0])
    out = tmp_path / "report.html"
    argv = ["report", "--ledger", builder.url, "--session", "study-1", "--out", str(out)]
    main([*argv, *_roster_args(builder)])
    section = out.read_text().split("Proposal and acceptance")[1].split("<h2>")[0]
    assert f"<td>{PEERS[-1]}</td><td class='bad'>signature does NOT verify" in section
    assert f"<td>{PEERS[0]}</td><td>accepted: signature verified</td>" in section


def test_a_session_without_acceptances_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    builder = _study(tmp_path)
    out = tmp_path / "report.html"
    argv = ["report", "--ledger", builder.url, "--session", "study-1", "--out", str(out)]
    assert main([*argv, *_roster_args(builder)]) == 0
    assert out.read_text().count("no acceptance recorded") == len(PEERS)


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_report_shows_the_charts_of_the_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str
) -> None:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("study-2", rounds=3)
    builder.agree_round("study-2", 1, {"round_kind": "standardize"})
    final: dict[str, object]
    if task == "multiclass":
        untrained: dict[str, object] = {"accuracy": 0.31, "macro_f1": 0.2, "auc_ovr": 0.5}
        final = {
            "accuracy": 0.77,
            "macro_f1": 0.74,
            "auc_ovr": 0.88,
            "confusion_matrix": [[20.0, 3.0, 1.0], [4.0, 18.0, 2.5], [0.0, 2.0, 25.0]],
            "n": 73,  # the cells add up to 75.5: the noise clamped at 0 adds to them
        }
    else:
        untrained = {"mae": 150.0, "rmse": 170.0, "r2": -3.2}
        final = {
            "mae": 44.5,
            "rmse": 56.0,
            "r2": 0.47,
            "residual_histogram": {"edges": [-30.0, -10.0, 10.0, 30.0], "counts": [9, 60, 8]},
        }
    for round_, kind, metrics in ((2, "train", untrained), (3, "evaluate", final)):
        builder.agree_round("study-2", round_, {"round_kind": kind, **metrics})  # type: ignore[dict-item]
    out = tmp_path / "report.html"
    code = main(["report", "--ledger", builder.url, "--session", "study-2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    page = out.read_text()
    if task == "multiclass":
        assert "Confusion matrix, model after round 2" in page
        assert "Predicted class" in page
        assert ">25</text>" in page  # a cell's released count, written in the cell
        assert "Macro-F1 0.74" in page
        assert page.count("<svg") == 2  # quality (0-1 scores), confusion matrix
        # A reader adding up the cells is told why they exceed n.
        assert "shown as 0, so the cells can add up to more than the n = 73 evaluated" in page
    else:
        assert "Residuals, model after round 2" in page
        assert "Global prediction error" in page
        assert "Variance explained" in page
        assert "RMSE 56, MAE 44.5, R² 0.47" in page
        assert page.count("<svg") == 3  # errors, R², residuals
    assert "ROC curve" not in page
