"""The engine: applies the definitions and the ladder's decisions to the store.

It never imports Celery. Messages leave it as :class:`~sagaq.store.Dispatch` values handed
to a ``publish`` callable after the transaction that wrote them has committed; a lost
publish is repaired from the outbox, never from memory.

One message, one step run::

    claim (commit) → action(ctx, input) → succeed | fail (one commit: result, checkpoint,
    events, the next run and its outbox row) → publish
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from sagaq.context import StepContext
from sagaq.definition import Registry, Saga, Step, sagas
from sagaq.errors import ConfigurationError, InputError, LogicalError, TerminalError
from sagaq.failures import in_doubt
from sagaq.keys import idempotency_key
from sagaq.ladder import Then
from sagaq.machine import Direction, StepStatus
from sagaq.preflight import database_errors, refuse_nul
from sagaq.recovery import Recovery
from sagaq.secrets import SecretBox, SecretsUnreadable
from sagaq.settings import Settings
from sagaq.store import (
    Claim,
    ClaimStatus,
    Dispatch,
    NewRun,
    Outcome,
    SagaRecord,
    StepRunRecord,
    Store,
)
from sagaq.store.faults import Phase, Write
from sagaq.values import describe as describe  # runtime and tests import it from here
from sagaq.values import to_json as to_json

log = logging.getLogger("sagaq.engine")

Publish = Callable[[Sequence[Dispatch]], None]

_SESSION_KEY = "sagaq.dispatches"


LEASE_MAX = 60.0
"""A lease longer than this is kept alive by heartbeats instead, so that a dead worker is
found out within a minute or so, whatever the step's timeout."""


