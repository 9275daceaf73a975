"""The aggregator role: collects each stage's messages, closes the stage, relays the next.

The aggregator is *untrusted*: it only ever holds masked vectors and the shares that the
participants chose to reveal, and everything it publishes is re-checked by every peer
(:func:`secagg.succinct.verify_succinct`, without the other peers' vectors; the full
:func:`secagg.transcript.verify_transcript` remains for the simulator and tests). After
unmasking it signs the statement (the aggregate and the transcript without vectors) and
collects the survivors' answers to its linear check (stage PROVE). It still validates what
it receives, so that one misbehaving participant is named and left out instead of spoiling
the round:

    agg = Aggregator(config, verifiers)
    for each stage:
        for message in arriving messages (until agg.pending() is empty or a deadline):
            try: agg.receive(message)
            except RemoteProtocolError as e: log e (e.offender is excluded from the round)
        outgoing = agg.close_stage()       # {peer id: message}, or raises RoundAborted
    agg.result, agg.succinct_transcript(), agg.proof_answers()

The caller owns clocks and deadlines: a peer whose message has not arrived when the caller
closes the stage has dropped out at that stage.

Memory: masked inputs are not kept. Each one is added into a running sum as it is received
and spooled (:class:`secagg.streaming.MaskedSum`, with the spool the caller injects), so
the aggregator holds O(m) words whatever n; :meth:`Aggregator.masked_sum` and
:meth:`Aggregator.masked_vector` / :meth:`Aggregator.masked_chunks` give the running sum and
a sender's input read back from the spool. :meth:`Aggregator.close` forgets the spool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from ._roles import AggregatorState, StagedAggregator
from .config import RoundConfig, Stage
from .crypto import Signer, Verifier, is_valid_x25519_public
from .errors import InvalidSignatureError, LocalProtocolError, RemoteProtocolError, RoundAborted
from .linear_check import challenge_key, linear_answers, sum_answers
from .masking import mask_correction, reconstruct_secrets
from .messages import (
    AdvertisedKeys,
    AdvertiseKeys,
    AggregatorMessage,
    ConsistencySignature,
    LinearAnswers,
    MaskedHeader,
    MaskedInput,
    ParticipantMessage,
    ProofRequest,
    ShareKeys,
    SharesToYou,
    Statement,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    consistency_payload,
    masked_payload,
    share_payload,
    statement_payload,
)
from .ring import WordArray, le_view, word_dtype
from .shamir import ShareError, decode_share
from .streaming import MaskedSum, VectorSpool, VectorStream
from .succinct import ProofAnswers, SuccinctTranscript, check_answers_form
from .transcript import Transcript

__all__ = ["AggregateResult", "Aggregator", "AggregatorState"]

_STAGE_MESSAGE: dict[Stage, type] = {
    Stage.ADVERTISE: AdvertiseKeys,
    Stage.SHARE: ShareKeys,
    Stage.MASKED: MaskedInput,
    Stage.CONSISTENCY: ConsistencySignature,
    Stage.UNMASK: UnmaskShares,
    Stage.PROVE: LinearAnswers,
}
_NEXT_STAGE: dict[Stage, Stage | None] = {
    Stage.ADVERTISE: Stage.SHARE,
    Stage.SHARE: Stage.MASKED,
    Stage.MASKED: Stage.CONSISTENCY,
    Stage.CONSISTENCY: Stage.UNMASK,
    Stage.UNMASK: Stage.PROVE,
    Stage.PROVE: None,
}


def _as_computed(aggregate: WordArray) -> WordArray:
    return aggregate


@dataclass(frozen=True, slots=True, eq=False)
class AggregateResult:
    """The round's outcome: the sum over ``survivors`` of their inputs, mod 2^bits."""

    aggregate: WordArray
    survivors: tuple[str, ...]
    dropped: Mapping[Stage, tuple[str, ...]]  # peers that missed (or were excluded at) a stage


