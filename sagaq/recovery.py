"""When a step does not simply succeed: a failure up the ladder, or an outcome unknown.

A failure is classified, the ladder decides (retry, refresh, roll back, page), and the store
records it in one commit. An unknown outcome (a lapsed lease, an error after the request may
have left) is settled by the step's ``verify`` when it has one, never by re-running an
``at_most_once`` step blind. Split from :mod:`sagaq.engine`, which hosts it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from typing import Any, Protocol

from sagaq import ladder
from sagaq.context import StepContext
from sagaq.definition import Registry, Saga, Step, StepKind
from sagaq.errors import ConfigurationError, InputError, TerminalError
from sagaq.failures import FailureClass, classify
from sagaq.ladder import Then
from sagaq.machine import Direction, StepStatus
from sagaq.secrets import SecretBox, SecretsUnreadable, redact, revealed
from sagaq.settings import Settings
from sagaq.store import NewRun, Outcome, SagaRecord, StepRunRecord, Store
from sagaq.store.faults import Write
from sagaq.values import describe, to_json

log = logging.getLogger("sagaq.engine")


class Host(Protocol):
    """What recovery needs of the engine (which satisfies it; this module sits below it)."""

    store: Store
    settings: Settings
    registry: Registry
    rng: random.Random
    box: SecretBox

    def lease_for(self, step: Step) -> float: ...

    def context(
        self, saga: SagaRecord, run: StepRunRecord, forward_result: Any, worker: str,
        task_id: str | None, errors: tuple[str, ...] = (),
    ) -> StepContext: ...

    def new_run(
        self, saga_id: str, step: Step, direction: Direction, attempt: int, *,
        delay: float = 0.0, reason: str = "",
    ) -> NewRun: ...

    def after(self, saga: SagaRecord, outcome: Outcome, write: Write) -> None: ...


class Recovery:
    def __init__(self, host: Host) -> None:
        self.host = host

    def failed(
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
            definition = self.host.registry.get(saga.name)
            failure = classify(exc, (*step.classify, *definition.classify))
            history = (
                *(ladder.Attempt(r.level, r.tier, FailureClass(r.failure or "transient"))
                  for r in self.host.store.round_of(run)),
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
            decision = ladder.decide(facts, history, self._bounds(definition, step), self.host.rng)
        retry = None
        if decision.then is Then.RETRY and step is not None:
            retry = replace(
                self.host.new_run(saga.id, step, run.direction, run.attempt + 1,
                              delay=decision.delay, reason=decision.reason),
                level=decision.level,
                tier=decision.tier,
                durable=decision.delay > self.host.settings.countdown_max,
            )
        checkpoint = None
        if decision.refresh and ctx is not None:
            checkpoint = self._refresh(saga, step, ctx)
        error = self._redacted(describe(exc), ctx, also)
        outcome = self.host.store.fail(
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
        self.host.after(saga, outcome, Write.FAIL)
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
        hook = self.host.registry.get(saga.name).refresh_hook
        if hook is None:
            return None
        try:
            returned = hook(ctx, saga.input)
            if isinstance(returned, dict):
                ctx.checkpoint.update(returned)
            data = to_json(self.host.box.seal(ctx.checkpoint),
                           f"checkpoint refreshed by {saga.name}")
        except Exception as exc:  # logged redacted: its message may quote a secret
            log.error("the refresh hook of %s failed; retrying without it: %s", saga.name,
                      self._redacted(describe(exc), ctx))
            return None
        return {"results": saga.results, "data": data}

    def _bounds(self, definition: Saga, step: Step) -> ladder.Bounds:
        retryable = step.kind is StepKind.RETRYABLE
        return step.ladder.over(definition.ladder, self.host.settings.bounds(retryable=retryable))

    def resolve_unknown(
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
        run = self.host.store.expire(lapsed.saga_id, lapsed.id, worker=worker,
                                lease=self.host.lease_for(step))
        if run is None:
            return "dropped (resolved elsewhere)"
        saga = self.host.store.get_saga_or_raise(run.saga_id)
        u = StepStatus.UNKNOWN  # the effect may have landed: the run stays unknown
        try:
            step = self.host.registry.get(saga.name).step_named(run.step)
        except Exception as exc:
            return self.failed(saga, run, None, exc, worker, task_id, force=Then.ESCALATE,
                                expected=u, status=u)
        try:
            ctx = self.host.context(saga, run, None, worker, task_id)
        except SecretsUnreadable as exc:  # a key rotated away: page at once, name the variable
            return self.failed(saga, run, step, exc, worker, task_id, force=Then.ESCALATE,
                                expected=u, status=u)
        # Every earlier run of this round that ended unknown was a delivery whose worker
        # never finished (killed, out of memory): a poison message is parked, not looped.
        died = 1 + sum(r.status is u for r in self.host.store.round_of(run))
        if died >= self.host.settings.max_deliveries:
            parked = TerminalError(
                f"parked after {died} deliveries whose worker never finished this step "
                "(killed? out of memory?)"
            )
            return self.failed(saga, run, step, parked, worker, task_id, ctx=ctx,
                                expected=u, status=u)
        forward = run.direction is Direction.FORWARD
        if forward and step.verify is not None:
            return self._verify(saga, run, step, ctx, worker, task_id, expected=u,
                                why=f"lease of {lapsed.worker} expired")
        if forward and step.at_most_once:
            blind = TerminalError("outcome unknown and the step is at_most_once: it is never "
                                  "re-run without a successful verify")
            return self.failed(saga, run, step, blind, worker, task_id, ctx=ctx,
                                expected=u, status=u)
        lost = TimeoutError(f"lease of {lapsed.worker} expired; retrying with the same key")
        return self.failed(saga, run, step, lost, worker, task_id, ctx=ctx,
                            expected=u, status=u)

    def in_doubt(
        self, saga: SagaRecord, run: StepRunRecord, step: Step, exc: BaseException,
        ctx: StepContext, worker: str, task_id: str | None,
    ) -> str:
        """An error after the request may have left (a time limit, a read timeout, a reset):
        the outcome is unknown, like a lapsed lease. ``verify`` decides when there is one;
        without it the run is recorded unknown (a rollback then compensates it)."""
        if step.verify is not None:
            return self._verify(saga, run, step, ctx, worker, task_id,
                                expected=StepStatus.RUNNING, why=describe(exc), cause=exc)
        return self.failed(saga, run, step, exc, worker, task_id, ctx=ctx,
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
            return self.failed(saga, run, step, exc, worker, task_id, ctx=ctx,
                                expected=expected, status=u)
        if not landed:  # known now: it did not land (so even an at_most_once step may run)
            absent = cause or TimeoutError(
                f"{why}; verify: the effect did not land; retrying with the same key")
            return self.failed(saga, run, step, absent, worker, task_id, ctx=ctx,
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
        again = replace(self.host.new_run(saga.id, step, run.direction, run.attempt + 1,
                                      reason=reason), level=run.level, tier=run.tier)
        outcome = self.host.store.fail(
            saga.id, run.id, token=run.deliveries, error=why, error_type="OutcomeUnknown",
            failure=FailureClass.TRANSIENT.value, then=Then.RETRY, rungs=(rung,), retry=again,
            worker=worker, task_id=task_id, expected=expected, status=StepStatus.UNKNOWN,
        )
        self.host.after(saga, outcome, Write.FAIL)
        return "verified (re-run for its result)"

    def _verified(
        self, saga: SagaRecord, run: StepRunRecord, step: Step, landed: Any, worker: str,
        task_id: str | None, *, expected: StepStatus,
    ) -> str:
        definition = self.host.registry.get(saga.name)
        following = definition.steps[step.index + 1 :]
        try:  # what the read-back read is recorded as if the step had returned it
            sealed = None if landed is True else self.host.box.seal(landed)
            result = None if sealed is None else to_json(sealed, "verify result")
        except (InputError, ConfigurationError) as exc:
            return self.failed(saga, run, step, TerminalError(exc.message), worker, task_id,
                                expected=expected, status=StepStatus.UNKNOWN)
        outcome = self.host.store.succeed(
            saga.id,
            run.id,
            token=run.deliveries,
            result=result,
            checkpoint={"results": {**saga.results, step.name: result},
                        "data": saga.checkpoint.get("data", {})},
            next_run=self.host.new_run(saga.id, following[0], Direction.FORWARD, 1)
            if following else None,
            worker=worker,
            task_id=task_id,
            expected=expected,
            message="verify: the effect landed",
        )
        self.host.after(saga, outcome, Write.SUCCEED)
        return "verified"
