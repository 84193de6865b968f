"""Regression tests for the faults of issue 10, and the races that no test pinned.

Each test drives the engine and the store by hand (:mod:`tests.sweep`'s driver: a worker, a
broker and a reconciler in one loop, on a test clock), so that the interleaving is chosen,
not waited for. Each failed before its fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from sagaq import InputError, SagaState, Settings, StepStatus
from sagaq.errors import ConfigurationError
from sagaq.gate import Gate
from sagaq.machine import Direction
from sagaq.notify.base import DeliveryError, Kind, Notice
from sagaq.notify.delivery import MAX_ATTEMPTS, deliver
from sagaq.policy import parse
from sagaq.store.models import EVENTS, NOTIFICATIONS, OUTBOX, RESOURCES, RUNS, SAGAS
from tests import fault_sagas, sweep
from tests.fault_sagas import SECRET
from tests.sweep import Driver, Faults, make_driver, registry, world


@pytest.fixture(scope="module")
def url(make_database: Callable[[str], str]) -> str:
    return make_database("faults")


@pytest.fixture(params=[True], ids=["gated"])
def driver(url: str, request: pytest.FixtureRequest) -> Iterator[Driver]:
    world.reset()
    d = make_driver(url, Faults(), gated=request.param)
    with d.store.engine.begin() as conn:  # each test on empty tables
        conn.execute(sa.text("TRUNCATE sagaq_sagas, sagaq_step_runs, sagaq_events, "
                             "sagaq_outbox, sagaq_notifications, sagaq_resources, "
                             "sagaq_approvals"))
    yield d
    d.queue.clear()


def runs(driver: Driver, saga_id: str, step: str | None = None) -> list:
    return [r for r in driver.store.step_runs(saga_id) if step is None or r.step == step]


def outbox(driver: Driver, saga_id: str) -> list:
    with driver.store.engine.connect() as conn:
        return list(conn.execute(sa.select(OUTBOX).where(OUTBOX.c.saga_id == saga_id)))


def settle(driver: Driver, saga_id: str, rounds: int = 20) -> SagaState:
    """Drain, then reconciler passes with the clock moved on, until nothing is left to do."""
    for _ in range(rounds):
        driver.drain()
        state = driver.store.get_saga_or_raise(saga_id).state
        if state in (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_HUMAN) and \
                sweep._quiet(driver.store, saga_id):
            return state
        driver.clock.advance(10.0)
        driver.reconcile()
    return driver.store.get_saga_or_raise(saga_id).state


def shape(saga: object, inp: dict | None = None, ends: frozenset = frozenset()) -> sweep.Shape:
    return sweep.Shape("t", saga, inp or {}, ends)  # type: ignore[arg-type]


# -- 1. a resolver that dies in verify leaves the saga moving -------------------------------


def test_a_resolver_that_dies_inside_verify_leaves_the_message_for_the_next(
    driver: Driver,
) -> None:
    saga_id = driver.engine.enqueue(fault_sagas.verify_dies, {"do": {"a": "die_after_effect"}})
    driver.drain()  # a's worker dies after the effect; the redelivery finds a live lease
    driver.clock.advance(10.0)
    driver.reconcile()  # the lease sweep sends a resolver, which dies inside verify
    driver.drain()
    (a,) = runs(driver, saga_id, "a")
    assert (a.status, a.finished_at) == (StepStatus.UNKNOWN, None)  # not resolved yet...
    assert [r.step_run_id for r in outbox(driver, saga_id)] == [a.id]  # ...and not stranded
    assert driver.store.stranded(saga_id=saga_id) == []
    assert settle(driver, saga_id) is SagaState.COMPLETED
    assert [c.step for c in world.effects(saga_id=saga_id)] == ["a", "b"]


# -- 2. outbox rows that leak; heartbeats after expiry; republish starvation ----------------


def test_a_recovery_row_is_removed_when_the_slow_worker_finishes_after_all(
    driver: Driver,
) -> None:
    saga_id = driver.engine.enqueue(sweep.bare, {})
    message = driver.queue.popleft()
    run_id = int(message.args[1])
    claim = driver.store.claim(saga_id, run_id, worker="slow", task_id=None, lease=6.0)
    driver.clock.advance(10.0)  # the worker is slow (SIGSTOPped, GC...): its lease lapses
    assert len(driver.store.expired_leases()) == 1  # a recovery message, with an outbox row
    assert [r.step_run_id for r in outbox(driver, saga_id)] == [run_id]
    # The slow worker finishes after all: its result wins (nobody took the run over yet).
    assert claim.run is not None
    done = driver.store.succeed(saga_id, run_id, token=claim.run.deliveries,
                                result={"id": "x"}, checkpoint={"results": {"a": {"id": "x"}},
                                                                "data": {}},
                                next_run=None, worker="slow", task_id=None)
    assert done.won
    assert [r.step_run_id for r in outbox(driver, saga_id)] != [run_id]  # the row went with it


def test_a_heartbeat_after_the_lease_lapsed_loses(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.bare, {})
    run_id = int(driver.queue.popleft().args[1])
    claim = driver.store.claim(saga_id, run_id, worker="w1", task_id=None, lease=6.0)
    assert claim.run is not None
    token = claim.run.deliveries
    assert driver.store.extend_lease(saga_id, run_id, worker="w1", token=token, lease=6.0)
    # Another worker, with the same delivery token, may not extend it.
    assert not driver.store.extend_lease(saga_id, run_id, worker="w2", token=token, lease=6.0)
    driver.clock.advance(7.0)
    assert not driver.store.extend_lease(saga_id, run_id, worker="w1", token=token, lease=6.0)


def test_rows_in_backoff_do_not_starve_a_newer_lost_message(driver: Driver) -> None:
    old = [driver.engine.enqueue(sweep.bare, {}) for _ in range(3)]
    driver.queue.clear()  # every message lost
    driver.clock.advance(10.0)
    assert len(driver.store.republish_overdue(2.0, batch=3)) == 3  # now in backoff
    driver.queue.clear()
    driver.clock.advance(1.0)
    newer = driver.engine.enqueue(sweep.bare, {})
    driver.queue.clear()
    driver.clock.advance(2.5)  # the newer one is overdue; the old ones in backoff (4 s)
    again = driver.store.republish_overdue(2.0, batch=3)
    assert [d.args[0] for d in again] == [newer], (old, newer)


# -- 3. an approval request whose message was lost is sent again ----------------------------


def test_a_lost_approval_request_is_published_again(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.gated, {})
    assert driver.store.get_saga_or_raise(saga_id).state is SagaState.AWAITING_APPROVAL
    assert [d.task_name for d in driver.queue] == ["sagaq.notify"]
    driver.queue.clear()  # the request's message is lost
    driver.clock.advance(10.0)
    driver.reconcile()
    assert [d.task_name for d in driver.queue] == ["sagaq.notify"]
    driver.drain()
    assert any("waits for a human decision" in n.summary and n.saga_id == saga_id
               for n in driver.notifier.sent)


# -- 4. a first step that needs a human ------------------------------------------------------


def test_a_saga_whose_first_step_needs_a_human_can_be_enqueued(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.gated, {})
    saga = driver.store.get_saga_or_raise(saga_id)
    assert saga.state is SagaState.AWAITING_APPROVAL
    (request,) = driver.store.approvals(saga_id=saga_id)
    driver.engine.publish_now(driver.store.decide(request.id, approve=True, by="alice",
                                                  policy="p").dispatches)
    assert settle(driver, saga_id) is SagaState.COMPLETED


# -- 5. an operator's retry after the pivot never rolls back ---------------------------------


def test_an_operator_retry_after_the_pivot_that_the_policy_denies_pages(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.pivoted, {"do": {"r": "fail_until_retried"}})
    assert settle(driver, saga_id) is SagaState.NEEDS_HUMAN
    gate = driver.store.gate
    driver.store.gate = Gate(parse({"version": "v1", "rules": [
        {"id": "no-r", "when": {"step": "r"}, "decision": "deny"}]}), registry, "production")
    try:
        outcome = driver.store.retry(saga_id, by="bob", note="again")
        driver.engine.publish_now(outcome.dispatches)
        assert settle(driver, saga_id) is SagaState.NEEDS_HUMAN  # paged, not compensated
    finally:
        driver.store.gate = gate
    assert world.effects(saga_id=saga_id, op="undo") == []
    assert not any(r.direction is Direction.COMPENSATE for r in runs(driver, saga_id))


# -- 6. secrets in clear -------------------------------------------------------------------


def test_a_verify_that_quotes_a_secret_during_lease_resolution_is_redacted(
    driver: Driver,
) -> None:
    saga_id = driver.engine.enqueue(fault_sagas.secretive, {"do": {"use": "die_after_effect"}})
    settle(driver, saga_id)
    (use, *_) = runs(driver, saga_id, "use")
    assert use.error and "GET /check?token=" in use.error
    stored = " ".join(str(x) for r in runs(driver, saga_id) for x in (r.error, r.result))
    events = " ".join(e.message + str(e.data) for e in driver.store.events(saga_id))
    notices = " ".join(str(n.details) + n.summary for n in driver.notifier.sent)
    for where in (stored, events, notices):
        assert SECRET not in where


def test_a_validate_that_quotes_the_returned_secret_is_redacted(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(fault_sagas.validating, {"validate": True})
    settle(driver, saga_id)
    errors = [r.error for r in runs(driver, saga_id, "use")]
    assert errors and all(e and "echoed the key back: ***" in e for e in errors), errors
    assert SECRET not in " ".join(e.message for e in driver.store.events(saga_id))


# -- 7. fences for zombies ------------------------------------------------------------------


def test_a_zombie_attempt_loses_every_write(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.bare, {})
    run_id = int(driver.queue.popleft().args[1])
    zombie = driver.store.claim(saga_id, run_id, worker="zombie", task_id=None, lease=6.0)
    assert zombie.run is not None
    token = zombie.run.deliveries
    driver.clock.advance(10.0)
    taken = driver.store.expire(saga_id, run_id, worker="resolver", lease=6.0)
    assert taken is not None and taken.deliveries == token + 1
    store = driver.store
    assert not store.extend_lease(saga_id, run_id, worker="zombie", token=token, lease=6.0)
    assert not store.register_resource(saga_id, run_id, "a", "vm", "vm-1", token=token)
    lost = store.succeed(saga_id, run_id, token=token, result={"id": "z"},
                         checkpoint={"results": {}, "data": {}}, next_run=None,
                         worker="zombie", task_id=None)
    assert not lost.won
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(RESOURCES).where(RESOURCES.c.saga_id == saga_id)).all() \
            == []


# -- 8. compensation backoffs wait in Postgres -----------------------------------------------


def test_a_long_compensation_backoff_waits_in_postgres_not_in_redis(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(fault_sagas.slow_undo, {})
    for _ in range(10):
        if not driver.queue:
            break
        driver.execute(driver.queue.popleft())
        assert all(d.countdown <= driver.settings.countdown_max for d in driver.queue)
    saga = driver.store.get_saga_or_raise(saga_id)
    assert saga.state is SagaState.COMPENSATING and saga.wake_at is not None
    assert not driver.queue  # nothing in the broker: the wait is a row
    assert driver.store.stranded(saga_id=saga_id) == []
    assert settle(driver, saga_id) is SagaState.COMPENSATED
    assert [c.step for c in world.effects(saga_id=saga_id, op="undo")] == ["a"]


def test_a_retry_cap_past_the_visibility_timeout_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="SAGAQ_RETRY_CAP"):
        Settings(retry_cap=4000.0, visibility_timeout=3600.0).validated()


# -- 9. U+0000 ----------------------------------------------------------------------------


def test_u0000_in_an_input_or_a_key_is_an_input_error_and_writes_nothing(driver: Driver) -> None:
    with driver.store.engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(SAGAS)).scalar()
    with pytest.raises(InputError, match="U\\+0000"):
        driver.engine.enqueue(sweep.bare, {"name": "a\x00b"})
    with pytest.raises(InputError, match="U\\+0000"):
        driver.engine.enqueue(sweep.bare, {"a\x00": 1})
    with pytest.raises(InputError, match="U\\+0000"):
        driver.engine.enqueue(sweep.bare, {}, key="k\x00")
    with driver.store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(SAGAS)).scalar() == before


def test_u0000_in_a_result_is_recorded_at_once_and_the_step_undone(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(fault_sagas.nul, {})
    assert settle(driver, saga_id) is SagaState.COMPENSATED
    said, *undo = runs(driver, saga_id, "says_nul")
    assert [r.direction for r in undo] == [Direction.COMPENSATE]
    assert said.status is StepStatus.UNKNOWN and said.attempt == 1  # never run again
    assert "U+0000" in (said.error or "")
    assert [c.step for c in world.effects(saga_id=saga_id, op="undo")] == ["says_nul", "a"]


# -- 10. a timed-out step is in doubt -------------------------------------------------------


def test_a_step_that_timed_out_after_its_effect_is_resolved_by_verify(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(fault_sagas.timed, {})
    assert settle(driver, saga_id) is SagaState.COMPLETED
    (a,) = runs(driver, saga_id, "a")
    assert a.status is StepStatus.SUCCEEDED and a.result["id"].startswith("world-")
    assert [c.step for c in world.effects(saga_id=saga_id)] == ["a", "b"]


def test_a_timed_out_step_without_verify_is_compensated_when_the_saga_rolls_back(
    driver: Driver,
) -> None:
    saga_id = driver.engine.enqueue(fault_sagas.timed_blind, {"do": {"b": "fail"}})
    assert settle(driver, saga_id) is SagaState.COMPENSATED
    first = runs(driver, saga_id, "a")[0]
    assert first.status is StepStatus.UNKNOWN  # in doubt, not a clean failure
    assert "a" in [c.step for c in world.effects(saga_id=saga_id, op="undo")]


# -- 11. a bare True from verify re-runs the step for its result ------------------------------


def test_a_verify_that_answers_true_reruns_the_step_for_its_result(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(fault_sagas.bool_verify, {"do": {"a": "die_after_effect"}})
    assert settle(driver, saga_id) is SagaState.COMPLETED
    a = runs(driver, saga_id, "a")
    assert [(r.attempt, r.status) for r in a] == [(1, StepStatus.UNKNOWN),
                                                  (2, StepStatus.SUCCEEDED)]
    assert a[0].idempotency_key == a[1].idempotency_key
    assert a[1].result["id"].startswith("world-")
    assert len(world.effects(saga_id=saga_id, op="do")) == 2  # a once, b once


# -- 12. a page is retried until it is delivered --------------------------------------------


class Flaky:
    name = "log"
    kinds = frozenset({Kind.PAGE, Kind.NOTIFY})

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[Notice] = []

    def send(self, notice: Notice) -> None:
        if self.failures > 0 and notice.kind is Kind.PAGE:
            self.failures -= 1
            raise DeliveryError("pager: HTTP 503", retryable=True, status=503)
        self.sent.append(notice)


def test_a_page_is_retried_past_any_attempt_limit_until_it_is_delivered(
    driver: Driver, caplog: pytest.LogCaptureFixture,
) -> None:
    saga_id = driver.engine.enqueue(sweep.three, {"do": {"c": "fail"}, "undo": {"b": "fail"}})
    driver.notifier = Flaky(MAX_ATTEMPTS + 4)  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="sagaq.notify"):
        for _ in range(60):
            driver.drain()
            saga = driver.store.get_saga_or_raise(saga_id)
            if saga.state is SagaState.NEEDS_HUMAN and any(
                    n.kind is Kind.PAGE for n in driver.notifier.sent):
                break
            assert driver.store.stranded(saga_id=saga_id) == []  # undelivered, still visible
            driver.clock.advance(3700.0)  # past the longest backoff
            driver.reconcile()
    assert any(n.kind is Kind.PAGE for n in driver.notifier.sent)
    pages = [n for n in driver.store.notifications(saga_id) if n.kind == "page"]
    assert pages[0].status == "sent" and pages[0].attempts > MAX_ATTEMPTS
    assert any("not delivered" in r.getMessage() for r in caplog.records)


def test_a_long_page_backoff_is_durable(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.three, {"do": {"c": "fail"}, "undo": {"b": "fail"}})
    settle(driver, saga_id)
    with driver.store.engine.begin() as conn:  # a page, as if it had failed 10 times
        conn.execute(sa.update(NOTIFICATIONS).where(NOTIFICATIONS.c.saga_id == saga_id)
                     .values(status="pending", attempts=10))
    (page,) = [n for n in driver.store.notifications(saga_id) if n.kind == "page"]
    word, again = deliver(driver.store, {"log": Flaky(1)}, page.id, countdown_max=30.0)  # type: ignore[dict-item]
    assert word == "retry" and again == []  # not a countdown in Redis: a due outbox row
    rows = [r for r in outbox(driver, saga_id) if r.notification_id == page.id]
    assert rows and rows[0].available_at > driver.clock.now + timedelta(seconds=30)


# -- the plausible ones, proved or cleared ----------------------------------------------------


def test_leases_are_compared_with_the_database_clock_not_the_host(url: str) -> None:
    from datetime import UTC, datetime

    from sagaq.store import Store
    from sagaq.store.database import create_engine

    store = Store(create_engine(url))  # no test clock: the database's
    try:
        saga_id = sweep.make_driver(url, Faults()).engine.enqueue(sweep.bare, {})
        run = next(iter(store.step_runs(saga_id)))
        claim = store.claim(saga_id, run.id, worker="w", task_id=None, lease=60.0)
        assert claim.run is not None
        store.clock = lambda: datetime(2099, 1, 1, tzinfo=UTC)  # a host clock far ahead
        assert store.expire(saga_id, run.id, worker="ahead", lease=60.0) is None
    finally:
        store.dispose()


def test_a_delivery_taken_over_records_nothing(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.three, {"do": {"c": "fail"}})
    while not driver.store.notifications(saga_id):  # up to the rollback and its notice
        d = driver.queue.popleft()
        if d.task_name != "sagaq.notify":
            driver.execute(d)
    driver.queue.clear()
    (notice,) = driver.store.notifications(saga_id)
    first = driver.store.begin_delivery(notice.id)
    assert first is not None
    driver.clock.advance(120.0)  # the first sender stalled past the sending lease
    second = driver.store.begin_delivery(notice.id)
    assert second is not None and second.attempts == first.attempts + 1
    assert driver.store.end_delivery(first, sent=False, error="late", retry_in=1.0) == []
    found = driver.store.notification(notice.id)
    assert found is not None and found.status == "sending"  # still the second sender's
    assert driver.store.end_delivery(second, sent=True) == []
    found = driver.store.notification(notice.id)
    assert found is not None and found.status == "sent"


def test_a_saga_with_no_way_forward_that_repair_cannot_rebuild_pages(driver: Driver) -> None:
    """Its scheduled run deleted by hand (not only the message): nothing to publish again,
    so the reconciler's last sweep escalates, and the page goes out (DESIGN §4.13)."""
    saga_id = driver.engine.enqueue(sweep.bare, {})
    driver.queue.clear()
    with driver.store.engine.begin() as conn:
        conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.saga_id == saga_id))
        conn.execute(sa.delete(RUNS).where(RUNS.c.saga_id == saga_id))
    (stranded,) = driver.store.stranded(saga_id=saga_id)
    assert "no step is scheduled or running" in stranded.reason
    driver.reconcile()
    saga = driver.store.get_saga_or_raise(saga_id)
    assert saga.state is SagaState.NEEDS_HUMAN and "no way forward" in (saga.error or "")
    driver.drain()
    assert any(n.kind is Kind.PAGE and n.saga_id == saga_id for n in driver.notifier.sent)
    assert driver.store.stranded(saga_id=saga_id) == []


