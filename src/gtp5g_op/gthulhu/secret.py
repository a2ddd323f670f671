"""Credentials that never show in text, and the redaction of every text built from a server's answer.

Kept free of heavy imports: ``config`` holds the Manager password as a :class:`Secret`.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

MAX_MESSAGE = 200  # characters of a server's message quoted in an error


class Secret:
    """A password or token: its value only through :meth:`reveal`, never in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")


class Redactor:
    """Removes registered secrets, and any fragment of one at least ``fragment`` characters long, from text.

    A server that echoes part of a token (``invalid token eyJhbGciOi...``) gets no part of it into an
    error: every run of text that shares ``fragment`` consecutive characters with a secret is replaced.
    The most recent ``keep`` secrets are remembered (tokens are renewed every minute or so).
    """

    def __init__(self, fragment: int = 8, keep: int = 16):
        self.fragment = fragment
        self._secrets: collections.deque[str] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, secret: Secret | str | None) -> None:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if value:
            with self._lock:
                if value not in self._secrets:
                    self._secrets.append(value)

    def redact(self, text: str) -> str:
        with self._lock:
            secrets = list(self._secrets)
        if not secrets or not text:
            return text
        grams: dict[int, set[str]] = {}
        for secret in secrets:
            k = min(self.fragment, len(secret))
            grams.setdefault(k, set()).update(secret[i:i + k] for i in range(len(secret) - k + 1))
        hidden = bytearray(len(text))
        for k, known in grams.items():
            for i in range(len(text) - k + 1):
                if text[i:i + k] in known:
                    hidden[i:i + k] = b"\1" * k
        out, i = [], 0
        while i < len(text):
            if hidden[i]:
                while i < len(text) and hidden[i]:
                    i += 1
                out.append("[redacted]")
            else:
                out.append(text[i])
                i += 1
        return "".join(out)

    def clean(self, text: str, limit: int = MAX_MESSAGE) -> str:
        """``text`` redacted, on one line, control characters escaped, clipped to ``limit`` characters."""
        text = self.redact(text[: limit * 20])
        text = " ".join(text.split())
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
        return text if len(text) <= limit else text[:limit] + "…"
