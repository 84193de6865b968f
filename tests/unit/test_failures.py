"""Failure classes: what step code declares, and what the classifier maps (issue 4)."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

import httpx
import pytest
from celery.exceptions import SoftTimeLimitExceeded as CelerySoftTimeLimitExceeded

from sagaq.errors import (
    EnvironmentalError,
    LogicalError,
    StepError,
    TerminalError,
    TransientError,
)
from sagaq.failures import FailureClass, builtin, classify, for_status, http_status

T, L, E, X = (
    FailureClass.TRANSIENT,
    FailureClass.LOGICAL,
    FailureClass.ENVIRONMENTAL,
    FailureClass.TERMINAL,
)
URL = "https://api.example.test/v1/things/7"


def status_error(status: int) -> httpx.HTTPStatusError:
    """The error httpx itself raises for a response with this status."""
    request = httpx.Request("POST", URL, json={"a": 1})
    response = httpx.Response(status, request=request, json={"error": "nope"})
    with pytest.raises(httpx.HTTPStatusError) as info:
        response.raise_for_status()
    return info.value


# -- declared by step code ---------------------------------------------------------------


class CardDeclined(TerminalError):
    pass


class SchemaMoved(EnvironmentalError):
    pass


class BadToolCall(LogicalError):
    pass


class VendorBusy(TransientError):
    pass


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (TransientError(), T),
        (TransientError("vendor 503", step="charge"), T),
        (LogicalError("bad tool call"), L),
        (EnvironmentalError("schema migrated"), E),
        (TerminalError("card declined", step="charge"), X),
        (VendorBusy(), T),
        (BadToolCall(), L),
        (SchemaMoved(), E),
        (CardDeclined(), X),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.value,
)
def test_declared_step_errors(exc: StepError, expected: FailureClass) -> None:
    assert classify(exc) is expected
    assert builtin(exc) is expected


def test_the_base_step_error_declares_nothing() -> None:
    assert builtin(StepError("something")) is None
    assert classify(StepError("something")) is T


def test_a_declared_class_beats_what_the_exception_also_looks_like() -> None:
    class TimedOutForGood(TerminalError, TimeoutError):
        pass

    class WrongAnswer(LogicalError):
        response = SimpleNamespace(status_code=503)

    assert classify(TimedOutForGood()) is X
    assert classify(WrongAnswer()) is L


# -- network -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError("timed out"),
        ConnectionError("reset"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_builtin_network_errors_are_transient(exc: BaseException) -> None:
    assert builtin(exc) is T
    assert classify(exc) is T


@pytest.mark.parametrize(
    "kind",
    [
        httpx.ConnectTimeout,
        httpx.ReadTimeout,
        httpx.WriteTimeout,
        httpx.PoolTimeout,
        httpx.ConnectError,
        httpx.ReadError,
        httpx.RemoteProtocolError,
    ],
    ids=lambda k: k.__name__,
)
def test_httpx_transport_errors_are_transient(kind: type[httpx.TransportError]) -> None:
    exc = kind("boom", request=httpx.Request("GET", URL))
    assert http_status(exc) is None
    assert builtin(exc) is T  # not merely the unknown-exception default
    assert classify(exc) is T


def test_a_real_httpx_connection_failure_is_transient() -> None:
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError) as info:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2.0)
    assert builtin(info.value) is T


def test_celery_soft_time_limit_is_transient() -> None:
    class SoftTimeLimitExceeded(Exception):  # the name is what is matched
        pass

    assert builtin(SoftTimeLimitExceeded()) is T
    assert builtin(CelerySoftTimeLimitExceeded()) is T
    assert classify(CelerySoftTimeLimitExceeded("soft time limit (300s) exceeded")) is T

    class HardTimeLimitExceeded(Exception):
        pass

    assert builtin(HardTimeLimitExceeded()) is None  # the name is matched exactly


# -- HTTP statuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (408, T),
        (425, T),
        (429, T),
        (500, T),
        (502, T),
        (503, T),
        (504, T),
        (599, T),
        (404, E),
        (409, E),
        (410, E),
        (412, E),
        (400, L),
        (422, L),
        (401, X),
        (403, X),
    ],
)
def test_httpx_status_errors(status: int, expected: FailureClass) -> None:
    exc = status_error(status)
    assert http_status(exc) == status
    assert builtin(exc) is expected
    assert classify(exc) is expected


@pytest.mark.parametrize("status", [402, 405, 418, 451, 499])
def test_an_unmapped_status_falls_to_the_default(status: int) -> None:
    exc = status_error(status)
    assert for_status(status) is None
    assert builtin(exc) is None
    assert classify(exc) is T
    assert classify(exc, [lambda e: L if http_status(e) == status else None]) is L


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, None),
        (307, None),
        (407, None),
        (408, T),
        (424, None),
        (425, T),
        (426, None),
        (428, None),
        (429, T),
        (430, None),
        (499, None),
        (500, T),
        (599, T),
        (600, None),
    ],
)
def test_for_status_edges(status: int, expected: FailureClass | None) -> None:
    assert for_status(status) is expected


def test_http_status_reads_any_response_that_has_an_int_status() -> None:
    class VendorError(Exception):
        def __init__(self, status: object) -> None:
            super().__init__("vendor said no")
            self.response = SimpleNamespace(status_code=status)

    assert http_status(VendorError(503)) == 503
    assert classify(VendorError(503)) is T
    assert classify(VendorError(401)) is X
    assert http_status(VendorError("503")) is None  # not an int: not a status
    assert http_status(VendorError(None)) is None
    assert http_status(ValueError()) is None
    no_response = Exception()
    no_response.response = None  # type: ignore[attr-defined]
    assert http_status(no_response) is None


def test_requests_errors() -> None:
    requests = pytest.importorskip("requests")
    assert classify(requests.exceptions.ConnectTimeout("slow")) is T
    assert builtin(requests.exceptions.ReadTimeout("slow")) is T
    assert builtin(requests.exceptions.ConnectionError("refused")) is T
    for status, expected in ((429, T), (503, T), (404, E), (422, L), (403, X)):
        response = requests.Response()
        response.status_code = status
        exc = requests.exceptions.HTTPError(f"{status}", response=response)
        assert builtin(exc) is expected, status


# -- other exceptions --------------------------------------------------------------------


def test_a_model_answer_that_is_not_json_is_logical() -> None:
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads("Sure! Here is the JSON you asked for: {")
    assert builtin(info.value) is L
    assert classify(info.value) is L


@pytest.mark.parametrize(
    "exc",
    [ValueError("x"), KeyError("x"), RuntimeError(), ZeroDivisionError(), OSError(5, "EIO")],
    ids=lambda e: type(e).__name__,
)
def test_unknown_exceptions_are_transient_by_default(exc: BaseException) -> None:
    assert builtin(exc) is None
    assert classify(exc) is T
    assert isinstance(classify(exc), FailureClass)


# -- extra classifiers -------------------------------------------------------------------


def test_extra_classifiers_come_first_in_order() -> None:
    calls: list[str] = []

    def passes(exc: BaseException) -> FailureClass | None:
        calls.append("passes")
        return None

    def logical(exc: BaseException) -> FailureClass | None:
        calls.append("logical")
        return L if isinstance(exc, TimeoutError) else None

    def terminal(exc: BaseException) -> FailureClass | None:
        calls.append("terminal")
        return X

    timeout = TimeoutError()
    assert classify(timeout, [passes, logical, terminal]) is L  # over the built-in rule
    assert calls == ["passes", "logical"]  # the first answer wins; later ones are not asked
    calls.clear()
    assert classify(timeout, [terminal, logical]) is X
    assert calls == ["terminal"]
    calls.clear()
    assert classify(ValueError(), [passes, logical]) is T  # all pass: built-in, then default
    assert calls == ["passes", "logical"]
    assert classify(TerminalError(), [lambda e: T]) is T  # even over a declared class
    assert classify(status_error(404), (passes,)) is E
    assert classify(timeout, iter([logical])) is L  # any iterable of classifiers
