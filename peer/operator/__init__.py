"""The operator's side: a federation file, a client to the peers, following a session.

The operator holds an operator certificate (or a peer's); it proposes and starts sessions
and watches them, but it takes no part in the rounds and sees no data. The ``ceremony``
commands (scripts/) are this library plus argument parsing and printing.

* :mod:`.client` — :class:`OperatorClient`, the RPCs to the peers, and the operator's errors;
* :mod:`.federation` — ``federation.toml`` and the proposal it describes;
* :mod:`.follow` — propose and start, watch until done, collect what was agreed.
"""

from .client import (
    FINAL_STATES,
    BeaconFailed,
    OperatorClient,
    OperatorError,
    ProposalRefused,
)
from .federation import (
    FederationFile,
    build_proposal,
    default_session_id,
    load_federation,
    operator_client,
)
from .follow import (
    POLL_SECONDS,
    STAGES,
    RoundRow,
    SessionOutcome,
    SessionWatcher,
    check_reachable,
    collect_rounds,
    default_timeout,
    drive_session,
    propose_and_start,
    round_row,
    start_if_accepted,
)

__all__ = [
    "FINAL_STATES",
    "POLL_SECONDS",
    "STAGES",
    "BeaconFailed",
    "FederationFile",
    "OperatorClient",
    "OperatorError",
    "ProposalRefused",
    "RoundRow",
    "SessionOutcome",
    "SessionWatcher",
    "build_proposal",
    "check_reachable",
    "collect_rounds",
    "default_session_id",
    "default_timeout",
    "drive_session",
    "load_federation",
    "operator_client",
    "propose_and_start",
    "round_row",
    "start_if_accepted",
]
