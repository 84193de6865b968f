"""Failure classes, and the classifier that maps exceptions onto them.

Step code can say what happened by raising :class:`~sagaq.errors.TransientError`,
:class:`~sagaq.errors.LogicalError`, :class:`~sagaq.errors.EnvironmentalError` or
:class:`~sagaq.errors.TerminalError`. Anything else goes through the classifier: a step's
own classifiers first, then its saga's, then the built-in rules below. Pure: no I/O.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from enum import Enum

from sagaq.errors import (
    EnvironmentalError,
    LogicalError,
    TerminalError,
    TransientError,
)


class FailureClass(str, Enum):
    TRANSIENT = "transient"  # the same input may work in a moment (network, 429, 5xx)
    LOGICAL = "logical"  # the output was wrong (bad tool call, invalid output)
    ENVIRONMENTAL = "environmental"  # the world changed (schema migrated, resource gone)
    TERMINAL = "terminal"  # nothing will make it work; stop climbing


Classifier = Callable[[BaseException], "FailureClass | None"]
"""Returns a class for the exceptions it knows and None for the others."""

_DECLARED: tuple[tuple[type[BaseException], FailureClass], ...] = (
    (TerminalError, FailureClass.TERMINAL),
    (EnvironmentalError, FailureClass.ENVIRONMENTAL),
    (LogicalError, FailureClass.LOGICAL),
    (TransientError, FailureClass.TRANSIENT),
)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an httpx / requests error that carries a response, else None."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def for_status(status: int) -> FailureClass | None:
    if status in (408, 425, 429) or 500 <= status <= 599:
        return FailureClass.TRANSIENT
    if status in (404, 409, 410, 412):
        return FailureClass.ENVIRONMENTAL  # gone, conflicting, or changed since it was read
    if status in (400, 422):
        return FailureClass.LOGICAL  # the request the step built was wrong
    if status in (401, 403):
        return FailureClass.TERMINAL  # no credentials: retrying will not grant them
    return None


def _network(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return True
    requests = sys.modules.get("requests")
    if requests is not None and isinstance(
        exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout
    ):
        return True
    # Celery raises SoftTimeLimitExceeded inside a step that ran past its time limit.
    return type(exc).__name__ == "SoftTimeLimitExceeded"


def builtin(exc: BaseException) -> FailureClass | None:
    for kind, cls in _DECLARED:
        if isinstance(exc, kind):
            return cls
    status = http_status(exc)
    if status is not None:
        return for_status(status)
    if _network(exc):
        return FailureClass.TRANSIENT
    if isinstance(exc, json.JSONDecodeError):
        return FailureClass.LOGICAL  # a model answered with something that is not JSON
    return None


def classify(exc: BaseException, extra: Iterable[Classifier] = ()) -> FailureClass:
    """The class of ``exc``: the first classifier with an answer wins; unknown → transient."""
    for classifier in (*extra, builtin):
        found = classifier(exc)
        if found is not None:
            return FailureClass(found)
    return FailureClass.TRANSIENT  # unknown: worth a bounded retry, then the ladder climbs


def in_doubt(exc: BaseException) -> bool:
    """Whether the request may have reached the other side before ``exc`` (DESIGN §4.14).

    A time limit hit mid-call, a read timeout, a connection reset after sending: the effect
    may have landed, so the outcome is unknown and ``verify`` decides. A connection that was
    never made (refused, a connect timeout) is a clean failure.
    """
    if type(exc).__name__ == "SoftTimeLimitExceeded":
        return True
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                              | httpx.UnsupportedProtocol | httpx.ProxyError)
    requests = sys.modules.get("requests")
    if requests is not None and isinstance(exc, requests.exceptions.RequestException):
        return isinstance(exc, requests.exceptions.ReadTimeout
                          | requests.exceptions.ChunkedEncodingError) or (
            isinstance(exc, requests.exceptions.ConnectionError)
            and not isinstance(exc, requests.exceptions.ConnectTimeout)
        )
    if isinstance(exc, ConnectionRefusedError):
        return False
    return isinstance(exc, TimeoutError | ConnectionResetError | ConnectionAbortedError
                      | BrokenPipeError)
