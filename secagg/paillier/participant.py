"""A contributor's state machine: encrypt its input, endorse the product."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from enum import StrEnum
from typing import Any, cast

import numpy.typing as npt

from .._roles import drive, own_input, require_verifiers
from ..crypto import RandomSource, Signer, Verifier
from ..errors import (
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
)
from .checks import _Checks
from .config import AGGREGATOR, PaillierConfig
from .encoding import _product, _random_unit, endorsement_payload, pack
from .messages import (
    EncryptedInput,
    Endorsement,
    InputsToCheck,
    KeyAnnouncement,
    PaillierParticipantMessage,
    _contributions,
    aggregate_digest,
)


class PaillierParticipantState(StrEnum):
    WAITING_KEY = "waiting-key"
    ENCRYPTED = "encrypted"  # sent EncryptedInput, waits for InputsToCheck
    DONE = "done"
    FAILED = "failed"


class PaillierParticipant:
    """One peer's side of one round (the key holder peer has one too).

        p = PaillierParticipant(config, "hospital-a", signer, verifiers, x, rng, "hospital-c")
        send(p.receive(key_announcement))  # EncryptedInput (heavy: run it off the event loop)
        send(p.receive(inputs_to_check))   # Endorsement; p.state is DONE
        # the key holder's participant is DONE after its EncryptedInput

    Args:
        config: the round's parameters.
        me: this peer's id (in the roster).
        signer: signs with this institution's key.
        verifiers: every roster peer's signature verifier.
        x: this peer's quantized input: ``vector_length`` words of the ring.
        rng: the source of the encryption randomness.
        aggregator: the aggregator's peer id; it must not be the key holder.
    """

    def __init__(
        self,
        config: PaillierConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        x: npt.ArrayLike,
        rng: RandomSource,
        aggregator: str = AGGREGATOR,
    ) -> None:
        if not config.round.is_member(me):
            raise LocalProtocolError(f"{me} is not in the roster of this round")
        if aggregator == config.key_holder:
            raise ConfigError(
                f"{aggregator} cannot be both aggregator and key holder: it could decrypt "
                "every input"
            )
        require_verifiers(config.round.peers, verifiers)
        vector = own_input(x, config.round)
        self.config = config
        self.me = me
        self.aggregator = aggregator
        self.state = PaillierParticipantState.WAITING_KEY
        self.sent_input: EncryptedInput | None = None
        self._signer = signer
        self._checks = _Checks(config, verifiers)
        self._x = vector
        self._rng = rng
        self._n = 0

    def receive(self, message: object) -> PaillierParticipantMessage:
        """Handle the aggregator's next message and return the reply to send.

        Raises:
            RemoteProtocolError: the aggregator (or a relayed peer) broke the protocol,
                including a message the current state does not expect.
            LocalProtocolError: a message after the participant FAILED.
        In both cases the participant is FAILED and sends nothing more.
        """
        return drive(
            self,
            message,
            _PARTICIPANT_TRANSITIONS,
            offender=self.aggregator,
            failed=PaillierParticipantState.FAILED,
            refused_in=(PaillierParticipantState.FAILED,),
        )

    def _on_key(self, message: KeyAnnouncement) -> tuple[EncryptedInput, PaillierParticipantState]:
        public_key = self._checks.key(message, self.aggregator)
        self._n = public_key.n
        ciphertexts = tuple(
            public_key.raw_encrypt(m, r_value=_random_unit(self._n, self._rng))
            for m in pack(self._x, self.config)
        )
        unsigned = EncryptedInput(
            self.me, self.config.session_id, self.config.round_number, ciphertexts, b""
        )
        signature = self._signer.sign(unsigned.signed_payload(self.config.digest))
        self.sent_input = replace(unsigned, signature=signature)
        done = self.me == self.config.key_holder
        next_state = PaillierParticipantState.DONE if done else PaillierParticipantState.ENCRYPTED
        return self.sent_input, next_state

    def _on_inputs(self, message: InputsToCheck) -> tuple[Endorsement, PaillierParticipantState]:
        config, agg = self.config, self.aggregator
        self._checks.round_of(message, agg, "inputs to check")
        inputs: dict[str, EncryptedInput] = {}
        for encrypted in message.inputs:
            if encrypted.sender in inputs:
                raise RemoteProtocolError(agg, f"relayed two inputs of {encrypted.sender}")
            self._checks.encrypted_input(encrypted, self._n, agg)
            inputs[encrypted.sender] = encrypted
        if inputs.get(self.me) != self.sent_input:
            raise RemoteProtocolError(agg, "my own input is missing or altered")
        if len(inputs) < config.round.threshold:
            raise RemoteProtocolError(
                agg,
                f"asked to endorse a sum of {len(inputs)} inputs, "
                f"threshold is {config.round.threshold}",
            )
        product = _product(
            (inputs[u].ciphertexts for u in config.round.peers if u in inputs),
            config.ciphertext_count,
            self._n**2,
        )
        payload = endorsement_payload(
            config.digest, _contributions(inputs, config), aggregate_digest(product)
        )
        reply = Endorsement(
            self.me, config.session_id, config.round_number, self._signer.sign(payload)
        )
        return reply, PaillierParticipantState.DONE


_ParticipantHandler = Callable[
    [PaillierParticipant, Any], tuple[PaillierParticipantMessage, PaillierParticipantState]
]
_PARTICIPANT_TRANSITIONS: dict[tuple[PaillierParticipantState, type], _ParticipantHandler] = {
    (PaillierParticipantState.WAITING_KEY, KeyAnnouncement): cast(
        _ParticipantHandler, PaillierParticipant._on_key
    ),
    (PaillierParticipantState.ENCRYPTED, InputsToCheck): cast(
        _ParticipantHandler, PaillierParticipant._on_inputs
    ),
}
