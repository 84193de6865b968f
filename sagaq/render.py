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
from sagaq.store import ApprovalRecord, SagaRecord, Stranded
from sagaq.text import visible

ERROR_WIDTH = 80  # characters of an error shown in a table cell, counted once made visible

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


def literal(value: object, limit: int | None = None, style: str = "") -> Text:
    """Text from a step, a caller or a stand-in: never read as markup, controls made visible.

    A plain ``str`` in a rich table is parsed as markup (``[/x]`` raises, ``[link=...]``
    becomes a link); a :class:`Text` is not, and :func:`visible` writes out escapes first.
    """
    return Text(visible("" if value is None else value, limit), style=style)


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
            literal(s.id),
            literal(s.name),
            _state(s.state),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            _time(s.updated_at),
            Text(shorten(visible(s.error or ""), ERROR_WIDTH)),  # visible first: no ESC cut
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
    head.add_row("saga", literal(f"{s.id}  ({s.name}, definition {s.version})"))
    head.add_row("state", _state(s.state))
    head.add_row("created", s.created_at.isoformat(timespec="milliseconds"))
    if s.finished_at:
        head.add_row("finished", s.finished_at.isoformat(timespec="milliseconds"))
    if s.key:
        head.add_row("key", literal(s.key))
    if s.error:
        head.add_row("error", literal(s.error, style="red"))
    if story.succeeded():
        head.add_row("succeeded", literal(" → ".join(story.succeeded())))
    if story.compensated():
        head.add_row("compensated", literal(" → ".join(story.compensated())))

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
        cells: dict[str, str | Text] = {
            "#": str(r.id),
            "step": literal(r.step),
            "": "→" if r.direction is Direction.FORWARD else "↩",
            "try": str(r.attempt),
            "status": Text(r.status.value, style=STATUS_STYLE[r.status]),
            "worker": literal(r.worker),
            "task": literal((r.task_id or "")[:8]),
            "key": literal(r.idempotency_key[:8]),
        }
        error = literal(r.error, ERROR_WIDTH)
        runs.add_row(*(cells[c] for c in columns), *([error] if wide else []))
        if error.plain and not wide:
            errors.append(f"#{r.id} {visible(r.step)}: ", style="bold")
            errors.append(error.plain + "\n", style="red")

    timeline = Table(title="timeline", title_justify="left", box=box.SIMPLE_HEAD,
                     padding=(0, 1), pad_edge=False)
    for col in ("time", "event"):
        timeline.add_column(col, no_wrap=True)
    timeline.add_column("step", overflow="fold", max_width=18)
    timeline.add_column("detail", overflow="fold", min_width=20)
    for e in story.events:
        timeline.add_row(_time(e.at), _event(e.kind), literal(e.step), literal(e.message))
    parts: list[RenderableType] = [head, runs, *([errors] if errors.plain else []), timeline]
    return Panel(Group(*parts), title=literal(f"{s.name} {s.id[:8]}"), title_align="left")


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
    return literal(kind, style=style)


def approvals_table(approvals: list[ApprovalRecord]) -> Table:
    table = Table(title=f"{len(approvals)} approval request(s)", title_justify="left")
    for col in ("id", "saga", "step", "dir", "rule", "status", "deadline", "by"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "saga"),
                         min_width=32 if col == "id" else None)
    for a in approvals:
        table.add_row(*(literal(v) for v in (a.id, a.saga_id[:8], a.step, a.direction,
                                             a.rule_id, a.status)),
                      a.deadline.strftime("%Y-%m-%d %H:%M"), literal(a.decided_by))
    return table


def stranded_table(found: list[Stranded]) -> Table:
    table = Table(title=f"{len(found)} saga(s) without a way forward", title_justify="left")
    table.add_column("id", no_wrap=True)
    for col in ("name", "state", "since", "reason"):
        table.add_column(col, overflow="fold")
    for s in found:
        table.add_row(literal(s.saga_id), literal(s.name), _state(s.state),
                      s.updated_at.strftime("%Y-%m-%d %H:%M:%S"), literal(s.reason))
    return table
