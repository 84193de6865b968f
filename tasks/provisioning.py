"""Provision an AI agent: identity → roles → runtime → credentials, each undoable.

If any step fails for good, the steps before it are undone in reverse order: credentials
are never left pointing at a runtime that does not exist, and no identity is orphaned.
"""

from __future__ import annotations

from typing import Any

from sagaq import Saga, Secret, StepContext

from .services import services, simulate

provision = Saga("provision_agent")


@provision.step(compensate="delete_identity", verify="identity_exists")
def create_identity(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["identity"].call(ctx, "create", {"agent": inp["agent"]})


@provision.step(compensate="revoke_roles")
def assign_roles(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    identity = ctx.results["create_identity"]["id"]
    return services["iam"].call(ctx, "grant", {"identity": identity, "roles": inp.get("roles", [])})


@provision.step(compensate="release_runtime")
def allocate_runtime(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["runtime"].call(ctx, "allocate", {"size": inp.get("size", "small")})


@provision.step(compensate="revoke_credentials")
def inject_credentials(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    runtime = ctx.results["allocate_runtime"]["id"]
    issued = services["vault"].call(ctx, "issue", {"runtime": runtime})
    # The token is sealed at rest and shown as *** everywhere; later steps call .reveal().
    return {"id": issued["id"], "token": Secret(f"tok-{issued['id']}-{ctx.key[:12]}")}


@provision.verifier
def identity_exists(ctx: StepContext, inp: dict[str, Any]) -> bool:
    return services["identity"].landed(ctx.key)


@provision.compensation
def delete_identity(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["identity"].call(ctx, "delete", {"target": (ctx.result or {}).get("id")})


@provision.compensation
def revoke_roles(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["iam"].call(ctx, "revoke", {"target": (ctx.result or {}).get("id")})


@provision.compensation
def release_runtime(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["runtime"].call(ctx, "release", {"target": (ctx.result or {}).get("id")})


@provision.compensation
def revoke_credentials(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["vault"].call(ctx, "revoke", {"target": (ctx.result or {}).get("id")})
