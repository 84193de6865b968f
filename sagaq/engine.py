"""The engine: applies the definitions and the ladder's decisions to the store.

It never imports Celery. Messages leave it as :class:`~sagaq.store.Dispatch` values handed
to a ``publish`` callable after the transaction that wrote them has committed; a lost
publish is repaired from the outbox, never from memory.

One message, one step run::

    claim (commit) → action(ctx, input) → succeed | fail (one commit: result, checkpoint,
    events, the next run and its outbox row) → publish
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from sagaq import ladder
from sagaq.context import StepContext
from sagaq.definition import Registry, Saga, Step, StepKind, sagas
from sagaq.errors import InputError
from sagaq.keys import idempotency_key
from sagaq.ladder import Then
from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.settings import Settings
from sagaq.store import ClaimStatus, Dispatch, NewRun, Outcome, SagaRecord, StepRunRecord, Store

log = logging.getLogger("sagaq.engine")

Publish = Callable[[Sequence[Dispatch]], None]

_SESSION_KEY = "sagaq.dispatches"


def to_json(value: Any, what: str) -> Any:
    """``value`` as JSON will give it back (tuples become lists), or an :class:`InputError`."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is not JSON-serialisable: {exc}") from None


def describe(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        saga_id = str(uuid.uuid4())
        first = self._new_run(saga_id, steps[0], Direction.FORWARD, 1, reason="first step")
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
            self._publish(dispatches)
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

    def lease_for(self, step: Step) -> float:
        return (step.timeout or self.settings.step_timeout) + self.settings.lease_margin

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
            return self._resolve_unknown(claim.run, worker, task_id)
        if claim.status is not ClaimStatus.CLAIMED:
            return f"dropped ({claim.status.value})"
        assert claim.saga is not None
        return self._run(claim.saga, claim.run, claim.forward_result, worker, task_id)

    def _run(
        self, saga: SagaRecord, run: StepRunRecord, forward_result: Any, worker: str,
        task_id: str | None,
    ) -> str:
        try:
            definition = self.registry.get(saga.name)
            step = definition.step_named(run.step)
        except Exception as exc:  # a deploy removed it: say so, do not guess
            return self._failed(saga, run, None, exc, worker, task_id, force=Then.ESCALATE)
        ctx = self._context(saga, run, forward_result, worker, task_id)
        forward = run.direction is Direction.FORWARD
        fn = step.action if forward else step.compensate
        try:
            if fn is None:
                raise InputError(f"step {step.name!r} no longer has a compensation")
            value = fn(ctx, saga.input)
        except Exception as exc:
            return self._failed(saga, run, step, exc, worker, task_id)
        try:
            result = to_json(value, f"result of {saga.name}.{step.name}")
            data = to_json(ctx.checkpoint, f"checkpoint after {saga.name}.{step.name}")
        except InputError as exc:  # it returned, so its effect may have landed
            return self._failed(saga, run, step, exc, worker, task_id, force=None, landed=True)
        checkpoint = None
        next_run = None
        if forward:
            checkpoint = {"results": {**saga.results, step.name: result}, "data": data}
            following = definition.steps[step.index + 1 :]
            if following:
                next_run = self._new_run(saga.id, following[0], Direction.FORWARD, 1)
        outcome = self.store.succeed(
            saga.id, run.id, result=result, checkpoint=checkpoint, next_run=next_run,
            worker=worker, task_id=task_id,
        )
        self._after(saga, outcome)
        return "succeeded" if outcome.won else f"lost ({outcome.note})"

    def _failed(
        self,
        saga: SagaRecord,
        run: StepRunRecord,
        step: Step | None,
        exc: BaseException,
        worker: str,
        task_id: str | None,
        *,
        force: Then | None = None,
        landed: bool = False,
        expected: StepStatus = StepStatus.RUNNING,
    ) -> str:
        failure = ladder.FailureClass.TERMINAL if landed else ladder.classify(exc)
        if step is None or force is Then.ESCALATE:
            decision = ladder.Decision(Then.ESCALATE, 4, describe(exc))
        else:
            decision = ladder.decide(
                ladder.Failure(
                    direction=run.direction,
                    attempt=run.attempt,
                    retries=self._retries(step, run.direction),
                    failure=failure,
                    after_pivot=self._after_pivot(saga.name, step),
                ),
                base=self.settings.retry_base,
                cap=self.settings.retry_cap,
                rng=self.rng,
            )
        retry = None
        if decision.then is Then.RETRY and step is not None:
            retry = self._new_run(saga.id, step, run.direction, run.attempt + 1,
                                  delay=decision.delay, reason=decision.reason)
        outcome = self.store.fail(
            saga.id,
            run.id,
            error=describe(exc),
            error_type=type(exc).__name__,
            then=decision.then,
            retry=retry,
            worker=worker,
            task_id=task_id,
            expected=expected,
            status=StepStatus.UNKNOWN if landed else StepStatus.FAILED,
            data={"level": decision.level, "reason": decision.reason,
                  "failure": failure.value},
        )
        self._after(saga, outcome)
        return f"failed ({decision.then.value})" if outcome.won else f"lost ({outcome.note})"

    def _resolve_unknown(self, run: StepRunRecord, worker: str, task_id: str | None) -> str:
        """A run whose lease expired: read back with ``verify``, else retry or page."""
        if not self.store.expire(run.saga_id, run.id, worker=worker):
            return "dropped (resolved elsewhere)"
        saga = self.store.get_saga_or_raise(run.saga_id)
        try:
            step: Step | None = self.registry.get(saga.name).step_named(run.step)
        except Exception:
            step = None
        unknown = StepStatus.UNKNOWN
        if step is None or run.direction is Direction.COMPENSATE or step.verify is None:
            if step is not None and step.at_most_once and run.direction is Direction.FORWARD:
                blind = InputError("outcome unknown and the step is at_most_once: "
                                   "it is never re-run without a successful verify")
                return self._failed(saga, run, step, blind, worker, task_id,
                                    force=Then.ESCALATE, expected=unknown)
            lost = TimeoutError(f"lease expired on {run.worker}; retrying with the same key")
            return self._failed(saga, run, step, lost, worker, task_id, expected=unknown)
        ctx = self._context(saga, run, None, worker, task_id)
        try:
            landed = step.verify(ctx, saga.input)
        except Exception as exc:
            return self._failed(saga, run, step, exc, worker, task_id, expected=unknown)
        if not landed:
            absent = TimeoutError("verify: the effect did not land; retrying with the same key")
            return self._failed(saga, run, step, absent, worker, task_id, expected=unknown)
        definition = self.registry.get(saga.name)
        following = definition.steps[step.index + 1 :]
        result = None if landed is True else to_json(landed, "verify result")
        outcome = self.store.succeed(
            saga.id,
            run.id,
            result=result,
            checkpoint={"results": {**saga.results, step.name: result},
                        "data": saga.checkpoint.get("data", {})},
            next_run=self._new_run(saga.id, following[0], Direction.FORWARD, 1)
            if following else None,
            worker=worker,
            task_id=task_id,
            expected=unknown,
            message="verify: the effect landed",
        )
        self._after(saga, outcome)
        return "verified"

    # -- helpers ------------------------------------------------------------------------

    def _context(
        self, saga: SagaRecord, run: StepRunRecord, forward_result: Any, worker: str,
        task_id: str | None,
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
            results=MappingProxyType(saga.results),
            checkpoint=dict(data),
            result=forward_result,
            worker=worker,
            task_id=task_id,
        )

    def _new_run(
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
        return NewRun(
            step=step.name,
            step_index=step.index,
            direction=direction,
            attempt=attempt,
            task_name=task,
            idempotency_key=idempotency_key(saga_id, step.name, direction),
            compensate_task=step.compensate_task_name if forward else None,
            delay=delay,
            reason=reason,
        )

    def _retries(self, step: Step, direction: Direction) -> int:
        if direction is Direction.COMPENSATE:
            return self.settings.compensation_retries
        if step.retries is not None:
            return step.retries
        if step.kind is StepKind.RETRYABLE:
            return self.settings.retryable_retries
        return self.settings.retries

    def _after_pivot(self, saga: str, step: Step) -> bool:
        pivot = self.registry.get(saga).pivot_index
        return pivot is not None and step.index > pivot

    def _after(self, saga: SagaRecord, outcome: Outcome) -> None:
        self._publish(outcome.dispatches)
        if outcome.entered is SagaState.NEEDS_HUMAN:
            log.error("saga %s (%s) needs a human; see `sagaq show %s`",
                      saga.id, saga.name, saga.id)

    def _publish(self, dispatches: Sequence[Dispatch]) -> None:
        if not dispatches:
            return
        try:
            self.publish(dispatches)
        except Exception:  # the outbox row stays; the reconciler re-publishes it
            log.exception("publishing %d message(s) failed; the outbox keeps them",
                          len(dispatches))
