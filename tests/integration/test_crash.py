"""Crash recovery (DESIGN §4.1, §4.3, §4.8, §9): workers SIGKILLed mid-effect, Redis wiped,
a publish lost after its commit, a step that kills its worker every time, warm shutdown,
a broker connection cut mid-step, heartbeats, and the start-up check of time limits against
the visibility timeout.

Every test here runs on a database, a Celery queue and a Redis key prefix of its own, so
that the session's in-process worker never takes its messages, "FLUSHALL" can mean deleting
every key of the test's own prefix (the Redis server is shared with other test runs), and the
reconciler passes the test runs (``rt.reconcile()`` in a loop, instead of waiting for beat)
see only the sagas started here. Workers that get killed are real ``celery -A sagaq worker``
subprocesses (prefork), started in a session of their own and SIGKILLed as a process group;
their steps write to the loopback stand-in of :mod:`bench.standin`, which counts every
effect by idempotency key across processes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import sqlalchemy as sa

from bench.standin import StandIn
from sagaq import (
    ConfigurationError,
    Direction,
    Registry,
    Runtime,
    Saga,
    SagaState,
    Settings,
    StepStatus,
)
from sagaq.notify import LogNotifier
from sagaq.notify.base import Notifier
from sagaq.store import Dispatch, EventRecord, StepRunRecord
from sagaq.store.models import OUTBOX
from sagaq.worker import embedded_worker
from tests import crash_sagas, services
from tests.crash_sagas import URL_VAR

ROOT = Path(__file__).resolve().parents[2]
FWD, COMP = Direction.FORWARD, Direction.COMPENSATE
RUNNING, OK, UNKNOWN = StepStatus.RUNNING, StepStatus.SUCCEEDED, StepStatus.UNKNOWN
SETTLED = {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_HUMAN}

# Short leases and quick re-publication, so that a test waits seconds, not minutes.
CRASH = {
    "imports": ("tests.crash_sagas",),
    "step_timeout": 3.0,
    "lease_margin": 1.0,  # a lease is 4 s
    "visibility_timeout": 60.0,  # Redis would redeliver an unacked message only after 60 s
    "retries": 3,
    "retry_base": 0.02,
    "retry_cap": 0.1,
    "countdown_max": 1.0,
    "compensation_retries": 2,
    "republish_after": 2.0,
    "rollback_deadline": 3600.0,
    "max_deliveries": 3,
    "reconcile_interval": 0.5,
}
_labels = itertools.count(1)


# -- the harness ----------------------------------------------------------------------------


def env_of(settings: Settings, url: str) -> dict[str, str]:
    """The environment of a worker subprocess: every setting, so both sides agree on leases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAQ_")}
    for f in fields(Settings):
        value = getattr(settings, f.name)
        env[f"SAGAQ_{f.name.upper()}"] = ",".join(value) if isinstance(value, tuple) else str(value)
    env[URL_VAR] = url
    env["PYTHONPATH"] = str(ROOT)
    return env


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """This test's "FLUSHALL": delete every key under its own Redis prefix, and only those.

    The Redis server is shared with other test runs and other people, so a real FLUSHALL is
    never sent; to this test's queue, its unacked hash and its bindings it is the same.
    """
    assert prefix.startswith("sagaq-test-") and prefix.endswith(":"), prefix
    keys = list(client.scan_iter(match=f"{prefix}*"))
    for key in keys:
        client.delete(key)
    return len(keys)


@dataclass
class Harness:
    """A database, queue and Redis prefix of one test; its stand-in, runtimes and workers."""

    settings: Settings
    standin: StandIn
    redis: redis.Redis
    logs: Path
    label: str
    runtimes: list[Runtime] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def configure(self, **changes: Any) -> Settings:
        assert not self.runtimes and not self.procs, "configure before starting anything"
        self.settings = self.settings.with_(**changes)
        return self.settings

    def runtime(self, *notifiers: Notifier) -> Runtime:
        rt = Runtime(self.settings, notifiers=list(notifiers) or [LogNotifier()])
        self.runtimes.append(rt)
        return rt

    def start_worker(self, name: str, *, concurrency: int = 2) -> subprocess.Popen[bytes]:
        """A real ``celery -A sagaq worker`` (prefork) in a process group of its own."""
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "sagaq", "worker", "--pool", "prefork",
             "--concurrency", str(concurrency), "-Q", self.settings.queue,
             "--hostname", f"{name}@crash", "--loglevel", "WARNING", "--without-mingle",
             "--without-gossip", "--without-heartbeat"],
            cwd=ROOT, env=env_of(self.settings, self.standin.url), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the worker and its pool children at once: no warm shutdown, no acks."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def worker_logs(self) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-25:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def wipe_redis(self) -> int:
        """Lose every message of this test: its Redis key space, or its RabbitMQ queue."""
        if self.on_amqp:
            return services.amqp_purge(self.settings.queue, self.settings.broker_url)
        return delete_prefix(self.redis, self.settings.redis_prefix)

    @property
    def on_amqp(self) -> bool:
        return self.settings.broker_url.startswith("amqp")

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        for rt in self.runtimes:
            rt.close()
        if self.on_amqp:
            services.amqp_delete([self.settings.queue], self.settings.broker_url)
        self.wipe_redis()


