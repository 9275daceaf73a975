"""Placeholder while this module is written."""

from __future__ import annotations

from typing import Any


def add_parsers(subparsers: Any) -> None:
    """Nothing registered yet."""
