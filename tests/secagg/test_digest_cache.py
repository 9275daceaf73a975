"""The cached digests of a masked input's vector and a statement's aggregate (issue 11, lane
11w): each 4 MB vector is hashed once per object, and the cache can never vouch for words
other than the ones the object holds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from secagg_testlib import AGGREGATOR
from test_secagg_succinct import A, B, resign, run_to_proof, signed_round

from secagg import InvalidSignatureError, MaskedInput, ProofRequest, Stage
from secagg.messages import vector_digest


def honest_masked_input(n: int = 5) -> tuple[object, MaskedInput]:
    s = signed_round(n, length=40)
    outgoing = s.r.advance(list(Stage).index(Stage.MASKED))
    masked = s.r.participants[B].receive(outgoing[B])
    assert isinstance(masked, MaskedInput)
    return s, masked


def test_participant_digest_is_that_of_the_vector_and_the_vector_is_frozen() -> None:
    _, masked = honest_masked_input()
    # The digest the participant carried over from its masking pass is y's own.
    assert masked.vector_sha256 == vector_digest(masked.vector)
    assert masked.header().vector_sha256 == vector_digest(masked.vector)
    # Altering y in place after the digest was taken is impossible, not silently stale.
    with pytest.raises(ValueError, match="read-only"):
        masked.vector[0] += 1
    assert masked.vector_sha256 == vector_digest(masked.vector)


def test_a_copy_with_an_altered_vector_is_hashed_afresh_and_refused() -> None:
    """An attacker (or a bug) that swaps the words of a signed input under its old signature:
    the copy does not inherit the cached digest, so its signature fails at the aggregator,
    which names the sender."""
    s, masked = honest_masked_input()
    altered = masked.vector.copy()
    altered[0] += 1
    forged = replace(masked, vector=altered)
    assert forged.vector_sha256 == vector_digest(altered) != masked.vector_sha256
    aggregator = s.r.aggregator  # type: ignore[attr-defined]
    with pytest.raises(InvalidSignatureError) as caught:
        aggregator.receive(forged)
    assert caught.value.offender == B


def test_a_known_digest_must_be_a_digest() -> None:
    vector = np.zeros(4, dtype=np.uint32)
    with pytest.raises(ValueError, match="32 bytes"):
        MaskedInput(B, "s", 0, (), vector, b"", known_sha256=b"short")


def test_statement_aggregate_is_frozen_and_an_altered_copy_is_refused() -> None:
    s = signed_round(5, length=30)
    statement = run_to_proof(s)[A].statement
    digest = s.r.config.digest
    before = statement.sha256(digest)
    with pytest.raises(ValueError, match="read-only"):
        statement.aggregate[0] += 1
    assert statement.aggregate_sha256 == vector_digest(statement.aggregate)
    # A wrong aggregate under the honest signature: the copy hashes its own aggregate, so
    # its digest differs and the signature does not verify; the survivor refuses to answer.
    wrong = statement.aggregate.copy()
    wrong[0] += 1
    forged = replace(statement, aggregate=wrong)
    assert forged.sha256(digest) != before
    with pytest.raises(InvalidSignatureError) as caught:
        s.r.participants[A].receive(ProofRequest(s.r.config.session_id, 0, forged))
    assert caught.value.offender == AGGREGATOR


def test_statement_resigned_over_an_altered_aggregate_is_answered_over_that_aggregate() -> None:
    """The challenge follows the aggregate actually held (not a cached one): a re-signed
    statement with another z gets another statement digest in the answers."""
    s = signed_round(5, length=30)
    statement = run_to_proof(s)[A].statement
    wrong = statement.aggregate.copy()
    wrong[0] += 1
    forged = resign(s, replace(statement, aggregate=wrong))
    reply = s.r.participants[A].receive(ProofRequest(s.r.config.session_id, 0, forged))
    digest = s.r.config.digest
    assert reply.statement_sha256 == forged.sha256(digest) != statement.sha256(digest)  # type: ignore[union-attr]
