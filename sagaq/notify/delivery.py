"""Deliver one notification: build its notice from the store, send it, record the outcome.

Runs as its own Celery task (``sagaq.notify``), so a slow or broken pager never holds up a
step. 429, 5xx and network errors are tried again with backoff (through the outbox); other
4xx are recorded as a failed delivery and not retried.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sagaq.ladder import backoff
from sagaq.machine import Direction, StepStatus
from sagaq.notify.base import Action, DeliveryError, Kind, Notice, Notifier
from sagaq.store import Dispatch, NotificationRecord, Store

log = logging.getLogger("sagaq.notify")

MAX_ATTEMPTS = 8  # a notice (not a page) gives up after this many tries
PAGE_BACKOFF_CAP = 3600.0  # a page is tried until it is delivered, at least once an hour
TIMELINE_EVENTS = 12


def build_notice(store: Store, n: NotificationRecord) -> Notice:
    """What the page says: the saga, what failed, what is still not undone, what to run."""
    saga = store.get_saga_or_raise(n.saga_id)
    runs = store.step_runs(saga.id)
    failed = [r for r in runs if r.status in (StepStatus.FAILED, StepStatus.UNKNOWN)
              or (r.status is StepStatus.SKIPPED and r.error)]  # skipped with a reason: denied
    failed_comp = next((r for r in reversed(failed) if r.direction is Direction.COMPENSATE), None)
    failed_step = next((r for r in reversed(failed) if r.direction is Direction.FORWARD), None)
    timeline = store.events(saga.id)
    rolled_back = any(e.kind == "rollback.plan" for e in timeline)
    events = timeline[-TIMELINE_EVENTS:]
    details: dict[str, object] = {
        "saga_id": saga.id,
        "saga": saga.name,
        "state": saga.state.value,
        "incident": n.incident,
        "error": saga.error,
        "uncompensated": store.uncompensated(saga.id),
        "timeline": [
            {"at": e.at.isoformat(), "event": e.kind, "step": e.step, "detail": e.message}
            for e in events
        ],
    }
    if failed_comp is not None:
        details["failed_compensation"] = {"step": failed_comp.step, "error": failed_comp.error,
                                          "attempt": failed_comp.attempt}
    if failed_step is not None:
        details["failed_step"] = {"step": failed_step.step, "error": failed_step.error,
                                  "attempt": failed_step.attempt}
    kind = Kind(n.kind)
    action = Action(n.action)
    if n.subject.startswith("approval:"):
        summary = f"saga {saga.name} {saga.id[:8]} waits for a human decision: {n.note or ''}"
        severity = "info"
    elif action is Action.RESOLVE:
        summary = f"resolved: saga {saga.name} {saga.id[:8]}" + (f" ({n.note})" if n.note else "")
        severity = "info"
    elif kind is Kind.PAGE:
        if n.note:  # said when the page was raised: an orphan that could not be released...
            what = n.note
        elif failed_comp is not None and failed_comp.status is StepStatus.SKIPPED:
            what = f"the undo of {failed_comp.step} was denied: undo it by hand"
        elif failed_comp is not None:
            what = f"compensation of {failed_comp.step} failed"
        elif rolled_back or failed_step is None:  # a rollback that stopped making progress
            what = saga.error or "it cannot go on"
        else:  # a forward failure paged instead of rolled back: it came after the pivot
            what = f"{failed_step.step} failed after the pivot"
        summary = f"saga {saga.name} {saga.id[:8]} needs a human: {what}"
        severity = "critical"
    else:
        summary = f"saga {saga.name} {saga.id[:8]} is rolling back: {saga.error or ''}".strip()
        severity = "warning"
    return Notice(
        saga_id=saga.id,
        saga_name=saga.name,
        kind=kind,
        action=action,
        dedup_key=n.dedup_key,
        summary=summary[:1000],
        severity=severity,
        created_at=n.created_at,
        state=saga.state.value,
        details=details,
        commands=(
            (f"sagaq show {saga.id}", f"sagaq approve {n.subject[len('approval:'):]}",
             f'sagaq deny {n.subject[len("approval:"):]} --note "why"')
            if n.subject.startswith("approval:") else
            (f"sagaq show {saga.id}", f"sagaq retry {saga.id}",
             f'sagaq resolve {saga.id} --note "what you did"')
        ),
        note=n.note,
        id=f"sagaq/{saga.id}/notification-{n.id}",
    )


def deliver(
    store: Store, notifiers: Mapping[str, Notifier], notification_id: int,
    *, countdown_max: float = 30.0,
) -> tuple[str, list[Dispatch]]:
    """Send one notification; returns a word for the log and any retry message to publish.

    A page is retried until it is delivered, with a growing backoff (long waits are durable:
    the outbox row becomes due, and the reconciler publishes it); only a 4xx other than 429
    fails it, and a failed page stays listed by ``sagaq doctor``. Other notices give up after
    ``MAX_ATTEMPTS``.
    """
    n = store.begin_delivery(notification_id)
    if n is None:
        return "dropped (already delivered or in flight)", []
    page = n.kind == Kind.PAGE.value and n.action == Action.TRIGGER.value

    def again(error: str, retry_after: float | None = None) -> tuple[str, list[Dispatch]]:
        if page:
            delay = max(retry_after or 0.0, backoff(n.attempts, 1.0, PAGE_BACKOFF_CAP))
            log.error("page %s via %s not delivered (attempt %d): %s; again in %.0fs",
                      n.dedup_key, n.channel, n.attempts, error, delay)
        elif n.attempts < MAX_ATTEMPTS:
            delay = max(retry_after or 0.0, backoff(n.attempts, 1.0, 30.0))
        else:
            log.error("delivery of %s %s via %s failed for good: %s", n.kind, n.dedup_key,
                      n.channel, error)
            return "failed", store.end_delivery(n, sent=False, error=error)
        return "retry", store.end_delivery(n, sent=False, error=error, retry_in=delay,
                                           durable=delay > countdown_max)

    notifier = notifiers.get(n.channel)
    if notifier is None:
        return again(f"no notifier named {n.channel!r} is configured here")
    try:
        notifier.send(build_notice(store, n))
    except DeliveryError as exc:
        if exc.retryable:
            return again(exc.message, exc.retry_after)
        log.error("delivery of %s %s via %s failed for good: %s", n.kind, n.dedup_key,
                  n.channel, exc.message)
        return "failed", store.end_delivery(n, sent=False, error=exc.message)
    except Exception as exc:  # a bug in a notifier must not lose the page: retry it
        log.exception("notifier %s raised", n.channel)
        return again(repr(exc))
    return "sent", store.end_delivery(n, sent=True)
