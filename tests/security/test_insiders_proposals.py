"""Insiders at the peer layer: who may propose and start, what a session may sum, how much a
caller can make a peer work, and randomness no proposer can choose (the session beacon).

Each attack is made over real mTLS against real peer processes, with a legitimate
hospital's certificate and key (a consortium member turned adversary), and ends with the
honest peers refusing with a reason that names what was wrong, and their sessions intact.
The beacon's ungrindability is also shown without a network, on the functions the peers use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from peer.beacon import (
    BeaconError,
    beacon_of,
    check_reveals,
    commit,
    commitment_signed_bytes,
)
from peer.config import ConfigFileError, Policy, load_config
from peer.identity import load_signer
from peer.kit import write_peer_config
from peer.ratelimit import RateLimiter
from peer.session import SessionProposal, SignedProposal, aggregator_for, check_policy
from peer.session import _signed_bytes as _proposal_signed_bytes
from peer.tls import TLSFiles, peer_channel
from peer.wire import peer_pb2 as pb
from secagg import GraphKind, SystemRandom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_harness import (  # type: ignore[import-not-found, unused-ignore]
    Network,
    fixed_beacon,
)

pytestmark = pytest.mark.timeout(300)

SERVICE = "/hospital_secagg.v1.Peer/"
RUNNING = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
CALLER_ONLY = "hospital-e"  # a legitimate certificate, no peer process
# hospital-c is the one peer the sites let propose (allowed_peer_proposers); hospital-d
# did not opt in to exact payloads.
TRUSTED_PEER = "hospital-c"
NO_EXACT = "hospital-d"


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network.create(
        tmp_path_factory.mktemp("insiders"),
        5,
        length=16,
        start=False,
        policy={"allowed_peer_proposers": [TRUSTED_PEER]},
    )
    config = net.kit.kits[NO_EXACT].config
    text = config.read_text(encoding="utf-8")
    assert "allow_exact_payloads = true" in text
    config.write_text(
        text.replace("allow_exact_payloads = true", "allow_exact_payloads = false"),
        encoding="utf-8",
    )
    with ThreadPoolExecutor(len(RUNNING)) as pool:
        for future in [pool.submit(net.peers[p].start) for p in RUNNING]:
            future.result()
    yield net
    for peer in RUNNING:
        net.peers[peer].kill()


def _channel(network: Network, target: str, member: str) -> grpc.aio.Channel:
    m = network.kit.federation.members[member]
    return peer_channel(network.kit.federation.roster, target, TLSFiles.of(m.cert, m.key, m.ca))


def _proposal(session_id: str, participants: tuple[str, ...], **payload: Any) -> SessionProposal:
    return SessionProposal(
        session_id,
        participants,
        rounds=1,
        threshold=SessionProposal.default_threshold(len(participants)),
        payload={"kind": "vector", "length": 16, **payload},
        stage_seconds=4.0,
        prepare_seconds=4.0,
    )


def _signed(network: Network, proposal: SessionProposal, proposer: str) -> pb.SessionProposal:
    signer = load_signer(network.kit.federation.members[proposer].key)
    signed = SignedProposal.sign(proposal, proposer, signer)
    return pb.SessionProposal(
        document=proposal.document(), proposer=proposer, signature=signed.signature
    )


Answer = tuple[grpc.StatusCode, str, Any]


async def _call(
    network: Network, target: str, caller: str, method: str, request: Any, response: Any
) -> Answer:
    """(status, details, answer or None) of one RPC from ``caller`` to ``target``."""
    channel = _channel(network, target, caller)
    stub = channel.unary_unary(
        SERVICE + method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response.FromString,
    )
    try:
        answer = await stub(request, timeout=20)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", None
    finally:
        await channel.close(None)
    return grpc.StatusCode.OK, "", answer


def _propose(network: Network, target: str, caller: str, request: pb.SessionProposal) -> Answer:
    return asyncio.run(_call(network, target, caller, "Propose", request, pb.ProposalAnswer))


def _start(network: Network, target: str, caller: str, request: pb.StartRequest) -> Answer:
    return asyncio.run(_call(network, target, caller, "Start", request, pb.StartAnswer))


def _log(network: Network, peer: str) -> str:
    return str(network.peers[peer].log_path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ who may propose


def _two_party_document(session_id: str, participants: tuple[str, ...]) -> str:
    """A 2-party proposal written by hand, as an attacker would: our own SessionProposal
    refuses to build one (no threshold is safe for 2 peers against the aggregator's peer),
    so the document is the canonical JSON of a 3-party one with a participant removed."""
    third = next(p for p in ("hospital-b", "hospital-c", "hospital-d") if p not in participants)
    base = _proposal(session_id, (*participants, third))
    data = json.loads(base.document())
    data["participants"] = sorted(participants)
    data["threshold"] = 2
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _signed_document(network: Network, document: str, proposer: str) -> pb.SessionProposal:
    signer = load_signer(network.kit.federation.members[proposer].key)
    return pb.SessionProposal(
        document=document,
        proposer=proposer,
        signature=signer.sign(_proposal_signed_bytes(document, proposer)),
    )


def test_a_hospitals_two_party_proposal_is_refused(network: Network) -> None:
    """hospital-b wants hospital-a's exact input: a sum over {a, b} minus its own vector."""
    attack = _two_party_document("read-a", ("hospital-a", "hospital-b"))
    code, _, answer = _propose(
        network, "hospital-a", "hospital-b", _signed_document(network, attack, "hospital-b")
    )
    assert code is grpc.StatusCode.OK
    assert not answer.accepted
    # Refused twice over: a 2-party threshold is unsafe, and hospital-b may not propose.
    assert "too weak against 1 colluders" in answer.reason, answer.reason
    assert not answer.commitment
    # The authorization check alone (a valid 3-party proposal from a peer) is
    # test_a_three_party_proposal_from_a_peer_not_named_by_policy_is_refused.
    # Even a peer the sites trust to propose cannot make a 2-party session.
    trusted = _two_party_document("read-a-2", ("hospital-a", TRUSTED_PEER))
    code, _, answer = _propose(
        network, "hospital-a", TRUSTED_PEER, _signed_document(network, trusted, TRUSTED_PEER)
    )
    assert not answer.accepted
    assert "too weak against 1 colluders" in answer.reason, answer.reason
    # Nothing to start: the refused proposals are not sessions.
    for sid in ("read-a", "read-a-2"):
        code, details, _ = _start(
            network, "hospital-a", "hospital-b", pb.StartRequest(session_id=sid)
        )
        assert code is grpc.StatusCode.NOT_FOUND, details
    with network.ledger("hospital-a") as ledger:
        assert ledger.session("read-a") is None
        assert ledger.session("read-a-2") is None
        refused = ledger.refused_proposals()
    # The documents did not parse as safe proposals, so they are logged without an id.
    assert {r.proposer for r in refused} >= {"hospital-b", TRUSTED_PEER}
    assert "session=? proposal from hospital-b refused" in _log(network, "hospital-a")


def test_a_three_party_proposal_from_a_peer_not_named_by_policy_is_refused(
    network: Network,
) -> None:
    attack = _proposal("peer-3", ("hospital-a", "hospital-b", "hospital-c"))
    code, _, answer = _propose(
        network, "hospital-a", "hospital-b", _signed(network, attack, "hospital-b")
    )
    assert code is grpc.StatusCode.OK
    assert not answer.accepted
    assert "peer hospital-b is not allowed to propose" in answer.reason
    # The same from the peer the policy names is accepted (the rule is the policy's).
    allowed = _proposal("peer-3-ok", ("hospital-a", "hospital-b", "hospital-c"))
    code, _, answer = _propose(
        network, "hospital-a", TRUSTED_PEER, _signed(network, allowed, TRUSTED_PEER)
    )
    assert answer.accepted, answer.reason
    assert len(answer.commitment) == 32


def test_a_proposal_signed_as_someone_else_is_refused(network: Network) -> None:
    """hospital-b replays the operator's signed proposal as if it were the operator."""
    proposal = _proposal("as-operator", ("hospital-a", "hospital-b", "hospital-c"))
    code, details, _ = _propose(
        network, "hospital-a", "hospital-b", _signed(network, proposal, network.kit.operator)
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "hospital-b cannot submit a proposal signed as" in details


def test_exact_vector_payload_is_refused_without_opt_in(network: Network) -> None:
    proposal = _proposal("exact", ("hospital-a", "hospital-b", NO_EXACT))
    request = _signed(network, proposal, network.kit.operator)
    _, _, answer = _propose(network, NO_EXACT, network.kit.operator, request)
    assert not answer.accepted
    assert "releases an exact sum" in answer.reason
    assert "allow_exact_payloads" in answer.reason
    # hospital-a opted in (the harness's kits do): it accepts the same proposal.
    _, _, answer = _propose(network, "hospital-a", network.kit.operator, request)
    assert answer.accepted, answer.reason


# ------------------------------------------------------------------ who may start


def test_start_by_anyone_but_the_proposer_is_refused_and_the_session_still_runs(
    network: Network,
) -> None:
    proposal = _proposal("started", ("hospital-a", "hospital-b", "hospital-c"))
    operator = network.operator()

    async def propose() -> None:
        try:
            await operator.propose(proposal)
        finally:
            await operator.close()

    asyncio.run(propose())
    for request in (
        pb.StartRequest(session_id="started"),
        pb.StartRequest(
            session_id="started",
            reveals=[pb.BeaconReveal(peer_id="hospital-b", nonce=bytes(32))],
        ),
    ):
        code, details, _ = _start(network, "hospital-a", "hospital-b", request)
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert f"only {network.kit.operator}, who proposed session started" in details
        assert "not hospital-b" in details
    statuses = network.run_session(proposal, timeout=90)
    assert {s.state for s in statuses.values() if isinstance(s, pb.SessionStatus)} == {
        "finished"
    }, network.logs()
    assert [r.record.round for r in network.records("hospital-a", "started")] == [1]


# ------------------------------------------------------------------ bounded resources


def test_a_refused_proposal_does_not_squat_its_session_id(network: Network) -> None:
    squat = _proposal("quarterly", ("hospital-a", "hospital-b", "hospital-c"), note="squat")
    _, _, answer = _propose(
        network, "hospital-a", "hospital-b", _signed(network, squat, "hospital-b")
    )
    assert not answer.accepted
    real = _proposal("quarterly", ("hospital-a", "hospital-b", "hospital-c"))
    request = _signed(network, real, network.kit.operator)
    _, _, answer = _propose(network, "hospital-a", network.kit.operator, request)
    assert answer.accepted, answer.reason
    with network.ledger("hospital-a") as ledger:
        info = ledger.session("quarterly")
    assert info is not None
    assert info.proposer == network.kit.operator
    # The squatter cannot take the id back either, once it is a session.
    _, _, answer = _propose(
        network, "hospital-a", "hospital-b", _signed(network, squat, "hospital-b")
    )
    assert not answer.accepted


def test_an_oversized_proposal_is_refused_without_growing_the_ledger(network: Network) -> None:
    huge = _proposal("huge", ("hospital-a", "hospital-b", "hospital-c"), pad="x" * 3_500_000)
    request = _signed(network, huge, network.kit.operator)
    ledger_file = network.kit.kits["hospital-a"].directory / "ledger.db"
    with network.ledger("hospital-a") as ledger:
        sessions = len(ledger.sessions())
        refused = len(ledger.refused_proposals())
    size = ledger_file.stat().st_size
    for _ in range(3):
        code, details, _ = _propose(network, "hospital-a", network.kit.operator, request)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "exceeds this peer's limit of 262144 bytes" in details
    with network.ledger("hospital-a") as ledger:
        assert len(ledger.sessions()) == sessions
        assert len(ledger.refused_proposals()) == refused
    grown = ledger_file.stat().st_size - size
    assert grown < 64 * 1024  # (was ~4 MB per such proposal)
    print(f"ledger grew by {grown} bytes after 3 refused proposals of {len(huge.document())} bytes")
    assert "refused a proposal of" in _log(network, "hospital-a")


def test_a_proposal_flood_is_rate_limited_per_caller(network: Network) -> None:
    flood = [
        _signed(
            network,
            _proposal(f"flood-{i}", ("hospital-a", "hospital-b", "hospital-e")),
            CALLER_ONLY,
        )
        for i in range(30)
    ]

    async def run() -> list[Answer]:
        return [
            await _call(network, "hospital-b", CALLER_ONLY, "Propose", r, pb.ProposalAnswer)
            for r in flood
        ]

    answers = asyncio.run(run())
    limited = [d for c, d, _ in answers if c is grpc.StatusCode.RESOURCE_EXHAUSTED]
    served = [a for c, _, a in answers if c is grpc.StatusCode.OK]
    print(f"{len(served)} of {len(flood)} proposals served, {len(limited)} rate limited")
    assert len(served) <= Policy.proposal_burst + 1  # the burst (and a token refilled meanwhile)
    assert len(limited) >= 30 - Policy.proposal_burst - 1
    assert "hospital-e sent more than 10 proposals in a burst" in limited[0]
    assert "retry in" in limited[0]
    # The flood is one line in the peer's log, not one per call.
    assert _log(network, "hospital-b").count("proposals from hospital-e are rate limited") == 1
    # Another caller is not affected.
    proposal = _proposal("after-flood", ("hospital-a", "hospital-b", "hospital-c"))
    _, _, answer = _propose(
        network,
        "hospital-b",
        network.kit.operator,
        _signed(network, proposal, network.kit.operator),
    )
    assert answer.accepted, answer.reason


def test_rate_limiter_refills_with_its_clock() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=0.5, burst=2, clock=lambda: now[0])
    assert limiter.take("x") == 0.0
    assert limiter.take("x") == 0.0
    assert limiter.take("x") == pytest.approx(2.0)
    assert limiter.take("y") == 0.0  # per caller
    now[0] = 2.0
    assert limiter.take("x") == 0.0
    assert limiter.take("x") > 0


def test_policy_refuses_fewer_than_three_participants_in_config(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    write_peer_config(config, "hospital-a", "127.0.0.1:7443", policy={"min_participants": 2})
    for name in ("hospital-a.pem", "hospital-a.key", "ca.pem", "roster.json", "crl.pem"):
        (tmp_path / name).write_text("", encoding="utf-8")
    with pytest.raises(ConfigFileError, match="'min_participants' must be at least 3"):
        load_config(config)
    assert Policy().min_participants == 3
    assert not Policy().allow_exact_payloads
    assert Policy().allowed_peer_proposers == ()


# ------------------------------------------------------------------ the session beacon


def test_the_beacon_is_fixed_by_commit_reveal_and_refuses_every_shortcut(
    network: Network,
) -> None:
    """The proposer drives Start by hand: every deviation is refused, naming the peer."""
    peers = ("hospital-a", "hospital-b", "hospital-c")
    proposal = _proposal("beacon", peers)
    operator = network.kit.operator
    request = _signed(network, proposal, operator)
    commitments = {}
    for p in peers:
        _, _, answer = _propose(network, p, operator, request)
        assert answer.accepted, answer.reason
        commitments[p] = pb.BeaconCommitment(
            peer_id=p, commitment=answer.commitment, signature=answer.commitment_signature
        )
    sid = proposal.session_id

    def start(target: str, **fields: Any) -> Answer:
        return _start(network, target, operator, pb.StartRequest(session_id=sid, **fields))

    # Reveals before the commitments are fixed: refused.
    code, details, _ = start(
        "hospital-a", reveals=[pb.BeaconReveal(peer_id="hospital-a", nonce=bytes(32))]
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "before the commitments" in details
    # A missing participant, a forged signature, a replaced own commitment: refused.
    code, details, _ = start(
        "hospital-a", commitments=[commitments["hospital-a"], commitments["hospital-b"]]
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "no commitment from hospital-c" in details
    forged = pb.BeaconCommitment(
        peer_id="hospital-c", commitment=bytes(32), signature=commitments["hospital-c"].signature
    )
    code, details, _ = start(
        "hospital-a", commitments=[commitments["hospital-a"], commitments["hospital-b"], forged]
    )
    assert "commitment signature of hospital-c does not verify" in details
    mine = pb.BeaconCommitment(
        peer_id="hospital-c",
        commitment=commit(proposal.digest, "hospital-c", bytes(32)),
        signature=load_signer(network.kit.federation.members["hospital-c"].key).sign(
            commitment_signed_bytes(
                proposal.digest, "hospital-c", commit(proposal.digest, "hospital-c", bytes(32))
            )
        ),
    )
    code, details, _ = start(
        "hospital-c", commitments=[commitments["hospital-a"], commitments["hospital-b"], mine]
    )
    assert "the commitment given for hospital-c is not the one it made" in details
    # The honest set: every peer answers its nonce.
    honest = [commitments[p] for p in peers]
    nonces = {}
    for p in peers:
        code, details, answer = start(p, commitments=honest)
        assert code is grpc.StatusCode.OK, details
        nonces[p] = answer.nonce
        assert commit(proposal.digest, p, answer.nonce) == commitments[p].commitment
    # Commit last, after seeing the nonces: a second set of commitments is refused.
    code, details, _ = start(
        "hospital-a", commitments=[commitments["hospital-a"], commitments["hospital-b"], mine]
    )
    assert "the commitment given for hospital-c" in details or "already fixed" in details
    # A withheld nonce and a nonce that does not match its commitment: refused, named.
    reveals = [pb.BeaconReveal(peer_id=p, nonce=nonces[p]) for p in peers]
    code, details, _ = start("hospital-a", reveals=reveals[:2])
    assert "no nonce revealed for hospital-c" in details
    wrong = [*reveals[:2], pb.BeaconReveal(peer_id="hospital-c", nonce=bytes(32))]
    code, details, _ = start("hospital-a", reveals=wrong)
    assert "the nonce revealed for hospital-c does not match its commitment" in details
    assert network.records("hospital-a", sid) == []
    # All nonces: every peer fixes the same beacon, stores it, and runs.
    expected = beacon_of(proposal.digest, nonces)
    for p in peers:
        code, details, answer = start(p, reveals=reveals)
        assert code is grpc.StatusCode.OK, details
        assert answer.beacon == expected
        with network.ledger(p) as ledger:
            assert ledger.session_beacon(sid) == expected
    operator_client = network.operator()

    async def wait() -> None:
        try:
            await operator_client.wait(sid, peers, timeout=90, require_all=True)
        finally:
            await operator_client.close()

    asyncio.run(wait())
    records = network.records("hospital-a", sid)
    assert [r.record.round for r in records] == [1], network.logs()
    assert records[0].record.metrics["aggregator"] == aggregator_for(proposal, 1, 0, expected)


def _nonces(peers: tuple[str, ...]) -> dict[str, bytes]:
    rng = SystemRandom()
    return {p: rng.token_bytes(32) for p in peers}


def test_grinding_session_ids_does_not_steer_the_aggregator() -> None:
    """Before: aggregator and graph were hashes of the session id, which the proposer picks
    (~83,000 ids made a colluder aggregate round 1). Now, for the beacon the others' nonces
    fix, 10^4 session ids give one aggregator. (The SecAgg+ graph seed also binds the
    session id, but only beside the beacon, which is drawn after the proposal is fixed: the
    graph-grinding attack is tests/security/test_secagg_attacks.py.)"""
    peers = tuple(f"hospital-{i:02d}" for i in range(50))
    beacon = hashlib.sha256(b"fixed by the honest peers' nonces").digest()
    aggregators = set()
    for i in range(10_000):
        proposal = SessionProposal(
            f"grind-{i}",
            peers,
            rounds=1,
            threshold=6,
            payload={"kind": "vector", "length": 1},
            graph=GraphKind.SECAGG_PLUS.value,
            degree=8,
        )
        aggregators.add(aggregator_for(proposal, 1, 0, beacon))
    assert len(aggregators) == 1
    # ...while the beacon itself moves both (the test can fail).
    other = hashlib.sha256(b"another beacon").digest()
    moved = {aggregator_for(proposal, r, 0, other) for r in range(1, 40)}
    assert len(moved) > 1


def _pick(proposal: SessionProposal, known: dict[str, bytes], rng: SystemRandom) -> bytes:
    """hospital-z's best nonce (of 64 tries) to aggregate round 1, were ``known`` the
    others' nonces."""
    candidate = b""
    for _ in range(64):
        candidate = rng.token_bytes(32)
        beacon = beacon_of(proposal.digest, {**known, "hospital-z": candidate})
        if aggregator_for(proposal, 1, 0, beacon) == "hospital-z":
            break
    return candidate


def test_a_proposer_that_commits_last_cannot_choose_the_aggregator() -> None:
    """The colluding proposer "hospital-z" sees every honest commitment before choosing its
    own nonce, and tries 64 nonces per session to make itself aggregate round 1. Without the
    honest nonces it cannot evaluate its choice: it aggregates about 1 in n sessions, as an
    honest peer does. Had the honest peers revealed first (no commitments), it would win
    every time."""
    honest = ("hospital-a", "hospital-b", "hospital-c")
    peers = (*honest, "hospital-z")
    rng = SystemRandom()
    trials, wins, wins_if_revealed_first = 1000, 0, 0
    for trial in range(trials):
        proposal = _proposal(f"last-{trial}", peers)
        nonces = _nonces(honest)
        # Its best guess of the honest nonces (it has only their hashes): zeros.
        guess = {p: bytes(32) for p in honest}

        chosen = _pick(proposal, guess, rng)
        committed = {
            p: commit(proposal.digest, p, n) for p, n in {**nonces, "hospital-z": chosen}.items()
        }
        # Once committed, it can only reveal the nonce it chose (anything else is refused).
        with pytest.raises(BeaconError, match="hospital-z does not match"):
            check_reveals(proposal.digest, committed, {**nonces, "hospital-z": rng.token_bytes(32)})
        beacon = beacon_of(proposal.digest, {**nonces, "hospital-z": chosen})
        wins += aggregator_for(proposal, 1, 0, beacon) == "hospital-z"
        cheat = beacon_of(proposal.digest, {**nonces, "hospital-z": _pick(proposal, nonces, rng)})
        wins_if_revealed_first += aggregator_for(proposal, 1, 0, cheat) == "hospital-z"
    # Binomial(1000, 1/4): mean 250, sd 13.7; 320 is 5 sd away.
    assert wins < 320, wins
    assert wins_if_revealed_first > 990


def test_policy_check_is_deny_by_default() -> None:
    proposal = _proposal("p", ("hospital-a", "hospital-b", "hospital-c"))
    policy = Policy(allowed_operators=("op",))
    assert check_policy(proposal, "op", False, "hospital-a", policy) is not None  # exact
    allowed = Policy(allowed_operators=("op",), allow_exact_payloads=True)
    assert check_policy(proposal, "op", False, "hospital-a", allowed) is None
    assert "operator other" in str(check_policy(proposal, "other", False, "hospital-a", allowed))
    assert "peer hospital-b" in str(
        check_policy(proposal, "hospital-b", True, "hospital-a", allowed)
    )


def test_a_withheld_nonce_stops_the_start_and_names_the_peer(network: Network) -> None:
    """hospital-c accepts, then is gone when the beacon is fixed: the operator names it and
    no peer runs the session. Restarted (its nonce is in its ledger), the start completes."""
    from peer.operator import BeaconFailed

    peers = ("hospital-a", "hospital-b", "hospital-c")
    proposal = _proposal("withheld", peers)
    operator = network.operator()
    operator.timeout = 10.0

    async def propose() -> None:
        await operator.propose(proposal)

    async def start() -> bytes:
        return await operator.start(proposal.session_id, peers)

    async def close() -> None:
        await operator.close()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(propose())
        network.peers["hospital-c"].kill()
        with pytest.raises(BeaconFailed, match="hospital-c") as failed:
            loop.run_until_complete(start())
        assert set(failed.value.answers) == {"hospital-c"}
        for p in ("hospital-a", "hospital-b"):
            with network.ledger(p) as ledger:
                info = ledger.session("withheld")
                assert info is not None
                assert info.status.value == "accepted"  # not running
                assert ledger.session_beacon("withheld") is None
        network.peers["hospital-c"].start()
        # The operator comes back (as `ceremony run --attach` would) with fresh channels.
        loop.run_until_complete(close())
        operator = network.operator()
        beacon = loop.run_until_complete(start())
        loop.run_until_complete(
            operator.wait(proposal.session_id, peers, timeout=90, require_all=True)
        )
    finally:
        loop.run_until_complete(close())
        loop.close()
    assert beacon == fixed_beacon(proposal)  # the harness fixed every nonce
    records = network.records("hospital-a", "withheld")
    assert [r.record.round for r in records] == [1], network.logs()
