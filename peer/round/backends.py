"""The aggregation protocols a session can choose, behind one small interface.

The round drivers (peer/round/) move messages and keep deadlines; a backend says which
sans-I/O objects play the two roles, which messages are heavy to handle, what each peer is
sent as the round's transcript, and how a peer checks it.

* ``secagg`` (the default): Bonawitz/SecAgg+ masking. Nobody is trusted.
* ``paillier``: additively homomorphic encryption under the key of a rotating key holder
  (``secagg/paillier/``). Trust assumption: the aggregator and the key holder do not
  collude. Orders of magnitude slower (see BENCHMARKS.md); it exists to compare.
* ``cleartext``: the insecure baseline used to measure what security costs; refused by every
  peer whose policy does not explicitly allow it.
* ``plain``: minimal FedAvg, the honest baseline (issue 11): the same cleartext uploads, but
  the aggregator returns only the sum, which peers take on trust. Refused like ``cleartext``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence, Set
from typing import cast

from secagg import (
    Aggregator,
    ConsistencySignature,
    LinearAnswers,
    MaskedInput,
    Participant,
    ParticipantState,
    ProofAnswers,
    ProofRequest,
    RemoteProtocolError,
    Stage,
    SuccinctTranscript,
    paillier,
    verify_succinct,
)
from secagg.cleartext import (
    CleartextAggregator,
    CleartextParticipant,
    CleartextTranscript,
    PlainSum,
    check_plain_sum,
    verify_cleartext_transcript,
)
from secagg.messages import SharesToYou
from secagg.ring import WordArray

from ..spool import FileSpool
from .context import AggregatorRole, ParticipantRole, RoundBackend, RoundContext

__all__ = ["BACKENDS", "RoundBackend", "backend_for"]


# The role objects check each message's type at run time (their stage tables) and refuse
# the others, so they are the roles of peer/round/context.py although their ``receive``
# annotations name only their own protocol's messages: hence the casts below.


def _not_a_transcript(ctx: RoundContext, message: object) -> RemoteProtocolError:
    return RemoteProtocolError(
        ctx.aggregator, f"sent a {type(message).__name__} as the round's transcript"
    )


def _same_for_everyone(
    protocol: AggregatorRole,
    kind: type[Aggregator | CleartextAggregator],
    recipients: Sequence[str],
) -> dict[str, object]:
    assert isinstance(protocol, kind)  # made by the same backend
    transcript = protocol.transcript()
    return dict.fromkeys(recipients, transcript)


def _no_one(protocol: AggregatorRole) -> Set[str]:
    return frozenset()


def _nothing_held(protocol: AggregatorRole) -> None:
    """Nothing to free: the role object holds nothing outside memory."""


def _unchanged(message: object, participant: ParticipantRole) -> object:
    return message


# The participant's state after each reply, named after the stage whose message it sent.
_SECAGG_STAGE_REACHED = {
    ParticipantState.SHARED: "share",
    ParticipantState.MASKED: "masked",
    ParticipantState.SIGNED: "consistency",
    ParticipantState.UNMASKED: "unmask",
    ParticipantState.DONE: "prove",
}


class SecAggBackend:
    """SecAgg/SecAgg+, verified succinctly (secagg/succinct.py): a peer receives the
    aggregator's signed statement (the aggregate and the transcript without vectors), answers
    its linear check over its own masked input, and gets everyone's answers; no peer receives
    another's masked vector unless that survivor did not answer."""

    name = "secagg"
    first_stage = Stage.ADVERTISE

    def aggregator(self, ctx: RoundContext) -> AggregatorRole:
        return cast(
            AggregatorRole,
            Aggregator(
                ctx.config,
                ctx.verifiers,
                ctx.me,
                ctx.signer,
                publish=functools.partial(ctx.faults.published_aggregate, ctx.round),
                # Masked inputs go to private temporary files as they are summed: O(m) memory.
                spool=FileSpool(ctx.spool_dir),
            ),
        )

    def release(self, protocol: AggregatorRole) -> None:
        assert isinstance(protocol, Aggregator)  # made by this backend
        protocol.close()

    def participant(self, ctx: RoundContext, x: WordArray) -> ParticipantRole:
        return cast(
            ParticipantRole,
            Participant(ctx.config, ctx.me, ctx.signer, ctx.verifiers, x, ctx.rng, ctx.aggregator),
        )

    def is_transcript(self, message: object) -> bool:
        return isinstance(message, SuccinctTranscript | ProofAnswers)

    def is_heavy(self, message: object) -> bool:
        # Expanding every mask; evaluating the linear check over the own vector.
        return isinstance(message, SharesToYou | ProofRequest)

    def completed(self, transcript: object, participant: ParticipantRole) -> object:
        """A survivor that answered holds the statement already: it is sent only the
        answers, and completes the transcript with the statement it answered."""
        if isinstance(transcript, ProofAnswers) and isinstance(participant, Participant):
            statement = participant.statement
            if statement is not None:
                return SuccinctTranscript.completed(statement, transcript)
        return transcript

    def stage_reached(self, participant: ParticipantRole) -> str:
        state = participant.state
        if isinstance(state, ParticipantState) and state in _SECAGG_STAGE_REACHED:
            return _SECAGG_STAGE_REACHED[state]
        return str(state.value)

    def misbehaving(self, protocol: AggregatorRole) -> Set[str]:
        assert isinstance(protocol, Aggregator)
        return protocol.misbehaving

    def transcripts(self, protocol: AggregatorRole, recipients: Sequence[str]) -> dict[str, object]:
        assert isinstance(protocol, Aggregator)  # made by this backend
        # The vectors travel only for survivors without valid answers (late or lying).
        holders = protocol.asked_to_prove
        answers = protocol.proof_answers() if holders & set(recipients) else None
        full = protocol.succinct_transcript() if set(recipients) - holders else None
        return {r: answers if r in holders else full for r in recipients}

    def verify(
        self, transcript: object, ctx: RoundContext, sent: Sequence[object]
    ) -> tuple[WordArray, tuple[str, ...]]:
        if isinstance(transcript, ProofAnswers):
            raise RemoteProtocolError(
                ctx.aggregator, "sent the answers of a statement this peer never answered"
            )
        if not isinstance(transcript, SuccinctTranscript):
            raise _not_a_transcript(ctx, transcript)
        # What this peer sent binds the transcript: its masked input must be in it, the
        # survivor set must be the one it signed (else the aggregator showed two views), and
        # its answers must be counted as sent.
        own = next((m for m in sent if isinstance(m, MaskedInput)), None)
        signed = next((m for m in sent if isinstance(m, ConsistencySignature)), None)
        answers = next((m for m in sent if isinstance(m, LinearAnswers)), None)
        if own is not None and signed is None and own.sender not in transcript.survivors:
            # My input reached the aggregator too late (or it says so) and I signed no
            # survivor set: left out like a dropout. Harmless: honest peers reveal self-mask
            # shares only of the one signed survivor set, so my input was never unmasked.
            own = None
        verified = verify_succinct(
            transcript,
            ctx.config,
            ctx.verifiers,
            aggregator=ctx.aggregator,
            own=own,
            signed=signed,
            own_answers=answers,
        )
        return verified.aggregate, verified.survivors