@contextmanager
def harness(
    label: str,
    settings: Settings,
    make_database: Callable[[str], str],
    redis_prefix: str,
    redis_base_url: str,
    logs: Path,
    monkeypatch: pytest.MonkeyPatch,
    broker: str = "redis",
) -> Iterator[Harness]:
    """A harness on a new database, queue and Redis prefix (or RabbitMQ queue); everything
    is undone after."""
    amqp = {"broker_url": services.require_amqp()} if broker == "rabbitmq" else {}
    own = settings.with_(
        database_url=make_database(label),
        queue=f"{settings.queue}-{label}",
        redis_prefix=f"{redis_prefix}{label}:",  # inside the run's prefix: cleaned up with it
        **CRASH,
        **amqp,
    )
    client = redis.Redis.from_url(redis_base_url)
    with StandIn() as standin:
        monkeypatch.setenv(URL_VAR, standin.url)  # for steps run by in-process workers
        h = Harness(own, standin, client, logs, label)
        try:
            yield h
        finally:
            h.close()
            client.close()


def label_of(request: pytest.FixtureRequest) -> str:
    """A short unique label (database names stop at 63 characters)."""
    name = re.sub(r"[^a-z0-9]", "_", request.node.name.lower()).removeprefix("test_")
    return f"cr{next(_labels)}_{name[:24]}"


@pytest.fixture
def crash(request, settings, make_database, redis_prefix, redis_base_url, tmp_path,
          monkeypatch) -> Iterator[Harness]:
    """The harness on Redis; on RabbitMQ too for tests marked with ``BOTH_BROKERS``."""
    broker = getattr(request, "param", "redis")
    with harness(label_of(request), settings, make_database, redis_prefix, redis_base_url,
                 tmp_path, monkeypatch, broker) as h:
        yield h


# The crash tests that hold for any broker run on Redis and on RabbitMQ.
BOTH_BROKERS = pytest.mark.parametrize("crash", ["redis", "rabbitmq"], indirect=True)


# -- looking at what happened ---------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool], timeout: float = 45.0,
             logs: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                                 + (logs() if logs else ""))
        time.sleep(0.02)


def reconcile_until(rt: Runtime, what: str, check: Callable[[], bool], *, timeout: float = 45.0,
                    logs: Callable[[], str] | None = None) -> list[dict[str, int]]:
    """Run reconciler passes (what beat would do every interval) until ``check`` holds."""
    summaries: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; passes that "
                                 f"did something: {[s for s in summaries if any(s.values())]}\n"
                                 + (logs() if logs else ""))
        summaries.append(rt.reconcile().summary())
        time.sleep(0.1)
    return summaries


def total(summaries: Sequence[dict[str, int]], key: str) -> int:
    return sum(s.get(key, 0) for s in summaries)


def state(rt: Runtime, saga_id: str) -> SagaState:
    return rt.store.get_saga_or_raise(saga_id).state


def settled(rt: Runtime, saga_id: str) -> Callable[[], bool]:
    return lambda: state(rt, saga_id) in SETTLED


def runs(rt: Runtime, saga_id: str, step: str | None = None,
         direction: Direction | None = FWD) -> list[StepRunRecord]:
    return [r for r in rt.store.step_runs(saga_id)
            if (step is None or r.step == step) and (direction is None or r.direction is direction)]


def events_of(rt: Runtime, saga_id: str, run_id: int) -> list[EventRecord]:
    """The step events of one run (its ladder rungs aside), without the drops of duplicate
    deliveries (harmless by design)."""
    return [e for e in rt.store.events(saga_id)
            if e.step_run_id == run_id and e.kind.startswith(("step.", "compensation."))
            and not e.kind.endswith(".dropped")]


def rungs(rt: Runtime, saga_id: str, run_id: int) -> list[tuple[int, bool]]:
    return [(e.data["level"], e.data["applicable"]) for e in rt.store.events(saga_id)
            if e.kind == "ladder.rung" and e.step_run_id == run_id]


def saga_kinds(rt: Runtime, saga_id: str) -> list[str]:
    return [e.kind for e in rt.store.events(saga_id) if e.kind.startswith("saga.")]


def calls(standin: StandIn, saga_id: str, step: str | None = None, *, op: str | None = None,
          direction: str = "forward") -> list[dict[str, Any]]:
    """Every call that reached the stand-in (replays included), in order."""
    with standin.ledger.lock:
        return [dict(c) for c in standin.ledger.calls
                if c["saga_id"] == saga_id and c["direction"] == direction
                and (step is None or c["step"] == step) and (op is None or c["op"] == op)]


def effects(standin: StandIn, saga_id: str, direction: str = "forward") -> list[str]:
    """Steps whose effect landed (once per idempotency key), in the order they landed."""
    return [c["step"] for c in calls(standin, saga_id, direction=direction) if not c["replay"]]


