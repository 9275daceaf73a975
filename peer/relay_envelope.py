"""The signed envelope of a relayed call and of its answer (see :mod:`peer.relay`).

A call is signed by its author over (caller, target, method, request, time, nonce)
(:func:`sign_call`); the target checks it once and only while fresh (:class:`CallChecker`)
and signs its answer over the call's digest (:func:`sign_answer`), which the caller checks
(:func:`check_answer`). A relay that alters, forges or replays either is named by the
:class:`RelayError` it causes.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Mapping

import grpc
from google.protobuf.message import Message

from secagg import Signer, Verifier

from .wire import peer_pb2 as pb

__all__ = [
    "FRESH_SECONDS",
    "RELAYED_METHODS",
    "RESPONSES",
    "CallChecker",
    "RelayError",
    "RelayRefused",
    "call_digest",
    "check_answer",
    "rpc_error",
    "sign_answer",
    "sign_call",
    "status_code",
]

# The methods a relay carries: the ones others call on a peer's server. RoundStream is not
# among them: an outbound-only peer is never an aggregator, and dials its aggregator itself.
RELAYED_METHODS: dict[str, type[Message]] = {
    "Propose": pb.SessionProposal,
    "Start": pb.StartRequest,
    "Status": pb.SessionRef,
    "Records": pb.SessionRef,
}
RESPONSES: dict[str, type[Message]] = {
    "Propose": pb.ProposalAnswer,
    "Start": pb.StartAnswer,
    "Status": pb.SessionStatus,
    "Records": pb.SessionStatus,
}
# A relayed call older (or further in the future) than this is refused: the bound on how
# long a relay can hold a call back, and how long the target remembers nonces.
FRESH_SECONDS = 300.0

_CALL_LABEL = b"hospital-secagg/relay-call/v1\x00"
_ANSWER_LABEL = b"hospital-secagg/relay-answer/v1\x00"


class RelayError(Exception):
    """A relayed call or answer that does not verify; ``offender`` is the relay that
    carried it (it altered, forged or replayed it)."""

    def __init__(self, message: str, offender: str) -> None:
        super().__init__(message)
        self.offender = offender


class RelayRefused(Exception):
    """A relay does not carry a call: ``code`` says why (not connected here, not allowed,
    over the rate limit)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _framed(label: bytes, *fields: bytes) -> bytes:
    """``label`` then each field with its length: no two field lists encode alike."""
    return label + b"".join(len(f).to_bytes(8, "big") + f for f in fields)


def _call_bytes(call: pb.RelayedCall) -> bytes:
    return _framed(
        _CALL_LABEL,
        call.caller.encode(),
        call.target.encode(),
        call.method.encode(),
        call.request,
        struct.pack(">d", call.issued_at),
        call.nonce,
    )


def call_digest(call: pb.RelayedCall) -> bytes:
    """What an answer is bound to: SHA-256 of the call's signed bytes."""
    return hashlib.sha256(_call_bytes(call)).digest()


def _answer_bytes(answer: pb.RelayedAnswer) -> bytes:
    return _framed(
        _ANSWER_LABEL,
        answer.target.encode(),
        answer.call_digest,
        answer.code.to_bytes(4, "big"),
        answer.details.encode(),
        answer.response,
    )


def sign_call(
    caller: str,
    target: str,
    method: str,
    request: Message,
    signer: Signer,
    *,
    now: float,
    nonce: bytes,
) -> pb.RelayedCall:
    """``request`` to ``target``'s ``method``, signed by ``caller`` for a relay to carry."""
    if method not in RELAYED_METHODS:
        raise ValueError(f"{method} is not relayed (only {', '.join(RELAYED_METHODS)})")
    call = pb.RelayedCall(
        caller=caller,
        target=target,
        method=method,
        request=request.SerializeToString(),
        issued_at=now,
        nonce=nonce,
    )
    call.signature = signer.sign(_call_bytes(call))
    return call


