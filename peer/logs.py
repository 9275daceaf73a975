"""Logging for peers: one line per event, plain text or JSON for log collectors.

Messages follow ``key=value`` conventions (peer, session, round, stage) so that plain lines
can be grepped and JSON lines carry the same fields. Nothing secret is ever passed to a
logger: keys, shares, seeds and unmasked vectors stay inside secagg objects.

Text that another peer chose (an Abort reason, a status detail, an error that quotes what a
caller sent) must not be able to forge a log line: a newline in it would start a line of its
own (``... INFO peer.node peer=a session=s round=1 outcome=agreed``) and a ``round=7`` in it
would become a field of the JSON line. So:

* every such value is passed to the logger wrapped in :func:`remote`, which prints it
  quoted with control characters escaped (``repr`` style: ``'a\\nINFO ...'``); in JSON it
  is also a field of its own (``"remote": [...]``) and the ``key=value`` fields are read
  from the message with remote text blanked out, so it cannot add or change a field;
* as a net under that rule, both formatters escape any control character left in a
  message (a line break in the text of a local error that quotes remote input, say), so
  one event is always exactly one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["Remote", "configure_logging", "one_line", "remote"]

_FIELD = re.compile(r"\b(peer|session|round|attempt|stage|role|aggregator|participant)=([^\s,]+)")
# C0 and C1 control characters and the Unicode line/paragraph separators: anything a
# terminal or a log collector may take as the end of a line or a cursor movement.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class Remote:
    """A value chosen by someone else, for a log message (see the module docstring)."""

    __slots__ = ("text",)

    def __init__(self, text: object) -> None:
        self.text = str(text)

    def __str__(self) -> str:
        return repr(self.text)  # quoted, with \n, \r, \x1b ... escaped

    __repr__ = __str__


def remote(text: object) -> Remote:
    """Mark ``text`` as remote for a log call: ``logger.warning("refused: %s", remote(why))``."""
    return text if isinstance(text, Remote) else Remote(text)


def one_line(text: str) -> str:
    """``text`` with every control character escaped, so that it stays one log line."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def _blanked_message(record: logging.LogRecord) -> str:
    """The message with every remote value replaced by a placeholder (for field parsing)."""
    args = record.args
    if isinstance(args, tuple) and any(isinstance(a, Remote) for a in args):
        blank = tuple("<remote>" if isinstance(a, Remote) else a for a in args)
        return str(record.msg) % blank
    return record.getMessage()


def _remote_values(record: logging.LogRecord) -> list[str]:
    args = record.args
    if isinstance(args, tuple):
        return [a.text for a in args if isinstance(a, Remote)]
    return []


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return one_line(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = one_line(record.getMessage())
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for key, value in _FIELD.findall(one_line(_blanked_message(record))):
            entry.setdefault(key, value)
        values = _remote_values(record)
        if values:
            entry["remote"] = values  # json.dumps escapes them: never raw in the line
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=False)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
