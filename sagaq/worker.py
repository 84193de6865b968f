"""Celery integration: the app factory, one task per step and per compensation, the publisher.

The only module that imports Celery. Tasks are thin shims over :meth:`Engine.execute`;
their arguments are ids only (``saga_id, step_run_id``) and their names say what runs
(``sagaq.<saga>.<step>`` and ``sagaq.<saga>.<step>.compensate``), so Flower shows them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol

from celery import Celery, signals
from celery import _state as celery_state
from celery.concurrency.thread import TaskPool as ThreadTaskPool
from celery.worker import WorkController
from kombu.asynchronous import set_event_loop

from sagaq.definition import Registry, Saga, Step
from sagaq.engine import Engine
from sagaq.errors import ConfigurationError
from sagaq.machine import Direction
from sagaq.settings import Settings
from sagaq.store import Dispatch, Store
from sagaq.store.lifecycle import NOTIFY_TASK, RELEASE_TASK

RECONCILE_TASK = "sagaq.reconcile"
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp", "librabbitmq")

log = logging.getLogger("sagaq.worker")


class _Summary(Protocol):
    def summary(self) -> dict[str, int]: ...


class Host(Protocol):
    """What the worker needs of the runtime that hosts it; :class:`sagaq.runtime.Runtime`
    satisfies it structurally, so this module never imports the one above it."""

    settings: Settings
    registry: Registry
    store: Store
    engine: Engine

    def record_policy(self, worker: str) -> None: ...
    def deliver(self, notification_id: int) -> str: ...
    def reconcile(self) -> _Summary: ...
    def release(self, resource_id: int) -> str: ...


def celery_config(runtime: Host) -> dict[str, Any]:
    s = runtime.settings
    transport: dict[str, Any] = {"visibility_timeout": s.visibility_timeout}
    if s.redis_prefix:
        transport["global_keyprefix"] = s.redis_prefix
    if s.broker_url.startswith("memory://"):
        transport["polling_interval"] = 0.01  # in-process queue: poll often, it is cheap
    return {
        "broker_url": s.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # JSON only, never pickle (DESIGN §4.11); arguments are ids only.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        # A message is acknowledged after the step ran; a killed child requeues it; one
        # message per process at a time (DESIGN §9).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": s.queue,
        # Flower's live view: workers report received / started / succeeded. "Sent" events
        # would cost every publish a second message; the outbox already says what was sent.
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "task_track_started": True,
        # The only schedule is "reconcile every N s": nothing worth a celerybeat-schedule
        # file in the current directory. A tick lost to a restart is harmless.
        "beat_scheduler": "celery.beat:Scheduler",
    }


def create_app(runtime: Host, *, main: str = "sagaq") -> Celery:
    """A Celery app with a task for every step of every saga in the runtime's registry."""
    check_time_limits(runtime)
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(runtime))
    app.sagaq_runtime = runtime
    for saga in runtime.registry:
        register_saga(app, runtime, saga)
    _register_edges(app, runtime)

    def _after_fork(**_: Any) -> None:
        # Pooled connections were opened by the parent; the child must not share them.
        runtime.store.dispose(close=False)

    signals.worker_process_init.connect(_after_fork, weak=False)

    def _loaded(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:  # the signal is global: this app's workers
            runtime.record_policy(str(sender.hostname))

    signals.worker_init.connect(_loaded, weak=False)
    return app


def check_time_limits(runtime: Host) -> None:
    """Refuse to start when a step may run past the broker's redelivery limit.

    Redis redelivers an unacknowledged message after its visibility timeout: the claim would
    drop the copy, but only by luck of timing. RabbitMQ closes the channel of a consumer that
    holds a message past its ``consumer_timeout`` (30 min by default), and requeues
    everything it held. Say which step, and what to change.
    """
    s = runtime.settings
    var, ceiling = broker_limit(s.broker_url, s.visibility_timeout, s.consumer_timeout)
    if s.countdown_max >= ceiling:
        raise ConfigurationError(
            f"SAGAQ_COUNTDOWN_MAX={s.countdown_max:g}s is not below {var}={ceiling:g}s: a "
            "countdown message is held unacknowledged and would be redelivered"
        )
    for saga in runtime.registry:
        for step in saga.steps:
            limit = (step.timeout or s.step_timeout) + s.lease_margin
            if limit >= ceiling:
                raise ConfigurationError(
                    f"step {saga.name}.{step.name} may run {limit:g}s (timeout + "
                    f"SAGAQ_LEASE_MARGIN), not below {var}={ceiling:g}s: lower its timeout "
                    f"or raise {var}"
                    + (" (and the broker's consumer_timeout)" if "CONSUMER" in var else "")
                )


def broker_limit(url: str, visibility: float, consumer: float) -> tuple[str, float]:
    """The setting that bounds how long a message may stay unacknowledged, and its value."""
    if url.split("://", 1)[0] in AMQP_SCHEMES:
        return "SAGAQ_CONSUMER_TIMEOUT", consumer
    return "SAGAQ_VISIBILITY_TIMEOUT", visibility


def _register_edges(app: Celery, runtime: Host) -> None:
    """The notification task and the reconciler's beat task."""

    def notify(saga_id: str, notification_id: int) -> str:
        return runtime.deliver(int(notification_id))

    def reconcile() -> dict[str, int]:
        return runtime.reconcile().summary()

    def release(saga_id: str, resource_id: int) -> str:
        return runtime.release(int(resource_id))

    app.task(name=RELEASE_TASK, shared=False, acks_late=True,
             reject_on_worker_lost=True, soft_time_limit=300, time_limit=330)(release)

    app.task(name=NOTIFY_TASK, shared=False, acks_late=True,
             reject_on_worker_lost=True, soft_time_limit=60, time_limit=90)(notify)
    # A missed beat tick is harmless (the next one sweeps the same rows): let it expire.
    app.task(name=RECONCILE_TASK, shared=False, soft_time_limit=120, time_limit=150,
             expires=max(runtime.settings.reconcile_interval, 1.0))(reconcile)

    # A step with its own queue= is routed there, also when sent by hand with send_task.
    app.conf.task_routes = {
        name: {"queue": queue} for name, queue in step_queues(runtime).items()
    }
    app.conf.beat_schedule = {
        "sagaq-reconcile": {
            "task": RECONCILE_TASK,
            "schedule": runtime.settings.reconcile_interval,
            "options": {"queue": runtime.settings.queue},
        }
    }


def step_queues(runtime: Host) -> dict[str, str]:
    """Task name -> queue, for the steps (and compensations) declared with ``queue=``."""
    found: dict[str, str] = {}
    for saga in runtime.registry:
        for step in saga.steps:
            if step.queue:
                for name in (step.task_name, step.compensate_task_name):
                    if name:
                        found[name] = step.queue
    return found


def register_saga(app: Celery, runtime: Host, saga: Saga) -> None:
    for step in saga.steps:
        _register(app, runtime, step, Direction.FORWARD)
        if step.compensate is not None:
            _register(app, runtime, step, Direction.COMPENSATE)


def _register(app: Celery, runtime: Host, step: Step, direction: Direction) -> None:
    name = step.task_name if direction is Direction.FORWARD else step.compensate_task_name
    if name is None or name in app.tasks:
        return
    timeout = step.timeout or runtime.settings.step_timeout

    def run(task: Any, saga_id: str, step_run_id: int) -> str:
        worker = f"{task.request.hostname or 'local'}/{os.getpid()}"
        return runtime.engine.execute(
            str(saga_id), int(step_run_id), step=step, worker=worker, task_id=task.request.id
        )

    run.__name__ = run.__qualname__ = name.replace(".", "_")  # must be an identifier
    run.__doc__ = f"{direction.value} of step {step.name!r} of saga {step.saga!r}"
    app.task(
        name=name,
        shared=False,  # bound to this runtime: never lent to other apps in the process
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        queue=step.queue or runtime.settings.queue,
        soft_time_limit=timeout,  # raises inside the step: a transient failure
        time_limit=timeout + runtime.settings.lease_margin / 2,  # kills it: lease expires
    )(run)


class CeleryPublisher:
    """Publishes dispatches with the message id the outbox row holds."""

    def __init__(self, app: Callable[[], Celery], queue: str) -> None:
        self._app = app
        self._queue = queue

    def __call__(self, dispatches: Sequence[Dispatch]) -> None:
        app = self._app()
        # RabbitMQ drops a message for a queue nobody declared yet: name the queue, so that
        # Celery declares it. Redis needs no declaration: straight into the list.
        amqp = app.conf.broker_url.split("://", 1)[0] in AMQP_SCHEMES
        with app.producer_or_acquire() as producer:
            for d in dispatches:
                task = app.tasks.get(d.task_name)
                queue = getattr(task, "queue", None) or self._queue  # a step's own queue=
                app.send_task(
                    d.task_name,
                    args=list(d.args),
                    task_id=d.message_id,
                    countdown=d.countdown or None,
                    # Straight into the queue: the default exchange needs no binding lookup
                    # in Redis per message, and a flushed Redis has no bindings to lose.
                    **({"queue": queue} if amqp else {"exchange": "", "routing_key": queue}),
                    producer=producer,
                )


class _AppThreads(ThreadTaskPool):  # type: ignore[misc]
    """Celery's threads pool, each thread tracing tasks through this worker's own app.

    Pool threads trace tasks through ``current_app``, which is the process default unless the
    thread set its own: two embedded workers of different apps in one process would otherwise
    run each other's tasks through whichever app was made the default last.
    """

    executor: ThreadPoolExecutor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.executor.shutdown(wait=False)
        app = self.app
        self.executor = ThreadPoolExecutor(
            max_workers=self.limit, initializer=app.set_current if app is not None else None
        )


class _EmbeddedWorker(WorkController):  # type: ignore[misc]
    """A worker that signals when its consumer is ready (for threads in one process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.ready.set()


@contextmanager
def embedded_worker(
    app: Celery,
    *,
    concurrency: int = 2,
    pool: str = "threads",
    hostname: str | None = None,
    loglevel: str = "WARNING",
    queues: Sequence[str] | None = None,
) -> Iterator[WorkController]:
    """Run a real Celery worker in a background thread of this process, consuming
    ``queues`` (default: SAGAQ_QUEUE)."""
    app.finalize()
    # Pool threads trace tasks through their current app: the threads pool below sets it to
    # this app in each of its threads. The default app is this one while the worker runs
    # (for any other pool), and is put back afterwards.
    previous_default = celery_state.default_app
    app.set_default()
    # Celery's Hub step reuses kombu's process-global event loop if one is set: a second
    # worker in this process would share (and, on stop, close) the first one's loop.
    set_event_loop(None)
    worker = _EmbeddedWorker(
        app=app,
        concurrency=concurrency,
        pool=_AppThreads if pool == "threads" else pool,
        hostname=hostname or f"embedded-{os.getpid()}-{threading.get_ident()}@localhost",
        loglevel=loglevel,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        queues=list(queues or [app.conf.task_default_queue]),
        ready_callback=None,
    )
    thread = threading.Thread(target=worker.start, name="sagaq-worker", daemon=True)
    thread.start()
    if not worker.ready.wait(30):
        raise RuntimeError("the embedded Celery worker did not start within 30 s")
    try:
        yield worker
    finally:
        worker.stop(in_sighandler=False)
        thread.join(30)
        if celery_state.default_app is app:
            celery_state.set_default_app(previous_default)