def timeline(rt: Runtime, saga_id: str) -> str:
    """The saga's events, one a line: what a failed assertion shows."""
    return "\n".join(f"{e.kind} {e.step or ''} run={e.step_run_id} by={e.worker}: {e.message}"
                     for e in rt.store.events(saga_id))


def consuming(rt: Runtime, timeout: float = 30.0) -> None:
    """Wait until a worker has taken and run a fresh saga's messages, published now.

    The event that "nothing happened" waits on: a worker is consuming this queue, so a
    message still there would have been taken too (instead of a sleep).
    """
    marker = rt.engine.enqueue("crash_trio", {})
    wait_for("a marker saga to complete", lambda: state(rt, marker) is SagaState.COMPLETED,
             timeout=timeout)


def outbox_rows(rt: Runtime, saga_id: str) -> list[Any]:
    with rt.store.engine.connect() as conn:
        return list(conn.execute(sa.select(OUTBOX).where(OUTBOX.c.saga_id == saga_id)))


# -- 1. SIGKILL in the middle of a step's effect --------------------------------------------


def kill_after_effect(crash: Harness, step: str) -> tuple[Runtime, str, list[dict[str, int]]]:
    """Run crash_trio until ``step``'s effect landed, SIGKILL the worker, start a fresh one,
    and run the reconciler until the saga settles."""
    rt = crash.runtime()
    crash.start_worker("victim")
    saga_id = rt.engine.enqueue("crash_trio", {"crash": {step: "hang_after_effect"}})
    wait_for(f"the effect of {step} to land", lambda: len(calls(crash.standin, saga_id, step)) == 1,
             logs=crash.worker_logs)
    (hung,) = runs(rt, saga_id, step)
    assert hung.status is RUNNING and hung.worker.startswith("victim@crash/")
    assert hung.lease_expires_at is not None
    crash.kill("victim")  # after the effect landed, before the commit that would record it
    assert runs(rt, saga_id, step)[0].status is RUNNING  # the database does not know yet
    crash.start_worker("rescuer")
    summaries = reconcile_until(rt, "the saga to settle", settled(rt, saga_id),
                                logs=crash.worker_logs)
    return rt, saga_id, summaries


@BOTH_BROKERS
def test_sigkill_after_the_effect_landed_is_resolved_by_verify_and_recorded_once(crash):
    rt, saga_id, summaries = kill_after_effect(crash, "a")
    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    assert total(summaries, "expired") == 1  # one lease expired, sent to a worker once

    # The same run, found out by verify: no second attempt, the action ran once. The
    # resolver's takeover is the run's second delivery (its fence against the first).
    (a,) = runs(rt, saga_id, "a")
    assert (a.attempt, a.status, a.deliveries) == (1, OK, 2)
    story = events_of(rt, saga_id, a.id)
    assert [e.kind for e in story] == [
        "step.scheduled", "step.claimed", "step.lease_expired", "step.outcome_unknown",
        "step.succeeded",
    ]
    _, claimed, expired, unknown, succeeded = story
    assert claimed.worker.startswith("victim@crash/")
    assert expired.worker == "reconciler"
    assert unknown.worker.startswith("rescuer@crash/")
    assert succeeded.worker.startswith("rescuer@crash/")
    assert succeeded.message == "verify: the effect landed"
    assert rungs(rt, saga_id, a.id) == []  # nothing failed: no ladder

    # One landed effect per step, and no call reached the stand-in twice.
    assert [c["key"] for c in calls(crash.standin, saga_id, "a")] == [a.idempotency_key]
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]
    assert not any(c["replay"] for c in calls(crash.standin, saga_id))
    assert [(r.step, r.status) for r in runs(rt, saga_id)] == [("a", OK), ("b", OK), ("c", OK)]
    assert all(r.worker.startswith("rescuer@crash/") for r in runs(rt, saga_id)[1:])
    assert saga_kinds(rt, saga_id) == ["saga.enqueued", "saga.running", "saga.completed"]
    assert outbox_rows(rt, saga_id) == []


@BOTH_BROKERS
def test_sigkill_without_verify_retries_with_the_same_key_and_the_effect_lands_once(crash):
    rt, saga_id, summaries = kill_after_effect(crash, "b")
    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    assert total(summaries, "expired") == 1

    first, second = runs(rt, saga_id, "b")
    assert (first.attempt, first.status) == (1, UNKNOWN)
    assert "expired; retrying with the same key" in (first.error or "")
    assert (second.attempt, second.status, second.deliveries) == (2, OK, 1)
    assert second.idempotency_key == first.idempotency_key
    assert second.worker.startswith("rescuer@crash/")
    assert [e.kind for e in events_of(rt, saga_id, first.id)] == [
        "step.scheduled", "step.claimed", "step.lease_expired", "step.outcome_unknown",
        "step.unknown",
    ]
    assert rungs(rt, saga_id, first.id) == [(0, True)]  # a transient failure: retry

    # The stand-in saw the retry as a replay of the same key: one landed effect.
    seen = calls(crash.standin, saga_id, "b")
    assert [(c["key"], c["attempt"], c["replay"]) for c in seen] == [
        (first.idempotency_key, 1, False), (first.idempotency_key, 2, True),
    ]
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]
    assert saga_kinds(rt, saga_id) == ["saga.enqueued", "saga.running", "saga.completed"]