def test_a_long_compensation_under_a_live_lease_is_not_a_stalled_rollback(
    driver: Driver,
) -> None:
    saga_id = driver.engine.enqueue(sweep.three, {"do": {"c": "fail"}})
    while driver.queue:
        d = driver.queue.popleft()
        if d.task_name.endswith(".compensate"):
            claim = driver.store.claim(saga_id, int(d.args[1]), worker="w", task_id=None,
                                       lease=6.0)
            assert claim.status.value == "claimed"
            break
        driver.execute(d)
    driver.clock.advance(7200.0)  # the rollback "made no progress" for two hours...
    with driver.store.engine.begin() as conn:  # ...but its compensation beats all along
        conn.execute(sa.update(RUNS).where(RUNS.c.saga_id == saga_id,
                                           RUNS.c.status == "running")
                     .values(lease_expires_at=driver.clock.now + timedelta(seconds=6)))
    assert driver.store.stalled_rollbacks(3600.0) == []
    assert driver.store.get_saga_or_raise(saga_id).state is SagaState.COMPENSATING


# -- item 5: the races, driven by hand ----------------------------------------------------


def test_expire_refuses_a_live_lease(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.bare, {})
    run_id = int(driver.queue.popleft().args[1])
    driver.store.claim(saga_id, run_id, worker="w1", task_id=None, lease=6.0)
    driver.clock.advance(5.0)
    assert driver.store.expire(saga_id, run_id, worker="w2", lease=6.0) is None
    driver.clock.advance(2.0)
    assert driver.store.expire(saga_id, run_id, worker="w2", lease=6.0) is not None


