"""Notifiers against a real local HTTP server: payload shapes, signatures, retry classification.

The server is a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 that records every request (path,
headers, raw body) and answers from a scripted list of responses. Nothing is mocked: the
notifiers open real sockets with httpx, so timeouts and refused connections are real too.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from sagaq.notify.base import (
    FAILED_COMPENSATION,
    FAILED_STEP,
    LINKS,
    TIMELINE,
    UNCOMPENSATED,
    Action,
    DeliveryError,
    Kind,
    Notice,
    Notifier,
)
from sagaq.notify.http import parse_retry_after, post_json
from sagaq.notify.pagerduty import PagerDutyNotifier, pagerduty_dedup_key
from sagaq.notify.slack import SlackNotifier
from sagaq.notify.webhook import WebhookNotifier, notice_to_dict, verify_signature

ROUTING_KEY = "R0ut1ngK3yR0ut1ngK3yR0ut1ngK3y42"
WEBHOOK_SECRET = "whsec-0123456789abcdef"
SLACK_PATH = "/services/T0001/B0001/sl4ckT0kenSecret"
SECRETS = (ROUTING_KEY, WEBHOOK_SECRET, SLACK_PATH, "sl4ckT0kenSecret")
SAGA_ID = "0b6c3f3e-5d7a-4b8e-9a49-1f0f3f0c2a11"
CREATED = datetime(2024, 5, 1, 3, 14, 15, tzinfo=UTC)
COMMANDS = (
    f"sagaq show {SAGA_ID}",
    f"sagaq retry {SAGA_ID}",
    f'sagaq resolve {SAGA_ID} --note "..."',
)

PAGE = Notice(
    saga_id=SAGA_ID,
    saga_name="provision_agent",
    kind=Kind.PAGE,
    action=Action.TRIGGER,
    dedup_key=f"sagaq:{SAGA_ID}:compensation:create_identity",
    summary="provision_agent 0b6c3f3e: compensation delete_identity failed; needs a human",
    severity="critical",
    created_at=CREATED,
    state="needs_human",
    details={
        FAILED_COMPENSATION: {
            "step": "delete_identity",
            "error": "HTTP 503 from identity service <idp>: retries & backoff spent",
            "attempt": 4,
        },
        UNCOMPENSATED: ["create_identity", "reserve_quota"],
        TIMELINE: [
            {"at": "03:14:01", "event": "step.succeeded", "step": "create_identity", "detail": ""},
            {"at": "03:14:15", "event": "ladder.level", "step": "delete_identity", "detail": "4"},
        ],
        LINKS: [{"href": "https://runbooks.example/sagaq", "text": "runbook"}],
        "attempts": 4,
    },
    commands=COMMANDS,
)
RESOLVE = replace(PAGE, action=Action.RESOLVE, state="resolved", note="fixed the IdP by hand")
NOTIFY = replace(
    PAGE, kind=Kind.NOTIFY, severity="warning", state="compensated", details={}, dedup_key="n-1"
)


# --------------------------------------------------------------------------- the local server


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0  # seconds to sleep before answering (for client timeouts)


class Recorder:
    """A loopback HTTP endpoint: records requests, answers with the scripted replies in order."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with recorder._lock:
                    recorder.requests.append(
                        Request(
                            "POST",
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                        )
                    )
                    reply = recorder._script.pop(0) if recorder._script else Reply()
                if reply.delay:
                    time.sleep(reply.delay)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and hung up is expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, *replies: Reply | int) -> None:
        with self._lock:
            self._script.extend(r if isinstance(r, Reply) else Reply(r) for r in replies)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback traffic must not go through a proxy
    recorder = Recorder()
    recorder.thread.start()
    yield recorder
    recorder.server.shutdown()
    recorder.server.server_close()
    recorder.thread.join(timeout=5)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pagerduty(base: str, **kw: Any) -> PagerDutyNotifier:
    return PagerDutyNotifier(ROUTING_KEY, url=base + "/v2/enqueue", source="worker-1", **kw)


def slack(base: str, **kw: Any) -> SlackNotifier:
    return SlackNotifier(base + SLACK_PATH, **kw)


def webhook(base: str, **kw: Any) -> WebhookNotifier:
    return WebhookNotifier(base + "/hooks/sagaq", WEBHOOK_SECRET, **kw)


FACTORIES: dict[str, Callable[..., Notifier]] = {
    "pagerduty": pagerduty,
    "slack": slack,
    "webhook": webhook,
}
OWN_SECRET = {"pagerduty": ROUTING_KEY, "slack": SLACK_PATH, "webhook": WEBHOOK_SECRET}


