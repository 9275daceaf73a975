"""Moved to peer/round/ and peer.codec; this name stays for scripts/ceremony_run.py."""

from peer.codec import record_from_proto as record_from_proto  # moved to peer.codec
