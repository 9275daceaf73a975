"""The key holder's state machine: one key, at most one decryption."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from enum import StrEnum
from typing import Any, cast

from .._roles import drive, require_verifiers
from ..crypto import Signer, Verifier
from ..errors import (
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
    RoundAborted,
)
from ..transcript import VerifiedAggregate
from .checks import _Checks
from .config import AGGREGATOR, PaillierConfig, PrivateKey
from .encoding import _ciphertext_problem, _proof_coefficients, unpack
from .keys import OpenSSLPrimes, PaillierKeyGenerator
from .messages import (
    DecryptedSum,
    DecryptionRequest,
    InputsToCheck,
    KeyAnnouncement,
    aggregate_digest,
)


class KeyHolderState(StrEnum):
    NEW = "new"
    PUBLISHED = "published"  # sent its key, waits for the decryption request
    DONE = "done"
    FAILED = "failed"


class PaillierKeyHolder:
    """The key holder's side of one round: one key, at most one decryption.

        kh = PaillierKeyHolder(config, "hospital-b", signer, verifiers, OpenSSLPrimes())
        send(kh.start())                 # KeyAnnouncement
        send(kh.receive(request))        # DecryptedSum; kh.state is DONE, the key is dropped
        kh.verified                      # the sum and its contributors, for agreement

    The key holder peer also contributes its own input through a separate
    :class:`PaillierParticipant`. It must never be given individual ciphertexts.

    Args:
        config: the round's parameters; ``config.key_holder`` must be ``me``.
        me: this peer's id.
        signer: signs with this institution's key.
        verifiers: every roster peer's signature verifier.
        keygen: makes the key pair (default :class:`OpenSSLPrimes`).
        aggregator: the aggregator's peer id, used to name it in errors.
    """

    def __init__(
        self,
        config: PaillierConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        keygen: PaillierKeyGenerator | None = None,
        aggregator: str = AGGREGATOR,
    ) -> None:
        if me != config.key_holder:
            raise LocalProtocolError(f"{me} is not the key holder of this round")
        if aggregator == me:
            raise ConfigError("the key holder cannot also be the aggregator")
        require_verifiers(config.round.peers, verifiers)
        self.config = config
        self.me = me
        self.aggregator = aggregator
        self.state = KeyHolderState.NEW
        self.verified: VerifiedAggregate | None = None
        self._signer = signer
        self._checks = _Checks(config, verifiers)
        self._keygen: PaillierKeyGenerator = keygen if keygen is not None else OpenSSLPrimes()
        self._private: PrivateKey | None = None

    def start(self) -> KeyAnnouncement:
        """Make a fresh key pair and sign the public modulus."""
        if self.state is not KeyHolderState.NEW:
            state, self.state = self.state, KeyHolderState.FAILED
            raise LocalProtocolError(f"start() called in state {state.value}")
        self._private = self._keygen.generate(self.config.key_bits)
        unsigned = KeyAnnouncement(
            self.me,
            self.config.session_id,
            self.config.round_number,
            self._private.public_key.n,
            b"",
        )
        signature = self._signer.sign(unsigned.signed_payload(self.config.digest))
        self.state = KeyHolderState.PUBLISHED
        return replace(unsigned, signature=signature)

    def receive(self, message: object) -> DecryptedSum:
        """Decrypt the endorsed product, once.

        Raises:
            RemoteProtocolError: the request is not one an honest aggregator sends (names the
                aggregator); including any second request.
            RoundAborted: the product decrypts outside the packing (a contributor encrypted an
                out-of-range value; nobody can be named).
            LocalProtocolError: called before ``start()`` or after a failure.
        In every case the key holder is FAILED and its private key is dropped.
        """
        return drive(
            self,
            message,
            _KEY_HOLDER_TRANSITIONS,
            offender=self.aggregator,
            failed=KeyHolderState.FAILED,
            refused_in=(KeyHolderState.NEW, KeyHolderState.FAILED),
            on_fail=self._drop_key,
            unexpected_note=_never_inputs,
        )

    def _drop_key(self) -> None:
        self._private = None

    def _on_request(self, message: DecryptionRequest) -> tuple[DecryptedSum, KeyHolderState]:
        config, agg = self.config, self.aggregator
        assert self._private is not None
        n = self._private.public_key.n
        self._checks.round_of(message, agg, "decryption request")
        contributors = [u for u, _ in message.contributions]
        if len(set(contributors)) != len(contributors) or any(
            not config.round.is_member(u) for u in contributors
        ):
            raise RemoteProtocolError(agg, "decryption request lists unknown or repeated peers")
        if contributors != sorted(contributors, key=config.round.index):
            raise RemoteProtocolError(agg, "decryption request lists peers out of roster order")
        if any(len(d) != 32 for _, d in message.contributions):
            raise RemoteProtocolError(agg, "decryption request has malformed input digests")
        if len(contributors) < config.round.threshold:
            raise RemoteProtocolError(
                agg,
                f"asked to decrypt a sum of {len(contributors)} inputs, "
                f"threshold is {config.round.threshold}",
            )
        problem = _ciphertext_problem(message.aggregate, config, n)
        if problem is not None:
            raise RemoteProtocolError(agg, f"aggregate: {problem}")
        product_digest = aggregate_digest(message.aggregate)
        self._checks.endorsements(message.endorsements, message.contributions, product_digest, agg)

        private = self._private
        plaintexts = tuple(private.raw_decrypt(c) for c in message.aggregate)
        try:
            aggregate = unpack(plaintexts, config)
        except ValueError as error:
            raise RoundAborted(
                f"the endorsed sum does not decode ({error}): a contributor encrypted a value "
                "outside the packing; the inputs cannot tell who"
            ) from None
        witness = self._witness(message.aggregate, product_digest, plaintexts)
        unsigned = DecryptedSum(
            self.me, config.session_id, config.round_number, plaintexts, witness, b""
        )
        signature = self._signer.sign(
            unsigned.signed_payload(config.digest, message.contributions, product_digest)
        )
        # One decryption per key: a second, overlapping sum would reveal the difference.
        self._private = None
        self.verified = VerifiedAggregate(
            aggregate,
            tuple(contributors),
            tuple(u for u in config.round.peers if u not in set(contributors)),
        )
        return replace(unsigned, signature=signature), KeyHolderState.DONE

    def _witness(self, aggregate: Sequence[int], digest: bytes, plaintexts: Sequence[int]) -> int:
        """W = (prod c_j^e_j mod n)^(n^-1 mod phi(n)) mod n, by CRT."""
        private = self._private
        assert private is not None
        p, q, n = private.p, private.q, private.public_key.n
        coefficients = _proof_coefficients(self.config, digest, plaintexts)
        combined = 1
        for c, e in zip(aggregate, coefficients, strict=True):
            combined = combined * pow(c % n, e, n) % n
        wp = pow(combined % p, pow(n, -1, p - 1), p)
        wq = pow(combined % q, pow(n, -1, q - 1), q)
        return int(wp + p * ((wq - wp) * pow(p, -1, q) % q))


def _never_inputs(message: object) -> str:
    if isinstance(message, InputsToCheck):
        return " (the key holder must never see individual inputs)"
    return ""


_KeyHolderHandler = Callable[[PaillierKeyHolder, Any], tuple[DecryptedSum, KeyHolderState]]
_KEY_HOLDER_TRANSITIONS: dict[tuple[KeyHolderState, type], _KeyHolderHandler] = {
    (KeyHolderState.PUBLISHED, DecryptionRequest): cast(
        _KeyHolderHandler, PaillierKeyHolder._on_request
    ),
}
