"""The Prometheus metrics of a peer (peer/metrics.py) and its ``[metrics]`` table."""

from __future__ import annotations

import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peer.config import ConfigFileError, _metrics
from peer.ledger import Ledger, PrivacyCharge, PrivacyKind
from peer.metrics import MetricsAddressError, PeerMetrics
from peer.round.context import RoundOutcome, RoundStatusKind

NOW = datetime(2026, 1, 1, tzinfo=UTC)
EXPIRES = NOW + timedelta(days=30, hours=12)


def _certificate(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hospital-a")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(EXPIRES)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def metrics(tmp_path: Path) -> PeerMetrics:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.create()
    ledger.record_proposal(
        "s1", "{}", proposer="op", participants=["a", "b", "c"], threshold=2, rounds_planned=1
    )
    for release, epsilon in (("r1", 0.5), ("r2", 0.25)):
        ledger.charge_release(
            "s1", 1, 0, release, PrivacyCharge("a", PrivacyKind.STATISTICS, epsilon, 0.0)
        )
    return PeerMetrics(
        "a",
        ledger,
        max_epsilon=2.0,
        certificate=_certificate(tmp_path / "a.pem"),
        now=lambda: NOW,
    )


def _value(metrics: PeerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_counters_follow_round_outcomes(metrics: PeerMetrics) -> None:
    metrics.round_finished(
        RoundOutcome(RoundStatusKind.AGREED, "b", bytes_sent=100, bytes_received=40), 1.5
    )
    metrics.round_finished(
        RoundOutcome(
            RoundStatusKind.ABORTED,
            "b",
            # c dropped in two stages counts once; d once.
            dropped={"masked": ["c", "d"], "unmask": ["c"]},
            bytes_sent=10,
            bytes_received=5,
        ),
        3.0,
    )
    assert _value(metrics, "peer_rounds_total", outcome="agreed") == 1
    assert _value(metrics, "peer_rounds_total", outcome="aborted") == 1
    assert _value(metrics, "peer_rounds_total", outcome="refused") is None
    assert _value(metrics, "peer_dropouts_total") == 2
    assert _value(metrics, "peer_bytes_sent_total") == 110
    assert _value(metrics, "peer_bytes_received_total") == 45
    assert _value(metrics, "peer_round_seconds_count", outcome="aborted") == 1
    assert _value(metrics, "peer_round_seconds_sum", outcome="agreed") == 1.5


def test_gauges_read_the_ledger_and_certificate(metrics: PeerMetrics) -> None:
    assert _value(metrics, "peer_epsilon_spent", budget="max_epsilon") == pytest.approx(0.75)
    assert _value(metrics, "peer_epsilon_remaining", budget="max_epsilon") == pytest.approx(1.25)
    assert _value(metrics, "peer_certificate_days_to_expiry") == pytest.approx(30.5)
    # Read at scrape time: a new charge shows at once.
    metrics.ledger.charge_release(
        "s1", 1, 0, "r3", PrivacyCharge("a", PrivacyKind.STATISTICS, 2.0, 0.0)
    )
    assert _value(metrics, "peer_epsilon_remaining", budget="max_epsilon") == 0.0


def test_remote_address_refused_unless_allowed(metrics: PeerMetrics) -> None:
    with pytest.raises(MetricsAddressError, match=r"0\.0\.0\.0.*allow_remote = true"):
        metrics.serve("0.0.0.0", 0)
    with pytest.raises(MetricsAddressError, match=r"example\.org"):
        metrics.serve("example.org", 0)


def test_endpoint_serves_on_loopback(metrics: PeerMetrics) -> None:
    metrics.round_finished(RoundOutcome(RoundStatusKind.AGREED, "b", bytes_sent=7), 0.1)
    port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        metrics.close()
    assert 'peer_rounds_total{outcome="agreed"} 1.0' in text
    assert "peer_bytes_sent_total 7.0" in text
    assert 'peer_epsilon_spent{budget="max_epsilon"} 0.75' in text
    assert "peer_certificate_days_to_expiry 30.5" in text


def test_metrics_table_parsing() -> None:
    assert _metrics({}, "x") is None
    parsed = _metrics({"metrics": {}}, "x")
    assert parsed is not None
    assert (parsed.host, parsed.port) == ("127.0.0.1", 9464)
    parsed = _metrics({"metrics": {"listen": "[::1]:9000", "allow_remote": True}}, "x")
    assert parsed is not None
    assert (parsed.host, parsed.port, parsed.allow_remote) == ("[::1]", 9000, True)
    with pytest.raises(ConfigFileError, match="'listen' must be host:port"):
        _metrics({"metrics": {"listen": "9464"}}, "x")
    with pytest.raises(ConfigFileError, match="'allow_remote' must be a bool"):
        _metrics({"metrics": {"allow_remote": "yes"}}, "x")
    with pytest.raises(ConfigFileError, match=r"\[metrics\] must be a table"):
        _metrics({"metrics": 3}, "x")


def test_stage_timer_observes_each_stage_until_the_next(metrics: PeerMetrics) -> None:
    clock = iter([0.0, 1.0, 1.5, 4.0, 4.0, 10.0, 11.0]).__next__
    timer = metrics.stage_timer(clock)
    timer.enter("advertise")  # 0.0
    timer.enter("share")  # 1.0: advertise lasted 1 s
    timer.enter("share")  # 1.5: a detail changed, still sharing
    timer.enter("verify")  # 4.0: share lasted 3 s
    timer.enter("agree")  # 4.0: verify took no time at all
    timer.finish()  # 10.0: agree lasted 6 s
    assert _value(metrics, "peer_stage_seconds_sum", stage="advertise") == 1.0
    assert _value(metrics, "peer_stage_seconds_count", stage="share") == 1
    assert _value(metrics, "peer_stage_seconds_sum", stage="share") == 3.0
    assert _value(metrics, "peer_stage_seconds_sum", stage="verify") == 0.0
    assert _value(metrics, "peer_stage_seconds_sum", stage="agree") == 6.0
    timer.finish()  # a second finish observes nothing more
    assert _value(metrics, "peer_stage_seconds_count", stage="agree") == 1
