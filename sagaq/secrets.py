"""Secrets in step results and checkpoints: encrypted at rest, redacted everywhere else.

A step wraps a value it must pass on but must not leak in :class:`Secret`::

    return {"id": cred["id"], "token": Secret(cred["token"])}

Before a result or checkpoint is stored, every ``Secret`` in it is sealed with Fernet
(AES-128-CBC + HMAC-SHA256) under ``SAGAQ_SECRET_KEY``, as ``{"$secret": "<token>"}``; when
a later step or its compensation reads it back, it is a ``Secret`` again, and
``secret.reveal()`` gives the value. Its ``repr`` and ``str`` are ``***``, error messages that
quote it are redacted before they are stored or paged (:func:`redact`: the value as it is,
URL-encoded, JSON-escaped, and base64 in any alignment, so HTTP Basic ``user:secret`` too),
and ``sagaq show`` prints ``***``. A secret of any length is redacted, even one of 1-3
characters (a CVV): it may hide a few innocent characters of an error message, never the
reverse.

**Rotation.** ``SAGAQ_SECRET_KEY`` may list several keys, comma-separated, newest first: the
first seals, every one of them opens (``MultiFernet``). A value that no key opens is a
:class:`SecretsUnreadable` naming the variable, and the engine pages for it.

A step's own dict whose only key is ``$secret`` (or ``$literal``) is stored wrapped as
``{"$literal": {...}}`` and comes back as it was, so it is never mistaken for a sealed value.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sagaq.errors import ConfigurationError

MARK = "$secret"
LITERAL = "$literal"  # wraps a step's own dict that would read as a marker
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


class SecretsUnreadable(ConfigurationError):
    """A sealed value that no key in ``SAGAQ_SECRET_KEY`` opens (or no key at all)."""


def new_key() -> str:
    """A fresh key for ``SAGAQ_SECRET_KEY`` (``sagaq keygen``)."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _fernet(keys: str) -> Any:
    """One MultiFernet over ``keys`` (comma-separated, newest first), or None when empty."""
    from cryptography.fernet import Fernet, MultiFernet

    parts = [k.strip() for k in keys.split(",")]
    if parts == [""]:
        return None
    fernets = []
    for n, key in enumerate(parts, start=1):
        where = "SAGAQ_SECRET_KEY" + (f": key {n} of {len(parts)}" if len(parts) > 1 else "")
        if not key:
            raise ConfigurationError(f"{where} is empty; list keys as NEW,OLD")
        try:
            fernets.append(Fernet(key.encode()))
        except (ValueError, TypeError):
            raise ConfigurationError(
                f"{where} is not a Fernet key (32 url-safe base64-encoded bytes); make one "
                "with `sagaq keygen`"
            ) from None
    return MultiFernet(fernets)


