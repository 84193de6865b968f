"""The saga lifecycle: one ``transitions`` state table, the only authority on legal moves.

The store keeps a saga's state as a plain string column; before any change the engine asks
:func:`next_state`, which raises :class:`~sagaq.errors.IllegalTransition` for a move the
table does not have. One :class:`transitions.Machine` is built per saga type (never one per
saga row) and queried without attaching models, so a worker pays nothing per saga.
"""

from __future__ import annotations

import functools
from enum import Enum

from transitions import Machine

from sagaq.errors import IllegalTransition


class SagaState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    AWAITING_APPROVAL = "awaiting_approval"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    NEEDS_HUMAN = "needs_human"
    RESOLVED = "resolved"


class StepStatus(str, Enum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    SKIPPED = "skipped"


class Direction(str, Enum):
    FORWARD = "forward"
    COMPENSATE = "compensate"


S = SagaState

FINISHED: frozenset[SagaState] = frozenset({S.COMPLETED, S.COMPENSATED, S.RESOLVED})
"""States no trigger leaves (the indexes on active sagas exclude them)."""

ACTIVE_STEP: frozenset[StepStatus] = frozenset({StepStatus.SCHEDULED, StepStatus.RUNNING})
"""Step-run statuses of which the database allows one per saga at a time."""

# trigger, source(s), destination
TABLE: list[tuple[str, list[SagaState], SagaState]] = [
    ("start", [S.PENDING], S.RUNNING),
    ("finish", [S.RUNNING], S.COMPLETED),
    ("wait", [S.RUNNING], S.WAITING),
    ("wake", [S.WAITING], S.RUNNING),
    ("request_approval", [S.PENDING, S.RUNNING, S.COMPENSATING], S.AWAITING_APPROVAL),
    ("approve", [S.AWAITING_APPROVAL], S.RUNNING),
    ("approve_rollback", [S.AWAITING_APPROVAL], S.COMPENSATING),
    ("deny", [S.AWAITING_APPROVAL], S.COMPENSATING),
    ("rollback", [S.PENDING, S.RUNNING, S.WAITING, S.AWAITING_APPROVAL], S.COMPENSATING),
    ("finish_rollback", [S.COMPENSATING], S.COMPENSATED),
    # from pending too: a saga that lost its first run before it started (the repair pages)
    ("escalate", [S.PENDING, S.RUNNING, S.WAITING, S.AWAITING_APPROVAL, S.COMPENSATING],
     S.NEEDS_HUMAN),
    ("retry_rollback", [S.NEEDS_HUMAN], S.COMPENSATING),
    ("retry_forward", [S.NEEDS_HUMAN], S.RUNNING),
    ("resolve", [S.NEEDS_HUMAN], S.RESOLVED),
]


def _build(name: str) -> Machine:
    transitions = [
        {"trigger": trigger, "source": [s.value for s in sources], "dest": dest.value}
        for trigger, sources, dest in TABLE
    ]
    return Machine(
        model=None,
        states=[s.value for s in SagaState],
        transitions=transitions,
        initial=None,
        auto_transitions=False,
        name=name,
    )


@functools.cache
def machine_for(saga: str) -> Machine:
    """The one machine of a saga type."""
    return _build(saga)


def next_state(
    saga: str, state: SagaState | str, trigger: str, *, saga_id: str | None = None
) -> SagaState:
    """The state ``trigger`` leads to from ``state``; raises if the table has no such move."""
    source = SagaState(state).value
    # An empty trigger would match every transition in transitions' lookup.
    found = machine_for(saga).get_transitions(trigger=trigger, source=source) if trigger else []
    if not found:
        raise IllegalTransition(trigger, source, saga_id=saga_id)
    return SagaState(found[0].dest)


def can(saga: str, state: SagaState | str, trigger: str) -> bool:
    source = SagaState(state).value
    return bool(trigger) and bool(machine_for(saga).get_transitions(trigger=trigger, source=source))


def mermaid() -> str:
    """The lifecycle as a Mermaid state diagram, drawn by ``transitions`` from the table."""
    from transitions.extensions.diagrams import GraphMachine

    class _Model:
        pass

    graph = GraphMachine(
        model=None,
        states=[s.value for s in SagaState],
        transitions=[
            {"trigger": t, "source": [s.value for s in src], "dest": d.value} for t, src, d in TABLE
        ],
        initial=S.PENDING.value,
        auto_transitions=False,
        graph_engine="mermaid",
        title="sagaq saga lifecycle",
        show_state_attributes=False,
    )
    model = _Model()
    graph.add_model(model)
    return _tidy(model.get_graph().draw(None))  # type: ignore[attr-defined]


def _tidy(text: str) -> str:
    """The diagram as ``transitions`` draws it, made fit to paste into a README."""
    # Drop the styling lines that mark the model's current state: a diagram has no "current".
    keep = [
        line.rstrip()
        for line in text.splitlines()
        if not line.strip().startswith(("classDef", "Class "))
    ]
    if len(keep) > 2 and keep[0] == keep[2] == "---" and ":" not in keep[1]:
        keep[1] = f"title: {keep[1]}"  # Mermaid front matter is YAML: the title needs its key
    return "\n".join(keep).strip() + "\n"
