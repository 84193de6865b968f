"""What a step, a caller or a stand-in wrote is shown as literal text, never acted on.

``sagaq ls``, ``show`` and ``approvals`` render records with rich: a plain string there is read
as markup, and raw escape sequences reach the operator's terminal. Here every renderer gets
hostile text (markup, ANSI, OSC 8, bidi overrides, arbitrary unicode) and must neither raise
nor emit a control character the input did not have written out.
"""

from __future__ import annotations

import io
import logging
import unicodedata
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from sagaq import render
from sagaq.commands import Story
from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.notify.base import Action, Kind, Notice
from sagaq.notify.log import LogNotifier
from sagaq.store import ApprovalRecord, EventRecord, SagaRecord, StepRunRecord
from sagaq.text import visible

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
HOSTILE = [
    "cannot open [/var/lib/data]",
    "order-[/42]",
    "[link=https://evil.example/x]click here[/link] and [conceal]hidden[/conceal]",
    "ok\x1b[2K\x1b[1Aerased\x1b[8mconcealed\x1b[0m",
    "\x1b]8;;https://evil.example\x1b\\innocent\x1b]8;;\x1b\\",
    "\u202eevil\u202c :smile: \x07\x08\r\x9b31m",
    "x" * 79 + "\x1b[2J",  # the 80-character cut must not leave a dangling ESC
]


def saga(text: str) -> SagaRecord:
    return SagaRecord(id=f"id-{text}", name=text, version=text, state=SagaState.NEEDS_HUMAN,
                      key=text, input={}, checkpoint={}, error=text, created_at=NOW,
                      updated_at=NOW, finished_at=NOW)


def run(text: str, direction: Direction) -> StepRunRecord:
    return StepRunRecord(
        id=1, saga_id="s", step=text, step_index=0, direction=direction, attempt=1,
        status=StepStatus.SUCCEEDED if direction is Direction.FORWARD else StepStatus.FAILED,
        task_name=text, compensate_task=None, idempotency_key=text, message_id=text,
        worker=text, task_id=text, deliveries=1, lease_expires_at=None, not_before=None,
        result=None, error=text, error_type=text, scheduled_at=NOW, started_at=NOW,
        finished_at=NOW)


def event(text: str) -> EventRecord:
    return EventRecord(id=1, saga_id="s", at=NOW, kind=text, step=text, step_run_id=None,
                       worker=text, task_id=text, message=text, data={})


def approval(text: str) -> ApprovalRecord:
    return ApprovalRecord(id=text, saga_id=text, step=text, direction=text, step_run_id=None,
                          rule_id=text, rule_fingerprint=text, policy_version=text,
                          status=text, deadline=NOW, requested_at=NOW, decided_at=NOW,
                          decided_by=text, decided_under=text, note=text)


def everything(text: str, width: int, terminal: bool = False) -> str:
    """Every sagaq table and ``show`` of records made of ``text``, as the terminal gets it."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal,
                      color_system="truecolor" if terminal else None)
    story = Story(saga(text), [run(text, Direction.FORWARD), run(text, Direction.COMPENSATE)],
                  [event(text)])
    console.print(render.saga_table([saga(text)]))
    console.print(render.story(story, width))
    console.print(render.approvals_table([approval(text)]))
    return out.getvalue()


def controls(text: str) -> set[str]:
    return {c for c in text if unicodedata.category(c) == "Cc" and c != "\n"}


def test_markup_in_a_step_error_or_a_key_is_shown_as_it_is() -> None:
    for text in HOSTILE[:3]:
        for width in (80, 140):
            shown = everything(text, width)
            assert "[/" in shown or "[link" in shown  # literally there, not parsed
    shown = everything(HOSTILE[2], 200, terminal=True)
    assert "\x1b]8;" not in shown  # no OSC 8 hyperlink was made of [link=...]
    assert "[conceal]hidden[/conceal]" in shown


def test_escape_sequences_are_written_out_not_sent() -> None:
    for text in HOSTILE[3:]:
        for width in (60, 80, 140):
            shown = everything(text, width)
            assert not controls(shown), (text, shown)
            assert "\\x1b" in shown or "\\u202e" in shown
    # the cut comes after the escaping: what is left of the sequence is literal text
    assert visible("x" * 79 + "\x1b[2J", 80).endswith("x…")
    assert visible("\x1b", 80) == "\\x1b"


def test_the_log_notifier_writes_controls_out(caplog) -> None:  # type: ignore[no-untyped-def]
    hostile = "disk [full]\x1b[2K\x1b]8;;https://evil\x07 \u202e"
    notice = Notice(saga_id="s-1", saga_name="demo", kind=Kind.PAGE, action=Action.TRIGGER,
                    dedup_key="sagaq/s-1/incident-0", summary=hostile, severity="critical",
                    created_at=NOW, state="needs_human", commands=(f"sagaq show {hostile}",),
                    note=hostile)
    with caplog.at_level(logging.INFO, logger="sagaq.notify"):
        LogNotifier().send(notice)
    (line,) = [r.getMessage() for r in caplog.records]
    assert not controls(line) and "\u202e" not in line
    assert "\\x1b[2K" in line and "\\u202e" in line and "[full]" in line


_texts = st.one_of(
    st.text(),
    st.lists(st.sampled_from(["[", "]", "[/", "[link=http://x]", "[bold", "\x1b", "\x1b[",
                              "\x1b]8;;", "\x07", "\x9b", "\u202e", "\n", "\r", ":smile:",
                              "\\", "a", "é", "漢", "🙂", "\u0301"]))
    .map("".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_texts, width=st.sampled_from([40, 100, 140]))
def test_any_text_renders_in_every_table_without_raising_or_leaking(text: str,
                                                                   width: int) -> None:
    shown = everything(text, width)
    assert not controls(shown)
    assert not any(c in shown for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
