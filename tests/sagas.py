"""Sagas that exist only for the tests; their steps write to the stand-ins of ``tasks``."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

from sagaq import Saga, StepContext
from tasks.services import StandIn, simulate

ledger = StandIn("ledger")

# -- quad: four compensable steps, faults chosen by the input ----------------------------

quad = Saga("quad")


def _forward(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return ledger.call(ctx, "do", {"step": ctx.step})


def _undo(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return ledger.call(ctx, "undo", {"step": ctx.step, "target": (ctx.result or {}).get("id")})


for _name in ("s1", "s2", "s3", "s4"):
    quad.step(name=_name, compensate=_undo)(_forward)


# -- racer: steps that notice if another step of the same saga runs at the same time ------

racer = Saga("racer")
_active: dict[str, int] = defaultdict(int)
overlaps: list[tuple[str, str]] = []
_lock = threading.Lock()


def _race(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    with _lock:
        _active[ctx.saga_id] += 1
        if _active[ctx.saga_id] > 1:
            overlaps.append((ctx.saga_id, ctx.step))
    try:
        time.sleep(float(inp.get("hold", 0.02)))
        return ledger.call(ctx, "race", {"step": ctx.step})
    finally:
        with _lock:
            _active[ctx.saga_id] -= 1


for _name in ("r1", "r2", "r3", "r4", "r5"):
    racer.step(name=_name, no_rollback="test step")(_race)


# -- pivoted: compensable → pivot → retryable → noncompensable ---------------------------

pivoted = Saga("pivoted")


@pivoted.step(compensate="unreserve")
def reserve(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@pivoted.step(kind="pivot")
def charge(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@pivoted.step(kind="retryable", retries=2)
def ship(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@pivoted.step(kind="noncompensable", at_most_once=True)
def email(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@pivoted.compensation
def unreserve(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _undo(ctx, inp)
