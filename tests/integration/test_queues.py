"""A saga or a step chooses its Celery queue (issue 12.5): heavy steps on their own workers;
the broker's redelivery limit (Redis visibility timeout, RabbitMQ consumer_timeout) is
checked against every step's time limit at start-up."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from sagaq import (
    ConfigurationError,
    DefinitionError,
    Registry,
    Runtime,
    Saga,
    SagaState,
    StepStatus,
)
from sagaq.notify import LogNotifier
from sagaq.store import StepRunRecord
from sagaq.worker import embedded_worker


def test_a_step_with_its_own_queue_runs_only_on_the_workers_of_that_queue(settings) -> None:
    tag = uuid.uuid4().hex[:8]
    heavy = f"heavy-{tag}"
    private = Registry()
    saga = Saga("queued_work", registry=private)
    saga.step(name="light", side_effect=False)(lambda ctx, inp: {"light": True})
    saga.step(name="crunch", side_effect=False, queue=heavy)(lambda ctx, inp: {"heavy": True})
    saga.step(name="after", side_effect=False)(lambda ctx, inp: None)
    rt = Runtime(settings.with_(queue=f"{settings.queue}-q-{tag}"), registry=private,
                 notifiers=[LogNotifier()])
    try:
        assert rt.app.tasks["sagaq.queued_work.crunch"].queue == heavy
        assert rt.app.tasks["sagaq.queued_work.light"].queue == rt.settings.queue
        # send_task by hand is routed the same way
        assert rt.app.amqp.router.route({}, "sagaq.queued_work.crunch")["queue"].name == heavy

        saga_id = rt.engine.enqueue("queued_work", {})
        with embedded_worker(rt.app, concurrency=1, hostname=f"light-{tag}@test"):
            wait_until(rt, saga_id, lambda runs: len(runs) == 2 and ok(runs[0]))
            time.sleep(1.0)  # the light worker is idle, and leaves the heavy step alone
            assert not_taken(rt.store.step_runs(saga_id)[1])

        with embedded_worker(rt.app, concurrency=1, hostname=f"heavy-{tag}@test",
                             queues=[heavy]):
            # What Flower and `celery inspect active_queues` show of the heavy worker
            replies = rt.app.control.inspect(
                destination=[f"heavy-{tag}@test"], timeout=5.0
            ).active_queues() or {}
            assert [q["name"] for q in replies[f"heavy-{tag}@test"]] == [heavy], replies
            wait_until(rt, saga_id, lambda runs: len(runs) == 3 and ok(runs[1]))
            time.sleep(1.0)  # ... and the heavy worker leaves the next (default) step alone
            assert not_taken(rt.store.step_runs(saga_id)[2])

        with embedded_worker(rt.app, concurrency=1, hostname=f"light-{tag}@test"):
            wait_until(rt, saga_id, lambda runs: len(runs) == 3 and ok(runs[2]))
        assert rt.store.get_saga_or_raise(saga_id).state is SagaState.COMPLETED
    finally:
        rt.close()


def ok(run: StepRunRecord) -> bool:
    return run.status is StepStatus.SUCCEEDED


def not_taken(run: StepRunRecord) -> bool:
    return run.status is StepStatus.SCHEDULED and run.deliveries == 0


def wait_until(rt: Runtime, saga_id: str, check: Callable[[list[StepRunRecord]], bool],
               timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check(rt.store.step_runs(saga_id)):
        assert time.monotonic() < deadline, rt.store.step_runs(saga_id)
        time.sleep(0.05)


def test_a_saga_queue_is_the_default_of_its_steps_and_names_are_checked() -> None:
    private = Registry()
    saga = Saga("all_heavy", registry=private, queue="gpu")
    saga.step(name="one", side_effect=False)(lambda ctx, inp: None)
    saga.step(name="two", side_effect=False, queue="cpu")(lambda ctx, inp: None)
    assert [s.queue for s in saga.steps] == ["gpu", "cpu"]
    with pytest.raises(DefinitionError, match="queue 'no spaces' is not a queue name"):
        Saga("badly_queued", registry=private).step(
            name="x", side_effect=False, queue="no spaces")(lambda ctx, inp: None)


@pytest.mark.parametrize(
    ("broker", "var"),
    [("amqp://guest:guest@127.0.0.1:5672//", "SAGAQ_CONSUMER_TIMEOUT=40s"),
     ("redis://127.0.0.1:6379/0", "SAGAQ_VISIBILITY_TIMEOUT=40s")],
    ids=["rabbitmq", "redis"],
)
def test_a_step_longer_than_the_brokers_redelivery_limit_is_refused(settings, broker,
                                                                    var) -> None:
    private = Registry()
    Saga("too_long", registry=private).step(name="crawl", no_rollback="t", timeout=39.5)(
        lambda ctx, inp: None)
    tight = settings.with_(broker_url=broker, visibility_timeout=40.0, consumer_timeout=40.0,
                           step_timeout=5.0, lease_margin=1.0)
    rt = Runtime(tight, registry=private, notifiers=[LogNotifier()])
    try:
        with pytest.raises(ConfigurationError) as refused:
            rt.app  # noqa: B018 - building the Celery app runs the check
    finally:
        rt.close()
    assert "step too_long.crawl may run 40.5s" in str(refused.value)
    assert var in str(refused.value)


def test_rabbitmq_only_checks_its_consumer_timeout(settings) -> None:
    """On RabbitMQ a step may run past the (Redis-only) visibility timeout, not past
    consumer_timeout."""
    private = Registry()
    Saga("long_on_rabbit", registry=private).step(name="crawl", no_rollback="t",
                                                  timeout=100.0)(lambda ctx, inp: None)
    fits = settings.with_(broker_url="amqp://guest:guest@127.0.0.1:5672//",
                          visibility_timeout=60.0, consumer_timeout=1800.0)
    rt = Runtime(fits, registry=private, notifiers=[LogNotifier()])
    try:
        assert "sagaq.long_on_rabbit.crawl" in rt.app.tasks
    finally:
        rt.close()
