"""Hostile text made harmless for a terminal or a log line.

A step's error, a caller's key or a stand-in's reply may carry rich markup (``[link=...]``),
ANSI/OSC escape sequences or bidi overrides. Before it is shown, every control character is
written out (``\\x1b``, ``\\n``, ``\\u202e``), so the operator sees what was there instead of
having their terminal act on it; and it is cut only after that, so no half sequence remains.
"""

from __future__ import annotations

import unicodedata

# Format characters that reorder or hide text (Trojan Source): shown like controls.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object, limit: int | None = None) -> str:
    """``text`` with control and bidi characters written out, then cut to ``limit``."""
    out = "".join(
        _escape(c) if c in _BIDI or unicodedata.category(c) == "Cc" else c for c in str(text)
    )
    if limit is not None and len(out) > limit:
        return out[: limit - 1] + "…"
    return out


def one_line(text: object) -> str:
    """Whitespace runs (newlines included) as one space, then every control made visible."""
    return visible(" ".join(str(text).split()))
