"""The reconciler (issue 5): two of them at once take no action twice, orphaned resources are
released once or paged once, and a pass costs the same with 100 or 100 000 finished sagas.

Each test has a database, queue and Redis prefix of its own (see :mod:`test_crash`), so a
reconciler pass sees only the rows the test made, and counts can be exact.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import event

from sagaq import Runtime, SagaState, Settings, StepStatus
from sagaq.keys import idempotency_key, release_key
from sagaq.notify import LogNotifier
from sagaq.notify.base import Action, Kind, Notice
from sagaq.reconciler import Sweep
from sagaq.store.models import OUTBOX
from sagaq.worker import embedded_worker
from tests import crash_sagas
from tests import sagas as _defines_sleepy  # noqa: F401 - its durable waits are woken here
from tests.crash_sagas import Release
from tests.integration.test_crash import (
    Harness,
    delete_prefix,
    harness,
    label_of,
    reconcile_until,
    runs,
    state,
    total,
    wait_for,
)

NAP_ONCE = {"simulate": {"flaky": {"nap": 1}}}  # tests.sagas.sleepy: fails once, waits 2 s


@pytest.fixture
def crash(request, settings, make_database, redis_prefix, redis_base_url, tmp_path,
          monkeypatch) -> Iterator[Harness]:
    with harness(label_of(request), settings, make_database, redis_prefix, redis_base_url,
                 tmp_path, monkeypatch) as h:
        yield h


def execute_next(rt: Runtime, saga_id: str, worker: str = "test@inline/1") -> str:
    """Run the saga's scheduled step run here, in this thread, as a worker would."""
    (run,) = [r for r in rt.store.step_runs(saga_id) if r.status is StepStatus.SCHEDULED]
    step = rt.registry.get(rt.store.get_saga_or_raise(saga_id).name).step_named(run.step)
    return rt.engine.execute(saga_id, run.id, step=step, worker=worker)


def outbox(rt: Runtime) -> list[Any]:
    with rt.store.engine.connect() as conn:
        return list(conn.execute(sa.select(OUTBOX).order_by(OUTBOX.c.id)))


def event_count(rt: Runtime, saga_id: str, what: str, **data: Any) -> int:
    return sum(1 for e in rt.store.events(saga_id)
               if e.kind == what and all(e.data.get(k) == v for k, v in data.items()))


# -- 5. Two reconcilers at once ---------------------------------------------------------------