@BOTH_BROKERS
def test_sigkill_of_an_at_most_once_step_without_verify_is_never_rerun_and_pages(crash):
    rt, saga_id, summaries = kill_after_effect(crash, "c")
    assert state(rt, saga_id) is SagaState.NEEDS_HUMAN, timeline(rt, saga_id)
    assert total(summaries, "expired") == 1

    (c,) = runs(rt, saga_id, "c")  # never a second attempt
    assert (c.attempt, c.status) == (1, UNKNOWN)
    assert "at_most_once" in (c.error or "")
    assert [e.kind for e in events_of(rt, saga_id, c.id)] == [
        "step.scheduled", "step.claimed", "step.lease_expired", "step.outcome_unknown",
        "step.unknown",
    ]
    # DESIGN §4.8: never re-executed blind, nor undone blind (its effect may have landed):
    # rungs 1-3 are passed as not applicable, and rung 4 pages.
    assert rungs(rt, saga_id, c.id) == [(1, False), (2, False), (3, False), (4, True)]
    assert len(calls(crash.standin, saga_id, "c")) == 1  # the stand-in saw exactly one call
    assert runs(rt, saga_id, direction=COMP) == []
    assert calls(crash.standin, saga_id, direction="compensate") == []
    assert saga_kinds(rt, saga_id) == ["saga.enqueued", "saga.running", "saga.needs_human"]
    wait_for("the page to go out", lambda: [
        n.status for n in rt.store.notifications(saga_id) if n.kind == "page"] == ["sent"])

    before = len(rt.store.step_runs(saga_id))
    for _ in range(3):  # the reconciler leaves the human's decision to the human
        rt.reconcile()
    assert len(rt.store.step_runs(saga_id)) == before
    assert len(calls(crash.standin, saga_id, "c")) == 1
    assert len([n for n in rt.store.notifications(saga_id) if n.kind == "page"]) == 1


@BOTH_BROKERS
def test_a_duplicate_delivered_while_the_step_runs_under_a_live_lease_is_dropped(crash):
    rt = crash.runtime()
    crash.start_worker("busy")  # two pool processes: the duplicate reaches the idle one
    saga_id = rt.engine.enqueue("crash_trio", {"crash": {"a": "sleep:2"}})
    wait_for("a to be under way", lambda: len(calls(crash.standin, saga_id, "a")) == 1,
             logs=crash.worker_logs)
    (a,) = runs(rt, saga_id, "a")
    assert a.status is RUNNING
    rt.engine.publish_now([Dispatch(a.task_name, (saga_id, a.id), a.message_id)])
    wait_for("the duplicate to be dropped", lambda: any(
        e.kind == "step.dropped" and e.step_run_id == a.id for e in rt.store.events(saga_id)),
        logs=crash.worker_logs)

    wait_for("the saga to complete", settled(rt, saga_id), logs=crash.worker_logs)
    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    (a,) = runs(rt, saga_id, "a")
    assert (a.status, a.attempt, a.deliveries) == (OK, 1, 1)  # claimed once, never expired
    (dropped,) = [e for e in rt.store.events(saga_id) if e.kind == "step.dropped"]
    assert "live lease" in dropped.message
    assert len(calls(crash.standin, saga_id, "a")) == 1
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]


@BOTH_BROKERS
def test_a_worker_killed_mid_compensation_the_rollback_resumes_and_each_undo_lands_once(crash):
    rt = crash.runtime()
    crash.start_worker("victim")
    saga_id = rt.engine.enqueue(
        "crash_trio", {"crash": {"c": "fail"}, "undo": {"b": "hang_after_effect"}}
    )
    wait_for("b's undo to land", lambda: effects(crash.standin, saga_id, "compensate") == ["b"],
             logs=crash.worker_logs)
    crash.kill("victim")  # after the undo landed, before the commit that would record it
    crash.start_worker("rescuer")
    summaries = reconcile_until(rt, "the saga to settle", settled(rt, saga_id),
                                logs=crash.worker_logs)
    assert state(rt, saga_id) is SagaState.COMPENSATED, timeline(rt, saga_id)
    assert total(summaries, "expired") == 1

    # The rollback went on from where it stopped: b's undo again with the same key (a
    # replay at the stand-in, not a second effect), then a's; the plan was made once.
    undo = runs(rt, saga_id, direction=COMP)
    assert [(r.step, r.attempt, r.status) for r in undo] == [
        ("b", 1, UNKNOWN), ("b", 2, OK), ("a", 1, OK),
    ]
    assert undo[0].idempotency_key == undo[1].idempotency_key
    assert effects(crash.standin, saga_id, "compensate") == ["b", "a"]
    assert [c["replay"] for c in calls(crash.standin, saga_id, "b", direction="compensate")] \
        == [False, True]
    assert [e.kind for e in rt.store.events(saga_id)].count("rollback.plan") == 1
    assert saga_kinds(rt, saga_id) == [
        "saga.enqueued", "saga.running", "saga.compensating", "saga.compensated",
    ]


