"""Logging set-up: plain text for people, one JSON object per line for daemons; secrets never reach either.

Text lines are ``gtp5g-op: LEVEL: message``, one per record: control characters in the message (a path
or comm with a newline, CR or ESC) are escaped (``\\n``, ``\\x1b``), so no input can forge a log line or
drive the terminal; a traceback follows on lines indented by four spaces, escaped the same way.
JSON lines are JSON (``json.dumps`` escapes every control character).

JSON lines always start with the keys of :data:`JSON_KEYS` in that order; extra fields passed with
``log.info("...", extra={"fields": {...}})`` follow (they cannot override the fixed keys), then ``exc``
when an exception is logged. A :class:`RedactingFilter` on the handler replaces anything that looks
like a token (a JWT, ``Bearer <x>``, a private-key PEM block, or the value of a field named like a
secret) with ``[redacted]`` in the message, its arguments, the extra fields and the traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from gtp5g_op.errors import escape_control

# Keys every JSON log line carries, in this order; extra fields passed with ``extra={"fields": {...}}``.
JSON_KEYS = ("ts", "level", "logger", "msg")

REDACTED = "[redacted]"

# A JWT is three base64url parts whose first two are JSON objects, so they begin with "eyJ" ('{"').
_JWT = r"eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"
_BEARER = r"(?i:\bbearer)\s+[^\s\"',;]+"
_PRIVATE_KEY = r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----"
_SECRET_TEXT = re.compile(f"{_PRIVATE_KEY}|{_BEARER}|{_JWT}", re.DOTALL)
# Extra-field names whose values are secrets whatever they look like.
_SECRET_KEY = re.compile(r"(?i)token|authorization|password|passwd|secret|private_key|cookie")


def redact(text: str) -> str:
    """``text`` with every token-looking part replaced by ``[redacted]``."""
    return _SECRET_TEXT.sub(_replacement, text)


def _replacement(match: re.Match[str]) -> str:
    word = match.group(0).split(None, 1)[0]
    return f"{word} {REDACTED}" if word.lower() == "bearer" else REDACTED


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set)):
        return [_redact_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))  # what json.dumps(default=str) would print


class RedactingFilter(logging.Filter):
    """Rewrite a record so no token-looking text survives in message, fields or traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = _redact_value(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object with stable keys."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update({k: v for k, v in fields.items() if k not in doc})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``gtp5g-op: LEVEL: message`` with the message escaped to one line; a traceback indented below."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"gtp5g-op: {record.levelname}: {escape_control(record.getMessage())}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if block:
                text += "".join(f"\n    {escape_control(line)}" for line in block.splitlines())
        return text


def setup_logging(verbose: int = 0, fmt: str = "text") -> None:
    """Configure the root logger on stderr; ``fmt`` is ``text`` or ``json``."""
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
