"""Sagas for the crash-recovery tests: run by subprocess workers and by in-process workers.

Subprocess workers (``celery -A sagaq worker``) import this module through
``SAGAQ_IMPORTS=tests.crash_sagas``. Every effect goes to the loopback stand-in
(:mod:`bench.standin`) at the URL in ``SAGAQ_CRASH_URL``, read at call time, so that "the
effect landed once" is counted in the test process whichever process ran the step.

What a step does is chosen by the saga input: ``{"crash": {"<step>": "<mode>"}}``, modes:

``hang_after_effect``  first attempt: the effect lands, then the step hangs (sleep 60) so that
                       the test can SIGKILL the worker between the effect and its commit
``kill_self``          every forward run: record that it started, then SIGKILL its own
                       process (a prefork child dying of OOM or a segfault)
``sleep:N``            first attempt: the effect lands, then the step takes N more seconds
``heartbeat:N``        first attempt: the effect lands, then N seconds of work, calling
                       ``ctx.heartbeat()`` every 0.2 s
``stopped:N``          first attempt: the effect lands, N seconds of work (the test
                       SIGSTOPs the worker meanwhile), then one heartbeat, whose answer
                       is reported to the stand-in as op ``late:True|False``
``fail``               a terminal failure before any effect

``{"undo": {"<step>": "hang_after_effect"}}`` does the same to the step's compensation.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench.standin import apply, landed
from sagaq import Saga, StepContext, TerminalError
from sagaq.context import ReleaseContext

URL_VAR = "SAGAQ_CRASH_URL"
HANG = 60.0  # long enough for a test to SIGKILL the worker, far below any test's timeout


def url() -> str:
    return os.environ[URL_VAR]


def effect(ctx: StepContext, op: str = "do") -> dict[str, Any]:
    record = apply(url(), key=ctx.key, saga_id=ctx.saga_id, step=ctx.step,
                   direction=ctx.direction.value, op=op, attempt=ctx.attempt)
    return {"ref": record["key"][:12]}


def mode_of(ctx: StepContext, inp: dict[str, Any]) -> str:
    return str((inp.get("crash") or {}).get(ctx.step, ""))


# For in-process (threads pool) workers: heartbeat results per saga, and the forward runs
# that returned, as (saga_id, step, attempt).
beats: dict[str, list[bool]] = {}
returned: list[tuple[str, str, int]] = []


def _forward(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    mode = mode_of(ctx, inp)
    if mode == "fail":
        raise TerminalError(f"{ctx.step}: rejected by the remote system (422)")
    if mode == "kill_self":
        apply(url(), key=ctx.key, saga_id=ctx.saga_id, step=ctx.step,
              direction=ctx.direction.value, op="enter", attempt=ctx.attempt)
        os.kill(os.getpid(), signal.SIGKILL)
    result = effect(ctx)
    if ctx.attempt == 1 and mode == "hang_after_effect":
        time.sleep(HANG)
    elif ctx.attempt == 1 and mode.startswith("sleep:"):
        time.sleep(float(mode.split(":", 1)[1]))
    elif ctx.attempt == 1 and mode.startswith("stopped:"):
        until = time.monotonic() + float(mode.split(":", 1)[1])
        while time.monotonic() < until:  # a SIGSTOP stops this clock too: it runs on after
            time.sleep(0.2)
        alive = ctx.heartbeat()  # after SIGCONT: a zombie's heartbeat must lose
        apply(url(), key=f"{ctx.key}:late", saga_id=ctx.saga_id, step=ctx.step,
              direction=ctx.direction.value, op=f"late:{alive}", attempt=ctx.attempt)
    elif ctx.attempt == 1 and mode.startswith("heartbeat:"):
        until = time.monotonic() + float(mode.split(":", 1)[1])
        while time.monotonic() < until:
            time.sleep(0.2)
            beats.setdefault(ctx.saga_id, []).append(ctx.heartbeat())
    returned.append((ctx.saga_id, ctx.step, ctx.attempt))
    return result


def _undo(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    result = effect(ctx, "undo")
    if ctx.attempt == 1 and (inp.get("undo") or {}).get(ctx.step) == "hang_after_effect":
        time.sleep(HANG)  # the undo landed; the test SIGKILLs the worker before it is recorded
    return result


def _read_back(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any] | bool:
    # A read-back gives back what it read: recorded as if the step had returned it.
    return {"ref": ctx.key[:12]} if landed(url(), ctx.key) else False


# -- trio: a (verify), b (no verify), c (at most once, no verify); all before any pivot -------

crash_trio = Saga("crash_trio")
crash_trio.step(name="a", compensate=_undo, verify=_read_back)(_forward)
crash_trio.step(name="b", compensate=_undo)(_forward)
crash_trio.step(name="c", compensate=_undo, at_most_once=True)(_forward)


# -- leaky: steps that register external resources; the second one fails for good --------

crash_leaky = Saga("crash_leaky")


@dataclass(frozen=True)
class Release:
    saga_id: str
    kind: str
    external_id: str
    key: str
    attempt: int
    ok: bool


releases: list[Release] = []  # every releaser call in this process, in order
_releases_lock = threading.Lock()


@crash_leaky.step(compensate="free_disk")
def disk(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    ctx.resource("disk", f"disk-{ctx.saga_id[:8]}")
    return effect(ctx)


@crash_leaky.step(compensate="free_vm")
def vm(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    for kind in inp.get("kinds", ["vm"]):
        ctx.resource(kind, f"{kind}-{ctx.saga_id[:8]}")  # committed at once, before the failure
    raise TerminalError("vm: the hypervisor rejected the boot (422)")


@crash_leaky.compensation
def free_disk(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return effect(ctx, "undo")


@crash_leaky.compensation
def free_vm(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return effect(ctx, "undo")  # never runs: a failed step is not compensated


def _record(rctx: ReleaseContext, ok: bool) -> None:
    with _releases_lock:
        releases.append(Release(rctx.saga_id, rctx.kind, rctx.external_id,
                                rctx.idempotency_key, rctx.attempt, ok))


@crash_leaky.releaser("vm")
def release_vm(rctx: ReleaseContext) -> None:
    _record(rctx, True)


@crash_leaky.releaser("disk")
def release_disk(rctx: ReleaseContext) -> None:
    _record(rctx, True)  # must never be called: the disk's compensation released it


@crash_leaky.releaser("ip")
def release_ip(rctx: ReleaseContext) -> None:
    _record(rctx, False)
    raise ConnectionError("ipam: connection refused")


# -- overlong: a step whose time limit reaches past the visibility timeout ------------------
# Defined only where SAGAQ_CRASH_TIME_LIMIT is set (a `sagaq worker` subprocess of the
# start-up check test): in the test process it would make every runtime refuse to start.

if os.environ.get("SAGAQ_CRASH_TIME_LIMIT"):
    crash_overlong = Saga("crash_overlong")

    @crash_overlong.step(no_rollback="test step",
                         timeout=float(os.environ["SAGAQ_CRASH_TIME_LIMIT"]))
    def crawl(ctx: StepContext, inp: dict[str, Any]) -> None:
        return None
