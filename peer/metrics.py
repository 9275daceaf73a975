"""A peer's Prometheus metrics: rounds, dropouts, bytes, round and stage durations, ε,
certificate expiry.

Enabled by an optional ``[metrics]`` table in the peer's configuration (peer/config.py)::

    [metrics]
    listen = "127.0.0.1:9464"   # loopback by default
    allow_remote = false        # true to serve on another address (see :meth:`serve`)

Each :class:`PeerMetrics` owns its registry (never prometheus_client's global one): several
peers may run in one process (the tests do). The ε and certificate gauges are computed when
scraped, from the ledger and the certificate file, so they are never stale.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .ledger import Ledger, LedgerError
from .round.context import RoundOutcome

__all__ = ["MetricsAddressError", "PeerMetrics", "StageTimer", "is_loopback"]

logger = logging.getLogger("peer.metrics")


class MetricsAddressError(ValueError):
    """The metrics endpoint would listen on a non-loopback address without ``allow_remote``."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class _ScrapeTimeGauges(Collector):
    """ε spent and remaining, and days until this peer's certificate expires, read per scrape."""

    def __init__(self, metrics: PeerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        m = self.metrics
        try:
            spent = m.ledger.privacy_spent(m.me).epsilon
        except LedgerError as error:
            # A scrape must not fail because the ledger is momentarily unreadable; the gauge
            # is absent for this scrape instead (and the reason is logged).
            logger.warning("peer=%s metrics: cannot read the privacy ledger: %s", m.me, error)
        else:
            yield _gauge("peer_epsilon_spent", "Composed epsilon spent (ledger)", spent)
            yield _gauge(
                "peer_epsilon_remaining",
                "Policy max_epsilon minus the composed epsilon spent",
                max(0.0, m.max_epsilon - spent),
            )
        expiry = m.certificate_expiry()
        if expiry is not None:
            days = (expiry - m.now()).total_seconds() / 86400
            yield GaugeMetricFamily(
                "peer_certificate_days_to_expiry",
                "Days until this peer's TLS certificate expires (negative: expired)",
                value=days,
            )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["budget"])
    family.add_metric(["max_epsilon"], value)
    return family


class PeerMetrics:
    """The metrics of one peer, on a registry of its own."""

    def __init__(
        self,
        me: str,
        ledger: Ledger,
        *,
        max_epsilon: float,
        certificate: Path,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.me = me
        self.ledger = ledger
        self.max_epsilon = max_epsilon
        self.certificate = certificate
        self.now = now
        self.registry = CollectorRegistry()
        self.rounds = Counter(
            "peer_rounds",
            "Round attempts this peer finished, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.dropouts = Counter(
            "peer_dropouts",
            "Participants the aggregator dropped, summed over rounds",
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "peer_bytes_sent", "Bytes this peer sent in rounds", registry=self.registry
        )
        self.bytes_received = Counter(
            "peer_bytes_received", "Bytes this peer received in rounds", registry=self.registry
        )
        self.round_seconds = Histogram(
            "peer_round_seconds",
            "Duration of a round attempt, from start to recorded outcome",
            ["outcome"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "peer_stage_seconds",
            "Time this peer spent in one stage of a round attempt, as a participant sees it: "
            "from reaching the stage until reaching the next one (see StageTimer)",
            ["stage"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.registry.register(_ScrapeTimeGauges(self))
        self._server: Any = None

    def stage_timer(self, clock: Callable[[], float] = time.monotonic) -> StageTimer:
        """A timer for one round attempt's stages, observed into ``peer_stage_seconds``."""
        return StageTimer(
            lambda stage, seconds: self.stage_seconds.labels(stage).observe(seconds), clock
        )

    def round_finished(self, outcome: RoundOutcome, seconds: float) -> None:
        """Count one finished round attempt (called where the runner records it)."""
        status = outcome.status.value
        self.rounds.labels(status).inc()
        self.round_seconds.labels(status).observe(seconds)
        self.bytes_sent.inc(outcome.bytes_sent)
        self.bytes_received.inc(outcome.bytes_received)
        # ``dropped`` maps a stage to the peers dropped in it; a peer counts once per round.
        self.dropouts.inc(len({peer for peers in outcome.dropped.values() for peer in peers}))

    def certificate_expiry(self) -> datetime | None:
        try:
            return x509.load_pem_x509_certificate(self.certificate.read_bytes()).not_valid_after_utc
        except (OSError, ValueError) as error:
            logger.warning("peer=%s metrics: cannot read %s: %s", self.me, self.certificate, error)
            return None

    def serve(self, host: str, port: int, *, allow_remote: bool = False) -> int:
        """Serve ``/metrics`` over plain HTTP on ``host:port``; returns the bound port.

        Raises:
            MetricsAddressError: ``host`` is not loopback and ``allow_remote`` is false. The
                endpoint has no TLS and no authentication, and it reveals the privacy budget
                left and when rounds run: only a local scraper (or one behind the site's own
                proxy) should see it unless the site decides otherwise.
        """
        if not allow_remote and not is_loopback(host):
            raise MetricsAddressError(
                f"metrics: refusing to listen on {host}:{port}: the endpoint is unauthenticated "
                "plain HTTP and shows the remaining privacy budget; use 127.0.0.1 (behind a "
                "proxy) or set allow_remote = true in [metrics]"
            )
        server, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class StageTimer:
    """The durations of one round attempt's stages, from the participant's stage reports.

    The participant reports each stage it reaches (``RoundContext.on_stage``: advertise,
    share, masked, consistency, unmask, then verify and agree for SecAgg; the other
    backends' own stage names). A stage lasts from its report until the next report, the
    last one until :meth:`finish` (the round's outcome). So ``share`` covers waiting for the
    aggregator to close the advertise stage plus this peer's share computation: what a site
    sees, which is what its monitoring wants to locate a slow stage or a slow aggregator.
    """

    def __init__(
        self, observe: Callable[[str, float], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._observe = observe
        self._clock = clock
        self._current: tuple[str, float] | None = None

    def enter(self, stage: str) -> None:
        """This peer reached ``stage``; the previous stage (if any) ends now."""
        now = self._clock()
        if self._current is not None and self._current[0] == stage:
            return  # the same stage reported again (a detail changed): still in it
        self._close(now)
        self._current = (stage, now)

    def finish(self) -> None:
        """The round attempt ended: the stage in progress ends now."""
        self._close(self._clock())
        self._current = None

    def _close(self, now: float) -> None:
        if self._current is not None:
            stage, since = self._current
            self._observe(stage, now - since)
