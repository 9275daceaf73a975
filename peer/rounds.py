"""Moved to peer/round/ and peer.codec; this name stays for peer/operator/follow.py and
tests/test_operator_follow.py (lane 10d)."""

from peer.codec import record_from_proto as record_from_proto  # moved to peer.codec
from peer.codec import record_to_proto as record_to_proto  # moved to peer.codec
from peer.round import valid_signatures as valid_signatures  # moved to peer.round.agreement
