"""The crash-point sweep's harness: the engine and store driven by hand, on a test clock.

A :class:`Driver` is a worker, a broker and a reconciler in one loop, in this process and
without Celery: published messages go to a queue; each message is executed as the Celery
task would execute it; a :class:`Crash` (a SIGKILL stand-in, a ``BaseException``) kills the
"worker" mid-message, which is then delivered again (``acks_late`` +
``task_reject_on_worker_lost``); a database error fails the task, whose message is then
acknowledged and gone. Recovery is the redelivered message, then reconciler passes with the
clock moved past every lease and deadline.

The sagas here write to in-process stand-ins (:class:`tasks.services.StandIn`) that record
every call with its idempotency key, so that "landed once" and "undone in reverse order" are
counted, not assumed.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from sagaq import Registry, Saga, SagaState, Settings, StepContext, TerminalError
from sagaq.context import ReleaseContext
from sagaq.engine import Engine
from sagaq.errors import DatabaseUnavailable, InputError
from sagaq.gate import Gate
from sagaq.ladder import Bounds
from sagaq.notify.base import Kind, Notice
from sagaq.notify.delivery import deliver
from sagaq.policy import parse
from sagaq.reconciler import sweep
from sagaq.store import Dispatch, Store
from sagaq.store.database import create_engine
from sagaq.store.faults import Phase, Write
from sagaq.store.lifecycle import NOTIFY_TASK, RELEASE_TASK
from sagaq.store.models import NOTIFICATIONS, OUTBOX, RESOURCES, RUNS
from tasks.services import StandIn


class Crash(BaseException):
    """The worker dies here (a SIGKILL, an OOM kill, a hard time limit)."""


class Vanish(Crash):
    """The worker dies here, and its message is lost with it (the broker forgot it too)."""


def db_error() -> Exception:
    return sa.exc.OperationalError("COMMIT", {}, Exception("injected: the server went away"))


@dataclass(frozen=True)
class Point:
    """One crash point: the ``nth`` time ``write`` reaches ``phase``."""

    write: Write
    phase: Phase
    nth: int = 1

    def __str__(self) -> str:
        return f"{self.write.value}/{self.phase.value}#{self.nth}"


class Faults:
    """The store's fault hook: records every point reached, fires once at a chosen one."""

    def __init__(self) -> None:
        self.seen: list[tuple[Write, Phase]] = []
        self.target: Point | None = None
        self.kind = "crash"
        self.fired = False

    def __call__(self, write: Write, phase: Phase) -> None:
        self.seen.append((write, phase))
        t = self.target
        if t is None or self.fired or (write, phase) != (t.write, t.phase):
            return
        if sum(1 for s in self.seen if s == (write, phase)) == t.nth:
            self.fired = True
            if self.kind == "crash":
                raise Crash(str(t))
            raise db_error()


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# -- the sagas -------------------------------------------------------------------------------

registry = Registry()
world = StandIn("world")
releases: list[tuple[str, str, str]] = []  # (saga_id, kind, external id) released
retried: set[str] = set()  # sagas an operator retried


