"""The :class:`Ledger`: a peer's durable, hash-chained record of what the consortium agreed.

Theory of operation
-------------------
Every session has its own hash chain. An agreed round's ``prev_hash`` must equal the
``record_hash`` of the session's last agreed record (rounds only move forward; aborted
rounds leave no record, so the previous record is that of the highest agreed round), or
:func:`session_genesis` of the session's proposal hash for its first record. Chains are
per session because peers take part in different sessions: a global chain would differ
from peer to peer, and they could not sign the same record.

Each row also gets ``seq = last seq + 1``: this ledger's own gap-free append order, used
for export, import and display, but not signed. The check and the insert run in one
transaction (``BEGIN IMMEDIATE`` on SQLite, so that two writers queue instead of racing);
``seq`` being the primary key makes a lost race fail rather than fork a chain. The record,
its signatures, its checkpoint and its privacy charges are written together or not at
all.

SQLite connections are set up for durability: write-ahead log, ``synchronous=FULL`` (a
commit has reached the disk before it returns, so a power cut cannot lose an agreed round
that peers were told about) and enforced foreign keys. On other backends the server's own
durability settings apply.

Where each job lives
--------------------
``Ledger`` is one public class assembled from one mixin per job, all on the same database
plumbing (:class:`~peer.ledger._store.LedgerStore`: engine, transactions, the one place
that maps database failures to ledger errors):

- :mod:`peer.ledger._sessions`: proposals and session status;
- :mod:`peer.ledger._rounds`: round attempts;
- :mod:`peer.ledger._chain`: agreed records, heads and checkpoints;
- :mod:`peer.ledger._privacy`: privacy charges and statistics results;
- :mod:`peer.ledger._beacon`: the session beacon and the refused-proposal log;
- :mod:`peer.ledger._votes`: the record this peer signed for each round (before sending it);
- :mod:`peer.ledger._proofs`: each agreed secagg round's evidence, for ``verify-ledger``.
"""

from __future__ import annotations

from peer.ledger._beacon import BeaconMixin
from peer.ledger._chain import ChainMixin
from peer.ledger._privacy import PrivacyMixin
from peer.ledger._proofs import ProofsMixin
from peer.ledger._rounds import RoundsMixin
from peer.ledger._sessions import SessionsMixin
from peer.ledger._store import Clock, system_clock
from peer.ledger._votes import VotesMixin

__all__ = ["Clock", "Ledger", "system_clock"]


class Ledger(
    SessionsMixin, RoundsMixin, ChainMixin, PrivacyMixin, BeaconMixin, VotesMixin, ProofsMixin
):
    """A peer's local ledger in any SQLAlchemy database (SQLite file by default).

    Args:
        url: a SQLAlchemy URL, e.g. ``sqlite:////var/lib/peer/ledger.db`` or
            ``postgresql+psycopg://peer@db/ledger``.
        clock: the time source for every timestamp the ledger writes.

    Call :meth:`create` once before first use (it is idempotent). Methods that write raise
    :class:`LedgerWriteError` when the database cannot be written, and a
    :class:`RecordRejected` subclass when what was asked would break the ledger; in both
    cases nothing was written.
    """
