"""The round's agreement: each peer's record, the aggregator's tally, the agreed record.

After the transcript, every participant verifies it and builds the record it is willing to
sign (:func:`build_record`); the aggregator groups the signed votes by record hash
(:func:`tally`) and, when at least t peers signed the same record, sends it back with all
their signatures; each peer checks that it is the record it computed, with at least t valid
signatures (:func:`store_agreed`), and stores it.

A peer signs at most one record per round, unless it is shown that the record it signed can
never be agreed: then it releases that vote (:func:`release_evidence`, SECURITY.md "Releasing
a stuck vote"). Each hello carries the peer's signed vote statement
(:func:`sign_vote_statement`); the aggregator relays the statements in the record draft when
some peer announced a vote of an earlier attempt.
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
    VoteStatement,
    statement_problem,
    vote_statement_payload,
)
from ..ledger import release_quorum as ledger_release_quorum
from ..payloads import LocalContribution
from ..wire import peer_pb2 as pb
from .context import RoundContext

__all__ = [
    "InvalidVoteStatement",
    "MyRecord",
    "aggregate_hash",
    "build_record",
    "check_vote_statement",
    "current_votes",
    "keep_vote_proof",
    "mine_of",
    "prior_votes_agreed",
    "release_evidence",
    "release_quorum",
    "sign_vote_statement",
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


def vote(
    ctx: RoundContext, built: MyRecord, statements: Sequence[pb.VoteStatement] = ()
) -> tuple[MyRecord, pb.AgreedRecord]:
    """Sign the record this peer built, keeping the vote in the ledger before it is sent.

    A peer signs at most one record per round: if it already signed another one in an
    earlier attempt (whose aggregator vanished before everyone had the agreed record), it
    votes for that one again, with the signature it kept, and never signs this one. With
    ``2t > n + c`` no two records of a round can then both reach t signatures.

    Unless ``statements`` (the vote statements the aggregator relayed with the draft) prove
    that the earlier record can never reach t (:func:`release_evidence`): then this peer
    releases that vote and signs the record it built. A relayed statement that does not
    verify raises RemoteProtocolError naming the aggregator and the statement's peer.

    Returns:
        What this peer now stands for (the built record, or the one it kept) and the vote
        to send. Raises LedgerError when the vote cannot be kept (then nothing is sent).
    """
    record, model, record_hash, _ = built
    kept = ctx.ledger.signed_vote(ctx.session_id, ctx.round)
    if kept is not None and kept.record_hash != record_hash and statements:
        evidence = release_evidence(ctx, kept, statements)
        if evidence is not None:
            ctx.ledger.release_vote(
                ctx.session_id, ctx.round, kept.record_hash, attempt=ctx.attempt, evidence=evidence
            )
            logger.warning(
                "%s released its vote for record %s of attempt %d: %d peers state they did not "
                "sign it (%s), so it can never reach t=%d; signs %s",
                ctx.log_prefix,
                kept.record_hash.hex()[:16],
                kept.attempt,
                len(evidence),
                ",".join(s.peer_id for s in evidence),
                ctx.config.threshold,
                record_hash.hex()[:16],
            )
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


class InvalidVoteStatement(ValueError):
    """A vote statement that does not verify; the text names its peer and what is wrong."""


def release_quorum(ctx: RoundContext) -> int:
    """How many other peers' statements release a vote in this round: ``n - t + c + 1``
    (:func:`peer.ledger.release_quorum`)."""
    config = ctx.config
    return ledger_release_quorum(len(config.peers), config.threshold, config.colluders)


def sign_vote_statement(ctx: RoundContext) -> pb.VoteStatement:
    """This peer's signed vote statement as ``ctx.attempt`` starts, kept in the ledger before
    it is returned (from then on it signs no record of an earlier attempt)."""
    vote_hash = ctx.ledger.state_vote(ctx.session_id, ctx.round, ctx.attempt)
    payload = vote_statement_payload(ctx.session_id, ctx.round, ctx.attempt, ctx.me, vote_hash)
    return pb.VoteStatement(
        session_id=ctx.session_id,
        round=ctx.round,
        attempt=ctx.attempt,
        peer_id=ctx.me,
        vote_hash=vote_hash,
        signature=ctx.signer.sign(payload),
    )


def check_vote_statement(ctx: RoundContext, statement: pb.VoteStatement) -> VoteStatement:
    """The statement, if it is one of this session, round and attempt, by a roster peer,
    with that peer's valid signature.

    Raises:
        InvalidVoteStatement: naming the statement's peer and what is wrong (a replay from
            another session, round or attempt; a peer outside the roster; a forged signature).
    """
    checked = VoteStatement(
        statement.session_id,
        statement.round,
        statement.attempt,
        statement.peer_id,
        statement.vote_hash,
        statement.signature,
    )
    problem = statement_problem(
        checked,
        session_id=ctx.session_id,
        round_=ctx.round,
        attempt=ctx.attempt,
        participants=ctx.config.peers,
        verifiers=ctx.verifiers,
    )
    if problem is not None:
        raise InvalidVoteStatement(problem)
    return checked


def release_evidence(
    ctx: RoundContext, kept: SignedVote, statements: Sequence[pb.VoteStatement]
) -> list[VoteStatement] | None:
    """The statements that release this peer's ``kept`` vote of an earlier attempt, or None
    when they are too few (:func:`release_quorum`): then the vote stands.

    Only a record that names the attempt it was built in (``metrics["attempt"]``, set by
    :func:`build_record`) can be released: a peer that stated its vote for a later attempt
    signs no record of that attempt, and so never this one.

    Raises:
        RemoteProtocolError: naming the aggregator, for any relayed statement that does not
            verify or a peer stated twice (an honest aggregator relays only verified ones).
    """
    if kept.record.metrics.get("attempt") != kept.attempt or kept.attempt >= ctx.attempt:
        return None
    against: dict[str, VoteStatement] = {}
    for relayed in statements:
        try:
            statement = check_vote_statement(ctx, relayed)
        except InvalidVoteStatement as error:
            raise RemoteProtocolError(ctx.aggregator, f"relayed an invalid {error}") from None
        if statement.peer_id in against:
            raise RemoteProtocolError(
                ctx.aggregator, f"relayed two vote statements of {statement.peer_id}"
            )
        if statement.vote_hash != kept.record_hash and statement.peer_id != ctx.me:
            against[statement.peer_id] = statement
    needed = release_quorum(ctx)
    if len(against) < needed:
        logger.info(
            "%s keeps its vote for record %s: %d peers state they did not sign it, %d needed",
            ctx.log_prefix,
            kept.record_hash.hex()[:16],
            len(against),
            needed,
        )
        return None
    return [against[p] for p in sorted(against)]


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
    # The attempt makes records of different attempts differ, so a peer that stated its vote
    # as a later attempt started can never sign an earlier attempt's record (release_evidence).
    metrics["attempt"] = ctx.attempt
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


def keep_vote_proof(
    ctx: RoundContext, transcript: object, record_hash: bytes, log_prefix: str = ""
) -> None:
    """Keep the evidence of the record this peer just voted for, built from ``transcript``
    (peer/ledger/_proofs.py): a later attempt may complete that record from the kept votes
    without a transcript of its own. Other protocols' rounds keep nothing.

    A ledger that cannot take it is logged: the vote stands, and if the record is agreed in
    this attempt its evidence is written then (:func:`store_round_proof`).
    """
    if not isinstance(transcript, SuccinctTranscript):
        return
    _, raw = encode(transcript)
    try:
        ctx.ledger.keep_vote_proof(_proof(ctx, raw), record_hash)
    except LedgerError as error:
        logger.warning("%s cannot keep the evidence of its vote: %s", log_prefix, error)


def store_round_proof(
    ctx: RoundContext, transcript: object | None, record_hash: bytes, log_prefix: str = ""
) -> None:
    """Keep what the succinct check of the agreed round needs, for ``verify-ledger``
    (peer/ledger/_proofs.py): the evidence kept when this peer voted for the agreed record
    ``record_hash`` (possibly in an earlier attempt), else ``transcript`` (pass it only if
    the agreed record was built from it, in this attempt). Other protocols' rounds keep
    nothing more.

    The record is stored already: a ledger that cannot take the evidence too is logged (the
    round stays agreed; ``verify-ledger`` then warns it cannot re-check it).
    """
    try:
        if ctx.ledger.promote_vote_proof(ctx.session_id, ctx.round, record_hash):
            return
        if not isinstance(transcript, SuccinctTranscript):
            return
        _, raw = encode(transcript)
        ctx.ledger.store_round_proof(_proof(ctx, raw))
    except LedgerError as error:
        logger.warning("%s cannot store the round's evidence: %s", log_prefix, error)


def _proof(ctx: RoundContext, raw: bytes) -> StoredProof:
    return StoredProof(
        ctx.session_id,
        ctx.round,
        ctx.attempt,
        ctx.aggregator,
        json.dumps(ctx.config.as_dict(), sort_keys=True),
        raw,
    )
