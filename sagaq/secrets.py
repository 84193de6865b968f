"""Secrets in step results and checkpoints: encrypted at rest, redacted everywhere else.

A step wraps a value it must pass on but must not leak in :class:`Secret`::

    return {"id": cred["id"], "token": Secret(cred["token"])}

Before a result or checkpoint is stored, every ``Secret`` in it is sealed with Fernet
(AES-128-CBC + HMAC-SHA256) under ``SAGAQ_SECRET_KEY``, as ``{"$secret": "<token>"}``; when
a later step or its compensation reads it back, it is a ``Secret`` again, and
``secret.reveal()`` gives the value. Its ``repr`` and ``str`` are ``***``, error messages that
quote it are redacted before they are stored or paged, and ``sagaq show`` prints ``***``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from typing import Any

from sagaq.errors import ConfigurationError

MARK = "$secret"
REDACTED = "***"


class Secret:
    """A value that is never printed, logged, paged or stored in clear."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret holds text")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))


def new_key() -> str:
    """A fresh key for ``SAGAQ_SECRET_KEY`` (``sagaq keygen``)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


class SecretBox:
    """Seals and opens the secrets of JSON-like values with one key."""

    def __init__(self, key: str | None) -> None:
        self._fernet: Any = None
        if key:
            from cryptography.fernet import Fernet

            try:
                self._fernet = Fernet(key.encode())
            except (ValueError, TypeError):
                raise ConfigurationError(
                    "SAGAQ_SECRET_KEY is not a Fernet key (32 url-safe base64-encoded bytes); "
                    "make one with `sagaq keygen`"
                ) from None

    def seal(self, value: Any) -> Any:
        """``value`` with every Secret replaced by its ciphertext."""
        if isinstance(value, Secret):
            if self._fernet is None:
                raise ConfigurationError(
                    "a step returned a Secret but SAGAQ_SECRET_KEY is not set; make one with "
                    "`sagaq keygen`"
                )
            return {MARK: self._fernet.encrypt(value.reveal().encode()).decode()}
        if isinstance(value, dict):
            return {k: self.seal(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.seal(v) for v in value]
        return value

    def open(self, value: Any) -> Any:
        """``value`` with every sealed secret a Secret again."""
        if isinstance(value, dict):
            if set(value) == {MARK} and isinstance(value[MARK], str):
                if self._fernet is None:
                    raise ConfigurationError(
                        "a stored secret cannot be read: SAGAQ_SECRET_KEY is not set"
                    )
                return Secret(self._fernet.decrypt(value[MARK].encode()).decode())
            return {k: self.open(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.open(v) for v in value]
        return value


def revealed(value: Any) -> list[str]:
    """The clear values of the Secrets in ``value``."""
    if isinstance(value, Secret):
        return [value.reveal()]
    if isinstance(value, Mapping):  # a step sees its results read-only (a mapping proxy)
        return [s for v in value.values() for s in revealed(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in revealed(v)]
    return []


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value in it replaced by ``***``."""
    for value in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def masked(value: Any) -> Any:
    """``value`` with every sealed secret shown as ``***`` (for ``sagaq show``)."""
    if isinstance(value, dict):
        if set(value) == {MARK}:
            return REDACTED
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value