# -- 2. Redis loses everything ----------------------------------------------------------------


def test_redis_wiped_between_enqueue_and_dispatch_the_reconciler_republishes(crash):
    crash.configure(republish_after=0.5)
    rt = crash.runtime()
    saga_id = rt.engine.enqueue("crash_trio", {})  # no worker runs yet: the message waits
    (first,) = runs(rt, saga_id)
    queue = f"{crash.settings.redis_prefix}{crash.settings.queue}"
    assert any(first.message_id.encode() in m for m in crash.redis.lrange(queue, 0, -1))

    assert crash.wipe_redis() > 0  # "FLUSHALL" of this test's key space
    assert list(crash.redis.scan_iter(match=f"{crash.settings.redis_prefix}*")) == []

    with embedded_worker(rt.app, concurrency=2, hostname=f"{crash.label}@test"):
        consuming(rt)  # a worker is consuming, but the message is gone
        (still,) = runs(rt, saga_id)
        assert (still.status, still.deliveries) == (StepStatus.SCHEDULED, 0)
        assert state(rt, saga_id) is SagaState.PENDING
        assert calls(crash.standin, saga_id) == []
        summaries = reconcile_until(rt, "the saga to complete", settled(rt, saga_id))

    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    assert total(summaries, "republished") >= 1
    done = runs(rt, saga_id)
    assert [(r.step, r.attempt, r.status, r.deliveries) for r in done] == [
        ("a", 1, OK, 1), ("b", 1, OK, 1), ("c", 1, OK, 1),
    ]
    assert done[0].id == first.id and done[0].task_id == first.message_id  # the same message
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]
    assert not any(c["replay"] for c in calls(crash.standin, saga_id))
    assert outbox_rows(rt, saga_id) == []


def test_redis_wiped_between_two_steps_the_reconciler_republishes(crash):
    """Redis loses everything right after the message of the second step was published.

    The publish is where the message is handed to Redis; wiping the key space from inside
    it (once) makes the loss land exactly between the two steps, every time.
    """
    crash.configure(republish_after=0.5)
    rt = crash.runtime()
    real = rt.engine.publish
    wiped: list[list[Dispatch]] = []

    def publish_then_lose(dispatches: Sequence[Dispatch]) -> None:
        real(dispatches)
        if not wiped and any(d.task_name == "sagaq.crash_trio.b" for d in dispatches):
            wiped.append(list(dispatches))
            crash.wipe_redis()  # "FLUSHALL" of this test's key space, after the publish

    rt.engine.publish = publish_then_lose
    # One process, one message at a time (acks_late, prefetch 1): while a runs, nothing else
    # is fetched, so b's message is still in Redis when the wipe comes.
    with embedded_worker(rt.app, concurrency=1, hostname=f"{crash.label}@test"):
        saga_id = rt.engine.enqueue("crash_trio", {})
        wait_for("a to succeed and b's message to be lost", lambda: bool(wiped))
        wait_for("a's commit", lambda: runs(rt, saga_id, "a")[0].status is OK)
        consuming(rt)  # a worker is consuming, but b's message is gone
        (b,) = runs(rt, saga_id, "b")
        assert (b.status, b.deliveries) == (StepStatus.SCHEDULED, 0)
        assert [d.args for d in wiped[0]] == [(saga_id, b.id)]
        assert effects(crash.standin, saga_id) == ["a"]
        summaries = reconcile_until(rt, "the saga to complete", settled(rt, saga_id))

    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    assert total(summaries, "republished") >= 1
    (b,) = runs(rt, saga_id, "b")
    assert (b.status, b.deliveries, b.task_id) == (OK, 1, b.message_id)
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]
    assert not any(c["replay"] for c in calls(crash.standin, saga_id))
    assert [r.deliveries for r in runs(rt, saga_id)] == [1, 1, 1]


# -- 3. A crash between commit and publish ---------------------------------------------------


@BOTH_BROKERS
def test_crash_between_commit_and_publish_the_reconciler_publishes_the_outbox_row(crash):
    crash.configure(republish_after=2.0)
    rt = crash.runtime()
    real = rt.engine.publish
    seen_rows: list[Any] = []

    with embedded_worker(rt.app, concurrency=2, hostname=f"{crash.label}@test"):
        rt.engine.publish = lambda dispatches: None  # the process dies right after the commit
        saga_id = rt.engine.enqueue("crash_trio", {})
        rt.engine.publish = real
        (first,) = runs(rt, saga_id)
        (row,) = outbox_rows(rt, saga_id)
        assert (row.step_run_id, row.message_id) == (first.id, first.message_id)
        assert (row.republished, row.republished_at) == (0, None)

        def publish_and_look(dispatches: Sequence[Dispatch]) -> None:
            # The reconciler's transaction has committed; no worker has the message yet.
            if any(d.message_id == first.message_id for d in dispatches):
                seen_rows.extend(outbox_rows(rt, saga_id))
            real(dispatches)

        rt.engine.publish = publish_and_look
        early = rt.reconcile().summary()  # not overdue yet: left alone
        assert early["republished"] == 0
        consuming(rt)  # nothing was published: nothing runs
        assert runs(rt, saga_id)[0].status is StepStatus.SCHEDULED
        assert state(rt, saga_id) is SagaState.PENDING

        summaries = reconcile_until(rt, "the saga to complete", settled(rt, saga_id))

    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    assert total(summaries, "republished") >= 1
    assert seen_rows, "the reconciler never re-published the first step's message"
    assert seen_rows[0].step_run_id == first.id
    assert seen_rows[0].republished == 1 and seen_rows[0].republished_at is not None
    done = runs(rt, saga_id)
    assert [(r.step, r.status, r.deliveries) for r in done] == [("a", OK, 1), ("b", OK, 1),
                                                               ("c", OK, 1)]
    assert done[0].task_id == first.message_id  # the outbox row's message is the one that ran
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]
    assert outbox_rows(rt, saga_id) == []  # the claim deleted it