def assert_no_secret(error: BaseException) -> None:
    rendered = "".join(traceback.format_exception(error)) + repr(error) + str(error)
    for secret in SECRETS:
        assert secret not in rendered


def deliver(notifier: Notifier, notice: Notice = PAGE) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        notifier.send(notice)
    assert_no_secret(caught.value)
    return caught.value


# --------------------------------------------------------------------------- PagerDuty


def test_pagerduty_trigger_payload(server: Recorder) -> None:
    server.script(Reply(202, {"Content-Type": "application/json"}, b'{"status":"success"}'))
    notifier = pagerduty(
        server.url(""), link_template="https://ops.example/sagas/{saga_id}?name={saga_name}"
    )
    notifier.send(PAGE)

    (request,) = server.requests
    assert request.path == "/v2/enqueue"
    assert request.headers["content-type"] == "application/json"
    event = request.json()
    assert set(event) == {"routing_key", "event_action", "dedup_key", "payload", "links"}
    assert event["routing_key"] == ROUTING_KEY
    assert event["event_action"] == "trigger"
    assert event["dedup_key"] == PAGE.dedup_key
    payload = event["payload"]
    assert set(payload) == {
        "summary", "source", "severity", "timestamp", "component", "group", "class",
        "custom_details",
    }  # fmt: skip
    assert payload["summary"] == PAGE.summary
    assert payload["source"] == "worker-1"
    assert payload["severity"] == "critical"
    assert datetime.fromisoformat(payload["timestamp"]) == CREATED
    assert (payload["component"], payload["group"]) == ("sagaq", "provision_agent")
    assert payload["class"] == "compensation_failed"
    details = payload["custom_details"]
    assert details["commands"] == list(COMMANDS)
    assert details[FAILED_COMPENSATION] == PAGE.details[FAILED_COMPENSATION]
    assert details[UNCOMPENSATED] == ["create_identity", "reserve_quota"]
    assert details[TIMELINE] == PAGE.details[TIMELINE]
    assert (details["saga_id"], details["saga_name"], details["state"]) == (
        SAGA_ID, "provision_agent", "needs_human",
    )  # fmt: skip
    assert details["attempts"] == 4
    assert LINKS not in details  # links travel in the event's own "links"
    assert event["links"] == [
        {
            "href": f"https://ops.example/sagas/{SAGA_ID}?name=provision_agent",
            "text": f"saga {SAGA_ID}",
        },
        {"href": "https://runbooks.example/sagaq", "text": "runbook"},
    ]


def test_pagerduty_resolve_payload_reuses_routing_and_dedup_key(server: Recorder) -> None:
    server.script(202, 202)
    notifier = pagerduty(server.url(""))
    notifier.send(PAGE)
    notifier.send(RESOLVE)
    trigger, resolve = (r.json() for r in server.requests)
    assert resolve == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": trigger["dedup_key"],
    }


def test_pagerduty_class_follows_what_failed(server: Recorder) -> None:
    server.script(202, 202)
    notifier = pagerduty(server.url(""))
    notifier.send(replace(PAGE, details={FAILED_STEP: {"step": "charge_card", "error": "x"}}))
    notifier.send(replace(PAGE, details={}))
    classes = [r.json()["payload"]["class"] for r in server.requests]
    assert classes == ["step_failed_after_pivot", "needs_human"]


def test_pagerduty_takes_pages_only(server: Recorder) -> None:
    notifier = pagerduty(server.url(""))
    assert notifier.kinds == frozenset({Kind.PAGE})
    notifier.send(NOTIFY)
    assert server.requests == []


def test_pagerduty_long_dedup_key_is_shortened_deterministically(server: Recorder) -> None:
    long_key = "sagaq:" + "x" * 300
    other = long_key + "y"  # same first 255 characters: must still differ
    server.script(202, 202, 202)
    notifier = pagerduty(server.url(""))
    notifier.send(replace(PAGE, dedup_key=long_key))
    notifier.send(replace(RESOLVE, dedup_key=long_key))
    notifier.send(replace(PAGE, dedup_key=other))
    first, resolve, second = (r.json()["dedup_key"] for r in server.requests)
    assert len(first) == 255 and first == resolve == pagerduty_dedup_key(long_key)
    assert first.startswith(long_key[:190])
    assert len(second) == 255 and second != first
    assert pagerduty_dedup_key("short-key") == "short-key"
    assert pagerduty_dedup_key("k" * 255) == "k" * 255