class Engine:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        publish: Publish,
        registry: Registry = sagas,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.publish = publish
        self.registry = registry
        self.rng = rng or random.Random()
        self.box = SecretBox(settings.secret_key)  # a malformed key fails here, at start-up
        self.recovery = Recovery(self)  # failures and unknown outcomes

    # -- starting -----------------------------------------------------------------------

    def enqueue(
        self,
        saga: Saga | str,
        input: Any = None,
        *,
        key: str | None = None,
        session: Session | None = None,
    ) -> str:
        """Write the saga, its first step run and its message; publish after the commit.

        With ``session``, the writes join the caller's transaction on the sagaq database:
        the saga exists, and its message leaves, only if the caller commits. With ``key``,
        enqueueing twice returns the first saga's id instead of starting another.
        """
        definition = self.registry.get(saga) if isinstance(saga, str) else saga
        steps = definition.steps
        payload = to_json({} if input is None else input, f"input of saga {definition.name!r}")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 255):
            raise InputError("key must be a non-empty string of at most 255 characters")
        refuse_nul(key, "the key")  # the input: to_json above refused U+0000 already
        saga_id = str(uuid.uuid4())
        first = self.new_run(saga_id, steps[0], Direction.FORWARD, 1, reason="first step")
        with database_errors(self.store.engine):  # DatabaseUnavailable, not a raw DBAPIError
            saga_id, _created, dispatches = self.store.create_saga(
                saga_id=saga_id,
                name=definition.name,
                version=definition.version,
                input=payload,
                key=key,
                first=first,
                session=session,
            )
        if session is None:
            self._publish(dispatches, Write.ENQUEUE)
        else:
            self._publish_after_commit(session, dispatches)
        return saga_id

    def _publish_after_commit(self, session: Session, dispatches: list[Dispatch]) -> None:
        """Publish when the caller's outermost transaction commits, never before.

        Dispatches belong to the innermost open transaction (a savepoint, if one is open):
        releasing a savepoint hands them to its parent, rolling one back drops them (and only
        them), and only the commit of the outermost transaction publishes.
        """
        if _SESSION_KEY not in session.info:
            session.info[_SESSION_KEY] = {}

            @event.listens_for(session, "after_commit")
            def _committed(s: Session) -> None:
                pending = s.info[_SESSION_KEY]
                savepoint = s.get_nested_transaction()
                if savepoint is not None:  # a released savepoint: not a commit yet
                    if savepoint in pending:
                        pending.setdefault(savepoint.parent, []).extend(pending.pop(savepoint))
                    return
                ready = [d for batch in pending.values() for d in batch]
                pending.clear()
                self._publish(ready)

            @event.listens_for(session, "after_soft_rollback")
            def _rolled_back(s: Session, previous: Any) -> None:
                pending = s.info[_SESSION_KEY]
                for tx in list(pending):
                    t = tx
                    while t is not None and t is not previous:
                        t = t.parent
                    if t is previous:
                        del pending[tx]  # undone with the transaction that wrote it

        tx = session.get_nested_transaction() or session.get_transaction()
        session.info[_SESSION_KEY].setdefault(tx, []).extend(dispatches)

    # -- running ------------------------------------------------------------------------

    def timeout_for(self, step: Step) -> float:
        return step.timeout or self.settings.step_timeout

    def lease_for(self, step: Step) -> float:
        """The lease a claim takes; a step that runs longer keeps it alive by heartbeats."""
        return min(self.timeout_for(step), LEASE_MAX) + self.settings.lease_margin

    def hard_limit(self, step: Step) -> float:
        """Seconds from its start after which an attempt's outcome is unknown, heartbeats
        or not (the pools without time limits, threads and solo, enforce nothing)."""
        return self.timeout_for(step) + self.settings.lease_margin

    def execute(
        self,
        saga_id: str,
        run_id: int,
        *,
        step: Step,
        worker: str,
        task_id: str | None = None,
    ) -> str:
        """Handle one delivered message; returns a word for the worker's log."""
        claim = self.store.claim(
            saga_id, run_id, worker=worker, task_id=task_id, lease=self.lease_for(step)
        )
        if claim.status is ClaimStatus.MISSING:
            log.warning("no step run %s of saga %s: message acknowledged and dropped",
                        run_id, saga_id)
            return "missing"
        assert claim.run is not None
        if claim.status is ClaimStatus.EXPIRED:
            return self.recovery.resolve_unknown(claim.run, step, worker, task_id)
        if claim.status is not ClaimStatus.CLAIMED:
            return f"dropped ({claim.status.value})"
        return self._run(claim, worker, task_id)

    def _run(
        self, claim: Claim, worker: str, task_id: str | None,
    ) -> str:
        saga, run = claim.saga, claim.run
        assert saga is not None and run is not None
        try:
            definition = self.registry.get(saga.name)
            step = definition.step_named(run.step)
        except Exception as exc:  # a deploy removed it: say so, do not guess
            return self.recovery.failed(saga, run, None, exc, worker, task_id, force=Then.ESCALATE)
        try:
            ctx = self.context(saga, run, claim.forward_result, worker, task_id, claim.errors)
        except SecretsUnreadable as exc:  # a key rotated away: page now, naming the variable
            return self.recovery.failed(saga, run, step, exc, worker, task_id, force=Then.ESCALATE)
        forward = run.direction is Direction.FORWARD
        if not forward:
            fn = step.compensate
        elif run.tier == "fallback" and step.fallback is not None:
            fn = step.fallback
        else:
            fn = step.action
        value: Any = None
        try:
            if fn is None:
                raise InputError(f"step {step.name!r} no longer has a compensation")
            with self._heartbeats(saga.id, run, step, worker):
                value = fn(ctx, saga.input)
            if forward and step.validate is not None and step.validate(ctx, value) is False:
                raise LogicalError(f"validate rejected the result of {step.name}")
        except Exception as exc:
            if forward and in_doubt(exc):  # the request may have landed: verify decides
                return self.recovery.in_doubt(saga, run, step, exc, ctx, worker, task_id)
            return self.recovery.failed(saga, run, step, exc, worker, task_id, ctx=ctx, also=value)
        try:
            result = to_json(self.box.seal(value), f"result of {saga.name}.{step.name}")
            data = to_json(self.box.seal(ctx.checkpoint),
                           f"checkpoint after {saga.name}.{step.name}")
        except (InputError, ConfigurationError) as exc:  # it returned: its effect may be there
            bad = TerminalError(exc.message)
            return self.recovery.failed(saga, run, step, bad, worker, task_id, ctx=ctx, also=value,
                                status=StepStatus.UNKNOWN)
        checkpoint = None
        next_run = None
        if forward:
            checkpoint = {"results": {**saga.results, step.name: result}, "data": data}
            following = definition.steps[step.index + 1 :]
            if following:
                next_run = self.new_run(saga.id, following[0], Direction.FORWARD, 1)
        outcome = self.store.succeed(
            saga.id, run.id, token=run.deliveries, result=result, checkpoint=checkpoint,
            next_run=next_run, worker=worker, task_id=task_id, saga_name=saga.name,
        )
        self.after(saga, outcome, Write.SUCCEED)
        return "succeeded" if outcome.won else f"lost ({outcome.note})"

    @contextmanager
    def _heartbeats(self, saga_id: str, run: StepRunRecord, step: Step,
                    worker: str) -> Iterator[None]:
        """Keep the lease alive while the step really runs (up to its hard limit).

        Pools without time limits (threads, solo) would otherwise let a slow step's lease
        lapse and the step start again beside it. A SIGSTOPped or dead worker beats no more.
        """
        lease = self.lease_for(step)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(max(lease / 3, 0.5)):
                try:
                    alive = self.store.extend_lease(
                        saga_id, run.id, worker=worker, token=run.deliveries, lease=lease,
                        hard_limit=self.hard_limit(step))
                except Exception:  # the database is away: the lease may lapse, that is all
                    log.warning("heartbeat of run %s failed", run.id, exc_info=True)
                    continue
                if not alive:
                    return  # taken over, or past its hard limit: the outcome is unknown

        thread = threading.Thread(target=beat, name=f"sagaq-heartbeat-{run.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()

    def context(
        self, saga: SagaRecord, run: StepRunRecord, forward_result: Any, worker: str,
        task_id: str | None, errors: tuple[str, ...] = (),
    ) -> StepContext:
        data: Mapping[str, Any] = saga.checkpoint.get("data", {})
        return StepContext(
            saga_id=saga.id,
            saga=saga.name,
            step=run.step,
            direction=run.direction,
            idempotency_key=run.idempotency_key,
            attempt=run.attempt,
            input=saga.input,
            results=MappingProxyType(self.box.open(saga.results)),
            checkpoint=self.box.open(dict(data)),
            result=self.box.open(forward_result),
            worker=worker,
            task_id=task_id,
            level=run.level,
            tier=run.tier or self._default_tier(saga.name, run.step),
            errors=errors,
            on_heartbeat=lambda: self.store.extend_lease(
                saga.id, run.id, worker=worker, token=run.deliveries,
                lease=self._lease_of(saga.name, run.step),
                hard_limit=self._hard_limit_of(saga.name, run.step),
            ),
            on_resource=lambda kind, ext: self.store.register_resource(
                saga.id, run.id, run.step, kind, ext, token=run.deliveries
            ),
        )

    def _hard_limit_of(self, saga: str, step: str) -> float:
        try:
            return self.hard_limit(self.registry.get(saga).step_named(step))
        except Exception:
            return self.settings.step_timeout + self.settings.lease_margin

    def _lease_of(self, saga: str, step: str) -> float:
        try:
            return self.lease_for(self.registry.get(saga).step_named(step))
        except Exception:
            return self.settings.step_timeout + self.settings.lease_margin

    def _default_tier(self, saga: str, step: str) -> str | None:
        try:
            tiers = self.registry.get(saga).step_named(step).tiers
        except Exception:
            return None
        return tiers[0] if tiers and tiers[0] != "fallback" else None

    def new_run(
        self,
        saga_id: str,
        step: Step,
        direction: Direction,
        attempt: int,
        *,
        delay: float = 0.0,
        reason: str = "",
    ) -> NewRun:
        forward = direction is Direction.FORWARD
        task = step.task_name if forward else step.compensate_task_name
        assert task is not None, f"{step.name} has no compensation task"
        tier = step.tiers[0] if forward and step.tiers and step.tiers[0] != "fallback" else None
        pivot = self.registry.get(step.saga).pivot_index if forward else None
        return NewRun(
            step=step.name,
            step_index=step.index,
            direction=direction,
            attempt=attempt,
            task_name=task,
            idempotency_key=idempotency_key(saga_id, step.name, direction),
            compensate_task=step.compensate_task_name if forward else None,
            delay=delay,
            tier=tier,
            after_pivot=pivot is not None and step.index > pivot,
            reason=reason,
        )

    _new_run = new_run  # the name tests drive

    def after(self, saga: SagaRecord, outcome: Outcome, write: Write) -> None:
        # Entering needs_human queued the page (the log notifier is always one channel).
        self._publish(outcome.dispatches, write)

    def publish_now(self, dispatches: Sequence[Dispatch], write: Write | None = None) -> None:
        """Publish messages whose rows are committed (a failure leaves them to the outbox)."""
        self._publish(dispatches, write)

    def _publish(self, dispatches: Sequence[Dispatch], write: Write | None = None) -> None:
        if dispatches:
            try:
                self.publish(dispatches)
            except Exception:  # the outbox row stays; the reconciler re-publishes it
                log.exception("publishing %d message(s) failed; the outbox keeps them",
                              len(dispatches))
        if write is not None:
            self.store.fault(write, Phase.PUBLISHED)
