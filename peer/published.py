"""What an error may say outside this peer (SECURITY.md, "Error text that leaves a peer").

Error text travels further than it looks: a round's reason becomes the session's
``Status.detail`` (answered to the other hospitals' peers and to the operator), a payload
that cannot be built refuses the proposal with a reason (answered to the operator), a
session's abort reason is answered again by ``Propose`` and ``Start``. The data layer's
messages name patients and values ("column 'target' is missing ... (patients 17, 42)"),
so they must not go there.

:func:`disclose` is the one place that decides. It turns an exception into a
:class:`Disclosure`: the text that may leave the peer and the full text for this peer's
own log, tied by a reference both carry::

    public: a data problem at hospital-a (see its log, ref 3f2a9c)
    local:  DataError: sqlite:///...: column 'target' is missing ... (patients 17, 42) (ref 3f2a9c)

Which messages are published as they are: :class:`~peer.session.ProposalError` (and its
subclasses, e.g. the privacy budget refusals) and :class:`PublishableError`. Their text
names only the proposal's public parameters, this site's policy and counts the proposal
checks anyway ("has 1234 training records, more than the session's max_records 1000"): the
operator needs it to fix the proposal. Everything else is published as its category only:
"a data problem" for the data layer's errors, the exception type for any other (an
unexpected error's message may quote anything it touched).

The reference is an HMAC of the full text under a key drawn once per process: the same
error gives the same reference (the session runner recognises an error that recurs word
for word, peer/attempts.py), and nobody without the key can test a guess of the hidden
text against it (a plain hash of "patients 17, 42" could be confirmed by guessing).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, hmac

from .data.errors import DataError
from .session import ProposalError

__all__ = [
    "DATA_PROBLEM",
    "INTERNAL_ERROR",
    "Disclosure",
    "PublishableError",
    "disclose",
    "internal_error",
]

# Why an attempt failed when an unexpected exception (a bug, an environment fault) ended it:
# that attempt only, never the session (README, "When an attempt fails by an error"). The
# session runner matches on it (peer/attempts.py, peer/runner.py).
INTERNAL_ERROR = "internal error"
# What a data-layer error is published as (followed by " at <peer>").
DATA_PROBLEM = "a data problem"
# Hex digits of the reference: enough to find the line in one site's log.
_REF_HEX = 6
# Drawn once per process: references are comparable within one run of the peer only.
_PROCESS_KEY = secrets.token_bytes(32)


class PublishableError(ValueError):
    """This site's data does not fit a proposal, said in words that may leave the peer.

    Raise it only with a message naming the proposal's public parameters, this site's
    peer id and counts the proposal bounds anyway (records against ``max_records``, the
    largest label against the classes): never a patient, a value or a local path.
    """


@dataclass(frozen=True, slots=True)
class Disclosure:
    """An error as it may be published and as this peer logs it.

    Attributes:
        public: the text that may leave the peer (Status.detail, a refusal, an Abort).
        local: the full text, for this peer's own log and ledger, with the reference.
        ref: the reference both carry.
    """

    public: str
    local: str
    ref: str


def _data_errors() -> tuple[type[Exception], ...]:
    # The statistics payload's own data error (peer/payloads/statistics.py) quotes the
    # store's feature names and URL; imported here, late, so that this module stays light.
    from .payloads.statistics import StatisticsDataError

    return (DataError, StatisticsDataError)


def disclose(error: BaseException, me: str, *, key: bytes = _PROCESS_KEY) -> Disclosure:
    """What may be published of ``error`` (raised at peer ``me``), and what stays local.

    Args:
        error: the exception.
        me: this peer's id, named in the public text (it is relayed to other parties).
        key: the reference's HMAC key (tests pass their own).

    Returns:
        The :class:`Disclosure`; its ``local`` text is for this peer's log only.
    """
    full = f"{type(error).__name__}: {error}"
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(b"peer/published error reference\x00" + full.encode("utf-8", "replace"))
    ref = mac.finalize().hex()[:_REF_HEX]
    local = f"{full} (ref {ref})"
    if isinstance(error, ProposalError | PublishableError):
        return Disclosure(str(error), local, ref)
    category = DATA_PROBLEM if isinstance(error, _data_errors()) else type(error).__name__
    return Disclosure(f"{category} at {me} (see its log, ref {ref})", local, ref)


def internal_error(error: Exception, me: str) -> Disclosure:
    """Why an attempt failed at peer ``me`` when ``error`` (unexpected) ended it.

    The public text names the error's type and a reference only (it becomes Status.detail,
    and a session's abort reason); the local one, for this peer's log and ledger, has its
    message too. Both start with :data:`INTERNAL_ERROR`, and the same error gives the same
    text (the runner counts an error that recurs word for word, peer/attempts.py).
    """
    said = disclose(error, me)
    return Disclosure(
        f"{INTERNAL_ERROR}: {said.public}"[:1000], f"{INTERNAL_ERROR}: {said.local}", said.ref
    )