def test_pagerduty_refuses_an_empty_dedup_key(server: Recorder) -> None:
    error = deliver(pagerduty(server.url("")), replace(PAGE, dedup_key=""))
    assert not error.retryable
    assert server.requests == []


def test_pagerduty_clips_summary_and_normalises_severity(server: Recorder) -> None:
    server.script(202)
    pagerduty(server.url("")).send(replace(PAGE, summary="s" * 2000, severity="page-now"))
    payload = server.requests[0].json()["payload"]
    assert len(payload["summary"]) == 1024
    assert payload["severity"] == "critical"


def test_pagerduty_oversized_details_are_compacted_not_refused(server: Recorder) -> None:
    huge = replace(PAGE, details={**PAGE.details, "blob": "z" * 600_000})
    server.script(202)
    pagerduty(server.url("")).send(huge)
    (request,) = server.requests
    assert len(request.body) < 512 * 1024
    details = request.json()["payload"]["custom_details"]
    assert details["truncated"] is True and "blob" not in details
    assert details["commands"] == list(COMMANDS)
    assert details[FAILED_COMPENSATION]["step"] == "delete_identity"
    assert details[TIMELINE] == PAGE.details[TIMELINE]


# --------------------------------------------------------------------------- Slack


def _all_text(blocks: list[dict[str, Any]]) -> str:
    return json.dumps(blocks)


def test_slack_page_message(server: Recorder) -> None:
    slack(server.url(""), link_template="https://ops.example/sagas/{saga_id}").send(PAGE)
    (request,) = server.requests
    assert request.path == SLACK_PATH
    assert request.headers["content-type"] == "application/json"
    message = request.json()
    assert set(message) == {"text", "blocks"}
    assert "provision_agent" in message["text"] and SAGA_ID in message["text"]
    blocks = message["blocks"]
    assert blocks[0]["type"] == "header"
    assert blocks[0]["text"]["type"] == "plain_text" and len(blocks[0]["text"]["text"]) <= 150
    assert all(b["type"] in {"header", "section", "context"} for b in blocks)
    texts = [b["text"]["text"] for b in blocks if b["type"] == "section" and "text" in b]
    commands = next(t for t in texts if "sagaq show" in t)
    assert "```\n" + "\n".join(COMMANDS) + "\n```" in commands
    everything = _all_text(blocks)
    assert "*Failed compensation:* `delete_identity` (attempt 4)" in everything
    assert "identity service &lt;idp&gt;: retries &amp; backoff spent" in everything  # escaped
    assert "`create_identity`, `reserve_quota`" in everything
    assert "03:14:15 ladder.level delete_identity 4" in everything
    assert "Failed step" not in everything
    assert f"https://ops.example/sagas/{SAGA_ID}" in everything
    assert "needs_human" in everything
    assert "Resolved" not in everything


def test_slack_page_after_the_pivot_names_the_failed_step(server: Recorder) -> None:
    after_pivot = replace(PAGE, details={FAILED_STEP: "charge_card", UNCOMPENSATED: []})
    slack(server.url("")).send(after_pivot)
    everything = _all_text(server.requests[0].json()["blocks"])
    assert "*Failed step:* `charge_card`" in everything
    assert "*Still uncompensated:* none" in everything
    assert "Failed compensation" not in everything


def test_slack_resolve_message_says_resolved(server: Recorder) -> None:
    slack(server.url("")).send(RESOLVE)
    message = server.requests[0].json()
    assert message["text"].startswith("Resolved")
    assert message["blocks"][0]["text"]["text"].startswith("Resolved")
    everything = _all_text(message["blocks"])
    assert "*Resolved.*" in everything
    assert "fixed the IdP by hand" in everything


def test_slack_takes_notifies_too(server: Recorder) -> None:
    slack(server.url("")).send(NOTIFY)
    message = server.requests[0].json()
    assert message["text"].startswith("Notice")
    assert "sagaq retry" in _all_text(message["blocks"])


# --------------------------------------------------------------------------- webhook


