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
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from sagaq import ladder
from sagaq.context import StepContext
from sagaq.definition import Registry, Saga, Step, StepKind, sagas
from sagaq.errors import ConfigurationError, InputError, LogicalError, TerminalError
from sagaq.failures import FailureClass, classify, in_doubt
from sagaq.keys import idempotency_key
from sagaq.ladder import Then
from sagaq.machine import Direction, StepStatus
from sagaq.preflight import database_errors, refuse_nul
from sagaq.secrets import SecretBox, SecretsUnreadable, redact, revealed
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

log = logging.getLogger("sagaq.engine")

Publish = Callable[[Sequence[Dispatch]], None]

_SESSION_KEY = "sagaq.dispatches"


LEASE_MAX = 60.0
"""A lease longer than this is kept alive by heartbeats instead, so that a dead worker is
found out within a minute or so, whatever the step's timeout."""


def to_json(value: Any, what: str) -> Any:
    """``value`` as JSON will give it back (tuples become lists), or an :class:`InputError`."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is not JSON-serialisable: {exc}") from None
    value = json.loads(text)
    refuse_nul(value, what)  # PostgreSQL's jsonb refuses U+0000 in any text
    return value


def describe(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = text.replace("\x00", "\\x00")  # PostgreSQL text cannot hold U+0000
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
        self.box = SecretBox(settings.secret_key)  # a malformed key fails here, at start-up

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
        first = self._new_run(saga_id, steps[0], Direction.FORWARD, 1, reason="first step")
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
            return self._resolve_unknown(claim.run, step, worker, task_id)
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
            return self._failed(saga, run, None, exc, worker, task_id, force=Then.ESCALATE)
        try:
            ctx = self._context(saga, run, claim.forward_result, worker, task_id, claim.errors)
        except SecretsUnreadable as exc:  # a key rotated away: page now, naming the variable
            return self._failed(saga, run, step, exc, worker, task_id, force=Then.ESCALATE)
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
                return self._in_doubt(saga, run, step, exc, ctx, worker, task_id)
            return self._failed(saga, run, step, exc, worker, task_id, ctx=ctx, also=value)
        try:
            result = to_json(self.box.seal(value), f"result of {saga.name}.{step.name}")
            data = to_json(self.box.seal(ctx.checkpoint),
                           f"checkpoint after {saga.name}.{step.name}")
        except (InputError, ConfigurationError) as exc:  # it returned: its effect may be there
            bad = TerminalError(exc.message)
            return self._failed(saga, run, step, bad, worker, task_id, ctx=ctx, also=value,
                                status=StepStatus.UNKNOWN)
        checkpoint = None
        next_run = None
        if forward:
            checkpoint = {"results": {**saga.results, step.name: result}, "data": data}
            following = definition.steps[step.index + 1 :]
            if following:
                next_run = self._new_run(saga.id, following[0], Direction.FORWARD, 1)
        outcome = self.store.succeed(
            saga.id, run.id, token=run.deliveries, result=result, checkpoint=checkpoint,
            next_run=next_run, worker=worker, task_id=task_id,
        )
        self._after(saga, outcome, Write.SUCCEED)
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

    def _failed(
        self,
        saga: SagaRecord,
        run: StepRunRecord,
        step: Step | None,
        exc: BaseException,
        worker: str,
        task_id: str | None,
        *,
        ctx: StepContext | None = None,
        also: Any = None,
        force: Then | None = None,
        expected: StepStatus = StepStatus.RUNNING,
        status: StepStatus = StepStatus.FAILED,
    ) -> str:
        """Classify, let the ladder decide, record it all in one transaction, publish.

        ``also``: a value the step returned before it failed (a validate that rejected it):
        its secrets are redacted from the error too.
        """
        if step is None or force is Then.ESCALATE:
            failure = FailureClass.TERMINAL
            rung = ladder.Rung(4, True, "page", f"cannot go on: {describe(exc)}")
            decision = ladder.Decision(Then.ESCALATE, (rung,), 4)
        else:
            definition = self.registry.get(saga.name)
            failure = classify(exc, (*step.classify, *definition.classify))
            history = (
                *(ladder.Attempt(r.level, r.tier, FailureClass(r.failure or "transient"))
                  for r in self.store.round_of(run)),
                ladder.Attempt(run.level, run.tier, failure,
                               unknown=status is StepStatus.UNKNOWN),
            )
            facts = ladder.StepFacts(
                direction=run.direction,
                rungs=step.rungs,
                tiers=step.tiers,
                refresh=definition.refresh_hook is not None,
                after_pivot=definition.pivot_index is not None
                and step.index > definition.pivot_index,
                at_most_once=step.at_most_once,
            )
            decision = ladder.decide(facts, history, self._bounds(definition, step), self.rng)
        retry = None
        if decision.then is Then.RETRY and step is not None:
            retry = replace(
                self._new_run(saga.id, step, run.direction, run.attempt + 1,
                              delay=decision.delay, reason=decision.reason),
                level=decision.level,
                tier=decision.tier,
                durable=decision.delay > self.settings.countdown_max,
            )
        checkpoint = None
        if decision.refresh and ctx is not None:
            checkpoint = self._refresh(saga, step, ctx)
        error = self._redacted(describe(exc), ctx, also)
        outcome = self.store.fail(
            saga.id,
            run.id,
            token=run.deliveries,
            error=error,
            error_type=type(exc).__name__,
            failure=failure.value,
            then=decision.then,
            rungs=decision.rungs,
            retry=retry,
            checkpoint=checkpoint,
            worker=worker,
            task_id=task_id,
            expected=expected,
            status=status,
        )
        self._after(saga, outcome, Write.FAIL)
        return f"failed ({decision.then.value})" if outcome.won else f"lost ({outcome.note})"

    def _redacted(self, text: str, ctx: StepContext | None, also: Any = None) -> str:
        """``text`` with every secret the step could see, or returned, taken out."""
        if ctx is None:
            return text
        return redact(text, revealed([ctx.results, ctx.checkpoint, ctx.result, also]))

    def _refresh(
        self, saga: SagaRecord, step: Step | None, ctx: StepContext
    ) -> dict[str, Any] | None:
        """Run the saga's refresh hook: the world is re-read into the checkpoint."""
        hook = self.registry.get(saga.name).refresh_hook
        if hook is None:
            return None
        try:
            returned = hook(ctx, saga.input)
            if isinstance(returned, dict):
                ctx.checkpoint.update(returned)
            data = to_json(self.box.seal(ctx.checkpoint), f"checkpoint refreshed by {saga.name}")
        except Exception as exc:  # logged redacted: its message may quote a secret
            log.error("the refresh hook of %s failed; retrying without it: %s", saga.name,
                      self._redacted(describe(exc), ctx))
            return None
        return {"results": saga.results, "data": data}

    def _bounds(self, definition: Saga, step: Step) -> ladder.Bounds:
        retryable = step.kind is StepKind.RETRYABLE
        return step.ladder.over(definition.ladder, self.settings.bounds(retryable=retryable))

    def _resolve_unknown(
        self, lapsed: StepRunRecord, step: Step, worker: str, task_id: str | None
    ) -> str:
        """A run whose lease expired (its worker died mid-effect): find out, then go on.

        This resolver takes the run over first (a lease and a delivery of its own; the run
        keeps its message, so a resolver that dies too leaves it for the next). ``verify``
        decides when the step has one; without it an at-least-once step is retried with the
        same key, and an ``at_most_once`` step is never re-run blind: the ladder pages and the
        saga waits for a human. A step whose worker keeps dying (a poison message) is parked
        after ``max_deliveries`` and climbs the ladder as a terminal failure.
        """
        run = self.store.expire(lapsed.saga_id, lapsed.id, worker=worker,
                                lease=self.lease_for(step))
        if run is None:
            return "dropped (resolved elsewhere)"
        saga = self.store.get_saga_or_raise(run.saga_id)
        u = StepStatus.UNKNOWN  # the effect may have landed: the run stays unknown
        try:
            step = self.registry.get(saga.name).step_named(run.step)
        except Exception as exc:
            return self._failed(saga, run, None, exc, worker, task_id, force=Then.ESCALATE,
                                expected=u, status=u)
        try:
            ctx = self._context(saga, run, None, worker, task_id)
        except SecretsUnreadable as exc:  # a key rotated away: page at once, name the variable
            return self._failed(saga, run, step, exc, worker, task_id, force=Then.ESCALATE,
                                expected=u, status=u)
        # Every earlier run of this round that ended unknown was a delivery whose worker
        # never finished (killed, out of memory): a poison message is parked, not looped.
        died = 1 + sum(r.status is u for r in self.store.round_of(run))
        if died >= self.settings.max_deliveries:
            parked = TerminalError(
                f"parked after {died} deliveries whose worker never finished this step "
                "(killed? out of memory?)"
            )
            return self._failed(saga, run, step, parked, worker, task_id, ctx=ctx,
                                expected=u, status=u)
        forward = run.direction is Direction.FORWARD
        if forward and step.verify is not None:
            return self._verify(saga, run, step, ctx, worker, task_id, expected=u,
                                why=f"lease of {lapsed.worker} expired")
        if forward and step.at_most_once:
            blind = TerminalError("outcome unknown and the step is at_most_once: it is never "
                                  "re-run without a successful verify")
            return self._failed(saga, run, step, blind, worker, task_id, ctx=ctx,
                                expected=u, status=u)
        lost = TimeoutError(f"lease of {lapsed.worker} expired; retrying with the same key")
        return self._failed(saga, run, step, lost, worker, task_id, ctx=ctx,
                            expected=u, status=u)

    def _in_doubt(
        self, saga: SagaRecord, run: StepRunRecord, step: Step, exc: BaseException,
        ctx: StepContext, worker: str, task_id: str | None,
    ) -> str:
        """An error after the request may have left (a time limit, a read timeout, a reset):
        the outcome is unknown, like a lapsed lease. ``verify`` decides when there is one;
        without it the run is recorded unknown (a rollback then compensates it)."""
        if step.verify is not None:
            return self._verify(saga, run, step, ctx, worker, task_id,
                                expected=StepStatus.RUNNING, why=describe(exc), cause=exc)
        return self._failed(saga, run, step, exc, worker, task_id, ctx=ctx,
                            status=StepStatus.UNKNOWN)

    def _verify(
        self, saga: SagaRecord, run: StepRunRecord, step: Step, ctx: StepContext, worker: str,
        task_id: str | None, *, expected: StepStatus, why: str,
        cause: BaseException | None = None,
    ) -> str:
        """Ask the step's read-back whether its effect landed, and go on from the answer."""
        assert step.verify is not None
        u = StepStatus.UNKNOWN
        try:
            landed = step.verify(ctx, saga.input)
        except Exception as exc:  # no answer: still unknown (redacted: it may quote one)
            return self._failed(saga, run, step, exc, worker, task_id, ctx=ctx,
                                expected=expected, status=u)
        if not landed:  # known now: it did not land (so even an at_most_once step may run)
            absent = cause or TimeoutError(
                f"{why}; verify: the effect did not land; retrying with the same key")
            return self._failed(saga, run, step, absent, worker, task_id, ctx=ctx,
                                expected=expected, status=StepStatus.FAILED)
        if landed is True and not step.at_most_once:
            # It landed, but a bare True says nothing of its result, which later steps and
            # the compensation may need: run it again with the same key to obtain it.
            return self._rerun(saga, run, step, worker, task_id, expected=expected,
                               why=f"{why}; verify: the effect landed, its result is unknown")
        return self._verified(saga, run, step, landed, worker, task_id, expected=expected)

    def _rerun(
        self, saga: SagaRecord, run: StepRunRecord, step: Step, worker: str,
        task_id: str | None, *, expected: StepStatus, why: str,
    ) -> str:
        reason = "re-run with the same key to obtain the result"
        rung = ladder.Rung(run.level, True, "re-run", f"{why}: {reason}")
        again = replace(self._new_run(saga.id, step, run.direction, run.attempt + 1,
                                      reason=reason), level=run.level, tier=run.tier)
        outcome = self.store.fail(
            saga.id, run.id, token=run.deliveries, error=why, error_type="OutcomeUnknown",
            failure=FailureClass.TRANSIENT.value, then=Then.RETRY, rungs=(rung,), retry=again,
            worker=worker, task_id=task_id, expected=expected, status=StepStatus.UNKNOWN,
        )
        self._after(saga, outcome, Write.FAIL)
        return "verified (re-run for its result)"

    def _verified(
        self, saga: SagaRecord, run: StepRunRecord, step: Step, landed: Any, worker: str,
        task_id: str | None, *, expected: StepStatus,
    ) -> str:
        definition = self.registry.get(saga.name)
        following = definition.steps[step.index + 1 :]
        try:  # what the read-back read is recorded as if the step had returned it
            result = None if landed is True else to_json(self.box.seal(landed), "verify result")
        except (InputError, ConfigurationError) as exc:
            return self._failed(saga, run, step, TerminalError(exc.message), worker, task_id,
                                expected=expected, status=StepStatus.UNKNOWN)
        outcome = self.store.succeed(
            saga.id,
            run.id,
            token=run.deliveries,
            result=result,
            checkpoint={"results": {**saga.results, step.name: result},
                        "data": saga.checkpoint.get("data", {})},
            next_run=self._new_run(saga.id, following[0], Direction.FORWARD, 1)
            if following else None,
            worker=worker,
            task_id=task_id,
            expected=expected,
            message="verify: the effect landed",
        )
        self._after(saga, outcome, Write.SUCCEED)
        return "verified"

    # -- helpers ------------------------------------------------------------------------

    def _context(
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

    def _after(self, saga: SagaRecord, outcome: Outcome, write: Write) -> None:
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
