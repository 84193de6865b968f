"""An order: CRM record → invoice → tell the customer (which cannot be undone, so it is last).

The customer hears about the order only once the record and the invoice both exist; if the
invoice fails for good, the CRM record is removed again and the customer hears nothing.
"""

from __future__ import annotations

from typing import Any

from sagaq import Saga, StepContext

from .services import services, simulate

order = Saga("order_flow")


@order.step(compensate="delete_crm_record")
def create_crm_record(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["crm"].call(ctx, "create", {"customer": inp["customer"]})


@order.step(compensate="void_invoice")
def create_invoice(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    record = ctx.results["create_crm_record"]["id"]
    return services["billing"].call(ctx, "invoice", {"record": record, "amount": inp["amount"]})


@order.step(kind="noncompensable", at_most_once=True)
def notify_customer(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    invoice = ctx.results["create_invoice"]["id"]
    return services["email"].call(ctx, "send", {"to": inp["customer"], "invoice": invoice})


@order.compensation
def delete_crm_record(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["crm"].call(ctx, "delete", {"target": (ctx.result or {}).get("id")})


@order.compensation
def void_invoice(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["billing"].call(ctx, "void", {"target": (ctx.result or {}).get("id")})