def test_two_reconcilers_running_at_once_take_no_action_twice(crash):
    crash.configure(republish_after=1.5, rollback_deadline=1.0)
    rt, rt_a, rt_b = crash.runtime(), crash.runtime(), crash.runtime()  # no worker consumes

    # Outbox rows whose message seems lost (published to a queue nobody reads).
    overdue = [rt.engine.enqueue("crash_trio", {}) for _ in range(3)]
    # Rollbacks that stopped: a failed for good at b, a's compensation is never run.
    stalled = [rt.engine.enqueue("crash_trio", {"crash": {"b": "fail"}}) for _ in range(2)]
    for saga_id in stalled:
        execute_next(rt, saga_id)
        execute_next(rt, saga_id)
        assert state(rt, saga_id) is SagaState.COMPENSATING
    # Compensated sagas whose failed step had registered a vm: orphans.
    leaky = [rt.engine.enqueue("crash_leaky", {"kinds": ["vm"]}) for _ in range(3)]
    for saga_id in leaky:
        for _ in range(3):  # disk, vm (fails, registers its vm first), free_disk
            execute_next(rt, saga_id)
        assert state(rt, saga_id) is SagaState.COMPENSATED
    orphans = [r for s in leaky for r in rt.store.resources(s) if r.status == "orphaned"]
    assert [r.kind for r in orphans] == ["vm"] * 3
    # Step runs whose worker died: claimed under a short lease that nobody extends.
    expired = [rt.engine.enqueue("crash_trio", {}) for _ in range(3)]
    for saga_id in expired:
        (run,) = runs(rt, saga_id)
        rt.store.claim(saga_id, run.id, worker="ghost@crash/1", task_id=None, lease=0.2)
    # Durable waits (2 s) that come due.
    waiting = [rt.engine.enqueue("sleepy", NAP_ONCE) for _ in range(3)]
    for saga_id in waiting:
        execute_next(rt, saga_id)
        assert state(rt, saga_id) is SagaState.WAITING
    due = max(rt.store.get_saga_or_raise(s).wake_at for s in waiting)
    wait_for("the waits to come due", lambda: datetime.now(UTC) >= due)
    first_runs = {runs(rt, s)[0].id for s in overdue}
    rows_before = {r.id: r for r in outbox(rt)}
    queue = f"{crash.settings.redis_prefix}{crash.settings.queue}"
    queued_before = crash.redis.llen(queue)

    # Two reconcilers, started together, four times over.
    sweeps: list[Sweep] = []
    errors: list[BaseException] = []
    for _ in range(4):
        start = threading.Barrier(2)

        def beat(r: Runtime, start: threading.Barrier = start) -> None:
            try:
                start.wait(10)
                sweeps.append(r.reconcile())
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=beat, args=(r,)) for r in (rt_a, rt_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [] and not any(t.is_alive() for t in threads)
    summaries = [s.summary() for s in sweeps]
    assert len(summaries) == 8

    # Each lease expired once: one event, one message, one outbox row.
    assert total(summaries, "expired") == len(expired)
    for saga_id in expired:
        (run,) = runs(rt, saga_id)
        assert event_count(rt, saga_id, "step.lease_expired") == 1, saga_id
        assert [r.step_run_id for r in outbox(rt) if r.saga_id == saga_id] == [run.id]
    # Each wait woke once.
    assert total(summaries, "woken") == len(waiting)
    for saga_id in waiting:
        assert state(rt, saga_id) is SagaState.RUNNING
        assert event_count(rt, saga_id, "saga.running", trigger="wake") == 1, saga_id
    # Each orphan is being released once: one event, one release message.
    assert total(summaries, "orphans") == len(orphans)
    for res in orphans:
        (now,) = [r for r in rt.store.resources(res.saga_id) if r.id == res.id]
        assert now.status == "releasing"
        assert event_count(rt, res.saga_id, "resource.orphaned") == 1
        assert [r.resource_id for r in outbox(rt) if r.saga_id == res.saga_id
                and r.resource_id is not None] == [res.id]
    # Each stalled rollback paged once.
    assert total(summaries, "stalled") == len(stalled)  # one channel: one page each
    for saga_id in stalled:
        assert state(rt, saga_id) is SagaState.NEEDS_HUMAN
        assert event_count(rt, saga_id, "saga.needs_human") == 1
        pages = [n for n in rt.store.notifications(saga_id) if n.kind == "page"]
        assert [(n.action, n.incident) for n in pages] == [("trigger", 1)]
    # Every overdue row was published again once; the backoff stops a second time so soon.
    rows_after = {r.id: r for r in outbox(rt)}
    assert all(r.republished <= 1 for r in rows_after.values()), rows_after
    for row in rows_before.values():
        if row.step_run_id in first_runs:
            assert rows_after[row.id].republished == 1, row
    increments = sum(r.republished for r in rows_after.values())
    assert increments == total(summaries, "republished") > len(overdue)
    # And the broker got exactly the messages the passes reported, no more.
    assert crash.redis.llen(queue) - queued_before == total(summaries, "published")


# -- 6. Orphaned resources --------------------------------------------------------------------


def releases_of(saga_id: str, kind: str) -> list[Release]:
    return [r for r in crash_sagas.releases if r.saga_id == saga_id and r.kind == kind]


class Pager:
    """A notification channel that keeps what it was asked to send."""

    name = "pager"
    kinds = frozenset({Kind.PAGE, Kind.NOTIFY})

    def __init__(self) -> None:
        self.sent: list[Notice] = []

    def send(self, notice: Notice) -> None:
        self.sent.append(notice)


def leak(crash: Harness) -> tuple[Runtime, Pager, str, str, list[dict[str, int]],
                                  list[dict[str, int]]]:
    """Two crash_leaky sagas: one leaves a vm behind, one an ip whose release always fails.
    Runs them on an in-process worker, with reconciler passes until all is released, failed
    or paged; then three more passes."""
    crash.configure(compensation_retries=2)
    pager = Pager()
    rt = crash.runtime(pager)
    with embedded_worker(rt.app, concurrency=2, hostname=f"{crash.label}@test"):
        freed = rt.engine.enqueue("crash_leaky", {"kinds": ["vm"]})
        stuck = rt.engine.enqueue("crash_leaky", {"kinds": ["ip"]})

        def done() -> bool:
            res = [r for s in (freed, stuck) for r in rt.store.resources(s)]
            pages = [n for n in rt.store.notifications(stuck) if n.kind == "page"]
            return (len(res) == 4 and all(r.status in ("released", "failed") for r in res)
                    and bool(pages) and all(n.status == "sent" for n in pages))

        summaries = reconcile_until(rt, "every resource released or failed, pages sent", done)
        # More passes find nothing more to do.
        later = [rt.reconcile().summary() for _ in range(3)]
        time.sleep(0.3)  # what a pass might have published would have run by now
    return rt, pager, freed, stuck, summaries, later


def test_an_orphaned_resource_is_released_once_and_a_failed_release_pages_once(crash):
    rt, pager, freed, stuck, summaries, later = leak(crash)
    assert [state(rt, s) for s in (freed, stuck)] == [SagaState.COMPENSATED] * 2
    assert total(summaries, "orphans") == 2  # the vm and the ip; never a disk
    assert total(later, "orphans") == 0

    # The disk's step was compensated: its compensation released it; the releaser never ran.
    for saga_id in (freed, stuck):
        (disk,) = [r for r in rt.store.resources(saga_id) if r.kind == "disk"]
        assert (disk.status, disk.attempts) == ("released", 0) and disk.released_at is not None
        assert releases_of(saga_id, "disk") == []
        assert event_count(rt, saga_id, "resource.orphaned", kind="disk") == 0

    # The vm's step failed (a failed step is not compensated): released once, by its releaser.
    (vm,) = [r for r in rt.store.resources(freed) if r.kind == "vm"]
    assert (vm.status, vm.attempts) == ("released", 1) and vm.released_at is not None
    assert releases_of(freed, "vm") == [
        Release(freed, "vm", vm.external_id, release_key(freed, "vm", vm.external_id), 1, True)
    ]
    assert event_count(rt, freed, "resource.registered") == 2
    assert event_count(rt, freed, "resource.orphaned") == 1
    assert event_count(rt, freed, "resource.released", kind="vm") == 1
    assert [n for n in rt.store.notifications(freed) if n.kind == "page"] == []

    # The ip's releaser always fails: its retries, then failed, and one page.
    (ip,) = [r for r in rt.store.resources(stuck) if r.kind == "ip"]
    tries = crash.settings.compensation_retries + 1
    assert (ip.status, ip.attempts) == ("failed", tries)
    assert "connection refused" in (ip.last_error or "")
    calls = releases_of(stuck, "ip")
    assert [(c.attempt, c.ok) for c in calls] == [(i, False) for i in range(1, tries + 1)]
    assert {c.key for c in calls} == {release_key(stuck, "ip", ip.external_id)}
    assert event_count(rt, stuck, "resource.retry") == tries - 1
    assert event_count(rt, stuck, "resource.release_failed") == 1
    assert event_count(rt, stuck, "ladder.rung", level=4, action="page") == 1
    pages = [n for n in rt.store.notifications(stuck) if n.kind == "page"]
    assert [(n.action, n.status, n.incident) for n in pages] == [("trigger", "sent", 1)]
    assert rt.store.get_saga_or_raise(stuck).incident == 1
    sent = [(n.saga_id, n.kind, n.action) for n in pager.sent if n.kind is Kind.PAGE]
    assert sent == [(stuck, Kind.PAGE, Action.TRIGGER)]  # the channel was asked once
    assert state(rt, stuck) is SagaState.COMPENSATED  # the saga itself is done
    assert [r for r in outbox(rt) if r.resource_id is not None] == []


def test_the_page_for_a_failed_release_says_what_could_not_be_released(crash):
    rt, pager, _, stuck, _, _ = leak(crash)
    (ip,) = [r for r in rt.store.resources(stuck) if r.kind == "ip"]
    (page,) = [n for n in pager.sent if n.kind is Kind.PAGE]
    assert page.note is not None and ip.external_id in page.note
    # The one line a responder reads first (PagerDuty's summary, Slack's title) must name the
    # resource: crash_leaky has no pivot, and its failed step was rolled back long ago.
    assert ip.external_id in page.summary, page.summary
    assert "after the pivot" not in page.summary, page.summary


# -- 10. The cost of a pass does not grow with finished sagas --------------------------------

TABLES = ("sagaq_sagas", "sagaq_step_runs")
ACTIVE = 25  # of each kind: expired leases, due waits, stalled rollbacks, overdue messages
ORPHANS = 10


def populate(url: str, finished: int) -> dict[str, int]:
    """Bulk-load ``finished`` finished sagas (with their runs, events and released
    resources), then the same active rows in every database. Returns what is due."""
    now = datetime.now(UTC)
    long_ago = now - timedelta(days=30)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    trio = "sagaq.crash_trio"
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        saga_cols = ("id, name, version, state, input, checkpoint, created_at, updated_at, "
                     "finished_at, incident, wake_at, error")
        run_cols = ("saga_id, step, step_index, direction, attempt, status, task_name, "
                    "compensate_task, idempotency_key, message_id, worker, deliveries, "
                    "lease_expires_at, not_before, scheduled_at, started_at, finished_at, level")
        empty = json.dumps({"results": {}, "data": {}})
        ids = [str(uuid.uuid4()) for _ in range(finished)]
        with cur.copy(f"COPY sagaq_sagas ({saga_cols}) FROM STDIN") as copy:
            for i, sid in enumerate(ids):
                at = long_ago - timedelta(seconds=i)
                st = "completed" if i % 3 else "compensated"
                copy.write_row((sid, "crash_trio", "v1", st, "{}", empty, at, at, at, 0, None,
                                None))
        with cur.copy(f"COPY sagaq_step_runs ({run_cols}) FROM STDIN") as copy:
            for i, sid in enumerate(ids):
                at = long_ago - timedelta(seconds=i)
                for n, (step, direction) in enumerate(
                    [("a", "forward"), ("b", "forward"), ("c", "forward")] if i % 3
                    else [("a", "forward"), ("b", "forward"), ("a", "compensate")]
                ):
                    status = "failed" if (i % 3 == 0 and n == 1) else "succeeded"
                    task = f"{trio}.{step}" + (".compensate" if direction == "compensate" else "")
                    key = idempotency_key(sid, step, direction)
                    copy.write_row((sid, step, "abc".index(step), direction, 1, status, task,
                                    f"{trio}.{step}.compensate", key, str(uuid.uuid4()),
                                    "w@h/1", 1, None, None, at, at, at, 0))
        with cur.copy("COPY sagaq_events (saga_id, at, kind, message, data) FROM STDIN") as copy:
            for i, sid in enumerate(ids):
                at = long_ago - timedelta(seconds=i)
                for kind in ("saga.enqueued", "saga.running",
                             "saga.completed" if i % 3 else "saga.compensated"):
                    copy.write_row((sid, at, kind, "", "{}"))
        with cur.copy("COPY sagaq_resources (saga_id, step, kind, external_id, status, "
                      "attempts, created_at, updated_at, released_at) FROM STDIN") as copy:
            for i, sid in enumerate(ids):
                at = long_ago - timedelta(seconds=i)
                copy.write_row((sid, "a", "vm", f"vm-{i}", "released", 1, at, at, at))

        def saga(st: str, *, updated: datetime = now, wake: datetime | None = None) -> str:
            sid = str(uuid.uuid4())
            cur.execute(
                f"INSERT INTO sagaq_sagas ({saga_cols}) VALUES "
                "(%s, 'crash_trio', 'v1', %s, '{}', %s, %s, %s, NULL, 0, %s, NULL)",
                (sid, st, empty, updated, updated, wake),
            )
            return sid

        def run(sid: str, status: str, *, direction: str = "forward", lease: datetime | None
                = None, not_before: datetime | None = None, outbox_at: datetime | None = None
                ) -> None:
            task = f"{trio}.a" + (".compensate" if direction == "compensate" else "")
            message = str(uuid.uuid4())
            cur.execute(
                f"INSERT INTO sagaq_step_runs ({run_cols}) VALUES (%s, 'a', 0, %s, 1, %s, %s, "
                "%s, %s, %s, 'ghost@h/1', 1, %s, %s, %s, %s, NULL, 0) RETURNING id",
                (sid, direction, status, task, f"{trio}.a.compensate",
                 idempotency_key(sid, "a", direction), message, lease, not_before,
                 now - timedelta(hours=2), now - timedelta(hours=2) if lease else None),
            )
            (run_id,) = cur.fetchone()
            if outbox_at is not None:
                cur.execute(
                    "INSERT INTO sagaq_outbox (saga_id, step_run_id, task_name, args, "
                    "message_id, available_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (sid, run_id, task, json.dumps([sid, run_id]), message, outbox_at, outbox_at),
                )

        hour_ago = now - timedelta(hours=1)
        for _ in range(ACTIVE):  # a lease that expired a minute ago
            run(saga("running"), "running", lease=now - timedelta(minutes=1))
        for _ in range(ACTIVE):  # a durable wait that came due a moment ago
            wake = now - timedelta(seconds=1)
            run(saga("waiting", wake=wake), "scheduled", not_before=wake, outbox_at=wake)
        for _ in range(ACTIVE):  # a rollback without progress for two hours
            sid = saga("compensating", updated=now - timedelta(hours=2))
            run(sid, "scheduled", direction="compensate", outbox_at=now - timedelta(hours=2))
        for _ in range(ACTIVE):  # a first message lost an hour ago
            run(saga("pending"), "scheduled", outbox_at=hour_ago)
        for i in range(ORPHANS):  # held by compensated sagas: orphans
            sid = saga("compensated", updated=hour_ago)
            cur.execute(
                "INSERT INTO sagaq_resources (saga_id, step, kind, external_id, status, "
                "attempts, created_at, updated_at) VALUES (%s, 'b', 'vm', %s, 'orphaned', 0, "
                "%s, %s)", (sid, f"orphan-{i}", hour_ago, hour_ago),
            )
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ANALYZE")
    return {"woken": ACTIVE, "expired": ACTIVE, "stalled": ACTIVE, "republished": 2 * ACTIVE,
            "orphans": ORPHANS}


_TOUCHES = re.compile(r"\b(" + "|".join(TABLES) + r")\b")


def measured_pass(rt: Runtime) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """One reconciler pass; each statement that reads or writes sagas or step runs is first
    run under EXPLAIN (ANALYZE, BUFFERS) in a savepoint that is rolled back (so it sees the
    database exactly as the statement itself will, and changes nothing)."""
    measured: list[dict[str, Any]] = []

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        if executemany or not _TOUCHES.search(statement) or statement.lstrip().upper(
        ).startswith("INSERT"):
            return
        cursor.execute("SAVEPOINT sagaq_explain")
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters)
        (plan,) = cursor.fetchone()[0]
        cursor.execute("ROLLBACK TO SAVEPOINT sagaq_explain")
        cursor.execute("RELEASE SAVEPOINT sagaq_explain")
        measured.append({"sql": statement, "plan": plan["Plan"]})

    event.listen(rt.store.engine, "before_cursor_execute", explain)
    try:
        summary = rt.reconcile().summary()
    finally:
        event.remove(rt.store.engine, "before_cursor_execute", explain)
    return summary, measured


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def buffers(plan: dict[str, Any]) -> int:
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


