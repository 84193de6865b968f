"""The policy gate in front of every dispatch, durable approvals, and the evidence record.

Each test builds runtimes of its own: a policy file written to ``tmp_path``, ``env``
production, a database, a Celery queue and a Redis key prefix no other test uses, an embedded
worker, and the log notifier. The reconciler runs only when a test calls ``rt.reconcile()``,
and sees only this test's sagas. "Wiping Redis" means deleting every key of the test's own
prefix (a FLUSHALL of the shared server would hit other runs).
"""

from __future__ import annotations

import itertools
import json
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from sagaq import Runtime, SagaState, Settings, StepStatus
from sagaq.commands import decide, evidence, retry, story
from sagaq.errors import InputError
from sagaq.machine import Direction
from sagaq.notify import LogNotifier
from sagaq.store import ApprovalRecord, EventRecord, StepRunRecord
from sagaq.worker import embedded_worker
from tests.acceptance.test_cli import cli, env_for
from tests.integration.test_waits import keys_holding
from tests.sagas import ledger

_databases = itertools.count(1)

ASK_S3 = """
version: v1
rules:
  - id: allow-quad
    when: {saga: quad}
    decision: allow
  - id: ask-before-s3
    description: s3 needs a person
    when: {saga: quad, step: s3, direction: forward, env: production}
    decision: require_human
"""
FAIL_S4 = {"simulate": {"fail": "s4"}}


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def redis_client(redis_base_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_base_url)
    yield client
    client.close()


@pytest.fixture
def base_settings(settings: Settings, make_database, redis_prefix: str) -> Settings:
    """A database, a queue and a key prefix of this test's own."""
    tag = uuid.uuid4().hex[:8]
    return settings.with_(
        database_url=make_database(f"policy{next(_databases)}"),
        env="production",
        queue=f"{settings.queue}-policy-{tag}",
        redis_prefix=f"{redis_prefix}policy-{tag}:",  # inside the run's prefix: cleaned up
    )


@pytest.fixture
def make_runtime(base_settings: Settings, tmp_path) -> Iterator[Callable[..., Runtime]]:
    """Runtimes on this test's database, each with the policy text it is given."""
    made: list[Runtime] = []

    def make(policy_text: str, *, file: str = "policy.yaml", **overrides: Any) -> Runtime:
        path = tmp_path / file
        path.write_text(textwrap.dedent(policy_text))
        rt = Runtime(base_settings.with_(policy_file=str(path), **overrides),
                     notifiers=[LogNotifier()])
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def worker(rt: Runtime, name: str = "policy-1") -> Any:
    return embedded_worker(rt.app, concurrency=2, hostname=f"{name}@test")


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def state(rt: Runtime, saga_id: str) -> SagaState:
    return rt.store.get_saga_or_raise(saga_id).state


def wait_state(rt: Runtime, saga_id: str, expected: SagaState) -> None:
    wait_for(f"saga {saga_id} to be {expected.value} (is {state(rt, saga_id).value})",
             lambda: state(rt, saga_id) is expected)


def wait_pages_sent(rt: Runtime, saga_id: str, pages: int = 1) -> None:
    def done() -> bool:
        notes = rt.store.notifications(saga_id)
        return story(rt.store, saga_id).pages() == pages and all(
            n.status == "sent" for n in notes
        )

    wait_for(f"{pages} page(s) of saga {saga_id} to be sent", done)


def events(rt: Runtime, saga_id: str, kind: str | None = None) -> list[EventRecord]:
    return [e for e in rt.store.events(saga_id) if kind is None or e.kind == kind]


def runs(rt: Runtime, saga_id: str, step: str | None = None,
         direction: Direction | None = None) -> list[StepRunRecord]:
    return [r for r in rt.store.step_runs(saga_id)
            if (step is None or r.step == step) and (direction is None or r.direction is direction)]


def pending(rt: Runtime, saga_id: str) -> ApprovalRecord:
    found = rt.store.approvals(saga_id=saga_id, status="pending")
    assert len(found) == 1, found
    return found[0]


def ledger_story(saga_id: str) -> list[tuple[str, str]]:
    return [(c.op, c.step) for c in ledger.effects(saga_id=saga_id)]


def lifecycle(rt: Runtime, saga_id: str) -> list[str | None]:
    return [e.data.get("trigger") for e in events(rt, saga_id) if e.kind.startswith("saga.")]


def page_triggers(rt: Runtime, saga_id: str) -> list[Any]:
    return [n for n in rt.store.notifications(saga_id)
            if n.kind == "page" and n.action == "trigger"]


