"""The ``sagaq`` commands of the policy gate: approval requests, evidence, policy files."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import click

from sagaq import commands, render, texts
from sagaq.cli_env import Env, console, friendly, operator, pass_env


@click.command("approvals")
@click.option("--all", "everything", is_flag=True, help="Decided requests too.")
@click.option("--json", "as_json", is_flag=True)
@pass_env
@friendly
def approvals_cmd(env: Env, everything: bool, as_json: bool) -> None:
    """List approval requests (pending ones, unless --all)."""
    found = commands.approvals(env.store(), status=None if everything else "pending")
    if as_json:
        click.echo(json.dumps([commands.plain(asdict(a)) for a in found], indent=2))
    else:
        console.print(render.approvals_table(found))


@click.command()
@click.argument("approval_id")
@click.option("--by", default=operator, show_default="$SAGAQ_OPERATOR or your login",
              help="Who approves (recorded with the policy version).")
@click.option("--note", help="Why.")
@click.option("--json", "as_json", is_flag=True, help="Print the decided request as JSON.")
@pass_env
@friendly
def approve(env: Env, approval_id: str, by: str, note: str | None, as_json: bool) -> None:
    """Approve a pending request: the step is dispatched (gated again by the policy)."""
    decided = commands.decide(env.runtime(), approval_id, approve=True, by=by, note=note)
    _decided(decided, as_json)


@click.command()
@click.argument("approval_id")
@click.option("--by", default=operator, show_default="$SAGAQ_OPERATOR or your login",
              help="Who denies (recorded with the policy version).")
@click.option("--note", help="Why.")
@click.option("--json", "as_json", is_flag=True, help="Print the decided request as JSON.")
@pass_env
@friendly
def deny(env: Env, approval_id: str, by: str, note: str | None, as_json: bool) -> None:
    """Deny a pending request: a forward step is a terminal failure (the saga rolls back
    before the pivot); a compensation is recorded as skipped and pages a human."""
    decided = commands.decide(env.runtime(), approval_id, approve=False, by=by, note=note)
    _decided(decided, as_json)


def _decided(decided: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(commands.plain(asdict(decided)), indent=2))
    else:
        click.echo(f"{decided.id}: {decided.status} by {decided.decided_by}")


@click.command()
@click.argument("saga_id")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON, for scripts.")
@pass_env
@friendly
def evidence(env: Env, saga_id: str, as_json: bool) -> None:
    """The rollback evidence record of a saga: matched policy ids, approvals, whether it
    rolled back, and the compensations dispatched, skipped and failed."""
    record = commands.evidence(env.store(), saga_id)
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(texts.evidence(record))


@click.group()
def policy() -> None:
    """The policy gate (SAGAQ_POLICY_FILE, SAGAQ_ENV)."""


@policy.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@friendly
def policy_check(file: str) -> None:
    """Validate a policy file; errors name the file, the rule and the field."""
    from sagaq import policy as policy_module

    loaded = policy_module.load(file)
    decisions = ", ".join(f"{r.id}: {r.decision.value}" for r in loaded.rules) or "no rules"
    click.echo(f"{file}: ok, policy {loaded.label}, {len(loaded.rules)} rule(s) ({decisions})")
    for warning in loaded.warnings():
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"note: {policy_module.DIRECTION_NOTE}; `*` crosses dots: infra.db* also "
               "matches infra.dbadmin")


@policy.command("explain")
@click.argument("saga")
@click.argument("step")
@click.option("--env", "environment", help="The env fact (default: SAGAQ_ENV).")
@click.option("--direction", default="forward", show_default=True,
              type=click.Choice(["forward", "compensate"]))
@click.option("--approved", is_flag=True, help="As if an approval were present.")
@click.option("--json", "as_json", is_flag=True, help="The explanation as JSON, for scripts.")
@pass_env
@friendly
def policy_explain(env: Env, saga: str, step: str, environment: str | None, direction: str,
                   approved: bool, as_json: bool) -> None:
    """Which rule matches a dispatch of SAGA's STEP, and why."""
    out = commands.explain(env.runtime(), saga, step, env=environment, direction=direction,
                           approval_present=approved)
    click.echo(json.dumps(out, indent=2) if as_json else texts.explanation(out))


COMMANDS = (approvals_cmd, approve, deny, evidence, policy)
