"""The reconciler: a Celery-beat task that puts back on track what fell through the cracks.

Each sweep is a bounded batch, idempotent, and safe with two beats running (rows are taken
with ``FOR UPDATE SKIP LOCKED``); it reads only active rows, through partial indexes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sagaq.store import Dispatch, Store

log = logging.getLogger("sagaq.reconciler")


@dataclass
class Sweep:
    """What one pass did, for the log and for ``sagaq reconcile --once``."""

    woken: int = 0
    dispatches: list[Dispatch] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"woken": self.woken, "published": len(self.dispatches)}


def sweep(store: Store, *, batch: int = 100) -> Sweep:
    """One pass of every sweep; the caller publishes ``dispatches`` after it returns."""
    result = Sweep()
    woken = store.wake_due(batch)
    result.woken = len(woken)
    result.dispatches += woken
    return result
