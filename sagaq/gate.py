"""The gate in front of every dispatch: the facts of a step, the policy's verdict, approvals.

Pure: given a dispatch and the approvals the saga already has, what the policy says. The
store calls it before it writes any step run, forward or compensation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sagaq import keys
from sagaq.definition import Registry, StepKind
from sagaq.machine import Direction
from sagaq.policy import ALLOW_ALL, Decision, Facts, Policy, Rule, Verdict


class Approval(Protocol):
    """An approval as the gate reads it (the store's ApprovalRecord): the gate sits below the
    store, so it names the fields it needs instead of importing the record."""

    @property
    def id(self) -> str: ...
    @property
    def step(self) -> str: ...
    @property
    def direction(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def rule_id(self) -> str: ...
    @property
    def rule_fingerprint(self) -> str: ...
    @property
    def policy_version(self) -> str | None: ...
    @property
    def decided_under(self) -> str | None: ...
    @property
    def decided_by(self) -> str | None: ...


def approval_id(saga_id: str, step: str, direction: str, rule: Rule) -> str:
    """One request per (saga, step, direction, rule as it reads now): asking twice finds it."""
    return keys.approval_id(saga_id, step, direction, rule.id, rule.fingerprint)


@dataclass(frozen=True)
class GateResult:
    decision: Decision
    verdict: Verdict
    rule: Rule | None = None  # the rule that denies, or whose approval is needed
    approval: Approval | None = None  # the approval that satisfied a require_human
    note: str = ""


class Gate:
    def __init__(self, policy: Policy, registry: Registry, env: str) -> None:
        self.policy = policy
        self.registry = registry
        self.env = env
        # Whether an approval can change any verdict: if no rule says approval_present,
        # an allowed dispatch needs no look at the approvals table.
        self._asks_approvals = any(
            "approval_present" in r.when or r.decision is Decision.REQUIRE_HUMAN
            for r in policy.rules
        )

    @property
    def active(self) -> bool:
        return bool(self.policy.rules)

    def facts(self, saga: str, step: str, direction: Direction, approval_present: bool) -> Facts:
        s = self.registry.get(saga).step_named(step)
        return Facts(
            env=self.env,
            saga=saga,
            step=step,
            kind=s.kind.value,
            direction=direction.value,
            side_effect=s.side_effect,
            compensation_declared=s.compensate is not None,
            rollback_supported=s.kind is StepKind.COMPENSABLE and s.compensate is not None,
            at_most_once=s.at_most_once,
            approval_present=approval_present,
            topic=s.topic,
            tags=s.tags,
        )

    def after_pivot(self, saga: str, step: str) -> bool:
        """Whether ``step`` comes after its saga's point of no return."""
        definition = self.registry.get(saga)
        pivot = definition.pivot_index
        return pivot is not None and definition.step_named(step).index > pivot

    def needs_approvals(self, saga: str, step: str, direction: Direction) -> bool:
        """False when the verdict cannot depend on approvals (skip reading them)."""
        if not self._asks_approvals:
            return False
        verdict = self.policy.evaluate(self.facts(saga, step, direction, False))
        return verdict.decision is not Decision.ALLOW or any(
            r.when.get("approval_present") is True for r in self.policy.rules
        )

    def check(
        self,
        saga: str,
        step: str,
        direction: Direction,
        approvals: Sequence[Approval] = (),
    ) -> GateResult:
        approved = [a for a in approvals if a.status == "approved" and a.step == step
                    and a.direction == direction.value]
        verdict = self.policy.evaluate(self.facts(saga, step, direction, bool(approved)))
        if verdict.decision is Decision.DENY:
            return GateResult(Decision.DENY, verdict, verdict.rule)
        if verdict.decision is Decision.ALLOW:
            return GateResult(Decision.ALLOW, verdict)
        # require_human: every matching rule that asks for a human needs its own approval,
        # granted for the rule as it reads now (an edited rule asks again).
        notes = []
        last: Approval | None = None
        for rule_id in verdict.matched:
            rule = self.policy.rule(rule_id)
            if rule is None or rule.decision is not Decision.REQUIRE_HUMAN:
                continue
            found = next((a for a in approved if a.rule_id == rule.id
                          and a.rule_fingerprint == rule.fingerprint), None)
            if found is None:
                return GateResult(Decision.REQUIRE_HUMAN, verdict, rule)
            older = {found.policy_version, found.decided_under} - {None, self.policy.label}
            if older:
                notes.append(f"approval {found.id[:8]} asked or granted under "
                             f"{', '.join(sorted(v for v in older if v))} re-checked against "
                             f"{self.policy.label}: rule {rule.id} unchanged")
            last = found
        return GateResult(Decision.ALLOW, verdict, None, last, "; ".join(notes))


def allow_all(registry: Registry, env: str = "development") -> Gate:
    return Gate(ALLOW_ALL, registry, env)
