"""Sagas that exist only for the tests; their steps write to the stand-ins of ``tasks``."""

from __future__ import annotations

import base64
import threading
import time
from collections import defaultdict
from typing import Any
from urllib.parse import quote

from sagaq import EnvironmentalError, Saga, Secret, StepContext, TerminalError, TransientError
from sagaq.ladder import Bounds
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


# -- ladder: a refresh hook, a validate hook, a durable (long) backoff --------------------

envy = Saga("envy")


@envy.refresh
def reread_schema(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return {"schema": 2}  # the world as it is now


@envy.step(no_rollback="test step")
def write_row(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    if ctx.checkpoint.get("schema") != 2:
        raise EnvironmentalError("column 'name' no longer exists (schema migrated)")
    return ledger.call(ctx, "write", {"schema": ctx.checkpoint["schema"]})


checked = Saga("checked")


def _reject_first(ctx: StepContext, result: Any) -> bool:
    return ctx.attempt > 1


@checked.step(no_rollback="test step", rungs=(0, 1), validate=_reject_first)
def answer(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return {"attempt": ctx.attempt, "errors": list(ctx.errors), "level": ctx.level}


sleepy = Saga("sleepy")


@sleepy.step(no_rollback="test step", ladder=Bounds(base=2.0, cap=2.0))
def nap(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return ledger.call(ctx, "nap")


# -- stubborn: an undo that fails until the test says the remote system is repaired --------

stubborn = Saga("stubborn")
repaired = threading.Event()  # set: undo_first succeeds; clear: it answers 503


@stubborn.step(compensate="undo_first")
def first(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@stubborn.step(compensate="undo_second")
def second(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@stubborn.step(no_rollback="test step")
def third(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@stubborn.compensation
def undo_first(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    if not repaired.is_set():
        raise TransientError("first: the undo endpoint answers 503")
    return _undo(ctx, inp)


@stubborn.compensation
def undo_second(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _undo(ctx, inp)


# -- screened: a read-only look, an undoable write, then a step the policy may ask about ----

screened = Saga("screened")


@screened.step(side_effect=False)
def inspect_account(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return {"account": inp.get("account", "acct-1")}  # reads only: nothing to undo


@screened.step(compensate="unstage")
def stage(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@screened.step(compensate="restore")
def purge(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _forward(ctx, inp)


@screened.compensation
def unstage(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _undo(ctx, inp)


@screened.compensation
def restore(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return _undo(ctx, inp)


# -- leaky: a step whose error quotes a secret an earlier step returned -------------------

leaky = Saga("leaky_secret")


@leaky.step(compensate=_undo)
def issue_token(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return {"token": Secret(f"tok-{ctx.saga_id[:8]}-s3cr3t-value")}


@leaky.step(no_rollback="fails before any effect")
def use_token(ctx: StepContext, inp: dict[str, Any]) -> None:
    token = ctx.results["issue_token"]["token"].reveal()
    if inp.get("form") == "url":  # as HTTP clients quote it: URL-encoded, or in Basic auth
        raise TerminalError(f"401 Unauthorized for GET /v1?token={quote(token, safe='')}")
    if inp.get("form") == "basic":
        basic = base64.b64encode(f"svc:{token}".encode()).decode()
        raise TerminalError(f"401 Unauthorized for Authorization: Basic {basic}")
    raise TerminalError(f"401 Unauthorized for Authorization: Bearer {token}")


# -- marked: a step whose own result looks like a sealed secret ----------------------------

marked = Saga("marked_result")


@marked.step(no_rollback="no effect")
def look_alike(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    return {"data": {"$secret": "not sealed, just a field"}, "wrapped": {"$literal": 1}}


@marked.step(no_rollback="no effect")
def read_back(ctx: StepContext, inp: dict[str, Any]) -> None:
    got = ctx.results["look_alike"]
    if got != {"data": {"$secret": "not sealed, just a field"}, "wrapped": {"$literal": 1}}:
        raise TerminalError(f"the result came back changed: {got!r}")


# -- hostile: a step whose error says whatever its input says (markup, escapes) -------------

hostile = Saga("hostile_error")


@hostile.step(no_rollback="fails before any effect")
def say(ctx: StepContext, inp: dict[str, Any]) -> None:
    raise TerminalError(str(inp.get("message", "")))