@pytest.mark.parametrize("driver", [True, False], ids=["gated", "one_statement"],
                         indirect=True)
def test_a_step_that_succeeds_after_its_saga_began_to_roll_back_schedules_no_next_step(
    driver: Driver,
) -> None:
    saga_id = driver.engine.enqueue(sweep.three, {})
    message = driver.queue.popleft()
    run_id = int(message.args[1])
    claim = driver.store.claim(saga_id, run_id, worker="w1", task_id=None, lease=6.0)
    assert claim.run is not None
    with driver.store.engine.begin() as conn:  # meanwhile, a rollback began (an operator...)
        conn.execute(sa.update(SAGAS).where(SAGAS.c.id == saga_id)
                     .values(state="compensating"))
    outcome = driver.store.succeed(
        saga_id, run_id, token=claim.run.deliveries, result={"id": "x"},
        checkpoint={"results": {"a": {"id": "x"}}, "data": {}},
        next_run=driver.engine._new_run(saga_id, sweep.three.steps[1], Direction.FORWARD, 1),
        worker="w1", task_id=None,
    )
    assert outcome.won
    forward = [r.step for r in runs(driver, saga_id) if r.direction is Direction.FORWARD]
    assert forward == ["a"]  # b was never scheduled
    assert [r.step for r in runs(driver, saga_id) if r.direction is Direction.COMPENSATE] == ["a"]


