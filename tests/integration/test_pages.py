"""Level-4 pages from a real saga to a real local HTTP server, through the outbox and a worker.

A runtime of its own (its own Celery queue, its own embedded worker) is configured with every
built-in notifier pointing at one loopback ``ThreadingHTTPServer``: PagerDuty Events v2, a
signed webhook and a Slack incoming webhook. The server records each request and answers from a
script chosen per saga and channel, so a test can make one pager fail without touching others.
Nothing is mocked: the notifiers open real sockets, the deliveries are real Celery tasks.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from celery import signals

from sagaq import Runtime, SagaState, StepStatus
from sagaq.commands import resolve, retry, story
from sagaq.errors import ConfigurationError
from sagaq.machine import Direction
from sagaq.notify import (
    LogNotifier,
    PagerDutyNotifier,
    SlackNotifier,
    WebhookNotifier,
    verify_signature,
)
from sagaq.notify.webhook import SIGNATURE_HEADER
from sagaq.store import NotificationRecord
from sagaq.worker import embedded_worker
from tests import sagas as test_sagas
from tests.sagas import ledger

ROUTING_KEY = "PgR0ut1ngK3y0f32LettersAndD1g1ts"
WEBHOOK_SECRET = "pages-webhook-shared-secret-0123"
SLACK_TOKEN = "sl4ckPagesT0kenSecret"
SLACK_PATH = f"/services/T0PAGES/B0PAGES/{SLACK_TOKEN}"
SECRETS = (ROUTING_KEY, WEBHOOK_SECRET, SLACK_TOKEN)
CHANNELS = ("log", "pagerduty", "slack", "webhook")
PATHS = {"/v2/enqueue": "pagerduty", SLACK_PATH: "slack", "/hooks/sagaq": "webhook"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BROKEN_UNDO = {"simulate": {"fail": "s3", "fail_compensation": "s1"}}

assert len(ROUTING_KEY) == 32 and ROUTING_KEY.isalnum()


# --------------------------------------------------------------------------- the local server


@dataclass
class Request:
    channel: str
    saga_id: str | None  # the first saga id in the body
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 202
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"status":"success"}'


@dataclass
class Script:
    replies: list[Reply]
    then: Reply  # once the replies are used up


class Server:
    """One loopback endpoint for all three channels; replies scripted per (saga, channel)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.scripts: dict[tuple[str, str], Script] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                channel = PATHS.get(self.path, f"unknown:{self.path}")
                found = UUID.search(body.decode("utf-8", "replace"))
                saga_id = found.group(0) if found else None
                with server.lock:
                    server.requests.append(
                        Request(
                            channel, saga_id, {k.lower(): v for k, v in self.headers.items()}, body
                        )
                    )
                    script = server.scripts.get((saga_id or "", channel))
                    reply = Reply(200 if channel == "slack" else 202)
                    if script is not None:
                        reply = script.replies.pop(0) if script.replies else script.then
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Threading(ThreadingHTTPServer):
            daemon_threads = True

        self.http = Threading(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(
            target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def script(self, saga_id: str, channel: str, *replies: Reply | int, then: Reply | int = 202):
        def reply(r: Reply | int) -> Reply:
            return r if isinstance(r, Reply) else Reply(r)

        with self.lock:
            self.scripts[(saga_id, channel)] = Script([reply(r) for r in replies], reply(then))

    def of(self, saga_id: str, channel: str | None = None) -> list[Request]:
        with self.lock:
            return [
                r
                for r in self.requests
                if r.saga_id == saga_id and (channel is None or r.channel == channel)
            ]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                    "all_proxy"):  # fmt: skip
            mp.delenv(var, raising=False)  # loopback traffic must not go through a proxy
        s = Server()
        s.thread.start()
        yield s
        s.http.shutdown()
        s.http.server_close()
        s.thread.join(timeout=5)


@pytest.fixture(scope="module")
def rt(settings, server: Server) -> Iterator[Runtime]:
    """A runtime paging through every built-in notifier, on a queue of its own."""
    runtime = Runtime(
        settings.with_(queue=f"{settings.queue}-pages"),
        notifiers=[
            LogNotifier(),
            PagerDutyNotifier(
                ROUTING_KEY, url=server.base + "/v2/enqueue", source="sagaq-pages-test"
            ),
            WebhookNotifier(server.base + "/hooks/sagaq", WEBHOOK_SECRET),
            SlackNotifier(server.base + SLACK_PATH),
        ],
    )
    with embedded_worker(runtime.app, concurrency=4, hostname="pages@test"):
        yield runtime
    runtime.close()


@pytest.fixture(autouse=True)
def _undo_is_broken() -> Iterator[None]:
    test_sagas.repaired.clear()
    yield
    test_sagas.repaired.clear()


# --------------------------------------------------------------------------- helpers


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def wait_state(rt: Runtime, saga_id: str, state: SagaState) -> None:
    wait_for(f"saga {saga_id} to be {state.value}",
             lambda: rt.store.get_saga_or_raise(saga_id).state is state)  # fmt: skip


def delivered(rt: Runtime, saga_id: str, count: int | None = None) -> list[NotificationRecord]:
    """The saga's notifications once every one is sent or failed (and ``count`` exist)."""

    def done() -> bool:
        found = rt.store.notifications(saga_id)
        enough = len(found) >= count if count is not None else bool(found)
        if enough and all(n.status in ("sent", "failed") for n in found):
            return True
        # A retry whose backoff is longer than SAGAQ_COUNTDOWN_MAX waits in PostgreSQL:
        # the reconciler (beat, in a deployment) publishes it when it is due.
        rt.reconcile()
        return False

    wait_for("the notifications to be delivered", done)
    return rt.store.notifications(saga_id)


def pages_of(notes: list[NotificationRecord], action: str = "trigger") -> dict[str, Any]:
    return {n.channel: n for n in notes if n.kind == "page" and n.action == action}


def slack_pages(server: Server, saga_id: str) -> list[dict[str, Any]]:
    return [r.json() for r in server.of(saga_id, "slack") if r.json()["text"].startswith("Page:")]


def webhook_pages(server: Server, saga_id: str) -> list[Request]:
    return [r for r in server.of(saga_id, "webhook") if r.json()["kind"] == "page"]


def events(rt: Runtime, saga_id: str, kind: str) -> list[Any]:
    return [e for e in rt.store.events(saga_id) if e.kind == kind]


def as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def needs_human(rt: Runtime, saga: str = "quad", inp: dict[str, Any] | None = None) -> str:
    saga_id = rt.engine.enqueue(saga, BROKEN_UNDO if inp is None else inp)
    wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)
    return saga_id