def _effect(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    """The step's effect, then whatever the input asks of this step."""
    what = (inp.get("do") or {}).get(ctx.step, "")
    if what == "fail":
        raise TerminalError(f"{ctx.step}: rejected (422)")
    if what == "fail_until_retried" and ctx.saga_id not in retried:
        raise TerminalError(f"{ctx.step}: rejected until an operator retries (422)")
    if what == "slow_fail" and ctx.attempt == 1:
        from sagaq.errors import TransientError

        raise TransientError(f"{ctx.step}: busy, come back later")
    record = world.call(ctx, "undo" if ctx.compensating else "do", {"step": ctx.step})
    if what == "heartbeat":
        ctx.heartbeat()
    if what == "resource":
        for kind in inp.get("kinds", ["vm"]):
            ctx.resource(kind, f"{kind}-{ctx.saga_id[:8]}")
    if what == "die_after_effect" and ctx.attempt == 1 and not ctx.compensating:
        raise Crash("the worker died after the effect landed")
    if what == "reset_after_effect" and ctx.attempt == 1 and not ctx.compensating:
        raise ConnectionResetError("connection reset by peer after the request was sent")
    return {"id": record["id"]}


def _undo(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    what = (inp.get("undo") or {}).get(ctx.step, "")
    if what == "fail":
        from sagaq.errors import TransientError

        raise TransientError(f"{ctx.step}: the undo endpoint answers 503")
    if what == "stall" and ctx.attempt == 1:
        clock_of_driver.advance(7200)  # it ran for two hours, then its worker died
        raise Vanish("the compensation's worker died after two hours, its message lost")
    assert ctx.result is None or "id" in ctx.result, "the undo needs the step's result"
    return world.call(ctx, "undo", {"step": ctx.step})


def _read_back(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any] | bool:
    if not world.landed(ctx.key):
        return False
    return {"id": world.call(ctx, "do", {"step": ctx.step})["id"]}  # a replay: reads it


clock_of_driver = Clock()  # replaced per run by the driver (a compensation may "take long")

three = Saga("sw_three", registry=registry)
for _name in ("a", "b", "c"):
    three.step(name=_name, compensate=_undo, verify=_read_back)(_effect)

bare = Saga("sw_bare", registry=registry)  # no verify: an unknown outcome is retried blind
for _name in ("a", "b"):
    bare.step(name=_name, compensate=_undo)(_effect)

pivoted = Saga("sw_pivoted", registry=registry)
pivoted.step(name="a", compensate=_undo)(_effect)
pivoted.step(name="p", kind="pivot")(_effect)
pivoted.step(name="r", kind="retryable", retries=1)(_effect)

once = Saga("sw_once", registry=registry)
once.step(name="a", compensate=_undo)(_effect)
once.step(name="mail", kind="noncompensable", at_most_once=True)(_effect)

gated = Saga("sw_gated", registry=registry)
gated.step(name="a", compensate=_undo, topic="infra.delete")(_effect)  # its first step
gated.step(name="b", compensate=_undo)(_effect)

waits = Saga("sw_waits", registry=registry)
waits.step(name="a", compensate=_undo, ladder=Bounds(base=5.0, cap=5.0))(_effect)
waits.step(name="b", compensate=_undo)(_effect)

leaky = Saga("sw_leaky", registry=registry)
leaky.step(name="a", no_rollback="its resource is released by the reconciler")(_effect)
leaky.step(name="b", compensate=_undo)(_effect)


@leaky.releaser("vm")
def _release(rctx: ReleaseContext) -> None:
    releases.append((rctx.saga_id, rctx.kind, rctx.external_id))


@leaky.releaser("ip")
def _release_fails(rctx: ReleaseContext) -> None:
    raise ConnectionRefusedError("ipam: connection refused")


POLICY = parse({"version": "v1", "rules": [
    {"id": "deletes-need-a-human", "when": {"topic": "infra.*"},
     "decision": "require_human", "deadline": "30d"},
]})


@dataclass(frozen=True)
class Shape:
    """One saga shape of the sweep: a saga, an input, what a human does, what may result."""

    name: str
    saga: Saga
    input: dict[str, Any]
    ends: frozenset[SagaState]  # the states it may settle in
    operator: str = ""  # "retry" or "resolve" when it reaches needs_human (once)
    lose_first_message: bool = False  # a message lost with Redis
    strand: bool = False  # its outbox row deleted by hand, with the message: only a repair helps


C, X, H, R = SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.NEEDS_HUMAN, SagaState.RESOLVED
SHAPES = (
    Shape("happy", three, {"do": {"b": "heartbeat"}}, frozenset({C})),
    Shape("rollback", three, {"do": {"c": "fail"}}, frozenset({X})),
    Shape("after_pivot", pivoted, {"do": {"r": "fail_until_retried"}}, frozenset({C}),
          operator="retry"),
    Shape("approval", gated, {}, frozenset({C})),
    Shape("unknown_verify", three, {"do": {"b": "die_after_effect"}}, frozenset({C})),
    Shape("unknown_blind", bare, {"do": {"a": "reset_after_effect"}}, frozenset({C})),
    Shape("compensation_fails", three, {"do": {"c": "fail"}, "undo": {"b": "fail"}},
          frozenset({R}), operator="resolve"),
    Shape("at_most_once", once, {}, frozenset({C, H})),
    Shape("durable_wait", waits, {"do": {"a": "slow_fail"}}, frozenset({C})),
    Shape("orphan", leaky, {"do": {"a": "resource", "b": "fail"}}, frozenset({X})),
    Shape("orphan_paged", leaky, {"do": {"a": "resource", "b": "fail"}, "kinds": ["ip"]},
          frozenset({X})),
    Shape("lost_message", bare, {}, frozenset({C}), lose_first_message=True),
    Shape("stranded", bare, {}, frozenset({C}), strand=True),
    # The stall detector is a safety net: if its own pass fails, the rollback's resolver
    # finishes the rollback instead, which is as good.
    Shape("stalled_rollback", three, {"do": {"c": "fail"}, "undo": {"b": "stall"}},
          frozenset({R, X}), operator="resolve"),
)
ALLOWED_PAGE = {"at_most_once"}  # a crash mid-effect of an at_most_once step must page


def settings_for(url: str) -> Settings:
    return Settings(
        database_url=url,
        broker_url="memory://",
        step_timeout=5.0,
        lease_margin=1.0,
        retries=2,
        retryable_retries=1,
        compensation_retries=1,
        retry_base=0.01,
        retry_cap=0.05,
        countdown_max=1.0,
        republish_after=2.0,
        rollback_deadline=3600.0,
        max_deliveries=3,
        secret_key="q6nEJ8tZ0h3hV2b8QyX1c0m9d3s7a2k5f8g1j4l6p0w=",
    )


class Recorder:
    """A notifier that records what it was asked to send (log-like, never fails)."""

    name = "log"
    kinds = frozenset({Kind.PAGE, Kind.NOTIFY})

    def __init__(self) -> None:
        self.sent: list[Notice] = []

    def send(self, notice: Notice) -> None:
        self.sent.append(notice)


@dataclass
class Driver:
    store: Store
    engine: Engine
    settings: Settings
    faults: Faults
    clock: Clock
    notifier: Recorder = field(default_factory=Recorder)
    queue: deque[Dispatch] = field(default_factory=deque)
    crashes: int = 0
    db_errors: int = 0
    stranded_seen: list[str] = field(default_factory=list)
    _workers: Any = field(default_factory=lambda: itertools.count(1))

    def publish(self, dispatches: Any) -> None:
        self.queue.extend(dispatches)

    def execute(self, d: Dispatch) -> None:
        saga_id, ref = d.args
        if d.task_name == NOTIFY_TASK:
            _word, again = deliver(self.store, {"log": self.notifier}, int(ref),
                                  countdown_max=self.settings.countdown_max)
            self.engine.publish_now(again, Write.END_DELIVERY)
            return
        if d.task_name == RELEASE_TASK:
            self._release(int(ref))
            return
        step = next(s for saga in registry for s in saga.steps
                    if d.task_name in (s.task_name, s.compensate_task_name))
        self.engine.execute(saga_id, int(ref), step=step, worker=f"w{next(self._workers)}",
                            task_id=d.message_id)

    def _release(self, resource_id: int) -> None:
        """What the ``sagaq.release`` task does (``Runtime.release``)."""
        res = self.store.begin_release(resource_id)
        if res is None:
            return
        saga = self.store.get_saga_or_raise(res.saga_id)
        try:
            registry.get(saga.name).releasers[res.kind](ReleaseContext(
                saga.id, saga.name, res.step, res.kind, res.external_id, "key", res.attempts))
        except Exception as exc:
            if res.attempts <= self.settings.compensation_retries:
                again = self.store.end_release(res, released=False, error=str(exc),
                                               retry_in=0.01)
                self.engine.publish_now(again, Write.END_RELEASE)
                return
            self.engine.publish_now(self.store.end_release(res, released=False, error=str(exc)),
                                    Write.END_RELEASE)
            return
        self.store.end_release(res, released=True)

    def drain(self, limit: int = 400) -> None:
        """Run every queued message; a crash puts its message back (redelivery)."""
        for _ in range(limit):
            if not self.queue:
                return
            d = self.queue.popleft()
            global clock_of_driver
            clock_of_driver = self.clock
            try:
                self.execute(d)
            except Vanish:
                self.crashes += 1  # the worker died and the broker lost its message
            except Crash:
                self.crashes += 1
                self.queue.append(d)  # the worker died: the broker delivers it again
            except sa.exc.OperationalError:
                self.db_errors += 1  # the task failed: acknowledged, the message is gone
        raise AssertionError("the queue did not drain: a message loops")

    def reconcile(self) -> None:
        result = sweep(self.store, self.settings)
        self.engine.publish_now(result.dispatches, Write.REPUBLISH)


_stores: dict[tuple[str, bool], tuple[Store, Clock]] = {}


def make_driver(url: str, faults: Faults, *, gated: bool = True) -> Driver:
    """A driver on the store of ``url`` (one per database, its pools reused across runs).

    ``gated``: under the sweep's policy. Without a policy the store takes its one-statement
    paths (enqueue, advance, finish) where it can.
    """
    if (url, gated) not in _stores:
        clock = Clock()
        store = Store(create_engine(url), clock=clock,
                      channels={Kind.PAGE: ("log",), Kind.NOTIFY: ("log",)},
                      gate=Gate(POLICY, registry, "production") if gated else None,
                      approval_deadline=86400.0 * 30)
        _stores[url, gated] = store, clock
    store, clock = _stores[url, gated]
    store.fault = faults
    # What a worker does first: record the policy it gates with; a failure there is logged
    # and the worker runs on (Runtime.record_policy).
    with contextlib.suppress(Crash, sa.exc.OperationalError):
        store.record_policy("sweep", policy="sweep", env="production", source="sweep",
                            worker="sweep")
    settings = settings_for(url)
    holder: list[Driver] = []
    engine = Engine(store, settings, publish=lambda ds: holder[0].publish(ds), registry=registry)
    driver = Driver(store, engine, settings, faults, clock)
    holder.append(driver)
    return driver


def run_shape(driver: Driver, shape: Shape, *, check_liveness: bool = True) -> str:
    """Enqueue one saga of ``shape`` and drive it, through any fault, to where it settles.

    The tables are emptied first: a run must not meet what an earlier one left behind.
    """
    store = driver.store
    with store.engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE sagaq_sagas, sagaq_step_runs, sagaq_events, "
                             "sagaq_outbox, sagaq_notifications, sagaq_resources, "
                             "sagaq_approvals"))
    saga_id = ""
    key = f"sweep-{uuid.uuid4()}"  # the caller's retry after an error enqueues it once
    for _ in range(3):  # a crash at enqueue: the caller sees the error and tries again
        try:
            saga_id = driver.engine.enqueue(shape.saga, shape.input, key=key)
            break
        except Crash:
            driver.crashes += 1
        except (sa.exc.OperationalError, DatabaseUnavailable):
            driver.db_errors += 1
    assert saga_id, "enqueue never went through"
    if shape.lose_first_message and driver.queue:
        driver.queue.popleft()  # Redis flushed: the message is gone, its outbox row is not
    if shape.strand:  # by hand: it has no way forward until the reconciler repairs it
        _strand(store, saga_id, driver)
    operated = False
    for _ in range(40):
        driver.drain()
        if check_liveness and not shape.strand:
            for s in store.stranded(saga_id=saga_id):
                driver.stranded_seen.append(f"{s.state.value}: {s.reason}")
        _approve(driver, saga_id)
        saga = store.get_saga_or_raise(saga_id)
        if saga.state is SagaState.NEEDS_HUMAN and shape.operator and not operated:
            operated = _operate(driver, shape, saga_id)
            if operated:
                continue
        if saga.state in shape.ends | {SagaState.NEEDS_HUMAN} and not driver.queue and (
            saga.state is not SagaState.NEEDS_HUMAN or not shape.operator or operated
        ) and _quiet(store, saga_id):
            return saga_id
        driver.clock.advance(10.0)  # past every lease (6 s) and the republish grace (2 s)
        try:
            driver.reconcile()
        except Crash:
            driver.crashes += 1
        except sa.exc.OperationalError:
            driver.db_errors += 1
    return saga_id


