"""Logging: one line per event on stderr, text or JSON, a scope per component.

Secrets never reach a log line: a filter on the root handler masks bearer tokens, JWTs and PEM
private keys wherever they appear in a message or its arguments.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_ROOT = "vm_agent"

_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.S),
        "<redacted private key>",
    ),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1<redacted>"),
    # A JWT: three base64url segments, the first one a JSON header ("eyJ").
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "<redacted token>"),
)


def redact(text: str) -> str:
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    return text


def get_logger(scope: str) -> logging.Logger:
    """Logger for one component, e.g. ``get_logger("identity")`` → scope ``identity``."""
    return logging.getLogger(f"{_ROOT}.{scope}")


def _scope(record: logging.LogRecord) -> str:
    name = record.name
    if name == _ROOT:
        return "agent"
    if name.startswith(_ROOT + "."):
        return name[len(_ROOT) + 1 :]
    return name


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = redact(record.getMessage())
        record.msg = message
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"{ts}\t{record.levelname.lower()}\t{_scope(record)}\t{record.getMessage()}"
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "scope": _scope(record),
            "msg": record.getMessage(),
        }
        if record.exc_text:
            doc["error"] = record.exc_text
        return json.dumps(doc, separators=(",", ":"))


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure process-wide logging once, from the CLI."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(_ROOT).setLevel(level.upper())
