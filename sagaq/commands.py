"""Operator commands: what ``sagaq ls / show / enqueue`` do, for the CLI and any web view.

Each returns plain records or a :class:`Story`; rendering is the caller's business.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from sagaq.errors import InputError, UnknownSagaError
from sagaq.keys import MIN_PREFIX
from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.secrets import MARK, REDACTED
from sagaq.store import (
    ApprovalRecord,
    EventRecord,
    NotificationRecord,
    Outcome,
    SagaRecord,
    StepRunRecord,
    Store,
    Stranded,
)

if TYPE_CHECKING:
    from sagaq.runtime import Runtime


@dataclass(frozen=True)
class Story:
    """Everything known about one saga: the row, its step runs, its timeline."""

    saga: SagaRecord
    runs: list[StepRunRecord]
    events: list[EventRecord]
    notifications: list[NotificationRecord] = field(default_factory=list)

    def succeeded(self) -> list[str]:
        """Forward steps, in the order they succeeded."""
        return self._steps(Direction.FORWARD)

    def compensated(self) -> list[str]:
        """Steps whose compensation ran, in the order it ran."""
        return self._steps(Direction.COMPENSATE)

    def rungs(self) -> list[int]:
        """The ladder rungs climbed, in order, not-applicable ones included.

        A compensation's own short ladder (its retries) is on the timeline but not here:
        this is the saga's climb, 0 → 1 → 2 → 3 (roll back) → 4 (page).
        """
        return [
            int(e.data["level"])
            for e in self.events
            if e.kind == "ladder.rung"
            and (e.data.get("direction") == "forward" or e.data.get("level") == 4)
        ]

    def pages(self) -> int:
        """Pages delivered (triggers, not resolves), on any channel, counted per incident."""
        return len({n.incident for n in self.notifications
                    if n.kind == "page" and n.action == "trigger" and n.status == "sent"})

    def _steps(self, direction: Direction) -> list[str]:
        done = [
            r
            for r in self.runs
            if r.direction is direction and r.status is StepStatus.SUCCEEDED
        ]
        done.sort(key=lambda r: (r.finished_at or r.scheduled_at, r.id))
        return [r.step for r in done]

    def summary(self) -> dict[str, Any]:
        s = self.saga
        return {
            "id": s.id,
            "name": s.name,
            "state": s.state.value,
            "succeeded": self.succeeded(),
            "compensated": self.compensated(),
            "rungs": self.rungs(),
            "pages": self.pages(),
            "error": s.error,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "saga": plain(asdict(self.saga)),
            "step_runs": [plain(asdict(r)) for r in self.runs],
            "events": [plain(asdict(e)) for e in self.events],
            "notifications": [plain(asdict(n)) for n in self.notifications],
            **{k: v for k, v in self.summary().items()
               if k in ("succeeded", "compensated", "rungs", "pages")},
        }


def plain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {MARK}:
        return REDACTED  # a sealed secret: not even its ciphertext is printed
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


def resolve_id(store: Store, ref: str) -> str:
    """A full saga id, from the id itself or a unique prefix of at least 4 characters."""
    ref = ref.strip()
    if store.get_saga(ref) is not None:
        return ref
    if len(ref) < MIN_PREFIX:
        raise InputError(
            f"{ref!r} is too short: give the saga id or a prefix of at least {MIN_PREFIX} "
            "characters (see `sagaq ls`)", saga_id=ref,
        )
    if len(ref) >= MIN_PREFIX:
        found = store.find_sagas(ref)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(f"{ref!r} matches more than one saga; give more of the id")
    raise UnknownSagaError(f"no saga with id or id prefix {ref!r} (see `sagaq ls`)",
                           saga_id=ref)


def story(store: Store, ref: str) -> Story:
    saga_id = resolve_id(store, ref)
    return Story(
        store.get_saga_or_raise(saga_id),
        store.step_runs(saga_id),
        store.events(saga_id),
        store.notifications(saga_id),
    )


def parse_state(value: str | None) -> SagaState | None:
    if value is None:
        return None
    try:
        return SagaState(value)
    except ValueError:
        states = ", ".join(s.value for s in SagaState)
        raise InputError(f"unknown state {value!r}; one of: {states}") from None


def list_sagas(
    store: Store, *, state: str | None = None, name: str | None = None, limit: int = 50
) -> list[SagaRecord]:
    if limit < 1:
        raise InputError("limit must be at least 1")
    return store.list_sagas(state=parse_state(state), name=name, limit=limit)


def enqueue(runtime: Runtime, name: str, raw_input: str | None, *, key: str | None = None) -> str:
    """Start saga ``name`` with ``raw_input`` (a JSON text); nothing is written on bad input."""
    try:
        payload = json.loads(raw_input) if raw_input else {}
    except json.JSONDecodeError as exc:
        raise InputError(f"input is not valid JSON: {exc}") from None
    definition = runtime.registry.get(name)
    runtime.check_policy()  # its first step is gated here, by this process's policy
    return runtime.engine.enqueue(definition, payload, key=key)


RESERVED_ACTORS = frozenset({"reconciler", "sagaq"})  # what sagaq itself records as `by`
MAX_ACTOR = 200  # the approvals' decided_by column


def actor(by: str) -> str:
    """``--by``: a person's name, not one sagaq records for itself, and not too long."""
    name = by.strip()
    if not name:
        raise InputError("say who acts: --by NAME")
    if name.lower() in RESERVED_ACTORS:
        raise InputError(f"--by {name!r} is reserved for sagaq's own actions; give your name")
    if len(name) > MAX_ACTOR:
        raise InputError(f"--by is {len(name)} characters; at most {MAX_ACTOR}")
    return name