def _quiet(store: Store, saga_id: str) -> bool:
    """Nothing left in flight for the saga: no active run, no message, no pending notice,
    no resource waiting to be released."""
    with store.engine.connect() as conn:
        active = conn.execute(sa.select(RUNS.c.id).where(
            RUNS.c.saga_id == saga_id,
            sa.or_(RUNS.c.status.in_(["scheduled", "running"]),
                   sa.and_(RUNS.c.status == "unknown", RUNS.c.finished_at.is_(None))))).first()
        outbox = conn.execute(sa.select(OUTBOX.c.id).where(OUTBOX.c.saga_id == saga_id)).first()
        pending = conn.execute(sa.select(NOTIFICATIONS.c.id).where(
            NOTIFICATIONS.c.saga_id == saga_id,
            NOTIFICATIONS.c.status.in_(["pending", "sending"]))).first()
        releasing = conn.execute(sa.select(RESOURCES.c.id).where(
            RESOURCES.c.saga_id == saga_id,
            RESOURCES.c.status.in_(["orphaned", "releasing"]))).first()
    return active is None and outbox is None and pending is None and releasing is None


def _strand(store: Store, saga_id: str, driver: Driver) -> bool:
    """Delete the scheduled run's outbox row and drop its message: stranded by hand."""
    with store.engine.begin() as conn:
        gone = conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.saga_id == saga_id)
                            .returning(OUTBOX.c.message_id)).scalars().all()
    driver.queue = deque(d for d in driver.queue if d.message_id not in gone)
    return bool(gone)