# --------------------------------------------------------------------------- the page


def test_a_failed_compensation_pages_every_channel_once_with_what_to_do(rt, server):
    saga_id = needs_human(rt)
    notes = delivered(rt, saga_id, count=len(CHANNELS) + 3)  # + the rollback notice (no PD)
    pages = pages_of(notes)
    assert sorted(pages) == sorted(CHANNELS)
    assert {(n.status, n.incident, n.attempts) for n in pages.values()} == {("sent", 1, 1)}
    dedup = f"sagaq/{saga_id}/incident-1"
    assert {n.dedup_key for n in pages.values()} == {dedup}

    # PagerDuty Events v2: one trigger, and no notice (PagerDuty takes pages only)
    (pd,) = server.of(saga_id, "pagerduty")
    event = pd.json()
    assert event["routing_key"] == ROUTING_KEY
    assert event["event_action"] == "trigger"
    assert event["dedup_key"] == dedup
    payload = event["payload"]
    assert saga_id[:8] in payload["summary"] and "s1" in payload["summary"]
    assert payload["source"] == "sagaq-pages-test"
    assert payload["severity"] == "critical"
    assert datetime.fromisoformat(payload["timestamp"]) == as_utc(pages["pagerduty"].created_at)
    details = payload["custom_details"]
    failed = details["failed_compensation"]
    assert failed["step"] == "s1" and "503" in failed["error"]
    assert failed["attempt"] == rt.settings.compensation_retries + 1
    assert details["uncompensated"] == ["s1"]  # s2 was undone before s1's undo failed
    assert (details["saga_id"], details["saga_name"], details["state"]) == (
        saga_id, "quad", "needs_human",
    )  # fmt: skip
    timeline = details["timeline"]
    assert timeline and all({"at", "event", "step", "detail"} <= set(e) for e in timeline)
    seen = [e["event"] for e in timeline]
    assert "compensation.failed" in seen and "saga.needs_human" in seen
    commands = details["commands"]
    assert commands[:2] == [f"sagaq show {saga_id}", f"sagaq retry {saga_id}"]
    assert commands[2].startswith(f"sagaq resolve {saga_id} --note ")

    # Slack: one page (plus the earlier non-paging rollback notice), text + blocks
    (message,) = slack_pages(server, saga_id)
    assert saga_id in message["text"]
    rendered = json.dumps(message["blocks"])
    assert message["blocks"][0]["type"] == "header"
    for command in commands:
        assert json.dumps(command)[1:-1] in rendered, command
    assert "s1" in rendered and "503" in rendered
    notices = [r for r in server.of(saga_id, "slack") if r.json()["text"].startswith("Notice:")]
    assert len(notices) == 1

    # Webhook: one signed page
    (hook,) = webhook_pages(server, saga_id)
    signature = hook.headers[SIGNATURE_HEADER.lower()]
    assert verify_signature(WEBHOOK_SECRET, hook.body, signature)
    assert not verify_signature("another-secret-0123456789", hook.body, signature)
    body = hook.json()
    assert (body["dedup_key"], body["action"], body["commands"]) == (dedup, "trigger", commands)

    # Nothing secret anywhere: the routing key only in PagerDuty's routing_key field
    for request in server.of(saga_id):
        headers = json.dumps(request.headers)
        for secret in SECRETS:
            assert secret not in headers, (request.channel, secret)
        text = request.body.decode()
        assert WEBHOOK_SECRET not in text and SLACK_TOKEN not in text, request.channel
        if request.channel == "pagerduty":
            rest = {k: v for k, v in request.json().items() if k != "routing_key"}
            assert ROUTING_KEY not in json.dumps(rest)
        else:
            assert ROUTING_KEY not in text, request.channel
    stored = json.dumps(
        [(e.message, e.data) for e in rt.store.events(saga_id)]
        + [(n.last_error, n.note) for n in rt.store.notifications(saga_id)]
    )
    for secret in SECRETS:
        assert secret not in stored
    assert story(rt.store, saga_id).pages() == 1


