"""`ceremony demo` as a user runs it: a subprocess, real peers, and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from peer.kit import free_port

ROOT = Path(__file__).resolve().parent.parent
ROUND_KEYS = {
    "round",
    "aggregator",
    "participants",
    "dropped",
    "accuracy",
    "loss",
    "auc",
    "epsilon",
    "signatures",
}
HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]

pytestmark = pytest.mark.timeout(300)


def demo(*argv: str, timeout: float = 240) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.ceremony", "demo", "--json", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    return result.returncode, report, result.stderr


def assert_gone(pids: dict[str, int]) -> None:
    assert set(pids) >= set(HOSPITALS)
    alive = []
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(f"{name} (pid {pid})")
    assert not alive, f"still running: {alive}"


def check_common(
    report: dict[str, Any], workdir: Path, rounds: int, store: str = "data.db"
) -> None:
    assert report["workdir"] == str(workdir)
    assert report["ledger_verified"] is True, report["ledger_problems"]
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    for row in report["rounds"]:
        assert set(row) >= ROUND_KEYS
        assert row["signatures"] == 3
        assert row["participants"] == HOSPITALS
        assert row["aggregator"] in HOSPITALS
        assert set(row["epsilon"]) == set(HOSPITALS)
    # Everything is kept: kits, patient databases, ledgers, logs.
    for peer_id in HOSPITALS:
        site = workdir / "federation" / "identities" / peer_id
        for name in (f"{peer_id}.toml", store, "ledger.db", "peer.log"):
            assert (site / name).is_file(), site / name


def test_demo_vector_smoke(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    code, report, err = demo(
        "--payload", "vector", "--rounds", "2", "--no-dashboard", "--workdir", str(workdir)
    )
    assert code == 0, err
    check_common(report, workdir, 2)
    assert report["payload"] == "vector"
    assert all(row["metrics"]["summed"] == 3 for row in report["rounds"])
    assert "round 2 agreed" in err
    assert_gone(report["pids"])


@pytest.mark.slow
def test_demo_trains_and_reports_agreed_metrics(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    code, report, err = demo("--rounds", "1", "--no-dashboard", "--workdir", str(workdir))
    assert code == 0, err
    # standardize, one training round, final evaluation
    check_common(report, workdir, 3)
    kinds = [row["metrics"]["round_kind"] for row in report["rounds"]]
    assert kinds == ["standardize", "train", "evaluate"]
    final = report["rounds"][-1]
    assert 0.0 <= final["accuracy"] <= 1.0
    assert 0.0 <= final["auc"] <= 1.0
    # The agreed loss is a noisy release clamped at 0: near a trained model it can be 0.
    assert final["loss"] >= 0
    training = report["rounds"][1]
    assert all(eps > 0 for eps in training["epsilon"].values())
    # The final evaluation sums are released with noise too, so they cost a little privacy
    # (less than a training round, which also releases the DP-SGD update).
    for peer, eps in final["epsilon"].items():
        assert 0 < eps < training["epsilon"][peer]
    assert_gone(report["pids"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_imaging_trains_a_cnn_on_dicom_scans(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    code, report, err = demo(
        "--task", "imaging", "--rounds", "2", "--no-dashboard", "--workdir", str(workdir),
        timeout=540,
    )  # fmt: skip
    assert code == 0, err
    # no patient store: the scans are read where they are
    check_common(report, workdir, 4, store="peer.log")
    assert report["task"] == "imaging"
    kinds = [row["metrics"]["round_kind"] for row in report["rounds"]]
    assert kinds == ["standardize", "train", "train", "evaluate"]
    # each hospital's scans are DICOM files it reads through its own [data] table
    for peer_id in HOSPITALS:
        scans = list((workdir / "imaging" / peer_id).glob("*.dcm"))
        assert len(scans) == 250
        assert (
            "[data]"
            in (workdir / "federation" / "identities" / peer_id / f"{peer_id}.toml").read_text()
        )
    final = report["rounds"][-1]
    assert 0.0 <= final["accuracy"] <= 1.0
    assert all(eps > 0 for eps in report["rounds"][1]["epsilon"].values())
    assert_gone(report["pids"])


def test_demo_serves_the_dashboard_and_sigterm_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scripts.ceremony",
            "demo",
            "--json",
            "--payload",
            "vector",
            "--rounds",
            "1",
            "--port",
            str(port),
            "--workdir",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed before the dashboard phase
        assert line, process.stderr.read() if process.stderr else ""
        report = json.loads(line)
        assert report["ledger_verified"] is True
        if report["dashboard"] is not None:
            assert report["dashboard"] == f"http://127.0.0.1:{port}"
            with urllib.request.urlopen(report["dashboard"], timeout=30) as page:
                assert page.status == 200
            assert "dashboard" in report["pids"]
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert_gone(report["pids"])


def test_demo_refuses_a_used_workdir(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    code, _, err = demo("--no-dashboard", "--workdir", str(tmp_path), timeout=60)
    assert code == 2
    assert err.strip().endswith("exists and is not an empty folder; pick a new one")
    assert "Traceback" not in err


def test_demo_refuses_a_busy_dashboard_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = demo("--port", str(port), "--workdir", str(tmp_path / "d"), timeout=60)
    assert code == 2
    assert f"port {port} is in use" in err
    assert not (tmp_path / "d").exists()  # refused before anything was made