def test_an_operator_retry_while_a_compensation_still_runs_waits_for_it(driver: Driver) -> None:
    saga_id = driver.engine.enqueue(sweep.three, {"do": {"c": "fail"}, "undo": {"b": "stall"}})
    for _ in range(10):
        driver.drain()
        driver.clock.advance(10.0)
        driver.reconcile()
        if driver.store.get_saga_or_raise(saga_id).state is SagaState.NEEDS_HUMAN:
            break
    assert driver.store.get_saga_or_raise(saga_id).state is SagaState.NEEDS_HUMAN
    with driver.store.engine.begin() as conn:  # the stalled compensation is still running
        conn.execute(sa.update(RUNS).where(RUNS.c.saga_id == saga_id,
                                           RUNS.c.direction == "compensate",
                                           RUNS.c.status.in_(["unknown", "failed"]))
                     .values(status="running", finished_at=None,
                             lease_expires_at=driver.clock.now + timedelta(seconds=60)))
    outcome = driver.store.retry(saga_id, by="bob", note="again")
    assert outcome.won
    active = [r for r in runs(driver, saga_id) if r.status in (StepStatus.SCHEDULED,
                                                                StepStatus.RUNNING)]
    assert len(active) == 1 and active[0].status is StepStatus.RUNNING  # nothing scheduled
    with driver.store.engine.connect() as conn:
        kinds = conn.execute(sa.select(EVENTS.c.kind).where(EVENTS.c.saga_id == saga_id)
                             .order_by(EVENTS.c.id.desc()).limit(3)).scalars().all()
    assert "compensation.scheduled" not in kinds


