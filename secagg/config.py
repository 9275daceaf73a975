"""The parameters of one round, shared by every role, and the stages of the protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .crypto import canonical, sha256
from .errors import ConfigError
from .graph import GraphKind, NeighbourGraph, consistency_quorum, parameter_problem
from .ring import word_dtype

__all__ = ["RoundConfig", "Stage"]


class Stage(StrEnum):
    """The six stages of a round, named as on the command line (``--drop masked:3``).

    PROVE is the survivors' answers to the linear check of the aggregate
    (:mod:`secagg.succinct`); a survivor that misses it is verified from its vector instead.
    """

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED = "masked"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    PROVE = "prove"


_MAX_ID = 128


@dataclass(frozen=True)
class RoundConfig:
    """Everything every party of a round must agree on.

    ``digest`` hashes all of it and is bound into every signature and every AEAD's
    associated data, so a message from another session, round, attempt or parameter set
    never verifies (replay protection).

    Args:
        session_id: the session this round belongs to.
        round: the round number within the session (0-based).
        peers: the roster of this round, in canonical order (share x-coordinate = position+1).
        threshold: t, shares needed to reconstruct; see :func:`secagg.graph.parameter_problem`.
        vector_length: m, the number of ring elements each peer contributes.
        bits: ring size (32 or 64).
        graph: COMPLETE (SecAgg) or SECAGG_PLUS with an even ``degree``.
        colluders: c, how many roster members may collude with the aggregator (counting the
            aggregator's own peer when it is on the roster). Sets the consistency quorum
            (:attr:`quorum`) and the lowest safe threshold.
        attempt: the retry number of this round (each attempt is a fresh protocol run).
        beacon: 32 bytes of public randomness fixed only after every peer accepted the
            session; seeds the SecAgg+ graph so that nobody can choose it. Empty means no
            beacon: the graph then follows from (session, round, attempt) alone, which the
            proposer can grind; only simulations and tests may do that (the peer always
            passes one for SecAgg+, see SECURITY.md).
    """

    session_id: str
    round: int
    peers: tuple[str, ...]
    threshold: int
    vector_length: int
    bits: int = 32
    graph_kind: GraphKind = GraphKind.COMPLETE
    degree: int | None = None
    colluders: int = 0
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
            self.graph_kind,
            self.peers,
            self.degree,
            self.session_id,
            self.round,
            attempt=self.attempt,
            beacon=self.beacon,
        )
        problem = parameter_problem(
            len(self.peers), self.graph_kind, self.degree, self.threshold, self.colluders
        )
        if problem is not None:
            raise ConfigError(problem)
        object.__setattr__(self, "graph", graph)
        object.__setattr__(self, "_index", {u: i + 1 for i, u in enumerate(self.peers)})
        object.__setattr__(
            self,
            "digest",
            sha256(
                canonical(
                    "secagg/round-config/v2",
                    self.session_id,
                    self.round,
                    self.attempt,
                    self.beacon,
                    self.colluders,
                    self.peers,
                    self.threshold,
                    self.vector_length,
                    self.bits,
                    self.graph_kind.value,
                    self.degree if self.degree is not None else -1,
                )
            ),
        )

    def as_dict(self) -> dict[str, object]:
        """Every parameter, JSON-ready (the beacon in hex): what a stored round needs to be
        re-checked later (:meth:`from_dict` is the inverse)."""
        return {
            "session_id": self.session_id,
            "round": self.round,
            "peers": list(self.peers),
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "bits": self.bits,
            "graph_kind": self.graph_kind.value,
            "degree": self.degree,
            "colluders": self.colluders,
            "attempt": self.attempt,
            "beacon": self.beacon.hex(),
        }

    @classmethod
    def from_dict(cls, fields: dict[str, object]) -> RoundConfig:
        """The config of :meth:`as_dict`. Raises ConfigError (or TypeError, KeyError and
        ValueError for a malformed mapping)."""
        degree = fields["degree"]
        return cls(
            str(fields["session_id"]),
            int(str(fields["round"])),
            tuple(str(p) for p in fields["peers"]),  # type: ignore[attr-defined]
            int(str(fields["threshold"])),
            int(str(fields["vector_length"])),
            int(str(fields["bits"])),
            GraphKind(str(fields["graph_kind"])),
            None if degree is None else int(str(degree)),
            colluders=int(str(fields["colluders"])),
            attempt=int(str(fields["attempt"])),
            beacon=bytes.fromhex(str(fields["beacon"])),
        )

    @property
    def quorum(self) -> int:
        """Consistency signatures over one survivor set needed before anyone unmasks."""
        return consistency_quorum(len(self.peers), self.colluders)

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