def test_redelivered_notify_messages_never_page_twice(rt, server):
    saga_id = needs_human(rt)
    notes = delivered(rt, saga_id, count=len(CHANNELS) + 3)
    before = len(server.of(saga_id))
    finished: dict[str, Any] = {}

    def note(task_id: str | None = None, retval: Any = None, **_: Any) -> None:
        finished[str(task_id)] = retval

    signals.task_postrun.connect(note, weak=False)
    try:
        sent = []
        for n in notes:
            for _ in range(2):  # a duplicate publish and a broker redelivery, say
                task_id = str(uuid.uuid4())
                rt.app.send_task(
                    "sagaq.notify", args=[saga_id, n.id], task_id=task_id, queue=rt.settings.queue
                )
                sent.append(task_id)
        wait_for("every redelivery to run", lambda: all(t in finished for t in sent))
    finally:
        signals.task_postrun.disconnect(note)

    assert all(str(finished[t]).startswith("dropped") for t in sent), finished
    assert len(server.of(saga_id)) == before
    assert len(server.of(saga_id, "pagerduty")) == 1
    assert rt.store.notifications(saga_id) == notes  # same rows, same attempts, same status
    assert story(rt.store, saga_id).pages() == 1


# --------------------------------------------------------------------------- delivery retries


def test_500_and_429_are_retried_until_the_pager_accepts(rt, server):
    saga_id = rt.engine.enqueue("quad", BROKEN_UNDO)
    server.script(saga_id, "pagerduty", 500, Reply(429, {"Retry-After": "1"}, b"slow down"), 202)
    wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)
    pd = pages_of(delivered(rt, saga_id, count=len(CHANNELS) + 3))["pagerduty"]

    assert (pd.status, pd.attempts) == ("sent", 3)
    triggers = [r.json() for r in server.of(saga_id, "pagerduty")]
    assert [(t["event_action"], t["dedup_key"]) for t in triggers] == [
        ("trigger", pd.dedup_key)
    ] * 3
    retries = [e for e in events(rt, saga_id, "page.retry") if e.data["channel"] == "pagerduty"]
    assert [e.data["attempt"] for e in retries] == [1, 2]
    assert "500" in retries[0].message and "429" in retries[1].message
    sent = [e for e in events(rt, saga_id, "page.sent") if e.data["channel"] == "pagerduty"]
    assert [e.data["attempt"] for e in sent] == [3]
    assert rt.store.count_outbox(saga_id) == 0


