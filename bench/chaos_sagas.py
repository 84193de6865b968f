"""The sagas of the chaos run. Workers import this module (``SAGAQ_IMPORTS``); every effect
goes to the stand-in service at ``SAGAQ_CHAOS_URL``, which counts it by idempotency key.

Each step spends a little time before and after its effect, so that a SIGKILL can land
before the effect, after it, or between the effect and the commit that records it.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from bench.standin import apply, landed
from sagaq import Saga, StepContext, TerminalError, TransientError

URL = os.environ.get("SAGAQ_CHAOS_URL", "")

SCENARIOS = {
    # name: (saga, the state it must end in, pages it must send)
    "complete": ("chaos_ok", "completed", 0),
    "compensate": ("chaos_fail", "compensated", 0),
    "page": ("chaos_stuck", "needs_human", 1),
    "after_pivot": ("chaos_pivot", "completed", 0),
}


def _pause(inp: dict[str, Any]) -> None:
    low, high = inp.get("work", (0.01, 0.08))
    time.sleep(random.uniform(low, high))


def effect(ctx: StepContext, inp: dict[str, Any], op: str = "do") -> dict[str, Any]:
    _pause(inp)
    record = apply(URL, key=ctx.key, saga_id=ctx.saga_id, step=ctx.step,
                   direction=ctx.direction.value, op=op)
    _pause(inp)  # the effect has landed; the commit that records it has not
    return {"ref": record["key"][:12]}


def undo(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    if ctx.step in inp.get("stuck_compensation", ()):
        raise TransientError(f"{ctx.step}: the undo endpoint answers 503")
    return effect(ctx, inp, "undo")


def read_back(ctx: StepContext, inp: dict[str, Any]) -> bool:
    return landed(URL, ctx.key)


def _compensable(saga: Saga, names: tuple[str, ...], fail_at: str | None = None) -> None:
    for name in names:

        def forward(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
            if ctx.step == fail_at:
                raise TerminalError(f"{ctx.step}: rejected (422)")
            return effect(ctx, inp)

        saga.step(name=name, compensate=undo, verify=read_back)(forward)


def send_email(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return effect(ctx, inp, "send")  # no idempotency on the far side: counted raw


chaos_ok = Saga("chaos_ok")
_compensable(chaos_ok, ("s1", "s2", "s3"))
chaos_ok.step(name="email", kind="noncompensable", at_most_once=True, verify=read_back)(
    send_email
)

chaos_fail = Saga("chaos_fail")
_compensable(chaos_fail, ("s1", "s2", "s3"), fail_at="s3")

chaos_stuck = Saga("chaos_stuck")
_compensable(chaos_stuck, ("s1", "s2", "s3"), fail_at="s3")

chaos_pivot = Saga("chaos_pivot")
_compensable(chaos_pivot, ("reserve",))


@chaos_pivot.step(kind="pivot", verify=read_back)
def charge(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return effect(ctx, inp, "charge")


@chaos_pivot.step(kind="retryable", verify=read_back)
def ship(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    if ctx.attempt <= int(inp.get("flaky", 0)):
        raise TransientError(f"ship: carrier API timed out (attempt {ctx.attempt})")
    return effect(ctx, inp, "ship")


def scenario_input(scenario: str, i: int) -> dict[str, Any]:
    base: dict[str, Any] = {"n": i}
    if scenario == "page":
        base["stuck_compensation"] = ["s1"]
    if scenario == "after_pivot":
        base["flaky"] = 2
    return base
