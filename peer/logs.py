"""Logging for peers: one line per event, plain text or JSON for log collectors.

Messages follow ``key=value`` conventions (peer, session, round, stage) so that plain lines
can be grepped and JSON lines carry the same fields. Nothing secret is ever passed to a
logger: keys, shares, seeds and unmasked vectors stay inside secagg objects.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["configure_logging"]

_FIELD = re.compile(r"\b(peer|session|round|attempt|stage|role|aggregator|participant)=([^\s,]+)")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for key, value in _FIELD.findall(message):
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=False)


def configure_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
