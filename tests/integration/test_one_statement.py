"""The one-statement transitions (:mod:`sagaq.store.advance`) against the transactional way.

The same move taken both ways must leave the same rows and the same timeline (kinds,
messages, data, order): ``sagaq show`` and the tests read them. The guards of the one
statement are pinned here one by one: each test puts exactly one guard in the way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from sagaq import SagaState, StepStatus
from sagaq.machine import Direction
from sagaq.store import sagas as store_sagas
from sagaq.store.models import OUTBOX, RUNS, SAGAS
from tests import sweep
from tests.sweep import Driver, Faults, make_driver, world


@pytest.fixture(scope="module")
def url(make_database: Callable[[str], str]) -> str:
    return make_database("one_statement")


@pytest.fixture(params=[True, False], ids=["gated", "ungated"])
def driver(url: str, request: pytest.FixtureRequest) -> Iterator[Driver]:
    world.reset()
    d = make_driver(url, Faults(), gated=request.param)
    with d.store.engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE sagaq_sagas, sagaq_step_runs, sagaq_events, "
                             "sagaq_outbox, sagaq_notifications, sagaq_resources, "
                             "sagaq_approvals"))
    yield d
    d.queue.clear()


def timeline(driver: Driver, saga_id: str) -> list[tuple[Any, ...]]:
    """The timeline without the ids and the clock: what must match between the two ways."""
    ids = {r.id: (r.step, r.direction.value, r.attempt) for r in driver.store.step_runs(saga_id)}
    return [(e.kind, e.step, ids.get(e.step_run_id) if e.step_run_id else None, e.worker,
             e.task_id, e.message, e.data) for e in driver.store.events(saga_id)]


def state(driver: Driver, saga_id: str) -> dict[str, Any]:
    saga = driver.store.get_saga_or_raise(saga_id)
    runs = [(r.step, r.direction.value, r.attempt, r.status.value, r.result, r.deliveries,
             r.finished_at is not None, r.lease_expires_at is not None, r.level, r.tier,
             r.not_before) for r in driver.store.step_runs(saga_id)]
    with driver.store.engine.connect() as conn:
        outbox = [(o.task_name, o.notification_id is not None) for o in conn.execute(
            sa.select(OUTBOX).where(OUTBOX.c.saga_id == saga_id).order_by(OUTBOX.c.id))]
    return {"state": saga.state, "checkpoint": saga.checkpoint, "error": saga.error,
            "finished": saga.finished_at is not None, "wake_at": saga.wake_at,
            "incident": saga.incident, "runs": runs, "outbox": outbox,
            "timeline": timeline(driver, saga_id)}


def claimed(driver: Driver, saga_id: str) -> Any:
    d = driver.queue.popleft()
    claim = driver.store.claim(saga_id, int(d.args[1]), worker="w1", task_id="t1", lease=6.0)
    assert claim.status.value == "claimed" and claim.run is not None
    return claim.run


def succeed(driver: Driver, saga_id: str, run: Any, *, one_statement: bool,
            token: int | None = None) -> Any:
    steps = sweep.three.steps
    following = steps[run.step_index + 1:]
    nxt = driver.engine._new_run(saga_id, following[0], Direction.FORWARD, 1) \
        if following else None
    saga = driver.store.get_saga_or_raise(saga_id)
    outcome = driver.store.succeed(
        saga_id, run.id, token=run.deliveries if token is None else token,
        result={"id": run.step}, checkpoint={"results": {**saga.results, run.step: {"id": 1}},
                                             "data": {}},
        next_run=nxt, worker="w1", task_id="t1",
        saga_name=sweep.three.name if one_statement else None,
    )
    driver.publish(outcome.dispatches)
    return outcome


def enqueue(driver: Driver, monkeypatch: pytest.MonkeyPatch, *, one_statement: bool) -> str:
    with monkeypatch.context() as m:
        if not one_statement:
            m.setattr(store_sagas, "dispatchable", lambda *a: False)
        return driver.engine.enqueue(sweep.three, {})


def test_both_ways_leave_the_same_rows_and_timeline(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enqueue, advance (a → b → c) and finish, once each way."""
    seen = []
    for one in (True, False):
        saga_id = enqueue(driver, monkeypatch, one_statement=one)
        for _ in sweep.three.steps:
            outcome = succeed(driver, saga_id, claimed(driver, saga_id), one_statement=one)
            assert outcome.won, outcome.note
        assert outcome.state is SagaState.COMPLETED and outcome.entered is SagaState.COMPLETED
        seen.append(state(driver, saga_id))
    assert seen[0] == seen[1]
    assert seen[0]["state"] is SagaState.COMPLETED


