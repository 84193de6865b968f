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


@pytest.mark.parametrize("last", [False, True], ids=["advance", "finish"])
@pytest.mark.parametrize("guard", ["token", "finished_at", "status"])
def test_a_run_guard_that_does_not_hold_loses_and_writes_nothing(
    driver: Driver, guard: str, last: bool,
) -> None:
    """Each of the run's guards alone: the attempt's token (a zombie whose run was taken
    over and is running again under a newer delivery), an outcome already recorded, a run
    no longer running. The saga runs, so the one statement reports the loss itself."""
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
    outcome = succeed(driver, saga_id, run, one_statement=True, token=token)
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
