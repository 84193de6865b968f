"""Running sagas on a real Celery worker, real Redis and real PostgreSQL (DESIGN §4.3-4.8).

Every assertion counts something: effects that landed at a stand-in (``effects``), calls
that reached it at all (``calls``), step runs and events in the store. Waits poll for a
state or an event, never for an amount of time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery import signals

from sagaq import Direction, SagaState, StepStatus
from sagaq.keys import idempotency_key
from sagaq.store import Dispatch, NewRun, StepRunRecord, Store
from sagaq.store.database import create_engine
from sagaq.store.models import EventModel, OutboxModel, SagaModel, StepRunModel
from sagaq.worker import embedded_worker
from tasks.services import services
from tests import sagas as test_sagas
from tests.sagas import ledger

FWD, COMP = Direction.FORWARD, Direction.COMPENSATE
OK, FAILED = StepStatus.SUCCEEDED, StepStatus.FAILED
QUAD = ("s1", "s2", "s3", "s4")
TABLES = (SagaModel, StepRunModel, EventModel, OutboxModel)


# -- helpers --------------------------------------------------------------------------------


def runs_of(
    runtime: Any, saga_id: str, step: str | None = None, direction: Direction | None = None
) -> list[StepRunRecord]:
    return [
        r
        for r in runtime.store.step_runs(saga_id)
        if (step is None or r.step == step) and (direction is None or r.direction is direction)
    ]


def kinds(runtime: Any, saga_id: str, prefix: str = "") -> list[str]:
    return [e.kind for e in runtime.store.events(saga_id) if e.kind.startswith(prefix)]


def dropped(runtime: Any, saga_id: str) -> list[Any]:
    return [e for e in runtime.store.events(saga_id) if e.kind.endswith(".dropped")]


def ledger_steps(saga_id: str, op: str) -> list[str]:
    return [c.step for c in ledger.effects(saga_id=saga_id, op=op)]


def ledger_calls(saga_id: str) -> list[Any]:
    return [c for c in ledger.calls if c.saga_id == saga_id]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def count_rows(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            m.__tablename__: int(
                conn.execute(sa.select(sa.func.count()).select_from(m.__table__)).scalar_one()
            )
            for m in TABLES
        }


@contextmanager
def publishing_each(runtime: Any, times: int) -> Iterator[None]:
    """Every dispatch the engine publishes goes to the broker ``times`` times."""
    original = runtime.engine.publish

    def publish(dispatches: Sequence[Dispatch]) -> None:
        for _ in range(times):
            original(dispatches)

    runtime.engine.publish = publish
    try:
        yield
    finally:
        runtime.engine.publish = original


# -- happy paths ----------------------------------------------------------------------------

PROVISION = [
    ("create_identity", "identity", "create"),
    ("assign_roles", "iam", "grant"),
    ("allocate_runtime", "runtime", "allocate"),
    ("inject_credentials", "vault", "issue"),
]
ORDER = [
    ("create_crm_record", "crm", "create"),
    ("create_invoice", "billing", "invoice"),
    ("notify_customer", "email", "send"),
]


@pytest.mark.parametrize(
    ("saga", "inp", "steps"),
    [
        ("provision_agent", {"agent": "a-7", "roles": ["reader"]}, PROVISION),
        ("order_flow", {"customer": "c-9", "amount": 42}, ORDER),
    ],
    ids=["provision_agent", "order_flow"],
)
def test_happy_path_lands_each_effect_once_and_checkpoints_every_result(
    runtime, worker, wait_settled, saga, inp, steps
):
    saga_id = runtime.engine.enqueue(saga, inp)
    assert wait_settled(saga_id) == [SagaState.COMPLETED]
    names = [name for name, _, _ in steps]

    for name, system, op in steps:
        landed = services[system].effects(saga_id=saga_id)
        assert [(c.step, c.op) for c in landed] == [(name, op)], name
        assert len([c for c in services[system].calls if c.saga_id == saga_id]) == 1, name

    runs = runtime.store.step_runs(saga_id)
    assert [(r.step, r.direction, r.attempt, r.status) for r in runs] == [
        (n, FWD, 1, OK) for n in names
    ]
    assert [r.deliveries for r in runs] == [1] * len(names)

    record = runtime.store.get_saga_or_raise(saga_id)
    assert record.error is None and record.finished_at is not None
    results = record.checkpoint["results"]
    assert sorted(results) == sorted(names)  # JSONB keeps no key order
    assert results == {r.step: r.result for r in runs}
    for name, system, op in steps:
        assert results[name]["id"].startswith(f"{system}-"), name
        if "token" in results[name]:  # a Secret: sealed at rest, never in clear
            assert set(results[name]["token"]) == {"$secret"}
            assert "tok-" not in json.dumps(results[name])
        else:
            assert results[name]["op"] == op, name
    # Later steps read earlier results from the checkpoint.
    first, second = names[0], names[1]
    linked = results[second].get("identity", results[second].get("record"))
    assert linked == results[first]["id"]

    assert kinds(runtime, saga_id, "saga.") == ["saga.enqueued", "saga.running", "saga.completed"]
    for run in runs:
        per_run = [e.kind for e in runtime.store.events(saga_id) if e.step_run_id == run.id]
        assert per_run == ["step.scheduled", "step.claimed", "step.succeeded"], run.step
    assert runtime.store.count_outbox(saga_id) == 0


# -- failures before the pivot: roll back, last done first undone ---------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_terminal_failure_at_step_k_undoes_steps_before_it_in_reverse(
    runtime, worker, wait_settled, k
):
    failing = f"s{k}"
    saga_id = runtime.engine.enqueue("quad", {"simulate": {"fail": failing}})
    assert wait_settled(saga_id) == [SagaState.COMPENSATED]
    done = [f"s{j}" for j in range(1, k)]

    assert ledger_steps(saga_id, "do") == done
    assert ledger_steps(saga_id, "undo") == done[::-1]
    assert all(not c.replay for c in ledger_calls(saga_id))

    forward = runs_of(runtime, saga_id, direction=FWD)
    assert [(r.step, r.status) for r in forward] == [(s, OK) for s in done] + [(failing, FAILED)]
    assert forward[-1].attempt == 1 and forward[-1].error_type == "TerminalError"
    undo = runs_of(runtime, saga_id, direction=COMP)
    assert [(r.step, r.attempt, r.status) for r in undo] == [(s, 1, OK) for s in done[::-1]]
    # Each compensation was handed the result of the forward step it undoes.
    by_step = {r.step: r for r in forward}
    for r in undo:
        assert r.result["target"] == by_step[r.step].result["id"], r.step

    record = runtime.store.get_saga_or_raise(saga_id)
    assert failing in (record.error or "")
    assert kinds(runtime, saga_id, "saga.") == [
        "saga.enqueued",
        "saga.running",
        "saga.compensating",
        "saga.compensated",
    ]
    (plan,) = [e for e in runtime.store.events(saga_id) if e.kind == "rollback.plan"]
    assert plan.data["compensate"] == done[::-1]


def test_transient_failure_is_retried_with_the_same_key_and_lands_once(
    runtime, worker, wait_settled
):
    saga_id = runtime.engine.enqueue("quad", {"simulate": {"flaky": {"s2": 1}}})
    assert wait_settled(saga_id) == [SagaState.COMPLETED]

    assert ledger_steps(saga_id, "do") == list(QUAD)
    assert [c.step for c in ledger_calls(saga_id)].count("s2") == 1
    s2 = runs_of(runtime, saga_id, "s2", FWD)
    assert [(r.attempt, r.status) for r in s2] == [(1, FAILED), (2, OK)]
    assert s2[0].error_type == "TransientError"
    assert s2[0].idempotency_key == s2[1].idempotency_key == idempotency_key(saga_id, "s2")
    (failed,) = [e for e in runtime.store.events(saga_id) if e.kind == "step.failed"]
    assert failed.data["then"] == "retry"
    rungs = [e.data["level"] for e in runtime.store.events(saga_id) if e.kind == "ladder.rung"]
    assert rungs == [0]
    assert ledger_steps(saga_id, "undo") == []


def test_retries_exhausted_before_the_pivot_rolls_back(runtime, worker, settings, wait_settled):
    flaky = settings.retries + 5  # more failures than the budget allows attempts
    saga_id = runtime.engine.enqueue("quad", {"simulate": {"flaky": {"s2": flaky}}})
    assert wait_settled(saga_id) == [SagaState.COMPENSATED]

    s2 = runs_of(runtime, saga_id, "s2", FWD)
    assert [(r.attempt, r.status) for r in s2] == [
        (n, FAILED) for n in range(1, settings.retries + 2)
    ]
    assert {r.idempotency_key for r in s2} == {idempotency_key(saga_id, "s2")}
    assert ledger_steps(saga_id, "do") == ["s1"]
    assert ledger_steps(saga_id, "undo") == ["s1"]
    assert runs_of(runtime, saga_id, "s3") == []
    last = [e for e in runtime.store.events(saga_id) if e.kind == "step.failed"][-1]
    assert last.data["then"] == "rollback"
    rungs = [
        (e.data["level"], e.data["applicable"])
        for e in runtime.store.events(saga_id)
        if e.kind == "ladder.rung"
    ]
    # rung 0 until its budget is spent, then 1 and 2 passed as not applicable, then 3
    retries = [(0, True)] * settings.retries
    assert rungs == [*retries, (1, False), (2, False), (3, True)]


def test_compensation_that_keeps_failing_pages_a_human(runtime, worker, settings, wait_settled):
    saga_id = runtime.engine.enqueue(
        "quad", {"simulate": {"fail": "s3", "fail_compensation": "s1"}}
    )
    assert wait_settled(saga_id) == [SagaState.NEEDS_HUMAN]

    assert ledger_steps(saga_id, "do") == ["s1", "s2"]
    assert ledger_steps(saga_id, "undo") == ["s2"]  # s1's undo never landed
    assert [c.step for c in ledger_calls(saga_id) if c.op == "undo"] == ["s2"]
    undo_s2 = runs_of(runtime, saga_id, "s2", COMP)
    assert [(r.attempt, r.status) for r in undo_s2] == [(1, OK)]
    undo_s1 = runs_of(runtime, saga_id, "s1", COMP)
    assert [(r.attempt, r.status) for r in undo_s1] == [
        (n, FAILED) for n in range(1, settings.compensation_retries + 2)
    ]
    assert {r.idempotency_key for r in undo_s1} == {idempotency_key(saga_id, "s1", COMP)}
    assert all(r.error_type == "TransientError" for r in undo_s1)
    assert not [
        r
        for r in runtime.store.step_runs(saga_id)
        if r.status in (StepStatus.SCHEDULED, StepStatus.RUNNING)
    ]

    record = runtime.store.get_saga_or_raise(saga_id)
    assert record.error is not None and "s1" in record.error and "compensate" in record.error
    assert kinds(runtime, saga_id, "saga.")[-2:] == ["saga.compensating", "saga.needs_human"]


# -- the pivot ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("simulate", "attempts"),
    [({"fail": "ship"}, 1), ({"flaky": {"ship": 99}}, 3)],  # ship declares retries=2
    ids=["terminal", "budget_spent"],
)
def test_failure_after_the_pivot_pages_and_rolls_nothing_back(
    runtime, worker, wait_settled, simulate, attempts
):
    saga_id = runtime.engine.enqueue("pivoted", {"simulate": simulate})
    assert wait_settled(saga_id) == [SagaState.NEEDS_HUMAN]

    assert ledger_steps(saga_id, "do") == ["reserve", "charge"]
    assert ledger_steps(saga_id, "undo") == []
    assert runs_of(runtime, saga_id, direction=COMP) == []
    ship = runs_of(runtime, saga_id, "ship")
    assert [(r.attempt, r.status) for r in ship] == [(n, FAILED) for n in range(1, attempts + 1)]
    assert runs_of(runtime, saga_id, "email") == []
    assert "saga.compensating" not in kinds(runtime, saga_id)
    assert "ship" in (runtime.store.get_saga_or_raise(saga_id).error or "")


def test_failure_of_the_pivot_itself_rolls_back(runtime, worker, wait_settled):
    saga_id = runtime.engine.enqueue("pivoted", {"simulate": {"fail": "charge"}})
    assert wait_settled(saga_id) == [SagaState.COMPENSATED]

    assert ledger_steps(saga_id, "do") == ["reserve"]
    assert ledger_steps(saga_id, "undo") == ["reserve"]
    assert [(r.step, r.status) for r in runs_of(runtime, saga_id, direction=COMP)] == [
        ("reserve", OK)
    ]
    assert runs_of(runtime, saga_id, "ship") == [] and runs_of(runtime, saga_id, "email") == []


# -- duplicates and redeliveries ------------------------------------------------------------


def test_messages_redelivered_after_their_step_succeeded_are_dropped(
    runtime, worker, settings, wait_settled
):
    saga_id = runtime.engine.enqueue("quad", {})
    assert wait_settled(saga_id) == [SagaState.COMPLETED]
    before_runs = runtime.store.step_runs(saga_id)
    before_calls = len(ledger_calls(saga_id))
    assert before_calls == 4

    for run in before_runs:  # the same message (same task id) twice more, after the end
        for _ in range(2):
            runtime.app.send_task(
                run.task_name,
                args=[saga_id, run.id],
                task_id=run.message_id,
                queue=settings.queue,
            )
    wait_for("8 dropped events", lambda: len(dropped(runtime, saga_id)) >= 8)

    drops = dropped(runtime, saga_id)
    assert Counter(e.step_run_id for e in drops) == {r.id: 2 for r in before_runs}
    assert all(e.kind == "step.dropped" and "succeeded" in e.message for e in drops)
    assert runtime.store.step_runs(saga_id) == before_runs  # same rows, same deliveries
    assert len(ledger_calls(saga_id)) == before_calls
    assert ledger_steps(saga_id, "do") == list(QUAD)
    assert runtime.store.get_saga_or_raise(saga_id).state is SagaState.COMPLETED


@pytest.mark.parametrize(
    ("inp", "state", "done", "undone"),
    [
        ({}, SagaState.COMPLETED, list(QUAD), []),
        ({"simulate": {"flaky": {"s2": 1}}}, SagaState.COMPLETED, list(QUAD), []),
        ({"simulate": {"fail": "s3"}}, SagaState.COMPENSATED, ["s1", "s2"], ["s2", "s1"]),
    ],
    ids=["happy", "retried", "rolled_back"],
)
def test_every_message_published_twice_lands_every_effect_once(
    runtime, worker, wait_settled, inp, state, done, undone
):
    with publishing_each(runtime, 2):
        saga_id = runtime.engine.enqueue("quad", inp)
        assert wait_settled(saga_id) == [state]
        runs = runtime.store.step_runs(saga_id)
        # Each run's duplicate was delivered and dropped by the claim guard.
        wait_for("one drop per run", lambda: len(dropped(runtime, saga_id)) >= len(runs))

    assert Counter(e.step_run_id for e in dropped(runtime, saga_id)) == {r.id: 1 for r in runs}
    assert ledger_steps(saga_id, "do") == done
    assert ledger_steps(saga_id, "undo") == undone
    assert ledger_calls(saga_id) == ledger.effects(saga_id=saga_id)  # no replay reached it
    assert [r.deliveries for r in runs] == [1] * len(runs)
    assert runtime.store.step_runs(saga_id) == runs


# -- idempotency keys -----------------------------------------------------------------------


def test_idempotency_keys_are_structural_and_reach_the_step(runtime, worker, wait_settled):
    a = runtime.engine.enqueue("quad", {"simulate": {"flaky": {"s2": 1}, "fail": "s3"}})
    b = runtime.engine.enqueue("quad", {})
    assert wait_settled(a, b) == [SagaState.COMPENSATED, SagaState.COMPLETED]

    s2 = runs_of(runtime, a, "s2", FWD)
    assert len(s2) == 2 and s2[0].idempotency_key == s2[1].idempotency_key
    (undo_s2,) = runs_of(runtime, a, "s2", COMP)
    assert undo_s2.idempotency_key == idempotency_key(a, "s2", COMP)
    assert undo_s2.idempotency_key != s2[0].idempotency_key

    for saga_id in (a, b):
        for r in runtime.store.step_runs(saga_id):
            assert r.idempotency_key == idempotency_key(saga_id, r.step, r.direction), r
            assert len(r.idempotency_key) == 64 and int(r.idempotency_key, 16) >= 0
    keys_a = {(r.step, r.direction): r.idempotency_key for r in runtime.store.step_runs(a)}
    keys_b = {(r.step, r.direction): r.idempotency_key for r in runtime.store.step_runs(b)}
    assert len(set(keys_a.values())) == len(keys_a)  # one key per (step, direction)
    assert not set(keys_a.values()) & set(keys_b.values())  # never shared between sagas

    # The key the step code saw is the stored one.
    calls = ledger_calls(a) + ledger_calls(b)
    assert len(calls) == 2 + 2 + 4  # a: do s1, s2 · undo s2, s1; b: do s1..s4
    for call in calls:
        direction = FWD if call.op == "do" else COMP
        keys = keys_a if call.saga_id == a else keys_b
        assert call.key == keys[(call.step, direction)], call


# -- bad messages ---------------------------------------------------------------------------

NO_SAGA = "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize("which", ["no_saga_no_run", "no_run", "run_of_another_saga"])
def test_message_for_a_saga_or_run_that_does_not_exist_is_dropped(
    runtime, worker, settings, wait_settled, redis_base_url, redis_prefix, caplog, which
):
    caplog.set_level(logging.WARNING, logger="sagaq.engine")
    other = runtime.engine.enqueue("quad", {})
    assert wait_settled(other) == [SagaState.COMPLETED]
    real_run = runtime.store.step_runs(other)[0].id
    saga_id, run_id = {
        "no_saga_no_run": (NO_SAGA, 999_999),
        "no_run": (other, 999_999),
        "run_of_another_saga": (NO_SAGA, real_run),
    }[which]
    before = count_rows(runtime.store.engine)
    task_id = str(uuid.uuid4())

    runtime.app.send_task(
        "sagaq.quad.s1", args=[saga_id, run_id], task_id=task_id, queue=settings.queue
    )
    needle = f"no step run {run_id} of saga {saga_id}"
    wait_for("the warning", lambda: any(needle in r.getMessage() for r in caplog.records))
    client = redis.Redis.from_url(redis_base_url)
    wait_for(
        "the message to be acknowledged",
        lambda: not any(task_id.encode() in v for v in client.hvals(f"{redis_prefix}unacked")),
    )

    assert count_rows(runtime.store.engine) == before
    assert len(ledger_calls(other)) == 4  # nothing ran again
    after = runtime.engine.enqueue("quad", {})  # the worker keeps working
    assert wait_settled(after) == [SagaState.COMPLETED]
    assert ledger_steps(after, "do") == list(QUAD)


# -- one active step per saga ---------------------------------------------------------------


def test_two_workers_racing_on_duplicates_never_overlap_steps(runtime, worker, wait_settled):
    ran_on: list[int] = []  # the thread of every task run, to tell the two workers apart

    def note_thread(**_: Any) -> None:
        ran_on.append(threading.get_ident())

    signals.task_prerun.connect(note_thread, weak=False)
    try:
        with (
            embedded_worker(runtime.app, concurrency=4, hostname="second@test") as second,
            publishing_each(runtime, 3),
        ):
            ids = [runtime.engine.enqueue("racer", {"hold": 0.01}) for _ in range(6)]
            assert wait_settled(*ids) == [SagaState.COMPLETED] * len(ids)
            # Every run had two extra copies; wait until both were delivered and dropped.
            for saga_id in ids:
                wait_for("two drops per run", lambda s=saga_id: len(dropped(runtime, s)) >= 10)
            pools = [{t.ident for t in w.pool.executor._threads} for w in (worker, second)]
    finally:
        signals.task_prerun.disconnect(note_thread)

    # Both workers took messages (a race with one worker would prove nothing).
    assert len(ran_on) == 6 * 5 * 3
    assert all(any(t in pool for t in ran_on) for pool in pools)
    assert test_sagas.overlaps == []
    steps = ["r1", "r2", "r3", "r4", "r5"]
    for saga_id in ids:
        assert ledger_steps(saga_id, "race") == steps
        assert ledger_calls(saga_id) == ledger.effects(saga_id=saga_id)
        runs = runtime.store.step_runs(saga_id)
        assert [(r.step, r.status, r.deliveries) for r in runs] == [(s, OK, 1) for s in steps]
        assert Counter(e.step_run_id for e in dropped(runtime, saga_id)) == {r.id: 2 for r in runs}
        assert kinds(runtime, saga_id, "step.claimed") == ["step.claimed"] * 5


def test_the_database_refuses_a_second_active_step_run(make_database, settings):
    store = Store(create_engine(make_database("one_active")))
    try:
        saga_id = str(uuid.uuid4())
        quad = test_sagas.quad

        def new_run(step: str, index: int) -> NewRun:
            return NewRun(
                step=step,
                step_index=index,
                direction=FWD,
                attempt=1,
                task_name=f"sagaq.quad.{step}",
                idempotency_key=idempotency_key(saga_id, step),
                compensate_task=f"sagaq.quad.{step}.compensate",
            )

        created, fresh, dispatches = store.create_saga(
            saga_id=saga_id,
            name="quad",
            version=quad.version,
            input={},
            key=None,
            first=new_run("s1", 0),
        )
        assert (created, fresh, len(dispatches)) == (saga_id, True, 1)
        (first,) = store.step_runs(saga_id)
        runs = StepRunModel.__table__

        def insert(status: str) -> None:
            with store.engine.begin() as conn:
                conn.execute(
                    sa.insert(runs).values(
                        saga_id=saga_id,
                        step="s2",
                        step_index=1,
                        direction="forward",
                        attempt=1,
                        status=status,
                        task_name="sagaq.quad.s2",
                        idempotency_key=idempotency_key(saga_id, "s2"),
                        message_id=str(uuid.uuid4()),
                        deliveries=0,
                        scheduled_at=first.scheduled_at,
                    )
                )

        for status in ("scheduled", "running"):
            with pytest.raises(sa.exc.IntegrityError, match="uq_sagaq_step_runs_one_active"):
                insert(status)

        claim = store.claim(saga_id, first.id, worker="test", task_id=None, lease=30)
        assert claim.run is not None and claim.run.status is StepStatus.RUNNING
        for status in ("scheduled", "running"):
            with pytest.raises(sa.exc.IntegrityError, match="uq_sagaq_step_runs_one_active"):
                insert(status)

        insert("failed")  # finished runs are not limited
        assert [r.status for r in store.step_runs(saga_id)] == [
            StepStatus.RUNNING,
            StepStatus.FAILED,
        ]
    finally:
        store.dispose()


def test_a_secret_is_sealed_at_rest_whole_for_later_steps_and_masked_when_shown(
    runtime, worker, wait_settled
):
    """inject_credentials returns a Secret token: sealed in the database, a Secret again
    when the engine reads it back for a step, and *** in `sagaq show`."""
    from sagaq.commands import story
    from sagaq.secrets import Secret

    saga_id = runtime.engine.enqueue("provision_agent", {"agent": "sec-1"})
    assert wait_settled(saga_id) == [SagaState.COMPLETED]
    (run,) = runs_of(runtime, saga_id, "inject_credentials", FWD)
    sealed = run.result["token"]
    assert set(sealed) == {"$secret"}
    opened = runtime.engine.box.open(run.result)
    assert isinstance(opened["token"], Secret)
    assert opened["token"].reveal().startswith("tok-") and "tok-" not in json.dumps(run.result)
    shown = json.dumps(story(runtime.store, saga_id).to_json())
    assert "tok-" not in shown and '"***"' in shown


def test_a_secret_quoted_in_a_step_error_is_stored_logged_and_paged_redacted(
    runtime, worker, wait_settled, caplog
):
    caplog.set_level(logging.DEBUG)
    saga_id = runtime.engine.enqueue("leaky_secret", {})
    assert wait_settled(saga_id) == [SagaState.COMPENSATED]
    clear = f"tok-{saga_id[:8]}-s3cr3t-value"
    (failed,) = [r for r in runtime.store.step_runs(saga_id) if r.step == "use_token"]
    assert failed.error is not None and "401 Unauthorized" in failed.error  # the rest stays
    everything = json.dumps([
        [r.error for r in runtime.store.step_runs(saga_id)],
        [(e.message, e.data) for e in runtime.store.events(saga_id)],
        [(n.subject, n.note, n.last_error) for n in runtime.store.notifications(saga_id)],
        runtime.store.get_saga_or_raise(saga_id).error,
    ], default=str)
    assert clear not in everything
    assert not [r for r in caplog.records if clear in r.getMessage()]
