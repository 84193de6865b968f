"""Sagas for the regression tests of issue 10's faults, on the sweep's registry and world."""

from __future__ import annotations

from typing import Any

from sagaq import LogicalError, Saga, Secret, StepContext, TerminalError, TransientError
from sagaq.ladder import Bounds
from tests.sweep import Crash, _effect, _undo, registry, world

SECRET = "zX9-k+Q=s3cr3t&pw"
verify_calls: list[str] = []


class SoftTimeLimitExceeded(Exception):
    """What Celery raises inside a step that ran past its soft time limit."""


# 1: the resolver dies in the middle of verify, once
verify_dies = Saga("ft_verify_dies", registry=registry)


def _dies_once(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any] | bool:
    verify_calls.append(ctx.saga_id)
    if verify_calls.count(ctx.saga_id) == 1:
        raise Crash("the resolver died inside verify")
    return {"id": world.call(ctx, "do", {"step": ctx.step})["id"]} if world.landed(
        ctx.key) else False


verify_dies.step(name="a", compensate=_undo, verify=_dies_once)(_effect)
verify_dies.step(name="b", compensate=_undo)(_effect)


# 6: secrets in a verify's error, in a validate's error, in a refresh hook's error
secretive = Saga("ft_secretive", registry=registry)


@secretive.step(compensate=_undo)
def issue(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    world.call(ctx, "do", {"step": ctx.step})
    return {"id": "cred-1", "token": Secret(SECRET)}


def _verify_quotes(ctx: StepContext, inp: dict[str, Any]) -> bool:
    token = ctx.results["issue"]["token"].reveal()
    raise ConnectionError(f"GET /check?token={token} failed")


def _validate_quotes(ctx: StepContext, value: Any) -> bool:
    raise LogicalError(f"the model echoed the key back: {value['echo'].reveal()}")


@secretive.step(compensate=_undo, verify=_verify_quotes)
def use(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    if inp.get("validate"):
        return {"echo": Secret(SECRET)}
    return _effect(ctx, inp)


validating = Saga("ft_validating", registry=registry)
validating.step(name="issue", compensate=_undo)(issue)
validating.step(name="use", compensate=_undo, validate=_validate_quotes)(use)


# 11: a verify that answers a bare True; the next step needs the result
bool_verify = Saga("ft_bool_verify", registry=registry)
bool_verify.step(name="a", compensate=_undo,
                 verify=lambda ctx, inp: world.landed(ctx.key))(_effect)


@bool_verify.step(compensate=_undo)
def b(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    assert ctx.results["a"]["id"].startswith("world-"), ctx.results["a"]
    return _effect(ctx, inp)


# 10: a step that times out after its effect landed
def _times_out(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    record = world.call(ctx, "do", {"step": ctx.step})
    if ctx.attempt == 1:
        raise SoftTimeLimitExceeded("the step ran past its soft time limit")
    return {"id": record["id"]}


def _read_back(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any] | bool:
    if not world.landed(ctx.key):
        return False
    return {"id": world.call(ctx, "do", {"step": ctx.step})["id"]}


timed = Saga("ft_timed", registry=registry)
timed.step(name="a", compensate=_undo, verify=_read_back)(_times_out)
timed.step(name="b", compensate=_undo)(_effect)

timed_blind = Saga("ft_timed_blind", registry=registry)
timed_blind.step(name="a", compensate=_undo, retries=0)(_times_out)
timed_blind.step(name="b", compensate=_undo)(_effect)


# 9: a result with U+0000 in it
nul = Saga("ft_nul", registry=registry)
nul.step(name="a", compensate=_undo)(_effect)


@nul.step(compensate=_undo)
def says_nul(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    world.call(ctx, "do", {"step": ctx.step})
    return {"text": "before\x00after"}


# 8: a compensation whose backoff is long
slow_undo = Saga("ft_slow_undo", registry=registry)
_undo_tries: dict[str, int] = {}


def _undo_once_later(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    _undo_tries[ctx.saga_id] = _undo_tries.get(ctx.saga_id, 0) + 1
    if _undo_tries[ctx.saga_id] == 1:
        raise TransientError("the undo endpoint answers 503")
    return world.call(ctx, "undo", {"step": ctx.step})


slow_undo.step(name="a", compensate=_undo_once_later,
               ladder=Bounds(base=5.0, cap=5.0))(_effect)


@slow_undo.step(compensate=_undo)
def fails(ctx: StepContext, inp: dict[str, Any]) -> None:
    raise TerminalError("rejected (422)")
