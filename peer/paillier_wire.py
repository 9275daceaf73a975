"""Wire form of the Paillier backend's messages: typed JSON inside a ``Fragment``.

Paillier messages are mostly very large integers, which protobuf has no type for; rather
than eight hand-written proto messages that would each carry ``bytes`` fields anyway, every
message is its dataclass written as canonical JSON (integers as decimal strings, bytes as
base64) and read back *against the dataclass's type hints*: a field of the wrong type, an
unknown field or an unknown message name is a :class:`~peer.codec.CodecError`, never a
``TypeError`` deep inside the protocol. Signatures cover the values, not this encoding.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import types
import typing
from typing import Any

from secagg import paillier

__all__ = ["KIND_PREFIX", "MESSAGE_TYPES", "decode_paillier", "encode_paillier"]

KIND_PREFIX = "paillier."
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        paillier.KeyAnnouncement,
        paillier.EncryptedInput,
        paillier.Endorsement,
        paillier.DecryptedSum,
        paillier.InputsToCheck,
        paillier.DecryptionRequest,
        paillier.PaillierTranscript,
        paillier.RedactedPaillierTranscript,
    )
}
# Integers are at most a few ciphertexts of 4096 bits; bound the digits so that a huge
# number cannot make int() quadratic.
_MAX_DIGITS = 4000


class PaillierWireError(ValueError):
    """Bytes that are not a valid Paillier message."""


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
        }
    if isinstance(value, bool):
        raise TypeError("no booleans in Paillier messages")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, str):
        return value
    if isinstance(value, tuple | list):
        return [_to_json(item) for item in value]
    raise TypeError(f"cannot encode {type(value).__name__}")


def _from_json(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is int:
        if (
            not isinstance(value, str)
            or len(value) > _MAX_DIGITS
            or not value.lstrip("-").isdigit()
        ):
            raise PaillierWireError(f"{where}: expected an integer")
        return int(value)
    if hint is bytes:
        if not isinstance(value, str):
            raise PaillierWireError(f"{where}: expected base64 bytes")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise PaillierWireError(f"{where}: invalid base64") from None
    if hint is str:
        if not isinstance(value, str):
            raise PaillierWireError(f"{where}: expected a string")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise PaillierWireError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
        if len(args) != len(value):
            raise PaillierWireError(f"{where}: expected {len(args)} items")
        return tuple(
            _from_json(item, arg, f"{where}[{i}]")
            for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        raise PaillierWireError(f"{where}: union fields are not supported")
    raise PaillierWireError(f"{where}: unsupported field type {hint!r}")


def _build(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise PaillierWireError(f"{where}: expected an object")
    hints = typing.get_type_hints(cls, vars(paillier))
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    if set(value) != fields:
        raise PaillierWireError(f"{where}: fields {sorted(value)} are not those of {cls.__name__}")
    try:
        return cls(
            **{name: _from_json(value[name], hints[name], f"{where}.{name}") for name in fields}
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, PaillierWireError):
            raise
        raise PaillierWireError(f"{where}: {error}") from None


def encode_paillier(message: object) -> tuple[str, bytes]:
    name = type(message).__name__
    if MESSAGE_TYPES.get(name) is not type(message):
        raise TypeError(f"no wire form for {name}")
    text = json.dumps(_to_json(message), sort_keys=True, separators=(",", ":"))
    return KIND_PREFIX + name, text.encode("utf-8")


def decode_paillier(kind: str, data: bytes) -> object:
    """The message of ``kind`` (``paillier.<Name>``); PaillierWireError if malformed."""
    cls = MESSAGE_TYPES.get(kind.removeprefix(KIND_PREFIX))
    if cls is None:
        raise PaillierWireError(f"unknown message kind {kind!r}")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise PaillierWireError(f"{kind} is not valid JSON") from None
    return _build(cls, document, cls.__name__)
