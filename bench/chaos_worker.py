"""The Celery app of the chaos run's workers: ``celery -A bench.chaos_worker worker``.

It is ``celery -A sagaq`` (the runtime built from ``SAGAQ_*``) plus what the chaos run
needs to see inside a worker:

- ``SAGAQ_CHAOS_DB_ERRORS=RATE``: a fault hook on the store makes a share RATE of its
  commits fail with a database error, before the commit or after it (``Phase.BEFORE`` /
  ``Phase.AFTER`` of ``sagaq.store.faults``);
- ``SAGAQ_CHAOS_TALLY=FILE``: each injected error, and each outcome a step attempt wrote
  after its lease had long expired (a process SIGSTOPped, then resumed: a zombie), is
  appended to FILE as one JSON line, so the controller totals them across processes, killed
  ones included (a line is written before the error is raised).
- Redis's unacknowledged messages are swept every second (kombu's default is about every
  100 s), so a message held by a stopped worker comes back once the visibility timeout ran.
"""

from __future__ import annotations

import os
import threading
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
    """Tally every outcome a step attempt writes more than its lease (plus a second) after
    its claim: only a stopped process is that late (prefork kills a step at its time limit).
    The write must lose; one that won is a zombie's write that counted. The time is taken
    when the write starts, so a commit already in flight when the process stopped (it lands
    on time; only its answer is read late) is not counted as late."""
    claimed: dict[int, float] = {}  # thread → wall-clock time of its live claim
    s = runtime.settings
    lease = s.step_timeout + s.lease_margin  # the chaos sagas keep the default timeout
    store = runtime.store
    claim, succeed, fail = store.claim, store.succeed, store.fail

    def timed_claim(*args: Any, **kwargs: Any) -> Any:
        claimed.pop(threading.get_ident(), None)
        got = claim(*args, **kwargs)
        if got.status is ClaimStatus.CLAIMED:
            claimed[threading.get_ident()] = time.time()  # wall clock: it runs on in a stop
        return got

    def watched(write: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            at = claimed.get(threading.get_ident())
            late = at is not None and time.time() - at > lease + 1.0
            if not late:
                return write(*args, **kwargs)
            took = round(time.time() - (at or 0.0), 1)
            try:
                outcome = write(*args, **kwargs)
            except Exception as exc:
                tally(path, "late_write_raised", write=write.__name__, seconds=took,
                      error=type(exc).__name__)
                raise
            tally(path, "late_write_won" if outcome.won else "late_write_lost",
                  write=write.__name__, seconds=took, note=outcome.note)
            return outcome

        return call

    def prerun(task: Any = None, **_: Any) -> None:
        claimed.pop(threading.get_ident(), None)
        # Handed out again by the broker: a visibility timeout ran out, or a worker was lost.
        info = getattr(getattr(task, "request", None), "delivery_info", None) or {}
        if info.get("redelivered"):
            tally(path, "redelivered", task=getattr(task, "name", "?"))

    store.claim = timed_claim  # type: ignore[method-assign]
    store.succeed = watched(succeed)  # type: ignore[method-assign]
    store.fail = watched(fail)  # type: ignore[method-assign]
    signals.task_prerun.connect(prerun, weak=False)


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