class CleartextBackend:
    name = "cleartext"
    first_stage = Stage.MASKED

    def aggregator(self, ctx: RoundContext) -> AggregatorRole:
        return cast(AggregatorRole, CleartextAggregator(ctx.config, ctx.verifiers, ctx.me))

    def participant(self, ctx: RoundContext, x: WordArray) -> ParticipantRole:
        return cast(ParticipantRole, CleartextParticipant(ctx.config, ctx.me, ctx.signer, x))

    def is_transcript(self, message: object) -> bool:
        return isinstance(message, CleartextTranscript)

    def is_heavy(self, message: object) -> bool:
        return False

    def completed(self, transcript: object, participant: ParticipantRole) -> object:
        return _unchanged(transcript, participant)

    def stage_reached(self, participant: ParticipantRole) -> str:
        return Stage.MASKED.value

    def misbehaving(self, protocol: AggregatorRole) -> Set[str]:
        return _no_one(protocol)

    def release(self, protocol: AggregatorRole) -> None:
        _nothing_held(protocol)

    def transcripts(self, protocol: AggregatorRole, recipients: Sequence[str]) -> dict[str, object]:
        return _same_for_everyone(protocol, CleartextAggregator, recipients)

    def verify(
        self, transcript: object, ctx: RoundContext, sent: Sequence[object]
    ) -> tuple[WordArray, tuple[str, ...]]:
        if not isinstance(transcript, CleartextTranscript):
            raise _not_a_transcript(ctx, transcript)
        aggregate = verify_cleartext_transcript(transcript, ctx.config, ctx.verifiers)
        return aggregate, transcript.survivors