@pytest.fixture
def cost_runtimes(settings: Settings, make_database, redis_prefix, redis_base_url,
                  request) -> Iterator[dict[str, tuple[Runtime, dict[str, int]]]]:
    """Two databases with the same 100 active rows: one with 100 finished sagas, one with
    100 000. Their runtimes publish to a queue nobody reads, under a prefix of their own."""
    label = label_of(request)
    base = settings.with_(queue=f"{settings.queue}-{label}",
                          redis_prefix=f"{redis_prefix}{label}:", republish_after=60.0,
                          rollback_deadline=3600.0, reconcile_batch=500)
    made: dict[str, tuple[Runtime, dict[str, int]]] = {}
    try:
        for size, finished in (("small", 100), ("big", 100_000)):
            url = make_database(f"{label[:20]}_{size}")
            expected = populate(url, finished)
            made[size] = (Runtime(base.with_(database_url=url), notifiers=[LogNotifier()]),
                          expected)
        yield made
    finally:
        for rt, _ in made.values():
            rt.close()
        client = redis.Redis.from_url(redis_base_url)
        delete_prefix(client, base.redis_prefix)  # the messages the passes published
        client.close()


def test_a_reconciler_pass_uses_index_scans_and_costs_the_same_with_100k_finished_sagas(
    cost_runtimes,
):
    seen: dict[str, tuple[dict[str, int], list[dict[str, Any]]]] = {}
    for size, (rt, expected) in cost_runtimes.items():
        with rt.store.engine.connect() as conn:
            finished = conn.execute(sa.text(
                "SELECT count(*) FROM sagaq_sagas WHERE state IN ('completed', 'compensated')"
            )).scalar_one()
        assert finished == {"small": 100, "big": 100_000}[size] + ORPHANS
        seen[size] = measured_pass(rt)
        summary, _ = seen[size]
        for key, count in expected.items():
            assert summary[key] == count, (size, key, summary)

    small, big = seen["small"][1], seen["big"][1]
    # The same statements ran in both databases (the same work), each measured.
    shape = [re.sub(r"\s+", " ", m["sql"]) for m in big]
    assert shape == [re.sub(r"\s+", " ", m["sql"]) for m in small]
    assert len(big) >= 3 * ACTIVE  # per woken saga two, per stalled rollback one, ...

    # No statement reads sagas or step runs by a sequential scan of 100 000 finished ones.
    seq = Counter(
        (n.get("Relation Name"), m["sql"].split("\n")[0][:80])
        for m in big for n in nodes(m["plan"])
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in TABLES
    )
    assert not seq, seq

    # Buffers touched by the whole pass: about the same (index depth grows a level at most).
    touched = {size: sum(buffers(m["plan"]) for m in seen[size][1]) for size in seen}
    assert touched["big"] <= 3 * touched["small"], touched
    # And per statement, none that touches a thousand pages or more.
    worst = max(big, key=lambda m: buffers(m["plan"]))
    assert buffers(worst["plan"]) < 1000, (buffers(worst["plan"]), worst["sql"])
