"""Every peer re-checks the published transcript (:func:`verify_paillier_transcript`)."""

from __future__ import annotations

from collections.abc import Mapping

from ..crypto import Verifier
from ..errors import RemoteProtocolError
from ..transcript import TranscriptError, VerifiedAggregate
from .aggregator import PaillierTranscript, RedactedPaillierTranscript
from .checks import _Checks
from .config import PaillierConfig
from .encoding import _ciphertext_problem, _product, _proof_holds, unpack
from .messages import EncryptedInput, _contributions, aggregate_digest


def verify_paillier_transcript(
    transcript: PaillierTranscript | RedactedPaillierTranscript,
    config: PaillierConfig,
    verifiers: Mapping[str, Verifier],
    *,
    own: EncryptedInput | None = None,
    me: str | None = None,
) -> VerifiedAggregate:
    """Re-multiply the published inputs, check the decryption proof and every signature.

    A :class:`RedactedPaillierTranscript` (the key holder's) has input digests instead of
    inputs: everything is checked except the re-multiplication, which the key holder cannot
    do without seeing the inputs (it relies on the t endorsements for it).

    Args:
        transcript: as published by the round's aggregator.
        config: this peer's own copy of the round's parameters.
        verifiers: every roster peer's signature verifier.
        own: this peer's own input, if it sent one: it must appear unaltered.
        me: this peer's id. The key holder refuses a full transcript: receiving one means the
            aggregator exposed every input to it (reported, naming the aggregator).

    Returns:
        The verified aggregate (mod 2^bits), its contributors and the peers left out.

    Raises:
        TranscriptError: naming the aggregator, or the key holder for a decryption it signed
            that does not match the product.
    """
    agg = transcript.aggregator

    def fail(reason: str, offender: str = agg) -> TranscriptError:
        return TranscriptError(offender, reason)

    checks = _Checks(config, verifiers)
    if (transcript.session_id, transcript.round) != (config.session_id, config.round_number):
        raise fail(f"transcript is for session {transcript.session_id!r} round {transcript.round}")
    if me == config.key_holder and isinstance(transcript, PaillierTranscript):
        raise fail("sent the key holder every input: they are exposed to it")
    peers = config.round.peers
    try:
        n = checks.key(transcript.key, agg).n
        if isinstance(transcript, PaillierTranscript):
            inputs: dict[str, EncryptedInput] = {}
            for encrypted in transcript.inputs:
                if encrypted.sender in inputs:
                    raise fail(f"transcript lists two inputs of {encrypted.sender}")
                checks.encrypted_input(encrypted, n, agg)
                inputs[encrypted.sender] = encrypted
            if own is not None and inputs.get(own.sender, own) != own:
                raise fail("my own input was altered in the transcript")
            product = _product(
                (inputs[u].ciphertexts for u in peers if u in inputs),
                config.ciphertext_count,
                n * n,
            )
            if tuple(transcript.aggregate) != product:
                raise fail("the aggregate ciphertext is not the product of the published inputs")
            contributions = _contributions(inputs, config)
        else:
            contributions = tuple(transcript.contributions)
            listed = [u for u, _ in contributions]
            if listed != [u for u in peers if u in set(listed)] or len(set(listed)) != len(listed):
                raise fail("contributions are not distinct roster peers in roster order")
            if own is not None and own.sender in listed:
                if dict(contributions)[own.sender] != own.input_digest():
                    raise fail("my own input was altered")
            elif own is not None:
                raise fail("my own input is not in the sum")
            product = tuple(transcript.aggregate)
            problem = _ciphertext_problem(product, config, n)
            if problem is not None:
                raise fail(f"aggregate: {problem}")
        if len(contributions) < config.round.threshold:
            raise fail(f"only {len(contributions)} inputs, threshold is {config.round.threshold}")
        product_digest = aggregate_digest(product)
        checks.endorsements(transcript.endorsements, contributions, product_digest, agg)
    except TranscriptError:
        raise
    except RemoteProtocolError as error:
        raise fail(error.reason) from None

    decryption = transcript.decryption
    key_holder = config.key_holder
    if decryption.sender != key_holder or not verifiers[key_holder].verify(
        decryption.signature,
        decryption.signed_payload(config.digest, contributions, product_digest),
    ):
        raise fail("the decryption is not signed by the key holder over this product")
    # From here on the key holder signed what is checked: a mismatch is its fault.
    if not _proof_holds(
        config, n, product, product_digest, decryption.plaintexts, decryption.witness
    ):
        raise fail("the signed decryption does not match the aggregate (proof fails)", key_holder)
    try:
        aggregate = unpack(decryption.plaintexts, config)
    except ValueError as error:
        raise fail(f"the signed decryption does not decode: {error}", key_holder) from None
    contributors = {u for u, _ in contributions}
    return VerifiedAggregate(
        aggregate,
        tuple(u for u in peers if u in contributors),
        tuple(u for u in peers if u not in contributors),
    )
