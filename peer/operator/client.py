"""The operator's connection to the peers: propose a session, start it, ask its status.

Used by :mod:`peer.operator.follow` (``ceremony run``, ``stats``, ``demo``) and by the
tests. The operator holds an operator certificate (or a peer's); it proposes, but it takes no
part in the rounds and sees no data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import grpc

from secagg import Signer

from ..channels import ChannelPool, PeerCalls
from ..identity import Roster, load_certificate, load_roster, load_signer
from ..relay import RelayRoute
from ..session import SessionProposal, SignedProposal
from ..session_state import FINAL_STATES
from ..tls import TLSFiles, map_rpc_error
from ..wire import peer_pb2 as pb

__all__ = ["FINAL_STATES", "BeaconFailed", "OperatorClient", "OperatorError", "ProposalRefused"]

T = TypeVar("T")


class OperatorError(Exception):
    """The operator cannot go on as asked: a federation file is wrong, a peer cannot be
    reached, or no peer knows the session. The message says what to change."""


class ProposalRefused(Exception):
    """At least one peer refused the proposal; ``answers`` says who and why."""

    def __init__(self, answers: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{peer}: {reason}" for peer, reason in sorted(answers.items())))
        self.answers = dict(answers)


class BeaconFailed(Exception):
    """The session beacon could not be fixed, so the session does not run; ``answers``
    names each peer that withheld its commitment or nonce, or refused the others', and why."""

    def __init__(self, session_id: str, answers: Mapping[str, str]) -> None:
        super().__init__(
            f"session {session_id} cannot start: "
            + "; ".join(f"{peer}: {reason}" for peer, reason in sorted(answers.items()))
        )
        self.answers = dict(answers)


