"""One peer's Paillier roles behind the participant interface (:class:`PaillierPeer`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy.typing as npt

from ..crypto import RandomSource, Signer, Verifier
from ..errors import RemoteProtocolError
from .config import AGGREGATOR, PaillierConfig
from .key_holder import KeyHolderState, PaillierKeyHolder
from .keys import PaillierKeyGenerator
from .messages import (
    DecryptionRequest,
    EncryptedInput,
    KeyAnnouncement,
    PaillierParticipantMessage,
)
from .participant import PaillierParticipant, PaillierParticipantState


class PaillierPeer:
    """One peer's Paillier objects for one round, behind the participant interface that the
    round drivers already use (``start``, ``receive``, ``state``):

        peer = PaillierPeer(config, me, signer, verifiers, x, rng, aggregator, keygen)
        first = peer.start()   # the KeyAnnouncement at the key holder, None elsewhere
        reply = peer.receive(message)   # KeyAnnouncement, InputsToCheck or DecryptionRequest

    At the key holder it owns a :class:`PaillierKeyHolder` (which answers the
    DecryptionRequest) and a :class:`PaillierParticipant` (its own input); elsewhere only the
    participant. ``sent_input`` is this peer's own :class:`EncryptedInput`, for ``own=``.
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
        keygen: PaillierKeyGenerator | None = None,
    ) -> None:
        self.participant = PaillierParticipant(config, me, signer, verifiers, x, rng, aggregator)
        self.key_holder = (
            PaillierKeyHolder(config, me, signer, verifiers, keygen, aggregator)
            if me == config.key_holder
            else None
        )

    @property
    def state(self) -> PaillierParticipantState | KeyHolderState:
        """The key holder's state once the participant is done, else the participant's."""
        if self.key_holder is not None and self.participant.state is PaillierParticipantState.DONE:
            return self.key_holder.state
        return self.participant.state

    @property
    def sent_input(self) -> EncryptedInput | None:
        return self.participant.sent_input

    def start(self) -> KeyAnnouncement | None:
        """The key holder's announcement (generates the key: not instant); None elsewhere."""
        return self.key_holder.start() if self.key_holder is not None else None

    def receive(self, message: object) -> PaillierParticipantMessage:
        """Route ``message`` to the role it is for; see the roles' ``receive``."""
        if isinstance(message, DecryptionRequest):
            if self.key_holder is None:
                self.participant.state = PaillierParticipantState.FAILED
                raise RemoteProtocolError(
                    self.participant.aggregator, "sent a decryption request to a non-key-holder"
                )
            return self.key_holder.receive(message)
        return self.participant.receive(message)
