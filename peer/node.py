"""A hospital's peer process: its parts, its lifecycle, and trust that changes while it runs.

Every peer runs the same program; none is special. :class:`PeerNode` puts the parts
together and runs them:

* :mod:`peer.service`: the gRPC service (thin handlers: proposals, start, status, records,
  the aggregator's end of a round);
* :mod:`peer.runner`: the session runner (the round loop, retries, back-off, settling);
* :mod:`peer.catchup`: where the others are, and the agreed records this peer lacks;
* :mod:`peer.channels`: one channel per other peer, with one typed stub;
* :mod:`peer.relay`: calls to outbound-only peers through a relay; when this peer is one
  (no address in the roster), its Control stream to a relay.

It also reloads the roster and CRL while it runs (peer/reload.py): a revoked member's key
stops counting at once and its open round streams are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from secagg import RandomSource, SystemRandom

from .catchup import CatchUp
from .channels import SERVICE, ChannelPool
from .config import PeerConfig
from .identity import load_signer
from .ledger import Ledger
from .metrics import PeerMetrics
from .payloads import PayloadFactory, default_payload
from .relay import CallChecker, ControlClient, RelayRoute
from .reload import TrustedKeys, TrustReloader
from .round import NO_FAULTS, FaultHooks
from .runner import CANNOT_RECORD, SessionRunner
from .service import PeerService
from .tls import Authenticator, TLSFiles, create_server

__all__ = ["CANNOT_RECORD", "SERVICE", "PeerNode", "default_payload"]

logger = logging.getLogger("peer.node")


class PeerNode:
    """One institution's peer process (see the module docstring)."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        payload_factory: PayloadFactory = default_payload,
        rng: RandomSource | None = None,
        nonce_rng: RandomSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        faults: FaultHooks = NO_FAULTS,
    ) -> None:
        self.config = config
        self.me = config.peer_id
        self.authenticator = Authenticator.from_files(config.ca, config.roster, config.crl)
        self.files = TLSFiles.of(config.cert, config.key, config.ca)
        self.signer = load_signer(config.key)
        self.roster = self.authenticator.roster
        # Live: members whose certificate the CRL revokes have no key here (peer/reload.py).
        self.verifiers = TrustedKeys(self.roster, self.authenticator.crl)
        self.reloader = TrustReloader(
            self.authenticator,
            config.roster,
            config.crl,
            on_change=self._trust_changed,
            interval=config.limits.trust_poll_seconds,
        )
        self.ledger = Ledger(config.ledger_url)
        self.ledger.create()
        self.port = 0
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self.pool = ChannelPool(lambda: self.roster, self.files)
        self.catch_up = CatchUp(self.me, self.ledger, self.verifiers, self.pool)
        self.metrics = PeerMetrics(
            self.me, self.ledger, max_epsilon=config.policy.max_epsilon, certificate=config.cert
        )
        self.metrics_port: int | None = None  # bound once serving, when [metrics] is set
        self.runner = SessionRunner(
            me=self.me,
            config=config,
            ledger=self.ledger,
            signer=self.signer,
            verifiers=self.verifiers,
            rng=rng or SystemRandom(),
            faults=faults,
            payload_factory=payload_factory,
            pool=self.pool,
            catch_up=self.catch_up,
            stopping=self._stopping,
            metrics=self.metrics,
        )
        self.service = PeerService(
            me=self.me,
            config=config,
            ledger=self.ledger,
            signer=self.signer,
            verifiers=self.verifiers,
            runner=self.runner,
            payload_factory=payload_factory,
            nonce_rng=nonce_rng or SystemRandom(),
            clock=clock,
            roster=lambda: self.roster,
        )
        # Outbound-only peers (no address in the roster) are called through a relay, this
        # peer's own hub first (peer/relay.py).
        self.relay_route = RelayRoute(
            me=self.me,
            signer=self.signer,
            verifiers=self.verifiers,
            roster=lambda: self.roster,
            pool=self.pool,
            hub=self.service.hub,
        )
        self.pool.relay_outbound_only(self.relay_route.stub)
        self.control: ControlClient | None = None
        own = self.roster.get(self.me)
        if own is not None and not own.inbound:
            self.control = ControlClient(
                me=self.me,
                relays=self._relays,
                pool=self.pool,
                checker=CallChecker(self.me, self.verifiers),
                identify=lambda peer: self.authenticator.authenticate(
                    self.roster[peer].certificate
                ),
                dispatch=self.service.relayed,
                signer=self.signer,
            )

    def _relays(self) -> list[str]:
        """The relays an outbound-only peer connects to: ``[relay] peers``, else every
        reachable roster peer."""
        reachable = [e.peer_id for e in self.roster.peers if e.inbound and e.peer_id != self.me]
        chosen = list(self.config.relays) or reachable
        return [p for p in chosen if p in reachable]

    async def serve(self, on_ready: Callable[[int], None] | None = None) -> None:
        """Serve until :meth:`stop`; resumes sessions that were running before a restart."""
        if self.config.metrics is not None:
            # Before the gRPC port opens: a refused address stops the peer at start-up.
            wanted = self.config.metrics
            self.metrics_port = self.metrics.serve(
                wanted.host, wanted.port, allow_remote=wanted.allow_remote
            )
        try:
            async with create_server(
                self.config.listen,
                self.files,
                self.authenticator,
                handlers=[self.service.handler()],
            ) as (_, port):
                self.port = port
                reloader = asyncio.create_task(self.reloader.run(self._stopping))
                self._background.add(reloader)
                if self.control is not None:
                    self._background.add(asyncio.create_task(self.control.run(self._stopping)))
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    # Only possible in the main thread of a Unix process (peer start); a peer
                    # run inside a test polls the files only.
                    asyncio.get_running_loop().add_signal_handler(
                        signal.SIGHUP, self.reloader.trigger
                    )
                self.runner.resume()
                if on_ready is not None:
                    on_ready(port)
                await self._stopping.wait()
                self.runner.stop()
                await self.pool.close()
        finally:
            self.metrics.close()

    def stop(self) -> None:
        self._stopping.set()

    def _trust_changed(self) -> None:
        """A new roster or CRL is in force: use its keys, close streams it no longer allows."""
        old, self.roster = self.roster, self.authenticator.roster
        self.verifiers.refresh(self.roster, self.authenticator.crl)
        for peer_id in self.pool.dialled():
            before, after = old.get(peer_id), self.roster.get(peer_id)
            if after is None or before is None or before.address != after.address:
                self.pool.forget(peer_id)  # dial the new address (or nobody) from now on
        revoked = self.authenticator.crl.serial_numbers
        for closing, caller in list(self.service.open_streams.items()):
            entry = self.roster.get(caller.peer_id)
            if (
                caller.serial_number in revoked
                or entry is None
                or entry.cert_fingerprint_sha256 != caller.fingerprint
            ):
                logger.warning(
                    "peer=%s closing the round stream of %s: its certificate is no longer "
                    "accepted (revoked or removed from the roster)",
                    self.me,
                    caller.peer_id,
                )
                closing.set()
