"""The round's agreement: each peer's record, the aggregator's tally, the agreed record.

After the transcript, every participant verifies it and builds the record it is willing to
sign (:func:`build_record`); the aggregator groups the signed votes by record hash
(:func:`tally`) and, when at least t peers signed the same record, sends it back with all
their signatures; each peer checks that it is the record it computed, with at least t valid
signatures (:func:`store_agreed`), and stores it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence

from secagg import RemoteProtocolError, SuccinctTranscript, Verifier
from secagg.crypto import sha256
from secagg.ring import WordArray

from ..codec import CodecError, encode, record_from_proto, record_to_proto
from ..ledger import (
    AgreedRecord,
    LedgerError,
    PrivacyCharge,
    SignedVote,
    StoredProof,
    StoredRecord,
    VoteConflictError,
)
from ..payloads import LocalContribution
from ..wire import peer_pb2 as pb
from .context import RoundContext

__all__ = [
    "MyRecord",
    "aggregate_hash",
    "build_record",
    "current_votes",
    "mine_of",
    "prior_votes_agreed",
    "store_agreed",
    "store_round_proof",
    "tally",
    "valid_signatures",
    "vote",
]

logger = logging.getLogger("peer.rounds")

# The record this peer is willing to sign, the round's model, the record's hash, survivors.
MyRecord = tuple[AgreedRecord, bytes, bytes, tuple[str, ...]]


def tally(
    votes: Mapping[str, pb.AgreedRecord],
    verifiers: Mapping[str, Verifier],
    threshold: int,
    warn: Callable[..., None],
) -> tuple[pb.AgreedRecord | None, str]:
    """The record at least ``threshold`` peers signed, with their signatures, and why not.

    ``votes`` maps each stream's peer to the record it sent; ``warn(message, *args)`` logs
    each vote that does not count and each dissent.
    """
    by_hash: dict[bytes, list[pb.AgreedRecord]] = {}
    for peer, vote in votes.items():
        # A vote counts only if it is this stream's peer signing, validly, the very
        # record it sent: one bad signature must not spoil the record for everyone.
        try:
            record, signatures = record_from_proto(vote)
        except CodecError as error:
            warn("participant=%s sent a malformed record: %s", peer, error)
            continue
        valid, _ = valid_signatures(record, signatures, verifiers)
        if list(valid) != [peer] or len(vote.signatures) != 1:
            warn("participant=%s sent a record without its own valid signature", peer)
            continue
        if vote.signatures[0].record_hash != record.record_hash():
            warn("participant=%s misstated the hash of its record", peer)
            continue
        by_hash.setdefault(record.record_hash(), []).append(vote)
    if not by_hash:
        return None, "no participant signed a record"
    best_hash, best = max(by_hash.items(), key=lambda item: len(item[1]))
    for record_hash, others in by_hash.items():
        if record_hash != best_hash:
            dissent = ",".join(v.signatures[0].peer_id for v in others)
            warn("peers %s signed a different record (%s)", dissent, record_hash.hex()[:16])
    if len(best) < threshold:
        return None, f"only {len(best)} peers signed the same record, {threshold} needed"
    agreed = pb.AgreedRecord()
    agreed.CopyFrom(best[0])
    del agreed.signatures[:]
    agreed.signatures.extend(
        v.signatures[0] for v in sorted(best, key=lambda v: v.signatures[0].peer_id)
    )
    return agreed, "agreed"


def current_votes(
    votes: Mapping[str, pb.AgreedRecord], ctx: RoundContext, warn: Callable[..., None]
) -> dict[str, pb.AgreedRecord]:
    """The votes of an earlier attempt (announced in hellos) that may count in this round:
    for this session and round, continuing this aggregator's chain head. An old vote
    replayed from another round must not complete this one."""
    head = ctx.ledger.session_head(ctx.session_id)
    current: dict[str, pb.AgreedRecord] = {}
    for peer, prior in votes.items():
        if prior.session_id != ctx.session_id or prior.round != ctx.round:
            warn("participant=%s announced a vote of another round", peer)
        elif prior.prev_hash != head:
            warn("participant=%s announced a vote that does not continue my chain", peer)
        else:
            current[peer] = prior
    return current


def prior_votes_agreed(
    votes: Mapping[str, pb.AgreedRecord], ctx: RoundContext, warn: Callable[..., None]
) -> pb.AgreedRecord | None:
    """The record that at least t peers signed in an earlier attempt of this round (as they
    say in their hellos), with those signatures; None if no record has that many."""
    current = current_votes(votes, ctx, warn)
    if not current:
        return None
    agreed, _ = tally(current, ctx.verifiers, ctx.config.threshold, warn)
    return agreed


def mine_of(kept: SignedVote) -> MyRecord:
    """What this peer computed for the record it kept a vote for (peer/ledger/_votes.py)."""
    survivors = kept.record.metrics.get("survivors", [])
    peers = tuple(str(p) for p in survivors) if isinstance(survivors, list) else ()
    return kept.record, kept.model, kept.record_hash, peers


def vote(ctx: RoundContext, built: MyRecord) -> tuple[MyRecord, pb.AgreedRecord]:
    """Sign the record this peer built, keeping the vote in the ledger before it is sent.

    A peer signs at most one record per round: if it already signed another one in an
    earlier attempt (whose aggregator vanished before everyone had the agreed record), it
    votes for that one again, with the signature it kept, and never signs this one. With
    ``2t > n + c`` no two records of a round can then both reach t signatures.

    Returns:
        What this peer now stands for (the built record, or the one it kept) and the vote
        to send. Raises LedgerError when the vote cannot be kept (then nothing is sent).
    """
    record, model, _, _ = built
    signature = ctx.signer.sign(record.payload())
    try:
        kept = ctx.ledger.record_vote(
            record, signature, attempt=ctx.attempt, aggregator=ctx.aggregator, model=model
        )
    except VoteConflictError:
        earlier = ctx.ledger.signed_vote(ctx.session_id, ctx.round)
        if earlier is None:  # the conflicting vote vanished: a broken ledger, refuse
            raise
        logger.warning(
            "%s already signed record %s of this round in attempt %d (aggregator %s): "
            "votes for it again and does not sign %s",
            ctx.log_prefix,
            earlier.record_hash.hex()[:16],
            earlier.attempt,
            earlier.aggregator,
            record.record_hash().hex()[:16],
        )
        return mine_of(earlier), record_to_proto(
            earlier.record, {ctx.me: earlier.signature}, ctx.aggregator
        )
    # The same record may have been kept before (same signature sent again).
    return built, record_to_proto(record, {ctx.me: kept.signature}, ctx.aggregator)


def aggregate_hash(aggregate: WordArray) -> bytes:
    """The hash of the released sum that the record carries (little-endian words)."""
    little = aggregate.astype(aggregate.dtype.newbyteorder("<"), copy=False)
    return sha256(b"hospital-secagg/aggregate/v1", little.tobytes())


def build_record(
    ctx: RoundContext,
    transcript: object,
    draft: pb.RecordDraft,
    sent: Sequence[object],
    contribution: LocalContribution,
) -> MyRecord:
    """Verify the transcript and build the record this peer is willing to sign.

    Returns the record, the round's model, the record's hash and the survivors.
    """
    aggregate, survivors = ctx.backend.verify(transcript, ctx, sent)
    head = ctx.ledger.session_head(ctx.session_id)
    if draft.prev_hash != head:
        raise RemoteProtocolError(
            ctx.aggregator,
            f"record draft continues chain {draft.prev_hash.hex()[:16]}, "
            f"mine is at {head.hex()[:16]}",
        )
    try:
        epsilon = {str(k): float(v) for k, v in json.loads(draft.epsilon_json).items()}
    except (ValueError, AttributeError) as error:
        raise RemoteProtocolError(ctx.aggregator, f"malformed epsilon claims: {error}") from None
    if ctx.me in survivors and abs(epsilon.get(ctx.me, -1.0) - contribution.epsilon) > 1e-12:
        raise RemoteProtocolError(ctx.aggregator, "record draft misstates my privacy spending")
    result = ctx.payload.conclude(ctx.round, aggregate, survivors)
    metrics = dict(result.metrics)
    metrics["survivors"] = list(survivors)
    metrics["aggregator"] = ctx.aggregator
    record = AgreedRecord.build(
        ctx.session_id,
        ctx.round,
        aggregate_hash=aggregate_hash(aggregate),
        model_hash=sha256(result.model),
        metrics=metrics,
        epsilon=epsilon,
        prev_hash=head,
    )
    return record, result.model, record.record_hash(), survivors


def store_agreed(
    ctx: RoundContext,
    agreed: pb.AgreedRecord,
    mine: MyRecord,
    contribution: LocalContribution,
) -> StoredRecord:
    """Check the agreed record is the one this peer computed, with >= t valid signatures."""
    record, model, record_hash, _ = mine
    claimed = {s.peer_id: s.signature for s in agreed.signatures if s.record_hash == record_hash}
    others = sorted(s.peer_id for s in agreed.signatures if s.record_hash != record_hash)
    if others:
        raise RemoteProtocolError(ctx.aggregator, f"{', '.join(others)} signed another record")
    signatures, invalid = valid_signatures(record, claimed, ctx.verifiers)
    if invalid:
        # Kept out of the ledger; enough valid ones still make the record.
        logger.warning(
            "%s aggregator=%s relayed invalid record signatures of %s",
            ctx.log_prefix,
            ctx.aggregator,
            ", ".join(invalid),
        )
    if len(signatures) < ctx.config.threshold:
        raise RemoteProtocolError(
            ctx.aggregator,
            f"agreed record has {len(signatures)} signatures, {ctx.config.threshold} needed",
        )
    # Only a peer whose input is in the released sum has spent privacy on this round.
    spent = record.epsilon.get(ctx.me, 0.0)
    privacy = (
        [PrivacyCharge(ctx.me, contribution.privacy_kind, spent, contribution.delta)]
        if spent > 0
        else []
    )
    return ctx.ledger.append_agreed(
        record,
        signatures,
        checkpoint=model,
        privacy=privacy,
        min_signatures=ctx.config.threshold,
        verifiers=ctx.verifiers,
    )


def valid_signatures(
    record: AgreedRecord, signatures: Mapping[str, bytes], verifiers: Mapping[str, Verifier]
) -> tuple[dict[str, bytes], list[str]]:
    """The signatures over ``record`` that verify under their peer's roster key, and the
    peers whose signature did not."""
    payload = record.payload()
    valid: dict[str, bytes] = {}
    invalid: list[str] = []
    for peer, signature in signatures.items():
        verifier = verifiers.get(peer)
        if verifier is not None and verifier.verify(signature, payload):
            valid[peer] = signature
        else:
            invalid.append(peer)
    return valid, sorted(invalid)


def store_round_proof(ctx: RoundContext, transcript: object, log_prefix: str = "") -> None:
    """Keep what the succinct check of an agreed secagg round needs, for ``verify-ledger``
    (peer/ledger/_proofs.py); other protocols' rounds keep nothing more.

    The record is stored already: a ledger that cannot take the evidence too is logged (the
    round stays agreed; ``verify-ledger`` then has no evidence of it to re-check).
    """
    if not isinstance(transcript, SuccinctTranscript):
        return
    _, raw = encode(transcript)
    try:
        _store_proof(ctx, raw)
    except LedgerError as error:
        logger.warning("%s cannot store the round's evidence: %s", log_prefix, error)


def _store_proof(ctx: RoundContext, raw: bytes) -> None:
    ctx.ledger.store_round_proof(
        StoredProof(
            ctx.session_id,
            ctx.round,
            ctx.attempt,
            ctx.aggregator,
            json.dumps(ctx.config.as_dict(), sort_keys=True),
            raw,
        )
    )
