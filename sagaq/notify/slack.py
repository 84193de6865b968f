"""Slack incoming webhook: a ``text`` fallback (notifications, screen readers) plus Block Kit.

The webhook URL is itself the credential (anyone holding it can post), so it is never logged
or put in an error: errors name ``https://hooks.slack.com`` only. Slack allows about one
message per second per webhook and answers 429 with ``Retry-After``; that surfaces as a
retryable :class:`DeliveryError` carrying ``retry_after``, and the delivery task waits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx

from sagaq.notify.base import (
    FAILED_COMPENSATION,
    FAILED_STEP,
    TIMELINE,
    UNCOMPENSATED,
    Action,
    Failure,
    Kind,
    Notice,
    failure_in,
)
from sagaq.notify.http import DEFAULT_TIMEOUT, iso_utc, notice_links, post_json, safe_origin

HEADER_MAX = 150  # Block Kit limits, in characters
SECTION_MAX = 3000
FIELD_MAX = 2000
TIMELINE_LINES = 10  # the last events shown; the full timeline is one ``sagaq show`` away


def escape(text: object) -> str:
    """Escape the three characters Slack mrkdwn treats as control characters."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _code(lines: Iterable[str], limit: int = SECTION_MAX, title: str = "") -> str:
    """A titled code block that stays within ``limit`` even when the content is long."""
    head = f"{title}\n" if title else ""
    body = "\n".join(escape(line) for line in lines) or " "
    room = limit - len(head) - 8
    return f"{head}```\n{_clip(body, room)}\n```"


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _clip(text, SECTION_MAX)}}


def _event_line(event: object) -> str:
    if isinstance(event, dict):
        keys = ("at", "event", "type", "step", "detail")
        parts = [" ".join(str(event[k]).split()) for k in keys if event.get(k)]
        return " ".join(parts) or str(event)
    return " ".join(str(event).split())


def _failure_section(title: str, failure: Failure) -> dict[str, Any]:
    attempt = f" (attempt {failure.attempt})" if failure.attempt is not None else ""
    text = f"*{title}:* `{escape(failure.step)}`{attempt}"
    if failure.error:
        text += "\n" + _code(failure.error.splitlines(), SECTION_MAX - len(text) - 1, "Last error:")
    return _section(text)


def slack_message(notice: Notice, *, link_template: str | None = None) -> dict[str, Any]:
    """The incoming-webhook body for ``notice``: ``text`` and ``blocks``."""
    resolved = notice.action is Action.RESOLVE
    page = notice.kind is Kind.PAGE
    if resolved:
        label, emoji = "Resolved", ":white_check_mark:"
    elif page:
        label, emoji = "Page", ":rotating_light:"
    else:
        label, emoji = "Notice", ":warning:"
    one_line = " ".join(notice.summary.split())
    text = escape(f"{label}: {one_line} (saga {notice.saga_name} {notice.saga_id})")

    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {
                "type": "plain_text",
                "text": _clip(f"{label}: {notice.saga_name}", HEADER_MAX),
                "emoji": True,
            },
        },
    ]
    if resolved:
        message = f"{emoji} *Resolved.* This incident is closed; no further action is needed."
        if notice.note:
            message += f"\n*Note:* {escape(notice.note)}"
        blocks.append(_section(message))
    blocks.append(_section(f"{emoji} {escape(notice.summary)}"))
    blocks.append(
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": _clip(f"*{name}*\n{escape(value)}", FIELD_MAX)}
                for name, value in (
                    ("Saga", notice.saga_name),
                    ("Saga id", notice.saga_id),
                    ("State", notice.state),
                    ("Severity", notice.severity),
                )
            ],
        }
    )
    details = notice.details
    for key, title in ((FAILED_COMPENSATION, "Failed compensation"), (FAILED_STEP, "Failed step")):
        failure = failure_in(details, key)
        if failure is not None:
            blocks.append(_failure_section(title, failure))
    steps = details.get(UNCOMPENSATED)
    if isinstance(steps, list | tuple):
        listed = ", ".join(f"`{escape(s)}`" for s in steps) if steps else "none"
        blocks.append(_section(f"*Still uncompensated:* {listed}"))
    events = details.get(TIMELINE)
    if isinstance(events, list | tuple) and events:
        recent = [_event_line(e) for e in list(events)[-TIMELINE_LINES:]]
        blocks.append(_section(_code(recent, title="*Last events:*")))
    if notice.commands:
        title = "*Commands:*" if resolved else "*To act:*"
        blocks.append(_section(_code(notice.commands, title=title)))
    context = f"dedup key `{escape(notice.dedup_key)}` · {iso_utc(notice.created_at)}"
    links = notice_links(notice, link_template)
    if links:
        context += " · " + " · ".join(f"<{link['href']}|{escape(link['text'])}>" for link in links)
    blocks.append(
        {"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(context, FIELD_MAX)}]}
    )
    return {"text": text, "blocks": blocks}


class SlackNotifier:
    """Posts every notice (pages and notifies) to one Slack incoming webhook."""

    name: str = "slack"
    kinds: frozenset[Kind] = frozenset({Kind.PAGE, Kind.NOTIFY})

    def __init__(
        self,
        webhook_url: str,
        *,
        link_template: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client: httpx.Client | None = None,
    ) -> None:
        self._webhook_url = webhook_url
        self.link_template = link_template
        self.timeout = timeout
        self.client = client

    def __repr__(self) -> str:  # the URL is the credential: show its host only
        return f"SlackNotifier(webhook_url={safe_origin(self._webhook_url)!r})"

    def send(self, notice: Notice) -> None:
        post_json(
            self._webhook_url,
            slack_message(notice, link_template=self.link_template),
            timeout=self.timeout,
            client=self.client,
            channel=self.name,
        )