def _approve(driver: Driver, saga_id: str) -> None:
    """A human approves each request once it was sent to them."""
    if not any(n.saga_id == saga_id and "waits for a human decision" in n.summary
               for n in driver.notifier.sent):
        return
    for request in driver.store.approvals(saga_id=saga_id, status="pending"):
        try:
            outcome = driver.store.decide(request.id, approve=True, by="alice", policy="p")
        except (Crash, sa.exc.OperationalError, InputError):
            driver.crashes += 1  # the command failed: the human runs it again next round
            continue
        try:
            driver.engine.publish_now(outcome.dispatches, Write.DECIDE)
        except Crash:
            driver.crashes += 1  # it died after the commit: the outbox has the message


def _operate(driver: Driver, shape: Shape, saga_id: str) -> bool:
    """The on-call engineer, once paged: retries or resolves (again if the command fails)."""
    if not any(n.kind is Kind.PAGE and n.saga_id == saga_id for n in driver.notifier.sent):
        return False
    try:
        if shape.operator == "retry":
            retried.add(saga_id)
            outcome = driver.store.retry(saga_id, by="bob", note="fixed upstream")
        else:
            outcome = driver.store.resolve(saga_id, by="bob", note="undone by hand")
    except (Crash, sa.exc.OperationalError):
        driver.crashes += 1
        return False
    if not outcome.won:
        return False
    try:
        driver.engine.publish_now(outcome.dispatches,
                                  Write.RETRY if shape.operator == "retry" else Write.RESOLVE)
    except Crash:
        driver.crashes += 1  # it died after the commit: the outbox has the messages
    return True


