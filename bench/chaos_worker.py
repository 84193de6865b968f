"""The Celery app of the chaos run's workers: ``celery -A bench.chaos_worker worker``.

It is ``celery -A sagaq`` (the runtime built from ``SAGAQ_*``) plus what the chaos run
needs to see inside a worker:

- ``SAGAQ_CHAOS_DB_ERRORS=RATE``: a fault hook on the store makes a share RATE of its
  commits fail with a database error, before the commit or after it (``Phase.BEFORE`` /
  ``Phase.AFTER`` of ``sagaq.store.faults``);
- ``SAGAQ_CHAOS_TALLY=FILE``: each injected error, and each step attempt that wrote after
  its lease had long expired (a process that was SIGSTOPped, then resumed: a zombie), is
  appended to FILE as one JSON line, so the controller totals them across processes, killed
  ones included (a line is written before the error is raised).
- Redis's unacknowledged messages are swept every second (kombu's default is about every
  100 s), so a message held by a stopped worker comes back once the visibility timeout ran.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import signals

from bench.chaos_stops import fault_hook, tally
from sagaq.runtime import Runtime, default_runtime
from sagaq.store import ClaimStatus

RATE_VAR, TALLY_VAR, SEED_VAR = "SAGAQ_CHAOS_DB_ERRORS", "SAGAQ_CHAOS_TALLY", "SAGAQ_CHAOS_SEED"


def install_faults(runtime: Runtime, rate: float, path: str, seed: int = 0) -> None:
    """Put the hook on the store; the store's fault interface is required, say so if absent."""
    try:
        from sagaq.store.faults import Phase  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise SystemExit(
            f"{RATE_VAR} needs sagaq.store.faults (the store's fault hook), which this "
            f"checkout does not have: {exc}"
        ) from None
    runtime.store.fault = fault_hook(  # type: ignore[attr-defined,unused-ignore]
        rate, (Phase.BEFORE, Phase.AFTER), path, seed
    )


def watch_late_writes(runtime: Runtime, path: str) -> None:
    """Tally every step attempt whose write came more than its lease (plus a second) after
    its claim: only a stopped process is that late (prefork kills a step at its time limit).
    Its write must have lost ("lost (...)"); one that won is a zombie's write that counted."""
    claimed: dict[str, float] = {}
    s = runtime.settings
    lease = s.step_timeout + s.lease_margin  # the chaos sagas keep the default timeout
    claim = runtime.store.claim

    def timed_claim(*args: Any, **kwargs: Any) -> Any:
        got = claim(*args, **kwargs)
        if got.status is ClaimStatus.CLAIMED and kwargs.get("task_id"):
            claimed[kwargs["task_id"]] = time.time()  # wall clock: it runs on in a stop
        return got

    def postrun(task_id: str | None = None, task: Any = None, retval: Any = None,
                **_: Any) -> None:
        at = claimed.pop(task_id or "", None)
        if at is None or not isinstance(retval, str) or time.time() - at <= lease + 1.0:
            return
        if retval.startswith(("succeeded", "failed")):
            kind = "late_write_won"
        elif retval.startswith("lost"):
            kind = "late_write_lost"
        else:
            return
        tally(path, kind, task=getattr(task, "name", "?"), word=retval,
              seconds=round(time.time() - at, 1))

    def prerun(task: Any = None, **_: Any) -> None:
        # Handed out again by the broker: a visibility timeout ran out, or a worker was lost.
        info = getattr(getattr(task, "request", None), "delivery_info", None) or {}
        if info.get("redelivered"):
            tally(path, "redelivered", task=getattr(task, "name", "?"))

    runtime.store.claim = timed_claim  # type: ignore[method-assign]
    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)


runtime = default_runtime()
app = runtime.app
app.conf.broker_transport_options = {
    **(app.conf.broker_transport_options or {}),
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
_tally = os.environ.get(TALLY_VAR, "")
watch_late_writes(runtime, _tally)
_rate = float(os.environ.get(RATE_VAR) or 0)
if _rate > 0:
    install_faults(runtime, _rate, _tally, int(os.environ.get(SEED_VAR) or 0))