def test_400_is_not_retried_and_is_recorded_as_a_failed_delivery(rt, server):
    saga_id = rt.engine.enqueue("quad", BROKEN_UNDO)
    server.script(saga_id, "pagerduty", Reply(400, body=b'{"status":"invalid event"}'))
    wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)
    pages = pages_of(delivered(rt, saga_id, count=len(CHANNELS) + 3))

    pd = pages["pagerduty"]
    assert (pd.status, pd.attempts) == ("failed", 1)
    assert pd.last_error is not None and "400" in pd.last_error
    assert len(server.of(saga_id, "pagerduty")) == 1
    assert [e.data["channel"] for e in events(rt, saga_id, "page.failed")] == ["pagerduty"]
    assert [e for e in events(rt, saga_id, "page.retry") if e.data["channel"] == "pagerduty"] == []
    assert rt.store.count_outbox(saga_id) == 0  # nothing left to re-publish
    # the other channels still carried the page
    assert {c: n.status for c, n in pages.items() if c != "pagerduty"} == {
        "log": "sent", "slack": "sent", "webhook": "sent",
    }  # fmt: skip


def test_a_broken_pager_never_stalls_the_engine(rt, server):
    broken = rt.engine.enqueue("quad", BROKEN_UNDO)
    server.script(broken, "pagerduty", then=500)  # PagerDuty is down for good
    wait_state(rt, broken, SagaState.NEEDS_HUMAN)

    def failing() -> bool:
        pd = pages_of(rt.store.notifications(broken)).get("pagerduty")
        return pd is not None and pd.attempts >= 1 and "500" in (pd.last_error or "")

    wait_for("the pager to fail once", failing)
    other = rt.engine.enqueue("quad", {})
    wait_state(rt, other, SagaState.COMPLETED)

    assert [c.step for c in ledger.effects(saga_id=other, op="do")] == ["s1", "s2", "s3", "s4"]
    pd = pages_of(rt.store.notifications(broken))["pagerduty"]
    assert pd.status in ("pending", "sending")  # still being retried, not given up, not sent
    assert len(server.of(broken, "pagerduty")) >= 1
    assert all(r.json()["event_action"] == "trigger" for r in server.of(broken, "pagerduty"))


# --------------------------------------------------------------------------- operators


def test_resolve_closes_the_incident_with_the_same_dedup_key(rt, server):
    saga_id = needs_human(rt)
    delivered(rt, saga_id, count=len(CHANNELS) + 3)
    (trigger,) = [r.json() for r in server.of(saga_id, "pagerduty")]

    note = "deleted s1's record by hand in the console"
    outcome = resolve(rt, saga_id, by="alice", note=note)
    assert outcome.won and outcome.state is SagaState.RESOLVED
    record = rt.store.get_saga_or_raise(saga_id)
    assert record.state is SagaState.RESOLVED and record.finished_at is not None

    notes = delivered(rt, saga_id, count=2 * len(CHANNELS) + 3)
    assert {c: n.status for c, n in pages_of(notes, "resolve").items()} == {
        c: "sent" for c in CHANNELS
    }
    triggered, resolved = (r.json() for r in server.of(saga_id, "pagerduty"))
    assert triggered == trigger
    assert resolved == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": trigger["dedup_key"],
    }
    (slack_resolve,) = [
        r.json() for r in server.of(saga_id, "slack") if r.json()["text"].startswith("Resolved:")
    ]
    assert note in json.dumps(slack_resolve["blocks"])
    (op,) = events(rt, saga_id, "operator.resolve")
    assert op.data == {"by": "alice", "note": note}
    assert "alice" in op.message and note in op.message
    assert [e.kind for e in rt.store.events(saga_id) if e.kind.startswith("saga.")][-1] == (
        "saga.resolved"
    )
    assert story(rt.store, saga_id).pages() == 1