# -- 4. A poison message: the step kills its worker every time ------------------------------


@BOTH_BROKERS
@pytest.mark.parametrize("n", [2, 3])
def test_a_step_that_kills_its_worker_every_time_is_parked_after_n_deliveries(crash, n):
    # Retries to spare: without parking, the ladder would run b far more than n times.
    crash.configure(max_deliveries=n, retries=10, step_timeout=1.5, lease_margin=0.5)
    rt = crash.runtime()
    crash.start_worker("poisoned")
    saga_id = rt.engine.enqueue("crash_trio", {"crash": {"b": "kill_self"}})
    summaries = reconcile_until(rt, "the saga to settle", settled(rt, saga_id),
                                logs=crash.worker_logs)
    assert state(rt, saga_id) is SagaState.COMPENSATED, timeline(rt, saga_id)
    # Usually the reconciler finds each lease expired; a redelivery of the requeued message
    # that comes after the lease ran out finds it too (then without a lease_expired event).
    assert 1 <= total(summaries, "expired") <= n

    forward = runs(rt, saga_id, "b")
    # Each run: its own delivery, then the resolver's takeover (the fence against a zombie).
    assert [(r.attempt, r.status, r.deliveries) for r in forward] == [
        (i, UNKNOWN, 2) for i in range(1, n + 1)
    ]
    assert len({r.idempotency_key for r in forward}) == 1
    assert f"parked after {n} deliveries" in (forward[-1].error or "")
    assert len(calls(crash.standin, saga_id, "b", op="enter")) == n  # it started n times
    for r in forward:
        story = [e.kind for e in events_of(rt, saga_id, r.id) if e.kind != "step.lease_expired"]
        assert story == ["step.scheduled", "step.claimed", "step.outcome_unknown",
                         "step.unknown"], r
    # Each death but the last: rung 0 (retry); the last: 1 and 2 do not apply, 3 rolls back.
    for r in forward[:-1]:
        assert rungs(rt, saga_id, r.id) == [(0, True)]
    assert rungs(rt, saga_id, forward[-1].id) == [(1, False), (2, False), (3, True)]
    assert saga_kinds(rt, saga_id) == [
        "saga.enqueued", "saga.running", "saga.compensating", "saga.compensated",
    ]
    # b's outcome is unknown, so it is compensated too; then a.
    assert [(r.step, r.status) for r in runs(rt, saga_id, direction=COMP)] == [("b", OK),
                                                                              ("a", OK)]
    assert effects(crash.standin, saga_id, "compensate") == ["b", "a"]

    # Parked, not looped: more passes (past another lease and re-publication) change nothing.
    count = len(rt.store.step_runs(saga_id))
    time.sleep(crash.settings.step_timeout + crash.settings.lease_margin)
    later = [rt.reconcile().summary() for _ in range(3)]
    assert total(later, "expired") == 0
    assert len(rt.store.step_runs(saga_id)) == count
    assert len(calls(crash.standin, saga_id, "b", op="enter")) == n
    assert outbox_rows(rt, saga_id) == []


# -- 7. Heartbeats keep a long step's lease alive --------------------------------------------


