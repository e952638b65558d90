"""Structured logs on stderr (stdout carries answers in stdin mode): one JSON object a line,
or plain text for a person at a terminal. Fields passed as `extra={...}` become keys."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in STANDARD)
        return f"{record.levelname.lower():7} {record.getMessage()} {fields}".rstrip()


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("edgeseq")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    runtime = logging.getLogger("edgeseq.runtime")  # its notices: lines of this log only
    runtime.handlers.clear()
    runtime.setLevel(logging.NOTSET)