def test_a_resolver_whose_resolution_was_taken_over_loses_its_outcome(driver: Driver) -> None:
    """Two resolvers: the first took the run over and stalled (its own lease lapsed), the
    second took it from the first. Both expect ``unknown``: only the delivery tells them
    apart, and the first one's verdict must lose."""
    from sagaq.ladder import Then

    saga_id = driver.engine.enqueue(sweep.bare, {})
    run_id = int(driver.queue.popleft().args[1])
    driver.store.claim(saga_id, run_id, worker="w1", task_id=None, lease=6.0)
    driver.clock.advance(10.0)
    first = driver.store.expire(saga_id, run_id, worker="r1", lease=6.0)
    driver.clock.advance(10.0)
    second = driver.store.expire(saga_id, run_id, worker="r2", lease=6.0)
    assert first is not None and second is not None
    late = driver.store.fail(saga_id, run_id, token=first.deliveries, error="late",
                             error_type="X", failure="transient", then=Then.ESCALATE,
                             worker="r1", task_id=None, expected=StepStatus.UNKNOWN,
                             status=StepStatus.UNKNOWN)
    assert not late.won
    assert driver.store.get_saga_or_raise(saga_id).state is SagaState.RUNNING


def test_a_release_taken_over_records_nothing(driver: Driver) -> None:
    """DESIGN §4.14 for releases: a releaser that stalled past its lease and was taken over
    records nothing when it comes back; the one that took over does."""
    saga_id = driver.engine.enqueue(sweep.leaky, {"do": {"a": "resource", "b": "fail"}})
    driver.drain()
    assert driver.store.get_saga_or_raise(saga_id).state is SagaState.COMPENSATED
    driver.store.orphans()  # held → releasing, with its message (not run here)
    (res,) = driver.store.resources(saga_id)
    first = driver.store.begin_release(res.id)
    assert first is not None
    driver.clock.advance(400.0)  # past the releasing lease: the first releaser stalled
    second = driver.store.begin_release(res.id)
    assert second is not None and second.attempts == first.attempts + 1
    assert driver.store.end_release(first, released=False, error="late") == []
    (still,) = driver.store.resources(saga_id)
    assert (still.status, still.last_error) == ("releasing", None)  # no late page either
    driver.store.end_release(second, released=True)
    (done,) = driver.store.resources(saga_id)
    assert done.status == "released"