@pytest.mark.parametrize("mode", ["heartbeat", "auto", "hard_limit"])
def test_a_step_that_runs_past_its_lease_keeps_it_while_it_runs_up_to_its_hard_limit(
    crash, mode, monkeypatch
):
    """The step works 3.5 s; the reconciler runs all along, on an in-process threads-pool
    worker, which enforces no time limit, so the step may outlive its lease.

    ``heartbeat``: a 1.5 s lease (timeout 10 s), the step calls ``ctx.heartbeat()``: never
    expired. ``auto``: the same without calling it: sagaq's own heartbeat keeps the lease
    while the step really runs (issue 10, fault 7). ``hard_limit``: a 1 s timeout: past
    timeout + margin the lease lapses however often the step beats, the outcome is unknown,
    and ``verify`` decides (the effect is recorded once).
    """
    from sagaq import engine as engine_module

    if mode == "hard_limit":
        crash.configure(step_timeout=1.0, lease_margin=0.5)
    else:
        monkeypatch.setattr(engine_module, "LEASE_MAX", 1.0)  # leases of 1.5 s
        crash.configure(step_timeout=10.0, lease_margin=0.5)
    rt = crash.runtime()
    work = "sleep:3.5" if mode == "auto" else "heartbeat:3.5"
    with embedded_worker(rt.app, concurrency=2, hostname=f"{crash.label}@test"):
        saga_id = rt.engine.enqueue("crash_trio", {"crash": {"a": work}})
        summaries = reconcile_until(rt, "the saga to complete", settled(rt, saga_id))
        wait_for("a's first run to return", lambda: (saga_id, "a", 1) in crash_sagas.returned)

    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    (a,) = runs(rt, saga_id, "a")
    story = [e.kind for e in events_of(rt, saga_id, a.id)]
    assert len(calls(crash.standin, saga_id, "a")) == 1  # the action ran once either way
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]
    if mode != "hard_limit":
        assert story == ["step.scheduled", "step.claimed", "step.succeeded"]
        assert total(summaries, "expired") == 0
        assert (a.attempt, a.deliveries) == (1, 1)
    if mode == "heartbeat":
        beats = crash_sagas.beats.pop(saga_id)
        assert len(beats) >= 2 and all(beats)  # every heartbeat extended the lease
    if mode == "hard_limit":
        assert story == ["step.scheduled", "step.claimed", "step.lease_expired",
                         "step.outcome_unknown", "step.succeeded"], story
        assert total(summaries, "expired") == 1
        beats = crash_sagas.beats.pop(saga_id)
        assert beats[0] is True and beats[-1] is False  # past the limit, beating loses
        assert rt.store.events(saga_id)[-1].kind == "saga.completed"


# -- 8. Warm shutdown does not lose claimed work ---------------------------------------------


@BOTH_BROKERS
def test_warm_shutdown_finishes_the_running_step_and_the_saga_completes(crash):
    rt = crash.runtime()
    first = crash.start_worker("leaving")
    saga_id = rt.engine.enqueue("crash_trio", {"crash": {"a": "sleep:2"}})
    wait_for("a to be under way", lambda: len(calls(crash.standin, saga_id, "a")) == 1,
             logs=crash.worker_logs)
    assert runs(rt, saga_id, "a")[0].status is RUNNING
    first.send_signal(signal.SIGTERM)  # to the main process, as a supervisor stops it
    try:
        code = first.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            "the worker did not stop after SIGTERM\n" + crash.worker_logs()
        ) from None
    crash.procs.pop("leaving")
    assert code == 0, crash.worker_logs()

    # The worker waited for the step: a is recorded, b's message waits for the next worker.
    (a,) = runs(rt, saga_id, "a")
    assert (a.status, a.deliveries) == (OK, 1) and a.worker.startswith("leaving@crash/")
    assert state(rt, saga_id) is SagaState.RUNNING

    crash.start_worker("next")  # no reconciler pass: nothing was lost that it would repair
    wait_for("the saga to complete", settled(rt, saga_id), logs=crash.worker_logs)
    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    assert [(r.step, r.attempt, r.status, r.deliveries) for r in runs(rt, saga_id)] == [
        ("a", 1, OK, 1), ("b", 1, OK, 1), ("c", 1, OK, 1),
    ]
    assert [e.kind for e in events_of(rt, saga_id, a.id)] == [
        "step.scheduled", "step.claimed", "step.succeeded",
    ]
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]
    assert not any(c["replay"] for c in calls(crash.standin, saga_id))


def redis_connections(proc: subprocess.Popen[bytes], port: int) -> list[str]:
    """The local address of every Redis connection of a worker and its pool processes."""
    root = psutil.Process(proc.pid)
    found = []
    for p in (root, *root.children(recursive=True)):
        for c in p.net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED:
                found.append(f"{c.laddr.ip}:{c.laddr.port}")
    return found


def test_a_broker_connection_cut_mid_step_leaves_no_message_unacknowledged(crash):
    # Redis would redeliver a message left unacknowledged after 8 s: the step must finish,
    # the saga go on, and nothing stay in the unacked hash for good.
    crash.configure(visibility_timeout=8.0)
    rt = crash.runtime()
    worker = crash.start_worker("cut")
    saga_id = rt.engine.enqueue("crash_trio", {"crash": {"a": "sleep:2"}})
    wait_for("a to be under way", lambda: len(calls(crash.standin, saga_id, "a")) == 1,
             logs=crash.worker_logs)
    port = int(crash.redis.connection_pool.connection_kwargs.get("port", 6379))
    cut = redis_connections(worker, port)
    assert cut, "the worker holds no Redis connection to cut"
    for addr in cut:  # what a network blip or a Redis failover does to the worker
        crash.redis.execute_command("CLIENT", "KILL", "ADDR", addr)

    wait_for("the saga to complete", settled(rt, saga_id), timeout=60, logs=crash.worker_logs)
    assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
    (a,) = runs(rt, saga_id, "a")
    assert (a.status, a.deliveries) == (OK, 1)  # claimed once: the step was never run twice
    assert effects(crash.standin, saga_id) == ["a", "b", "c"]
    assert len(calls(crash.standin, saga_id, "a")) == 1
    unacked = f"{crash.settings.redis_prefix}unacked"
    wait_for("no message to stay unacknowledged", lambda: crash.redis.hlen(unacked) == 0,
             timeout=30, logs=crash.worker_logs)
    assert crash.procs["cut"].poll() is None  # the worker reconnected and lives on