def _needs_human(store: Store, ref: str, doing: str) -> str:
    saga = store.get_saga_or_raise(resolve_id(store, ref))
    if saga.state is not SagaState.NEEDS_HUMAN:
        raise InputError(
            f"saga {saga.id} is {saga.state.value}: only a saga in needs_human can be {doing}",
            saga_id=saga.id,
        )
    return saga.id


def retry(runtime: Runtime, ref: str, *, by: str, note: str | None = None) -> Outcome:
    """A saga in needs_human runs what is left: its compensations, or its failed step."""
    by = actor(by)
    saga_id = _needs_human(runtime.store, ref, "retried")
    runtime.check_policy()
    outcome = runtime.store.retry(saga_id, by=by, note=note)
    runtime.engine.publish_now(outcome.dispatches)
    return outcome


def resolve(runtime: Runtime, ref: str, *, by: str, note: str) -> Outcome:
    """A human has put things right: the saga is resolved and its page closed."""
    if not note.strip():
        raise InputError("say what you did: --note is required")
    by = actor(by)
    saga_id = _needs_human(runtime.store, ref, "resolved")
    outcome = runtime.store.resolve(saga_id, by=by, note=note)
    runtime.engine.publish_now(outcome.dispatches)
    return outcome


def approvals(store: Store, *, status: str | None = "pending") -> list[ApprovalRecord]:
    return store.approvals(status=status)


def decide(
    runtime: Runtime, ref: str, *, approve: bool, by: str, note: str | None = None
) -> ApprovalRecord:
    """Approve or deny a pending request; the decision, who and the policy version are
    events on the saga's timeline."""
    by = actor(by)
    found = runtime.store.find_approval(ref)
    runtime.check_policy()  # an approved step is dispatched (gated) from this process
    outcome = runtime.store.decide(found.id, approve=approve, by=by, note=note,
                                   policy=runtime.policy.label)
    runtime.engine.publish_now(outcome.dispatches)
    return runtime.store.find_approval(found.id)


def evidence(store: Store, ref: str) -> dict[str, Any]:
    """The rollback evidence record of one saga: what was dispatched under which policy,
    who approved what, and what was undone, in order."""
    st = story(store, ref)
    verdicts = [e for e in st.events if e.kind == "policy.verdict"]
    comp = [r for r in st.runs if r.direction is Direction.COMPENSATE]
    # Dispatched: handed to a worker (claimed), in order; a parked or denied one never was.
    dispatched = list(dict.fromkeys(
        r.step for r in sorted(comp, key=lambda r: (r.started_at or r.scheduled_at, r.id))
        if r.started_at is not None
    ))
    return {
        "run_id": st.saga.id,
        "saga": st.saga.name,
        "definition_version": st.saga.version,
        "status": st.saga.state.value,
        "matched_policy_ids": sorted({rule for e in verdicts for rule in e.data["matched"]}),
        "policy_versions": sorted({e.data["policy"] for e in verdicts}),
        "verdicts": [
            {"at": e.at.isoformat(), "step": e.step, "direction": e.data["direction"],
             "decision": e.data["decision"], "rule": e.data["rule"],
             "matched": e.data["matched"]}
            for e in verdicts
        ],
        "approvals": [
            {"id": a.id, "step": a.step, "direction": a.direction, "rule": a.rule_id,
             "decision": a.status, "by": a.decided_by,
             "at": a.decided_at.isoformat() if a.decided_at else None,
             "note": a.note, "requested_under": a.policy_version,
             "decided_under": a.decided_under}
            for a in store.approvals(saga_id=st.saga.id)
        ],
        "rollback_triggered": any(e.kind == "rollback.plan" for e in st.events),
        "rollback_mode": "lifo_stack",
        "compensations": {
            "dispatched": dispatched,
            "succeeded": st.compensated(),
            # A step whose undo failed eight times (its own retries) is one failed step.
            "skipped": _once(r.step for r in comp if r.status is StepStatus.SKIPPED),
            "failed": _once(r.step for r in comp if r.status is StepStatus.FAILED),
        },
        "uncompensated": store.uncompensated(st.saga.id),
        "error": st.saga.error,
        "started_at": st.saga.created_at.isoformat(),
        "finished_at": st.saga.finished_at.isoformat() if st.saga.finished_at else None,
    }


def doctor(store: Store, *, limit: int = 100) -> list[Stranded]:
    """The sagas without a way forward (DESIGN §4.13), each with the reason."""
    return store.stranded(limit)


def _once(steps: Iterable[str]) -> list[str]:
    """Each step once, in first-seen order."""
    return list(dict.fromkeys(steps))


def explain(runtime: Runtime, saga: str, step: str, *, env: str | None = None,
            direction: str = "forward", approval_present: bool = False) -> dict[str, Any]:
    """Which rule matches one dispatch, and why: ``sagaq policy explain``."""
    from sagaq.gate import Gate
    from sagaq.policy import facts_dict

    definition = runtime.registry.get(saga)
    definition.step_named(step)
    try:
        way = Direction(direction)
    except ValueError:
        raise InputError("direction is forward or compensate") from None
    gate = Gate(runtime.policy, runtime.registry, env or runtime.settings.env)
    facts = gate.facts(saga, step, way, approval_present)
    verdict = runtime.policy.evaluate(facts)
    return {
        "policy": runtime.policy.source,
        "policy_version": runtime.policy.label,
        "facts": facts_dict(facts),
        "decision": verdict.decision.value,
        "deciding_rule": verdict.rule_id,
        "matched": list(verdict.matched),
        "rules": runtime.policy.explain(facts),
        "precedence": "deny > require_human > allow; first in the file among equals; "
                      "no match: allow",
    }