def sign_answer(
    target: str,
    call: pb.RelayedCall,
    code: grpc.StatusCode,
    details: str,
    response: bytes,
    signer: Signer,
) -> pb.RelayedAnswer:
    """``target``'s answer to ``call``, signed and bound to it."""
    answer = pb.RelayedAnswer(
        target=target,
        call_digest=call_digest(call),
        code=code.value[0],
        details=details,
        response=response,
    )
    answer.signature = signer.sign(_answer_bytes(answer))
    return answer


def check_answer(
    call: pb.RelayedCall, answer: pb.RelayedAnswer, verifiers: Mapping[str, Verifier], relay: str
) -> None:
    """Check ``answer`` is ``call.target``'s own, unaltered answer to ``call``.

    Raises:
        RelayError: it is not (naming ``relay``, which carried it).
    """
    verifier = verifiers.get(call.target)
    if verifier is None:
        raise RelayError(
            f"{call.target} has no trusted key here (revoked or not in the roster)", relay
        )
    if (
        answer.target != call.target
        or answer.call_digest != call_digest(call)
        or not verifier.verify(answer.signature, _answer_bytes(answer))
    ):
        raise RelayError(
            f"the answer of {call.target} to {call.method} relayed by {relay} does not verify "
            f"under {call.target}'s key: {relay} altered or forged it",
            relay,
        )


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A relayed failure as the gRPC error a direct call would raise, so callers handle a
    relayed peer as any other (:func:`peer.tls.map_rpc_error`, catch-up's ``RpcError``)."""
    empty = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, empty, empty, details, None)


def status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


class CallChecker:
    """The outbound-only peer's check of each relayed call (see the module docstring).

    Args:
        me: this peer's id (a call for anyone else is refused).
        verifiers: the current, unrevoked roster keys.
        clock: wall-clock UNIX seconds (injected).
    """

    def __init__(
        self,
        me: str,
        verifiers: Mapping[str, Verifier],
        clock: Callable[[], float] = time.time,
        fresh_seconds: float = FRESH_SECONDS,
    ) -> None:
        self.me = me
        self.verifiers = verifiers
        self.clock = clock
        self.fresh_seconds = fresh_seconds
        self._seen: dict[bytes, float] = {}  # nonce -> issued_at, kept while fresh

    def check(self, call: pb.RelayedCall, relay: str) -> None:
        """Accept ``call`` (carried by ``relay``) once, or raise RelayError naming the relay."""
        verifier = self.verifiers.get(call.caller)
        if verifier is None:
            raise RelayError(
                f"{relay} relayed a call from {call.caller!r}, who has no trusted key here "
                "(not in the roster, or revoked)",
                relay,
            )
        if not verifier.verify(call.signature, _call_bytes(call)):
            raise RelayError(
                f"a {call.method or '?'} call relayed by {relay} as from {call.caller!r} does "
                f"not verify under {call.caller!r}'s roster key: {relay} forged or altered it",
                relay,
            )
        if call.target != self.me:
            raise RelayError(f"{relay} relayed a call for {call.target!r} to {self.me}", relay)
        if call.method not in RELAYED_METHODS:
            raise RelayError(
                f"{relay} relayed a call to {call.method!r}, which is not relayed", relay
            )
        now = self.clock()
        if abs(now - call.issued_at) > self.fresh_seconds:
            raise RelayError(
                f"{relay} relayed a {call.method} call from {call.caller} issued "
                f"{now - call.issued_at:.0f}s ago (more than {self.fresh_seconds:g}s: held back "
                "or replayed, or the two clocks disagree)",
                relay,
            )
        self._seen = {n: t for n, t in self._seen.items() if abs(now - t) <= self.fresh_seconds}
        if call.nonce in self._seen or len(call.nonce) < 16:
            raise RelayError(
                f"{relay} relayed a {call.method} call from {call.caller} a second time (replay)",
                relay,
            )
        self._seen[call.nonce] = call.issued_at
