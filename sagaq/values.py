"""What a step's values and errors become on their way into the database.

JSON as it will come back (or an :class:`InputError` naming the value), and an exception as
one bounded line. Below the engine and its recovery, which both write them.
"""

from __future__ import annotations

import json
from typing import Any

from sagaq.errors import InputError
from sagaq.preflight import refuse_nul


def to_json(value: Any, what: str) -> Any:
    """``value`` as JSON will give it back (tuples become lists), or an :class:`InputError`."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is not JSON-serialisable: {exc}") from None
    value = json.loads(text)
    refuse_nul(value, what)  # PostgreSQL's jsonb refuses U+0000 in any text
    return value


def describe(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = text.replace("\x00", "\\x00")  # PostgreSQL text cannot hold U+0000
    return text if len(text) <= limit else text[: limit - 1] + "…"
