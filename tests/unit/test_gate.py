"""The gate: the facts of a dispatch, taken from the step's definition, and the verdict with
the approvals a saga already holds. Pure: definitions in a private registry, approvals as
records built here.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from sagaq import Saga
from sagaq.definition import Registry
from sagaq.gate import Gate, allow_all, approval_id
from sagaq.machine import Direction
from sagaq.policy import Decision, Policy, parse
from sagaq.store.records import ApprovalRecord

F, C = Direction.FORWARD, Direction.COMPENSATE
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _act(ctx: Any, inp: Any) -> None:
    return None


def _undo(ctx: Any, inp: Any) -> None:
    return None


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry()
    s = Saga("estate", registry=reg)
    s.step(name="lookup", side_effect=False)(_act)
    s.step(name="reserve", compensate=_undo, topic="billing.hold", tags=("payments", "eu"))(_act)
    s.step(name="log_it", no_rollback="an append-only audit log")(_act)
    s.step(name="charge", kind="pivot", tags=("payments",))(_act)
    s.step(name="ship", kind="retryable")(_act)
    s.step(name="wipe", kind="noncompensable", at_most_once=True, topic="infra.delete")(_act)
    return reg


def gate(registry: Registry, *rules: dict[str, Any], env: str = "production",
         digest: str = "aaaa") -> Gate:
    return Gate(parse({"version": "v1", "rules": list(rules)}, digest=digest), registry, env)


def ask(rule_id: str, **when: Any) -> dict[str, Any]:
    return {"id": rule_id, "when": when, "decision": "require_human"}


def deny(rule_id: str, **when: Any) -> dict[str, Any]:
    return {"id": rule_id, "when": when, "decision": "deny"}


def approval(g: Gate, rule_id: str, *, step: str = "wipe", direction: Direction = F,
             status: str = "approved", decided_under: str | None = None,
             fingerprint: str | None = None) -> ApprovalRecord:
    rule = g.policy.rule(rule_id)
    assert rule is not None
    return ApprovalRecord(
        id=approval_id("saga-1", step, direction.value, rule),
        saga_id="saga-1",
        step=step,
        direction=direction.value,
        step_run_id=1,
        rule_id=rule_id,
        rule_fingerprint=fingerprint or rule.fingerprint,
        policy_version=g.policy.label,
        status=status,
        deadline=NOW,
        requested_at=NOW,
        decided_at=NOW if status != "pending" else None,
        decided_by="alice" if status != "pending" else None,
        decided_under=(decided_under or g.policy.label) if status != "pending" else None,
        note=None,
    )


# -- facts ----------------------------------------------------------------------------------

FACT_ROWS = [
    # step, direction, kind, side_effect, compensation_declared, rollback_supported,
    # at_most_once, topic, tags
    ("lookup", F, "compensable", False, False, False, False, None, ()),
    ("reserve", F, "compensable", True, True, True, False, "billing.hold", ("payments", "eu")),
    ("reserve", C, "compensable", True, True, True, False, "billing.hold", ("payments", "eu")),
    ("log_it", F, "compensable", True, False, False, False, None, ()),
    ("charge", F, "pivot", True, False, False, False, None, ("payments",)),
    ("ship", F, "retryable", True, False, False, False, None, ()),
    ("wipe", F, "noncompensable", True, False, False, True, "infra.delete", ()),
]


@pytest.mark.parametrize(
    ("step", "direction", "kind", "side_effect", "declared", "rollback", "amo", "topic", "tags"),
    FACT_ROWS,
)
def test_facts_come_from_the_step_definition(
    registry, step, direction, kind, side_effect, declared, rollback, amo, topic, tags
) -> None:
    g = gate(registry, env="staging")
    f = g.facts("estate", step, direction, approval_present=False)
    assert (f.env, f.saga, f.step, f.direction) == ("staging", "estate", step, direction.value)
    assert f.kind == kind
    assert f.side_effect is side_effect
    assert f.compensation_declared is declared
    assert f.rollback_supported is rollback  # only a compensable step with a compensation
    assert f.at_most_once is amo
    assert f.topic == topic
    assert f.tags == tags
    assert f.approval_present is False
    assert g.facts("estate", step, direction, approval_present=True).approval_present is True


def test_the_env_fact_is_the_gates(registry) -> None:
    rules = (deny("no-prod-wipes", env="production", step="wipe"),)
    assert gate(registry, *rules, env="production").check("estate", "wipe", F).decision \
        is Decision.DENY
    assert gate(registry, *rules, env="staging").check("estate", "wipe", F).decision \
        is Decision.ALLOW


def test_the_direction_fact_tells_a_compensation_from_its_step(registry) -> None:
    g = gate(registry, deny("no-undo-holds", direction="compensate", topic="billing.*"))
    assert g.check("estate", "reserve", F).decision is Decision.ALLOW
    result = g.check("estate", "reserve", C)
    assert result.decision is Decision.DENY
    assert result.rule is not None and result.rule.id == "no-undo-holds"
    assert result.verdict.matched == ("no-undo-holds",)


def test_without_rules_everything_is_allowed(registry) -> None:
    g = allow_all(registry)
    assert not g.active
    for step in ("lookup", "reserve", "charge", "wipe"):
        result = g.check("estate", step, F)
        assert result.decision is Decision.ALLOW and result.verdict.matched == ()
    assert gate(registry, ask("a")).active


# -- approvals ------------------------------------------------------------------------------


def test_require_human_without_an_approval_names_the_rule(registry) -> None:
    g = gate(registry, ask("ask-deletes", topic="infra.delete"))
    result = g.check("estate", "wipe", F)
    assert result.decision is Decision.REQUIRE_HUMAN
    assert result.rule is g.policy.rules[0]
    assert result.approval is None


def test_an_approved_approval_of_the_same_rule_satisfies_require_human(registry) -> None:
    g = gate(registry, ask("ask-deletes", topic="infra.delete"))
    ok = approval(g, "ask-deletes")
    result = g.check("estate", "wipe", F, [ok])
    assert result.decision is Decision.ALLOW
    assert result.approval == ok
    assert result.note == ""  # decided under the policy in force: nothing to re-check
    assert result.verdict.matched == ("ask-deletes",)


@pytest.mark.parametrize(
    "changes",
    [
        {"status": "pending"},
        {"status": "denied"},
        {"step": "charge"},  # another step's approval
        {"direction": C},  # the same step, the other direction
    ],
    ids=["pending", "denied", "other-step", "other-direction"],
)
def test_only_an_approved_approval_of_this_dispatch_counts(registry, changes) -> None:
    g = gate(registry, ask("ask-all"))
    other = approval(g, "ask-all", **changes)
    result = g.check("estate", "wipe", F, [other])
    assert result.decision is Decision.REQUIRE_HUMAN
    assert result.rule is not None and result.rule.id == "ask-all"


def test_an_approval_for_another_rule_does_not_count(registry) -> None:
    g = gate(registry, ask("ask-deletes", topic="infra.*"), ask("ask-others", topic="billing.*"))
    elsewhere = replace(approval(g, "ask-deletes"), rule_id="ask-others")  # wrong fingerprint
    assert g.check("estate", "wipe", F, [elsewhere]).decision is Decision.REQUIRE_HUMAN


def test_an_edited_rule_asks_again(registry) -> None:
    old = gate(registry, ask("ask-deletes", topic="infra.delete"), digest="old")
    granted = approval(old, "ask-deletes")
    # the same id, but what it says changed: the human approved something else
    new = gate(registry, ask("ask-deletes", topic="infra.*", at_most_once=True), digest="new")
    assert new.policy.rules[0].fingerprint != old.policy.rules[0].fingerprint
    result = new.check("estate", "wipe", F, [granted])
    assert result.decision is Decision.REQUIRE_HUMAN
    assert result.rule is new.policy.rules[0]
    # ... and the new request has a new id, so it is a new question
    assert approval_id("saga-1", "wipe", "forward", new.policy.rules[0]) != granted.id


def test_two_require_human_rules_need_two_approvals(registry) -> None:
    g = gate(
        registry,
        {"id": "allow-prod", "decision": "allow", "when": {"env": "production"}},
        ask("ask-security", at_most_once=True),
        ask("ask-deletes", topic="infra.delete"),
    )
    first = g.check("estate", "wipe", F)
    assert first.decision is Decision.REQUIRE_HUMAN
    assert first.rule is not None and first.rule.id == "ask-security"  # the first in the file

    one = approval(g, "ask-security")
    second = g.check("estate", "wipe", F, [one])
    assert second.decision is Decision.REQUIRE_HUMAN
    assert second.rule is not None and second.rule.id == "ask-deletes"

    only_other = approval(g, "ask-deletes")
    assert g.check("estate", "wipe", F, [only_other]).rule.id == "ask-security"  # type: ignore[union-attr]

    both = g.check("estate", "wipe", F, [one, only_other])
    assert both.decision is Decision.ALLOW
    assert both.verdict.matched == ("allow-prod", "ask-security", "ask-deletes")


def test_an_approval_decided_under_an_older_policy_is_rechecked(registry) -> None:
    rules = (ask("ask-deletes", topic="infra.delete"),)
    old = gate(registry, *rules, digest="0ld0ld")
    new = gate(registry, *rules, {"id": "extra", "decision": "allow", "when": {"env": "x"}},
               digest="n3wn3w")
    assert old.policy.label != new.policy.label
    granted = approval(old, "ask-deletes")
    assert granted.decided_under == "v1@0ld0ld"
    result = new.check("estate", "wipe", F, [granted])
    assert result.decision is Decision.ALLOW  # the rule it was granted for is unchanged
    assert result.approval == granted
    assert "v1@0ld0ld" in result.note and "v1@n3wn3w" in result.note
    assert "ask-deletes" in result.note and "unchanged" in result.note
    assert granted.id[:8] in result.note


def test_an_approval_decided_under_an_older_policy_whose_rule_changed_asks_again(
    registry,
) -> None:
    old = gate(registry, ask("ask-deletes", topic="infra.delete"), digest="0ld")
    new = gate(registry, ask("ask-deletes", topic="infra.delete", env="prod*"), digest="n3w")
    result = new.check("estate", "wipe", F, [approval(old, "ask-deletes")])
    assert result.decision is Decision.REQUIRE_HUMAN
    assert result.note == ""


def test_deny_wins_even_with_approvals(registry) -> None:
    g = gate(
        registry,
        ask("ask-deletes", topic="infra.delete"),
        deny("never-wipe-in-prod", env="production", step="wipe"),
    )
    granted = approval(g, "ask-deletes")
    result = g.check("estate", "wipe", F, [granted])
    assert result.decision is Decision.DENY
    assert result.rule is not None and result.rule.id == "never-wipe-in-prod"
    assert result.approval is None
    assert result.verdict.matched == ("ask-deletes", "never-wipe-in-prod")


def test_approval_present_lets_a_deny_rule_step_aside(registry) -> None:
    # the example: an irreversible delete is denied unless someone approved it
    g = gate(
        registry,
        ask("ask-deletes", topic="infra.delete"),
        deny("deny-unapproved-delete", topic="infra.delete", rollback_supported=False,
             approval_present=False),
    )
    without = g.check("estate", "wipe", F)
    assert without.decision is Decision.DENY
    assert without.rule is not None and without.rule.id == "deny-unapproved-delete"
    granted = approval(g, "ask-deletes")
    result = g.check("estate", "wipe", F, [granted])
    assert result.decision is Decision.ALLOW
    assert result.verdict.matched == ("ask-deletes",)
    # a pending request is not an approval
    pending = approval(g, "ask-deletes", status="pending")
    assert g.check("estate", "wipe", F, [pending]).decision is Decision.DENY


def test_needs_approvals_only_when_an_approval_could_change_the_verdict(registry) -> None:
    plain = gate(registry, deny("no-wipes", step="wipe"))
    assert not plain.needs_approvals("estate", "wipe", F)
    asks = gate(registry, ask("ask-deletes", topic="infra.delete"))
    assert asks.needs_approvals("estate", "wipe", F)
    assert not asks.needs_approvals("estate", "reserve", F)  # allowed whatever the approvals
    gated = gate(registry, {"id": "ok-if-approved", "decision": "allow",
                            "when": {"approval_present": True}})
    assert gated.needs_approvals("estate", "reserve", F)


# -- approval ids ---------------------------------------------------------------------------


def test_the_approval_id_is_derived_from_saga_step_direction_and_rule(registry) -> None:
    g = gate(registry, ask("a", topic="infra.*"), ask("b", topic="infra.*"))
    a, b = g.policy.rules
    base = approval_id("saga-1", "wipe", "forward", a)
    assert base == approval_id("saga-1", "wipe", "forward", a)  # asking twice finds it
    assert len(base) == 32 and int(base, 16) >= 0
    others = {
        approval_id("saga-2", "wipe", "forward", a),
        approval_id("saga-1", "ship", "forward", a),
        approval_id("saga-1", "wipe", "compensate", a),
        approval_id("saga-1", "wipe", "forward", b),
        approval_id("saga-1", "wipe", "forward",
                    parse({"version": "v1", "rules": [ask("a", topic="infra.d*")]}).rules[0]),
    }
    assert base not in others and len(others) == 5
    # what the rule is called in which file does not matter, only what it says
    same = Policy(rules=(replace(a, description="reworded", deadline=5.0),), digest="other")
    assert approval_id("saga-1", "wipe", "forward", same.rules[0]) == base