class SecretBox:
    """Seals secrets with the newest key and opens them with any key of ``SAGAQ_SECRET_KEY``."""

    def __init__(self, key: str | None) -> None:
        self._fernet = _fernet(key or "")

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
            sealed = {k: self.seal(v) for k, v in value.items()}
            return {LITERAL: sealed} if _reserved(value) else sealed
        if isinstance(value, list | tuple):
            return [self.seal(v) for v in value]
        return value

    def open(self, value: Any) -> Any:
        """``value`` with every sealed secret a Secret again."""
        if isinstance(value, dict):
            if set(value) == {LITERAL} and isinstance(value[LITERAL], dict):
                return {k: self.open(v) for k, v in value[LITERAL].items()}
            if set(value) == {MARK} and isinstance(value[MARK], str):
                return Secret(self._decrypt(value[MARK]))
            return {k: self.open(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.open(v) for v in value]
        return value

    def _decrypt(self, token: str) -> str:
        from cryptography.fernet import InvalidToken

        if self._fernet is None:
            raise SecretsUnreadable(
                "a stored secret cannot be read: SAGAQ_SECRET_KEY is not set in this process"
            )
        try:
            return str(self._fernet.decrypt(token.encode()).decode())
        except InvalidToken:
            raise SecretsUnreadable(
                "a stored secret opens with no key in SAGAQ_SECRET_KEY: was the key changed "
                "while sagas were in flight? Put the old key back after the new one "
                "(SAGAQ_SECRET_KEY=NEW,OLD) and retry the saga"
            ) from None


def _reserved(value: dict[Any, Any]) -> bool:
    """A dict of the step's own that would read as a sealed value or as a wrapper."""
    return len(value) == 1 and (MARK in value or LITERAL in value)


def revealed(value: Any) -> list[str]:
    """The clear values of the Secrets in ``value``."""
    if isinstance(value, Secret):
        return [value.reveal()]
    if isinstance(value, Mapping):  # a step sees its results read-only (a mapping proxy)
        return [s for v in value.values() for s in revealed(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in revealed(v)]
    return []


_B64 = "A-Za-z0-9+/_-"  # both base64 alphabets
_TOKEN = re.compile(f"[{_B64}]{{4,}}=*")
_JSON_ESCAPES = {'"': r'\\"', "\\": r"\\\\", "/": r"\\/"}


def _char(c: str) -> str:
    """A regex for one character of a secret: itself, percent-encoded, JSON-escaped."""
    encoded = ["".join(f"%{b:02x}" for b in c.encode()), rf"\\u{ord(c):04x}"]
    forms = [re.escape(c), "(?i:" + "|".join(encoded) + ")"]
    if c == " ":
        forms.append(r"\+")
    if c in _JSON_ESCAPES:
        forms.append(_JSON_ESCAPES[c])
    return "|".join(forms)


def _b64_cores(raw: bytes) -> Iterator[str]:
    """What base64 of any text holding ``raw`` surely contains, in each of the 3 alignments."""
    for offset, skip in ((0, 0), (1, 2), (2, 3)):
        full = (offset + len(raw)) // 3 * 4
        core = base64.b64encode(bytes(offset) + raw)[skip:full].decode()
        if len(core) >= 4:  # shorter is too common to mean anything; tokens catch those
            yield core
            yield core.translate(str.maketrans("+/", "-_"))


def _decoded(token: str) -> bytes:
    body = token.rstrip("=")
    padded = body + "=" * (-len(body) % 4)
    try:
        return base64.b64decode(padded.translate(str.maketrans("-_", "+/")))
    except (binascii.Error, ValueError):
        return b""


def _spans(text: str, secret: str) -> Iterator[tuple[int, int]]:
    pattern = "".join(f"(?:{_char(c)})" for c in secret)
    for found in re.finditer(f"(?=({pattern}))", text):
        yield found.start(), found.start() + len(found.group(1))
    raw = secret.encode()
    for core in _b64_cores(raw):
        run = f"[{_B64}]*{re.escape(core)}[{_B64}]*=*"
        yield from (m.span() for m in re.finditer(run, text))
    for token in _TOKEN.finditer(text):
        if raw in _decoded(token.group()):
            yield token.span()


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret in it, in any of its usual encodings, shown as ``***``.

    Every place any secret shows is found first, overlapping ones merged, then each merged
    stretch is replaced once: no order of replacement can leave part of a secret behind.
    """
    merged: list[list[int]] = []
    for start, stop in sorted(span for s in set(secrets) if s for span in _spans(text, s)):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    out, end = [], 0
    for start, stop in merged:
        out += [text[end:start], REDACTED]
        end = stop
    return "".join(out) + text[end:]


def masked(value: Any) -> Any:
    """``value`` with every sealed secret shown as ``***`` (for ``sagaq show``)."""
    if isinstance(value, dict):
        if set(value) == {LITERAL} and isinstance(value[LITERAL], dict):
            return {k: masked(v) for k, v in value[LITERAL].items()}
        if set(value) == {MARK}:
            return REDACTED
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value
