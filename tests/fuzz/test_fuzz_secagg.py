"""Hypothesis fuzzing of the secagg state machines with mutated and random messages.

A Participant and an Aggregator are driven honestly into each stage once (a *template*); every
example forks the template and feeds it a mutated message: flipped, truncated or extended bytes
in keys, signatures, ciphertexts and shares; vectors of the wrong length or word size; foreign
session or round; duplicated, dropped or renamed entries; random peer ids; messages of another
stage or of another round. The objects must answer with a reply or a
:class:`~secagg.RemoteProtocolError` naming the sender (never another exception), and an honest
participant must never reveal both the self-mask share and the mask-key share of one peer.

The prove stage (issue 11) is fuzzed twice: with the unsigned statements of an aggregator off
the roster, and with a roster aggregator that signs whatever statement it makes (the malicious
aggregator a peer actually faces, so a valid signature proves nothing about the content).
Either way a participant answers only a statement of this round that shows its own masked
input's signed header unaltered and exactly the survivor set it signed, with answers over its
own masked input bound to that statement; any refusal names the aggregator.

Examples are derandomized, so CI runs the same cases every time.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from peer.codec import CodecError, decode, encode
from secagg import (
    Aggregator,
    AggregatorMessage,
    AggregatorState,
    DeterministicRandom,
    LinearAnswers,
    LocalProtocolError,
    Participant,
    ParticipantMessage,
    ParticipantState,
    ProofRequest,
    RemoteProtocolError,
    RoundAborted,
    SecAggError,
    Stage,
    UnmaskShares,
)
from secagg.succinct import expected_answers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "secagg"))
from secagg_testlib import AGGREGATOR, Round, make_round  # type: ignore[import-not-found, unused-ignore]

PEERS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
ME = "hospital-b"
# Peer ids a mutation may put anywhere: members, strangers, the aggregator, oddities.
NAMES = (*PEERS, AGGREGATOR, "mallory", "", "hospital-a ", "HOSPITAL-A", "hospital-é")

# Derandomized: the same examples on every run. deadline=None: a loaded CI box is slow.
FUZZ = settings(
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
PARTICIPANT_EXAMPLES = 350  # per stage and kind of mutation: 4 stages x 2 = 2,800
AGGREGATOR_EXAMPLES = 300  # per stage: 6 stages = 1,800


# ------------------------------------------------------------------ templates


@dataclass
class Template:
    """A round stopped at stage i (0..5), seen from both sides."""

    round: Round  # the live round (config, inputs, signers); its objects have moved on
    aggregator: Aggregator  # waits for the stage-i messages ...
    from_participants: dict[str, ParticipantMessage]  # ... which are these
    participants: dict[str, Participant]  # wait for the aggregator's reply to stage i ...
    to_participants: dict[str, AggregatorMessage]  # ... which is this ({} after the last)


def _honest_run(session: str, round_: int) -> list[Template]:
    r = make_round(len(PEERS), threshold=3, length=4, round_=round_, session=session, peers=PEERS)
    templates: list[Template] = []
    replies: dict[str, ParticipantMessage] = r.start()
    for index in range(len(Stage)):
        aggregator = _fork_aggregator(r.aggregator)
        outgoing = r.collect(replies)
        participants = {u: _fork_participant(p) for u, p in r.participants.items()}
        templates.append(Template(r, aggregator, dict(replies), participants, dict(outgoing)))
        if index < len(Stage) - 1:
            replies = r.respond(outgoing)
    return templates


def _fork_participant(p: Participant) -> Participant:
    # Handlers only ever rebind attributes (never mutate the dicts they hold), so a shallow
    # copy is an independent participant in the same state.
    return copy.copy(p)


def _fork_aggregator(a: Aggregator) -> Aggregator:
    fork = copy.copy(a)
    fork._received = dict(a._received)
    fork._excluded = set(a._excluded)
    fork.dropped = dict(a.dropped)
    return fork


@functools.cache
def templates() -> list[Template]:
    return _honest_run("fuzz-session", 7)


@functools.cache
def foreign() -> list[Template]:
    """The same peers in another round: the source of replayed messages."""
    return _honest_run("fuzz-session", 6)


@functools.cache
def all_messages() -> tuple[object, ...]:
    """Every honest message of both rounds, both directions: for wrong-kind deliveries."""
    out: list[object] = []
    for t in (*templates(), *foreign()):
        out += t.to_participants.values()
        out += t.from_participants.values()
    return tuple(out)


# ------------------------------------------------------------------ mutations


def _mutate_bytes(draw: st.DrawFn, value: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "truncate", "extend", "random", "empty"]))
    if how == "flip" and value:
        i = draw(st.integers(0, len(value) - 1))
        bit = 1 << draw(st.integers(0, 7))
        return value[:i] + bytes([value[i] ^ bit]) + value[i + 1 :]
    if how == "truncate" and value:
        return value[: draw(st.integers(0, len(value) - 1))]
    if how == "extend":
        return value + draw(st.binary(min_size=1, max_size=8))
    if how == "random":
        return draw(st.binary(max_size=80))
    return b""


def _mutate_names(draw: st.DrawFn, names: tuple[str, ...]) -> tuple[str, ...]:
    how = draw(st.sampled_from(["add", "remove", "duplicate", "replace", "random"]))
    items = list(names)
    if how == "add":
        items.insert(draw(st.integers(0, len(items))), draw(st.sampled_from(NAMES)))
    elif how == "remove" and items:
        del items[draw(st.integers(0, len(items) - 1))]
    elif how == "duplicate" and items:
        items.append(draw(st.sampled_from(items)))
    elif how == "replace" and items:
        items[draw(st.integers(0, len(items) - 1))] = draw(st.sampled_from(NAMES))
    else:
        items = draw(st.lists(st.sampled_from(NAMES), max_size=6))
    return tuple(items)


def _mutate_pairs(
    draw: st.DrawFn, pairs: tuple[tuple[str, bytes], ...]
) -> tuple[tuple[str, bytes], ...]:
    items = list(pairs)
    how = draw(st.sampled_from(["bytes", "name", "duplicate", "remove", "add", "swap"]))
    if not items or how == "add":
        items.append((draw(st.sampled_from(NAMES)), draw(st.binary(max_size=80))))
    elif how == "bytes":
        i = draw(st.integers(0, len(items) - 1))
        items[i] = (items[i][0], _mutate_bytes(draw, items[i][1]))
    elif how == "name":
        i = draw(st.integers(0, len(items) - 1))
        items[i] = (draw(st.sampled_from(NAMES)), items[i][1])
    elif how == "duplicate":
        items.append(draw(st.sampled_from(items)))
    elif how == "remove":
        del items[draw(st.integers(0, len(items) - 1))]
    elif len(items) > 1:  # swap two payloads: each right-sized, addressed to the wrong peer
        i, j = draw(st.permutations(range(len(items))))[:2]
        items[i], items[j] = (items[i][0], items[j][1]), (items[j][0], items[i][1])
    return tuple(items)


def _mutate_vector(draw: st.DrawFn, vector: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    how = draw(st.sampled_from(["short", "long", "dtype", "value", "2d", "empty"]))
    if how == "short":
        return vector[:-1]
    if how == "long":
        return np.concatenate([vector, vector[:1]])
    if how == "dtype":
        other = np.uint64 if vector.dtype == np.uint32 else np.uint32
        return vector.astype(other)
    if how == "value":
        out = vector.copy()
        out[draw(st.integers(0, len(out) - 1))] ^= 1
        return out
    if how == "2d":
        return vector.reshape(2, -1)
    return vector[:0]


def _mutate_elements(
    draw: st.DrawFn, items: tuple[Any, ...], replays: list[Any]
) -> tuple[Any, ...]:
    out = list(items)
    how = draw(st.sampled_from(["mutate", "duplicate", "remove", "replay"]))
    if how == "mutate" and out:
        i = draw(st.integers(0, len(out) - 1))
        out[i] = mutate(draw, out[i], replays)
    elif how == "duplicate" and out:
        out.append(draw(st.sampled_from(out)))
    elif how == "remove" and out:
        del out[draw(st.integers(0, len(out) - 1))]
    elif replays:  # an element of the same kind from the foreign round
        candidates = [r for r in replays if out and type(r) is type(out[0])]
        if candidates and out:
            out[draw(st.integers(0, len(out) - 1))] = draw(st.sampled_from(candidates))
    return tuple(out)


def mutate(draw: st.DrawFn, message: Any, replays: list[Any]) -> Any:
    """One field of ``message`` changed; raises ValueError if the result is not well formed.

    (A message that does not construct is one the codec refuses to build from the wire; the
    codec tests cover those bytes.)
    """
    fields = [f.name for f in dataclasses.fields(message)]
    name = draw(st.sampled_from(fields))
    value = getattr(message, name)
    new: Any
    if name == "round":
        new = draw(st.sampled_from([value + 1, value - 1, 0, 2**32 - 1]))
    elif name == "session_id":
        new = draw(st.sampled_from(["other-session", "", value + " ", value.upper()]))
    elif isinstance(value, bytes):
        new = _mutate_bytes(draw, value)
    elif isinstance(value, str):
        new = draw(st.sampled_from(NAMES))
    elif isinstance(value, np.ndarray):
        new = _mutate_vector(draw, value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A nested message (the statement of a ProofRequest): one of its fields changed,
        # with the same field of the replayed messages as the source of replays.
        nested = [getattr(m, name) for m in replays if hasattr(m, name)]
        new = mutate(draw, value, nested)
    elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        nested = [e for m in replays for e in getattr(m, name, ()) if dataclasses.is_dataclass(e)]
        new = _mutate_elements(draw, value, nested)
    elif isinstance(value, tuple) and value and isinstance(value[0], tuple):
        new = _mutate_pairs(draw, value)
    elif isinstance(value, tuple):
        as_names: bool = bool(value) or draw(st.booleans())
        new = _mutate_names(draw, value) if as_names else _mutate_pairs(draw, ())
    else:
        raise AssertionError(f"no mutation for {name}={value!r}")
    return dataclasses.replace(message, **{name: new})


@st.composite
def mutated(draw: st.DrawFn, honest: Any, replays: tuple[Any, ...]) -> Any:
    """``honest`` with 1-3 mutations, or a replayed or wrong-kind message."""
    how = draw(st.sampled_from(["mutate", "mutate", "mutate", "replay", "wrong-kind"]))
    if how == "replay":
        same = [m for m in replays if type(m) is type(honest)]
        if same:
            return draw(st.sampled_from(same))
    if how == "wrong-kind":
        return draw(st.sampled_from([m for m in all_messages() if type(m) is not type(honest)]))
    message = honest
    for _ in range(draw(st.integers(1, 3))):
        message = mutate(draw, message, list(replays))
    return message


def _draw_or_malformed(data: st.DataObject, strategy: st.SearchStrategy[Any]) -> Any:
    try:
        return data.draw(strategy)
    except ValueError:
        event("mutation gives a malformed message (the codec refuses it)")
        return None


# ------------------------------------------------------------------ participant


def _check_participant_reply(p: Participant, reply: ParticipantMessage, message: Any) -> None:
    assert reply.sender == ME
    if isinstance(reply, UnmaskShares):
        selfs = {u for u, _ in reply.self_mask_shares}
        keys = {u for u, _ in reply.mask_key_shares}
        assert not selfs & keys, f"revealed both shares of {selfs & keys}"
        assert not keys & set(p._u3), "revealed the mask key of a survivor"
    if isinstance(reply, LinearAnswers):
        _check_answers(p, reply, message)


def _check_answers(p: Participant, reply: LinearAnswers, message: ProofRequest) -> None:
    """An answered statement vouches for my unaltered input and the survivor set I signed;
    the answers are over my masked input (what the aggregator holds anyway) and nothing else,
    bound to that statement, and signed over my own input's digest."""
    statement, config, own = message.statement, p.config, p.masked_input
    assert own is not None
    assert (message.session_id, message.round) == (config.session_id, config.round)
    assert (statement.session_id, statement.round) == (config.session_id, config.round)
    assert statement.aggregator == p.aggregator
    assert tuple(sorted(statement.survivors)) == p.signed_survivors
    assert [h for h in statement.masked if h.sender == ME] == [own.header()]
    verifier = p._verifiers.get(p.aggregator)
    if verifier is not None:  # a roster aggregator: only ever a statement it signed
        assert verifier.verify(statement.signature, statement.signed_payload(config.digest))
    assert reply.statement_sha256 == statement.sha256(config.digest)
    assert reply.answers == expected_answers(config, statement, own.vector)
    assert p._verifiers[ME].verify(
        reply.signature, reply.signed_payload(config.digest, own.header().vector_sha256)
    )