def rung_events(rt: Runtime, saga_id: str, step: str) -> list[tuple[int, bool]]:
    return [(e.data["level"], e.data["applicable"]) for e in events(rt, saga_id, "ladder.rung")
            if e.step == step]


def approval_rows(rt: Runtime, saga_id: str) -> int:
    with rt.store.engine.connect() as conn:
        return conn.execute(
            sa.text("SELECT count(*) FROM sagaq_approvals WHERE saga_id = :s"), {"s": saga_id}
        ).scalar_one()


def cli_env(rt: Runtime) -> dict[str, str]:
    return {**env_for(rt.settings), "SAGAQ_POLICY_FILE": rt.settings.policy_file,
            "SAGAQ_ENV": rt.settings.env}


# -- a verdict on every dispatch -------------------------------------------------------------


def test_every_dispatch_forward_and_compensation_writes_a_verdict_event(make_runtime) -> None:
    rt = make_runtime("""
        version: v1
        rules:
          - id: watch-quad
            when: {saga: quad, env: production}
            decision: allow
          - id: other-sagas-denied
            when: {saga: pivoted}
            decision: deny
          - id: watch-undo
            when: {direction: compensate}
            decision: allow
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", FAIL_S4)
        wait_state(rt, saga_id, SagaState.COMPENSATED)

    timeline = events(rt, saga_id)
    scheduled = [i for i, e in enumerate(timeline)
                 if e.kind in ("step.scheduled", "compensation.scheduled")]
    verdicts = [e for e in timeline if e.kind == "policy.verdict"]
    # one verdict per dispatch, written just before it, about the same step
    assert len(verdicts) == len(scheduled) == 7
    for i in scheduled:
        before = timeline[i - 1]
        assert before.kind == "policy.verdict", [e.kind for e in timeline]
        assert before.step == timeline[i].step
    assert [(e.step, e.data["direction"], e.data["matched"], e.data["rule"],
             e.data["decision"]) for e in verdicts] == [
        ("s1", "forward", ["watch-quad"], "watch-quad", "allow"),
        ("s2", "forward", ["watch-quad"], "watch-quad", "allow"),
        ("s3", "forward", ["watch-quad"], "watch-quad", "allow"),
        ("s4", "forward", ["watch-quad"], "watch-quad", "allow"),
        ("s3", "compensate", ["watch-quad", "watch-undo"], "watch-quad", "allow"),
        ("s2", "compensate", ["watch-quad", "watch-undo"], "watch-quad", "allow"),
        ("s1", "compensate", ["watch-quad", "watch-undo"], "watch-quad", "allow"),
    ]
    assert {e.data["policy"] for e in verdicts} == {rt.policy.label}
    assert all("allow by rule watch-quad" in e.message for e in verdicts)
    assert story(rt.store, saga_id).compensated() == ["s3", "s2", "s1"]


def test_a_forward_deny_before_the_pivot_never_runs_the_step_and_rolls_back(
    make_runtime,
) -> None:
    rt = make_runtime("""
        version: v1
        rules:
          - id: never-s3-in-prod
            when: {saga: quad, step: s3, direction: forward, env: production}
            decision: deny
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", {})
        wait_state(rt, saga_id, SagaState.COMPENSATED)
        assert ledger_story(saga_id) == [
            ("do", "s1"), ("do", "s2"), ("undo", "s2"), ("undo", "s1"),
        ]  # s3 never ran: no effect, not even an attempt
        assert [c for c in ledger.calls if c.saga_id == saga_id and c.step in ("s3", "s4")] == []

    (denied,) = runs(rt, saga_id, "s3")
    assert denied.direction is Direction.FORWARD
    assert denied.status is StepStatus.SKIPPED
    assert denied.error == "denied by policy rule never-s3-in-prod"
    assert denied.error_type == "PolicyDenied"
    assert (denied.worker, denied.started_at, denied.deliveries) == (None, None, 0)
    assert runs(rt, saga_id, "s4") == []
    (skipped,) = events(rt, saga_id, "step.skipped")
    assert skipped.step == "s3" and "never-s3-in-prod" in skipped.message
    (verdict,) = [e for e in events(rt, saga_id, "policy.verdict") if e.step == "s3"]
    assert (verdict.data["decision"], verdict.data["rule"]) == ("deny", "never-s3-in-prod")
    assert rung_events(rt, saga_id, "s3") == [(1, False), (2, False), (3, True)]
    st = story(rt.store, saga_id)
    assert st.rungs() == [1, 2, 3]
    assert st.compensated() == ["s2", "s1"]  # LIFO
    assert st.pages() == 0 and page_triggers(rt, saga_id) == []
    assert "never-s3-in-prod" in (st.saga.error or "") and "s3" in (st.saga.error or "")
    assert lifecycle(rt, saga_id) == [None, "start", "rollback", "finish_rollback"]


def test_a_deny_of_the_pivot_itself_still_rolls_back(make_runtime) -> None:
    rt = make_runtime("""
        version: v1
        rules:
          - {id: no-charges, when: {saga: pivoted, step: charge}, decision: deny}
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("pivoted", {})
        wait_state(rt, saga_id, SagaState.COMPENSATED)
    assert ledger_story(saga_id) == [("do", "reserve"), ("undo", "reserve")]
    assert story(rt.store, saga_id).rungs() == [1, 2, 3]


def test_a_forward_deny_after_the_pivot_pages_once_and_undoes_nothing(make_runtime) -> None:
    rt = make_runtime("""
        version: v1
        rules:
          - id: no-shipping
            when: {saga: pivoted, step: ship}
            decision: deny
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("pivoted", {})
        wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)
        wait_pages_sent(rt, saga_id)

    assert ledger_story(saga_id) == [("do", "reserve"), ("do", "charge")]  # no undo, no ship
    (ship,) = runs(rt, saga_id, "ship")
    assert ship.status is StepStatus.SKIPPED and "no-shipping" in (ship.error or "")
    assert runs(rt, saga_id, direction=Direction.COMPENSATE) == []
    assert events(rt, saga_id, "rollback.plan") == []
    assert rung_events(rt, saga_id, "ship") == [(3, False), (4, True)]
    assert len(page_triggers(rt, saga_id)) == 1
    assert story(rt.store, saga_id).pages() == 1
    assert rt.store.uncompensated(saga_id) == ["reserve"]
    assert lifecycle(rt, saga_id) == [None, "start", "escalate"]


def test_a_denied_compensation_is_recorded_skipped_and_pages_and_stops_the_rollback(
    make_runtime,
) -> None:
    rt = make_runtime("""
        version: v1
        rules:
          - id: keep-s2-in-place
            when: {saga: quad, step: s2, direction: compensate}
            decision: deny
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", FAIL_S4)
        wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)
        wait_pages_sent(rt, saga_id)
        assert ledger_story(saga_id) == [
            ("do", "s1"), ("do", "s2"), ("do", "s3"), ("undo", "s3"),
        ]  # s2's undo denied; s1's (after it, LIFO) never ran

    comp = runs(rt, saga_id, direction=Direction.COMPENSATE)
    assert [(r.step, r.status) for r in comp] == [
        ("s3", StepStatus.SUCCEEDED), ("s2", StepStatus.SKIPPED),
    ]
    skipped = comp[1]
    assert skipped.error == "denied by policy rule keep-s2-in-place"
    assert (skipped.worker, skipped.started_at) == (None, None)
    (event,) = events(rt, saga_id, "compensation.skipped")
    assert event.step == "s2" and event.data["direction"] == "compensate"
    (verdict,) = [e for e in events(rt, saga_id, "policy.verdict")
                  if e.step == "s2" and e.data["direction"] == "compensate"]
    assert verdict.data["decision"] == "deny" and verdict.data["rule"] == "keep-s2-in-place"
    assert rung_events(rt, saga_id, "s2") == [(4, True)]

    (page,) = page_triggers(rt, saga_id)
    assert (page.kind, page.action, page.status) == ("page", "trigger", "sent")
    saga = rt.store.get_saga_or_raise(saga_id)
    assert "s2" in (saga.error or "") and "keep-s2-in-place" in (saga.error or "")
    assert "by hand" in (saga.error or "")
    assert rt.store.uncompensated(saga_id) == ["s2", "s1"]
    assert lifecycle(rt, saga_id) == [None, "start", "rollback", "escalate"]
    record = evidence(rt.store, saga_id)
    assert record["compensations"] == {
        "dispatched": ["s3"], "succeeded": ["s3"], "skipped": ["s2"], "failed": [],
    }
    assert record["status"] == "needs_human" and record["uncompensated"] == ["s2", "s1"]


def test_the_page_for_a_denied_compensation_says_which_undo_was_denied(
    make_runtime, caplog
) -> None:
    rt = make_runtime("""
        version: v1
        rules:
          - {id: keep-s2, when: {saga: quad, step: s2, direction: compensate}, decision: deny}
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", FAIL_S4)
        wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)
        wait_pages_sent(rt, saga_id)
    (paged,) = [r.getMessage() for r in caplog.records
                if r.name == "sagaq.notify" and r.getMessage().startswith("PAGE trigger")]
    summary = paged.split(" [saga ")[0]  # the log notifier's line: summary, then the saga
    # s4 failed, but quad has no pivot: what needs a human is the undo of s2 that was denied
    assert "s2" in summary, paged
    assert "after the pivot" not in summary, paged


# -- durable approvals -----------------------------------------------------------------------


def test_an_approval_waits_in_postgres_through_a_worker_restart_and_a_redis_wipe(
    make_runtime, redis_client
) -> None:
    first = make_runtime(ASK_S3)
    prefix = first.settings.redis_prefix
    with worker(first, "policy-1"):
        saga_id = first.engine.enqueue("quad", {})
        wait_state(first, saga_id, SagaState.AWAITING_APPROVAL)
        request = pending(first, saga_id)
        assert (request.step, request.direction, request.rule_id) == ("s3", "forward",
                                                                      "ask-before-s3")
        assert request.policy_version == first.policy.label
        assert request.rule_fingerprint == first.policy.rule("ask-before-s3").fingerprint
        # holding no worker: nothing runs, and the parked run's message is not in Redis
        parked = runs(first, saga_id, "s3")
        assert [(r.status, r.deliveries, r.worker) for r in parked] == [
            (StepStatus.SCHEDULED, 0, None)
        ]
        assert request.step_run_id == parked[0].id
        assert [r for r in first.store.step_runs(saga_id) if r.status is StepStatus.RUNNING] == []
        assert keys_holding(redis_client, prefix, parked[0].message_id) == []
        assert ledger_story(saga_id) == [("do", "s1"), ("do", "s2")]
        # approvers are told, through the notifiers
        asked = [n for n in first.store.notifications(saga_id)
                 if n.subject == f"approval:{request.id}"]
        assert len(asked) == 1 and asked[0].kind == "notify"
        assert request.id in (asked[0].note or "")

        listed = cli("approvals", "--json", env=cli_env(first))
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [(r["id"], r["saga_id"], r["step"], r["status"]) for r in rows] == [
            (request.id, saga_id, "s3", "pending")
        ]

    # the worker is gone, and so is everything this test's key space held in Redis
    for key in list(redis_client.scan_iter(match=f"{prefix}*")):
        redis_client.delete(key)
    assert list(redis_client.scan_iter(match=f"{prefix}*")) == []
    assert state(first, saga_id) is SagaState.AWAITING_APPROVAL

    second = make_runtime(ASK_S3)  # a new process, with a new worker
    with worker(second, "policy-2"):
        second.reconcile()  # nothing to republish: the saga waits for a human
        assert state(second, saga_id) is SagaState.AWAITING_APPROVAL
        decided = decide(second, request.id[:10], approve=True, by="alice", note="go ahead")
        assert (decided.status, decided.decided_by, decided.note) == ("approved", "alice",
                                                                      "go ahead")
        wait_state(second, saga_id, SagaState.COMPLETED)

    assert ledger_story(saga_id) == [("do", "s1"), ("do", "s2"), ("do", "s3"), ("do", "s4")]
    assert [c.step for c in ledger.calls if c.saga_id == saga_id].count("s3") == 1
    (s3,) = runs(second, saga_id, "s3")  # the parked run gave way to the one that ran
    assert (s3.status, s3.deliveries) == (StepStatus.SUCCEEDED, 1)
    assert s3.worker and s3.task_id == s3.message_id
    assert lifecycle(second, saga_id) == [None, "start", "request_approval", "approve",
                                          "finish"]
    (approved,) = events(second, saga_id, "approval.approved")
    assert approved.worker == "alice" and approved.data["by"] == "alice"
    assert approved.data["policy"] == second.policy.label
    verdicts = [e for e in events(second, saga_id, "policy.verdict") if e.step == "s3"]
    assert [e.data["decision"] for e in verdicts] == ["require_human", "allow"]
    assert verdicts[1].data["approval"] == request.id
    assert "approved by alice" in verdicts[1].message
    assert second.store.approvals(saga_id=saga_id, status="pending") == []
    record = evidence(second.store, saga_id)
    assert record["rollback_triggered"] is False
    assert record["compensations"]["dispatched"] == []
    assert [(a["decision"], a["by"]) for a in record["approvals"]] == [("approved", "alice")]


def test_a_denied_approval_rolls_back_and_the_step_never_runs(make_runtime) -> None:
    rt = make_runtime(ASK_S3)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", {})
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        request = pending(rt, saga_id)
        decide(rt, request.id, approve=False, by="bob", note="not today")
        wait_state(rt, saga_id, SagaState.COMPENSATED)

    assert ledger_story(saga_id) == [("do", "s1"), ("do", "s2"), ("undo", "s2"), ("undo", "s1")]
    (s3,) = runs(rt, saga_id, "s3")
    assert s3.status is StepStatus.SKIPPED and s3.started_at is None
    assert s3.error == "approval denied by bob: not today"
    assert story(rt.store, saga_id).compensated() == ["s2", "s1"]
    assert story(rt.store, saga_id).rungs() == [1, 2, 3]
    assert lifecycle(rt, saga_id) == [None, "start", "request_approval", "deny",
                                      "finish_rollback"]
    (denied,) = events(rt, saga_id, "approval.denied")
    assert denied.data["by"] == "bob" and denied.data["note"] == "not today"
    with pytest.raises(InputError, match="no longer pending"):
        decide(rt, request.id, approve=True, by="mallory")


def test_an_approval_past_its_deadline_is_denied_by_the_reconciler(make_runtime) -> None:
    rt = make_runtime("""
        version: v1
        rules:
          - id: ask-quickly
            when: {saga: quad, step: s3}
            decision: require_human
            deadline: 1s
          - id: ask-charges
            when: {saga: pivoted, step: charge}
            decision: require_human
    """, approval_deadline=3600.0)
    with worker(rt):
        quick = rt.engine.enqueue("quad", {})
        slow = rt.engine.enqueue("pivoted", {})
        wait_state(rt, quick, SagaState.AWAITING_APPROVAL)
        wait_state(rt, slow, SagaState.AWAITING_APPROVAL)
        request, other = pending(rt, quick), pending(rt, slow)
        assert request.deadline - request.requested_at == timedelta(seconds=1)
        assert other.deadline - other.requested_at == timedelta(seconds=3600)  # the default

        wait_for("the deadline", lambda: datetime.now(UTC) > request.deadline)
        rt.reconcile()
        wait_state(rt, quick, SagaState.COMPENSATED)

    decided = rt.store.find_approval(request.id)
    assert (decided.status, decided.decided_by) == ("denied", "reconciler")
    assert decided.note == "the deadline passed"
    (denied,) = events(rt, quick, "approval.denied")
    assert denied.worker == "reconciler"
    assert ledger_story(quick) == [("do", "s1"), ("do", "s2"), ("undo", "s2"), ("undo", "s1")]
    (s3,) = runs(rt, quick, "s3")
    assert s3.status is StepStatus.SKIPPED and "reconciler" in (s3.error or "")
    assert lifecycle(rt, quick) == [None, "start", "request_approval", "deny", "finish_rollback"]
    # the request whose deadline is far away is left alone
    assert rt.store.find_approval(other.id).status == "pending"
    assert state(rt, slow) is SagaState.AWAITING_APPROVAL


def test_redelivered_messages_of_a_parked_run_do_not_ask_twice(make_runtime) -> None:
    rt = make_runtime(ASK_S3, republish_after=0.0)  # the reconciler republishes anything due
    flaky_s3 = {"simulate": {"flaky": {"s3": 1}}}
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", flaky_s3)
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        (parked,) = runs(rt, saga_id, "s3")
        for _ in range(3):
            rt.app.send_task(parked.task_name, args=[saga_id, parked.id],
                             queue=rt.settings.queue)

        def drops() -> list[EventRecord]:
            return [e for e in events(rt, saga_id, "step.dropped") if e.step_run_id == parked.id]

        wait_for("three duplicates to be dropped", lambda: len(drops()) == 3)
        assert all("waiting" in e.message for e in drops())
        rt.reconcile()
        rt.reconcile()
        assert state(rt, saga_id) is SagaState.AWAITING_APPROVAL
        (still,) = runs(rt, saga_id, "s3")
        assert (still.id, still.status, still.deliveries) == (parked.id, StepStatus.SCHEDULED, 0)
        assert approval_rows(rt, saga_id) == 1
        assert len(events(rt, saga_id, "approval.requested")) == 1
        with rt.store.engine.connect() as conn:  # the reconciler left the parked run alone
            assert conn.execute(
                sa.text("SELECT republished FROM sagaq_outbox WHERE step_run_id = :r"),
                {"r": parked.id},
            ).scalars().all() == [0]

        # approved, s3 fails once and is retried: the retry does not ask again
        decide(rt, pending(rt, saga_id).id, approve=True, by="alice")
        wait_state(rt, saga_id, SagaState.COMPLETED)

    assert [(r.attempt, r.status) for r in runs(rt, saga_id, "s3")] == [
        (1, StepStatus.FAILED), (2, StepStatus.SUCCEEDED),
    ]
    assert approval_rows(rt, saga_id) == 1
    assert len(events(rt, saga_id, "approval.requested")) == 1
    assert lifecycle(rt, saga_id) == [None, "start", "request_approval", "approve", "finish"]
    assert [c.step for c in ledger.effects(saga_id=saga_id)].count("s3") == 1
    asked = [n for n in rt.store.notifications(saga_id) if n.subject.startswith("approval:")]
    assert len(asked) == 1


def test_retrying_a_rollback_stopped_by_a_denied_undo_goes_on_with_the_rollback(
    make_runtime,
) -> None:
    """The undo of s2 needs a human; the first one says no, so the saga pages. The operator
    retries: the rollback goes on (s4, which failed for good, is not run again), the undo of
    s2 is asked about again, and approved, the rollback finishes."""
    rt = make_runtime("""
        version: v1
        rules:
          - id: ask-before-undoing-s2
            when: {saga: quad, step: s2, direction: compensate}
            decision: require_human
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", FAIL_S4)
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        decide(rt, pending(rt, saga_id).id, approve=False, by="frank", note="not yet")
        wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)

        outcome = retry(rt, saga_id, by="ops", note="the owner is back")
        assert outcome.state in (SagaState.COMPENSATING, SagaState.AWAITING_APPROVAL), \
            lifecycle(rt, saga_id)
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        decide(rt, pending(rt, saga_id).id, approve=True, by="frank")
        wait_state(rt, saga_id, SagaState.COMPENSATED)

    assert [c.step for c in ledger.effects(saga_id=saga_id) if c.op == "undo"] == [
        "s3", "s2", "s1"]
    assert len(runs(rt, saga_id, "s4")) == 1


def test_retrying_after_a_denied_approval_asks_again(make_runtime) -> None:
    """After the pivot a denied ``ship`` pages; the operator retries it. A saga that waits in
    awaiting_approval must have a pending request someone can decide."""
    rt = make_runtime("""
        version: v1
        rules:
          - {id: ask-before-shipping, when: {saga: pivoted, step: ship}, decision: require_human}
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("pivoted", {})
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        first = pending(rt, saga_id)
        decide(rt, first.id, approve=False, by="gina")
        wait_state(rt, saga_id, SagaState.NEEDS_HUMAN)

        retry(rt, saga_id, by="ops", note="customer confirmed the address")
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        found = rt.store.approvals(saga_id=saga_id, status="pending")
        assert len(found) == 1, rt.store.approvals(saga_id=saga_id)
        decide(rt, found[0].id, approve=True, by="gina")
        wait_state(rt, saga_id, SagaState.COMPLETED)

    assert [c.step for c in ledger.effects(saga_id=saga_id)] == [
        "reserve", "charge", "ship", "email"]


# -- approvals and policy versions -----------------------------------------------------------

ASK_S3_PLUS = ASK_S3 + """
  - id: note-s4
    when: {saga: quad, step: s4}
    decision: allow
"""


def test_an_approval_decided_under_a_newer_policy_whose_rule_is_unchanged_runs_the_step(
    make_runtime,
) -> None:
    old = make_runtime(ASK_S3, file="old.yaml")
    new = make_runtime(ASK_S3_PLUS, file="new.yaml")
    assert old.policy.label != new.policy.label
    assert old.policy.rule("ask-before-s3").fingerprint == \
        new.policy.rule("ask-before-s3").fingerprint
    with worker(old):
        saga_id = old.engine.enqueue("quad", {})
        wait_state(old, saga_id, SagaState.AWAITING_APPROVAL)
        request = pending(old, saga_id)
        decide(new, request.id, approve=True, by="carol")  # an operator with the new file
        wait_state(old, saga_id, SagaState.COMPLETED)

    assert [c.step for c in ledger.effects(saga_id=saga_id)] == ["s1", "s2", "s3", "s4"]
    decided = old.store.find_approval(request.id)
    assert (decided.policy_version, decided.decided_under) == (old.policy.label,
                                                               new.policy.label)
    (approved,) = events(old, saga_id, "approval.approved")
    assert approved.data["requested_under"] == old.policy.label
    assert approved.data["policy"] == new.policy.label
    verdict = [e for e in events(old, saga_id, "policy.verdict") if e.step == "s3"][-1]
    assert verdict.data["decision"] == "allow" and verdict.data["approval"] == request.id
    assert verdict.data["policy"] == new.policy.label  # checked against the newer policy
    assert len(events(old, saga_id, "approval.requested")) == 1


def test_an_approval_of_a_rule_edited_since_the_request_asks_again(make_runtime) -> None:
    old = make_runtime(ASK_S3, file="old.yaml")
    edited = make_runtime(ASK_S3.replace("env: production}", "env: [production, staging]}"),
                          file="edited.yaml")
    before = old.policy.rule("ask-before-s3")
    after = edited.policy.rule("ask-before-s3")
    assert before.fingerprint != after.fingerprint
    with worker(old):
        saga_id = old.engine.enqueue("quad", {})
        wait_state(old, saga_id, SagaState.AWAITING_APPROVAL)
        first = pending(old, saga_id)
        decide(edited, first.id, approve=True, by="carol")
        # the human approved what the rule used to say: a new question, about the rule now
        wait_for("a new request", lambda: len(events(old, saga_id, "approval.requested")) == 2)
        assert state(old, saga_id) is SagaState.AWAITING_APPROVAL
        second = pending(old, saga_id)
        assert second.id != first.id
        assert (second.rule_id, second.rule_fingerprint) == ("ask-before-s3", after.fingerprint)
        assert second.policy_version == edited.policy.label
        assert old.store.find_approval(first.id).status == "approved"
        assert [c.step for c in ledger.calls if c.saga_id == saga_id] == ["s1", "s2"]

        decide(edited, second.id, approve=True, by="carol")
        wait_state(old, saga_id, SagaState.COMPLETED)

    assert [c.step for c in ledger.effects(saga_id=saga_id)] == ["s1", "s2", "s3", "s4"]
    assert approval_rows(old, saga_id) == 2
    assert lifecycle(old, saga_id) == [None, "start", "request_approval", "approve",
                                       "request_approval", "approve", "finish"]


def test_an_approval_granted_under_an_older_policy_is_rechecked_at_a_later_dispatch(
    make_runtime,
) -> None:
    """The operator's CLI still has the old file; the workers run the new one. s3 fails once
    after the approval: its retry is dispatched by a worker under the new policy, which
    re-checks the approval granted under the old one."""
    old = make_runtime(ASK_S3, file="old.yaml")
    new = make_runtime(ASK_S3_PLUS, file="new.yaml")
    with worker(new):
        saga_id = new.engine.enqueue("quad", {"simulate": {"flaky": {"s3": 1}}})
        wait_state(new, saga_id, SagaState.AWAITING_APPROVAL)
        request = pending(new, saga_id)
        decide(old, request.id, approve=True, by="dave")
        wait_state(new, saga_id, SagaState.COMPLETED)

    assert new.store.find_approval(request.id).decided_under == old.policy.label
    verdicts = [e for e in events(new, saga_id, "policy.verdict") if e.step == "s3"]
    assert [(e.data["decision"], e.data["policy"]) for e in verdicts] == [
        ("require_human", new.policy.label),
        ("allow", old.policy.label),  # dispatched by the operator's process, after the decision
        ("allow", new.policy.label),  # the retry, dispatched by a worker
    ]
    recheck = verdicts[2]
    assert recheck.data["approval"] == request.id
    assert old.policy.label in recheck.message and new.policy.label in recheck.message
    assert "re-checked" in recheck.message and "unchanged" in recheck.message
    # asked under the new version, approved and dispatched under the old one: re-checked too
    assert "re-checked" in verdicts[1].message and new.policy.label in verdicts[1].message
    assert [c.step for c in ledger.effects(saga_id=saga_id)].count("s3") == 1
    assert approval_rows(new, saga_id) == 1


# -- denials after steps that have nothing to undo -------------------------------------------


def test_a_denied_approval_after_a_read_only_step_still_rolls_back(make_runtime) -> None:
    """``screened``: inspect_account reads only (no compensation), stage is undoable, purge
    needs a human. There is no pivot: a denied purge must roll back like a denied dispatch
    does, not be taken for a step after the pivot."""
    rt = make_runtime("""
        version: v1
        rules:
          - {id: ask-purge, when: {saga: screened, step: purge}, decision: require_human}
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("screened", {})
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        decide(rt, pending(rt, saga_id).id, approve=False, by="erin")
        wait_for("the saga to settle",
                 lambda: state(rt, saga_id) in (SagaState.COMPENSATED, SagaState.NEEDS_HUMAN))

    assert state(rt, saga_id) is SagaState.COMPENSATED, rt.store.get_saga_or_raise(saga_id).error
    assert ledger_story(saga_id) == [("do", "stage"), ("undo", "stage")]
    assert story(rt.store, saga_id).pages() == 0


# -- the evidence record ---------------------------------------------------------------------


def test_the_evidence_of_a_rolled_back_saga_lists_exactly_the_compensations_that_ran(
    make_runtime,
) -> None:
    rt = make_runtime(ASK_S3)
    with worker(rt, "evidence"):
        saga_id = rt.engine.enqueue("quad", {})
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        request = pending(rt, saga_id)
        decide(rt, request.id, approve=False, by="dave", note="wrong tenant")
        wait_state(rt, saga_id, SagaState.COMPENSATED)

    record = evidence(rt.store, saga_id)
    json.dumps(record)  # plain JSON
    saga = rt.store.get_saga_or_raise(saga_id)
    assert record["run_id"] == saga_id and record["saga"] == "quad"
    assert record["status"] == "compensated"
    assert record["rollback_triggered"] is True
    assert record["rollback_mode"] == "lifo_stack"
    ran = [c.step for c in ledger.effects(saga_id=saga_id) if c.op == "undo"]
    assert ran == ["s2", "s1"]
    assert record["compensations"] == {
        "dispatched": ran, "succeeded": ran, "skipped": [], "failed": [],
    }
    assert record["uncompensated"] == []
    assert record["matched_policy_ids"] == ["allow-quad", "ask-before-s3"]
    assert record["policy_versions"] == [rt.policy.label]
    assert [(v["step"], v["direction"], v["decision"]) for v in record["verdicts"]] == [
        ("s1", "forward", "allow"),
        ("s2", "forward", "allow"),
        ("s3", "forward", "require_human"),
        ("s2", "compensate", "allow"),
        ("s1", "compensate", "allow"),
    ]
    (approval,) = record["approvals"]
    assert approval["id"] == request.id
    assert (approval["step"], approval["direction"], approval["rule"]) == (
        "s3", "forward", "ask-before-s3")
    assert (approval["decision"], approval["by"], approval["note"]) == (
        "denied", "dave", "wrong tenant")
    assert datetime.fromisoformat(approval["at"]) == rt.store.find_approval(request.id).decided_at
    assert approval["requested_under"] == approval["decided_under"] == rt.policy.label
    assert saga.finished_at is not None
    assert datetime.fromisoformat(record["finished_at"]) == saga.finished_at
    assert datetime.fromisoformat(record["started_at"]) <= saga.finished_at

    shown = cli("show", saga_id, "--json", env=cli_env(rt))
    assert shown.returncode == 0, shown.stderr
    step_runs = json.loads(shown.stdout)["step_runs"]
    ran_runs = [r for r in step_runs if r["started_at"]]
    assert [(r["step"], r["direction"]) for r in ran_runs] == [
        ("s1", "forward"), ("s2", "forward"), ("s2", "compensate"), ("s1", "compensate"),
    ]
    claims = {e["step_run_id"]: e for e in json.loads(shown.stdout)["events"]
              if e["kind"] in ("step.claimed", "compensation.claimed")}
    for r in ran_runs:
        assert r["worker"] and r["task_id"] == r["message_id"], r  # the Celery task id
        assert (claims[r["id"]]["worker"], claims[r["id"]]["task_id"]) == (r["worker"],
                                                                            r["task_id"])
    (never,) = [r for r in step_runs if not r["started_at"]]
    assert (never["step"], never["status"], never["worker"]) == ("s3", "skipped", None)


@pytest.mark.parametrize("approve", [True, False], ids=["approved", "denied"])
def test_a_compensation_that_waited_for_approval_appears_in_the_evidence_as_it_ran(
    make_runtime, approve
) -> None:
    rt = make_runtime("""
        version: v1
        rules:
          - id: ask-before-undoing-s2
            when: {saga: quad, step: s2, direction: compensate}
            decision: require_human
    """)
    with worker(rt):
        saga_id = rt.engine.enqueue("quad", FAIL_S4)
        wait_state(rt, saga_id, SagaState.AWAITING_APPROVAL)
        request = pending(rt, saga_id)
        assert (request.step, request.direction) == ("s2", "compensate")
        assert ledger_story(saga_id)[-1] == ("undo", "s3")
        decide(rt, request.id, approve=approve, by="frank")
        settled = SagaState.COMPENSATED if approve else SagaState.NEEDS_HUMAN
        wait_state(rt, saga_id, settled)
        if not approve:
            wait_pages_sent(rt, saga_id)

    ran = [c.step for c in ledger.effects(saga_id=saga_id) if c.op == "undo"]
    record = evidence(rt.store, saga_id)
    if approve:
        assert ran == ["s3", "s2", "s1"]
        assert lifecycle(rt, saga_id) == [None, "start", "rollback", "request_approval",
                                          "approve_rollback", "finish_rollback"]
        assert record["compensations"] == {
            "dispatched": ran, "succeeded": ran, "skipped": [], "failed": [],
        }
    else:
        assert ran == ["s3"]
        assert lifecycle(rt, saga_id) == [None, "start", "rollback", "request_approval",
                                          "escalate"]
        assert len(page_triggers(rt, saga_id)) == 1
        assert record["compensations"] == {
            "dispatched": ran, "succeeded": ran, "skipped": ["s2"], "failed": [],
        }