# What the aggregator keeps of each accepted message until its stage closes: the message,
# except a masked input, of which only the header stays (its vector is in the running sum).
_Kept = ParticipantMessage | MaskedHeader


class Aggregator(StagedAggregator[Stage, _Kept, AggregatorMessage]):
    """The aggregator's side of one round (see the module docstring).

    Args:
        spool: where accepted masked inputs wait until the round ends (default: in memory;
            a peer passes private temporary files, so that memory stays O(m)).
    """

    STAGE_MESSAGE = _STAGE_MESSAGE
    NEXT_STAGE = _NEXT_STAGE

    def __init__(
        self,
        config: RoundConfig,
        verifiers: Mapping[str, Verifier],
        me: str = "aggregator",
        signer: Signer | None = None,
        publish: Callable[[WordArray], WordArray] | None = None,
        spool: VectorSpool | None = None,
    ) -> None:
        super().__init__(me, config.peers, verifiers, Stage.ADVERTISE, frozenset(config.peers))
        self.config = config
        self._sum = MaskedSum(config.vector_length, config.bits, spool)
        # What the transcript needs, kept as the stages close.
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._relayed_to: dict[str, frozenset[str]] = {}  # recipient -> its view of U2
        self._masked: dict[str, MaskedHeader] = {}
        # sender -> digest of the masked words that went into the sum, from _validate to _kept
        self._streamed_sha256: dict[str, bytes] = {}
        self._survivors: frozenset[str] = frozenset()
        self._signatures: dict[str, ConsistencySignature] = {}
        self._unmask: dict[str, UnmaskShares] = {}
        self._signer = signer  # signs the statement; None when the aggregator has no identity
        # What it states as the sum: the sum itself, unless a test plays a lying aggregator.
        self._publish = publish or _as_computed
        self._statement: Statement | None = None
        self._statement_sha256 = b""
        self._answers: dict[str, LinearAnswers] = {}
        self._fallback: tuple[str, ...] = ()  # survivors published with their vector
        self.wrong_answers: set[str] = set()  # signed answers that contradict their input
        self.result: AggregateResult | None = None

    # ------------------------------------------------------------------ receiving

    def _check_round(self, message: _Kept) -> None:
        if isinstance(message, MaskedHeader):  # never received: only kept (see _kept)
            raise LocalProtocolError("a masked input header cannot be received")
        if (message.session_id, message.round) != (self.config.session_id, self.config.round):
            raise RemoteProtocolError(
                message.sender,
                f"message for session {message.session_id!r} round {message.round} "
                "(replayed or misrouted)",
            )

    def _verify(self, sender: str, signature: bytes, payload: bytes, what: str) -> None:
        if not self._verifiers[sender].verify(signature, payload):
            raise InvalidSignatureError(sender, f"invalid signature on its {what}")

    def _kept(self, message: _Kept) -> _Kept:
        # The vector is in the running sum and the spool by now (see _validate). Its header
        # carries the digest it was accepted under (hashed as it streamed into the sum), so
        # the 4 MB vector is not hashed a second time.
        if isinstance(message, MaskedInput):
            digest = self._streamed_sha256.pop(message.sender)
            return MaskedHeader(message.sender, message.masked_with, digest, message.signature)
        return message

    def _validate(self, message: _Kept) -> None:
        config, sender = self.config, message.sender
        if isinstance(message, AdvertiseKeys):
            self._verify(sender, message.signature, message.signed_payload(config.digest), "advert")
            # Refused here, a bad key costs the round one peer; relayed, every honest
            # neighbour would refuse the whole round.
            keys = (message.channel_public, message.mask_public)
            if not all(is_valid_x25519_public(key) for key in keys):
                raise RemoteProtocolError(
                    sender, "advertised a small-order or non-canonical public key"
                )
            taken = {
                key
                for other in self._received.values()
                if isinstance(other, AdvertiseKeys)
                for key in (other.channel_public, other.mask_public)
            }
            if keys[0] == keys[1] or taken.intersection(keys):
                raise RemoteProtocolError(sender, "advertised a public key that is already in use")
        elif isinstance(message, ShareKeys):
            recipients = [v for v, _ in message.ciphertexts]
            expected = set(self._adverts) & config.neighbourhood(sender)
            if len(set(recipients)) != len(recipients) or set(recipients) != expected:
                raise RemoteProtocolError(sender, "shares are not addressed to its neighbourhood")
            # Checked here so that a sender's bad signature costs the round that sender;
            # relayed, its recipients could only blame the relay (this aggregator).
            for (v, ciphertext), signature in zip(
                message.ciphertexts, message.signatures, strict=True
            ):
                self._verify(
                    sender, signature, share_payload(config.digest, sender, v, ciphertext), "shares"
                )
        elif isinstance(message, MaskedInput):
            if message.vector.shape != (
                config.vector_length,
            ) or message.vector.dtype != word_dtype(config.bits):
                raise RemoteProtocolError(
                    sender,
                    f"masked vector has shape {message.vector.shape} and dtype "
                    f"{message.vector.dtype}, expected ({config.vector_length},) words",
                )
            expected_masks = self._shared_with(sender) - {sender}
            if set(message.masked_with) != expected_masks or len(message.masked_with) != len(
                expected_masks
            ):
                raise RemoteProtocolError(sender, "masked with peers other than those it was sent")
            stream = self._sum.stream(sender)
            stream.feed(le_view(message.vector))
            self._streamed_sha256[sender] = self._accept_masked(
                stream, message.masked_with, message.signature
            )
        elif isinstance(message, ConsistencySignature):
            payload = consistency_payload(config.digest, tuple(self._survivors))
            self._verify(sender, message.signature, payload, "consistency check")
        elif isinstance(message, LinearAnswers):
            # Form and signature here (cheap); the values against the sum when the stage
            # closes, where one evaluation checks them all.
            problem = check_answers_form(
                message,
                config,
                self._verifiers[sender],
                self._statement_sha256,
                self._header(sender).vector_sha256,
            )
            if problem is not None:
                raise RemoteProtocolError(sender, problem)
        elif isinstance(message, UnmaskShares):
            holds = self._shared_with(sender)
            owners = [u for u, _ in message.self_mask_shares]
            dropped = [v for v, _ in message.mask_key_shares]
            if set(owners) != holds & self._survivors or len(owners) != len(set(owners)):
                raise RemoteProtocolError(sender, "revealed self-mask shares of the wrong peers")
            if set(dropped) != self._dropped_for(sender) or len(dropped) != len(set(dropped)):
                raise RemoteProtocolError(sender, "revealed mask-key shares of the wrong peers")
            try:
                for _, share in (*message.self_mask_shares, *message.mask_key_shares):
                    decode_share(share)
            except ShareError as error:
                raise RemoteProtocolError(sender, f"revealed a malformed share: {error}") from None
            self._verify(sender, message.signature, message.signed_payload(config.digest), "shares")

        else:
            raise LocalProtocolError(f"no check for a {type(message).__name__}")

    def _accept_masked(
        self, stream: VectorStream, masked_with: tuple[str, ...], signature: bytes
    ) -> bytes:
        """Keep a streamed masked input in the sum if its sender signed what arrived, and
        return the digest it was accepted under.

        The digest is of the words that went into the sum and the spool, so an input whose
        words differ from what its sender signed is refused naming the sender, and its words
        leave the sum again.
        """
        digest = stream.digest()
        payload = masked_payload(self.config.digest, stream.sender, masked_with, digest)
        try:
            self._verify(stream.sender, signature, payload, "masked input")
        except RemoteProtocolError:
            stream.abort()
            raise
        stream.commit()
        return digest

    # ------------------------------------------------------------------ the running sum

    def masked_sum(self) -> WordArray:
        """The running sum of the masked inputs accepted so far (after the masked stage
        closes: of exactly the survivors'). A copy."""
        return self._sum.total.copy()

    def masked_vector(self, sender: str) -> WordArray:
        """The accepted masked input y_u of ``sender``, read back from the spool."""
        return self._sum.vector(sender)

    def masked_chunks(self, sender: str) -> Iterator[WordArray]:
        """y_u of ``sender`` piece by piece, in order (a linear functional of it, e.g.
        <r, y_u>, needs no more memory than one piece)."""
        return self._sum.chunks(sender)

    def close(self) -> None:
        """Forget every spooled masked input (when the round is over, published or not)."""
        self._sum.close()

    def _shared_with(self, recipient: str) -> set[str]:
        """Peers whose share ciphertexts were relayed to ``recipient`` (its view of U2)."""
        return set(self._relayed_to.get(recipient, ()))

    def _dropped_for(self, recipient: str) -> set[str]:
        return self._shared_with(recipient) - self._survivors

    # ------------------------------------------------------------------ closing stages

    def _dropped_at_close(
        self,
        arrived: Mapping[str, _Kept],
        outgoing: Mapping[str, AggregatorMessage],
    ) -> tuple[str, ...]:
        # Peers left out because too few of their neighbours remain have dropped too.
        return self._in_roster_order(self._expected - set(outgoing))

    def _viable(self, peers: Iterable[str], stage: Stage) -> frozenset[str]:
        """The largest subset in which everyone still has >= t of its neighbourhood."""
        alive = set(peers)
        changed = True
        while changed:
            changed = False
            for u in sorted(alive):
                if len(self.config.neighbourhood(u) & alive) < self.config.threshold:
                    alive.discard(u)
                    changed = True
        if len(alive) < self.config.threshold:
            raise RoundAborted(
                f"only {len(alive)} peers can continue after stage {stage.value}, "
                f"threshold is {self.config.threshold}"
            )
        return frozenset(alive)

    def _close(self, stage: Stage, arrived: Mapping[str, _Kept]) -> dict[str, AggregatorMessage]:
        config = self.config
        sid, rnd = config.session_id, config.round
        if stage is Stage.ADVERTISE:
            u1 = self._viable(arrived, stage)
            self._adverts = {
                u: m for u, m in arrived.items() if u in u1 and isinstance(m, AdvertiseKeys)
            }
            return {
                u: AdvertisedKeys(
                    sid,
                    rnd,
                    tuple(
                        self._adverts[v]
                        for v in config.peers
                        if v in self._adverts and v in config.neighbourhood(u)
                    ),
                )
                for u in config.peers
                if u in u1
            }
        if stage is Stage.SHARE:
            u2 = self._viable(arrived, stage)
            self._shares = {
                u: m for u, m in arrived.items() if u in u2 and isinstance(m, ShareKeys)
            }
            inbox: dict[str, list[tuple[str, bytes, bytes]]] = {v: [] for v in u2}
            for u in config.peers:
                if u in self._shares:
                    shares = self._shares[u]
                    for (v, ciphertext), signature in zip(
                        shares.ciphertexts, shares.signatures, strict=True
                    ):
                        if v in inbox:
                            inbox[v].append((u, ciphertext, signature))
            self._relayed_to = {v: frozenset(u for u, _, _ in inbox[v]) for v in inbox}
            return {
                v: SharesToYou(
                    sid,
                    rnd,
                    v,
                    tuple((u, c) for u, c, _ in inbox[v]),
                    tuple(signature for _, _, signature in inbox[v]),
                )
                for v in config.peers
                if v in inbox
            }
        if stage is Stage.MASKED:
            u3 = self._viable(arrived, stage)
            self._masked = {
                u: m for u, m in arrived.items() if u in u3 and isinstance(m, MaskedHeader)
            }
            self._survivors = frozenset(self._masked)
            # Inputs accepted from peers that cannot continue leave the running sum.
            for u in self._sum.senders - self._survivors:
                self._sum.remove(u)
            if len(self._survivors) < config.quorum:
                raise RoundAborted(
                    f"only {len(self._survivors)} survivors, {config.quorum} consistency "
                    "signatures needed"
                )
            survivors = tuple(sorted(self._survivors))
            return {
                u: SurvivorSet(sid, rnd, survivors) for u in config.peers if u in self._survivors
            }
        if stage is Stage.CONSISTENCY:
            self._signatures = {
                u: m for u, m in arrived.items() if isinstance(m, ConsistencySignature)
            }
            if len(self._signatures) < config.quorum:
                raise RoundAborted(
                    f"only {len(self._signatures)} consistency signatures, {config.quorum} needed"
                )
            # A quorum is what each participant needs and checks; sending every signature
            # would only cost each of them more verifications (the transcript has them all).
            signatures = tuple(self._signatures[u] for u in sorted(self._signatures))[
                : config.quorum
            ]
            survivors = tuple(sorted(self._survivors))
            headers = {u: self._header(u) for u in self._masked}
            return {
                u: UnmaskRequest(
                    sid,
                    rnd,
                    survivors,
                    tuple(sorted(self._dropped_for(u), key=config.index)),
                    signatures,
                    # The headers of the survivors whose self-mask shares u holds.
                    tuple(
                        headers[v]
                        for v in sorted(self._survivors & self._relayed_to[u], key=config.index)
                    ),
                )
                for u in sorted(self._signatures, key=config.index)
            }
        if stage is Stage.UNMASK:
            return self._close_unmask(arrived)
        return self._close_prove(arrived)

    def _close_unmask(self, arrived: Mapping[str, _Kept]) -> dict[str, AggregatorMessage]:
        config = self.config
        self._unmask = {u: m for u, m in arrived.items() if isinstance(m, UnmaskShares)}
        dropped = (
            frozenset(v for m in self._masked.values() for v in m.masked_with) - self._survivors
        )
        self_seeds, dropped_keys = reconstruct_secrets(
            config, self._adverts, self._survivors, dropped, self._unmask, self.misbehaving
        )
        aggregate = mask_correction(
            config,
            {u: m.masked_with for u, m in self._masked.items()},
            {u: a.mask_public for u, a in self._adverts.items()},
            self_seeds,
            dropped_keys,
        )
        # Σ y_u + C, added into C in place (verifiers rebuild C themselves): O(m) memory.
        np.add(aggregate, self._sum.total, out=aggregate)
        statement = Statement(
            config.session_id,
            config.round,
            self.me,
            tuple(self._adverts[u] for u in config.peers if u in self._adverts),
            tuple(self._header(u) for u in config.peers if u in self._masked),
            tuple(self._signatures[u] for u in sorted(self._signatures)),
            tuple((u, self_seeds[u]) for u in config.peers if u in self_seeds),
            tuple((v, dropped_keys[v].private_bytes()) for v in config.peers if v in dropped_keys),
            self._publish(aggregate),
        )
        # Hashed once here (z is 4 MB at m = 10^6): the signature does not enter the digest,
        # so the signed copy has the same one.
        statement_sha256 = statement.sha256(config.digest)
        if self._signer is not None:
            payload = statement_payload(config.digest, statement_sha256)
            statement = replace(statement, signature=self._signer.sign(payload))
        self._statement = statement
        self._statement_sha256 = statement_sha256
        # Survivors that just revealed shares are alive: they answer the challenge. A
        # survivor that did not will be published with its vector instead.
        request = ProofRequest(config.session_id, config.round, statement)
        return {u: request for u in config.peers if u in self._unmask and u in self._survivors}

    def _close_prove(self, arrived: Mapping[str, _Kept]) -> dict[str, AggregatorMessage]:
        config = self.config
        assert self._statement is not None
        answers = {u: m for u, m in arrived.items() if isinstance(m, LinearAnswers)}
        key = challenge_key(config.digest, self._statement_sha256)

        def holds(answered: Mapping[str, LinearAnswers]) -> bool:
            # Σ over the answered survivors of y_u = Σ y_u − Σ over the others.
            missing = self._survivors - set(answered)
            # The running sum itself when everyone answered (no copy: memory stays O(m)).
            partial = self._masked_sum() if missing else self._sum.total
            for u in missing:
                np.subtract(partial, self._masked_vector(u), out=partial)
            claimed = sum_answers([a.answers for a in answered.values()], config.bits)
            return linear_answers(key, partial) == claimed

        if not holds(answers):
            # Somebody signed answers that are not over its signed input: find and name it
            # (its vector is published instead, so the round still verifies).
            for u in sorted(answers, key=config.index):
                if linear_answers(key, self._masked_vector(u)) != answers[u].answers:
                    self.wrong_answers.add(u)
                    self.misbehaving.add(u)
            answers = {u: a for u, a in answers.items() if u not in self.wrong_answers}
            if not holds(answers):  # cannot happen: every remaining answer was checked
                raise RoundAborted("the linear check fails on the aggregator's own inputs")
        self._answers = answers
        self._fallback = tuple(u for u in config.peers if u in self._survivors and u not in answers)
        self.result = AggregateResult(
            self._statement.aggregate,
            tuple(u for u in config.peers if u in self._survivors),
            dict(self.dropped),
        )
        return {}

    # ------------------------------------------------------------------ the inputs held

    def _masked_vector(self, u: str) -> WordArray:
        """The masked input vector of survivor ``u``, read back from the spool."""
        return self._sum.vector(u)

    def _header(self, u: str) -> MaskedHeader:
        """Survivor ``u``'s signed masked-input header (hashed as its vector streamed in)."""
        return self._masked[u]

    def _masked_sum(self) -> WordArray:
        """Σ_u y_u over the survivors (a fresh array: the running sum, copied)."""
        return self.masked_sum()

    # ------------------------------------------------------------------ publishing

    def transcript(self, recipient: str | None = None) -> Transcript:
        """Everything a peer needs to recompute and check the aggregate (after DONE); the
        same for every ``recipient``."""
        if self.result is None:
            raise LocalProtocolError("the round has no result to publish")
        return Transcript(
            session_id=self.config.session_id,
            round=self.config.round,
            aggregator=self.me,
            adverts=tuple(self._adverts[u] for u in self.config.peers if u in self._adverts),
            masked_inputs=tuple(
                self._masked_input(u) for u in self.config.peers if u in self._masked
            ),
            consistency=tuple(self._signatures[u] for u in sorted(self._signatures)),
            unmask=tuple(self._unmask[u] for u in sorted(self._unmask)),
            aggregate=self.result.aggregate,
        )

    def _masked_input(self, u: str) -> MaskedInput:
        """Survivor ``u``'s signed masked input, its vector read back from the spool."""
        h = self._masked[u]
        return MaskedInput(
            h.sender,
            self.config.session_id,
            self.config.round,
            h.masked_with,
            self._sum.vector(u),
            h.signature,
        )

    def succinct_transcript(self) -> SuccinctTranscript:
        """The round without any answered survivor's vector (after DONE): the statement,
        every survivor's answers, and the vectors of the survivors without valid answers."""
        if self.result is None or self._statement is None:
            raise LocalProtocolError("the round has no result to publish")
        return SuccinctTranscript(
            self._statement,
            tuple(self._answers[u] for u in self.config.peers if u in self._answers),
            tuple(self._masked_input(u) for u in self._fallback),
        )

    def proof_answers(self) -> ProofAnswers:
        """What a survivor that was sent the statement still needs (after DONE)."""
        full = self.succinct_transcript()
        return ProofAnswers(
            self.config.session_id,
            self.config.round,
            self._statement_sha256,
            full.answers,
            full.inputs,
        )

    @property
    def asked_to_prove(self) -> frozenset[str]:
        """The survivors that were sent the statement (they hold it already)."""
        return frozenset(self._unmask) & self._survivors