class PlainBackend(CleartextBackend):
    name = "plain"

    def is_transcript(self, message: object) -> bool:
        return isinstance(message, PlainSum)

    def transcripts(self, protocol: AggregatorRole, recipients: Sequence[str]) -> dict[str, object]:
        assert isinstance(protocol, CleartextAggregator)  # made by this backend
        return dict.fromkeys(recipients, protocol.plain_sum())

    def verify(
        self, transcript: object, ctx: RoundContext, sent: Sequence[object]
    ) -> tuple[WordArray, tuple[str, ...]]:
        if not isinstance(transcript, PlainSum):
            raise _not_a_transcript(ctx, transcript)
        return check_plain_sum(transcript, ctx.config, ctx.me), transcript.survivors


class PaillierBackend:
    name = "paillier"
    first_stage = paillier.PaillierStage.KEY

    @staticmethod
    def config(ctx: RoundContext) -> paillier.PaillierConfig:
        """The round's Paillier parameters. The key holder is the peer after the aggregator
        in roster order: never the aggregator, and it moves when a round is retried."""
        peers = ctx.config.peers
        key_holder = peers[(peers.index(ctx.aggregator) + 1) % len(peers)]
        return paillier.PaillierConfig(
            ctx.config,
            key_holder,
            key_bits=ctx.paillier_key_bits,
            insecure_small_keys=ctx.paillier_key_bits < paillier.DEFAULT_KEY_BITS,
        )

    def aggregator(self, ctx: RoundContext) -> AggregatorRole:
        return cast(
            AggregatorRole, paillier.PaillierAggregator(self.config(ctx), ctx.verifiers, ctx.me)
        )

    def participant(self, ctx: RoundContext, x: WordArray) -> ParticipantRole:
        return cast(
            ParticipantRole,
            paillier.PaillierPeer(
                self.config(ctx), ctx.me, ctx.signer, ctx.verifiers, x, ctx.rng, ctx.aggregator
            ),
        )

    def is_transcript(self, message: object) -> bool:
        return isinstance(
            message, paillier.PaillierTranscript | paillier.RedactedPaillierTranscript
        )

    def is_heavy(self, message: object) -> bool:
        return isinstance(
            message, paillier.KeyAnnouncement | paillier.InputsToCheck | paillier.DecryptionRequest
        )

    def completed(self, transcript: object, participant: ParticipantRole) -> object:
        return _unchanged(transcript, participant)

    def stage_reached(self, participant: ParticipantRole) -> str:
        state = participant.state
        if state is paillier.PaillierParticipantState.ENCRYPTED:
            return paillier.PaillierStage.INPUT.value
        if state is paillier.KeyHolderState.DONE:
            return paillier.PaillierStage.DECRYPT.value
        return paillier.PaillierStage.ENDORSE.value

    def misbehaving(self, protocol: AggregatorRole) -> Set[str]:
        return _no_one(protocol)

    def release(self, protocol: AggregatorRole) -> None:
        _nothing_held(protocol)

    def transcripts(self, protocol: AggregatorRole, recipients: Sequence[str]) -> dict[str, object]:
        assert isinstance(protocol, paillier.PaillierAggregator)  # made by this backend
        # The key holder must never see individual ciphertexts: it gets a redacted one.
        key_holder = protocol.config.key_holder
        full = next((protocol.transcript(r) for r in recipients if r != key_holder), None)
        return {
            r: protocol.transcript(r) if r == key_holder or full is None else full
            for r in recipients
        }

    def verify(
        self, transcript: object, ctx: RoundContext, sent: Sequence[object]
    ) -> tuple[WordArray, tuple[str, ...]]:
        if not isinstance(
            transcript, paillier.PaillierTranscript | paillier.RedactedPaillierTranscript
        ):
            raise _not_a_transcript(ctx, transcript)
        own = next((m for m in sent if isinstance(m, paillier.EncryptedInput)), None)
        verified = paillier.verify_paillier_transcript(
            transcript, self.config(ctx), ctx.verifiers, own=own, me=ctx.me
        )
        return verified.aggregate, verified.survivors


BACKENDS: dict[str, RoundBackend] = {
    "secagg": SecAggBackend(),
    "paillier": PaillierBackend(),
    "cleartext": CleartextBackend(),
    "plain": PlainBackend(),
}


def backend_for(aggregation: str) -> RoundBackend:
    try:
        return BACKENDS[aggregation]
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}") from None
