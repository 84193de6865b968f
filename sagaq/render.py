"""Rich renderings of sagas and their timelines, for the terminal."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sagaq.commands import Story
from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.store import ApprovalRecord, SagaRecord

STATE_STYLE = {
    SagaState.PENDING: "dim",
    SagaState.RUNNING: "cyan",
    SagaState.WAITING: "cyan",
    SagaState.AWAITING_APPROVAL: "magenta",
    SagaState.COMPENSATING: "yellow",
    SagaState.COMPLETED: "green",
    SagaState.COMPENSATED: "yellow",
    SagaState.NEEDS_HUMAN: "bold red",
    SagaState.RESOLVED: "blue",
}
STATUS_STYLE = {
    StepStatus.SCHEDULED: "dim",
    StepStatus.RUNNING: "cyan",
    StepStatus.SUCCEEDED: "green",
    StepStatus.FAILED: "red",
    StepStatus.UNKNOWN: "magenta",
    StepStatus.SKIPPED: "dim",
}


def _time(value: datetime | None) -> str:
    return value.strftime("%H:%M:%S.%f")[:-3] if value else ""


def _state(state: SagaState) -> Text:
    return Text(state.value, style=STATE_STYLE[state])


def saga_table(sagas: list[SagaRecord]) -> Table:
    table = Table(title=f"{len(sagas)} saga(s), newest first", title_justify="left")
    for col in ("id", "name", "state", "created", "updated", "error"):
        # Ids stay on one line, to be copied; the error gives way.
        table.add_column(col, overflow="fold", no_wrap=col == "id",
                         min_width=36 if col == "id" else None)
    for s in sagas:
        table.add_row(
            s.id,
            s.name,
            _state(s.state),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _time(s.updated_at),
            shorten(s.error or "", 80),
        )
    return table


def shorten(text: str, width: int) -> str:
    """At most ``width`` characters, cut at a word boundary, with an ellipsis."""
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > width // 2 else cut).rstrip(" ,;:") + "…"


def story(story: Story, width: int | None = None) -> RenderableType:
    """A saga's whole story; ``width``: the console's, to leave out what will not fit."""
    s = story.saga
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("saga", f"{s.id}  ({s.name}, definition {s.version})")
    head.add_row("state", _state(s.state))
    head.add_row("created", s.created_at.isoformat(timespec="milliseconds"))
    if s.finished_at:
        head.add_row("finished", s.finished_at.isoformat(timespec="milliseconds"))
    if s.key:
        head.add_row("key", s.key)
    if s.error:
        head.add_row("error", Text(s.error, style="red"))
    if story.succeeded():
        head.add_row("succeeded", " → ".join(story.succeeded()))
    if story.compensated():
        head.add_row("compensated", " → ".join(story.compensated()))

    # Narrow terminals squeeze the free-text columns first, never the ids and statuses.
    runs = Table(title="step runs", title_justify="left", box=box.SIMPLE_HEAD,
                 padding=(0, 1), pad_edge=False)
    # Below 110 columns the idempotency key gives way (`--json` has it) and errors move
    # under the table, so that ids, worker and task id stay whole.
    wide = width is None or width >= 110
    columns = ["#", "step", "", "try", "status", "worker", "task", *(["key"] if wide else [])]
    for col in columns:
        runs.add_column(col, no_wrap=True, overflow="ellipsis",
                        max_width=20 if col == "step" else 16 if col == "worker" else None)
    if wide:
        runs.add_column("error", overflow="fold", min_width=12)
    errors = Text()
    for r in story.runs:
        cells = {
            "#": str(r.id),
            "step": r.step,
            "": "→" if r.direction is Direction.FORWARD else "↩",
            "try": str(r.attempt),
            "status": Text(r.status.value, style=STATUS_STYLE[r.status]),
            "worker": r.worker or "",
            "task": (r.task_id or "")[:8],
            "key": r.idempotency_key[:8],
        }
        error = (r.error or "")[:80]
        runs.add_row(*(cells[c] for c in columns), *([error] if wide else []))
        if error and not wide:
            errors.append(f"#{r.id} {r.step}: ", style="bold").append(f"{error}\n", style="red")

    timeline = Table(title="timeline", title_justify="left", box=box.SIMPLE_HEAD,
                     padding=(0, 1), pad_edge=False)
    for col in ("time", "event"):
        timeline.add_column(col, no_wrap=True)
    timeline.add_column("step", overflow="fold", max_width=18)
    timeline.add_column("detail", overflow="fold", min_width=20)
    for e in story.events:
        timeline.add_row(_time(e.at), _event(e.kind), e.step or "", e.message)
    parts: list[RenderableType] = [head, runs, *([errors] if errors.plain else []), timeline]
    return Panel(Group(*parts), title=f"{s.name} {s.id[:8]}", title_align="left")


def _event(kind: str) -> Text:
    style: Any = "default"
    if kind.endswith(("failed", "needs_human")):
        style = "red"
    elif kind.endswith(("succeeded", "completed")):
        style = "green"
    elif kind.startswith(("compensation", "rollback")) or kind.endswith("compensating"):
        style = "yellow"
    elif kind.endswith("dropped"):
        style = "dim"
    return Text(kind, style=style)


def approvals_table(approvals: list[ApprovalRecord]) -> Table:
    table = Table(title=f"{len(approvals)} approval request(s)", title_justify="left")
    for col in ("id", "saga", "step", "dir", "rule", "status", "deadline", "by"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "saga"),
                         min_width=32 if col == "id" else None)
    for a in approvals:
        table.add_row(a.id, a.saga_id[:8], a.step, a.direction, a.rule_id, a.status,
                      a.deadline.strftime("%Y-%m-%d %H:%M"), a.decided_by or "")
    return table
