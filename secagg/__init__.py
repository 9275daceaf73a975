"""Secure aggregation core: Bonawitz et al. SecAgg and SecAgg+ as sans-I/O state machines.

No sockets, threads or clocks in here: a :class:`Participant` and an :class:`Aggregator`
take messages and return messages; the gRPC peer and the in-memory simulator drive them,
typed by :class:`AggregatorRole` and :class:`ParticipantRole` (every protocol's roles, SecAgg,
Paillier and cleartext, fit them).
"""

from ._roles import AggregatorRole, ParticipantRole, RoundResult
from .aggregator import AggregateResult, Aggregator, AggregatorState
from .config import RoundConfig, Stage
from .crypto import (
    DeterministicRandom,
    KeyPair,
    RandomSource,
    Signer,
    SystemRandom,
    Verifier,
    signer_from_private_key,
    verifier_from_public_key,
)
from .errors import (
    ConfigError,
    InvalidSignatureError,
    LocalProtocolError,
    RemoteProtocolError,
    RoundAborted,
    SecAggError,
)
from .graph import GraphKind, NeighbourGraph, parameter_problem, recommend_parameters
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
)
from .participant import Participant, ParticipantState
from .quantize import QuantizedVector, Quantizer
from .succinct import ProofAnswers, SuccinctTranscript, verify_succinct
from .transcript import Transcript, TranscriptError, VerifiedAggregate, verify_transcript

__all__ = [
    "AdvertiseKeys",
    "AdvertisedKeys",
    "AggregateResult",
    "Aggregator",
    "AggregatorMessage",
    "AggregatorRole",
    "AggregatorState",
    "ConfigError",
    "ConsistencySignature",
    "DeterministicRandom",
    "GraphKind",
    "InvalidSignatureError",
    "KeyPair",
    "LinearAnswers",
    "LocalProtocolError",
    "MaskedHeader",
    "MaskedInput",
    "NeighbourGraph",
    "Participant",
    "ParticipantMessage",
    "ParticipantRole",
    "ParticipantState",
    "ProofAnswers",
    "ProofRequest",
    "QuantizedVector",
    "Quantizer",
    "RandomSource",
    "RemoteProtocolError",
    "RoundAborted",
    "RoundConfig",
    "RoundResult",
    "SecAggError",
    "ShareKeys",
    "SharesToYou",
    "Signer",
    "Stage",
    "Statement",
    "SuccinctTranscript",
    "SurvivorSet",
    "SystemRandom",
    "Transcript",
    "TranscriptError",
    "UnmaskRequest",
    "UnmaskShares",
    "VerifiedAggregate",
    "Verifier",
    "parameter_problem",
    "recommend_parameters",
    "signer_from_private_key",
    "verifier_from_public_key",
    "verify_succinct",
    "verify_transcript",
]
