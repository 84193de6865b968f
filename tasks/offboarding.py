"""Offboard an agent: revoke its keys → snapshot its data → delete its workspace.

Deleting the workspace cannot be undone, so the policy in ``tasks/policy.yaml`` asks a human
first. Approved, the saga completes; denied, it rolls back: the snapshot is removed and the
keys are issued again, and the workspace is never touched.
"""

from __future__ import annotations

from typing import Any

from sagaq import Saga, StepContext

from .services import services, simulate

offboard = Saga("offboard_agent")


@offboard.step(compensate="reissue_keys", tags=("security",))
def revoke_keys(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["vault"].call(ctx, "revoke_all", {"agent": inp["agent"]})


@offboard.step(compensate="drop_snapshot")
def snapshot_data(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["runtime"].call(ctx, "snapshot", {"agent": inp["agent"]})


@offboard.step(kind="noncompensable", topic="infra.delete", tags=("prod-write",))
def delete_workspace(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["runtime"].call(ctx, "delete_workspace", {"agent": inp["agent"]})


@offboard.compensation
def reissue_keys(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["vault"].call(ctx, "reissue", {"agent": inp["agent"]})


@offboard.compensation
def drop_snapshot(ctx: StepContext, inp: dict[str, Any]) -> dict[str, Any]:
    simulate(ctx, inp)
    return services["runtime"].call(ctx, "drop_snapshot", {"target": (ctx.result or {}).get("id")})
