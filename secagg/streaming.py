"""The aggregator's running sum of masked inputs, in O(m) memory whatever the number of peers.

Theory of operation
-------------------
An aggregator that kept every masked input until unmasking would hold n vectors: 2 GB at
n = 50, m = 10^7. :class:`MaskedSum` holds one: each sender's words are added into the running
sum as they arrive (in pieces of any size, e.g. transport fragments), hashed on the way for the
signature check, and written to a *spool* so that a later stage can read one input back
without keeping it in memory: to take a sender out of the sum again (its signature failed,
or the survivor set left it out), to publish it, or to evaluate a linear functional of it.

    stream = masked_sum.stream(u)
    for piece in pieces: stream.feed(piece)    # raises RemoteProtocolError naming u
    digest = stream.digest()                   # check the signature over it, then:
    stream.commit()        # or stream.abort(): u's words leave the sum and the spool

The spool is injected (:class:`VectorSpool`): :class:`MemorySpool` here keeps the bytes in
memory (this package does no I/O; the in-memory simulator uses it), and the peer passes a
spool of private temporary files (peer/spool.py), removed when the round ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from .errors import LocalProtocolError, RemoteProtocolError
from .messages import vector_hasher
from .ring import WordArray, word_dtype

__all__ = ["MaskedSum", "MemorySpool", "SpoolWriter", "VectorSpool", "VectorStream"]

READ_CHUNK_WORDS = 1 << 18
"""Words read back from a spool at a time (1 MiB of uint32)."""


class SpoolWriter(Protocol):
    def write(self, data: memoryview, /) -> None: ...


class VectorSpool(Protocol):
    """Where a round's masked inputs wait, one byte string per sender, until the round ends."""

    def create(self, sender: str) -> SpoolWriter:
        """A fresh, empty entry for ``sender`` (replacing any earlier one)."""
        ...

    def read(self, sender: str, chunk_bytes: int) -> Iterator[bytes]:
        """The bytes written for ``sender``, in order, in pieces of at most ``chunk_bytes``."""
        ...

    def discard(self, sender: str) -> None:
        """Forget ``sender``'s entry (no error if there is none)."""
        ...

    def close(self) -> None:
        """Forget every entry; the spool is not used again."""
        ...


class _MemoryEntry:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: memoryview, /) -> None:
        self.data += data


class MemorySpool:
    """A :class:`VectorSpool` in memory (n vectors held: for simulations and tests)."""

    def __init__(self) -> None:
        self._entries: dict[str, _MemoryEntry] = {}

    def create(self, sender: str) -> SpoolWriter:
        entry = self._entries[sender] = _MemoryEntry()
        return entry

    def read(self, sender: str, chunk_bytes: int) -> Iterator[bytes]:
        data = self._entries[sender].data
        for start in range(0, len(data), chunk_bytes):
            yield bytes(data[start : start + chunk_bytes])

    def discard(self, sender: str) -> None:
        self._entries.pop(sender, None)

    def close(self) -> None:
        self._entries.clear()


class VectorStream:
    """One sender's masked input on its way into a :class:`MaskedSum` (see the module doc)."""

    def __init__(self, owner: MaskedSum, sender: str, writer: SpoolWriter) -> None:
        self._owner, self.sender, self._writer = owner, sender, writer
        self._hasher = vector_hasher()
        self._words = 0  # words added into the sum so far
        self._carry = b""  # bytes of a word split across two pieces
        self._open = True

    def feed(self, piece: bytes | memoryview) -> None:
        """Add the next bytes (little-endian words) of the vector.

        Raises:
            RemoteProtocolError: more words than the round's vector length (naming the sender).
        """
        self._require_open()
        itemsize = self._owner.dtype.itemsize
        data = memoryview(piece).cast("B")
        if self._carry:
            take = min(itemsize - len(self._carry), len(data))
            self._carry += bytes(data[:take])
            data = data[take:]
            if len(self._carry) == itemsize:
                self._add(memoryview(self._carry))
                self._carry = b""
        whole = len(data) - len(data) % itemsize
        if whole:
            self._add(data[:whole])
        if whole < len(data):
            self._carry = bytes(data[whole:])

    def _add(self, raw: memoryview) -> None:
        owner = self._owner
        count = len(raw) // owner.dtype.itemsize
        if self._words + count > owner.length:
            self._open = False
            owner._drop(self.sender, self._words)
            raise RemoteProtocolError(
                self.sender, f"masked vector longer than the round's {owner.length} words"
            )
        self._hasher.update(raw)
        self._writer.write(raw)
        words = np.frombuffer(raw, dtype=owner.dtype.newbyteorder("<"))
        target = owner.total[self._words : self._words + count]
        np.add(target, words, out=target)
        self._words += count

    def digest(self) -> bytes:
        """The vector's digest (:func:`secagg.messages.vector_digest`), once it is complete.

        Raises:
            RemoteProtocolError: the vector is shorter than the round's length (naming the
                sender); its words have left the sum again.
        """
        self._require_open()
        if self._carry or self._words != self._owner.length:
            self.abort()
            raise RemoteProtocolError(
                self.sender,
                f"masked vector of {self._words} words and {len(self._carry)} bytes, "
                f"expected {self._owner.length} words",
            )
        return self._hasher.copy().digest()

    def commit(self) -> None:
        """Keep the vector in the sum: its signature was checked against :meth:`digest`."""
        self.digest()
        self._open = False
        self._owner._committed(self.sender)

    def abort(self) -> None:
        """Take what was added back out of the sum and forget the vector."""
        if self._open:
            self._open = False
            self._owner._drop(self.sender, self._words)

    def _require_open(self) -> None:
        if not self._open:
            raise LocalProtocolError(f"the masked input of {self.sender} is already closed")


