"""The on-call operator at the command line: `sagaq retry`, `sagaq resolve`, `sagaq reconcile`.

Each command runs as a real ``python -m sagaq`` subprocess against this run's database and
Redis key space; the steps it sets going are run by the session's worker.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sagaq import Runtime, SagaState
from sagaq.store import NotificationRecord
from tests.acceptance.test_cli import cli, env_for

BROKEN_UNDO = {"simulate": {"fail": "s3", "fail_compensation": "s1"}}
UNKNOWN = "0badc0de-0000-4000-8000-000000000000"


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def delivered(runtime: Runtime, saga_id: str, count: int) -> list[NotificationRecord]:
    def done() -> bool:
        found = runtime.store.notifications(saga_id)
        return len(found) >= count and all(n.status in ("sent", "failed") for n in found)

    wait_for(f"{count} notifications to be delivered", done)
    return runtime.store.notifications(saga_id)


def pages(notes: list[NotificationRecord]) -> list[tuple[int, str, str]]:
    return [(n.incident, n.action, n.status) for n in notes if n.kind == "page"]


def operator_events(runtime: Runtime, saga_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (e.kind, e.data) for e in runtime.store.events(saga_id) if e.kind.startswith("operator.")
    ]


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_retry_then_resolve_a_saga_that_needs_a_human(runtime, worker, settings, wait_settled):
    env = env_for(settings)
    saga_id = runtime.engine.enqueue("quad", BROKEN_UNDO)
    assert wait_settled(saga_id) == [SagaState.NEEDS_HUMAN]
    delivered(runtime, saga_id, count=2)  # the rollback notice and the page (log channel)

    # retry: the remaining compensation runs again; s1's undo still fails, so it pages again
    done = cli("retry", saga_id, "--by", "alice", "--note", "the vendor says it is back", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{saga_id}: compensating"
    wait_for(
        "the second incident",
        lambda: (
            runtime.store.get_saga_or_raise(saga_id).incident == 2
            and runtime.store.get_saga_or_raise(saga_id).state is SagaState.NEEDS_HUMAN
        ),
    )
    assert pages(delivered(runtime, saga_id, count=4)) == [
        (1, "trigger", "sent"),
        (1, "resolve", "sent"),
        (2, "trigger", "sent"),
    ]
    assert operator_events(runtime, saga_id) == [
        ("operator.retry", {"by": "alice", "note": "the vendor says it is back"})
    ]

    # resolve without --note is a usage error, and changes nothing
    bare = cli("resolve", saga_id, env=env)
    assert bare.returncode == 2
    assert "--note" in bare.stderr
    blank = cli("resolve", saga_id, "--note", "   ", env=env)
    one_line_error(blank, "--note")
    assert runtime.store.get_saga_or_raise(saga_id).state is SagaState.NEEDS_HUMAN

    # resolve, by a unique prefix of the id, as the operator named in the environment
    note = "deleted s1's record by hand"
    done = cli("resolve", saga_id[:13], "--note", note, env={**env, "SAGAQ_OPERATOR": "carol"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": resolved")
    record = runtime.store.get_saga_or_raise(saga_id)
    assert record.state is SagaState.RESOLVED and record.finished_at is not None
    assert operator_events(runtime, saga_id)[-1] == (
        "operator.resolve",
        {"by": "carol", "note": note},
    )
    assert pages(delivered(runtime, saga_id, count=5))[-1] == (2, "resolve", "sent")


def test_operator_commands_on_a_saga_that_needs_no_human_say_its_state(
    runtime, worker, settings, wait_settled
):
    env = env_for(settings)
    saga_id = runtime.engine.enqueue("quad", {})
    assert wait_settled(saga_id) == [SagaState.COMPLETED]
    before = runtime.store.events(saga_id)

    one_line_error(cli("resolve", saga_id, "--note", "nothing to do", env=env), "completed")
    one_line_error(cli("retry", saga_id, "--by", "alice", env=env), "completed")

    assert runtime.store.events(saga_id) == before  # nothing written, not even a notice
    assert runtime.store.notifications(saga_id) == []
    assert runtime.store.get_saga_or_raise(saga_id).state is SagaState.COMPLETED


def test_operator_commands_on_an_unknown_id_are_one_line(settings):
    env = env_for(settings)
    one_line_error(cli("resolve", UNKNOWN, "--note", "x", env=env), "no saga with id", UNKNOWN)
    one_line_error(cli("retry", UNKNOWN, env=env), "no saga with id", UNKNOWN)


def test_reconcile_once_wakes_a_due_wait_and_prints_json(runtime, worker, settings, wait_settled):
    saga_id = runtime.engine.enqueue("sleepy", {"simulate": {"flaky": {"nap": 1}}})
    waiting = SagaState.WAITING
    wait_for("the durable wait", lambda: runtime.store.get_saga_or_raise(saga_id).state is waiting)
    wake_at = runtime.store.get_saga_or_raise(saga_id).wake_at
    assert wake_at is not None
    wait_for("the wake-up time", lambda: datetime.now(UTC) >= wake_at)

    done = cli("reconcile", "--once", env=env_for(settings))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert isinstance(summary["woken"], int) and summary["woken"] >= 1
    assert wait_settled(saga_id) == [SagaState.COMPLETED]
    wakes = [e for e in runtime.store.events(saga_id) if e.data.get("trigger") == "wake"]
    assert [(e.kind, e.worker) for e in wakes] == [("saga.running", "reconciler")]