# -- 9. Time limits must stay below the visibility timeout -----------------------------------


def test_a_step_time_limit_reaching_the_visibility_timeout_is_refused_at_start_up(settings):
    private = Registry()
    slow = Saga("overlong", registry=private)
    slow.step(name="quick", no_rollback="test step")(lambda ctx, inp: None)
    slow.step(name="crawl", no_rollback="test step", timeout=39.0)(lambda ctx, inp: None)
    tight = settings.with_(visibility_timeout=40.0, step_timeout=5.0, lease_margin=1.0)

    rt = Runtime(tight, registry=private, notifiers=[LogNotifier()])
    try:
        with pytest.raises(ConfigurationError) as refused:
            rt.app  # noqa: B018 - building the Celery app runs the check
        message = str(refused.value)
        assert "step overlong.crawl" in message and "SAGAQ_VISIBILITY_TIMEOUT=40s" in message
        assert "overlong.quick" not in message
    finally:
        rt.close()

    # 38 s + 1 s of margin stays below 40 s: the same saga shape starts.
    fits = Registry()
    Saga("fitting", registry=fits).step(name="crawl", no_rollback="t", timeout=38.0)(
        lambda ctx, inp: None
    )
    ok = Runtime(tight, registry=fits, notifiers=[LogNotifier()])
    try:
        assert "sagaq.fitting.crawl" in ok.app.tasks
    finally:
        ok.close()


def test_sagaq_worker_with_a_step_past_the_visibility_timeout_exits_1_with_one_line(settings):
    env = env_of(settings.with_(imports=("tests.crash_sagas",), visibility_timeout=40.0,
                                step_timeout=5.0, lease_margin=1.0), url="http://127.0.0.1:9")
    env["SAGAQ_CRASH_TIME_LIMIT"] = "50"
    done = subprocess.run([sys.executable, "-m", "sagaq", "worker", "--loglevel", "WARNING"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "step crash_overlong.crawl may run 51s" in lines[0]
    assert "SAGAQ_VISIBILITY_TIMEOUT=40s" in lines[0]



# -- 10. A worker SIGSTOPped past its lease and the visibility timeout, then resumed ---------


def test_a_worker_stopped_past_its_lease_and_the_visibility_timeout_loses_its_late_writes(
    crash,
):
    """SIGSTOP the prefork worker (parent and child) while its step works, past the lease
    (4 s) and the broker's visibility timeout (8 s); a rescuer resolves the run by verify;
    SIGCONT: the stopped attempt's heartbeat and result lose, the effect counts once."""
    crash.configure(visibility_timeout=8.0)
    rt = crash.runtime()
    stopped = crash.start_worker("stopped", concurrency=1)
    saga_id = rt.engine.enqueue("crash_trio", {"crash": {"a": "stopped:1.5"}})
    wait_for("a's effect", lambda: len(calls(crash.standin, saga_id, "a")) == 1,
             logs=crash.worker_logs)
    os.killpg(stopped.pid, signal.SIGSTOP)
    try:
        time.sleep(9.0)  # past the lease and the visibility timeout, while it is stopped
        crash.start_worker("rescuer")
        reconcile_until(rt, "the saga to settle", settled(rt, saga_id), logs=crash.worker_logs)
        assert state(rt, saga_id) is SagaState.COMPLETED, timeline(rt, saga_id)
        (a,) = runs(rt, saga_id, "a")
        assert a.status is OK and a.worker.startswith("rescuer@crash/"), a
    finally:
        # The pool child first: a resumed parent would at once kill a child past its time
        # limit, before it could try the late writes this test is about.
        for child in psutil.Process(stopped.pid).children(recursive=True):
            os.kill(child.pid, signal.SIGCONT)
    wait_for("the stopped attempt to wake and beat", lambda: any(
        c["op"].startswith("late:") for c in calls(crash.standin, saga_id, "a", op=None)),
        logs=crash.worker_logs)
    os.killpg(stopped.pid, signal.SIGCONT)
    late = [c["op"] for c in calls(crash.standin, saga_id, "a", op=None)
            if c["op"].startswith("late:")]
    assert late == ["late:False"]  # its heartbeat lost: the run is not its own any more
    time.sleep(1.0)  # its result write comes right after the beat; it must lose
    (again,) = runs(rt, saga_id, "a")
    assert (again.status, again.worker, again.finished_at) == (OK, a.worker, a.finished_at)
    landed = [c["step"] for c in calls(crash.standin, saga_id)
              if not c["replay"] and not c["op"].startswith("late:")]
    assert landed == ["a", "b", "c"]  # every effect once
    assert state(rt, saga_id) is SagaState.COMPLETED