def written(driver: Driver, saga_id: str) -> tuple[Any, ...]:
    with driver.store.engine.connect() as conn:
        return (conn.execute(sa.select(SAGAS).where(SAGAS.c.id == saga_id)).one(),
                conn.execute(sa.select(RUNS).where(RUNS.c.saga_id == saga_id)
                             .order_by(RUNS.c.id)).all(),
                conn.execute(sa.select(OUTBOX).where(OUTBOX.c.saga_id == saga_id)).all(),
                len(driver.store.events(saga_id)))


@pytest.mark.parametrize("one", [True, False], ids=["one_statement", "transactional"])
@pytest.mark.parametrize("last", [False, True], ids=["advance", "finish"])
@pytest.mark.parametrize("guard", ["token", "finished_at", "status"])
def test_a_run_guard_that_does_not_hold_loses_and_writes_nothing(
    driver: Driver, guard: str, last: bool, one: bool,
) -> None:
    """Each of the run's guards alone: the attempt's token (a zombie whose run was taken
    over and is running again under a newer delivery), an outcome already recorded, a run
    no longer running. Either way; the one statement reports the loss itself."""
    saga_id = driver.engine.enqueue(sweep.three, {})
    run = claimed(driver, saga_id)
    if last:
        for _ in range(2):
            assert succeed(driver, saga_id, run, one_statement=True).won
            run = claimed(driver, saga_id)
    token = run.deliveries
    values = {"token": {"deliveries": token + 1},
              "finished_at": {"finished_at": driver.clock.now},
              "status": {"status": StepStatus.UNKNOWN.value}}[guard]
    with driver.store.engine.begin() as conn:
        conn.execute(sa.update(RUNS).where(RUNS.c.id == run.id).values(**values))
    before = written(driver, saga_id)
    outcome = succeed(driver, saga_id, run, one_statement=one, token=token)
    assert not outcome.won and outcome.dispatches == []
    assert written(driver, saga_id) == before
    assert driver.store.get_saga_or_raise(saga_id).state is SagaState.RUNNING


