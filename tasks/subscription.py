"""A subscription: reserve a seat → charge the card (the pivot) → provision the licence
(retryable) → send the receipt (cannot be undone).

Once the card is charged there is no going back: if the licence service keeps failing, the
step climbs the ladder with a larger budget and then pages a human, and nothing is undone.
"""

from __future__ import annotations

from typing import Any

from sagaq import Saga, StepContext

from .services import services, simulate

subscribe = Saga("subscription")


@subscribe.step(compensate="release_seat")
def reserve_seat(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["seats"].call(ctx, "reserve", {"plan": inp["plan"]})


@subscribe.step(kind="pivot")
def charge_card(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["payments"].call(ctx, "charge", {"amount": inp["amount"]})


@subscribe.step(kind="retryable")
def provision_license(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["licenses"].call(ctx, "issue", {"seat": ctx.results["reserve_seat"]["id"]})


@subscribe.step(kind="noncompensable", at_most_once=True)
def send_receipt(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["email"].call(ctx, "receipt", {"to": inp["email"]})


@subscribe.compensation
def release_seat(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["seats"].call(ctx, "release", {"target": (ctx.result or {}).get("id")})