def _feed_participant(stage: int, message: Any, template: Template | None = None) -> None:
    template = template or templates()[stage]
    participant = _fork_participant(template.participants[ME])
    refusal: RemoteProtocolError | None = None
    try:
        reply = participant.receive(message)
    except RemoteProtocolError as error:
        refusal = error
    if refusal is not None:
        assert refusal.offender in (*PEERS, AGGREGATOR), refusal
        if isinstance(message, ProofRequest):
            # Nobody but the aggregator makes a statement: it alone is to blame.
            assert refusal.offender == participant.aggregator, refusal
        assert participant.state is ParticipantState.FAILED
        event(f"refused: {type(refusal).__name__}")
        return
    event("accepted")
    _check_participant_reply(participant, reply, message)


# Expecting AdvertisedKeys, SharesToYou, SurvivorSet, UnmaskRequest, ProofRequest.
PARTICIPANT_STAGES = [0, 1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("stage", PARTICIPANT_STAGES)
@settings(FUZZ, max_examples=PARTICIPANT_EXAMPLES)
@given(data=st.data())
def test_participant_refuses_mutated_aggregator_messages(stage: int, data: st.DataObject) -> None:
    honest = templates()[stage].to_participants[ME]
    replays = tuple(foreign()[stage].to_participants.values())
    message = _draw_or_malformed(data, mutated(honest, replays))
    if message is not None:
        _feed_participant(stage, message)


@pytest.mark.slow
@pytest.mark.parametrize("stage", PARTICIPANT_STAGES)
@settings(FUZZ, max_examples=PARTICIPANT_EXAMPLES)
@given(data=st.data())
def test_participant_refuses_mutated_wire_bytes(stage: int, data: st.DataObject) -> None:
    # The real path: bytes from the aggregator -> codec -> state machine.
    kind, raw = encode(templates()[stage].to_participants[ME])
    raw = data.draw(wire_mutation(raw))
    try:
        message = decode(kind, raw)
    except CodecError:
        event("codec refused")
        return
    _feed_participant(stage, message)


@st.composite
def wire_mutation(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with 1-4 byte-level edits: flips, insertions, deletions, foreign fields."""
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        if how == "flip" and raw:
            raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1 :]
        elif how == "insert":
            raw = raw[:i] + draw(st.binary(min_size=1, max_size=6)) + raw[i:]
        elif how == "delete":
            raw = raw[:i] + raw[i + draw(st.integers(1, 6)) :]
        elif how == "truncate":
            raw = raw[:i]
        else:  # append a field from another message: duplicate or unknown tags
            raw = raw + draw(st.sampled_from([encode(m)[1] for m in all_messages()[:12]]))
    return raw


# ------------------------------------------------------------------ prove stage, signed

PROVE = 4  # the template whose participants wait for the ProofRequest
SIGNING_AGGREGATOR = "hospital-a"  # on the roster, as in a peer: its statements are signed


def _signed_run(session: str, round_: int) -> Template:
    """The round of :func:`_honest_run`, aggregated by a roster peer that signs statements."""
    r = make_round(len(PEERS), threshold=3, length=4, round_=round_, session=session, peers=PEERS)
    participants = {
        u: Participant(
            r.config,
            u,
            r.signers[u],
            r.verifiers,
            r.inputs[u],
            DeterministicRandom(f"signed/{session}/{round_}/{u}"),
            SIGNING_AGGREGATOR,
        )
        for u in PEERS
    }
    aggregator = Aggregator(
        r.config, r.verifiers, SIGNING_AGGREGATOR, r.signers[SIGNING_AGGREGATOR]
    )
    signed = Round(r.config, r.signers, r.verifiers, r.inputs, participants, aggregator)
    replies: dict[str, ParticipantMessage] = signed.start()
    for _ in range(PROVE):
        replies = signed.respond(signed.collect(replies))
    outgoing = signed.collect(replies)  # the ProofRequests
    return Template(signed, aggregator, dict(replies), dict(signed.participants), dict(outgoing))


@functools.cache
def signed_template() -> Template:
    """Participants of a roster-aggregated round, waiting for the ProofRequest."""
    return _signed_run("fuzz-session", 7)


@functools.cache
def signed_foreign() -> Template:
    return _signed_run("fuzz-session", 6)


@st.composite
def malicious_statement(draw: st.DrawFn) -> ProofRequest:
    """What a malicious roster aggregator sends: a mutated or replayed ProofRequest whose
    statement it signs itself (mostly; sometimes with the signature as mutated)."""
    honest = signed_template().to_participants[ME]
    assert isinstance(honest, ProofRequest)
    replays = tuple(signed_foreign().to_participants.values())
    how = draw(st.sampled_from(["mutate", "mutate", "mutate", "foreign-statement"]))
    if how == "foreign-statement":
        # Another round's signed statement, under this round's header: the aggregator
        # relabels it (or not) and re-signs it.
        other = draw(st.sampled_from(replays))
        assert isinstance(other, ProofRequest)
        statement = other.statement
        if draw(st.booleans()):
            statement = dataclasses.replace(
                statement, session_id=honest.session_id, round=honest.round
            )
        message = dataclasses.replace(honest, statement=statement)
    else:
        message = honest
        for _ in range(draw(st.integers(1, 3))):
            message = mutate(draw, message, list(replays))
    if draw(st.integers(0, 4)) > 0:
        signer = signed_template().round.signers[SIGNING_AGGREGATOR]
        statement = message.statement
        digest = signed_template().round.config.digest
        statement = dataclasses.replace(
            statement, signature=signer.sign(statement.signed_payload(digest))
        )
        message = dataclasses.replace(message, statement=statement)
    return message


@pytest.mark.slow
@settings(FUZZ, max_examples=PARTICIPANT_EXAMPLES)
@given(data=st.data())
def test_participant_answers_only_statements_over_its_own_input(data: st.DataObject) -> None:
    # The aggregator is malicious and signs whatever it likes: the participant's own checks
    # (its input unaltered, its survivor set, this round) are all that stands in the way.
    message = _draw_or_malformed(data, malicious_statement())
    if message is not None:
        _feed_participant(PROVE, message, signed_template())


def test_signed_prove_template_is_the_honest_round() -> None:
    template = signed_template()
    request = template.to_participants[ME]
    assert isinstance(request, ProofRequest)
    assert request.statement.signature  # a roster aggregator signs its statement
    reply = _fork_participant(template.participants[ME]).receive(request)
    assert isinstance(reply, LinearAnswers)
    _check_answers(template.participants[ME], reply, request)


@pytest.mark.parametrize(
    "change",
    ["my-header-altered", "my-header-missing", "survivor-missing", "survivor-twice", "unsigned"],
)
def test_participant_refuses_a_statement_without_its_input_or_survivor_set(change: str) -> None:
    # The fuzzer's properties, each pinned to one deterministic case.
    template = signed_template()
    request = template.to_participants[ME]
    assert isinstance(request, ProofRequest)
    statement = request.statement
    mine = next(h for h in statement.masked if h.sender == ME)
    others = [h for h in statement.masked if h.sender != ME]
    if change == "my-header-altered":
        altered = dataclasses.replace(mine, vector_sha256=bytes(32))
        statement = dataclasses.replace(statement, masked=(altered, *others))
    elif change == "my-header-missing":
        statement = dataclasses.replace(statement, masked=tuple(others))
    elif change == "survivor-missing":
        statement = dataclasses.replace(statement, masked=(mine, *others[1:]))
    elif change == "survivor-twice":
        statement = dataclasses.replace(statement, masked=(*statement.masked, others[0]))
    digest = template.round.config.digest
    signer = template.round.signers[SIGNING_AGGREGATOR]
    signature = b"" if change == "unsigned" else signer.sign(statement.signed_payload(digest))
    statement = dataclasses.replace(statement, signature=signature)
    participant = _fork_participant(template.participants[ME])
    with pytest.raises(RemoteProtocolError) as raised:
        participant.receive(dataclasses.replace(request, statement=statement))
    assert raised.value.offender == SIGNING_AGGREGATOR
    assert participant.state is ParticipantState.FAILED


@settings(FUZZ, max_examples=300)
@given(message=st.sampled_from(all_messages()) | st.none() | st.integers() | st.binary())
def test_participant_refuses_anything_in_the_wrong_state(message: Any) -> None:
    # Fed to a participant at a stage that expects another kind, or that already finished.
    for template in templates():
        participant = _fork_participant(template.participants[ME])
        expected = template.to_participants.get(ME)
        if expected is not None and type(message) is type(expected):
            continue
        with pytest.raises(RemoteProtocolError) as raised:
            participant.receive(message)
        assert raised.value.offender == AGGREGATOR


def test_honest_templates_are_the_honest_round() -> None:
    # The fuzzing starts from working rounds: replaying the honest messages completes them.
    for t in templates()[:-1]:
        reply = _fork_participant(t.participants[ME]).receive(t.to_participants[ME])
        assert reply.sender == ME
    last = templates()[-1]
    aggregator = _fork_aggregator(last.aggregator)
    for message in last.from_participants.values():
        aggregator.receive(message)
    aggregator.close_stage()
    assert aggregator.result is not None
    np.testing.assert_array_equal(aggregator.result.aggregate, last.round.expected_sum(PEERS))


# ------------------------------------------------------------------ aggregator

AGGREGATOR_STAGES = list(range(len(Stage)))


@st.composite
def aggregator_inbox(draw: st.DrawFn, stage: int) -> list[Any]:
    """A stage's messages: honest ones in some order, with mutated/replayed/duplicate ones."""
    template = templates()[stage]
    replays = tuple(foreign()[stage].from_participants.values())
    honest = list(template.from_participants.values())
    inbox: list[Any] = []
    for _ in range(draw(st.integers(1, 3))):
        base = draw(st.sampled_from(honest))
        try:
            inbox.append(draw(mutated(base, replays)))
        except ValueError:
            event("mutation gives a malformed message (the codec refuses it)")
    inbox += draw(st.permutations(honest))
    if draw(st.booleans()):
        inbox.append(draw(st.sampled_from(honest)))  # a duplicate sender
    return inbox


@pytest.mark.slow
@pytest.mark.parametrize("stage", AGGREGATOR_STAGES)
@settings(FUZZ, max_examples=AGGREGATOR_EXAMPLES)
@given(data=st.data())
def test_aggregator_refuses_mutated_participant_messages(stage: int, data: st.DataObject) -> None:
    template = templates()[stage]
    aggregator = _fork_aggregator(template.aggregator)
    inbox = data.draw(aggregator_inbox(stage))
    for message in inbox:
        if not hasattr(message, "sender"):
            # Aggregator-to-participant kinds have no sender; the peer's stream layer refuses
            # them before they reach the state machine (AggregatorRound.deliver).
            continue
        refusal: RemoteProtocolError | None = None
        try:
            aggregator.receive(message)
        except RemoteProtocolError as error:
            refusal = error
        if refusal is not None:
            assert refusal.offender == message.sender, refusal
            event("refused")
        else:
            # Whatever was accepted was authentic and for this stage.
            assert message.sender in PEERS
            assert (message.session_id, message.round) == (
                template.round.config.session_id,
                template.round.config.round,
            )
    outcome: SecAggError | None = None
    try:
        outgoing = aggregator.close_stage()
    except (RoundAborted, RemoteProtocolError) as error:
        outcome = error
    if isinstance(outcome, RoundAborted):
        assert aggregator.state is AggregatorState.ABORTED
        event("round aborted")
        return
    if isinstance(outcome, RemoteProtocolError):
        # Only reconstruction can fail this way: some accepted shares are inconsistent.
        assert stage == 4, outcome
        assert set(outcome.offender.split(",")) <= set(PEERS), outcome
        event("unmask refused")
        return
    if stage == 4:
        # Unmasked: the signed statement sent to the survivors states the right sum.
        statements = [m.statement for m in outgoing.values() if isinstance(m, ProofRequest)]
        assert statements
        assert len(statements) == len(outgoing)
        survivors = tuple(h.sender for h in statements[0].masked)
        np.testing.assert_array_equal(
            statements[0].aggregate, template.round.expected_sum(survivors)
        )
    elif stage == 5:
        assert aggregator.result is not None
        np.testing.assert_array_equal(
            aggregator.result.aggregate,
            template.round.expected_sum(aggregator.result.survivors),
        )
    else:
        assert set(outgoing) <= set(PEERS)


@settings(FUZZ, max_examples=200)
@given(message=st.sampled_from(all_messages()))
def test_aggregator_after_the_round_refuses_as_a_local_error(message: Any) -> None:
    last = templates()[-1]
    aggregator = _fork_aggregator(last.aggregator)
    for honest in last.from_participants.values():
        aggregator.receive(honest)
    aggregator.close_stage()
    if hasattr(message, "sender"):
        with pytest.raises(LocalProtocolError):
            aggregator.receive(message)