@pytest.mark.parametrize("first", ["dispatched", "delayed"])
def test_enqueue_joins_a_caller_transaction_on_another_driver(
    url: str, driver: Driver, first: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DESIGN §4.2: ``session=`` joins the application's transaction whatever its driver
    (here psycopg2): the saga exists iff the caller commits, both ways it can start."""
    pytest.importorskip("psycopg2")
    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import Session

    app = sa.create_engine(make_url(url).set(drivername="postgresql+psycopg2"))
    if first == "delayed":  # a first step that must wait takes the transactional way
        monkeypatch.setattr(store_sagas, "dispatchable", lambda *a: False)
    try:
        ids = []
        for commit in (False, True):
            with Session(app) as session, session.begin():
                ids.append(driver.engine.enqueue(sweep.three, {}, session=session))
                if not commit:
                    session.rollback()
        rolled_back, committed = ids
        assert driver.store.get_saga(rolled_back) is None
        assert driver.store.get_saga_or_raise(committed).state is SagaState.PENDING
        assert [e.kind for e in driver.store.events(committed)][-1] == "step.scheduled"
        assert driver.store.count_outbox(committed) == 1
    finally:
        app.dispose()


@pytest.mark.parametrize("last", [False, True], ids=["advance", "finish"])
@pytest.mark.parametrize("moved", [SagaState.COMPENSATING, SagaState.NEEDS_HUMAN])
def test_a_success_after_the_saga_moved_on_takes_the_transactional_way(
    driver: Driver, moved: SagaState, last: bool,
) -> None:
    """The saga's guard alone: it left ``running`` (a rollback began, an operator was paged)
    while the step ran. The success is recorded; no next step, no completion."""
    saga_id = driver.engine.enqueue(sweep.three, {})
    run = claimed(driver, saga_id)
    if last:
        for _ in range(2):
            assert succeed(driver, saga_id, run, one_statement=True).won
            run = claimed(driver, saga_id)
    with driver.store.engine.begin() as conn:
        conn.execute(sa.update(SAGAS).where(SAGAS.c.id == saga_id).values(state=moved.value))
    outcome = succeed(driver, saga_id, run, one_statement=True)
    assert outcome.won
    assert driver.store.get_saga_or_raise(saga_id).state is moved
    forward = [(r.step, r.status) for r in driver.store.step_runs(saga_id)
               if r.direction is Direction.FORWARD]
    assert forward[-1] == (run.step, StepStatus.SUCCEEDED)  # and nothing after it
    undo = [r.step for r in driver.store.step_runs(saga_id)
            if r.direction is Direction.COMPENSATE]
    assert undo == ([run.step] if moved is SagaState.COMPENSATING else [])


def test_a_compensation_success_never_moves_a_running_saga_forward(driver: Driver) -> None:
    """The direction guard alone: a compensation still running in a saga that runs (put
    there by hand), reported with a checkpoint as a forward step would be."""
    saga_id = driver.engine.enqueue(sweep.three, {})
    run = claimed(driver, saga_id)
    with driver.store.engine.begin() as conn:
        conn.execute(sa.update(RUNS).where(RUNS.c.id == run.id).values(direction="compensate"))
    succeed(driver, saga_id, run, one_statement=True)
    assert driver.store.get_saga_or_raise(saga_id).state is SagaState.RUNNING
    assert [r.step for r in driver.store.step_runs(saga_id)] == ["a"]  # b never scheduled


def test_a_next_step_that_must_wait_is_not_dispatched_at_once(driver: Driver) -> None:
    """A delay (here a durable one) takes the transactional way: the saga waits in Postgres
    with ``wake_at`` and nothing is published now (DESIGN §4.10)."""
    from dataclasses import replace

    saga_id = driver.engine.enqueue(sweep.three, {})
    run = claimed(driver, saga_id)
    later = replace(driver.engine._new_run(saga_id, sweep.three.steps[1], Direction.FORWARD, 1),
                    delay=600.0, durable=True)
    outcome = driver.store.succeed(
        saga_id, run.id, token=run.deliveries, result={"id": "a"},
        checkpoint={"results": {"a": {"id": "a"}}, "data": {}}, next_run=later,
        worker="w1", task_id="t1", saga_name=sweep.three.name)
    assert outcome.won and outcome.dispatches == []
    saga = driver.store.get_saga_or_raise(saga_id)
    assert saga.state is SagaState.WAITING and saga.wake_at is not None
    scheduled = [e for e in driver.store.events(saga_id) if e.kind == "step.scheduled"]
    assert scheduled[-1].data["delay"] == 600.0


@pytest.mark.parametrize("last", [False, True], ids=["advance", "finish"])
def test_the_recovery_row_goes_with_a_slow_attempt_that_succeeds(
    driver: Driver, last: bool,
) -> None:
    """Its lease lapsed and the sweep wrote a recovery message; then the slow worker's
    success wins in one statement, and the recovery row goes with it."""
    saga_id = driver.engine.enqueue(sweep.three, {})
    run = claimed(driver, saga_id)
    if last:
        for _ in range(2):
            assert succeed(driver, saga_id, run, one_statement=True).won
            run = claimed(driver, saga_id)
    driver.clock.advance(10.0)
    assert [int(d.args[1]) for d in driver.store.expired_leases()] == [run.id]
    assert succeed(driver, saga_id, run, one_statement=True).won
    with driver.store.engine.connect() as conn:
        left = conn.execute(sa.select(OUTBOX.c.step_run_id)
                            .where(OUTBOX.c.saga_id == saga_id)).scalars().all()
    assert run.id not in left


@pytest.mark.parametrize("held", ["waiting", "awaiting_approval", "wake_at"])
def test_a_claim_while_the_saga_is_held_back_is_early_and_takes_nothing(
    driver: Driver, held: str,
) -> None:
    """Each hold alone: the saga waiting (wake_at already due: the reconciler wakes it, not
    a stray message), awaiting an approval, or a ``wake_at`` still ahead (a rollback waiting
    for its compensation's backoff)."""
    from datetime import timedelta

    saga_id = driver.engine.enqueue(sweep.three, {})
    run_id = int(driver.queue.popleft().args[1])
    values: dict[str, Any] = {
        "waiting": {"state": "waiting", "wake_at": driver.clock.now - timedelta(seconds=1)},
        "awaiting_approval": {"state": "awaiting_approval", "wake_at": None},
        "wake_at": {"state": "running", "wake_at": driver.clock.now + timedelta(hours=1)},
    }[held]
    with driver.store.engine.begin() as conn:
        conn.execute(sa.update(SAGAS).where(SAGAS.c.id == saga_id).values(**values))
    claim = driver.store.claim(saga_id, run_id, worker="w1", task_id=None, lease=6.0)
    assert claim.status.value == "early"
    (run,) = driver.store.step_runs(saga_id)
    assert run.status is StepStatus.SCHEDULED and run.deliveries == 0


def test_a_message_naming_another_sagas_run_claims_nothing(driver: Driver) -> None:
    """A claim is for the run of the saga the message names (DESIGN §4.12: a message for
    a saga that does not exist gets a clear answer and writes nothing)."""
    first = driver.engine.enqueue(sweep.three, {})
    other = driver.engine.enqueue(sweep.three, {})
    run_id = int(driver.queue.popleft().args[1])  # the first saga's run
    claim = driver.store.claim(other, run_id, worker="w1", task_id=None, lease=6.0)
    assert claim.status.value == "missing"
    assert [r.status for r in driver.store.step_runs(first)] == [StepStatus.SCHEDULED]
    assert driver.store.get_saga_or_raise(first).state is SagaState.PENDING


def test_a_heartbeat_under_an_older_delivery_loses(driver: Driver) -> None:
    """The token alone: same worker name (a restarted worker keeps its hostname), run still
    running, lease live, but under a newer delivery."""
    saga_id = driver.engine.enqueue(sweep.three, {})
    run = claimed(driver, saga_id)
    with driver.store.engine.begin() as conn:
        conn.execute(sa.update(RUNS).where(RUNS.c.id == run.id)
                     .values(deliveries=run.deliveries + 1))
    assert not driver.store.extend_lease(saga_id, run.id, worker="w1", token=run.deliveries,
                                         lease=6.0)
    assert driver.store.extend_lease(saga_id, run.id, worker="w1", token=run.deliveries + 1,
                                     lease=6.0)


def test_a_failure_after_the_saga_moved_on_is_recorded_and_decides_nothing(
    driver: Driver,
) -> None:
    """A forward step's failure (retry asked) while its saga was paged meanwhile: the run's
    outcome is recorded; no retry is scheduled, the saga stays with the human."""
    from sagaq.ladder import Then

    saga_id = driver.engine.enqueue(sweep.three, {})
    run = claimed(driver, saga_id)
    with driver.store.engine.begin() as conn:
        conn.execute(sa.update(SAGAS).where(SAGAS.c.id == saga_id).values(state="needs_human"))
    again = driver.engine._new_run(saga_id, sweep.three.steps[0], Direction.FORWARD, 2)
    outcome = driver.store.fail(saga_id, run.id, token=run.deliveries, error="503",
                                error_type="X", failure="transient", then=Then.RETRY,
                                retry=again, worker="w1", task_id=None)
    assert outcome.won and outcome.dispatches == []
    assert [(r.step, r.status) for r in driver.store.step_runs(saga_id)] == [
        ("a", StepStatus.FAILED)]
    assert driver.store.get_saga_or_raise(saga_id).state is SagaState.NEEDS_HUMAN
