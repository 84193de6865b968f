"""Support triage by an agent: a model classifies the ticket → the ticket is routed → the
team is told (which cannot be undone, so it is last).

The model step declares its tiers. When the small model answers prose instead of JSON (a
logical failure), the ladder re-prompts it with the error, then switches to the large one.
"""

from __future__ import annotations

import json
from typing import Any

from sagaq import LogicalError, Saga, StepContext

from .services import model, services, simulate

triage = Saga("ticket_triage")


@triage.step(tiers=("small", "large"), side_effect=False)
def classify_ticket(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    prompt = f"Classify this ticket as JSON {{queue, priority}}: {inp['ticket']}"
    if ctx.errors:  # a re-prompt tells the model what went wrong last time
        prompt += "\nYour previous answers were rejected: " + "; ".join(ctx.errors)
    answer = model.complete(ctx, prompt, tuple(inp.get("weak_tiers", ())))
    try:
        parsed: dict[str, Any] = json.loads(answer)
    except json.JSONDecodeError:
        raise LogicalError(f"the {ctx.tier} model did not answer JSON: {answer[:40]!r}") from None
    return {**parsed, "tier": ctx.tier}


@triage.step(compensate="close_ticket")
def route_ticket(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    label = ctx.results["classify_ticket"]
    return services["tickets"].call(ctx, "route", {"queue": label["queue"]})


@triage.step(kind="noncompensable", at_most_once=True)
def tell_team(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["chat"].call(ctx, "post", {"queue": ctx.results["classify_ticket"]["queue"]})


@triage.compensation
def close_ticket(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["tickets"].call(ctx, "close", {"target": (ctx.result or {}).get("id")})
