"""The ``vector`` payload: numbers the operator prepared, summed as they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from secagg.ring import WordArray, word_dtype

from ..ledger import Ledger
from ..session import SessionProposal
from .base import LocalContribution, RoundResult

__all__ = ["VectorPayload"]


class VectorPayload:
    """Each peer contributes a fixed vector of ring words (from a .npy file or given).

    The agreed result is the aggregate itself. Used by tests, benchmarks and operators who
    want a secure sum of numbers they prepared themselves.
    """

    def __init__(self, length: int, bits: int = 32, vector: WordArray | None = None) -> None:
        self._length = length
        self._dtype = word_dtype(bits)
        if vector is None:
            vector = np.zeros(length, dtype=self._dtype)
        vector = np.asarray(vector)
        if vector.shape != (length,) or vector.dtype != self._dtype:
            raise ValueError(
                f"payload vector must be {self._dtype} of length {length}, "
                f"not {vector.dtype} of shape {vector.shape}"
            )
        self._vector = vector

    @classmethod
    def from_file(cls, path: Path, length: int, bits: int = 32) -> VectorPayload:
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read payload vector {path}: {error}") from None
        return cls(length, bits, vector)

    def vector_length(self, round_: int) -> int:
        return self._length

    def prepare(self, round_: int) -> LocalContribution:
        return LocalContribution(self._vector)

    def conclude(
        self, round_: int, aggregate: WordArray, survivors: tuple[str, ...]
    ) -> RoundResult:
        little = aggregate.astype(aggregate.dtype.newbyteorder("<"), copy=False)
        return RoundResult(model=little.tobytes(), metrics={"summed": len(survivors)})

    def epsilon_needed(self) -> float:
        return 0.0  # the operator's numbers, released as they are: no privacy accounting

    def finish(self, ledger: Ledger, proposal: SessionProposal) -> None:
        return None