class MaskedSum:
    """The running sum of the masked inputs received so far, and a spool to read them back."""

    def __init__(self, length: int, bits: int, spool: VectorSpool | None = None) -> None:
        self.length = length
        self.dtype = word_dtype(bits)
        self.total: WordArray = np.zeros(length, dtype=self.dtype)
        self._spool: VectorSpool = spool if spool is not None else MemorySpool()
        self._streaming: set[str] = set()
        self._in_sum: set[str] = set()

    @property
    def senders(self) -> frozenset[str]:
        """Whose committed vectors the running sum holds."""
        return frozenset(self._in_sum)

    def stream(self, sender: str) -> VectorStream:
        """Begin ``sender``'s vector. A sender has at most one, ever, per round.

        Raises:
            RemoteProtocolError: ``sender`` already sent one (naming it).
        """
        if sender in self._streaming or sender in self._in_sum:
            raise RemoteProtocolError(sender, "sent a second masked vector")
        self._streaming.add(sender)
        return VectorStream(self, sender, self._spool.create(sender))

    def chunks(self, sender: str, chunk_words: int = READ_CHUNK_WORDS) -> Iterator[WordArray]:
        """``sender``'s committed vector read back from the spool, piece by piece, in order
        (to evaluate a linear functional of it without holding it)."""
        if sender not in self._in_sum:
            raise LocalProtocolError(f"no masked input of {sender} in the sum")
        yield from self._read(sender, chunk_words)

    def vector(self, sender: str) -> WordArray:
        """``sender``'s committed vector, whole (O(m) memory: one at a time)."""
        out = np.empty(self.length, dtype=self.dtype)
        at = 0
        for piece in self.chunks(sender):
            out[at : at + len(piece)] = piece
            at += len(piece)
        return out

    def remove(self, sender: str) -> None:
        """Take ``sender``'s committed vector out of the sum (it is no survivor after all)."""
        if sender not in self._in_sum:
            raise LocalProtocolError(f"no masked input of {sender} in the sum")
        self._in_sum.discard(sender)
        self._subtract(sender, self.length)

    def close(self) -> None:
        """Forget every spooled vector (the round is over)."""
        self._spool.close()

    # ---------------------------------------------------------------- for VectorStream

    def _committed(self, sender: str) -> None:
        self._streaming.discard(sender)
        self._in_sum.add(sender)

    def _drop(self, sender: str, words: int) -> None:
        # The sender stays in _streaming: a second try within the round is still refused.
        self._subtract(sender, words)

    def _subtract(self, sender: str, words: int) -> None:
        at = 0
        for piece in self._read(sender, READ_CHUNK_WORDS):
            n = min(len(piece), words - at)
            if n <= 0:
                break
            target = self.total[at : at + n]
            np.subtract(target, piece[:n], out=target)
            at += n
        self._spool.discard(sender)

    def _read(self, sender: str, chunk_words: int) -> Iterator[WordArray]:
        little = self.dtype.newbyteorder("<")
        for raw in self._spool.read(sender, chunk_words * self.dtype.itemsize):
            yield np.frombuffer(raw, dtype=little).astype(self.dtype, copy=False)