def test_webhook_body_and_signature(server: Recorder) -> None:
    webhook(server.url("")).send(PAGE)
    (request,) = server.requests
    assert request.path == "/hooks/sagaq"
    assert request.headers["content-type"] == "application/json"
    signature = request.headers["x-sagaq-signature"]
    assert signature.startswith("sha256=")
    assert verify_signature(WEBHOOK_SECRET, request.body, signature)
    assert verify_signature(WEBHOOK_SECRET.encode(), request.body, signature)

    body = request.json()
    assert body == notice_to_dict(PAGE)
    assert set(body) == {
        "id", "saga_id", "saga_name", "kind", "action", "dedup_key", "summary", "severity",
        "created_at", "state", "details", "commands", "note",
    }  # fmt: skip
    assert (body["kind"], body["action"]) == ("page", "trigger")
    assert datetime.fromisoformat(body["created_at"]) == CREATED
    assert body["commands"] == list(COMMANDS)

    tampered = request.body.replace(b"needs_human", b"compensated")
    assert tampered != request.body
    assert not verify_signature(WEBHOOK_SECRET, tampered, signature)
    assert not verify_signature("another-secret-0123456", request.body, signature)
    assert not verify_signature(WEBHOOK_SECRET, request.body, signature.removeprefix("sha256="))
    assert not verify_signature(WEBHOOK_SECRET, request.body, "sha256=" + "0" * 64)
    assert not verify_signature(WEBHOOK_SECRET, request.body, None)
    assert WEBHOOK_SECRET.encode() not in request.body


def test_webhook_takes_notifies_and_resolves(server: Recorder) -> None:
    notifier = webhook(server.url(""))
    notifier.send(NOTIFY)
    notifier.send(RESOLVE)
    notify, resolve = server.requests
    assert (notify.json()["kind"], resolve.json()["action"]) == ("notify", "resolve")
    assert resolve.json()["note"] == "fixed the IdP by hand"
    for request in (notify, resolve):
        assert verify_signature(WEBHOOK_SECRET, request.body, request.headers["x-sagaq-signature"])


# --------------------------------------------------------------------------- retry classification


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_status_classification(server: Recorder, name: str) -> None:
    echo = OWN_SECRET[name].encode()  # a server that echoes the credential must not leak it
    server.script(
        Reply(500, body=b"internal error " + echo),
        Reply(429, {"Retry-After": "2"}, b"rate limited"),
        Reply(503, {"Retry-After": "7"}, b"maintenance"),
        Reply(400, body=b'{"status":"invalid event","errors":["' + echo + b'"]}' + b"x" * 500),
        Reply(404, body=b"no_service"),
        Reply(301, {"Location": "http://elsewhere.example/"}, b""),
        Reply(202),
    )
    notifier = FACTORIES[name](server.url(""))

    error = deliver(notifier)
    assert (error.retryable, error.status, error.retry_after) == (True, 500, None)
    assert "500" in str(error) and f"127.0.0.1:{server.port}" in str(error)

    error = deliver(notifier)
    assert (error.retryable, error.status, error.retry_after) == (True, 429, 2.0)

    error = deliver(notifier)
    assert (error.retryable, error.status, error.retry_after) == (True, 503, 7.0)

    error = deliver(notifier)
    assert (error.retryable, error.status) == (False, 400)
    assert "400" in str(error) and "invalid event" in str(error)
    assert len(str(error)) < 400  # the body is cut short

    error = deliver(notifier)
    assert (error.retryable, error.status) == (False, 404)

    error = deliver(notifier)
    assert (error.retryable, error.status) == (False, 301)

    notifier.send(PAGE)  # 202: delivered
    assert len(server.requests) == 7


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_connection_refused_is_retryable(closed_port: int, name: str) -> None:
    error = deliver(FACTORIES[name](f"http://127.0.0.1:{closed_port}"))
    assert error.retryable and error.status is None
    assert f"127.0.0.1:{closed_port}" in str(error)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_timeout_is_retryable(server: Recorder, name: str) -> None:
    server.script(Reply(202, delay=2.0))
    started = time.monotonic()
    error = deliver(FACTORIES[name](server.url(""), timeout=0.3))
    assert time.monotonic() - started < 1.5
    assert error.retryable and error.status is None
    assert "timed out" in str(error)


def test_post_json_with_a_caller_client_leaves_it_open(server: Recorder) -> None:
    server.script(202, 500)
    with httpx.Client() as client:
        response = post_json(server.url("/x"), {"a": 1}, client=client)
        assert response.status_code == 202
        with pytest.raises(DeliveryError) as caught:
            post_json(server.url("/x"), {"a": 2}, client=client)
        assert caught.value.retryable
        assert not client.is_closed
    assert [r.body for r in server.requests] == [b'{"a":1}', b'{"a":2}']


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("2", 2.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("soon", None),
        ("nan", None),
        (format_datetime(datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC), usegmt=True), 30.0),
        (format_datetime(datetime(2029, 12, 31, tzinfo=UTC), usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected


def test_parse_retry_after_http_date_is_relative_to_now() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=60)
    seconds = parse_retry_after(format_datetime(soon, usegmt=True))
    assert seconds is not None and 55 <= seconds <= 60
