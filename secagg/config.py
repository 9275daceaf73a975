"""The parameters of one round, shared by every role, and the stages of the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .crypto import canonical, sha256
from .errors import ConfigError
from .graph import GraphKind, NeighbourGraph, validate_threshold
from .prg import word_dtype

__all__ = ["RoundConfig", "Stage"]


class Stage(StrEnum):
    """The five stages of a round, named as on the command line (``--drop masked:3``)."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED = "masked"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


_MAX_ID = 128


@dataclass(frozen=True)
class RoundConfig:
    """Everything every party of a round must agree on.

    ``digest`` hashes all of it and is bound into every signature and every AEAD's
    associated data, so a message from another session, round or parameter set never
    verifies (replay protection).

    Args:
        session_id: the session this round belongs to.
        round: the round number within the session (0-based).
        peers: the roster of this round, in canonical order (share x-coordinate = position+1).
        threshold: t, shares needed to reconstruct; a strict majority of each neighbourhood.
        vector_length: m, the number of ring elements each peer contributes.
        bits: ring size (32 or 64).
        graph: COMPLETE (SecAgg) or SECAGG_PLUS with an even ``degree``.
        attempt: the retry of the round (0 first): bound into the digest, so a transcript
            of one attempt never verifies as another's.
        beacon: the session's randomness, fixed only after every peer accepted (see
            peer/beacon.py); it seeds the SecAgg+ graph, so no proposer can choose the graph
            by choosing the session id. Empty only outside sessions (simulations, tests).
    """

    session_id: str
    round: int
    peers: tuple[str, ...]
    threshold: int
    vector_length: int
    bits: int = 32
    graph_kind: GraphKind = GraphKind.COMPLETE
    degree: int | None = None
    attempt: int = 0
    beacon: bytes = b""
    graph: NeighbourGraph = field(init=False, repr=False, compare=False)
    digest: bytes = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.session_id or len(self.session_id) > _MAX_ID:
            raise ConfigError("session id must be 1 to 128 characters")
        if self.round < 0:
            raise ConfigError(f"round must be non-negative, not {self.round}")
        for peer in self.peers:
            if not peer or len(peer) > _MAX_ID:
                raise ConfigError(f"peer id {peer!r} must be 1 to 128 characters")
        if self.vector_length < 1:
            raise ConfigError(f"vector length must be positive, not {self.vector_length}")
        if self.attempt < 0:
            raise ConfigError(f"attempt must be non-negative, not {self.attempt}")
        word_dtype(self.bits)
        graph = NeighbourGraph.build(
            self.graph_kind, self.peers, self.degree, self.session_id, self.round, self.beacon
        )
        validate_threshold(self.threshold, graph.min_neighbourhood())
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "_index", {u: i + 1 for i, u in enumerate(self.peers)})
        object.__setattr__(
            self,
            "digest",
            sha256(
                canonical(
                    "secagg/round-config/v1",
                    self.session_id,
                    self.round,
                    self.peers,
                    self.threshold,
                    self.vector_length,
                    self.bits,
                    self.graph_kind.value,
                    self.degree if self.degree is not None else -1,
                    # Appended only when set, so digests (and the known-answer vectors) of
                    # configs without them are unchanged.
                    *((self.attempt, self.beacon) if self.attempt or self.beacon else ()),
                )
            ),
        )

    def index(self, peer: str) -> int:
        """The 1-based roster position of ``peer``: its Shamir x-coordinate."""
        return self._index[peer]

    def is_member(self, peer: str) -> bool:
        return peer in self._index

    def neighbourhood(self, peer: str) -> frozenset[str]:
        return self.graph.neighbourhood(peer)

    def mask_sign(self, u: str, v: str) -> int:
        """+1 if u adds PRG(s_uv) to its input, -1 if it subtracts it (the other side)."""
        return 1 if self._index[u] < self._index[v] else -1
