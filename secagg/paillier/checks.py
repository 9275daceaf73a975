"""The checks every role makes on relayed messages (:class:`_Checks`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from phe import paillier as phe_paillier

from ..crypto import Verifier
from ..errors import (
    InvalidSignatureError,
    RemoteProtocolError,
)
from .config import PaillierConfig, PublicKey
from .encoding import _ciphertext_problem, endorsement_payload
from .messages import EncryptedInput, Endorsement, KeyAnnouncement


class _Checks:
    """Checks every role makes on relayed messages; ``offender`` is who relayed them."""

    def __init__(self, config: PaillierConfig, verifiers: Mapping[str, Verifier]) -> None:
        self.config = config
        self.verifiers = verifiers

    def round_of(self, message: Any, offender: str, what: str = "message") -> None:
        config = self.config
        if (message.session_id, message.round) != (config.session_id, config.round_number):
            raise RemoteProtocolError(
                offender,
                f"{what} for session {message.session_id!r} round {message.round}, this is "
                f"session {config.session_id!r} round {config.round_number} "
                "(replayed or misrouted)",
            )

    def key(self, message: KeyAnnouncement, offender: str) -> PublicKey:
        config = self.config
        if message.sender != config.key_holder:
            raise RemoteProtocolError(
                offender, f"key announced by {message.sender!r}, not key holder {config.key_holder}"
            )
        self.round_of(message, offender, "key announcement")
        if not self.verifiers[config.key_holder].verify(
            message.signature, message.signed_payload(config.digest)
        ):
            raise InvalidSignatureError(offender, "key announcement has an invalid signature")
        n = message.modulus
        if n.bit_length() != config.key_bits or n % 2 == 0:
            raise RemoteProtocolError(
                offender, f"key has {n.bit_length()} bits, the round uses {config.key_bits}"
            )
        return phe_paillier.PaillierPublicKey(n)

    def encrypted_input(self, message: EncryptedInput, n: int, offender: str) -> None:
        """``offender`` is the sender when it arrives directly, the relay otherwise."""
        sender = message.sender
        if not self.config.round.is_member(sender) or sender not in self.verifiers:
            raise RemoteProtocolError(offender, f"input of {sender!r}, who is not in the roster")
        self.round_of(message, offender, f"input of {sender}")
        problem = _ciphertext_problem(message.ciphertexts, self.config, n)
        if problem is not None:
            raise RemoteProtocolError(offender, f"input of {sender}: {problem}")
        if not self.verifiers[sender].verify(
            message.signature, message.signed_payload(self.config.digest)
        ):
            raise InvalidSignatureError(offender, f"input of {sender} has an invalid signature")

    def endorsements(
        self,
        endorsements: Sequence[Endorsement],
        contributions: Sequence[tuple[str, bytes]],
        product_digest: bytes,
        offender: str,
    ) -> None:
        config = self.config
        contributors = {u for u, _ in contributions}
        payload = endorsement_payload(config.digest, contributions, product_digest)
        seen: set[str] = set()
        for endorsement in endorsements:
            signer = endorsement.sender
            if signer in seen or signer not in contributors or signer == config.key_holder:
                raise RemoteProtocolError(offender, f"endorsement of {signer!r} is not expected")
            self.round_of(endorsement, offender, f"endorsement of {signer}")
            if not self.verifiers[signer].verify(endorsement.signature, payload):
                raise InvalidSignatureError(
                    offender, f"endorsement of {signer} is not over these inputs and product"
                )
            seen.add(signer)
        if len(seen) < config.round.threshold:
            raise RemoteProtocolError(
                offender, f"only {len(seen)} endorsements, threshold is {config.round.threshold}"
            )
