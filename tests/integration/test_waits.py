"""Long waits live in Postgres (DESIGN §4.10): a backoff longer than a countdown may carry is a
``wake_at`` on the saga row, never a message parked in Redis, and the reconciler wakes it.

These tests run on a database, a Celery queue and a Redis key prefix of their own, so that
"wipe Redis" can mean deleting every key of this key space (a FLUSHALL of a shared server would
hit other test runs) and so that the reconciler sees only the sagas started here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from sagaq import Runtime, SagaState, Settings, StepStatus
from sagaq.notify import LogNotifier
from sagaq.reconciler import Sweep
from sagaq.worker import embedded_worker
from tests.sagas import ledger

NAP_ONCE = {"simulate": {"flaky": {"nap": 1}}}  # fails once; the retry waits 2 s (base=cap=2)


@pytest.fixture(scope="module")
def waits_settings(settings: Settings, make_database, redis_prefix: str) -> Settings:
    return settings.with_(
        database_url=make_database("waits"),
        queue=f"{settings.queue}-waits",
        redis_prefix=f"{redis_prefix}waits:",  # inside the run's prefix: cleaned up with it
    )


@pytest.fixture
def redis_client(redis_base_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_base_url)
    yield client
    client.close()


@pytest.fixture
def runtimes(waits_settings: Settings) -> Iterator[Callable[[], Runtime]]:
    """Make runtimes (one per "process"); all are closed at the end of the test."""
    made: list[Runtime] = []

    def make() -> Runtime:
        rt = Runtime(waits_settings, notifiers=[LogNotifier()])
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def states(rt: Runtime, *saga_ids: str) -> list[SagaState]:
    return [rt.store.get_saga_or_raise(s).state for s in saga_ids]


def wait_states(rt: Runtime, state: SagaState, *saga_ids: str) -> None:
    wait_for(f"{len(saga_ids)} saga(s) to be {state.value}",
             lambda: states(rt, *saga_ids) == [state] * len(saga_ids))  # fmt: skip


def wait_until_due(rt: Runtime, *saga_ids: str) -> None:
    latest = max(rt.store.get_saga_or_raise(s).wake_at for s in saga_ids)
    assert latest is not None
    wait_for("the wake-up time", lambda: datetime.now(UTC) >= latest)


def keys_holding(client: redis.Redis, prefix: str, needle: str) -> list[str]:
    """Every key of this key space whose value mentions ``needle`` (a message id)."""
    found = []
    for key in client.scan_iter(match=f"{prefix}*"):
        kind = client.type(key).decode()
        if kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = client.hvals(key)
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "string":
            values = [client.get(key) or b""]
        else:
            values = []
        if any(needle.encode() in v for v in values):
            found.append(key.decode())
    return found


def saga_events(rt: Runtime, saga_id: str) -> list[tuple[str, Any]]:
    return [
        (e.kind, e.data.get("trigger"))
        for e in rt.store.events(saga_id)
        if e.kind.startswith("saga.")
    ]


WOKEN_STORY = [
    ("saga.enqueued", None),
    ("saga.running", "start"),
    ("saga.waiting", "wait"),
    ("saga.running", "wake"),
    ("saga.completed", "finish"),
]


def test_a_long_backoff_waits_in_postgres_and_survives_a_worker_restart_and_a_redis_wipe(
    runtimes, waits_settings, redis_client
):
    prefix, queue = waits_settings.redis_prefix, waits_settings.queue
    first = runtimes()
    with embedded_worker(first.app, concurrency=2, hostname="waits-1@test"):
        saga_id = first.engine.enqueue("sleepy", NAP_ONCE)
        wait_states(first, SagaState.WAITING, saga_id)

        record = first.store.get_saga_or_raise(saga_id)
        failed, scheduled = first.store.step_runs(saga_id)
        assert (failed.attempt, failed.status) == (1, StepStatus.FAILED)
        assert (scheduled.attempt, scheduled.status) == (2, StepStatus.SCHEDULED)
        assert record.wake_at is not None and scheduled.not_before == record.wake_at
        assert failed.finished_at is not None
        # the step's bounds say 2 s, more than countdown_max: a durable wait, 2 s after the failure
        assert waits_settings.countdown_max < 2.0
        delay = (record.wake_at - failed.finished_at).total_seconds()
        assert delay == pytest.approx(2.0, abs=0.01)
        (step_scheduled,) = [
            e for e in first.store.events(saga_id)
            if e.kind == "step.scheduled" and e.step_run_id == scheduled.id
        ]  # fmt: skip
        assert step_scheduled.data["delay"] == pytest.approx(2.0)

        # The message for the retry is in the outbox (Postgres), not in Redis.
        assert first.store.count_outbox(saga_id) == 1
        messages = redis_client.lrange(f"{prefix}{queue}", 0, -1)
        assert not any(scheduled.message_id.encode() in m for m in messages)
        assert not any(
            scheduled.message_id.encode() in v for v in redis_client.hvals(f"{prefix}unacked")
        )
        assert keys_holding(redis_client, prefix, scheduled.message_id) == []

        # An early (or duplicate) message for the waiting run is dropped, and says why.
        assert [e for e in first.store.events(saga_id) if e.kind == "step.dropped"] == []
        first.app.send_task(
            scheduled.task_name,
            args=[saga_id, scheduled.id],
            task_id=scheduled.message_id,
            queue=queue,
        )

        def drops() -> list[Any]:
            return [
                e for e in first.store.events(saga_id)
                if e.kind == "step.dropped" and e.step_run_id == scheduled.id
            ]  # fmt: skip

        wait_for("the early message to be dropped", lambda: len(drops()) == 1)
        assert "waiting" in drops()[0].message
        (_, still) = first.store.step_runs(saga_id)
        assert (still.status, still.deliveries) == (StepStatus.SCHEDULED, 0)
        assert states(first, saga_id) == [SagaState.WAITING]
        assert [c.op for c in ledger.calls if c.saga_id == saga_id] == []

    # The worker is gone, and so is everything this run's key space held in Redis.
    for key in list(redis_client.scan_iter(match=f"{prefix}*")):
        redis_client.delete(key)
    assert list(redis_client.scan_iter(match=f"{prefix}*")) == []

    second = runtimes()  # a new process: a new worker, and a reconciler pass once it is due
    with embedded_worker(second.app, concurrency=2, hostname="waits-2@test"):
        assert states(second, saga_id) == [SagaState.WAITING]
        wait_until_due(second, saga_id)
        sweep = second.reconcile()
        assert sweep.summary()["woken"] == 1
        wait_states(second, SagaState.COMPLETED, saga_id)

    assert saga_events(second, saga_id) == WOKEN_STORY
    (wake,) = [e for e in second.store.events(saga_id) if e.data.get("trigger") == "wake"]
    assert wake.worker == "reconciler"
    runs = second.store.step_runs(saga_id)
    assert [(r.attempt, r.status, r.deliveries) for r in runs] == [
        (1, StepStatus.FAILED, 1),
        (2, StepStatus.SUCCEEDED, 1),
    ]
    assert runs[1].id == scheduled.id  # the same run, not a new one
    assert [(c.step, c.op) for c in ledger.effects(saga_id=saga_id)] == [("nap", "nap")]
    assert second.store.get_saga_or_raise(saga_id).wake_at is None
    assert second.store.count_outbox(saga_id) == 0


def test_two_reconcilers_at_once_wake_each_saga_once(runtimes):
    worker_rt, beat_a, beat_b = runtimes(), runtimes(), runtimes()
    with embedded_worker(worker_rt.app, concurrency=4, hostname="waits-3@test"):
        ids = [worker_rt.engine.enqueue("sleepy", NAP_ONCE) for _ in range(6)]
        wait_states(worker_rt, SagaState.WAITING, *ids)
        wait_until_due(worker_rt, *ids)

        start = threading.Barrier(2)
        sweeps: list[Sweep] = []
        errors: list[BaseException] = []

        def beat(rt: Runtime) -> None:
            try:
                start.wait(5)
                sweeps.append(rt.reconcile())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=beat, args=(rt,)) for rt in (beat_a, beat_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert errors == [] and len(sweeps) == 2
        wait_states(worker_rt, SagaState.COMPLETED, *ids)

    assert sum(s.summary()["woken"] for s in sweeps) == len(ids)
    for saga_id in ids:
        assert saga_events(worker_rt, saga_id) == WOKEN_STORY, saga_id
        runs = worker_rt.store.step_runs(saga_id)
        assert [(r.attempt, r.status, r.deliveries) for r in runs] == [
            (1, StepStatus.FAILED, 1),
            (2, StepStatus.SUCCEEDED, 1),
        ], saga_id
        assert [c.op for c in ledger.effects(saga_id=saga_id)] == ["nap"]
        drops = [e for e in worker_rt.store.events(saga_id) if e.kind == "step.dropped"]
        assert drops == [], saga_id  # no second wake published a second message
