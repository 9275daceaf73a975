"""Compact wire forms of the round's small signed items (issue 11: bytes per peer).

At n = 50 and m = 10^5 the items around the vectors were a third of what a peer moved: every
survivor's signed header listed its ~n mask partners by id, twice (in the unmask request and
in the statement), answers travelled as varints, and every nested item repeated the session
id and round of the message around it. Three lossless forms remove that:

* **Id tables and bitmaps.** A message with lists of peer ids carries one table of the ids
  (``ids``) and each list as a bitmap over it (bit i of byte i // 8, least significant
  first, is ``ids[i]``). The codec does not know the roster, so the table's order is derived
  from the lists themselves (:func:`id_table`: an order every list follows, e.g. the roster
  order the participants sort by); a list the table's order does not reproduce exactly is
  sent as ids, as before. Decoding gives back the very tuple that was encoded.
* **Packed answers.** Linear-check answers as fixed-width little-endian words
  (:func:`pack_words`), the width the smallest whole number of bytes holding the largest.
* **Inherited fields** (``compact``): nested items carry no session id, round (or statement
  digest) when they equal the enclosing message's; the decoder fills them in, and refuses a
  compact message whose items carry their own.

Nothing signed changes: signatures cover the items' canonical payloads
(:mod:`secagg.messages`), never these bytes, so a bitmap that decodes to another set is an
item whose signature fails, exactly as a forged list of ids was. Old encodings (lists of ids,
varint answers, full items) still decode: ledgers store succinct transcripts in them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence

__all__ = [
    "bitmap",
    "check_table",
    "from_bitmap",
    "id_table",
    "pack_words",
    "unpack_words",
]


def id_table(lists: Iterable[Sequence[str]]) -> tuple[str, ...]:
    """The ids of ``lists`` in one order that every list follows where that is possible.

    A topological order of "a comes before b in some list" (ties broken by first
    appearance), so lists sorted by one common key (the roster order) are each reproduced by
    their bitmap. Ids on a cycle (lists that disagree) come last, by first appearance; the
    lists they break fall back to ids (:func:`bitmap` returns None for them).
    """
    first: dict[str, int] = {}
    after: dict[str, set[str]] = {}
    indegree: dict[str, int] = {}
    for items in lists:
        for item in items:
            if item not in first:
                first[item] = len(first)
                after[item], indegree[item] = set(), 0
        for a, b in itertools.pairwise(items):
            if a != b and b not in after[a]:
                after[a].add(b)
                indegree[b] += 1
    ready = [(first[u], u) for u in first if indegree[u] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, u = heapq.heappop(ready)
        order.append(u)
        for v in after[u]:
            indegree[v] -= 1
            if indegree[v] == 0:
                heapq.heappush(ready, (first[v], v))
    placed = set(order)
    order += sorted((u for u in first if u not in placed), key=first.__getitem__)
    return tuple(order)


def bitmap(items: Sequence[str], table: Sequence[str]) -> bytes | None:
    """``items`` as a bitmap over ``table``, or None if decoding it would not give back
    ``items`` exactly (an id missing from the table, a repeat, another order).

    An empty list is no bitmap at all (b""), so an absent field decodes as empty.
    """
    if not items:
        return b""
    position = {u: i for i, u in enumerate(table)}
    indices = [position.get(u, -1) for u in items]
    if min(indices) < 0 or any(a >= b for a, b in itertools.pairwise(indices)):
        return None
    bits = bytearray((len(table) + 7) // 8)
    for i in indices:
        bits[i // 8] |= 1 << (i % 8)
    return bytes(bits)


def from_bitmap(bits: bytes, table: Sequence[str], what: str) -> tuple[str, ...]:
    """The ids a bitmap over ``table`` names, in table order.

    Raises:
        ValueError: the bitmap is not exactly one bit per table entry (rounded up to whole
            bytes), or sets a bit past the table (``what`` names the field).
    """
    if not bits:
        return ()
    if len(bits) != (len(table) + 7) // 8:
        raise ValueError(f"{what}: a bitmap of {len(bits)} bytes over a table of {len(table)} ids")
    value = int.from_bytes(bits, "little")
    if value >> len(table):
        raise ValueError(f"{what}: the bitmap names ids past the end of its table")
    return tuple(u for i, u in enumerate(table) if value >> i & 1)


def check_table(table: Sequence[str]) -> tuple[str, ...]:
    """``table`` as a tuple; ValueError if an id repeats (a bitmap would be ambiguous)."""
    if len(set(table)) != len(table):
        raise ValueError("the id table names an id twice")
    return tuple(table)


def pack_words(values: Sequence[int]) -> tuple[int, bytes]:
    """``(width, bytes)``: ``values`` as little-endian words of ``width`` bytes, the fewest
    whole bytes holding the largest (at least 1). The values are ring words (< 2^64)."""
    width = max(1, (max(values, default=0).bit_length() + 7) // 8)
    return width, b"".join(v.to_bytes(width, "little") for v in values)


def unpack_words(width: int, raw: bytes) -> tuple[int, ...]:
    """The words :func:`pack_words` packed. ValueError for a width outside 1..8 or bytes
    that are not a whole number of words."""
    if not 1 <= width <= 8:
        raise ValueError(f"packed answers of {width} bytes each (1 to 8 expected)")
    if len(raw) % width:
        raise ValueError(f"{len(raw)} bytes of packed answers are not words of {width} bytes")
    return tuple(int.from_bytes(raw[i : i + width], "little") for i in range(0, len(raw), width))
