"""What the store hands back: frozen records, never sessions or ORM objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

from sagaq.machine import Direction, SagaState, StepStatus


class Gatekeeper(Protocol):
    """What the store asks of the policy gate (:class:`sagaq.gate.Gate` is one): the store
    writes the verdicts, it does not import the gate."""

    @property
    def active(self) -> bool: ...

    @property
    def policy(self) -> Any: ...

    def needs_approvals(self, saga: str, step: str, direction: Direction) -> bool: ...

    def check(self, saga: str, step: str, direction: Direction,
              approvals: list[ApprovalRecord]) -> Any: ...

    def after_pivot(self, saga: str, step: str) -> bool: ...


@dataclass(frozen=True)
class SagaRecord:
    id: str
    name: str
    version: str
    state: SagaState
    key: str | None
    input: Any
    checkpoint: dict[str, Any]
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    incident: int = 0
    wake_at: datetime | None = None

    @property
    def results(self) -> dict[str, Any]:
        return dict(self.checkpoint.get("results", {}))


@dataclass(frozen=True)
class StepRunRecord:
    id: int
    saga_id: str
    step: str
    step_index: int
    direction: Direction
    attempt: int
    status: StepStatus
    task_name: str
    compensate_task: str | None
    idempotency_key: str
    message_id: str
    worker: str | None
    task_id: str | None
    deliveries: int
    lease_expires_at: datetime | None
    not_before: datetime | None
    result: Any
    error: str | None
    error_type: str | None
    scheduled_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    level: int = 0
    tier: str | None = None
    failure: str | None = None


@dataclass(frozen=True)
class EventRecord:
    id: int
    saga_id: str
    at: datetime
    kind: str
    step: str | None
    step_run_id: int | None
    worker: str | None
    task_id: str | None
    message: str
    data: dict[str, Any]


@dataclass(frozen=True)
class NewRun:
    """A step run to schedule (the engine says what; the store writes it and its message)."""

    step: str
    step_index: int
    direction: Direction
    attempt: int
    task_name: str
    idempotency_key: str
    compensate_task: str | None = None
    delay: float = 0.0  # seconds before the message may run
    after_pivot: bool = False  # a denial by the policy then pages instead of rolling back
    durable: bool = False  # too long for a countdown: the saga waits in Postgres instead
    level: int = 0  # the ladder rung this attempt runs at
    tier: str | None = None  # the model tier it runs on
    reason: str = ""  # why it is scheduled, for the timeline


@dataclass(frozen=True)
class Dispatch:
    """A Celery message to publish once the transaction that wrote it has committed."""

    task_name: str
    args: tuple[str, int]  # (saga_id, step_run_id): ids only, never data
    message_id: str
    countdown: float = 0.0


class ClaimStatus(str, Enum):
    CLAIMED = "claimed"
    FINISHED = "finished"  # the run already ended: a duplicate or a redelivery
    BUSY = "busy"  # another worker holds a live lease
    EARLY = "early"  # the saga waits in Postgres; the reconciler publishes at wake time
    EXPIRED = "expired"  # running, lease expired: the outcome is unknown
    MISSING = "missing"  # no such run (or saga)


@dataclass(frozen=True)
class Claim:
    status: ClaimStatus
    run: StepRunRecord | None = None
    saga: SagaRecord | None = None
    forward_result: Any = None  # for a compensation: the result of the step it undoes
    errors: tuple[str, ...] = ()  # earlier attempts' errors in this round, oldest first


@dataclass(frozen=True)
class NotificationRecord:
    id: int
    saga_id: str
    incident: int
    channel: str
    kind: str
    action: str
    dedup_key: str
    status: str  # pending | sent | failed
    attempts: int
    last_error: str | None
    note: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    subject: str = ""


@dataclass(frozen=True)
class ApprovalRecord:
    id: str
    saga_id: str
    step: str
    direction: str
    step_run_id: int | None
    rule_id: str
    rule_fingerprint: str
    policy_version: str
    status: str  # pending | approved | denied
    deadline: datetime
    requested_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    decided_under: str | None
    note: str | None
    requested_by: str | None = None  # whose action dispatched the step


@dataclass(frozen=True)
class PolicyFingerprint:
    """The policy and env a worker loaded, as recorded in the database."""

    fingerprint: str
    policy: str
    env: str
    source: str
    worker: str
    first_loaded_at: datetime
    loaded_at: datetime


@dataclass(frozen=True)
class ResourceRecord:
    id: int
    saga_id: str
    step: str
    step_run_id: int | None
    kind: str
    external_id: str
    status: str  # held | released | orphaned | releasing | failed
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    released_at: datetime | None


@dataclass(frozen=True)
class Outcome:
    """What a write did: whether it won its guard, the saga's state after, what to publish."""

    won: bool
    state: SagaState | None = None
    dispatches: list[Dispatch] = field(default_factory=list)
    note: str = ""
    entered: SagaState | None = None  # the state this write moved the saga into, if any


@dataclass(frozen=True)
class Stranded:
    """A saga that is not finished and has no way forward (DESIGN §4.13), and why."""

    saga_id: str
    name: str
    state: SagaState
    reason: str
    updated_at: datetime