def test_retry_runs_the_remaining_compensations_and_resolves_the_old_page(rt, server):
    saga_id = needs_human(rt, "stubborn", {"simulate": {"fail": "third"}})
    delivered(rt, saga_id, count=len(CHANNELS) + 3)
    assert rt.store.uncompensated(saga_id) == ["first"]
    assert [c.step for c in ledger.effects(saga_id=saga_id, op="undo")] == ["second"]

    test_sagas.repaired.set()  # the remote system is back
    outcome = retry(rt, saga_id, by="bob", note="the IdP is back")
    assert outcome.state is SagaState.COMPENSATING
    wait_state(rt, saga_id, SagaState.COMPENSATED)

    assert [c.step for c in ledger.effects(saga_id=saga_id, op="undo")] == ["second", "first"]
    undo = [
        (r.step, r.status)
        for r in rt.store.step_runs(saga_id)
        if r.direction is Direction.COMPENSATE and r.status is StepStatus.SUCCEEDED
    ]
    assert undo == [("second", StepStatus.SUCCEEDED), ("first", StepStatus.SUCCEEDED)]
    assert rt.store.uncompensated(saga_id) == []
    (op,) = events(rt, saga_id, "operator.retry")
    assert op.data == {"by": "bob", "note": "the IdP is back"}

    notes = delivered(rt, saga_id, count=2 * len(CHANNELS) + 3)
    assert {c: (n.status, n.incident) for c, n in pages_of(notes, "resolve").items()} == {
        c: ("sent", 1) for c in CHANNELS
    }
    pd = [(e["event_action"], e["dedup_key"]) for e in (r.json() for r in server.of(saga_id))
          if "event_action" in e]  # fmt: skip
    assert pd == [("trigger", f"sagaq/{saga_id}/incident-1"),
                  ("resolve", f"sagaq/{saga_id}/incident-1")]  # fmt: skip
    assert rt.store.get_saga_or_raise(saga_id).incident == 1


def test_a_second_failure_after_retry_is_a_new_incident_with_a_new_page(rt, server):
    saga_id = needs_human(rt, "stubborn", {"simulate": {"fail": "third"}})
    delivered(rt, saga_id, count=len(CHANNELS) + 3)

    retry(rt, saga_id, by="bob", note="try once more")  # the undo still fails
    wait_for(
        "the second incident",
        lambda: (
            rt.store.get_saga_or_raise(saga_id).incident == 2
            and rt.store.get_saga_or_raise(saga_id).state is SagaState.NEEDS_HUMAN
        ),
    )
    notes = delivered(rt, saga_id, count=3 * len(CHANNELS) + 3)

    first, second = f"sagaq/{saga_id}/incident-1", f"sagaq/{saga_id}/incident-2"
    triggers = [n for n in notes if n.kind == "page" and n.action == "trigger"]
    assert sorted((n.incident, n.channel, n.dedup_key, n.status) for n in triggers) == sorted(
        [(1, c, first, "sent") for c in CHANNELS] + [(2, c, second, "sent") for c in CHANNELS]
    )
    pd = sorted((r.json()["event_action"], r.json()["dedup_key"])
                for r in server.of(saga_id, "pagerduty"))  # fmt: skip
    assert pd == [("resolve", first), ("trigger", first), ("trigger", second)]
    assert len(slack_pages(server, saga_id)) == 2
    assert story(rt.store, saga_id).pages() == 2
    # the retried undo had a fresh budget: its own ladder again, then one more page
    undo_first = [
        r for r in rt.store.step_runs(saga_id)
        if r.direction is Direction.COMPENSATE and r.step == "first"
    ]  # fmt: skip
    budget = rt.settings.compensation_retries + 1
    assert [r.attempt for r in undo_first] == [*range(1, budget + 1), *range(1, budget + 1)]


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SAGAQ_PAGERDUTY_ROUTING_KEY": "short"}, "SAGAQ_PAGERDUTY_ROUTING_KEY"),
        ({"SAGAQ_SLACK_WEBHOOK_URL": "ftp://hooks.example/T0/B0/x"}, "SAGAQ_SLACK_WEBHOOK_URL"),
        ({"SAGAQ_WEBHOOK_URL": "https://hooks.example/sagaq"}, "SAGAQ_WEBHOOK_SECRET"),
    ],
    ids=["pagerduty_key", "slack_url", "webhook_without_secret"],
)
def test_a_misconfigured_notifier_fails_at_start_up_naming_the_variable(
    settings, monkeypatch, env, named
):
    for var in ("SAGAQ_WEBHOOK_URL", "SAGAQ_WEBHOOK_SECRET", "SAGAQ_SLACK_WEBHOOK_URL",
                "SAGAQ_PAGERDUTY_ROUTING_KEY", "SAGAQ_PAGERDUTY_URL", "SAGAQ_PAGERDUTY_SOURCE",
                "SAGAQ_SAGA_URL_TEMPLATE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)

    with pytest.raises(ConfigurationError) as caught:
        Runtime(settings)
    message = caught.value.message
    assert named in message
    for value in env.values():
        assert value not in message  # credentials are named, never echoed
