"""The participant role: one object per peer per round, driven by the aggregator's messages.

    p = Participant(config, "hospital-a", signer, verifiers, x, rng)
    send(p.start())                      # AdvertiseKeys
    send(p.receive(advertised_keys))     # ShareKeys
    send(p.receive(shares_to_you))       # MaskedInput
    send(p.receive(survivor_set))        # ConsistencySignature
    send(p.receive(unmask_request))      # UnmaskShares
    send(p.receive(proof_request))       # LinearAnswers; p.state is DONE

The aggregator is not trusted. Before answering, the participant checks everything it can
(see ``_on_*``); any violation raises :class:`RemoteProtocolError` naming the offender and
finishes the object (state FAILED), so it never reveals anything afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from enum import StrEnum
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag

from ._roles import drive, own_input, require_verifiers
from .config import RoundConfig
from .crypto import (
    KeyPair,
    RandomSource,
    Signer,
    Verifier,
    aead_decrypt,
    aead_encrypt,
    canonical,
    derive_channel_key,
    is_valid_x25519_public,
)
from .errors import InvalidSignatureError, LocalProtocolError, RemoteProtocolError
from .masking import mask_input, self_mask_commitment
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
    answers_payload,
    consistency_payload,
    masked_payload,
    share_payload,
    vector_hasher,
)
from .ring import WordArray
from .shamir import SHARE_BYTES, decode_share, encode_share, split_secret
from .succinct import expected_answers

__all__ = ["Participant", "ParticipantState"]

AGGREGATOR = "aggregator"


class ParticipantState(StrEnum):
    NEW = "new"
    ADVERTISED = "advertised"  # sent AdvertiseKeys, waits for AdvertisedKeys
    SHARED = "shared"  # sent ShareKeys, waits for SharesToYou
    MASKED = "masked"  # sent MaskedInput, waits for SurvivorSet
    SIGNED = "signed"  # sent ConsistencySignature, waits for UnmaskRequest
    UNMASKED = "unmasked"  # sent UnmaskShares, waits for ProofRequest
    DONE = "done"
    FAILED = "failed"


def share_associated_data(digest: bytes, sender: str, recipient: str) -> bytes:
    return canonical("secagg/share/v1", digest, sender, recipient)


class Participant:
    """One peer's side of one round.

    Args:
        config: the round's parameters (identical at every peer).
        me: this peer's id (must be in ``config.peers``).
        signer: signs with this institution's key.
        verifiers: every roster peer's signature verifier, by peer id.
        x: this peer's input, already quantized: ``vector_length`` words of the ring.
        rng: the source of every secret (keys, seeds, share polynomials, nonces).
        aggregator: the aggregator's peer id, used to name it in errors.
        masked_buffer: where to write the masked input y (a fresh array when omitted). The
            participant owns it from then on: y is sent from it and kept for the prove stage,
            so the caller must not touch it while the round lives. For callers that hold many
            participants in one process (the simulator), which would otherwise fault in fresh
            pages for every y where a peer process recycles the previous round's memory.
    """

    def __init__(
        self,
        config: RoundConfig,
        me: str,
        signer: Signer,
        verifiers: Mapping[str, Verifier],
        x: npt.ArrayLike,
        rng: RandomSource,
        aggregator: str = AGGREGATOR,
        masked_buffer: WordArray | None = None,
    ) -> None:
        if not config.is_member(me):
            raise LocalProtocolError(f"{me} is not in the roster of this round")
        require_verifiers(sorted(config.neighbourhood(me)), verifiers, "neighbours ")
        vector = own_input(x, config)
        if masked_buffer is not None:
            buffer = own_input(masked_buffer, config)
            if not buffer.flags.writeable or np.shares_memory(buffer, vector):
                raise LocalProtocolError("the buffer for y must be writable and apart from x")
        self._masked_buffer = masked_buffer
        self.config = config
        self.me = me
        self.aggregator = aggregator
        self.state = ParticipantState.NEW
        self._signer = signer
        self._verifiers = verifiers
        self._x = vector
        self._rng = rng
        self._neighbourhood = config.neighbourhood(me)
        # Filled in as the round advances.
        self._channel_keys: KeyPair | None = None
        # AES-GCM key with each neighbour, derived once: the same (symmetric in the pair)
        # encrypts my shares to v and decrypts v's shares to me. Dropped after masking.
        self._channel_key_with: dict[str, bytes] = {}
        # The share ciphertext and signature I sent myself: what must come back, byte for byte.
        self._own_shares: tuple[bytes, bytes] | None = None
        self._mask_keys: KeyPair | None = None
        self._self_seed = b""
        self._advert: AdvertiseKeys | None = None
        self._adverts: dict[str, AdvertiseKeys] = {}
        self._held_shares: dict[str, tuple[int, int]] = {}  # owner -> (mask-key, self-mask)
        self._u2: frozenset[str] = frozenset()
        self._u3: tuple[str, ...] = ()
        self._masked: MaskedInput | None = None
        self._statement: Statement | None = None

    @property
    def signed_survivors(self) -> tuple[str, ...] | None:
        """The survivor set U3 this participant signed (sorted), or None if it signed none.

        An honest peer signs exactly one per round attempt; the published transcript must
        show this same set (:class:`peer.backends.SecAggBackend` compares them).
        """
        return self._u3 if self._u3 else None

    @property
    def statement(self) -> Statement | None:
        """The statement whose challenge this participant answered, or None."""
        return self._statement

    @property
    def masked_input(self) -> MaskedInput | None:
        """The masked input this participant sent (what verification binds it to)."""
        return self._masked

    # ------------------------------------------------------------------ driving

    def start(self) -> AdvertiseKeys:
        """Begin the round: make fresh keys and the self-mask seed; sign the advert."""
        if self.state is not ParticipantState.NEW:
            state, self.state = self.state, ParticipantState.FAILED
            raise LocalProtocolError(f"start() called in state {state.value}")
        self._channel_keys = KeyPair.generate(self._rng)
        self._mask_keys = KeyPair.generate(self._rng)
        self._self_seed = self._rng.token_bytes(32)
        unsigned = AdvertiseKeys(
            self.me,
            self.config.session_id,
            self.config.round,
            self._channel_keys.public,
            self._mask_keys.public,
            self_mask_commitment(self._self_seed),
            b"",
        )
        signature = self._signer.sign(unsigned.signed_payload(self.config.digest))
        self._advert = replace(unsigned, signature=signature)
        self.state = ParticipantState.ADVERTISED
        return self._advert

    def receive(self, message: object) -> ParticipantMessage:
        """Handle the aggregator's next message and return the reply to send.

        Raises:
            RemoteProtocolError: the aggregator (or a relayed peer) broke the protocol,
                including sending a message that the current state does not expect.
            LocalProtocolError: the caller drove the object wrongly: a message before
                ``start()`` or after the participant FAILED.
        In both cases the participant is FAILED and reveals nothing more.
        """
        return drive(
            self,
            message,
            _TRANSITIONS,
            offender=self.aggregator,
            failed=ParticipantState.FAILED,
            refused_in=(ParticipantState.NEW, ParticipantState.FAILED),
            check=self._check_round,
        )

    # ------------------------------------------------------------------ checks

    def _fail(self, reason: str, offender: str | None = None) -> RemoteProtocolError:
        return RemoteProtocolError(offender or self.aggregator, reason)

    def _check_round(self, message: AggregatorMessage) -> None:
        if (message.session_id, message.round) != (self.config.session_id, self.config.round):
            raise self._fail(
                f"message for session {message.session_id!r} round {message.round}, "
                f"this is session {self.config.session_id!r} round {self.config.round} "
                "(replayed or misrouted)"
            )

    def _check_threshold(self, peers: frozenset[str] | set[str], stage: str) -> None:
        present = len(peers & self._neighbourhood)
        if present < self.config.threshold:
            raise self._fail(
                f"only {present} of my neighbourhood at {stage}, threshold is "
                f"{self.config.threshold}; refusing to continue"
            )

    # ------------------------------------------------------------------ stage handlers

    def _on_advertised_keys(self, message: AdvertisedKeys) -> tuple[ShareKeys, ParticipantState]:
        adverts: dict[str, AdvertiseKeys] = {}
        seen_keys: set[bytes] = set()
        for advert in message.adverts:
            sender = advert.sender
            if sender not in self._neighbourhood:
                raise self._fail(f"relayed an advert of {sender!r}, not in my neighbourhood")
            if sender in adverts:
                raise self._fail(f"relayed two adverts of {sender}")
            if (advert.session_id, advert.round) != (self.config.session_id, self.config.round):
                raise self._fail(f"relayed an advert of {sender} from another round (replay)")
            if not self._verifiers[sender].verify(
                advert.signature, advert.signed_payload(self.config.digest)
            ):
                raise InvalidSignatureError(
                    self.aggregator, f"relayed an advert of {sender} whose signature is invalid"
                )
            for key in (advert.channel_public, advert.mask_public):
                if not is_valid_x25519_public(key):
                    raise self._fail(
                        f"relayed an advert of {sender} with a non-canonical or small-order key"
                    )
                if key in seen_keys:
                    raise self._fail(f"advert of {sender} reuses a public key of another advert")
                seen_keys.add(key)
            adverts[sender] = advert
        if adverts.get(self.me) != self._advert:
            raise self._fail("my own advert was not echoed back unchanged")
        self._check_threshold(set(adverts), "advertise")
        self._adverts = adverts

        assert self._mask_keys is not None
        assert self._channel_keys is not None
        recipients = sorted(adverts, key=self.config.index)
        xs = [self.config.index(v) for v in recipients]
        t = self.config.threshold
        mask_key_shares = split_secret(self._mask_keys.private_bytes(), xs, t, self._rng)
        self_mask_shares = split_secret(self._self_seed, xs, t, self._rng)
        ciphertexts = []
        signatures = []
        # Built aside and bound once: handlers rebind state, never mutate what they hold, so
        # a copied participant (tests fork them per stage) stays independent.
        channel_keys: dict[str, bytes] = {}
        for v, x in zip(recipients, xs, strict=True):
            key = channel_keys[v] = derive_channel_key(
                self._channel_keys.exchange(adverts[v].channel_public),
                self.config.session_id,
                self.config.round,
                self.me,
                v,
            )
            plaintext = encode_share(mask_key_shares[x]) + encode_share(self_mask_shares[x])
            ad = share_associated_data(self.config.digest, self.me, v)
            ciphertext = aead_encrypt(key, plaintext, ad, self._rng)
            ciphertexts.append((v, ciphertext))
            signatures.append(
                self._signer.sign(share_payload(self.config.digest, self.me, v, ciphertext))
            )
        self._channel_key_with = channel_keys
        mine = recipients.index(self.me)
        self._own_shares = (ciphertexts[mine][1], signatures[mine])
        reply = ShareKeys(
            self.me,
            self.config.session_id,
            self.config.round,
            tuple(ciphertexts),
            tuple(signatures),
        )
        return reply, ParticipantState.SHARED

    def _on_shares_to_you(self, message: SharesToYou) -> tuple[MaskedInput, ParticipantState]:
        if message.recipient != self.me:
            raise self._fail(f"shares addressed to {message.recipient!r} were sent to me")
        assert self._mask_keys is not None
        held: dict[str, tuple[int, int]] = {}
        for (sender, ciphertext), signature in zip(
            message.ciphertexts, message.signatures, strict=True
        ):
            if sender not in self._adverts:
                raise self._fail(f"relayed shares from {sender!r}, who did not advertise keys")
            if sender in held:
                raise self._fail(f"relayed two share ciphertexts from {sender}")
            # The sender's signature decides whom to blame: a ciphertext its sender did not
            # sign was altered or forged on the way (by the aggregator, who relays it); one it
            # signed that does not decrypt is the sender's fault. My own must come back as I
            # sent it, which a byte comparison checks more strictly than my signature would
            # (and without an Ed25519 verification in the masked stage).
            if sender == self.me:
                if (ciphertext, signature) != self._own_shares:
                    raise InvalidSignatureError(
                        self.aggregator,
                        "relayed my own share ciphertext or its signature other than I sent "
                        "it (altered or forged on the way)",
                    )
            elif not self._verifiers[sender].verify(
                signature, share_payload(self.config.digest, sender, self.me, ciphertext)
            ):
                raise InvalidSignatureError(
                    self.aggregator,
                    f"relayed a share ciphertext of {sender} that {sender} did not sign "
                    "(altered or forged on the way)",
                )
            # Every advertised sender got my shares, under the same key it used for its own.
            key = self._channel_key_with[sender]
            ad = share_associated_data(self.config.digest, sender, self.me)
            try:
                plaintext = aead_decrypt(key, ciphertext, ad)
                if len(plaintext) != 2 * SHARE_BYTES:
                    raise ValueError("wrong share length")
                held[sender] = (
                    decode_share(plaintext[:SHARE_BYTES]),
                    decode_share(plaintext[SHARE_BYTES:]),
                )
            except (InvalidTag, ValueError) as error:
                raise self._fail(
                    f"shares from {sender} do not decrypt to valid shares ({error!r})", sender
                ) from None
        if self.me not in held:
            raise self._fail("my own shares were not delivered back to me")
        self._check_threshold(set(held), "share")
        self._held_shares = held
        self._u2 = frozenset(held)
        self._channel_key_with = {}  # no more shares to decrypt in this round
        self._own_shares = None

        masked_with = tuple(sorted((v for v in held if v != self.me), key=self.config.index))
        y = mask_input(
            self.config,
            self.me,
            self._x,
            self._self_seed,
            self._mask_keys,
            {v: self._adverts[v].mask_public for v in masked_with},
            hasher=(hasher := vector_hasher()),
            out=self._masked_buffer,
        )
        self._masked_buffer = None  # now y: never written again
        # The same payload as MaskedInput.signed_payload, with y's digest from the masking
        # pass instead of a second read of y; the message keeps that digest (its headers and
        # the prove stage need it again) and makes y read-only, so it cannot go stale.
        y_sha256 = hasher.digest()
        payload = masked_payload(self.config.digest, self.me, masked_with, y_sha256)
        self._masked = MaskedInput(
            self.me,
            self.config.session_id,
            self.config.round,
            masked_with,
            y,
            self._signer.sign(payload),
            known_sha256=y_sha256,
        )
        return self._masked, ParticipantState.MASKED

    def _on_survivor_set(
        self, message: SurvivorSet
    ) -> tuple[ConsistencySignature, ParticipantState]:
        survivors = message.survivors
        if len(set(survivors)) != len(survivors):
            raise self._fail("survivor set lists a peer twice")
        unknown = [u for u in survivors if not self.config.is_member(u)]
        if unknown:
            raise self._fail(f"survivor set names peers outside the roster: {unknown}")
        if self.me not in survivors:
            raise self._fail("I am not in the survivor set although I sent my masked input")
        # U3 within my neighbourhood must be a subset of U2 (peers that shared with me).
        strangers = sorted((set(survivors) & self._neighbourhood) - self._u2)
        if strangers:
            raise self._fail(f"survivors {strangers} never sent me their shares (U3 ⊄ U2)")
        self._check_threshold(set(survivors), "masked")
        if len(survivors) < self.config.quorum:
            raise self._fail(
                f"only {len(survivors)} survivors, fewer than the {self.config.quorum} "
                "consistency signatures any unmasking needs"
            )
        # The one survivor set this participant ever signs in this round attempt: it
        # reveals shares only for this set, so at most one set is ever unmasked.
        self._u3 = tuple(sorted(survivors))
        signature = self._signer.sign(consistency_payload(self.config.digest, self._u3))
        reply = ConsistencySignature(self.me, self.config.session_id, self.config.round, signature)
        return reply, ParticipantState.SIGNED

    def _on_unmask_request(self, message: UnmaskRequest) -> tuple[UnmaskShares, ParticipantState]:
        """Reveal shares, but only for the one survivor set a roster quorum signed, and only
        self-mask shares of survivors whose masks with other survivors protect them.

        Why each check (the attacks are in tests/security/test_secagg_attacks.py):

        * the survivor set is the one I signed and carries >= Q = floor((n + c)/2) + 1 valid
          signatures over it from distinct roster members: two different sets would need
          an honest peer to sign twice, so all honest peers unmask the same set;
        * every survivor u whose self-mask share I reveal signed a masked input with at
          least t - 1 mask partners in that set: otherwise an aggregator that cut u's shares
          (U2) to a few peers it then declares dropped would strip every mask from y_u;
        * a dropped peer is one that shared with me and is not a survivor, listed once.
        """
        u3 = set(self._u3)
        if tuple(sorted(message.survivors)) != self._u3 or len(message.survivors) != len(u3):
            raise self._fail("unmask request names a survivor set other than the one I signed")
        if len(set(message.dropped)) != len(message.dropped):
            raise self._fail("unmask request lists a dropped peer twice")
        both = sorted(u3 & set(message.dropped))
        if both:
            raise self._fail(
                f"asked for both the self-mask and the mask-key share of {both}: "
                "that would reveal their input"
            )
        not_dropped = sorted(set(message.dropped) - (self._u2 - u3))
        if not_dropped:
            raise self._fail(f"asked for mask-key shares of {not_dropped}, who did not drop out")
        self._check_quorum(message)
        revealed = sorted(u3 & self._u2, key=self.config.index)
        self._check_mask_partners(message, revealed)

        self_mask_shares = tuple((u, encode_share(self._held_shares[u][1])) for u in revealed)
        mask_key_shares = tuple(
            (u, encode_share(self._held_shares[u][0]))
            for u in sorted(message.dropped, key=self.config.index)
        )
        unsigned = UnmaskShares(
            self.me,
            self.config.session_id,
            self.config.round,
            self_mask_shares,
            mask_key_shares,
            b"",
        )
        signature = self._signer.sign(unsigned.signed_payload(self.config.digest))
        return replace(unsigned, signature=signature), ParticipantState.UNMASKED

    def _on_proof_request(self, message: ProofRequest) -> tuple[LinearAnswers, ParticipantState]:
        """Answer the linear check of the statement over my own masked input.

        The answers are linear functions of y, which the aggregator holds anyway: signing
        them reveals nothing to it. They are checked to be over the statement that shows my
        input unaltered and the survivor set I signed, so that they can never vouch for a
        sum in which my input was swapped, nor for a second view.
        """
        statement = message.statement
        digest = self.config.digest
        assert self._masked is not None
        if (statement.session_id, statement.round) != (self.config.session_id, self.config.round):
            raise self._fail(
                f"statement of session {statement.session_id!r} round {statement.round}"
            )
        if statement.aggregator != self.aggregator:
            raise self._fail(f"statement in the name of {statement.aggregator!r}")
        verifier = self._verifiers.get(self.aggregator)
        if verifier is not None and not verifier.verify(
            statement.signature, statement.signed_payload(digest)
        ):
            raise InvalidSignatureError(self.aggregator, "statement without its valid signature")
        if tuple(sorted(statement.survivors)) != self._u3:
            raise self._fail("the statement names a survivor set other than the one I signed")
        mine = [h for h in statement.masked if h.sender == self.me]
        if mine != [self._masked.header()]:
            raise self._fail("the statement shows my masked input altered or missing")
        if statement.aggregate.shape != (self.config.vector_length,):
            raise self._fail("the statement's aggregate has the wrong length")
        answers = expected_answers(self.config, statement, self._masked.vector)
        statement_sha256 = statement.sha256(digest)
        signature = self._signer.sign(
            answers_payload(digest, self.me, statement_sha256, mine[0].vector_sha256, answers)
        )
        self._statement = statement
        reply = LinearAnswers(
            self.me, self.config.session_id, self.config.round, statement_sha256, answers, signature
        )
        return reply, ParticipantState.DONE

    def _check_quorum(self, message: UnmaskRequest) -> None:
        payload = consistency_payload(self.config.digest, self._u3)
        listed: set[str] = set()
        for signed in message.signatures:
            if signed.sender not in self._u3 or signed.sender in listed:
                raise self._fail(f"consistency signature from {signed.sender!r} is not expected")
            listed.add(signed.sender)
        # Every listed signature is checked, not just Q of them: one that does not match is
        # proof that the aggregator showed different survivor sets, and is reported.
        for signed in message.signatures:
            verifier = self._verifiers.get(signed.sender)
            if verifier is None or not verifier.verify(signed.signature, payload):
                raise InvalidSignatureError(
                    self.aggregator,
                    f"consistency signature of {signed.sender} does not match my survivor set",
                )
        if len(listed) < self.config.quorum:
            raise self._fail(
                f"only {len(listed)} consistency signatures over my survivor set, "
                f"{self.config.quorum} of the {len(self.config.peers)} roster peers needed "
                f"(against {self.config.colluders} colluders)"
            )

    def _check_mask_partners(self, message: UnmaskRequest, revealed: list[str]) -> None:
        headers: dict[str, MaskedHeader] = {}
        for header in message.masked:
            if header.sender in headers:
                raise self._fail(f"unmask request lists two masked inputs of {header.sender}")
            if header.sender not in revealed:
                raise self._fail(
                    f"unmask request carries a masked input of {header.sender!r}, "
                    "not a survivor of my neighbourhood"
                )
            headers[header.sender] = header
        needed = self.config.threshold - 1
        for u in revealed:
            if u not in headers:
                raise self._fail(f"survivor {u} has no masked input in the unmask request")
            header = headers[u]
            if u == self.me:
                assert self._masked is not None
                if header != self._masked.header():
                    raise self._fail("the unmask request shows my masked input altered")
            elif not self._verifiers[u].verify(
                header.signature, header.signed_payload(self.config.digest)
            ):
                raise InvalidSignatureError(
                    self.aggregator, f"masked input header of {u} has an invalid signature"
                )
            partners = set(header.masked_with) & set(self._u3)
            if len(partners) < needed:
                raise self._fail(
                    f"survivor {u} masked with only {len(partners)} other survivors, "
                    f"{needed} (t - 1) needed: unmasking it would reveal its input"
                )


_Handler = Callable[[Participant, Any], tuple[ParticipantMessage, ParticipantState]]

# The transition table: (state, message type) -> handler. Anything else is a protocol error.
_TRANSITIONS: dict[tuple[ParticipantState, type], _Handler] = {
    (ParticipantState.ADVERTISED, AdvertisedKeys): cast(_Handler, Participant._on_advertised_keys),
    (ParticipantState.SHARED, SharesToYou): cast(_Handler, Participant._on_shares_to_you),
    (ParticipantState.MASKED, SurvivorSet): cast(_Handler, Participant._on_survivor_set),
    (ParticipantState.SIGNED, UnmaskRequest): cast(_Handler, Participant._on_unmask_request),
    (ParticipantState.UNMASKED, ProofRequest): cast(_Handler, Participant._on_proof_request),
}
