"""The aggregator's side of a Paillier round, and the transcripts it publishes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .._roles import AggregatorState, StagedAggregator
from ..crypto import Verifier
from ..errors import (
    ConfigError,
    InvalidSignatureError,
    LocalProtocolError,
    RemoteProtocolError,
    RoundAborted,
)
from ..ring import WordArray
from .checks import _Checks
from .config import AGGREGATOR, PaillierConfig
from .encoding import _product, _proof_holds, endorsement_payload, unpack
from .messages import (
    DecryptedSum,
    DecryptionRequest,
    EncryptedInput,
    Endorsement,
    InputsToCheck,
    KeyAnnouncement,
    PaillierAggregatorMessage,
    PaillierParticipantMessage,
    _contributions,
    aggregate_digest,
)


class PaillierStage(StrEnum):
    """The four stages of a Paillier round."""

    KEY = "key"
    INPUT = "input"
    ENDORSE = "endorse"
    DECRYPT = "decrypt"


# The aggregator's states are secagg's (RUNNING, DONE, ABORTED): one driver loop serves both.
PaillierAggregatorState = AggregatorState


_STAGE_MESSAGE: dict[PaillierStage, type] = {
    PaillierStage.KEY: KeyAnnouncement,
    PaillierStage.INPUT: EncryptedInput,
    PaillierStage.ENDORSE: Endorsement,
    PaillierStage.DECRYPT: DecryptedSum,
}
_NEXT_STAGE: dict[PaillierStage, PaillierStage | None] = {
    PaillierStage.KEY: PaillierStage.INPUT,
    PaillierStage.INPUT: PaillierStage.ENDORSE,
    PaillierStage.ENDORSE: PaillierStage.DECRYPT,
    PaillierStage.DECRYPT: None,
}


@dataclass(frozen=True, slots=True, eq=False)
class PaillierResult:
    """The round's outcome: the sum over ``survivors`` (the contributors), mod 2^bits."""

    aggregate: WordArray
    survivors: tuple[str, ...]
    dropped: Mapping[PaillierStage, tuple[str, ...]]


@dataclass(frozen=True, slots=True, eq=False)
class PaillierTranscript:
    """What the aggregator publishes (to every peer except the key holder)."""

    session_id: str
    round: int
    aggregator: str
    key: KeyAnnouncement
    inputs: tuple[EncryptedInput, ...]
    aggregate: tuple[int, ...]  # the product the key holder was asked to decrypt
    endorsements: tuple[Endorsement, ...]
    decryption: DecryptedSum

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(m.sender for m in self.inputs)


@dataclass(frozen=True, slots=True, eq=False)
class RedactedPaillierTranscript:
    """The key holder's transcript: digests of the inputs instead of the inputs.

    The key holder could decrypt any individual ciphertext, so it gets (sender, input digest)
    pairs; it checks the endorsements, its own decryption and that its own input is listed.
    """

    session_id: str
    round: int
    aggregator: str
    key: KeyAnnouncement
    contributions: tuple[tuple[str, bytes], ...]
    aggregate: tuple[int, ...]
    endorsements: tuple[Endorsement, ...]
    decryption: DecryptedSum

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(u for u, _ in self.contributions)


