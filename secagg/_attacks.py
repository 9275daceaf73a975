"""The malicious aggregator that :func:`secagg.simulate.simulate` can play (:class:`Attack`).

Apart from the simulator's timed loop: each attack either tampers with the honest
aggregator's outgoing messages (:func:`tamper`), or, for the issue-9 survivor-set attacks
that an honest :class:`~secagg.aggregator.Aggregator` would refuse to take part in, drives
the honest participants itself (:func:`view_attack`). Either way the honest participants are
the real objects, and what the simulation reports is how they refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from enum import StrEnum

import numpy as np

from .config import RoundConfig, Stage
from .crypto import DeterministicRandom, KeyPair, Verifier
from .errors import SecAggError
from .messages import (
    AdvertisedKeys,
    AggregatorMessage,
    ConsistencySignature,
    MaskedInput,
    ParticipantMessage,
    ShareKeys,
    SharesToYou,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
)
from .participant import Participant
from .ring import word_dtype
from .testing import test_identities
from .transcript import Transcript, TranscriptError, verify_transcript

__all__ = ["AGGREGATOR_ID", "VIEW_ATTACKS", "Attack", "revealed_both", "tamper", "view_attack"]

AGGREGATOR_ID = "aggregator"


class Attack(StrEnum):
    """Malicious aggregator behaviours the simulator can play."""

    BOTH_SHARES = "both-shares"  # asks one peer for both shares of a survivor
    SUBSTITUTE_KEY = "substitute-key"  # replaces a peer's advertised mask key with its own
    SPLIT_SURVIVORS = "split-survivors"  # shows different survivor sets to different peers
    REPLAY = "replay"  # relays adverts from the previous round
    WRONG_SUM = "wrong-sum"  # publishes a transcript with a wrong aggregate
    # Issue 9: the victim (first peer) is sent the shares of only t - 1 neighbours W, so it
    # masks with W alone; then
    TWO_VIEW = "two-view"  # V and W see a survivor set with W, everyone else one without W
    TWO_VIEW_STEALTH = "two-view-stealth"  # ... and the second view's transcript is published
    ISOLATE = "isolate"  # one survivor set without W, shown to everyone


# Attacks that the honest Aggregator class cannot play (it would refuse the victim's cut
# masked input): the simulator drives the participants itself, as a malicious aggregator.
VIEW_ATTACKS = (Attack.TWO_VIEW, Attack.TWO_VIEW_STEALTH, Attack.ISOLATE)


def revealed_both(reveals: Sequence[UnmaskShares]) -> list[str]:
    """Peers of which some share holder revealed the self-mask share and another (or the
    same) the mask-key share: checked on what was actually sent, not on what the code meant."""
    self_masks = {owner for r in reveals for owner, _ in r.self_mask_shares}
    mask_keys = {owner for r in reveals for owner, _ in r.mask_key_shares}
    return sorted(self_masks & mask_keys)


def view_attack(
    attack: Attack,
    config: RoundConfig,
    participants: Mapping[str, Participant],
    verifiers: Mapping[str, Verifier],
) -> tuple[dict[str, str], list[UnmaskShares], str | None]:
    """Play the issue-9 survivor-set attacks against honest participants.

    Returns the refusals (peer -> error), every UnmaskShares sent, and (stealth variant) the
    victim's error on the published transcript of the second view.
    """
    peers, sid, rnd = config.peers, config.session_id, config.round
    refusals: dict[str, str] = {}

    def deliver(u: str, message: AggregatorMessage) -> ParticipantMessage | None:
        try:
            return participants[u].receive(message)
        except SecAggError as error:
            refusals[u] = str(error)
            return None

    adverts = {u: participants[u].start() for u in peers}
    shares: dict[str, ShareKeys] = {}
    for u in peers:
        relayed = tuple(adverts[w] for w in peers if w in config.neighbourhood(u))
        reply = deliver(u, AdvertisedKeys(sid, rnd, relayed))
        if isinstance(reply, ShareKeys):
            shares[u] = reply
    victim = peers[0]
    cut = tuple(sorted(config.neighbourhood(victim) - {victim}, key=config.index))[
        : config.threshold - 1
    ]
    masked: dict[str, MaskedInput] = {}
    for u in shares:
        senders = [w for w in shares if u in config.neighbourhood(w)]
        if u == victim:  # the cut: exactly t shares, so the victim masks with W alone
            senders = [w for w in senders if w == victim or w in cut]
        pairs, signatures = [], []
        for w in senders:
            i = [r for r, _ in shares[w].ciphertexts].index(u)
            pairs.append((w, shares[w].ciphertexts[i][1]))
            signatures.append(shares[w].signatures[i])
        reply = deliver(u, SharesToYou(sid, rnd, u, tuple(pairs), tuple(signatures)))
        if isinstance(reply, MaskedInput):
            masked[u] = reply
    # View A: the victim, W and everyone outside the victim's neighbourhood; view B: all but W.
    cut_off = config.neighbourhood(victim) - {victim, *cut}
    view_a = tuple(sorted(u for u in masked if u not in cut_off))
    view_b = tuple(sorted(u for u in masked if u not in cut))
    group_a = {victim, *cut}
    views = {u: view_a if attack is not Attack.ISOLATE and u in group_a else view_b for u in masked}
    signed: dict[tuple[str, ...], list[ConsistencySignature]] = {view_a: [], view_b: []}
    for u in masked:
        reply = deliver(u, SurvivorSet(sid, rnd, views[u]))
        if isinstance(reply, ConsistencySignature):
            signed[views[u]].append(reply)
    reveals: list[UnmaskShares] = []
    for u in masked:
        if u in refusals:
            continue
        view = views[u]
        held = group_a if u == victim else {w for w in shares if u in config.neighbourhood(w)}
        request = UnmaskRequest(
            sid,
            rnd,
            view,
            tuple(sorted(held - set(view), key=config.index)),
            tuple(signed[view]),
            tuple(masked[w].header() for w in view if w in held),
        )
        reply = deliver(u, request)
        if isinstance(reply, UnmaskShares):
            reveals.append(reply)
    transcript_error = None
    if attack is Attack.TWO_VIEW_STEALTH and victim in masked:
        # Publish the second view, in which the victim and W are late dropouts, with what the
        # aggregator gathered for it; the victim checks it as every peer does.
        transcript = Transcript(
            sid,
            rnd,
            AGGREGATOR_ID,
            tuple(adverts[u] for u in peers if u in shares),
            tuple(masked[u] for u in view_b if u != victim),
            tuple(signed[view_b]),
            tuple(r for r in reveals if r.sender in view_b),
            np.zeros(config.vector_length, dtype=word_dtype(config.bits)),
        )
        own_signature = next((m for m in signed[view_a] if m.sender == victim), None)
        try:
            verify_transcript(
                transcript, config, verifiers, own=masked[victim], signed=own_signature
            )
        except TranscriptError as error:
            transcript_error = f"{victim} rejects the published transcript: {error}"
    return refusals, reveals, transcript_error


def tamper(
    attack: Attack,
    stage: Stage,
    outgoing: dict[str, AggregatorMessage],
    config: RoundConfig,
    split_signatures: list[ConsistencySignature],
    seed: int,
) -> dict[str, AggregatorMessage]:
    """What a malicious aggregator sends instead of the honest messages."""
    recipients = sorted(outgoing, key=config.index)
    if not recipients:
        return outgoing
    victim = recipients[0]
    tampered = dict(outgoing)
    if attack is Attack.SUBSTITUTE_KEY and stage is Stage.ADVERTISE:
        own = KeyPair.generate(DeterministicRandom(f"attacker/{seed}")).public
        for u in recipients:
            message = outgoing[u]
            assert isinstance(message, AdvertisedKeys)
            adverts = tuple(
                replace(a, mask_public=own) if a.sender == victim else a for a in message.adverts
            )
            tampered[u] = replace(message, adverts=adverts)
    elif attack is Attack.REPLAY and stage is Stage.ADVERTISE:
        # Adverts that the same peers signed for the previous round of the session.
        previous = replace(
            config, round=config.round + 1 if config.round == 0 else config.round - 1
        )
        signers, verifiers = test_identities(config.peers, seed)
        zeros = np.zeros(config.vector_length, dtype=word_dtype(config.bits))
        old = {
            v: Participant(
                previous, v, signers[v], verifiers, zeros, DeterministicRandom(f"old/{v}")
            ).start()
            for v in config.peers
        }
        for u in recipients:
            message = outgoing[u]
            assert isinstance(message, AdvertisedKeys)
            adverts = tuple(a if a.sender == u else old[a.sender] for a in message.adverts)
            tampered[u] = replace(message, adverts=adverts)
    elif attack is Attack.SPLIT_SURVIVORS and stage is Stage.MASKED:
        message = outgoing[victim]
        assert isinstance(message, SurvivorSet)
        hidden = recipients[-1]
        # Show the smaller set to as many peers as the aggregator can afford while keeping
        # a quorum of signatures on the true set, so the round reaches the unmask request,
        # where the honest peers must notice the mismatched signatures it carries.
        split = max(1, len(recipients) - config.quorum)
        for u in recipients[:split]:
            tampered[u] = replace(
                message, survivors=tuple(s for s in message.survivors if s != hidden)
            )
    elif attack is Attack.SPLIT_SURVIVORS and stage is Stage.CONSISTENCY:
        for u in recipients:
            message = outgoing[u]
            assert isinstance(message, UnmaskRequest)
            tampered[u] = replace(message, signatures=(*message.signatures, *split_signatures))
    elif attack is Attack.BOTH_SHARES and stage is Stage.CONSISTENCY:
        message = outgoing[victim]
        assert isinstance(message, UnmaskRequest)
        target = next(s for s in message.survivors if s != victim)
        tampered[victim] = replace(message, dropped=(*message.dropped, target))
    return tampered
