"""Fault injection for tests: a peer process that kills itself at a named point.

Set ``HOSPITAL_SECAGG_KILL_AT`` to ``<round>:<point>`` (e.g. ``1:masked``) and the peer sends
itself SIGKILL when it reaches that point of that round, exactly as if the machine died
there. Points are a participant's stages (``advertise``, ``share``, ``masked``,
``consistency``, ``unmask``, ``sign``: just before it would send that stage's message) and
the aggregator's (``aggregator:<stage>``: just before it closes that stage). Unset in
production, it costs one dictionary lookup per stage.

``HOSPITAL_SECAGG_TAMPER_SEND`` makes a peer play a malicious aggregator or participant
(:func:`tamper_outgoing`, :func:`tamper_reply`); unset, it costs one lookup per message.

None of this is on the production path: the round drivers call the
:class:`~peer.round.context.FaultHooks` of their context, a no-op by default, and only the
peer's entry point (``peer start``) installs :func:`from_environment`'s hooks, which exist
only when one of these variables is set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any

import numpy as np

from secagg import Signer

from .round.context import NO_FAULTS, FaultHooks

__all__ = [
    "KILL_AT_ENV",
    "TAMPER_ENV",
    "TAMPER_SEND_ENV",
    "EnvironmentFaults",
    "fault_point",
    "from_environment",
    "tamper_outgoing",
    "tamper_reply",
    "tamper_transcript_aggregate",
]

KILL_AT_ENV = "HOSPITAL_SECAGG_KILL_AT"


def fault_point(round_: int, point: str) -> None:
    target = os.environ.get(KILL_AT_ENV)
    if target and target == f"{round_}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


TAMPER_ENV = "HOSPITAL_SECAGG_TAMPER_TRANSCRIPT"


def tamper_transcript_aggregate(round_: int) -> bool:
    """True when a test asks this aggregator to publish a wrong aggregate in ``round_``.

    Set ``HOSPITAL_SECAGG_TAMPER_TRANSCRIPT`` to the round number. It plays a malicious
    aggregator, so that tests can check every other peer refuses to sign.
    """
    return os.environ.get(TAMPER_ENV) == str(round_)


# ---------------------------------------------------------------- malicious messages (tests only)

TAMPER_SEND_ENV = "HOSPITAL_SECAGG_TAMPER_SEND"
_fault_log = logging.getLogger("peer.faults")
# Replay mode: the last message of each (recipient, kind) this aggregator sent before the
# target round, to be sent again in it.
_sent_before: dict[tuple[str, str], object] = {}


def _tamper_spec() -> tuple[int, str, str] | None:
    """``HOSPITAL_SECAGG_TAMPER_SEND`` as (round, mode, argument), or None when unset."""
    value = os.environ.get(TAMPER_SEND_ENV)
    if not value:
        return None
    round_, _, rest = value.partition(":")
    mode, _, argument = rest.partition(":")
    return int(round_), mode, argument


def tamper_outgoing(round_: int, recipient: str, message: object) -> object:
    """What a malicious aggregator sends ``recipient`` instead of ``message`` (tests only).

    ``HOSPITAL_SECAGG_TAMPER_SEND=<round>:<mode>`` with mode ``both-shares`` (every
    UnmaskRequest also asks for the mask-key share of a survivor), ``split-survivors`` (one
    peer is shown a survivor set without another survivor), ``split-unmask`` (one peer's
    UnmaskRequest names that other survivor as dropped), ``substitute-keys`` (another peer's
    advertised keys are replaced by the aggregator's, its signature kept) or ``replay``
    (each message of the round is one this aggregator sent in an earlier round).
    """
    spec = _tamper_spec()
    if spec is None:
        return message
    target, mode, _ = spec
    if mode == "replay":
        key = (recipient, type(message).__name__)
        if round_ < target:
            _sent_before[key] = message
        elif round_ == target and key in _sent_before:
            _fault_log.warning("fault injection: replaying an earlier %s to %s", key[1], recipient)
            return _sent_before[key]
        return message
    if round_ != target:
        return message
    tampered = _tampered(mode, recipient, message)
    if tampered is not message:
        _fault_log.warning(
            "fault injection: %s in the %s to %s", mode, type(message).__name__, recipient
        )
    return tampered


def _tampered(mode: str, recipient: str, message: object) -> object:
    from secagg import AdvertisedKeys, SurvivorSet, UnmaskRequest

    if mode == "both-shares" and isinstance(message, UnmaskRequest):
        victim = next(u for u in sorted(message.survivors) if u != recipient)
        return dataclasses.replace(message, dropped=(*message.dropped, victim))
    if mode in ("split-survivors", "split-unmask") and isinstance(
        message, SurvivorSet | UnmaskRequest
    ):
        # The first survivor (by name) is told the last one dropped; the others are not.
        survivors = sorted(message.survivors)
        victim = survivors[-1]
        if recipient != survivors[0] or victim == recipient:
            return message
        shown = tuple(u for u in survivors if u != victim)
        if mode == "split-survivors" and isinstance(message, SurvivorSet):
            return dataclasses.replace(message, survivors=shown)
        if mode == "split-unmask" and isinstance(message, UnmaskRequest):
            dropped = (*message.dropped, victim)
            return dataclasses.replace(message, survivors=shown, dropped=dropped)
    if mode == "substitute-keys" and isinstance(message, AdvertisedKeys):
        from cryptography.hazmat.primitives.asymmetric import x25519

        adverts = list(message.adverts)
        index = next(i for i, a in enumerate(adverts) if a.sender != recipient)
        mine = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
        adverts[index] = dataclasses.replace(adverts[index], channel_public=mine, mask_public=mine)
        return dataclasses.replace(message, adverts=tuple(adverts))
    return message


def tamper_reply(round_: int, message: object, signer: Any, digest: bytes) -> object:
    """What a malicious participant sends instead of ``message`` (tests only).

    ``HOSPITAL_SECAGG_TAMPER_SEND=<round>:<mode>`` with mode ``wrong-length`` (the masked
    vector one word short), ``bad-shares`` (every revealed self-mask share off by one) or
    ``sign-as:<key file>`` (the masked input signed with another institution's key). The
    tampered message is otherwise well formed and signed by ``signer``, so that only the
    injected fault can give it away. With the variable set (any mode, e.g. ``0:observe``),
    the owners of every revealed share are logged (names only, never shares) so that tests
    can check no peer's two secrets were both revealed.
    """
    spec = _tamper_spec()
    if spec is None:
        return message
    from secagg import MaskedInput, UnmaskShares
    from secagg.shamir import decode_share, encode_share

    target, mode, argument = spec
    if round_ == target:
        if mode == "wrong-length" and isinstance(message, MaskedInput):
            message = dataclasses.replace(message, vector=message.vector[:-1])
        elif mode == "bad-shares" and isinstance(message, UnmaskShares):
            shares = tuple(
                (owner, encode_share(decode_share(share) + 1))
                for owner, share in message.self_mask_shares
            )
            message = dataclasses.replace(message, self_mask_shares=shares)
        elif mode == "sign-as" and isinstance(message, MaskedInput):
            from .identity import load_signer

            signer = load_signer(argument)
        else:
            signer = None
        if signer is not None:
            _fault_log.warning("fault injection: %s in my %s", mode, type(message).__name__)
            signed = message.signed_payload(digest)  # type: ignore[attr-defined]
            message = dataclasses.replace(message, signature=signer.sign(signed))  # type: ignore[type-var]
    if isinstance(message, UnmaskShares):
        _fault_log.info(
            "fault observation: round=%d revealed self-mask=%s mask-key=%s",
            round_,
            ",".join(owner for owner, _ in message.self_mask_shares) or "-",
            ",".join(owner for owner, _ in message.mask_key_shares) or "-",
        )
    return message


def _wrong_aggregate(transcript: object) -> object:
    """The same transcript with a wrong aggregate (a malicious aggregator)."""
    aggregate = getattr(transcript, "aggregate", None)
    if not isinstance(aggregate, np.ndarray):
        return transcript
    wrong = aggregate.copy()
    wrong[0] += 1
    return dataclasses.replace(transcript, aggregate=wrong)  # type: ignore[type-var]


class EnvironmentFaults:
    """The :class:`~peer.round.context.FaultHooks` these environment variables ask for."""

    def point(self, round_: int, name: str) -> None:
        fault_point(round_, name)

    def outgoing(self, round_: int, recipient: str, message: object) -> object:
        return tamper_outgoing(round_, recipient, message)

    def reply(self, round_: int, message: object, signer: Signer, digest: bytes) -> object:
        return tamper_reply(round_, message, signer, digest)

    def transcripts(self, round_: int, transcripts: dict[str, object]) -> dict[str, object]:
        if not tamper_transcript_aggregate(round_):
            return transcripts
        return {p: _wrong_aggregate(t) for p, t in transcripts.items()}

    def published_aggregate(self, round_: int, aggregate: np.ndarray[Any, Any]) -> Any:
        # The secagg aggregator states (and signs) its sum before the linear check: that is
        # where a malicious one lies.
        if not tamper_transcript_aggregate(round_):
            return aggregate
        wrong = aggregate.copy()
        wrong[0] += 1
        return wrong


def from_environment() -> FaultHooks:
    """The hooks a test asked for through the environment; no-op hooks when none is set."""
    if any(os.environ.get(name) for name in (KILL_AT_ENV, TAMPER_ENV, TAMPER_SEND_ENV)):
        return EnvironmentFaults()
    return NO_FAULTS