class PaillierAggregator(
    StagedAggregator[PaillierStage, PaillierParticipantMessage, PaillierAggregatorMessage]
):
    """The aggregator's side of one round, driven like :class:`secagg.Aggregator`:

        agg = PaillierAggregator(config, verifiers, "hospital-c")
        for stage in PaillierStage:
            for message in arriving messages (until agg.pending() is empty or a deadline):
                try: agg.receive(message)
                except RemoteProtocolError as e: log e (e.offender is left out)
            outgoing = agg.close_stage()     # {peer id: message}, or raises RoundAborted
        agg.result, agg.transcript(peer) for every peer except the key holder

    Expected senders: the key holder (key, decrypt stages), every roster peer (input), every
    contributor but the key holder (endorse).
    """

    STAGE_MESSAGE = _STAGE_MESSAGE
    NEXT_STAGE = _NEXT_STAGE

    def __init__(
        self, config: PaillierConfig, verifiers: Mapping[str, Verifier], me: str = AGGREGATOR
    ) -> None:
        if me == config.key_holder:
            raise ConfigError(
                f"{me} cannot be both aggregator and key holder: it could decrypt every input"
            )
        super().__init__(
            me, config.round.peers, verifiers, PaillierStage.KEY, frozenset({config.key_holder})
        )
        self.config = config
        self.result: PaillierResult | None = None
        self._checks = _Checks(config, verifiers)
        self._key: KeyAnnouncement | None = None
        self._n = 0
        self._inputs: dict[str, EncryptedInput] = {}
        self._aggregate: tuple[int, ...] = ()
        self._contributions: tuple[tuple[str, bytes], ...] = ()
        self._endorsements: dict[str, Endorsement] = {}
        self._decryption: DecryptedSum | None = None

    # ------------------------------------------------------------------ receiving

    def _check_round(self, message: PaillierParticipantMessage) -> None:
        self._checks.round_of(message, message.sender)

    def _validate(self, message: PaillierParticipantMessage) -> None:
        config, sender = self.config, message.sender
        if isinstance(message, KeyAnnouncement):
            self._checks.key(message, sender)
        elif isinstance(message, EncryptedInput):
            self._checks.encrypted_input(message, self._n, sender)
        elif isinstance(message, Endorsement):
            payload = endorsement_payload(
                config.digest, self._contributions, aggregate_digest(self._aggregate)
            )
            if not self._verifiers[sender].verify(message.signature, payload):
                raise InvalidSignatureError(
                    sender, "endorsement is not over the inputs and product it was shown"
                )
        elif isinstance(message, DecryptedSum):
            self._check_decryption(message, sender)

    def _check_decryption(self, message: DecryptedSum, sender: str) -> None:
        config = self.config
        digest = aggregate_digest(self._aggregate)
        if not self._verifiers[sender].verify(
            message.signature, message.signed_payload(config.digest, self._contributions, digest)
        ):
            raise InvalidSignatureError(sender, "decryption has an invalid signature")
        if not _proof_holds(
            config, self._n, self._aggregate, digest, message.plaintexts, message.witness
        ):
            raise RemoteProtocolError(sender, "decrypted sum does not match the aggregate (proof)")
        try:
            unpack(message.plaintexts, config)
        except ValueError as error:
            raise RemoteProtocolError(
                sender, f"returned a sum it should have refused: {error}"
            ) from None

    # ------------------------------------------------------------------ closing stages

    def _close(
        self, stage: PaillierStage, arrived: Mapping[str, PaillierParticipantMessage]
    ) -> dict[str, PaillierAggregatorMessage]:
        config = self.config
        sid, rnd, peers = config.session_id, config.round_number, config.round.peers
        t = config.round.threshold
        if stage is PaillierStage.KEY:
            key = arrived.get(config.key_holder)
            if not isinstance(key, KeyAnnouncement):
                raise RoundAborted(f"key holder {config.key_holder} published no valid key")
            self._key, self._n = key, key.modulus
            return dict.fromkeys(peers, key)
        if stage is PaillierStage.INPUT:
            self._inputs = {
                u: m for u, m in arrived.items() if isinstance(m, EncryptedInput) and u in peers
            }
            if len(self._inputs) < t:
                raise RoundAborted(f"only {len(self._inputs)} inputs, threshold is {t}")
            endorsers = len(set(self._inputs) - {config.key_holder})
            if endorsers < t:
                raise RoundAborted(
                    f"only {endorsers} contributors besides the key holder can endorse the sum, "
                    f"threshold is {t}"
                )
            ordered = tuple(self._inputs[u] for u in peers if u in self._inputs)
            self._aggregate = _product(
                (m.ciphertexts for m in ordered), config.ciphertext_count, self._n**2
            )
            self._contributions = _contributions(self._inputs, config)
            check = InputsToCheck(sid, rnd, ordered)
            # Never to the key holder: it could decrypt each input.
            return {u: check for u in peers if u in self._inputs and u != config.key_holder}
        if stage is PaillierStage.ENDORSE:
            self._endorsements = {
                u: m for u, m in arrived.items() if isinstance(m, Endorsement) and u in peers
            }
            if len(self._endorsements) < t:
                raise RoundAborted(f"only {len(self._endorsements)} endorsements, threshold is {t}")
            request = DecryptionRequest(
                sid,
                rnd,
                self._contributions,
                self._aggregate,
                tuple(self._endorsements[u] for u in peers if u in self._endorsements),
            )
            return {config.key_holder: request}
        decryption = arrived.get(config.key_holder)
        if not isinstance(decryption, DecryptedSum):
            raise RoundAborted(f"key holder {config.key_holder} returned no valid decryption")
        self._decryption = decryption
        self.result = PaillierResult(
            unpack(decryption.plaintexts, config),
            tuple(u for u in peers if u in self._inputs),
            dict(self.dropped),
        )
        return {}

    # ------------------------------------------------------------------ publishing

    def transcripts(self, recipients: Sequence[str]) -> dict[str, object]:
        """Every recipient's transcript: the key holder's redacted, one full one shared by the
        others (see :meth:`transcript`)."""
        key_holder = self.config.key_holder
        full = next((self.transcript(r) for r in recipients if r != key_holder), None)
        return {
            r: self.transcript(r) if r == key_holder or full is None else full for r in recipients
        }

    def transcript(self, recipient: str) -> PaillierTranscript | RedactedPaillierTranscript:
        """The round's transcript for ``recipient`` (after DONE).

        Every peer gets the full :class:`PaillierTranscript` except the key holder, which gets
        a :class:`RedactedPaillierTranscript`: individual ciphertexts must never reach it.
        Send each recipient its own transcript; never broadcast one to all.

        Raises:
            LocalProtocolError: the round has no result.
        """
        if self.result is None or self._key is None or self._decryption is None:
            raise LocalProtocolError("the round has no result to publish")
        peers = self.config.round.peers
        endorsements = tuple(self._endorsements[u] for u in peers if u in self._endorsements)
        if recipient == self.config.key_holder:
            return RedactedPaillierTranscript(
                session_id=self.config.session_id,
                round=self.config.round_number,
                aggregator=self.me,
                key=self._key,
                contributions=self._contributions,
                aggregate=self._aggregate,
                endorsements=endorsements,
                decryption=self._decryption,
            )
        return PaillierTranscript(
            session_id=self.config.session_id,
            round=self.config.round_number,
            aggregator=self.me,
            key=self._key,
            inputs=tuple(self._inputs[u] for u in peers if u in self._inputs),
            aggregate=self._aggregate,
            endorsements=endorsements,
            decryption=self._decryption,
        )
