"""The one error tree of the secure aggregation core.

::

    SecAggError
     ├── ConfigError            a parameter is invalid (raised before any protocol work)
     ├── LocalProtocolError     this object was driven wrongly (a bug in the caller)
     ├── RemoteProtocolError    another party broke the protocol; ``offender`` names it
     │    └── InvalidSignatureError
     └── RoundAborted           the round cannot finish safely (too few peers left)

Every error that is caused by a message names the peer that sent it. After any of these is
raised from a state machine, that object is finished: a new round is a new object.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by :mod:`secagg`."""


class ConfigError(SecAggError, ValueError):
    """A parameter (threshold, degree, vector length, ...) is invalid."""


class LocalProtocolError(SecAggError):
    """The caller drove a state machine wrongly: e.g. sent a message in the wrong state."""


class RemoteProtocolError(SecAggError):
    """Another party sent something the protocol forbids.

    Attributes:
        offender: the peer id of the party that sent the offending message.
    """

    def __init__(self, offender: str, message: str) -> None:
        super().__init__(f"{offender}: {message}")
        self.offender = offender
        self.reason = message


class InvalidSignatureError(RemoteProtocolError):
    """A signature did not verify under the signer's registered key."""


class RoundAborted(SecAggError):
    """Too few peers remain for the round to finish without revealing anything.

    Aborting is the safe outcome: no input is revealed; the next round starts afresh.
    """
