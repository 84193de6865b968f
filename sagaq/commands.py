"""Operator commands: what ``sagaq ls / show / enqueue`` do, for the CLI and any web view.

Each returns plain records or a :class:`Story`; rendering is the caller's business.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from sagaq.errors import InputError, UnknownSagaError
from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.store import (
    EventRecord,
    NotificationRecord,
    Outcome,
    SagaRecord,
    StepRunRecord,
    Store,
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
            "saga": _plain(asdict(self.saga)),
            "step_runs": [_plain(asdict(r)) for r in self.runs],
            "events": [_plain(asdict(e)) for e in self.events],
            "notifications": [_plain(asdict(n)) for n in self.notifications],
            **{k: v for k, v in self.summary().items()
               if k in ("succeeded", "compensated", "rungs", "pages")},
        }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
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
    if len(ref) >= 4:
        found = store.find_sagas(ref)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(f"{ref!r} matches more than one saga; give more of the id")
    raise UnknownSagaError(f"no saga with id {ref!r} (see `sagaq ls`)", saga_id=ref)


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
    return runtime.engine.enqueue(runtime.registry.get(name), payload, key=key)


def retry(runtime: Runtime, ref: str, *, by: str, note: str | None = None) -> Outcome:
    """A saga in needs_human runs what is left: its compensations, or its failed step."""
    outcome = runtime.store.retry(resolve_id(runtime.store, ref), by=by, note=note)
    runtime.engine.publish_now(outcome.dispatches)
    return outcome


def resolve(runtime: Runtime, ref: str, *, by: str, note: str) -> Outcome:
    """A human has put things right: the saga is resolved and its page closed."""
    if not note.strip():
        raise InputError("say what you did: --note is required")
    outcome = runtime.store.resolve(resolve_id(runtime.store, ref), by=by, note=note)
    runtime.engine.publish_now(outcome.dispatches)
    return outcome
