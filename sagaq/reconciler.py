"""The reconciler: a Celery-beat task that puts back on track what fell through the cracks.

One pass runs every sweep once: wake sagas whose durable wait is over, publish again the
outbox rows whose message seems lost, send a worker to each step whose lease expired, page
for rollbacks that stopped making progress, release orphaned resources, deny approvals past
their deadline, and give every saga left without a way forward its way back (or page). Each
sweep is a bounded batch, idempotent, and safe with two beats running (see
:mod:`sagaq.store.sweeps`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sagaq.settings import Settings
from sagaq.store import Dispatch, Store

log = logging.getLogger("sagaq.reconciler")


@dataclass
class Sweep:
    """What one pass did, for the log and for ``sagaq reconcile --once``."""

    counts: dict[str, int] = field(default_factory=dict)
    dispatches: list[Dispatch] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {**self.counts, "published": len(self.dispatches)}


def sweep(store: Store, settings: Settings) -> Sweep:
    """One pass of every sweep; the caller publishes ``dispatches`` after it returns."""
    batch = settings.reconcile_batch
    result = Sweep()
    passes: dict[str, Callable[[], list[Dispatch]]] = {
        "woken": lambda: store.wake_due(batch),
        "republished": lambda: store.republish_overdue(settings.republish_after, batch),
        "expired": lambda: store.expired_leases(batch),
        "stalled": lambda: store.stalled_rollbacks(settings.rollback_deadline, batch),
        "orphans": lambda: store.orphans(batch),
        "approvals_expired": lambda: store.expire_approvals(batch),
        # Last: whatever the sweeps above did not put back on track has lost its way.
        "repaired": lambda: store.repair(batch),
    }
    for name, run in passes.items():
        try:
            found = run()
        except Exception:  # one broken sweep must not stop the others
            log.exception("reconciler sweep %r failed", name)
            found = []
        result.counts[name] = len(found)
        result.dispatches += found
    if result.dispatches:
        log.info("reconciler: %s", result.summary())
    return result