def check(driver: Driver, shape: Shape, saga_id: str) -> list[str]:
    """What is wrong with how ``saga_id`` ended; empty when every invariant holds."""
    store = driver.store
    saga = store.get_saga_or_raise(saga_id)
    wrong: list[str] = []
    ends = shape.ends | ({SagaState.NEEDS_HUMAN} if shape.name in ALLOWED_PAGE else set())
    if saga.state not in ends:
        wrong.append(f"ended {saga.state.value}, expected one of "
                     f"{sorted(s.value for s in ends)} ({saga.error})")
    wrong += [f"no way forward at some point: {s}" for s in dict.fromkeys(driver.stranded_seen)]
    wrong += [f"stranded at the end: {s.reason}" for s in store.stranded(saga_id=saga_id)]
    if not _quiet(store, saga_id):
        wrong.append("something is still in flight (a run, an outbox row or a notice)")
    done = [c.step for c in world.effects(saga_id=saga_id, op="do")]
    undone = [c.step for c in world.effects(saga_id=saga_id, op="undo")]
    if saga.state is SagaState.COMPLETED:
        steps = [s.name for s in shape.saga.steps]
        if done != steps or undone:
            wrong.append(f"completed with effects {done} and undos {undone}, expected {steps}")
    if saga.state is SagaState.COMPENSATED:
        undoable = {s.name for s in shape.saga.steps if s.compensate is not None}
        done = [s for s in done if s in undoable]
        if [s for s in reversed(undone) if s in done] != done or set(done) - set(undone):
            wrong.append(f"compensated: did {done}, undid {undone} (not in reverse order, "
                         "or something left standing)")
    if shape.name == "orphan_paged" and not any(
        n.kind is Kind.PAGE and "could not be released" in (n.note or "")
        for n in driver.notifier.sent
    ):
        wrong.append("the orphan that could not be released was not paged")
    if shape.name == "orphan" and (saga_id, "vm", f"vm-{saga_id[:8]}") not in releases:
        wrong.append("the orphaned vm was not released")
    if saga.state is SagaState.NEEDS_HUMAN and not any(
        n.kind is Kind.PAGE and n.saga_id == saga_id for n in driver.notifier.sent
    ):
        wrong.append("needs_human, but no page was delivered")
    return wrong