@dataclass
class OperatorClient:
    me: str
    roster: Roster
    files: TLSFiles
    signer: Signer
    timeout: float = 60.0

    @classmethod
    def from_files(cls, me: str, cert: Path, key: Path, ca: Path, roster: Path) -> Self:
        return cls(
            me,
            load_roster(roster, load_certificate(ca)),
            TLSFiles.of(cert, key, ca),
            load_signer(key),
        )

    def __post_init__(self) -> None:
        # The peers' own channel cache and typed stub (peer/channels.py): one channel per peer.
        self._pool = ChannelPool(lambda: self.roster, self.files)
        # An outbound-only peer is called through a relay, with calls this operator signs
        # (peer/relay.py): the relay can drop them, not forge or alter them.
        route = RelayRoute(
            me=self.me,
            signer=self.signer,
            verifiers=self.roster.verifiers(),
            roster=lambda: self.roster,
            pool=self._pool,
        )
        self._pool.relay_outbound_only(route.stub)
        self._nonces: dict[str, dict[str, bytes]] = {}

    async def close(self) -> None:
        await self._pool.close()

    async def _call(self, peer: str, call: Callable[[PeerCalls], Awaitable[T]]) -> T:
        """``call`` on ``peer``'s stub, its gRPC error mapped to a TransportError."""
        stub = self._pool.stub(peer)
        try:
            return await call(stub)
        except grpc.RpcError as error:
            raise map_rpc_error(error, target=self.roster[peer].address or "", peer=peer) from None

    async def propose(self, proposal: SessionProposal) -> dict[str, pb.ProposalAnswer]:
        """Send the signed proposal to every participant; raise ProposalRefused if any refuses."""
        signed = SignedProposal.sign(proposal, self.me, self.signer)
        request = pb.SessionProposal(
            document=proposal.document(), proposer=self.me, signature=signed.signature
        )
        answers = await asyncio.gather(
            *(
                self._call(p, lambda stub: stub.propose(request, self.timeout))
                for p in proposal.participants
            )
        )
        result = {
            p: a
            for p, a in zip(proposal.participants, answers, strict=True)
            if isinstance(a, pb.ProposalAnswer)
        }
        refused = {p: a.reason for p, a in result.items() if not a.accepted}
        if refused:
            raise ProposalRefused(refused)
        return result

    async def _start_all(
        self, session_id: str, participants: Sequence[str], request: pb.StartRequest
    ) -> dict[str, pb.StartAnswer]:
        """Send ``request`` to every participant; BeaconFailed names whoever did not answer."""
        answers = await asyncio.gather(
            *(self._call(p, lambda stub: stub.start(request, self.timeout)) for p in participants),
            return_exceptions=True,
        )
        failed = {
            p: str(a)
            for p, a in zip(participants, answers, strict=True)
            if not isinstance(a, pb.StartAnswer)
        }
        if failed:
            raise BeaconFailed(session_id, failed)
        return {
            p: a
            for p, a in zip(participants, answers, strict=True)
            if isinstance(a, pb.StartAnswer)
        }

    async def start(self, session_id: str, participants: Sequence[str]) -> bytes:
        """Fix the session beacon with every participant (commit-reveal, peer/beacon.py) and
        so start the session; returns the beacon.

        ``participants`` must be all of the session's participants: the beacon needs every
        one's nonce. Peers already running answer the beacon they hold.

        Raises:
            BeaconFailed: a peer withheld its commitment or nonce, or refused the others'
                (named, with its reason); the session does not run anywhere.
        """
        await self.commit(session_id, participants)
        return await self.reveal(session_id, participants)

    async def commit(self, session_id: str, participants: Sequence[str]) -> dict[str, bytes]:
        """Send every participant the others' signed commitments; collect and return the
        nonces (the beacon they make, :func:`peer.beacon.beacon_of`, is fixed on
        :meth:`reveal`)."""
        ref = pb.StartRequest(session_id=session_id)
        own = await self._start_all(session_id, participants, ref)  # each one's commitment
        request = pb.StartRequest(
            session_id=session_id, commitments=[own[p].commitment for p in participants]
        )
        answers = await self._start_all(session_id, participants, request)
        withheld = {p: "revealed no nonce" for p, a in answers.items() if not a.nonce}
        if withheld:
            raise BeaconFailed(session_id, withheld)
        nonces = self._nonces[session_id] = {p: a.nonce for p, a in answers.items()}
        return dict(nonces)

    async def reveal(self, session_id: str, participants: Sequence[str]) -> bytes:
        """Send every nonce to every participant; each fixes the beacon and runs."""
        nonces = self._nonces[session_id]
        request = pb.StartRequest(
            session_id=session_id,
            reveals=[pb.BeaconReveal(peer_id=p, nonce=n) for p, n in sorted(nonces.items())],
        )
        answers = await self._start_all(session_id, participants, request)
        beacons = {a.beacon for a in answers.values()}
        if len(beacons) != 1 or b"" in beacons:
            raise BeaconFailed(
                session_id, {p: f"fixed beacon {a.beacon.hex()[:16]}" for p, a in answers.items()}
            )
        return beacons.pop()

    async def records(self, session_id: str, peer: str) -> list[pb.AgreedRecord]:
        """The agreed records of ``session_id`` in ``peer``'s ledger, by round (``Records``).

        Raises:
            TransportError: the peer cannot be reached or refused the call.
        """
        status = await self._call(peer, lambda stub: stub.records(session_id, self.timeout))
        return sorted(status.records, key=lambda r: r.round)

    async def status(
        self, session_id: str, participants: Sequence[str]
    ) -> dict[str, pb.SessionStatus | Exception]:
        results = await asyncio.gather(
            *(
                self._call(p, lambda stub: stub.status(session_id, self.timeout))
                for p in participants
            ),
            return_exceptions=True,
        )
        out: dict[str, pb.SessionStatus | Exception] = {}
        for peer, result in zip(participants, results, strict=True):
            if isinstance(result, pb.SessionStatus | Exception):
                out[peer] = result
        return out

    async def wait(
        self,
        session_id: str,
        participants: Sequence[str],
        *,
        timeout: float,
        poll: float = 0.5,
        on_progress: Callable[[dict[str, pb.SessionStatus | Exception]], None] | None = None,
        require_all: bool = False,
    ) -> dict[str, pb.SessionStatus | Exception]:
        """Poll every peer until all reachable ones (or, with ``require_all``, all of them)
        report the session finished."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            statuses = await self.status(session_id, participants)
            if on_progress is not None:
                on_progress(statuses)
            reachable = [s for s in statuses.values() if isinstance(s, pb.SessionStatus)]
            everyone = not require_all or len(reachable) == len(statuses)
            if reachable and everyone and all(s.state in FINAL_STATES for s in reachable):
                return statuses
            if loop.time() >= deadline:
                raise TimeoutError(f"session {session_id} did not finish within {timeout:.0f}s")
            await asyncio.sleep(poll)
